package server

import (
	"io"
	"log/slog"
	"slices"
	"strings"
	"testing"
	"time"

	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/genproto/googleapis/rpc/status"

	"github.com/meshlet/meshlet/internal/testutil"
	"github.com/meshlet/meshlet/xds"
)

const greeterTimeout = "apiVersion: meshlet.io/v1alpha1\nkind: TimeoutPolicy\nmetadata: {name: greeter-timeouts}\nspec:\n  service: greeter\n  request: 5s\n"

// TestProxylessNACKParkedUntilItsResourceChanges: a proxyless client NACKs
// the first listener it gets, having accepted none (version_info "", which
// go-control-plane's LinearCache answers at once): the server does not send
// the rejected listener again, records the rejection with the resource and
// its sources for Status and the metrics, and answers once the listener
// changes; the ACK of the new version clears the rejection.
func TestProxylessNACKParkedUntilItsResourceChanges(t *testing.T) {
	s := New(Config{Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	reg := prometheus.NewRegistry()
	reg.MustRegister(s.Collector())
	addr := serveADS(t, s) // closed after the clients' cleanups (registered later, run first)
	s.SetCatalog(grpcCatalog(nil, demoPorts()))
	testutil.Until(t, 5*time.Second, "greeter's listener", func() bool {
		res, _ := proxylessState(s)
		_, ok := res[xds.ListenerType]["greeter"]
		return ok
	})

	greeter := []string{"greeter"}
	a := dialADSNode(t, addr, grpcNode("client-a"))
	a.send(&discovery.DiscoveryRequest{TypeUrl: xds.ListenerType, ResourceNames: greeter})
	r1 := a.recv()
	if got := responseNames(t, r1); !slices.Equal(got, greeter) {
		t.Fatalf("listeners %v, want %v", got, greeter)
	}
	detail := `xds: resource "greeter" of type ListenerResource: route_config: unsupported field`
	a.send(&discovery.DiscoveryRequest{TypeUrl: xds.ListenerType, ResourceNames: greeter, ResponseNonce: r1.GetNonce(),
		ErrorDetail: &status.Status{Code: 3, Message: detail}})
	// The stream handles requests in order and sends responses in the
	// order the caches give them: a resend of the listener would come
	// before the answer to this later request.
	a.send(&discovery.DiscoveryRequest{TypeUrl: xds.ClusterType, ResourceNames: greeter})
	if r := a.recv(); r.GetTypeUrl() != xds.ClusterType {
		t.Fatalf("got %s version %s after the NACK of listener version %s, want no resend", r.GetTypeUrl(), r.GetVersionInfo(), r1.GetVersionInfo())
	} else {
		a.ack(r, greeter)
	}

	st := waitStatus(t, s, "the rejection", func(st *Status) bool { return len(st.Rejections) == 1 })
	rej := st.Rejections[0]
	if rej.Node != "client-a" || rej.TypeURL != xds.ListenerType || rej.Version != r1.GetVersionInfo() || rej.AcceptedVersion != "" || !rej.Named {
		t.Errorf("rejection = %+v", rej)
	}
	if len(rej.Resources) != 1 || rej.Resources[0].Name != "greeter" {
		t.Fatalf("rejected resources = %+v, want listener greeter", rej.Resources)
	}
	var srcs []string
	for _, src := range rej.Sources() {
		srcs = append(srcs, src.String())
	}
	if want := `consul service "greeter"`; !strings.Contains(strings.Join(srcs, "\n"), want) {
		t.Errorf("sources %q lack %q", srcs, want)
	}
	p := proxyStatus(st, "client-a")
	if p.Sent[xds.ListenerType] != r1.GetVersionInfo() || p.ACKed[xds.ListenerType] != "" || !slices.Equal(p.Subscribed[xds.ListenerType], greeter) {
		t.Errorf("client-a's status = %+v", p)
	}
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	if v := sample(mfs, "meshlet_controlplane_xds_nacks_total", map[string]string{"node": "client-a", "type": xds.ListenerType}); v != 1 {
		t.Errorf("nacks_total{node=client-a, type=listener} = %v, want 1", v)
	}

	// A new route timeout for greeter changes its listener: it is sent,
	// and its ACK clears the rejection.
	s.SetPolicies(servePolicies(t, map[string]string{"policies/greeter.yaml": greeterTimeout}))
	r2 := a.recv()
	if r2.GetTypeUrl() != xds.ListenerType || r2.GetVersionInfo() == r1.GetVersionInfo() || !slices.Equal(responseNames(t, r2), greeter) {
		t.Fatalf("after the fix: %s %v version %s, want listener greeter in a version after %s", r2.GetTypeUrl(), responseNames(t, r2), r2.GetVersionInfo(), r1.GetVersionInfo())
	}
	a.ack(r2, greeter)
	st = waitStatus(t, s, "the rejection cleared by the ACK", func(st *Status) bool { return len(st.Rejections) == 0 })
	if p := proxyStatus(st, "client-a"); p.ACKed[xds.ListenerType] != r2.GetVersionInfo() || p.Snapshot[xds.ListenerType] != r2.GetVersionInfo() {
		t.Errorf("client-a's status after the ACK = %+v", p)
	}
}
