package consul

import (
	"fmt"
	"maps"
	"math/rand/v2"
	"reflect"
	"slices"
	"testing"

	"github.com/hashicorp/consul/api"

	"github.com/meshlet/meshlet/controlplane/model"
)

// randomEntries returns the health entries of service name: a few typical
// instances on nodes n0..n2 with random health, and under name+"-proxy"
// the sidecars of some of them (returned separately).
func randomEntries(rng *rand.Rand, name string) (instances, proxies []*api.ServiceEntry) {
	status := func() string {
		return []string{api.HealthPassing, api.HealthPassing, api.HealthCritical, api.HealthWarning}[rng.IntN(4)]
	}
	for i := range rng.IntN(4) {
		node := fmt.Sprintf("n%d", rng.IntN(3))
		id := fmt.Sprintf("%s-%d", name, i)
		meta := map[string]string{}
		if rng.IntN(3) == 0 {
			meta["protocol"] = "http"
		}
		instances = append(instances, entry(node, "10.0.0.1", &api.AgentService{ID: id, Service: name, Port: 9000 + i, Meta: meta}, status()))
		if rng.IntN(2) == 0 {
			proxies = append(proxies, entry(node, "10.0.0.1", &api.AgentService{
				Kind: api.ServiceKindConnectProxy, ID: id + "-sidecar-proxy", Service: name + "-proxy", Port: 21000 + i,
				Proxy: &api.AgentServiceConnectProxyConfig{DestinationServiceName: name, DestinationServiceID: id, LocalServicePort: 9000 + i,
					Upstreams: []api.Upstream{{DestinationName: fmt.Sprintf("s%d", rng.IntN(5)), LocalBindPort: 9191}}},
			}, status()))
		}
	}
	return instances, proxies
}

// sameContent reports what differs between two catalogs' services and
// proxies ("" when nothing).
func sameContent(a, b *model.Catalog) string {
	if !reflect.DeepEqual(a.Services, b.Services) {
		return fmt.Sprintf("services differ:\n%+v\n%+v", a.Services, b.Services)
	}
	if !reflect.DeepEqual(a.Proxies, b.Proxies) {
		return fmt.Sprintf("proxies differ:\n%+v\n%+v", a.Proxies, b.Proxies)
	}
	for _, s := range slices.Sorted(maps.Keys(a.Services)) {
		if !reflect.DeepEqual(a.ProxiesFor(s), b.ProxiesFor(s)) {
			return "ProxiesFor(" + s + ") differs"
		}
	}
	return ""
}

// TestCatalogBuilderMatchesBuildCatalog: converting only the services that
// changed gives the catalog BuildCatalog gives from every entry.
func TestCatalogBuilderMatchesBuildCatalog(t *testing.T) {
	rng := rand.New(rand.NewPCG(7, 8))
	b := newCatalogBuilder()
	entries := map[string][]*api.ServiceEntry{}
	for step := range 500 {
		name := fmt.Sprintf("s%d", rng.IntN(5))
		if rng.IntN(6) == 0 {
			delete(entries, name)
			delete(entries, name+"-proxy")
			b.remove(name)
			b.remove(name + "-proxy")
		} else {
			in, px := randomEntries(rng, name)
			entries[name] = in
			b.update(name, in)
			if rng.IntN(2) == 0 { // the sidecars' own query answers separately
				entries[name+"-proxy"] = px
				b.update(name+"-proxy", px)
			}
		}
		if diff := sameContent(b.build(), BuildCatalog(entries)); diff != "" {
			t.Fatalf("step %d: %s", step, diff)
		}
	}
}

