package sidecar

import (
	"encoding/json"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"testing"
	"time"

	cluster "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	listener "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"

	"github.com/meshlet/meshlet/controlplane/xdsbuild"
	"github.com/meshlet/meshlet/internal/testutil"
	"github.com/meshlet/meshlet/xds"
	"github.com/meshlet/meshlet/xds/xdstest"
)

// captureResources serves an outbound capture listener on 127.0.0.1:port
// with one chain, upstream:web (10.96.0.12:80, HTTP, RDS "web" → STATIC
// cluster web at upstream), and the pass-through default chain when
// passthrough.
func captureResources(t *testing.T, port int, upstream string, passthrough bool) xdstest.Resources {
	t.Helper()
	host, p := hostPort(t, upstream)
	filters := xdsbuild.NewHTTPListener("upstream:web", "127.0.0.1", port, xdsbuild.HTTPListenerOptions{RouteConfigName: "web", Via: node}).FilterChains[0].Filters
	return xdstest.Resources{
		Listeners: []types.Resource{xdsbuild.NewCaptureListener(xds.OutboundCaptureListener, "127.0.0.1", port, xdsbuild.CaptureOptions{
			Chains:      []xdsbuild.CaptureChain{{Name: "upstream:web", Prefixes: []netip.Prefix{netip.MustParsePrefix("10.96.0.12/32")}, Port: 80, Filters: filters}},
			Passthrough: passthrough,
		})},
		Routes:   []types.Resource{xdsbuild.NewRouteConfig("web", "web", xdsbuild.RouteOptions{})},
		Clusters: []types.Resource{xdsbuild.NewStaticCluster("web", host, p, xdsbuild.ClusterOptions{Protocol: xds.ProtocolHTTP}), xdsbuild.NewPassthroughCluster()},
	}
}

// TestCaptureListenerNACKedWithTheField: a capture listener or a
// pass-through cluster the sidecar cannot honour is NACKed with the
// resource and field named, and a valid one is then accepted.
func TestCaptureListenerNACKedWithTheField(t *testing.T) {
	up := upstream(t, "web")
	srv := xdstest.Start(t)
	s := startSidecar(t, srv.Addr)
	port := freePort(t)
	tests := []struct {
		name, version, typeURL string
		mutate                 func(*xdstest.Resources)
		detail                 string
	}{
		{"chain matched on server_names", "v1", xds.ListenerType, func(r *xdstest.Resources) {
			r.Listeners[0].(*listener.Listener).FilterChains[0].FilterChainMatch.ServerNames = []string{"web.shop.svc"}
		}, `listener "outbound_listener": filter_chains[0].filter_chain_match.server_names: not supported`},
		{"pass-through cluster with round robin", "v2", xds.ClusterType, func(r *xdstest.Resources) {
			r.Clusters[1].(*cluster.Cluster).LbPolicy = cluster.Cluster_ROUND_ROBIN
		}, `cluster "original-destination": lb_policy: an ORIGINAL_DST cluster needs CLUSTER_PROVIDED (got ROUND_ROBIN)`},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r := captureResources(t, port, up.Listener.Addr().String(), true)
			tc.mutate(&r)
			srv.Set(t, node, tc.version, r)
			srv.WaitRequest(t, 5*time.Second, "NACK of "+tc.version, func(req *discovery.DiscoveryRequest) bool {
				return req.GetTypeUrl() == tc.typeURL && strings.Contains(req.GetErrorDetail().GetMessage(), tc.detail)
			})
			if rej := s.ConfigDump().XDS.Rejected[tc.typeURL]; rej.Version != tc.version || !strings.Contains(rej.Error, tc.detail) {
				t.Errorf("config_dump rejected[%s] = %+v, want %s with %q", tc.typeURL, rej, tc.version, tc.detail)
			}
		})
	}
	srv.Set(t, node, "v3", captureResources(t, port, up.Listener.Addr().String(), true))
	testutil.Until(t, 5*time.Second, "v3 accepted", func() bool {
		v := s.ConfigDump().XDS.Versions
		return v[xds.ListenerType] == "v3" && v[xds.ClusterType] == "v3" && s.IsReady()
	})
}

// TestCaptureListenerRefusesDirectConnections: a connection dialled to a
// capture listener directly, not redirected by iptables, has no original
// destination but the listener itself; it is refused (the loop guard) and
// counted. The admin endpoints show the capture listener and its chains.
// (Redirected connections need netfilter: TestCaptureInNetns.)
func TestCaptureListenerRefusesDirectConnections(t *testing.T) {
	up := upstream(t, "web")
	srv := xdstest.Start(t)
	s := startSidecar(t, srv.Addr)
	port := freePort(t)
	srv.Set(t, node, "v1", captureResources(t, port, up.Listener.Addr().String(), true))
	testutil.Until(t, 5*time.Second, "sidecar ready", s.IsReady)
	admin := "http://" + s.AdminAddr().String()

	c, err := net.Dial("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, err := c.Read(make([]byte, 1)); err == nil || n != 0 {
		t.Fatalf("direct connection to the capture listener: read %d bytes, %v; want it closed", n, err)
	}
	want := `meshlet_sidecar_capture_refused_total{listener="outbound_listener",reason="not_redirected"} 1`
	testutil.Until(t, 5*time.Second, "refusal counted", func() bool {
		_, body, _ := get(t, admin+"/metrics")
		return strings.Contains(body, want+"\n")
	})

	_, body, _ := get(t, admin+"/listeners?format=json")
	var ls struct {
		ListenerStatuses []struct {
			Name         string `json:"name"`
			FilterChains []struct {
				Name            string   `json:"name"`
				DestinationPort int      `json:"destination_port"`
				PrefixRanges    []string `json:"prefix_ranges"`
				Default         bool     `json:"default"`
			} `json:"filter_chains"`
		} `json:"listener_statuses"`
	}
	if err := json.Unmarshal([]byte(body), &ls); err != nil {
		t.Fatalf("/listeners?format=json: %v\n%s", err, body)
	}
	if len(ls.ListenerStatuses) != 1 || ls.ListenerStatuses[0].Name != xds.OutboundCaptureListener || len(ls.ListenerStatuses[0].FilterChains) != 2 {
		t.Fatalf("/listeners?format=json = %s", body)
	}
	chains := ls.ListenerStatuses[0].FilterChains
	if c := chains[0]; c.Name != "upstream:web" || c.DestinationPort != 80 || len(c.PrefixRanges) != 1 || c.PrefixRanges[0] != "10.96.0.12/32" || c.Default {
		t.Errorf("first chain = %+v", c)
	}
	if c := chains[1]; c.Name != xds.PassthroughChain || !c.Default {
		t.Errorf("default chain = %+v", c)
	}
	if _, body, _ := get(t, admin+"/listeners"); body != "outbound_listener::127.0.0.1:"+strconv.Itoa(port)+"\n" {
		t.Errorf("/listeners = %q", body)
	}
	_, dump, _ := get(t, admin+"/config_dump")
	for _, w := range []string{`"name": "outbound_listener"`, `"name": "upstream:web"`, `"destinationPort": 80`, `"addressPrefix": "10.96.0.12"`,
		`"defaultFilterChain"`, `"name": "original-destination"`, `"type": "ORIGINAL_DST"`, `"lbPolicy": "CLUSTER_PROVIDED"`} {
		if !strings.Contains(dump, w) {
			t.Errorf("config_dump lacks %s", w)
		}
	}
	if t.Failed() {
		t.Log(dump)
	}
}
