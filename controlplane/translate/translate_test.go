package translate

import (
	"bytes"
	"encoding/json"
	"errors"
	"strings"
	"testing"

	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	"github.com/meshlet/meshlet/controlplane/model"
	"github.com/meshlet/meshlet/controlplane/policy"
	"github.com/meshlet/meshlet/internal/golden"
	"github.com/meshlet/meshlet/xds"
)

// catalog is the mesh of the demo: web calls api (two healthy sidecars, one
// failing) over HTTP and store over TCP; the Connect CA has one root; api
// allows web by intention and denies everyone else.
func catalog() *model.Catalog {
	cat := catalogServices()
	cat.CA = &model.CA{TrustDomain: "11111111-2222-3333-4444-555555555555.consul", Roots: []model.Root{{ID: "r1", CertPEM: "-----BEGIN CERTIFICATE-----\nROOT\n-----END CERTIFICATE-----", Active: true}}}
	for _, svc := range []string{"web", "api", "store", "sessions"} {
		cat.Leaves[svc] = &model.Leaf{Service: svc, CertPEM: "-----BEGIN CERTIFICATE-----\nLEAF-" + svc + "\n-----END CERTIFICATE-----",
			KeyPEM: "-----BEGIN EC PRIVATE KEY-----\nKEY-" + svc + "\n-----END EC PRIVATE KEY-----", SPIFFEID: SPIFFEID(cat.CA.TrustDomain, "dc1", svc)}
	}
	cat.Intentions["api"] = &model.Intentions{Destination: "api", Sources: []model.IntentionSource{
		{Name: "web", Action: "allow", Origin: "consul intention web => api"},
		{Name: "*", Action: "deny", Origin: "consul intention * => api"},
	}}
	cat.Intentions["store"] = &model.Intentions{Destination: "store", Sources: []model.IntentionSource{
		{Name: "web", Action: "allow", Origin: "consul intention web => store"},
	}}
	return cat
}

func catalogServices() *model.Catalog {
	proxy := func(id, svc string, port int, healthy bool, ups ...model.Upstream) *model.Proxy {
		return &model.Proxy{
			ID: id, Node: "n1", Service: svc, ServiceID: svc + "-x", Address: "10.0.0.1", Port: port,
			LocalAppAddress: "127.0.0.1", LocalAppPort: port - 1000, Upstreams: ups, Weight: 1, Healthy: healthy,
		}
	}
	return model.NewCatalog(
		map[string]*model.Service{
			"api": {Name: "api", Instances: []model.Instance{
				{ID: "api-1", Address: "10.0.0.1", Port: 20001, Weight: 1, Healthy: true},
				{ID: "api-2", Address: "10.0.0.2", Port: 20002, Weight: 3, Healthy: true, Datacenter: "dc2"},
				{ID: "api-3", Address: "10.0.0.3", Port: 20003, Weight: 1, Healthy: false},
			}},
			"store":    {Name: "store", Protocol: "tcp", Instances: []model.Instance{{ID: "store-1", Address: "10.0.0.4", Port: 20100, Weight: 1, Healthy: true}}},
			"web":      {Name: "web", Protocol: "http", Instances: []model.Instance{{ID: "web-1", Address: "10.0.0.5", Port: 20000, Weight: 1, Healthy: true}}},
			"sessions": {Name: "sessions", Instances: []model.Instance{{ID: "sessions-1", Address: "10.0.0.6", Port: 20200, Weight: 1, Healthy: true}}},
			"empty":    {Name: "empty"},
		},
		map[string]*model.Proxy{
			"web-1-sidecar-proxy": proxy("web-1-sidecar-proxy", "web", 21000, true,
				model.Upstream{Service: "api", BindAddress: "127.0.0.1", BindPort: 9191},
				model.Upstream{Service: "store", BindAddress: "127.0.0.1", BindPort: 9192},
				model.Upstream{Service: "api", BindAddress: "127.0.0.1", BindPort: 9193}, // duplicate: ignored
				model.Upstream{Service: "sessions", BindAddress: "127.0.0.1", BindPort: 9194},
			),
			"api-1-sidecar-proxy":   proxy("api-1-sidecar-proxy", "api", 21001, true),
			"api-2-sidecar-proxy":   inDC("dc2", proxy("api-2-sidecar-proxy", "api", 21002, true)),
			"api-3-sidecar-proxy":   proxy("api-3-sidecar-proxy", "api", 21003, false),
			"store-1-sidecar-proxy": proxy("store-1-sidecar-proxy", "store", 21100, true),
			// A client-only proxy (a Job's pod): no application port, so no
			// public listener and no endpoint of api anywhere.
			"api-job-sidecar-proxy": {ID: "api-job-sidecar-proxy", Node: "n1", Service: "api", ServiceID: "api-job", Address: "10.0.0.9", Port: 20000,
				LocalAppAddress: "127.0.0.1", Weight: 1, Healthy: true,
				Upstreams: []model.Upstream{{Service: "store", BindAddress: "127.0.0.1", BindPort: 9192}}},
		},
	)
}

func inDC(dc string, p *model.Proxy) *model.Proxy {
	p.Datacenter = dc
	return p
}

// policies loads testdata/policies: every resilience kind for api, a TCP
// retry policy for store, ring hash for sessions.
func policies(t *testing.T) *policy.Set {
	t.Helper()
	set, err := policy.Load("testdata/policies")
	if err != nil {
		t.Fatal(err)
	}
	return set
}

