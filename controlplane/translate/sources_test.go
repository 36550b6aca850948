package translate

import (
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"testing"

	"github.com/meshlet/meshlet/controlplane/policy"
	"github.com/meshlet/meshlet/internal/golden"
	"github.com/meshlet/meshlet/xds"
)

// shortType is the message name of a type URL: "Listener", "Cluster", ...
func shortType(typeURL string) string { return typeURL[strings.LastIndex(typeURL, ".")+1:] }

// renderSources writes m one resource per line, then its sources indented,
// in type and name order.
func renderSources(m SourceMap) []byte {
	var b strings.Builder
	for _, typ := range slices.Sorted(maps.Keys(m)) {
		for _, name := range slices.Sorted(maps.Keys(m[typ])) {
			fmt.Fprintf(&b, "%s %q\n", shortType(typ), name)
			for _, s := range m[typ][name] {
				fmt.Fprintf(&b, "    %s\n", s)
			}
		}
	}
	return []byte(b.String())
}

// names returns the resource names of r by type URL, as the snapshot holds
// them.
func names(r Resources) map[string][]string {
	out := map[string][]string{}
	add := func(typ string, n string) { out[typ] = append(out[typ], n) }
	for _, x := range r.Listeners {
		add(xds.ListenerType, x.GetName())
	}
	for _, x := range r.Routes {
		add(xds.RouteType, x.GetName())
	}
	for _, x := range r.Clusters {
		add(xds.ClusterType, x.GetName())
	}
	for _, x := range r.Endpoints {
		add(xds.EndpointType, x.GetClusterName())
	}
	for _, x := range r.Secrets {
		add(xds.SecretType, x.GetName())
	}
	return out
}

func keys(m SourceMap) map[string][]string {
	out := map[string][]string{}
	for typ, byName := range m {
		out[typ] = slices.Sorted(maps.Keys(byName))
	}
	return out
}

func tracingPolicies(t *testing.T) *policy.Set {
	return policies(t).WithDefaultCollector(&policy.Collector{Protocol: policy.CollectorHTTP, Endpoint: "http://127.0.0.1:4318/v1/traces"})
}

// TestProxySourcesGolden pins the inputs of every resource of the golden
// proxies, and checks that ProxySources explains exactly the resources
// Proxy builds, each with at least one input.
func TestProxySourcesGolden(t *testing.T) {
	cat := catalog()
	tests := []struct {
		name, proxy string
		pol         func(*testing.T) *policy.Set
	}{
		{name: "web-sidecar", proxy: "web-1-sidecar-proxy", pol: policies},
		{name: "api-sidecar", proxy: "api-1-sidecar-proxy", pol: policies},
		{name: "store-sidecar", proxy: "store-1-sidecar-proxy", pol: policies},
		{name: "web-sidecar-no-policies", proxy: "web-1-sidecar-proxy", pol: func(*testing.T) *policy.Set { return nil }},
		{name: "web-sidecar-tracing", proxy: "web-1-sidecar-proxy", pol: tracingPolicies},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			pol := tc.pol(t)
			p := cat.Proxies[tc.proxy]
			m, err := ProxySources(cat, pol, p)
			if err != nil {
				t.Fatal(err)
			}
			r, err := Proxy(cat, pol, p)
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
			for typ, byName := range m {
				for name, srcs := range byName {
					if len(srcs) == 0 {
						t.Errorf("%s %q has no source", shortType(typ), name)
					}
				}
			}
			golden.Check(t, "sources-"+tc.name+".golden.txt", renderSources(m))
		})
	}
}

func TestProxylessSourcesGolden(t *testing.T) {
	cat, pol := catalog(), policies(t)
	m := ProxylessSources(cat, pol)
	want := names(Proxyless(cat, pol))
	if got := keys(m); !maps.EqualFunc(got, want, slices.Equal) {
		t.Errorf("ProxylessSources explains %v, Proxyless builds %v", got, want)
	}
	for typ, byName := range m {
		for name, srcs := range byName {
			if len(srcs) == 0 {
				t.Errorf("%s %q has no source", shortType(typ), name)
			}
		}
	}
	golden.Check(t, "sources-proxyless.golden.txt", renderSources(m))
}