// TestCatalogBuilderKeepsUnchangedValues: what did not change keeps its
// value, so the build loop rebuilds only the sidecars a change concerns.
func TestCatalogBuilderKeepsUnchangedValues(t *testing.T) {
	sidecar := func(id, dest, destID string, port int, ups ...string) *api.AgentService {
		s := &api.AgentService{Kind: api.ServiceKindConnectProxy, ID: id, Service: dest + "-sidecar-proxy", Port: port,
			Proxy: &api.AgentServiceConnectProxyConfig{DestinationServiceName: dest, DestinationServiceID: destID, LocalServicePort: port - 1000}}
		for _, u := range ups {
			s.Proxy.Upstreams = append(s.Proxy.Upstreams, api.Upstream{DestinationName: u, LocalBindPort: 9191})
		}
		return s
	}
	api1 := func(status string) []*api.ServiceEntry {
		return []*api.ServiceEntry{entry("n1", "10.0.0.1", &api.AgentService{ID: "api-1", Service: "api", Port: 9001}, status)}
	}
	b := newCatalogBuilder()
	b.update("api", api1(api.HealthPassing))
	b.update("api-sidecar-proxy", []*api.ServiceEntry{entry("n1", "10.0.0.1", sidecar("api-1-sidecar-proxy", "api", "api-1", 21001), api.HealthPassing)})
	b.update("web", []*api.ServiceEntry{entry("n2", "10.0.0.2", &api.AgentService{ID: "web-1", Service: "web", Port: 9000}, api.HealthPassing)})
	b.update("web-sidecar-proxy", []*api.ServiceEntry{entry("n2", "10.0.0.2", sidecar("web-1-sidecar-proxy", "web", "web-1", 21000, "api"), api.HealthPassing)})
	c1 := b.build()

	// The same answer again: every value is kept.
	b.update("api", api1(api.HealthPassing))
	c2 := b.build()
	if !c2.Same(c1) {
		t.Fatal("an unchanged answer made new values")
	}

	// api-1 fails: the api service and its sidecar change (it is no longer
	// an endpoint), web and its sidecar keep their values.
	b.update("api", api1(api.HealthCritical))
	c3 := b.build()
	if c3.Services["api"] == c2.Services["api"] || c3.Proxies["api-1-sidecar-proxy"] == c2.Proxies["api-1-sidecar-proxy"] {
		t.Error("api or its sidecar kept its value although api-1 failed")
	}
	if c3.Proxies["api-1-sidecar-proxy"].Healthy {
		t.Error("api-1's sidecar is healthy although api-1 fails")
	}
	if c3.Services["web"] != c2.Services["web"] || c3.Proxies["web-1-sidecar-proxy"] != c2.Proxies["web-1-sidecar-proxy"] {
		t.Error("web or its sidecar got a new value though nothing of theirs changed")
	}
	web := c3.Proxies["web-1-sidecar-proxy"]
	if c3.Scope(web).Same(c2.Scope(web)) {
		t.Error("web's scope is Same although its upstream's sidecar changed")
	}
	api := c3.Proxies["api-1-sidecar-proxy"]
	if !c3.Scope(api).IsScopeOf(c3, api) || c2.Scope(c2.Proxies["api-1-sidecar-proxy"]).IsScopeOf(c3, api) {
		t.Error("IsScopeOf does not follow api's sidecar")
	}
}

// TestNodeOutageKeepsEndpoints: when every sidecar of a service turns
// critical only because of its node's check (serfHealth: Consul lost
// touch with the agent), the sidecars healthy before stay endpoints;
// a failing service check, a passing sidecar or a deregistration ends it.
func TestNodeOutageKeepsEndpoints(t *testing.T) {
	sidecar := func(id, destID string) *api.AgentService {
		return &api.AgentService{Kind: api.ServiceKindConnectProxy, ID: id, Service: "api-sidecar-proxy", Port: 21000,
			Proxy: &api.AgentServiceConnectProxyConfig{DestinationServiceName: "api", DestinationServiceID: destID, LocalServicePort: 8080}}
	}
	// entries are api-1 and api-2 (and their sidecars) on node n1, whose
	// serfHealth is node, and whose service checks are svc.
	entries := func(node, svc string) (apps, proxies []*api.ServiceEntry) {
		for _, id := range []string{"api-1", "api-2"} {
			for _, s := range []*api.AgentService{{ID: id, Service: "api", Port: 8080}, sidecar(id+"-sidecar-proxy", id)} {
				e := entry("n1", "10.0.0.1", s, svc)
				e.Checks = append(e.Checks, &api.HealthCheck{CheckID: "serfHealth", Status: node})
				if s.Kind == api.ServiceKindConnectProxy {
					proxies = append(proxies, e)
				} else {
					apps = append(apps, e)
				}
			}
		}
		return apps, proxies
	}
	b := newCatalogBuilder()
	healthyEndpoints := func(node, svc string) []string {
		apps, proxies := entries(node, svc)
		b.update("api", apps)
		b.update("api-sidecar-proxy", proxies)
		var out []string
		for _, p := range b.build().ProxiesFor("api") {
			if p.Healthy {
				out = append(out, p.ID)
			}
		}
		slices.Sort(out)
		return out
	}
	both := []string{"api-1-sidecar-proxy", "api-2-sidecar-proxy"}
	if got := healthyEndpoints(api.HealthPassing, api.HealthPassing); !slices.Equal(got, both) {
		t.Fatalf("healthy: %v", got)
	}
	if got := healthyEndpoints(api.HealthCritical, api.HealthPassing); !slices.Equal(got, both) {
		t.Errorf("serfHealth critical, service checks passing: endpoints %v, want both kept", got)
	}
	if held := b.heldServices()["api"]; !slices.Equal(held, both) {
		t.Errorf("held = %v", held)
	}
	if got := healthyEndpoints(api.HealthCritical, api.HealthCritical); len(got) != 0 {
		t.Errorf("service checks failing too: endpoints %v, want none", got)
	}
	if got := healthyEndpoints(api.HealthPassing, api.HealthPassing); !slices.Equal(got, both) {
		t.Fatalf("healthy again: %v", got)
	}
	b.remove("api")
	b.remove("api-sidecar-proxy")
	if got := b.build().ProxiesFor("api"); len(got) != 0 || len(b.heldServices()) != 0 {
		t.Errorf("deregistered: %v, held %v", got, b.heldServices())
	}
}