// render turns resources into stable, indented JSON.
func render(t *testing.T, r Resources) []byte {
	t.Helper()
	section := func(msgs []proto.Message) []json.RawMessage {
		out := []json.RawMessage{}
		for _, m := range msgs {
			b, err := protojson.Marshal(m)
			if err != nil {
				t.Fatal(err)
			}
			out = append(out, b)
		}
		return out
	}
	var ls, rs, cs, es, ss []proto.Message
	for _, x := range r.Listeners {
		ls = append(ls, x)
	}
	for _, x := range r.Routes {
		rs = append(rs, x)
	}
	for _, x := range r.Clusters {
		cs = append(cs, x)
	}
	for _, x := range r.Endpoints {
		es = append(es, x)
	}
	for _, x := range r.Secrets {
		ss = append(ss, x)
	}
	b, err := json.Marshal(map[string][]json.RawMessage{
		"listeners": section(ls), "routes": section(rs), "clusters": section(cs), "endpoints": section(es), "secrets": section(ss),
	})
	if err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	if err := json.Indent(&out, b, "", "  "); err != nil {
		t.Fatal(err)
	}
	out.WriteByte('\n')
	return out.Bytes()
}

func TestProxyGolden(t *testing.T) {
	cat, pol := catalog(), policies(t)
	tests := []struct{ name, proxy string }{
		{name: "web-sidecar", proxy: "web-1-sidecar-proxy"},           // HTTP inbound; HTTP and TCP upstreams
		{name: "api-sidecar", proxy: "api-1-sidecar-proxy"},           // protocol from a policy file, no upstreams
		{name: "store-sidecar", proxy: "store-1-sidecar-proxy"},       // TCP inbound from service meta
		{name: "client-only-sidecar", proxy: "api-job-sidecar-proxy"}, // no public listener, no local_app
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r, err := Proxy(cat, pol, cat.Proxies[tc.proxy])
			if err != nil {
				t.Fatal(err)
			}
			golden.Check(t, tc.name+".golden.json", render(t, r))
		})
	}
}

func TestProxylessGolden(t *testing.T) {
	golden.Check(t, "proxyless.golden.json", render(t, Proxyless(catalog(), policies(t))))
}

func TestNoPoliciesGolden(t *testing.T) {
	// Without policy files every route still retries connect failures and
	// refused streams (nothing reached the upstream) under the default budget.
	cat := catalog()
	r, err := Proxy(cat, nil, cat.Proxies["web-1-sidecar-proxy"])
	if err != nil {
		t.Fatal(err)
	}
	golden.Check(t, "web-sidecar-no-policies.golden.json", render(t, r))
}

func TestTracingGolden(t *testing.T) {
	// Tracing on through the control plane's default collector (OTLP/HTTP,
	// which adds the otlp_collector cluster): server spans on the public
	// listener, client spans with one span per attempt on upstream listeners.
	cat := catalog()
	pol := policies(t).WithDefaultCollector(&policy.Collector{Protocol: policy.CollectorHTTP, Endpoint: "http://127.0.0.1:4318/v1/traces"})
	r, err := Proxy(cat, pol, cat.Proxies["web-1-sidecar-proxy"])
	if err != nil {
		t.Fatal(err)
	}
	golden.Check(t, "web-sidecar-tracing.golden.json", render(t, r))
}

func TestNotReadyWithoutCertificates(t *testing.T) {
	cat := catalog()
	delete(cat.Leaves, "api")
	if _, err := Proxy(cat, nil, cat.Proxies["api-1-sidecar-proxy"]); !errors.Is(err, ErrNotReady) || !strings.Contains(err.Error(), `leaf certificate of service "api"`) {
		t.Errorf("Proxy without api's leaf: %v, want ErrNotReady naming it", err)
	}
	cat.CA = nil
	if _, err := Proxy(cat, nil, cat.Proxies["web-1-sidecar-proxy"]); !errors.Is(err, ErrNotReady) || !strings.Contains(err.Error(), "CA roots") {
		t.Errorf("Proxy without CA: %v, want ErrNotReady naming the roots", err)
	}
}

func TestProtocolPrecedence(t *testing.T) {
	cat := model.NewCatalog(map[string]*model.Service{
		"a": {Name: "a", Protocol: "grpc"},
		"b": {Name: "b", Protocol: "bogus"},
		"c": {Name: "c"},
	}, nil)
	pol, err := policy.Parse(map[string][]byte{"p.yaml": []byte(
		"apiVersion: meshlet.io/v1alpha1\nkind: ServiceDefaults\nmetadata: {name: a}\nspec: {service: a, protocol: http2}\n")})
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name, service string
		want          xds.Protocol
	}{
		{name: "policy file beats Consul meta", service: "a", want: xds.ProtocolHTTP2},
		{name: "unknown meta value falls back to tcp", service: "b", want: xds.ProtocolTCP},
		{name: "nothing declared is tcp", service: "c", want: xds.ProtocolTCP},
		{name: "unknown service is tcp", service: "zzz", want: xds.ProtocolTCP},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := Protocol(cat, pol, tc.service); got != tc.want {
				t.Errorf("Protocol(%q) = %q, want %q", tc.service, got, tc.want)
			}
		})
	}
}

func TestDeterministic(t *testing.T) {
	cat, pol := catalog(), policies(t)
	proxy := func() Resources {
		r, err := Proxy(cat, pol, cat.Proxies["web-1-sidecar-proxy"])
		if err != nil {
			t.Fatal(err)
		}
		return r
	}
	first := render(t, proxy())
	for range 20 {
		if got := render(t, proxy()); !bytes.Equal(got, first) {
			t.Fatal("Proxy output changed between identical calls")
		}
	}
}
