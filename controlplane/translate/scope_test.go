package translate

import (
	"bytes"
	"reflect"
	"slices"
	"testing"

	"github.com/meshlet/meshlet/controlplane/model"
	"github.com/meshlet/meshlet/controlplane/policy"
)

// TestProxyReadsOnlyItsScope is the contract the control plane's
// incremental build rests on: a proxy's resources (and their sources) are
// the same from its scope of the catalog (model.Catalog.Scope) as from the
// whole catalog, so a proxy whose scope did not change needs no rebuild.
// Should translate read more of the catalog, Scope must grow with it.
func TestProxyReadsOnlyItsScope(t *testing.T) {
	sets := map[string]*policy.Set{
		"policies": policies(t),
		"none":     {},
		"tracing":  policies(t).WithDefaultCollector(&policy.Collector{Protocol: policy.CollectorHTTP, Endpoint: "http://127.0.0.1:4318/v1/traces"}),
	}
	cat := catalog()
	ids := make([]string, 0, len(cat.Proxies))
	for id := range cat.Proxies {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	for name, pol := range sets {
		for _, id := range ids {
			p := cat.Proxies[id]
			t.Run(name+"/"+id, func(t *testing.T) {
				full, err := Proxy(cat, pol, p)
				if err != nil {
					t.Fatal(err)
				}
				scoped, err := Proxy(cat.Scope(p), pol, p)
				if err != nil {
					t.Fatal(err)
				}
				if a, b := render(t, full), render(t, scoped); !bytes.Equal(a, b) {
					t.Errorf("resources from the scope differ from those of the catalog:\n%s\nvs\n%s", b, a)
				}
				fs, err := ProxySources(cat, pol, p)
				if err != nil {
					t.Fatal(err)
				}
				ss, err := ProxySources(cat.Scope(p), pol, p)
				if err != nil {
					t.Fatal(err)
				}
				if !reflect.DeepEqual(fs, ss) {
					t.Errorf("sources from the scope differ:\n%v\nvs\n%v", ss, fs)
				}
			})
		}
	}
}

// TestProxylessReadsOneServiceAtATime is the contract of the control
// plane's proxyless cache: Proxyless of a catalog is the union of
// Proxyless of each service alone.
func TestProxylessReadsOneServiceAtATime(t *testing.T) {
	cat, pol := catalog(), policies(t)
	var union Resources
	for name, s := range cat.Services {
		r := Proxyless(model.NewCatalog(map[string]*model.Service{name: s}, nil), pol)
		union.Listeners = append(union.Listeners, r.Listeners...)
		union.Routes = append(union.Routes, r.Routes...)
		union.Clusters = append(union.Clusters, r.Clusters...)
		union.Endpoints = append(union.Endpoints, r.Endpoints...)
		union.Secrets = append(union.Secrets, r.Secrets...)
	}
	sortResources(&union)
	if a, b := render(t, Proxyless(cat, pol)), render(t, union); !bytes.Equal(a, b) {
		t.Errorf("Proxyless service by service differs:\n%s\nvs\n%s", b, a)
	}
}