// TestSourcesOfResources checks, resource by resource, the rules of
// ProxySources that NACK provenance depends on.
func TestSourcesOfResources(t *testing.T) {
	cat, pol := catalog(), policies(t)
	const policies = "testdata/policies/"
	tests := []struct {
		name, proxy, typ, resource string
		want                       []string // each must be among the sources
		not                        []string // none may be
	}{
		{name: "route of an HTTP upstream: retry and timeout documents, the upstream, the protocol",
			proxy: "web-1-sidecar-proxy", typ: xds.RouteType, resource: "api",
			want: []string{policies + "resilience.yaml:2 (RetryPolicy api-retries)", policies + "resilience.yaml:13 (RetryPolicy api-orders-retries)",
				policies + "resilience.yaml:24 (TimeoutPolicy api-timeouts)", policies + "resilience.yaml:33 (TimeoutPolicy api-stream-timeouts)",
				policies + "services.yaml:1 (ServiceDefaults api)", `consul connect-proxy registration "web-1-sidecar-proxy" (upstream api)`},
			not: []string{"CircuitBreakerPolicy", "OutlierDetectionPolicy"}},
		{name: "cluster of an upstream: service-wide documents, identity",
			proxy: "web-1-sidecar-proxy", typ: xds.ClusterType, resource: "api",
			want: []string{policies + "resilience.yaml:2 (RetryPolicy api-retries)", policies + "resilience.yaml:24 (TimeoutPolicy api-timeouts)",
				"CircuitBreakerPolicy api-breaker", "OutlierDetectionPolicy api-outliers", `consul leaf certificate for "api" (SPIFFE ID)`},
			not: []string{"api-orders-retries", "api-stream-timeouts"}},
		{name: "ring hash shapes the route too", proxy: "web-1-sidecar-proxy", typ: xds.RouteType, resource: "sessions",
			want: []string{"LoadBalancerPolicy sessions-lb", "ServiceDefaults sessions"}},
		{name: "TCP upstream listener takes the service-wide retry policy", proxy: "web-1-sidecar-proxy", typ: xds.ListenerType, resource: "upstream:store",
			want: []string{"RetryPolicy store", `consul service "store" (meta protocol)`}},
		{name: "endpoints come from the catalog", proxy: "web-1-sidecar-proxy", typ: xds.EndpointType, resource: "api",
			want: []string{`consul service "api" (sidecars: catalog/health)`}},
		{name: "inbound: authorization documents, intentions, mesh defaults", proxy: "api-1-sidecar-proxy", typ: xds.ListenerType, resource: xds.PublicListener,
			want: []string{"AuthorizationPolicy api-access", `consul service-intentions "api"`, "ServiceDefaults api",
				`consul connect-proxy registration "api-1-sidecar-proxy" (public listener)`, "consul Connect CA roots (trust domain)"}},
		{name: "permissive mode from ServiceDefaults", proxy: "store-1-sidecar-proxy", typ: xds.ListenerType, resource: xds.PublicListener,
			want: []string{"ServiceDefaults store"}},
		{name: "leaf secret", proxy: "web-1-sidecar-proxy", typ: xds.SecretType, resource: xds.SecretCert,
			want: []string{`consul leaf certificate for "web"`}},
		{name: "roots secret", proxy: "web-1-sidecar-proxy", typ: xds.SecretType, resource: xds.SecretRoots,
			want: []string{"consul Connect CA roots"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			m, err := ProxySources(cat, pol, cat.Proxies[tc.proxy])
			if err != nil {
				t.Fatal(err)
			}
			var got []string
			for _, s := range m.For(tc.typ, tc.resource) {
				got = append(got, s.String())
			}
			all := strings.Join(got, "\n")
			for _, w := range tc.want {
				if !strings.Contains(all, w) {
					t.Errorf("sources of %s %q lack %q:\n%s", shortType(tc.typ), tc.resource, w, all)
				}
			}
			for _, n := range tc.not {
				if strings.Contains(all, n) {
					t.Errorf("sources of %s %q include %q:\n%s", shortType(tc.typ), tc.resource, n, all)
				}
			}
		})
	}
}

