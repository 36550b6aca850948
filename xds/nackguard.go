package xds

import (
	"sync"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/v3"
)

// NACKGuard stops the resend loop go-control-plane's snapshot cache falls
// into when a client rejects a response (go-control-plane issue #962): a
// NACK carries the last *accepted* version, which differs from the
// snapshot's, so the cache answers at once with the same rejected resources.
// As the xDS protocol intends, the guard parks the watch instead: when a
// NACK rejects the snapshot version that is still current, it rewrites the
// request's version_info to that version, so the cache answers only once the
// snapshot changes. Call its methods from the server callbacks of the same
// names; they are safe for concurrent use.
type NACKGuard struct {
	cache cache.SnapshotCache
	hash  cache.NodeHash

	mu   sync.Mutex // guards sent
	sent map[int64]map[string]sentResponse
}

type sentResponse struct{ nonce, version string }

// NewNACKGuard returns a guard for the snapshots in c, keyed by hash.
func NewNACKGuard(c cache.SnapshotCache, hash cache.NodeHash) *NACKGuard {
	return &NACKGuard{cache: c, hash: hash, sent: map[int64]map[string]sentResponse{}}
}

// OnStreamRequest inspects req before the cache sees it. For a NACK of the
// response last sent on the stream it returns the rejected version, and
// parked=true when that version is still the snapshot's (req was rewritten
// to wait for a change).
func (g *NACKGuard) OnStreamRequest(streamID int64, req *discovery.DiscoveryRequest) (rejected string, parked bool) {
	if req.GetErrorDetail() == nil {
		return "", false
	}
	g.mu.Lock()
	last, ok := g.sent[streamID][req.GetTypeUrl()]
	g.mu.Unlock()
	if !ok || last.nonce != req.GetResponseNonce() {
		return "", false
	}
	if g.currentVersion(req.GetNode(), req.GetTypeUrl()) == last.version {
		req.VersionInfo = last.version
		return last.version, true
	}
	return last.version, false
}

func (g *NACKGuard) currentVersion(node *core.Node, typeURL string) string {
	snap, err := g.cache.GetSnapshot(g.hash.ID(node))
	if err != nil {
		return ""
	}
	return snap.GetVersion(typeURL)
}

// OnStreamResponse records the nonce and version of each response sent.
func (g *NACKGuard) OnStreamResponse(streamID int64, resp *discovery.DiscoveryResponse) {
	g.mu.Lock()
	defer g.mu.Unlock()
	m := g.sent[streamID]
	if m == nil {
		m = map[string]sentResponse{}
		g.sent[streamID] = m
	}
	m[resp.GetTypeUrl()] = sentResponse{nonce: resp.GetNonce(), version: resp.GetVersionInfo()}
}

// OnStreamClosed forgets the stream.
func (g *NACKGuard) OnStreamClosed(streamID int64) {
	g.mu.Lock()
	delete(g.sent, streamID)
	g.mu.Unlock()
}
