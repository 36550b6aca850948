package translate

import (
	"fmt"
	"maps"
	"slices"
	"testing"

	cluster "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpoint "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listener "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	tcp "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/tcp_proxy/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	"github.com/hashicorp/consul/api"

	"github.com/meshlet/meshlet/controlplane/consul"
	"github.com/meshlet/meshlet/controlplane/model"
	"github.com/meshlet/meshlet/controlplane/policy"
	"github.com/meshlet/meshlet/xds"
)

// portsCatalog is a mesh of transparent proxies where api's Kubernetes
// Service has two ports, 80 → 8080 (the app's, behind the public
// listener) and 9090 → 9090, as the registrar writes them
// (xds.MetaServicePorts), read back through the Consul watcher's
// BuildCatalog. web may reach api (intention); ops may not.
func portsCatalog() *model.Catalog { return portsCatalogDialed("") }

// portsCatalogDialed is portsCatalog with the instance of pod dialled
// directly (xds.MetaDialedDirectly: a headless Service selects it too).
func portsCatalogDialed(dialed string) *model.Catalog {
	entry := func(svc *api.AgentService) *api.ServiceEntry {
		return &api.ServiceEntry{Node: &api.Node{Node: "node1-virtual", Address: "10.0.0.1", Datacenter: "dc1"}, Service: svc,
			Checks: api.HealthChecks{{Status: api.HealthPassing}}}
	}
	instance := func(name, pod, ip string, port int, virtual string, vport int, ports string) *api.ServiceEntry {
		s := &api.AgentService{ID: pod + "-" + name, Service: name, Address: ip, Port: port, Meta: map[string]string{"protocol": "http"}}
		if ports != "" {
			s.Meta[xds.MetaServicePorts] = ports
		}
		if pod == dialed {
			s.Meta[xds.MetaDialedDirectly] = "true"
			s.Meta[xds.MetaDirectPorts] = "7000" // a headless Service's peer port
		}
		s.TaggedAddresses = map[string]api.ServiceAddress{consul.VirtualTaggedAddress: {Address: virtual, Port: vport}}
		return entry(s)
	}
	proxy := func(name, pod, ip string, appPort int) *api.ServiceEntry {
		return entry(&api.AgentService{Kind: api.ServiceKindConnectProxy, ID: pod + "-" + name + "-sidecar-proxy", Service: name + "-sidecar-proxy",
			Address: ip, Port: xds.PodPublicPort, Proxy: &api.AgentServiceConnectProxyConfig{
				DestinationServiceName: name, DestinationServiceID: pod + "-" + name, LocalServicePort: appPort,
				Mode: api.ProxyModeTransparent, TransparentProxy: &api.TransparentProxyConfig{OutboundListenerPort: xds.OutboundCapturePort},
			}})
	}
	cat := consul.BuildCatalog(map[string][]*api.ServiceEntry{
		"web":               {instance("web", "web-1", "10.244.0.5", 8080, "10.96.0.10", 80, "")},
		"web-sidecar-proxy": {proxy("web", "web-1", "10.244.0.5", 8080)},
		"ops":               {instance("ops", "ops-1", "10.244.0.9", 8080, "10.96.0.90", 80, "")},
		"ops-sidecar-proxy": {proxy("ops", "ops-1", "10.244.0.9", 8080)},
		"api": {instance("api", "api-1", "10.244.0.6", 8080, "10.96.0.20", 80, "80:8080,9090:9090"),
			instance("api", "api-2", "10.244.0.7", 8080, "10.96.0.20", 80, "80:8080,9090:9090")},
		"api-sidecar-proxy": {proxy("api", "api-1", "10.244.0.6", 8080), proxy("api", "api-2", "10.244.0.7", 8080)},
	})
	cat.CA = &model.CA{TrustDomain: "11111111-2222-3333-4444-555555555555.consul", Roots: []model.Root{{ID: "r1", CertPEM: "ROOT", Active: true}}}
	for _, svc := range []string{"web", "api", "ops"} {
		cat.Leaves[svc] = &model.Leaf{Service: svc, CertPEM: "LEAF-" + svc, KeyPEM: "KEY-" + svc, SPIFFEID: "spiffe://" + cat.CA.TrustDomain + "/ns/default/dc/dc1/svc/" + svc}
	}
	cat.Intentions["api"] = &model.Intentions{Destination: "api", Sources: []model.IntentionSource{{Name: "web", Action: "allow", Origin: "consul intention web => api"}}}
	return cat
}

