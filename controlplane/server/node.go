package server

import (
	"slices"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"

	"github.com/meshlet/meshlet/controlplane/model"
	"github.com/meshlet/meshlet/controlplane/policy"
	"github.com/meshlet/meshlet/xds"
)

// nodeInfo is the server's record of one xDS node (Server.nodes, by node
// ID), after go-control-plane's statusInfo (pkg/cache/v3/status.go): what
// was published for it, why its latest build was held back, how it
// answered each type, and its open streams. It is created by the node's
// first build or first stream, and deleted whole by pruneLocked once the
// node is neither in the catalog nor connected. Its fields are guarded by
// Server.mu.
type nodeInfo struct {
	// streams are the node's open ADS streams by stream ID; a stream joins
	// at its first request that carries the node.
	streams map[int64]*streamState
	// version is the versions of every type of the last snapshot set for
	// the node, joined ("" before the first); published holds the last
	// maxPublished of them, oldest first. Sidecars only: the proxyless
	// clients' history is Server.proxylessPublished.
	version   string
	published []*published
	// heldBack is why the node's latest build was not published, and
	// heldReason its kind (HeldNotReady, HeldInconsistent, HeldError);
	// both "" when its snapshot is current. Sidecars only.
	heldBack, heldReason string
	// types holds, by type URL, the node's NACKs and ACKs over all its
	// streams.
	types map[string]*nodeType
	// unknownLogged is true once the node was reported as not registered
	// in Consul (once per record: again if it reconnects after its record
	// was pruned).
	unknownLogged bool
}

// nodeType is how one node answered one type, over all its streams.
type nodeType struct {
	// rejection is its latest NACK not followed by an ACK (nil: none).
	rejection *Rejection
	// lastACK is the number (Server.seq) of its last ACK, so a NACK
	// explained outside the lock is not recorded after a newer ACK.
	lastACK uint64
}

// streamState is what the server tracks of one ADS stream.
type streamState struct {
	// identity is the stream's authenticated identity
	// (Config.StreamIdentity), taken when it opened; "" when none.
	identity string
	// node is nil until the stream's first request that carries one.
	node   *core.Node
	opened time.Time // first request that carries the node
	types  map[string]*typeState
}

// typeState is one type's exchange on one stream.
type typeState struct {
	// subscribed are the resource names of the latest request.
	subscribed               []string
	sentVersion, sentNonce   string
	sentAt                   time.Time
	ackedVersion, ackedNonce string
	ackedAt                  time.Time
}

// published is one snapshot set for a node, with what it was built from,
// so a later NACK of one of its versions can be explained.
type published struct {
	versions map[string]string   // by type URL
	names    map[string][]string // resource names by type URL
	// cat is what the snapshot was built from: for a sidecar its scope of
	// the catalog (model.Catalog.Scope, a few values, so keeping
	// maxPublished of them per node costs little), for the proxyless group
	// the whole catalog.
	cat *model.Catalog
	pol *policy.Set
}

// maxPublished is how many snapshots per node are kept for explaining
// NACKs of versions that are no longer current.
const maxPublished = 4

// nodeLocked returns the record of node ID id, created if needed. s.mu
// must be held.
func (s *Server) nodeLocked(id string) *nodeInfo {
	n := s.nodes[id]
	if n == nil {
		n = &nodeInfo{streams: map[int64]*streamState{}, types: map[string]*nodeType{}}
		s.nodes[id] = n
	}
	return n
}

// pruneLocked deletes the records of the nodes that are neither in cat
// nor connected. s.mu must be held.
func (s *Server) pruneLocked(cat *model.Catalog) {
	for id, n := range s.nodes {
		if _, registered := cat.Proxies[id]; !registered && len(n.streams) == 0 {
			delete(s.nodes, id)
		}
	}
}

// setHeldBack records why sidecar node's latest build was not published
// (why and reason "": it was), and reports whether why is what was
// recorded already.
func (s *Server) setHeldBack(node, reason, why string) (same bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := s.nodeLocked(node)
	same = n.heldBack == why
	n.heldBack, n.heldReason = why, reason
	return same
}

// historyLocked returns the snapshots last published for node, oldest
// first: the proxyless group's for a proxyless client. s.mu must be held.
func (s *Server) historyLocked(node *core.Node) []*published {
	if xds.IsProxylessGRPC(node) {
		return s.proxylessPublished
	}
	if n := s.nodes[node.GetId()]; n != nil {
		return n.published
	}
	return nil
}

// appendHistory appends rec to h, keeping the last maxPublished.
func appendHistory(h []*published, rec *published) []*published {
	h = append(h, rec)
	if len(h) > maxPublished {
		h = slices.Clone(h[len(h)-maxPublished:])
	}
	return h
}

func (n *nodeInfo) typ(typeURL string) *nodeType {
	t := n.types[typeURL]
	if t == nil {
		t = &nodeType{}
		n.types[typeURL] = t
	}
	return t
}

// newest returns the node's most recently opened stream, nil when it has
// none.
func (n *nodeInfo) newest() *streamState {
	var newest *streamState
	var newestID int64
	for id, st := range n.streams {
		if newest == nil || st.opened.After(newest.opened) || (st.opened.Equal(newest.opened) && id > newestID) {
			newest, newestID = st, id
		}
	}
	return newest
}

// ack records an ACK numbered seq: it clears the rejection.
func (t *nodeType) ack(seq uint64) {
	t.lastACK, t.rejection = seq, nil
}

// reject records r, a NACK numbered seq, unless an ACK numbered after it
// was recorded; one more NACK of the version already rejected adds to its
// count.
func (t *nodeType) reject(r *Rejection, seq uint64) {
	if t.lastACK >= seq {
		return
	}
	if prev := t.rejection; prev != nil && prev.Version == r.Version {
		r.FirstTime, r.Count = prev.FirstTime, prev.Count+1
	}
	t.rejection = r
}

func newStreamState(identity string) *streamState {
	return &streamState{identity: identity, types: map[string]*typeState{}}
}

func (st *streamState) typ(typeURL string) *typeState {
	t := st.types[typeURL]
	if t == nil {
		t = &typeState{}
		st.types[typeURL] = t
	}
	return t
}

// ack records req as an ACK when it acknowledges the last response of its
// type sent on the stream (and not already acknowledged), and reports
// whether it does.
func (ts *typeState) ack(req *discovery.DiscoveryRequest, now time.Time) bool {
	nonce := req.GetResponseNonce()
	if nonce == "" || nonce != ts.sentNonce || nonce == ts.ackedNonce || req.GetVersionInfo() != ts.sentVersion {
		return false
	}
	ts.ackedNonce, ts.ackedVersion, ts.ackedAt = nonce, req.GetVersionInfo(), now
	return true
}
