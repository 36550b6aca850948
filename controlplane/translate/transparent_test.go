package translate

import (
	"testing"

	"github.com/hashicorp/consul/api"

	"github.com/meshlet/meshlet/controlplane/consul"
	"github.com/meshlet/meshlet/controlplane/model"
	"github.com/meshlet/meshlet/controlplane/policy"
	"github.com/meshlet/meshlet/internal/golden"
	"github.com/meshlet/meshlet/xds"
)

// transparentCatalog is a Kubernetes namespace registered the way the
// registrar does it (instances carry their Service's ClusterIP as the
// virtual tagged address, proxies are transparent), converted by the Consul
// watcher's own code: web (transparent, with one explicit upstream) may
// reach api (HTTP) by intention and redis (TCP) by a wildcard intention;
// admin has a virtual address but no intention lets web in; store is web's
// explicit upstream and has a virtual address too; batch has none.
func transparentCatalog() *model.Catalog {
	entry := func(svc *api.AgentService) *api.ServiceEntry {
		return &api.ServiceEntry{Node: &api.Node{Node: "node1-virtual", Address: "127.0.0.1", Datacenter: "dc1"}, Service: svc,
			Checks: api.HealthChecks{{Status: api.HealthPassing}}}
	}
	instance := func(name, pod, ip string, port int, virtual string, vport int, protocol string) *api.ServiceEntry {
		s := &api.AgentService{ID: pod + "-" + name, Service: name, Address: ip, Port: port, Meta: map[string]string{}}
		if protocol != "" {
			s.Meta["protocol"] = protocol
		}
		if virtual != "" {
			s.TaggedAddresses = map[string]api.ServiceAddress{consul.VirtualTaggedAddress: {Address: virtual, Port: vport}}
		}
		return entry(s)
	}
	proxy := func(name, pod, ip string, appPort int, ups ...api.Upstream) *api.ServiceEntry {
		return entry(&api.AgentService{Kind: api.ServiceKindConnectProxy, ID: pod + "-" + name + "-sidecar-proxy", Service: name + "-sidecar-proxy",
			Address: ip, Port: xds.PodPublicPort, Proxy: &api.AgentServiceConnectProxyConfig{
				DestinationServiceName: name, DestinationServiceID: pod + "-" + name, LocalServicePort: appPort, Upstreams: ups,
				Mode: api.ProxyModeTransparent, TransparentProxy: &api.TransparentProxyConfig{OutboundListenerPort: xds.OutboundCapturePort},
			}})
	}
	cat := consul.BuildCatalog(map[string][]*api.ServiceEntry{
		"web":                 {instance("web", "web-1", "10.244.0.5", 8080, "10.96.0.10", 80, "http")},
		"web-sidecar-proxy":   {proxy("web", "web-1", "10.244.0.5", 8080, api.Upstream{DestinationName: "store", LocalBindPort: 9192})},
		"api":                 {instance("api", "api-1", "10.244.0.6", 8080, "10.96.0.20", 80, "http"), instance("api", "api-2", "10.244.0.7", 8080, "10.96.0.20", 80, "http")},
		"api-sidecar-proxy":   {proxy("api", "api-1", "10.244.0.6", 8080), proxy("api", "api-2", "10.244.0.7", 8080)},
		"redis":               {instance("redis", "redis-0", "10.244.0.8", 6379, "10.96.0.30", 6379, "")},
		"redis-sidecar-proxy": {proxy("redis", "redis-0", "10.244.0.8", 6379)},
		"admin":               {instance("admin", "admin-1", "10.244.0.9", 8080, "10.96.0.40", 80, "http")},
		"admin-sidecar-proxy": {proxy("admin", "admin-1", "10.244.0.9", 8080)},
		"store":               {instance("store", "store-1", "10.244.0.10", 9100, "10.96.0.50", 9100, "")},
		"store-sidecar-proxy": {proxy("store", "store-1", "10.244.0.10", 9100)},
		"batch":               {instance("batch", "batch-1", "10.244.0.11", 0, "", 0, "")},
	})
	cat.CA = &model.CA{TrustDomain: "11111111-2222-3333-4444-555555555555.consul", Roots: []model.Root{{ID: "r1", CertPEM: "ROOT", Active: true}}}
	for _, svc := range []string{"web", "api", "redis", "admin", "store"} {
		cat.Leaves[svc] = &model.Leaf{Service: svc, CertPEM: "LEAF-" + svc, KeyPEM: "KEY-" + svc, SPIFFEID: SPIFFEID(cat.CA.TrustDomain, "dc1", svc)}
	}
	cat.Intentions["api"] = &model.Intentions{Destination: "api", Sources: []model.IntentionSource{{Name: "web", Action: "allow", Origin: "consul intention web => api"}}}
	cat.Intentions["redis"] = &model.Intentions{Destination: "redis", Sources: []model.IntentionSource{{Name: "*", Action: "allow", Origin: "consul intention * => redis"}}}
	cat.Intentions["admin"] = &model.Intentions{Destination: "admin", Sources: []model.IntentionSource{{Name: "ops", Action: "allow", Origin: "consul intention ops => admin"}}}
	return cat
}

// TestTransparentGolden: a transparent proxy's capture listeners, chains
// and clusters, built from its scope (as the server builds it), with the
// pass-through default (allow-any) and with registry-only.
func TestTransparentGolden(t *testing.T) {
	for _, tc := range []struct {
		name string
		pol  string
	}{
		{"transparent-web-sidecar", ""},
		{"transparent-web-sidecar-registry-only", "apiVersion: meshlet.io/v1alpha1\nkind: MeshDefaults\nmetadata: {name: mesh}\nspec: {outbound: registry-only}\n"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var pol *policy.Set
			if tc.pol != "" {
				var err error
				if pol, err = policy.Parse(map[string][]byte{"mesh.yaml": []byte(tc.pol)}); err != nil {
					t.Fatal(err)
				}
			}
			cat := transparentCatalog()
			p := cat.Proxies["web-1-web-sidecar-proxy"]
			if p == nil || !p.Transparent() {
				t.Fatalf("web's proxy %+v is not transparent", p)
			}
			r, err := Proxy(cat.Scope(p), pol, p)
			if err != nil {
				t.Fatal(err)
			}
			full, err := Proxy(cat, pol, p)
			if err != nil {
				t.Fatal(err)
			}
			if got, want := render(t, r), render(t, full); string(got) != string(want) {
				t.Error("built from its scope, the proxy's resources differ from those built from the whole catalog")
			}
			golden.Check(t, tc.name+".golden.json", render(t, r))
		})
	}
}

func TestReachable(t *testing.T) {
	cat := transparentCatalog()
	deny := "apiVersion: meshlet.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: redis}\nspec:\n  service: redis\n  sources: [{name: web, action: deny}]\n"
	pol, err := policy.Parse(map[string][]byte{"authz.yaml": []byte(deny)})
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		pol       *policy.Set
		src, dest string
		want      bool
	}{
		{nil, "web", "api", true},    // intention web => api
		{nil, "web", "redis", true},  // intention * => redis
		{nil, "web", "admin", false}, // only ops
		{nil, "web", "store", false}, // no intention: default deny
		{pol, "web", "redis", false}, // a policy file denies web by name, before *
		{pol, "api", "redis", true},
	} {
		if got := Reachable(cat, tc.pol, tc.src, tc.dest); got != tc.want {
			t.Errorf("Reachable(%s → %s) = %v, want %v", tc.src, tc.dest, got, tc.want)
		}
	}
}
