package server

import (
	"io"
	"log/slog"
	"net"
	"slices"
	"strconv"
	"testing"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpoint "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/meshlet/meshlet/controlplane/model"
	"github.com/meshlet/meshlet/xds"
)

// grpcNode is the node a grpc-go xDS client sends (user_agent_name "gRPC
// Go"), which makes it a proxyless client.
func grpcNode(id string) *core.Node {
	return &core.Node{Id: id, UserAgentName: "gRPC Go", UserAgentVersionType: &core.Node_UserAgentVersion{UserAgentVersion: "1.85.0"}}
}

// grpcCatalog returns a catalog of services with instances on the given
// ports, and no sidecars. Like the Consul watcher it keeps the values of
// prev's services whose instances are the same.
func grpcCatalog(prev *model.Catalog, ports map[string][]int) *model.Catalog {
	services := map[string]*model.Service{}
	for name, ps := range ports {
		proto := "http"
		if name == "greeter" || name == "echo" {
			proto = "grpc"
		}
		s := &model.Service{Name: name, Protocol: proto}
		for i, p := range ps {
			s.Instances = append(s.Instances, model.Instance{ID: name + "-" + strconv.Itoa(i+1), Address: "127.0.0.1", Port: p, Weight: 1, Healthy: true})
		}
		if prev != nil {
			if old := prev.Services[name]; old != nil && slices.EqualFunc(old.Instances, s.Instances, func(a, b model.Instance) bool {
				return a.ID == b.ID && a.Port == b.Port
			}) {
				s = old
			}
		}
		services[name] = s
	}
	return model.NewCatalog(services, nil)
}

// demoPorts are the demo's plain HTTP services web, api and store, and the
// gRPC services greeter and echo.
func demoPorts() map[string][]int {
	return map[string][]int{"web": {8080}, "api": {8081}, "store": {8082}, "greeter": {50051, 50052}, "echo": {50061}}
}

// resourceNames returns the names of the resources of resp, in order.
func responseNames(t *testing.T, resp *discovery.DiscoveryResponse) []string {
	t.Helper()
	var out []string
	for _, a := range resp.GetResources() {
		m, err := anypb.UnmarshalNew(a, proto.UnmarshalOptions{})
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, cache.GetResourceName(m))
	}
	slices.Sort(out)
	return out
}

// responseEndpoints returns the endpoint addresses of each cluster load
// assignment in resp, sorted.
func responseEndpoints(t *testing.T, resp *discovery.DiscoveryResponse) map[string][]string {
	t.Helper()
	out := map[string][]string{}
	for _, a := range resp.GetResources() {
		cla := &endpoint.ClusterLoadAssignment{}
		if err := a.UnmarshalTo(cla); err != nil {
			t.Fatal(err)
		}
		eps := []string{}
		for _, l := range cla.GetEndpoints() {
			for _, e := range l.GetLbEndpoints() {
				sa := e.GetEndpoint().GetAddress().GetSocketAddress()
				eps = append(eps, net.JoinHostPort(sa.GetAddress(), strconv.Itoa(int(sa.GetPortValue()))))
			}
		}
		slices.Sort(eps)
		out[cla.GetClusterName()] = eps
	}
	return out
}

// subscribe asks for names of typeURL (a new subscription, or a change of
// one whose last response was acknowledged) and returns the first response
// holding all of them that exist in want, acknowledging every response
// before it (as a client does while the control plane is still building).
func (c *adsClient) subscribe(typeURL string, names []string, want []string) *discovery.DiscoveryResponse {
	c.t.Helper()
	c.send(&discovery.DiscoveryRequest{TypeUrl: typeURL, ResourceNames: names})
	deadline := time.Now().Add(5 * time.Second)
	for {
		r := c.recv()
		if r.GetTypeUrl() != typeURL {
			c.t.Fatalf("%s: got a %s response while subscribing to %s", c.node.GetId(), r.GetTypeUrl(), typeURL)
		}
		if got := responseNames(c.t, r); slices.Equal(got, want) {
			return r
		} else if time.Now().After(deadline) {
			c.t.Fatalf("%s: %s response holds %v, want %v", c.node.GetId(), typeURL, got, want)
		}
		c.ack(r, names)
	}
}

// ack acknowledges resp, still subscribing to names.
func (c *adsClient) ack(resp *discovery.DiscoveryResponse, names []string) {
	c.t.Helper()
	c.send(&discovery.DiscoveryRequest{TypeUrl: resp.GetTypeUrl(), ResourceNames: names, VersionInfo: resp.GetVersionInfo(), ResponseNonce: resp.GetNonce()})
}

