package translate

import (
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	"github.com/meshlet/meshlet/controlplane/model"
	"github.com/meshlet/meshlet/controlplane/policy"
	"github.com/meshlet/meshlet/internal/fixtures"
	"github.com/meshlet/meshlet/internal/golden"
	"github.com/meshlet/meshlet/xds"
)

// looFixture is a mesh to leave inputs out of: a catalog, the policy files
// (name → content) and the -otlp-endpoint collector, if any.
type looFixture struct {
	name      string
	cat       func() *model.Catalog
	files     map[string][]byte
	collector *policy.Collector
}

func (f looFixture) policies(t *testing.T, files map[string][]byte) *policy.Set {
	t.Helper()
	set, err := policy.Parse(files)
	if err != nil {
		t.Fatal(err)
	}
	return set.WithDefaultCollector(f.collector)
}

// looBuild is one translation of a fixture: every resource serialized by
// its key, with the sources ProxySources (or ProxylessSources) noted.
type looBuild struct {
	resources map[resourceKey]string
	sources   SourceMap
}

// looTarget is what the test translates: a proxy's resources, or the
// proxyless group's.
type looTarget struct {
	name  string
	build func(cat *model.Catalog, pol *policy.Set) (Resources, SourceMap, error)
}

func proxyTarget(id string) looTarget {
	return looTarget{name: id, build: func(cat *model.Catalog, pol *policy.Set) (Resources, SourceMap, error) {
		p := cat.Proxies[id]
		r, err := Proxy(cat, pol, p)
		if err != nil {
			return r, nil, err
		}
		m, err := ProxySources(cat, pol, p)
		return r, m, err
	}}
}

var proxylessTarget = looTarget{name: "proxyless", build: func(cat *model.Catalog, pol *policy.Set) (Resources, SourceMap, error) {
	return Proxyless(cat, pol), ProxylessSources(cat, pol), nil
}}

func looTranslate(t *testing.T, tg looTarget, cat *model.Catalog, pol *policy.Set) looBuild {
	t.Helper()
	r, m, err := tg.build(cat, pol)
	if err != nil {
		t.Fatal(err)
	}
	out := map[resourceKey]string{}
	put := func(k resourceKey, msg proto.Message) {
		// protojson, not the wire format: an Any holds its message's
		// bytes, whose map entries come in any order.
		b, err := protojson.Marshal(msg)
		if err != nil {
			t.Fatal(err)
		}
		out[k] = string(b)
	}
	for _, x := range r.Listeners {
		put(listenerKey(x.GetName()), x)
	}
	for _, x := range r.Routes {
		put(routeKey(x.GetName()), x)
	}
	for _, x := range r.Clusters {
		put(clusterKey(x.GetName()), x)
	}
	for _, x := range r.Endpoints {
		put(endpointKey(x.GetClusterName()), x)
	}
	for _, x := range r.Secrets {
		put(secretKey(x.GetName()), x)
	}
	return looBuild{resources: out, sources: m}
}

// changedKeys returns the resources of full that differ in (or are
// missing from) without, and those only without has.
func changedKeys(full, without looBuild) (changed, added []string) {
	for k, v := range full.resources {
		if w, ok := without.resources[k]; !ok || w != v {
			changed = append(changed, k.String())
		}
	}
	for k := range without.resources {
		if _, ok := full.resources[k]; !ok {
			added = append(added, k.String())
		}
	}
	slices.Sort(changed)
	slices.Sort(added)
	return changed, added
}

// noting returns the resources whose sources include one that match
// accepts.
func noting(b looBuild, match func(Source) bool) []string {
	var out []string
	for typ, byName := range b.sources {
		for name, srcs := range byName {
			if slices.ContainsFunc(srcs, match) {
				out = append(out, resourceKey{typ, name}.String())
			}
		}
	}
	slices.Sort(out)
	return out
}

func (k resourceKey) String() string { return shortType(k.typeURL) + " " + k.name }