// TestNodeOutageHoldsDespiteANewCriticalSidecar: a sidecar registered
// during the outage, critical through its own check (starting), does not
// stop the others from being held (the fault suite's flake: api-4
// registered just after the thaw emptied api for a request).
func TestNodeOutageHoldsDespiteANewCriticalSidecar(t *testing.T) {
	proxy := func(id, node, svc string) *api.ServiceEntry {
		e := entry("n1", "10.0.0.1", &api.AgentService{Kind: api.ServiceKindConnectProxy, ID: id, Service: "api-sidecar-proxy", Port: 21000,
			Proxy: &api.AgentServiceConnectProxyConfig{DestinationServiceName: "api", LocalServicePort: 8080}}, svc)
		e.Checks = append(e.Checks, &api.HealthCheck{CheckID: "serfHealth", Status: node})
		return e
	}
	b := newCatalogBuilder()
	b.update("api-sidecar-proxy", []*api.ServiceEntry{proxy("api-1-sidecar-proxy", api.HealthPassing, api.HealthPassing)})
	b.build()
	b.update("api-sidecar-proxy", []*api.ServiceEntry{proxy("api-1-sidecar-proxy", api.HealthCritical, api.HealthPassing),
		proxy("api-4-sidecar-proxy", api.HealthCritical, api.HealthCritical)})
	var healthy []string
	for _, p := range b.build().ProxiesFor("api") {
		if p.Healthy {
			healthy = append(healthy, p.ID)
		}
	}
	if !slices.Equal(healthy, []string{"api-1-sidecar-proxy"}) {
		t.Errorf("healthy %v, want api-1's sidecar held (api-4's fails its own check)", healthy)
	}
}

// TestRecoveringHoldsWhateverFails: right after Consul answered again
// (recovering), sidecars healthy before are held even when their own
// checks fail (a restarted agent restores TTL checks as critical); once
// the grace is over they leave.
func TestRecoveringHoldsWhateverFails(t *testing.T) {
	proxy := func(status string) []*api.ServiceEntry {
		return []*api.ServiceEntry{entry("n1", "10.0.0.1", &api.AgentService{Kind: api.ServiceKindConnectProxy, ID: "api-1-sidecar-proxy",
			Service: "api-sidecar-proxy", Port: 21000, Proxy: &api.AgentServiceConnectProxyConfig{DestinationServiceName: "api", LocalServicePort: 8080}}, status)}
	}
	b := newCatalogBuilder()
	b.update("api-sidecar-proxy", proxy(api.HealthPassing))
	b.build()
	b.recovering = true
	b.update("api-sidecar-proxy", proxy(api.HealthCritical))
	if p := b.build().Proxies["api-1-sidecar-proxy"]; !p.Healthy || !b.heldInGrace {
		t.Errorf("recovering: healthy %v, held in grace %v; want it held", p.Healthy, b.heldInGrace)
	}
	b.recovering = false
	if p := b.build().Proxies["api-1-sidecar-proxy"]; p.Healthy || b.heldInGrace {
		t.Errorf("after the grace: healthy %v; want it critical", p.Healthy)
	}
}