func TestMeshDefaultsSources(t *testing.T) {
	cat := catalog()
	pol, err := policy.Parse(map[string][]byte{"mesh.yaml": []byte(
		"apiVersion: meshlet.io/v1alpha1\nkind: MeshDefaults\nmetadata: {name: mesh}\nspec:\n  mtls: {minTLSVersion: \"1.2\"}\n")})
	if err != nil {
		t.Fatal(err)
	}
	m, err := ProxySources(cat, pol, cat.Proxies["web-1-sidecar-proxy"])
	if err != nil {
		t.Fatal(err)
	}
	const mesh = "mesh.yaml:1 (MeshDefaults mesh)"
	for _, r := range []struct{ typ, name string }{{xds.ListenerType, xds.PublicListener}, {xds.ClusterType, "api"}, {xds.ClusterType, "store"}} {
		if !slices.ContainsFunc(m.For(r.typ, r.name), func(s Source) bool { return s.String() == mesh }) {
			t.Errorf("%s %q: sources %v lack %s (minimum TLS version)", shortType(r.typ), r.name, m.For(r.typ, r.name), mesh)
		}
	}
	if srcs := m.For(xds.RouteType, "api"); slices.ContainsFunc(srcs, func(s Source) bool { return s.Kind == policy.KindMeshDefaults }) {
		t.Errorf("route \"api\" sources %v include MeshDefaults, which does not shape routes without tracing", srcs)
	}
}

func TestSourcesNotReady(t *testing.T) {
	cat := catalog()
	delete(cat.Leaves, "web")
	if _, err := ProxySources(cat, nil, cat.Proxies["web-1-sidecar-proxy"]); !errors.Is(err, ErrNotReady) {
		t.Errorf("ProxySources without web's leaf: %v, want ErrNotReady", err)
	}
}

func TestSourceMapFor(t *testing.T) {
	a := Source{Origin: OriginPolicy, Kind: policy.KindRetryPolicy, Name: "r", File: "p.yaml", Line: 3}
	b := Source{Origin: OriginConsul, Kind: ConsulService, Name: "api", Detail: "catalog/health"}
	m := SourceMap{xds.ClusterType: {"x": {a, b}, "y": {b}}}
	got := m.For(xds.ClusterType, "y", "x", "missing")
	if want := []Source{a, b}; !slices.Equal(got, want) {
		t.Errorf("For = %v, want %v (merged, policy first, no duplicates)", got, want)
	}
	if got := m.For(xds.RouteType, "x"); got != nil {
		t.Errorf("For of an absent type = %v, want nil", got)
	}
}

func TestSourceString(t *testing.T) {
	tests := []struct {
		name string
		src  Source
		want string
	}{
		{"policy document", Source{Origin: OriginPolicy, Kind: "RetryPolicy", Name: "api-retries", File: "policies/r.yaml", Line: 7}, "policies/r.yaml:7 (RetryPolicy api-retries)"},
		{"service", Source{Origin: OriginConsul, Kind: ConsulService, Name: "api", Detail: "catalog/health"}, `consul service "api" (catalog/health)`},
		{"registration", Source{Origin: OriginConsul, Kind: ConsulConnectProxy, Name: "web-sidecar-proxy", Detail: "upstream api"}, `consul connect-proxy registration "web-sidecar-proxy" (upstream api)`},
		{"intentions", Source{Origin: OriginConsul, Kind: ConsulIntentions, Name: "api"}, `consul service-intentions "api"`},
		{"roots", Source{Origin: OriginConsul, Kind: ConsulCARoots}, "consul Connect CA roots"},
		{"leaf", Source{Origin: OriginConsul, Kind: ConsulLeaf, Name: "web"}, `consul leaf certificate for "web"`},
		{"flag", Source{Origin: OriginFlag, Kind: "flag", Name: "-otlp-endpoint"}, "flag -otlp-endpoint"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := tc.src.String(); got != tc.want {
				t.Errorf("String() = %q, want %q", got, tc.want)
			}
		})
	}
}
