package translate

import (
	"maps"
	"slices"
	"testing"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listener "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	udpproxy "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/udp/udp_proxy/v3"

	"github.com/meshlet/meshlet/controlplane/model"
	"github.com/meshlet/meshlet/controlplane/policy"
	"github.com/meshlet/meshlet/internal/golden"
	"github.com/meshlet/meshlet/xds"
)

// udpCatalog: "dns" declares udp in Consul meta and has two sidecars (one
// failing its checks); "client" calls it through an upstream on port 8053.
func udpCatalog() *model.Catalog {
	proxy := func(id, svc, addr string, port int, healthy bool, ups ...model.Upstream) *model.Proxy {
		return &model.Proxy{ID: id, Node: "n1", Service: svc, ServiceID: svc + "-x", Address: addr, Port: port,
			LocalAppAddress: "127.0.0.1", LocalAppPort: 53, Upstreams: ups, Weight: 1, Healthy: healthy}
	}
	cat := model.NewCatalog(
		map[string]*model.Service{
			"dns": {Name: "dns", Protocol: "udp", Instances: []model.Instance{
				{ID: "dns-1", Address: "10.0.1.1", Port: 53, Weight: 1, Healthy: true},
				{ID: "dns-2", Address: "10.0.1.2", Port: 53, Weight: 1, Healthy: false},
			}},
			"client": {Name: "client", Protocol: "http", Instances: []model.Instance{{ID: "client-1", Address: "10.0.1.9", Port: 8080, Weight: 1, Healthy: true}}},
		},
		map[string]*model.Proxy{
			"client-1-sidecar-proxy": proxy("client-1-sidecar-proxy", "client", "10.0.1.9", 21000, true,
				model.Upstream{Service: "dns", BindAddress: "127.0.0.1", BindPort: 8053}),
			"dns-1-sidecar-proxy": proxy("dns-1-sidecar-proxy", "dns", "10.0.1.1", 21053, true),
			"dns-2-sidecar-proxy": proxy("dns-2-sidecar-proxy", "dns", "10.0.1.2", 21053, false),
		},
	)
	cat.CA = &model.CA{TrustDomain: "11111111-2222-3333-4444-555555555555.consul", Roots: []model.Root{{ID: "r1", CertPEM: "-----BEGIN CERTIFICATE-----\nROOT\n-----END CERTIFICATE-----", Active: true}}}
	for _, svc := range []string{"client", "dns"} {
		cat.Leaves[svc] = &model.Leaf{Service: svc, CertPEM: "-----BEGIN CERTIFICATE-----\nLEAF-" + svc + "\n-----END CERTIFICATE-----",
			KeyPEM: "-----BEGIN EC PRIVATE KEY-----\nKEY-" + svc + "\n-----END EC PRIVATE KEY-----", SPIFFEID: SPIFFEID(cat.CA.TrustDomain, "dc1", svc)}
	}
	cat.Intentions["dns"] = &model.Intentions{Destination: "dns", Sources: []model.IntentionSource{
		{Name: "client", Action: "allow", Origin: "consul intention client => dns"},
	}}
	return cat
}

// udpPolicyYAML is the policy file of udpPolicies.
const udpPolicyYAML = `apiVersion: meshlet.io/v1alpha1
kind: TimeoutPolicy
metadata: {name: dns-idle}
spec: {service: dns, idle: 30s}
---
apiVersion: meshlet.io/v1alpha1
kind: CircuitBreakerPolicy
metadata: {name: dns-sessions}
spec: {service: dns, maxConnections: 500}
`

// udpPolicies: a 30 s session idle timeout and at most 500 sessions per
// caller sidecar for dns.
func udpPolicies(t *testing.T) *policy.Set {
	t.Helper()
	set, err := policy.Parse(map[string][]byte{"testdata/udp.yaml": []byte(udpPolicyYAML)})
	if err != nil {
		t.Fatal(err)
	}
	return set
}

