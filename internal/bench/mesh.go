package bench

import (
	"fmt"
	"strings"
	"sync"
	"testing"

	"github.com/envoyproxy/go-control-plane/pkg/cache/types"

	"github.com/meshlet/meshlet/controlplane/model"
	"github.com/meshlet/meshlet/controlplane/policy"
	"github.com/meshlet/meshlet/controlplane/translate"
	"github.com/meshlet/meshlet/internal/testca"
	"github.com/meshlet/meshlet/xds/xdstest"
)

// The services of the benchmark mesh, one per kind of app behind the
// proxies. Their protocol (ServiceDefaults) picks the sidecar's filter chain.
var meshServices = []struct {
	name     string
	kind     kind
	protocol string
}{
	{"web", kindHTTP, "http"},
	{"grpc", kindGRPC, "grpc"},
	{"redis", kindRedis, "tcp"},
	// conn is the HTTP app declared as opaque TCP: one upstream
	// connection (one mTLS handshake between sidecars) per client
	// connection, for the connection-per-request workloads.
	{"conn", kindConn, "tcp"},
}

// clientService is the service whose sidecar sends the load ("down").
const clientService = "client"

// Node IDs of the sidecars. The single sidecar is a client's outbound
// side; the pair is the client's sidecar ("down") and the app's ("up-<svc>").
const (
	nodeSingle    = "single"
	nodePairDown  = "pair-down"
	nodePlainDown = "plain-down"
)

func nodePairUp(svc string) string  { return "pair-up-" + svc }
func nodePlainUp(svc string) string { return "plain-up-" + svc }

// meshPorts are the listener ports of every sidecar, by service.
type meshPorts struct {
	singleOut   map[string]int // the single sidecar's outbound listeners
	pairOut     map[string]int // down's outbound listeners (mTLS pair)
	pairPublic  map[string]int // up-<svc>'s public listener (mTLS)
	plainOut    map[string]int // down's outbound listeners (plaintext pair)
	plainPublic map[string]int // up-<svc>'s public listener (permissive)
	unused      []int          // public listeners nobody calls (single, downs)
}

// mesh is the xDS side of the harness: a real go-control-plane server
// (xdstest) serving, to every benchmark sidecar, what the control plane's
// translator makes of a small catalog: the same listeners, routes, clusters,
// RBAC and SDS secrets a Consul-fed mesh gets, default policies included.
type mesh struct {
	srv   *xdstest.Server
	ca    *testca.CA
	tb    *tb
	ports meshPorts
	// clientLeaf is the client service's certificate (for the direct
	// mTLS client of the handshake workload); appLeaf is conn's (for
	// HAProxy and nginx terminating mTLS like up's sidecar).
	clientLeaf, appLeaf *testca.Leaf
}

