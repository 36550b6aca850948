package e2e

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/envoyproxy/go-control-plane/pkg/cache/types"

	"github.com/meshlet/meshlet/controlplane/model"
	"github.com/meshlet/meshlet/controlplane/policy"
	"github.com/meshlet/meshlet/controlplane/translate"
	"github.com/meshlet/meshlet/internal/testca"
	"github.com/meshlet/meshlet/internal/testlog"
	"github.com/meshlet/meshlet/internal/testutil"
	"github.com/meshlet/meshlet/sidecar"
	"github.com/meshlet/meshlet/sidecar/xdsclient"
	"github.com/meshlet/meshlet/xds/xdstest"
)

// Upstream behaviours a flaky server can be switched to.
const (
	modeOK      = "ok"
	mode503     = "503"
	modeReset   = "reset"   // close the connection without answering
	modeHang    = "hang"    // never answer (until the client gives up)
	modeRead503 = "read503" // read the whole body, then answer 503
	modeSlow    = "slow"    // answer after 100 ms
	modeEvents  = "events"  // stream 5 server-sent events, 200 ms apart
)

// flaky is a real HTTP server that fails on purpose, counting requests.
type flaky struct {
	id     string
	addr   string
	mode   atomic.Value // string
	hits   atomic.Int64
	mu     sync.Mutex
	times  []time.Time
	bodies []int // body sizes received
	srv    *http.Server
}

func startFlaky(t *testing.T, id, mode string) *flaky {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	f := &flaky{id: id, addr: l.Addr().String()}
	f.mode.Store(mode)
	f.srv = &http.Server{Handler: f}
	go func() { _ = f.srv.Serve(l) }()
	t.Cleanup(func() { f.srv.Close() })
	return f
}

func (f *flaky) set(mode string) { f.mode.Store(mode) }

func (f *flaky) arrivals() []time.Time {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]time.Time(nil), f.times...)
}

func (f *flaky) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	f.hits.Add(1)
	n := 0
	mode := f.mode.Load().(string)
	if mode == modeRead503 || r.Method == http.MethodPost {
		b, _ := io.ReadAll(r.Body)
		n = len(b)
	}
	f.mu.Lock()
	f.times = append(f.times, time.Now())
	f.bodies = append(f.bodies, n)
	f.mu.Unlock()
	switch mode {
	case mode503, modeRead503:
		http.Error(w, f.id+" failing on purpose", http.StatusServiceUnavailable)
	case modeReset:
		conn, _, _ := w.(http.Hijacker).Hijack()
		conn.(*net.TCPConn).SetLinger(0)
		conn.Close()
	case modeHang:
		<-r.Context().Done()
	case modeSlow:
		time.Sleep(100 * time.Millisecond)
		fmt.Fprint(w, f.id)
	case modeEvents:
		w.Header().Set("Content-Type", "text/event-stream")
		for i := range 5 {
			fmt.Fprintf(w, "data: %d\n\n", i)
			w.(http.Flusher).Flush()
			select {
			case <-time.After(200 * time.Millisecond):
			case <-r.Context().Done():
				return
			}
		}
	default:
		fmt.Fprint(w, f.id)
	}
}

// closedAddr returns an address where nothing listens (connection refused).
func closedAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// rig is one sidecar ("web-1-sidecar-proxy") whose config comes from the
// real path minus Consul: policy YAML → translate.Proxy → a go-control-plane
// server → the sidecar. Its upstream "api" has the given endpoints.
type rig struct {
	t    *testing.T
	url  string // the outbound listener for api
	s    *sidecar.Sidecar
	log  *testlog.Buffer
	srv  *xdstest.Server
	port int
}

type rigEndpoint struct {
	addr   string
	weight int
}

const rigNode = "web-1-sidecar-proxy"

func newRig(t *testing.T, policies string, endpoints ...rigEndpoint) *rig {
	t.Helper()
	return newRigProtocol(t, "http", policies, endpoints...)
}