// TestUDPGolden pins the resources of a udp service: the callee's sidecar
// keeps its mTLS TCP public listener and gets public_listener_udp on the
// same address and port (udp_proxy to local_app, the TimeoutPolicy idle);
// the caller's sidecar gets a UDP listener "upstream:dns" on the bind port
// and a plaintext EDS cluster (no transport socket) whose circuit breaker
// bounds the sessions, with the healthy sidecars as endpoints.
func TestUDPGolden(t *testing.T) {
	cat, pol := udpCatalog(), udpPolicies(t)
	for _, name := range []string{"client-1-sidecar-proxy", "dns-1-sidecar-proxy"} {
		t.Run(name, func(t *testing.T) {
			p := cat.Proxies[name]
			r, err := Proxy(cat, pol, p)
			if err != nil {
				t.Fatal(err)
			}
			golden.Check(t, "udp-"+p.Service+"-sidecar.golden.json", render(t, r))

			m, err := ProxySources(cat, pol, p)
			if err != nil {
				t.Fatal(err)
			}
			want := names(r)
			for typ := range want {
				slices.Sort(want[typ])
			}
			if got := keys(m); !maps.EqualFunc(got, want, slices.Equal) {
				t.Errorf("ProxySources explains %v, Proxy builds %v", got, want)
			}
			golden.Check(t, "sources-udp-"+p.Service+"-sidecar.golden.txt", renderSources(m))
		})
	}
}

// TestUDPListenersOnlyForUDPServices: no other protocol opens a UDP
// listener, inbound or outbound; a udp service declared by a policy file
// does, with Envoy's default idle timeout when no TimeoutPolicy sets one.
func TestUDPListenersOnlyForUDPServices(t *testing.T) {
	udpListeners := func(r Resources) []string {
		var out []string
		for _, l := range r.Listeners {
			if l.GetAddress().GetSocketAddress().GetProtocol() == core.SocketAddress_UDP || isUDPProxy(l) {
				out = append(out, l.GetName())
			}
		}
		return out
	}
	cat := catalog()
	for _, id := range []string{"web-1-sidecar-proxy", "api-1-sidecar-proxy", "store-1-sidecar-proxy"} {
		r, err := Proxy(cat, policies(t), cat.Proxies[id])
		if err != nil {
			t.Fatal(err)
		}
		if got := udpListeners(r); len(got) > 0 {
			t.Errorf("%s has UDP listeners %v; only udp services get them", id, got)
		}
	}
	ucat := udpCatalog()
	ucat.Services["dns"].Protocol = "" // declared by the policy file instead
	pol, err := policy.Parse(map[string][]byte{"p.yaml": []byte("apiVersion: meshlet.io/v1alpha1\nkind: ServiceDefaults\nmetadata: {name: dns}\nspec: {service: dns, protocol: UDP}\n")})
	if err != nil {
		t.Fatal(err)
	}
	for id, want := range map[string][]string{"dns-1-sidecar-proxy": {xds.PublicUDPListener}, "client-1-sidecar-proxy": {"upstream:dns"}} {
		r, err := Proxy(ucat, pol, ucat.Proxies[id])
		if err != nil {
			t.Fatal(err)
		}
		if got := udpListeners(r); !slices.Equal(got, want) {
			t.Errorf("%s: UDP listeners %v, want %v", id, got, want)
		}
		for _, l := range r.Listeners {
			var cfg udpproxy.UdpProxyConfig
			if isUDPProxy(l) {
				if err := l.GetListenerFilters()[0].GetTypedConfig().UnmarshalTo(&cfg); err != nil || cfg.GetIdleTimeout() != nil {
					t.Errorf("%s: %s: idle_timeout %v (%v); want it unset (Envoy's default) without a TimeoutPolicy", id, l.GetName(), cfg.GetIdleTimeout(), err)
				}
			}
		}
	}
}

func isUDPProxy(l *listener.Listener) bool {
	fs := l.GetListenerFilters()
	return len(fs) == 1 && fs[0].GetName() == xds.UDPProxyFilter
}