// startMesh starts the xDS server and publishes every sidecar's snapshot.
// apps are the app addresses by kind ("127.0.0.1:port").
func startMesh(apps map[kind]hostPort, alloc func(int) ([]int, error)) (m *mesh, err error) {
	t := &tb{}
	defer func() {
		if r := recover(); r != nil {
			t.close()
			f, ok := r.(tbFatal)
			if !ok {
				panic(r)
			}
			m, err = nil, fmt.Errorf("bench: xds: %s", string(f))
		}
	}()
	ca, err := testca.New("bench.consul")
	if err != nil {
		return nil, err
	}
	m = &mesh{ca: ca, tb: t}
	n := len(meshServices)
	ps, err := alloc(5*n + 3)
	if err != nil {
		return nil, err
	}
	take := func() map[string]int {
		out := map[string]int{}
		for _, s := range meshServices {
			out[s.name], ps = ps[0], ps[1:]
		}
		return out
	}
	m.ports = meshPorts{singleOut: take(), pairOut: take(), pairPublic: take(), plainOut: take(), plainPublic: take(), unused: ps}
	m.srv = xdstest.Start(t)

	leaves := map[string]*testca.Leaf{clientService: ca.MustIssue("dc1", clientService)}
	for _, s := range meshServices {
		leaves[s.name] = ca.MustIssue("dc1", s.name)
	}
	m.clientLeaf, m.appLeaf = leaves[clientService], leaves["conn"]

	// The single sidecar: the client's outbound listeners straight to the
	// apps, plaintext (the apps are not sidecars). Each app stands in for
	// its own sidecar, local app port included: a proxy without one is
	// client-only and no endpoint of its service.
	single := m.catalog(leaves, nodeSingle, m.ports.singleOut, m.ports.unused[0], func(svc string) model.Proxy {
		a := apps[kindOf(svc)]
		return model.Proxy{Address: a.host, Port: a.port, LocalAppAddress: a.host, LocalAppPort: a.port}
	})
	if err := m.publish(single, policies(false), nodeSingle, true); err != nil {
		return nil, err
	}
	// The mTLS pair: down's outbound listeners to up-<svc>'s public
	// listener (strict mTLS, RBAC from the intention client → svc), then
	// the app.
	pair := m.catalog(leaves, nodePairDown, m.ports.pairOut, m.ports.unused[1], func(svc string) model.Proxy {
		a := apps[kindOf(svc)]
		return model.Proxy{ID: nodePairUp(svc), Address: "127.0.0.1", Port: m.ports.pairPublic[svc], LocalAppAddress: a.host, LocalAppPort: a.port}
	})
	if err := m.publish(pair, policies(false), nodePairDown, false); err != nil {
		return nil, err
	}
	for _, s := range meshServices {
		if err := m.publish(pair, policies(false), nodePairUp(s.name), false); err != nil {
			return nil, err
		}
	}
	// The plaintext pair: the same shape, up's listeners permissive and
	// down's clusters without TLS.
	plain := m.catalog(leaves, nodePlainDown, m.ports.plainOut, m.ports.unused[2], func(svc string) model.Proxy {
		a := apps[kindOf(svc)]
		return model.Proxy{ID: nodePlainUp(svc), Address: "127.0.0.1", Port: m.ports.plainPublic[svc], LocalAppAddress: a.host, LocalAppPort: a.port}
	})
	if err := m.publish(plain, policies(true), nodePlainDown, true); err != nil {
		return nil, err
	}
	for _, s := range meshServices {
		if err := m.publish(plain, policies(true), nodePlainUp(s.name), false); err != nil {
			return nil, err
		}
	}
	return m, nil
}

func kindOf(svc string) kind {
	for _, s := range meshServices {
		if s.name == svc {
			return s.kind
		}
	}
	panic("bench: unknown service " + svc)
}

// catalog returns a catalog with the client's proxy clientNode (its
// outbound listeners on outPorts) and, for every service, one proxy made by
// instance: the endpoint the client's sidecar sends that service's traffic
// to.
func (m *mesh) catalog(leaves map[string]*testca.Leaf, clientNode string, outPorts map[string]int, publicPort int, instance func(svc string) model.Proxy) *model.Catalog {
	services := map[string]*model.Service{clientService: {Name: clientService}}
	client := &model.Proxy{ID: clientNode, Service: clientService, Address: "127.0.0.1", Port: publicPort,
		LocalAppAddress: "127.0.0.1", LocalAppPort: 1, Healthy: true}
	proxies := map[string]*model.Proxy{clientNode: client}
	for _, s := range meshServices {
		services[s.name] = &model.Service{Name: s.name, Protocol: s.protocol}
		client.Upstreams = append(client.Upstreams, model.Upstream{Service: s.name, BindAddress: "127.0.0.1", BindPort: outPorts[s.name]})
		p := instance(s.name)
		if p.ID == "" {
			p.ID = "app-" + s.name
		}
		p.Service, p.Healthy, p.Weight = s.name, true, 1
		proxies[p.ID] = &p
	}
	cat := model.NewCatalog(services, proxies)
	cat.CA = &model.CA{TrustDomain: m.ca.TrustDomain, Roots: []model.Root{{ID: "bench", CertPEM: m.ca.CertPEM, Active: true}}}
	for name, l := range leaves {
		cat.Leaves[name] = &model.Leaf{Service: name, CertPEM: l.CertPEM, KeyPEM: l.KeyPEM, SPIFFEID: l.SPIFFEID}
	}
	for _, s := range meshServices {
		cat.Intentions[s.name] = &model.Intentions{Destination: s.name, Sources: []model.IntentionSource{
			{Name: clientService, Action: "allow", Origin: clientService + " => " + s.name},
		}}
	}
	return cat
}