// TestServicePortsReachedOverMTLS: every port of a two-port Service is a
// virtual address of its callers' transparent proxies; the app's own port
// keeps the public listener's path, the other port is dialled on each
// instance's address at its target port in the service's mTLS, and the
// callee's inbound capture listener terminates that mTLS on the target
// port (strict: no plaintext chain; permissive: one) before the app's
// port. A caller that may not reach the service gets refusing chains on
// every port and no cluster. Built from a proxy's scope as from the whole
// catalog.
func TestServicePortsReachedOverMTLS(t *testing.T) {
	cat := portsCatalog()
	if got := cat.Services["api"].VirtualAddresses(); fmt.Sprint(got) != "[10.96.0.20:80 10.96.0.20:9090]" {
		t.Fatalf("api's virtual addresses = %v, want both ports", got)
	}
	build := func(id string, pol *policy.Set) Resources {
		t.Helper()
		p := cat.Proxies[id]
		r, err := Proxy(cat.Scope(p), pol, p)
		if err != nil {
			t.Fatal(err)
		}
		full, err := Proxy(cat, pol, p)
		if err != nil {
			t.Fatal(err)
		}
		if string(render(t, r)) != string(render(t, full)) {
			t.Errorf("%s: built from its scope, the resources differ from those built from the whole catalog", id)
		}
		return r
	}
	chains := func(r Resources, listenerName string) map[string]*listener.FilterChain {
		out := map[string]*listener.FilterChain{}
		for _, l := range r.Listeners {
			if l.GetName() == listenerName {
				for _, fc := range l.GetFilterChains() {
					out[fc.GetName()] = fc
				}
			}
		}
		return out
	}
	tcpCluster := func(fc *listener.FilterChain) string {
		for _, f := range fc.GetFilters() {
			var m tcp.TcpProxy
			if f.GetTypedConfig().UnmarshalTo(&m) == nil {
				return m.GetCluster()
			}
		}
		return ""
	}

	// web, the caller.
	web := build("web-1-web-sidecar-proxy", nil)
	out := chains(web, xds.OutboundCaptureListener)
	app, other := out[xds.UpstreamListener("api")+":80"], out[xds.UpstreamListener("api")+":9090"]
	if app == nil || other == nil {
		t.Fatalf("web's outbound capture chains = %v, want api's on ports 80 and 9090", slices.Sorted(maps.Keys(out)))
	}
	if m := other.GetFilterChainMatch(); m.GetDestinationPort().GetValue() != 9090 || len(m.GetPrefixRanges()) != 1 || m.GetPrefixRanges()[0].GetAddressPrefix() != "10.96.0.20" {
		t.Errorf("api:9090 chain matches %v", m)
	}
	if got := tcpCluster(other); got != xds.ServicePortCluster("api", 9090) {
		t.Errorf("api's port 9090 goes to cluster %q, want %q", got, xds.ServicePortCluster("api", 9090))
	}
	if got := tcpCluster(app); got != "" {
		t.Errorf("api's port 80 (http, the app's port) is a TCP proxy to %q, want the HTTP route to %q", got, xds.ServiceCluster("api"))
	}
	var sni, svcSNI string
	for _, c := range web.Clusters {
		var u tlsv3.UpstreamTlsContext
		if c.GetTransportSocket().GetTypedConfig().UnmarshalTo(&u) != nil {
			continue
		}
		switch c.GetName() {
		case xds.ServicePortCluster("api", 9090):
			sni = u.GetSni()
			if got := u.GetCommonTlsContext().GetAlpnProtocols(); len(got) != 0 {
				t.Errorf("api:9090's mTLS offers ALPN %v, want none (opaque bytes)", got)
			}
		case xds.ServiceCluster("api"):
			svcSNI = u.GetSni()
		}
	}
	if sni == "" || sni != svcSNI {
		t.Errorf("api:9090's cluster SNI %q, want api's %q (its identity)", sni, svcSNI)
	}
	var eps []string
	for _, cla := range web.Endpoints {
		if cla.GetClusterName() != xds.ServicePortCluster("api", 9090) {
			continue
		}
		for _, le := range cla.GetEndpoints() {
			for _, e := range le.GetLbEndpoints() {
				eps = append(eps, hostPort(e))
			}
		}
	}
	if slices.Sort(eps); fmt.Sprint(eps) != "[10.244.0.6:9090 10.244.0.7:9090]" {
		t.Errorf("api:9090's endpoints = %v, want each instance's address at its target port", eps)
	}

	// ops may not reach api: refusing chains on both ports, no cluster.
	ops := build("ops-1-ops-sidecar-proxy", nil)
	oc := chains(ops, xds.OutboundCaptureListener)
	for _, port := range []int{80, 9090} {
		fc := oc[fmt.Sprintf("%s:%d", xds.UpstreamListener("api"), port)]
		if fc == nil || tcpCluster(fc) == xds.ServicePortCluster("api", 9090) {
			t.Errorf("ops's chain for api:%d = %v, want a refusing chain", port, fc.GetName())
		}
	}
	for _, c := range ops.Clusters {
		if c.GetName() == xds.ServicePortCluster("api", 9090) {
			t.Error("ops may not reach api but has its port cluster")
		}
	}

	// api, the callee: strict, then permissive.
	for _, tc := range []struct {
		mode      string
		plaintext bool
	}{{policy.MTLSStrict, false}, {policy.MTLSPermissive, true}} {
		pol, err := policy.Parse(map[string][]byte{"mesh.yaml": []byte("apiVersion: meshlet.io/v1alpha1\nkind: MeshDefaults\nmetadata: {name: mesh}\nspec:\n  mtls: {mode: " + tc.mode + "}\n")})
		if err != nil {
			t.Fatal(err)
		}
		r := build("api-1-api-sidecar-proxy", pol)
		in := chains(r, xds.InboundCaptureListener)
		var secure, plain *listener.FilterChain
		for name, fc := range in {
			if fc.GetFilterChainMatch().GetDestinationPort().GetValue() != 9090 {
				continue
			}
			if fc.GetTransportSocket() != nil {
				secure = fc
			} else {
				plain = fc
			}
			if tcpCluster(fc) != xds.LocalAppPortCluster(9090) {
				t.Errorf("%s: inbound chain %s goes to %q, want %q", tc.mode, name, tcpCluster(fc), xds.LocalAppPortCluster(9090))
			}
		}
		if secure == nil {
			t.Fatalf("%s: api's inbound capture chains %v: none terminates mTLS on port 9090", tc.mode, slices.Sorted(maps.Keys(in)))
		}
		if (plain != nil) != tc.plaintext {
			t.Errorf("%s: plaintext chain on port 9090 present = %v, want %v", tc.mode, plain != nil, tc.plaintext)
		}
		if len(secure.GetFilters()) < 2 || secure.GetFilters()[0].GetName() != xds.RBACNetworkFilter {
			t.Errorf("%s: port 9090's mTLS chain has no RBAC filter first: %v", tc.mode, secure.GetFilters())
		}
		var local *core.SocketAddress
		for _, c := range r.Clusters {
			if c.GetName() == xds.LocalAppPortCluster(9090) {
				local = c.GetLoadAssignment().GetEndpoints()[0].GetLbEndpoints()[0].GetEndpoint().GetAddress().GetSocketAddress()
			}
		}
		if local == nil || local.GetAddress() != "127.0.0.1" || local.GetPortValue() != 9090 {
			t.Errorf("%s: cluster %s = %v, want 127.0.0.1:9090", tc.mode, xds.LocalAppPortCluster(9090), local)
		}
	}
}