// documents lists the policy documents of set.
func documents(set *policy.Set) []Source {
	var out []Source
	for _, d := range set.ServiceDefaults {
		out = append(out, docSource(policy.KindServiceDefaults, d.Name, d.Source))
	}
	for _, l := range set.Retries {
		for _, d := range l {
			out = append(out, retrySource(d))
		}
	}
	for _, l := range set.Timeouts {
		for _, d := range l {
			out = append(out, timeoutSource(d))
		}
	}
	for _, d := range set.CircuitBreakers {
		out = append(out, docSource(policy.KindCircuitBreakerPolicy, d.Name, d.Source))
	}
	for _, d := range set.OutlierDetections {
		out = append(out, docSource(policy.KindOutlierDetectionPolicy, d.Name, d.Source))
	}
	for _, d := range set.LoadBalancers {
		out = append(out, docSource(policy.KindLoadBalancerPolicy, d.Name, d.Source))
	}
	for _, d := range set.Authorizations {
		out = append(out, docSource(policy.KindAuthorizationPolicy, d.Name, d.Source))
	}
	out = append(out, meshSource(set)...)
	slices.SortFunc(out, compareSources)
	return out
}

// withoutDocument returns files with the document doc turned into comment
// lines, from its first key to the next "---": the other documents keep
// their lines, so what names them (RBAC policy names) stays the same.
func withoutDocument(t *testing.T, files map[string][]byte, doc Source) map[string][]byte {
	t.Helper()
	lines := strings.Split(string(files[doc.File]), "\n")
	if doc.Line < 1 || doc.Line > len(lines) {
		t.Fatalf("%s: no line %d", doc.File, doc.Line)
	}
	for i := doc.Line - 1; i < len(lines) && strings.TrimSpace(lines[i]) != "---"; i++ {
		lines[i] = "#"
	}
	out := maps.Clone(files)
	out[doc.File] = []byte(strings.Join(lines, "\n"))
	return out
}

// withoutIntentions returns cat without the service-intentions entry of
// destination.
func withoutIntentions(cat *model.Catalog, destination string) *model.Catalog {
	out := model.NewCatalog(cat.Services, cat.Proxies)
	out.CA, out.Leaves, out.Intentions = cat.CA, cat.Leaves, maps.Clone(cat.Intentions)
	delete(out.Intentions, destination)
	return out
}

// withoutService returns cat without service and its sidecars, but for
// keep (the proxy being translated).
func withoutService(cat *model.Catalog, service, keep string) *model.Catalog {
	services, proxies := maps.Clone(cat.Services), maps.Clone(cat.Proxies)
	delete(services, service)
	for id, p := range proxies {
		if p.Service == service && id != keep {
			delete(proxies, id)
		}
	}
	out := model.NewCatalog(services, proxies)
	out.CA, out.Leaves, out.Intentions = cat.CA, cat.Leaves, cat.Intentions
	return out
}