// policies are the benchmark's policy files: each service's protocol, and
// permissive mTLS for the plaintext pair.
func policies(permissive bool) *policy.Set {
	var docs []string
	for _, s := range meshServices {
		docs = append(docs, fmt.Sprintf("apiVersion: meshlet.io/v1alpha1\nkind: ServiceDefaults\nmetadata: {name: %s}\nspec: {service: %s, protocol: %s}\n", s.name, s.name, s.protocol))
	}
	if permissive {
		docs = append(docs, "apiVersion: meshlet.io/v1alpha1\nkind: MeshDefaults\nmetadata: {name: mesh}\nspec: {mtls: {mode: permissive}}\n")
	}
	pol, err := policy.Parse(map[string][]byte{"bench.yaml": []byte(strings.Join(docs, "---\n"))})
	if err != nil {
		panic(fmt.Sprintf("bench: built-in policies: %v", err)) // a bug in this file
	}
	return pol
}

// publish translates node's resources and serves them; plainUpstreams
// drops the upstream clusters' TLS (the single sidecar talks to the apps,
// the plaintext pair's down to permissive listeners).
func (m *mesh) publish(cat *model.Catalog, pol *policy.Set, node string, plainUpstreams bool) error {
	res, err := translate.Proxy(cat, pol, cat.Proxies[node])
	if err != nil {
		return fmt.Errorf("bench: translate %s: %w", node, err)
	}
	if plainUpstreams {
		for _, c := range res.Clusters {
			c.TransportSocket = nil
		}
	}
	var r xdstest.Resources
	for _, x := range res.Listeners {
		r.Listeners = append(r.Listeners, types.Resource(x))
	}
	for _, x := range res.Routes {
		r.Routes = append(r.Routes, x)
	}
	for _, x := range res.Clusters {
		r.Clusters = append(r.Clusters, x)
	}
	for _, x := range res.Endpoints {
		r.Endpoints = append(r.Endpoints, x)
	}
	for _, x := range res.Secrets {
		r.Secrets = append(r.Secrets, x)
	}
	m.srv.Set(m.tb, node, "v1", r)
	return nil
}

// close stops the xDS server.
func (m *mesh) close() { m.tb.close() }

// tb lets the harness, a program rather than a test, use xdstest: Fatal
// panics with tbFatal (recovered by startMesh), Cleanup functions run at
// close. Every other testing.TB method is unused and would panic on the nil
// embedded interface.
type tb struct {
	testing.TB
	mu       sync.Mutex // guards cleanups
	cleanups []func()
}

type tbFatal string

func (*tb) Helper()                        {}
func (*tb) Fatal(args ...any)              { panic(tbFatal(fmt.Sprint(args...))) }
func (*tb) Fatalf(format string, a ...any) { panic(tbFatal(fmt.Sprintf(format, a...))) }
func (t *tb) Cleanup(f func())             { t.mu.Lock(); t.cleanups = append(t.cleanups, f); t.mu.Unlock() }

func (t *tb) close() {
	t.mu.Lock()
	fs := t.cleanups
	t.cleanups = nil
	t.mu.Unlock()
	for i := len(fs) - 1; i >= 0; i-- {
		fs[i]()
	}
}