func hostPort(e *endpoint.LbEndpoint) string {
	a := e.GetEndpoint().GetAddress().GetSocketAddress()
	return fmt.Sprintf("%s:%d", a.GetAddress(), a.GetPortValue())
}

// TestDialedDirectlyInstances: an instance of a service with a virtual
// address that a headless Service selects too (meta
// xds.MetaDialedDirectly) is matched on its own address, on its port, its
// Service's other target ports and the headless Service's port (meta
// xds.MetaDirectPorts), whose mTLS its sidecar terminates, by callers that may reach the
// service, in the service's mTLS (the direct cluster); its sibling
// without the meta is not, and a caller that may not reach the service
// gets no such chain.
func TestDialedDirectlyInstances(t *testing.T) {
	cat := portsCatalogDialed("api-1")
	directOf := func(id string) ([]string, bool) {
		p := cat.Proxies[id]
		r, err := Proxy(cat.Scope(p), nil, p)
		if err != nil {
			t.Fatal(err)
		}
		var got []string
		for _, l := range r.Listeners {
			if l.GetName() != xds.OutboundCaptureListener {
				continue
			}
			for _, fc := range l.GetFilterChains() {
				if svc, ok := xds.DirectService(fc.GetName()); !ok || svc != "api" {
					continue
				}
				for _, pr := range fc.GetFilterChainMatch().GetPrefixRanges() {
					got = append(got, fmt.Sprintf("%s:%d", pr.GetAddressPrefix(), fc.GetFilterChainMatch().GetDestinationPort().GetValue()))
				}
			}
		}
		slices.Sort(got)
		return got, slices.ContainsFunc(r.Clusters, func(c *cluster.Cluster) bool { return c.GetName() == xds.DirectCluster("api") })
	}
	if got, has := directOf("web-1-web-sidecar-proxy"); fmt.Sprint(got) != "[10.244.0.6:7000 10.244.0.6:8080 10.244.0.6:9090]" || !has {
		t.Errorf("web's direct chains for api match %v (cluster %v), want api-1's address on 7000 (its headless Service's), 8080 and 9090", got, has)
	}
	// api-1's sidecar terminates mTLS on the headless Service's port too.
	p := cat.Proxies["api-1-api-sidecar-proxy"]
	r, err := Proxy(cat, nil, p)
	if err != nil {
		t.Fatal(err)
	}
	var ports []uint32
	for _, l := range r.Listeners {
		if l.GetName() == xds.InboundCaptureListener {
			for _, fc := range l.GetFilterChains() {
				if fc.GetTransportSocket() != nil {
					ports = append(ports, fc.GetFilterChainMatch().GetDestinationPort().GetValue())
				}
			}
		}
	}
	slices.Sort(ports)
	if fmt.Sprint(ports) != "[7000 8080 9090]" {
		t.Errorf("api-1's inbound mTLS chains on ports %v, want 7000, 8080 and 9090", ports)
	}
	if got, has := directOf("ops-1-ops-sidecar-proxy"); len(got) > 0 || has {
		t.Errorf("ops may not reach api but matches %v (cluster %v)", got, has)
	}
	if got, _ := directOfCatalog(t, portsCatalog(), "web-1-web-sidecar-proxy"); len(got) > 0 {
		t.Errorf("without the meta, web matches api's instances directly: %v", got)
	}
}

// directOfCatalog is the names of proxy id's direct chains in cat.
func directOfCatalog(t *testing.T, cat *model.Catalog, id string) ([]string, error) {
	t.Helper()
	p := cat.Proxies[id]
	r, err := Proxy(cat, nil, p)
	if err != nil {
		return nil, err
	}
	var got []string
	for _, l := range r.Listeners {
		for _, fc := range l.GetFilterChains() {
			if _, ok := xds.DirectService(fc.GetName()); ok {
				got = append(got, fc.GetName())
			}
		}
	}
	return got, nil
}
