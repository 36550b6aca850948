package translate

import (
	"fmt"
	"maps"
	"slices"
	"strings"
	"testing"

	cluster "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"

	"github.com/meshlet/meshlet/controlplane/model"
	"github.com/meshlet/meshlet/controlplane/policy"
	"github.com/meshlet/meshlet/internal/fixtures"
	"github.com/meshlet/meshlet/internal/golden"
	"github.com/meshlet/meshlet/xds"
)

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
			cat := fixtures.TransparentCatalog()
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
	cat := fixtures.TransparentCatalog()
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

// TestHeadlessChainsFollowInstances: the direct chain of a headless
// service (fixtures.TransparentCatalog's db) lists its ready instances
// fronted by transparent proxies; an instance becoming ready, one going
// away, and the last one going change web's scope (so the server rebuilds
// its listener) and the chain, and without instances there is neither
// chain nor cluster.
func TestHeadlessChainsFollowInstances(t *testing.T) {
	cat := fixtures.TransparentCatalog()
	p := cat.Proxies["web-1-web-sidecar-proxy"]
	// next returns a copy of c sharing every value, as the Consul watcher
	// builds the next catalog, with db's instances and proxies set by keep
	// and ready (by pod).
	next := func(c *model.Catalog, keep func(pod string) bool, ready func(pod string) bool) *model.Catalog {
		services, proxies := maps.Clone(c.Services), maps.Clone(c.Proxies)
		db := &model.Service{Name: "db", Protocol: c.Services["db"].Protocol}
		for _, in := range c.Services["db"].Instances {
			pod, _, _ := strings.Cut(in.ID, "-db")
			if keep(pod) {
				in.Healthy = ready(pod)
				db.Instances = append(db.Instances, in)
			}
		}
		services["db"] = db
		for id, q := range c.Proxies {
			if q.Service != "db" {
				continue
			}
			pod, _, _ := strings.Cut(q.ID, "-db")
			delete(proxies, id)
			if keep(pod) {
				q := *q
				q.Healthy = ready(pod)
				proxies[id] = &q
			}
		}
		out := model.NewCatalog(services, proxies)
		out.CA, out.Leaves, out.Intentions = c.CA, c.Leaves, c.Intentions
		return out
	}
	all := func(string) bool { return true }
	chainOf := func(c *model.Catalog) ([]string, bool) {
		t.Helper()
		r, err := Proxy(c.Scope(p), nil, p)
		if err != nil {
			t.Fatal(err)
		}
		var got []string
		for _, l := range r.Listeners {
			if l.GetName() != xds.OutboundCaptureListener {
				continue
			}
			for _, fc := range l.GetFilterChains() {
				if fc.GetName() != xds.DirectChain("db") {
					continue
				}
				for _, pr := range fc.GetFilterChainMatch().GetPrefixRanges() {
					got = append(got, fmt.Sprintf("%s/%d:%d", pr.GetAddressPrefix(), pr.GetPrefixLen().GetValue(), fc.GetFilterChainMatch().GetDestinationPort().GetValue()))
				}
			}
		}
		return got, slices.ContainsFunc(r.Clusters, func(c *cluster.Cluster) bool { return c.GetName() == xds.DirectCluster("db") })
	}
	steps := []struct {
		name        string
		keep, ready func(pod string) bool
		want        []string
	}{
		{"db-2 not ready", all, func(pod string) bool { return pod != "db-2" }, []string{"10.244.0.12/32:7000", "10.244.0.13/32:7000"}},
		{"db-2 ready", all, all, []string{"10.244.0.12/32:7000", "10.244.0.13/32:7000", "10.244.0.14/32:7000"}},
		{"db-1 gone", func(pod string) bool { return pod != "db-1" }, all, []string{"10.244.0.12/32:7000", "10.244.0.14/32:7000"}},
		{"all gone", func(string) bool { return false }, all, nil},
	}
	prev := cat
	for _, st := range steps {
		cur := next(prev, st.keep, st.ready)
		if prev.Scope(p).IsScopeOf(cur, p) {
			t.Errorf("%s: web's scope did not change: its listener would not be rebuilt", st.name)
		}
		got, hasCluster := chainOf(cur)
		if !slices.Equal(got, st.want) {
			t.Errorf("%s: chain %s matches %v, want %v", st.name, xds.DirectChain("db"), got, st.want)
		}
		if hasCluster != (len(st.want) > 0) {
			t.Errorf("%s: cluster %s present = %v with %d instances", st.name, xds.DirectCluster("db"), hasCluster, len(st.want))
		}
		prev = cur
	}
	// ledger is headless too, but no intention lets web in: no chain.
	if got, has := chainOf(cat); len(got) == 0 || !has {
		t.Fatal("db lost its chain in the original catalog")
	}
	r, err := Proxy(cat, nil, p)
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range r.Clusters {
		if c.GetName() == xds.DirectCluster("ledger") {
			t.Error("web may not reach ledger but has its direct cluster")
		}
	}
}