// readPolicyDir reads the policy files of dir by the names policy.Load
// gives them.
func readPolicyDir(t *testing.T, dir string) map[string][]byte {
	t.Helper()
	paths, err := filepath.Glob(filepath.Join(dir, "*.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	out := map[string][]byte{}
	for _, p := range paths {
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		out[p] = b
	}
	return out
}

// meshDefaultsYAML sets every MeshDefaults field Proxy reads in a way that
// differs from the default for catalog()'s strict services: the minimum TLS
// version, the default action and tracing.
const meshDefaultsYAML = `apiVersion: meshlet.io/v1alpha1
kind: MeshDefaults
metadata: {name: mesh}
spec:
  mtls: {minTLSVersion: "1.2"}
  authorization: {defaultAction: allow}
  tracing: {sampling: 50, propagation: [b3multi]}
`

// transparentPolicyYAML shapes fixtures.TransparentCatalog: web may not
// reach redis (which a wildcard intention allows) and may reach admin
// (which no intention lets it in) and ledger (headless, by default
// action); api's route retries, db's direct cluster has a breaker and its
// chain an idle timeout, the chain and listener of web's explicit upstream
// store too; web's own service is permissive; registry-only outbound.
const transparentPolicyYAML = `apiVersion: meshlet.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: redis-no-web}
spec:
  service: redis
  sources: [{name: web, action: deny}]
---
apiVersion: meshlet.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: admin-web}
spec:
  service: admin
  sources: [{name: web, action: allow}]
---
apiVersion: meshlet.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: ledger-open}
spec:
  service: ledger
  defaultAction: allow
  sources: [{name: batch, action: deny}]
---
apiVersion: meshlet.io/v1alpha1
kind: RetryPolicy
metadata: {name: api-retries}
spec: {service: api, numRetries: 5}
---
apiVersion: meshlet.io/v1alpha1
kind: CircuitBreakerPolicy
metadata: {name: db-breaker}
spec: {service: db, maxConnections: 10}
---
apiVersion: meshlet.io/v1alpha1
kind: TimeoutPolicy
metadata: {name: db-idle}
spec: {service: db, idle: 30s}
---
apiVersion: meshlet.io/v1alpha1
kind: TimeoutPolicy
metadata: {name: store-idle}
spec: {service: store, idle: 2m}
---
apiVersion: meshlet.io/v1alpha1
kind: ServiceDefaults
metadata: {name: web}
spec: {service: web, mtlsMode: permissive}
---
apiVersion: meshlet.io/v1alpha1
kind: MeshDefaults
metadata: {name: mesh}
spec: {outbound: registry-only}
`

// TestSourcesLeaveOneOut is the contract of the noted sources: leave one
// input out, translate again, and the resources that change (differ, go or
// come) are exactly those whose sources name that input. It runs for every
// policy document of each fixture (the demo catalog with every resilience
// kind, authorization, ServiceDefaults and a MeshDefaults with mTLS,
// authorization and tracing; the udp catalog; the transparent catalog with
// reach decided by AuthorizationPolicy, default action and MeshDefaults
// outbound mode, and a headless service), for every Consul
// service-intentions entry and for every Consul service (with its
// sidecars), for each proxy and the proxyless group.
//
// For a Consul service the check is one way: every resource that changes
// notes the service, but a noted resource may not change, as the catalog
// often restates a default (meta protocol "tcp", a service without
// sidecars whose load assignment is empty either way, the protocol of a
// udp service's TCP listener).
//
// A resource that appears only without the input (an upstream a removed
// AuthorizationPolicy no longer denies) has no sources in the full build;
// for it the input must be noted on some resource that changed (the
// capture listener whose deny chain became a route to it). The fixtures'
// documents each change what they set: a document restating a default is
// still noted (it decides the value) but changes nothing.
func TestSourcesLeaveOneOut(t *testing.T) {
	demo := readPolicyDir(t, "testdata/policies")
	demo["mesh.yaml"] = []byte(meshDefaultsYAML)
	demoProxies := []looTarget{proxylessTarget}
	for _, id := range slices.Sorted(maps.Keys(catalog().Proxies)) {
		demoProxies = append(demoProxies, proxyTarget(id))
	}
	tests := []struct {
		fixture looFixture
		targets []looTarget
	}{
		{looFixture{name: "demo", cat: catalog, files: demo,
			collector: &policy.Collector{Protocol: policy.CollectorHTTP, Endpoint: "http://127.0.0.1:4318/v1/traces"}}, demoProxies},
		{looFixture{name: "udp", cat: udpCatalog, files: map[string][]byte{"testdata/udp.yaml": []byte(udpPolicyYAML)}},
			[]looTarget{proxyTarget("client-1-sidecar-proxy"), proxyTarget("dns-1-sidecar-proxy")}},
		{looFixture{name: "transparent", cat: fixtures.TransparentCatalog, files: map[string][]byte{"transparent.yaml": []byte(transparentPolicyYAML)}},
			[]looTarget{proxyTarget("web-1-web-sidecar-proxy"), proxyTarget("api-1-api-sidecar-proxy"), proxyTarget("db-0-db-sidecar-proxy")}},
	}
	for _, tc := range tests {
		f := tc.fixture
		cat, pol := f.cat(), f.policies(t, f.files)
		docs := documents(pol)
		if len(docs) == 0 {
			t.Fatalf("%s: no policy documents", f.name)
		}
		for _, tg := range tc.targets {
			if tg.name != proxylessTarget.name && cat.Proxies[tg.name] == nil {
				t.Fatalf("%s: no proxy %s", f.name, tg.name)
			}
			full := looTranslate(t, tg, cat, pol)
			check := func(t *testing.T, without looBuild, exact bool, match func(Source) bool) {
				t.Helper()
				changed, added := changedKeys(full, without)
				noted := noting(full, match)
				if exact && !slices.Equal(changed, noted) || !exact && slices.ContainsFunc(changed, func(k string) bool { return !slices.Contains(noted, k) }) {
					t.Errorf("changed without it: %q\nnoted with it:       %q", changed, noted)
				}
				if len(added) > 0 && len(noted) == 0 {
					t.Errorf("without it %q appear, but no resource notes it", added)
				}
			}
			for _, doc := range docs {
				t.Run(f.name+"/"+tg.name+"/"+doc.Kind+" "+doc.Name, func(t *testing.T) {
					without := looTranslate(t, tg, cat, f.policies(t, withoutDocument(t, f.files, doc)))
					check(t, without, true, func(s Source) bool { return s == doc })
				})
			}
			for _, dest := range slices.Sorted(maps.Keys(cat.Intentions)) {
				t.Run(f.name+"/"+tg.name+"/intentions "+dest, func(t *testing.T) {
					without := looTranslate(t, tg, withoutIntentions(cat, dest), pol)
					check(t, without, true, func(s Source) bool { return s.Origin == OriginConsul && s.Kind == ConsulIntentions && s.Name == dest })
				})
			}
			for _, svc := range slices.Sorted(maps.Keys(cat.Services)) {
				t.Run(f.name+"/"+tg.name+"/service "+svc, func(t *testing.T) {
					without := looTranslate(t, tg, withoutService(cat, svc, tg.name), pol)
					check(t, without, false, func(s Source) bool { return s.Origin == OriginConsul && s.Kind == ConsulService && s.Name == svc })
				})
			}
		}
	}
}

// TestTransparentSourcesCoverCapture: the capture listeners and clusters
// of a transparent proxy have sources (pinned by a golden file), and a service it reaches only
// because it is transparent has its resources explained by the rule that
// lets it in, not by an upstream of its registration.
func TestTransparentSourcesCoverCapture(t *testing.T) {
	cat := fixtures.TransparentCatalog()
	p := cat.Proxies["web-1-web-sidecar-proxy"]
	m, err := ProxySources(cat, nil, p)
	if err != nil {
		t.Fatal(err)
	}
	for _, k := range []resourceKey{listenerKey(xds.OutboundCaptureListener), listenerKey(xds.InboundCaptureListener), clusterKey(xds.PassthroughCluster)} {
		if len(m.For(k.typeURL, k.name)) == 0 {
			t.Errorf("%s has no sources", k)
		}
	}
	golden.Check(t, "sources-transparent-web-sidecar.golden.txt", renderSources(m))
	srcs := m.For(xds.ClusterType, "api")
	if !slices.Contains(srcs, Source{Origin: OriginConsul, Kind: ConsulIntentions, Name: "api"}) {
		t.Errorf("cluster api: sources %v lack the intentions that let web reach it", srcs)
	}
	if slices.ContainsFunc(srcs, func(s Source) bool { return s.Kind == ConsulConnectProxy && s.Detail == "upstream api" }) {
		t.Errorf("cluster api: sources %v name an upstream api web's registration does not have", srcs)
	}
}
