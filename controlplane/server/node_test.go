package server

import (
	"io"
	"log/slog"
	"testing"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"google.golang.org/genproto/googleapis/rpc/status"

	"github.com/meshlet/meshlet/internal/testutil"
	"github.com/meshlet/meshlet/xds"
)

// settle returns once the build loop has built the latest inputs and
// returned from that build (prune included): a build has taken the pending
// inputs, and then the next one has taken one more change (the same
// policy set), which it does only after the first returned.
func settle(t *testing.T, s *Server) {
	t.Helper()
	taken := func() bool {
		s.mu.Lock()
		defer s.mu.Unlock()
		return len(s.pending) == 0
	}
	testutil.Until(t, 5*time.Second, "a build to take the latest inputs", taken)
	s.mu.Lock()
	pol := s.policies
	s.mu.Unlock()
	s.SetPolicies(pol)
	testutil.Until(t, 5*time.Second, "the next build to start", taken)
}

// recorded reports whether s keeps a record of node ID id, and how many
// open streams carry that node.
func recorded(s *Server, id string) (record bool, streams int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, st := range s.streams {
		if st.node.GetId() == id {
			streams++
		}
	}
	return s.nodes[id] != nil, streams
}

// TestNodeRecordPrunedWhole: a node's record (its streams, snapshots,
// held-back reason, NACKs and ACKs, "unknown" logged) is kept while the
// node is in the catalog or connected, and goes whole, with nothing else
// keeping a trace of it, once it is neither: whichever of leaving the
// catalog and disconnecting comes last. A sidecar back in the catalog
// starts afresh: its snapshot is published and shown again.
func TestNodeRecordPrunedWhole(t *testing.T) {
	const web = "web-1-sidecar-proxy"
	tests := []struct {
		name string
		node *core.Node
		// registered: the node is in the catalog until it leaves it,
		// while connected (leavesConnected) or after disconnecting.
		registered, leavesConnected bool
	}{
		{name: "sidecar leaves the catalog then disconnects", node: &core.Node{Id: web, UserAgentName: xds.UserAgentName},
			registered: true, leavesConnected: true},
		{name: "sidecar disconnects then leaves the catalog", node: &core.Node{Id: web, UserAgentName: xds.UserAgentName},
			registered: true},
		{name: "unregistered sidecar disconnects", node: &core.Node{Id: "ghost-sidecar-proxy", UserAgentName: xds.UserAgentName}},
		{name: "proxyless client disconnects", node: grpcNode("client-a")},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			s := New(Config{Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
			addr := serveADS(t, s)
			s.SetCatalog(catalog(true))
			settle(t, s)
			id := tc.node.GetId()
			withoutWeb := func() {
				cat := catalog(true)
				delete(cat.Proxies, web)
				s.SetCatalog(cat)
				settle(t, s)
			}

			c := dialADSNode(t, addr, tc.node)
			nack := &discovery.DiscoveryRequest{TypeUrl: xds.ClusterType, ErrorDetail: &status.Status{Code: 3, Message: "cluster rejected"}}
			if tc.registered || xds.IsProxylessGRPC(tc.node) { // answered: NACK the answer
				c.send(&discovery.DiscoveryRequest{TypeUrl: xds.ClusterType})
				nack.ResponseNonce = c.recv().GetNonce()
			}
			c.send(nack)
			waitStatus(t, s, id+"'s rejection", func(st *Status) bool {
				return len(st.Rejections) == 1 && st.Rejections[0].Node == id && proxyStatus(st, id).Connected
			})
			if tc.leavesConnected {
				withoutWeb()
				if rec, _ := recorded(s, id); !rec {
					t.Fatal("the record went while the node was connected")
				}
			}
			c.close()
			testutil.Until(t, 5*time.Second, id+"'s stream to close", func() bool { _, n := recorded(s, id); return n == 0 })
			if tc.registered && !tc.leavesConnected {
				if rec, _ := recorded(s, id); !rec {
					t.Fatal("the record went while the node was in the catalog")
				}
				withoutWeb()
			}
			testutil.Until(t, 5*time.Second, id+"'s record to go", func() bool { rec, _ := recorded(s, id); return !rec })
			st := s.Status()
			for _, p := range st.Proxies {
				if p.Node == id {
					t.Errorf("status still shows %s: %+v", id, p)
				}
			}
			if len(st.Rejections) != 0 {
				t.Errorf("status still shows rejections: %+v", st.Rejections)
			}
			if !tc.registered {
				return
			}
			s.SetCatalog(catalog(true))
			waitStatus(t, s, web+"'s snapshot again", func(st *Status) bool { return len(proxyStatus(st, web).Snapshot) > 0 })
		})
	}
}