// newRigProtocol is newRig for api declaring protocol (http, http2, grpc).
func newRigProtocol(t *testing.T, protocol, policies string, endpoints ...rigEndpoint) *rig {
	t.Helper()
	pol, err := policy.Parse(map[string][]byte{"policies/test.yaml": []byte(
		"apiVersion: meshlet.io/v1alpha1\nkind: ServiceDefaults\nmetadata: {name: api}\nspec: {service: api, protocol: " + protocol + "}\n" + policies)})
	if err != nil {
		t.Fatal(err)
	}
	ports := freePorts(t, 2) // distinct: one for the outbound listener, one for the public one
	port := ports[0]
	proxies := map[string]*model.Proxy{
		rigNode: {ID: rigNode, Service: "web", Address: "127.0.0.1", Port: ports[1], LocalAppAddress: "127.0.0.1", LocalAppPort: 1,
			Upstreams: []model.Upstream{{Service: "api", BindAddress: "127.0.0.1", BindPort: port}}, Healthy: true},
	}
	for i, e := range endpoints {
		host, p, _ := net.SplitHostPort(e.addr)
		pn, _ := strconv.Atoi(p)
		id := fmt.Sprintf("api-%d-sidecar-proxy", i+1)
		proxies[id] = &model.Proxy{ID: id, Service: "api", Address: host, Port: pn, LocalAppAddress: "127.0.0.1", LocalAppPort: 1, Weight: max(e.weight, 1), Healthy: true}
	}
	cat := model.NewCatalog(map[string]*model.Service{"api": {Name: "api"}}, proxies)
	ca, err := testca.New("rig.consul")
	if err != nil {
		t.Fatal(err)
	}
	cat.CA = &model.CA{TrustDomain: ca.TrustDomain, Roots: []model.Root{{ID: "r", CertPEM: ca.CertPEM, Active: true}}}
	leaf := ca.MustIssue("dc1", "web")
	cat.Leaves["web"] = &model.Leaf{Service: "web", CertPEM: leaf.CertPEM, KeyPEM: leaf.KeyPEM, SPIFFEID: leaf.SPIFFEID}
	res, err := translate.Proxy(cat, pol, cat.Proxies[rigNode])
	if err != nil {
		t.Fatal(err)
	}
	// The upstreams here are the failing test servers themselves, not
	// sidecars: the rig exercises the caller's resilience, so the api
	// cluster talks to them in plaintext.
	for _, c := range res.Clusters {
		c.TransportSocket = nil
	}
	srv := xdstest.Start(t)
	r := served(res)
	srv.Set(t, rigNode, "v1", r)

	logger, buf := testlog.New(t, "sidecar")
	// The rig serves hand-built resources from a plaintext xdstest server.
	s, err := sidecar.New(sidecar.Config{NodeID: rigNode, XDSAddress: srv.Addr, XDSCredentials: xdsclient.Credentials{Insecure: true},
		AdminAddress: "127.0.0.1:0", DrainTimeout: time.Second, Logger: logger})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = s.Run(ctx)
	}()
	t.Cleanup(func() { cancel(); <-done })
	testutil.Until(t, 5*time.Second, "sidecar ready", s.IsReady)
	return &rig{t: t, url: "http://" + hostPort(port), s: s, log: buf, srv: srv, port: port}
}

func ep(addr string) rigEndpoint { return rigEndpoint{addr: addr} }

// do sends a request through the sidecar and returns status, body and the
// typed reason header.
func (r *rig) do(req *http.Request) (int, string, string) {
	r.t.Helper()
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		r.t.Fatalf("%s %s: %v", req.Method, req.URL, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), resp.Header.Get("X-Meshlet-Reason")
}

func (r *rig) get(path string) (int, string, string) {
	req, _ := http.NewRequest(http.MethodGet, r.url+path, nil)
	return r.do(req)
}

// metric reads a metric of the rig's sidecar (see metricAt).
func (r *rig) metric(name string, labels ...string) float64 {
	r.t.Helper()
	return metricAt(r.t, "http://"+r.s.AdminAddr().String(), name, labels...)
}

// clusterLine returns the value of one field of an endpoint in /clusters
// (e.g. "breaker", "health_flags"), or of the cluster when addr is "".
func (r *rig) clusterLine(addr, field string) string {
	prefix := "api::" + addr + "::" + field + "::"
	if addr == "" {
		prefix = "api::" + field + "::"
	}
	resp, err := http.Get("http://" + r.s.AdminAddr().String() + "/clusters")
	if err != nil {
		r.t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	for line := range strings.Lines(string(b)) {
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), prefix); ok {
			return v
		}
	}
	return ""
}

// served converts translator output to the test server's resources.
func served(res translate.Resources) xdstest.Resources {
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
	return r
}
