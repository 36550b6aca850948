// Package nackguard parks the watch of a NACKed xDS response, so that
// go-control-plane's caches answer a rejection only once the resources
// change. It serves meshlet's control plane (controlplane/server) and the
// management server of tests (xds/xdstest).
package nackguard

import (
	"sync"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/v3"
)

// Guard stops the resend loop go-control-plane's snapshot cache falls
// into when a client rejects a response (go-control-plane issue #962): a
// NACK carries the last *accepted* version, which differs from the
// snapshot's, so the cache answers at once with the same rejected resources.
// As the xDS protocol intends, the guard parks the watch instead: when a
// NACK rejects the snapshot version that is still current, it rewrites the
// request's version_info to that version, so the cache answers only once the
// snapshot changes. Nodes served from a cache that versions each resource
// (WithPerResourceVersions) are parked on every NACK of the last response.
// Call its methods from the server callbacks of the same names; they are
// safe for concurrent use.
type Guard struct {
	cache cache.SnapshotCache
	hash  cache.NodeHash
	// perResource reports the nodes of WithPerResourceVersions (nil: none).
	perResource func(*core.Node) bool

	mu   sync.Mutex // guards sent
	sent map[int64]map[string]sentResponse
}

type sentResponse struct{ nonce, version string }

// Option configures a Guard.
type Option func(*Guard)

// WithPerResourceVersions names the nodes (match returns true) that are
// served not from the guard's snapshot cache but from caches that track
// the version of each resource sent on a stream, such as go-control-plane's
// LinearCache (pkg/cache/v3/linear.go). Such a cache answers a request
// carrying one of its versions only with the resources that changed since
// its last response on the stream, but answers at once a request without
// version_info, or with another cache's version: the NACK of a client that
// has accepted nothing of the type yet would get the rejected resources
// again, and again. For these nodes every NACK of the last response sent
// is parked: its version_info is rewritten to the rejected version, and the
// cache answers when a resource the client names changes. Default: no
// node.
func WithPerResourceVersions(match func(*core.Node) bool) Option {
	return func(g *Guard) { g.perResource = match }
}

// New returns a guard for the snapshots in c, keyed by hash.
func New(c cache.SnapshotCache, hash cache.NodeHash, opts ...Option) *Guard {
	g := &Guard{cache: c, hash: hash, sent: map[int64]map[string]sentResponse{}}
	for _, o := range opts {
		o(g)
	}
	return g
}

// OnStreamRequest inspects req before the cache sees it. For a NACK of the
// response last sent on the stream it returns the rejected version, and
// parked=true when req was rewritten to wait for a change: when that
// version is still the snapshot's, or always for the nodes of
// WithPerResourceVersions.
func (g *Guard) OnStreamRequest(streamID int64, req *discovery.DiscoveryRequest) (rejected string, parked bool) {
	if req.GetErrorDetail() == nil {
		return "", false
	}
	g.mu.Lock()
	last, ok := g.sent[streamID][req.GetTypeUrl()]
	g.mu.Unlock()
	if !ok || last.nonce != req.GetResponseNonce() {
		return "", false
	}
	if (g.perResource != nil && g.perResource(req.GetNode())) || g.currentVersion(req.GetNode(), req.GetTypeUrl()) == last.version {
		req.VersionInfo = last.version
		return last.version, true
	}
	return last.version, false
}

func (g *Guard) currentVersion(node *core.Node, typeURL string) string {
	snap, err := g.cache.GetSnapshot(g.hash.ID(node))
	if err != nil {
		return ""
	}
	return snap.GetVersion(typeURL)
}

// OnStreamResponse records the nonce and version of each response sent.
func (g *Guard) OnStreamResponse(streamID int64, resp *discovery.DiscoveryResponse) {
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
func (g *Guard) OnStreamClosed(streamID int64) {
	g.mu.Lock()
	delete(g.sent, streamID)
	g.mu.Unlock()
}