// TestProxylessClientsGetTheNamesTheyAskFor is the regression test of
// proxyless clients timing out when Consul holds more than one service:
// grpc-go asks for exactly the listeners, clusters and endpoints it uses,
// and go-control-plane's ADS snapshot cache answered no request that did
// not name every resource of the shared snapshot ("ADS mode: not
// responding ... not listed"). Here two clients ask for different subsets
// (greeter; greeter and echo) out of five services and a third for a name
// that does not exist; each gets exactly what it asked for, the third an
// empty answer. Then echo's endpoints change and a service is added: only
// the client with echo gets an update, and only of echo's endpoints; the
// third client gets the listener it asked for once it exists. A greeter
// change then reaches both others, and is the first thing the
// greeter-only client receives after its initial exchange: it got nothing
// for the changes it did not ask for.
func TestProxylessClientsGetTheNamesTheyAskFor(t *testing.T) {
	s := New(Config{Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	reg := prometheus.NewRegistry()
	reg.MustRegister(s.Collector())
	addr := serveADS(t, s) // closed after the clients' cleanups (registered later, run first)
	ports := demoPorts()
	cat := grpcCatalog(nil, ports)
	s.SetCatalog(cat)

	greeter := []string{"greeter"}
	both := []string{"echo", "greeter"}
	a := dialADSNode(t, addr, grpcNode("client-a"))
	b := dialADSNode(t, addr, grpcNode("client-b"))
	c := dialADSNode(t, addr, grpcNode("client-c"))
	for _, x := range []struct {
		c     *adsClient
		names []string
	}{{a, greeter}, {b, both}} {
		for _, typ := range []string{xds.ListenerType, xds.ClusterType, xds.EndpointType} {
			r := x.c.subscribe(typ, x.names, x.names)
			if typ == xds.EndpointType {
				want := map[string][]string{}
				for _, n := range x.names {
					for _, p := range ports[n] {
						want[n] = append(want[n], hostPortOf(p))
					}
				}
				if got := responseEndpoints(t, r); !mapsEqual(got, want) {
					t.Errorf("%s: endpoints %v, want %v", x.c.node.GetId(), got, want)
				}
			}
			x.c.ack(r, x.names)
		}
	}
	nope := []string{"nope"}
	c.send(&discovery.DiscoveryRequest{TypeUrl: xds.ListenerType, ResourceNames: nope})
	empty := c.recv()
	if len(empty.GetResources()) != 0 || empty.GetVersionInfo() == "" {
		t.Errorf("a listener that does not exist: got %d resources, version %q; want none, with a version", len(empty.GetResources()), empty.GetVersionInfo())
	}
	c.ack(empty, nope)

	// echo gets a second instance, and "nope" is registered.
	translated := func() float64 { return metricValue(t, reg, "meshlet_controlplane_translations_total", KindProxyless) }
	before := translated()
	ports["echo"] = append(ports["echo"], 50062)
	ports["nope"] = []int{9999}
	cat = grpcCatalog(cat, ports)
	s.SetCatalog(cat)
	rb := b.recv()
	if rb.GetTypeUrl() != xds.EndpointType {
		t.Fatalf("client-b got a %s update after echo's endpoints changed, want only endpoints", rb.GetTypeUrl())
	}
	if got, want := responseEndpoints(t, rb), map[string][]string{"echo": {hostPortOf(50061), hostPortOf(50062)}}; !mapsEqual(got, want) {
		t.Errorf("client-b's update: %v, want %v (echo's endpoints alone)", got, want)
	}
	b.ack(rb, both)
	rc := c.recv()
	if rc.GetTypeUrl() != xds.ListenerType || !slices.Equal(responseNames(t, rc), nope) {
		t.Errorf("client-c got %s %v once nope was registered, want its listener", rc.GetTypeUrl(), responseNames(t, rc))
	}
	c.ack(rc, nope)
	if d := translated() - before; d != 2 {
		t.Errorf("%v services translated for the proxyless clients, want 2 (echo, nope)", d)
	}

	// Status: client-a, whose endpoints did not change, is up to date
	// (nothing marked pending) though the endpoints' version moved on.
	st := waitStatus(t, s, "the ACKs of client-b's endpoints and client-c's listener", func(st *Status) bool {
		return proxyStatus(st, "client-b").ACKed[xds.EndpointType] == rb.GetVersionInfo() &&
			proxyStatus(st, "client-c").ACKed[xds.ListenerType] == rc.GetVersionInfo()
	})
	for _, id := range []string{"client-a", "client-b", "client-c"} {
		p := proxyStatus(st, id)
		if p.Kind != KindProxyless || !p.Connected {
			t.Errorf("%s: status %+v, want a connected proxyless client", id, p)
		}
		for _, typ := range []string{xds.ListenerType, xds.ClusterType, xds.EndpointType} {
			if p.ACKed[typ] != p.Snapshot[typ] {
				t.Errorf("%s: %s ACKed %q, current %q: want it up to date", id, typ, p.ACKed[typ], p.Snapshot[typ])
			}
		}
	}
	if pa := proxyStatus(st, "client-a"); pa.ACKed[xds.EndpointType] == rb.GetVersionInfo() {
		t.Errorf("client-a ACKed endpoints version %s, which was sent to client-b only", rb.GetVersionInfo())
	}
	if v := metricValue(t, reg, "meshlet_controlplane_proxies_connected", KindProxyless); v != 3 {
		t.Errorf("proxies_connected{kind=proxyless} = %v, want 3", v)
	}

	// greeter's second instance fails: client-a's first message since its
	// initial exchange is greeter's endpoints, and so is client-b's next.
	ports["greeter"] = ports["greeter"][:1]
	s.SetCatalog(grpcCatalog(cat, ports))
	for _, x := range []*adsClient{a, b} {
		r := x.recv()
		if r.GetTypeUrl() != xds.EndpointType {
			t.Fatalf("%s got a %s update after greeter's endpoints changed, want endpoints", x.node.GetId(), r.GetTypeUrl())
		}
		if got, want := responseEndpoints(t, r), map[string][]string{"greeter": {hostPortOf(50051)}}; !mapsEqual(got, want) {
			t.Errorf("%s's update: %v, want %v (greeter's endpoints alone)", x.node.GetId(), got, want)
		}
	}
}

func hostPortOf(port int) string { return net.JoinHostPort("127.0.0.1", strconv.Itoa(port)) }

func mapsEqual(a, b map[string][]string) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if w, ok := b[k]; !ok || !slices.Equal(v, w) {
			return false
		}
	}
	return true
}

// metricValue returns the value of the counter or gauge name whose kind
// label is kind.
func metricValue(t *testing.T, reg *prometheus.Registry, name, kind string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	return sample(mfs, name, map[string]string{"kind": kind})
}
