package e2e

import (
	"cmp"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/meshlet/meshlet/controlplane"
	"github.com/meshlet/meshlet/controlplane/servingcert"
	"github.com/meshlet/meshlet/internal/devconsul"
	"github.com/meshlet/meshlet/internal/testlog"
	"github.com/meshlet/meshlet/internal/testutil"
	"github.com/meshlet/meshlet/sidecar"
	"github.com/meshlet/meshlet/sidecar/xdsclient"
)

// mesh is one test's mesh: a real Consul agent, the control plane and
// sidecars, all on loopback.
type mesh struct {
	t         *testing.T
	consul    *devconsul.Agent
	policyDir string
	xdsAddr   string
	cpLog     *testlog.Buffer
	// cpToken is the control plane's Consul ACL token: the agent's
	// ControlPlaneToken (least privilege) unless set before
	// startControlPlane.
	cpToken string
	// tlsDir holds the CA and ADS serving certificate the control plane
	// issues itself (issued with the mesh, so sidecars started before the
	// control plane have caFile, and kept across its restarts); caFile is
	// what sidecars verify ADS with.
	tlsDir, caFile string
	// tokenDir holds each service's Consul ACL token (a service identity)
	// its sidecars present on ADS; services maps a proxy ID to its service.
	tokenDir string
	services map[string]string
	// cpConfig, when set, adjusts the control plane's configuration
	// before startControlPlane runs it.
	cpConfig func(*controlplane.Config)
	// insecure makes sidecars dial ADS in plaintext without a token (a
	// control plane run with XDSInsecure).
	insecure bool
}

// skipShort skips t under -short (make test-short): the end-to-end tests
// start real processes (Consul, Jaeger, sidecar binaries, protocol peers),
// which make test runs. what names the one t was about to start.
func skipShort(t testing.TB, what string) {
	t.Helper()
	if testing.Short() {
		t.Skip("-short: starts " + what + " (make test runs it)")
	}
}

// newMesh starts the mesh's Consul agent: ACLs on, default deny (the
// test's registrations and intentions are written with its management
// token, the control plane reads with its least-privilege token).
func newMesh(t *testing.T) *mesh {
	t.Helper()
	return newMeshWith(t, devconsul.Options{})
}

// newMeshWith is newMesh with the agent's options.
func newMeshWith(t *testing.T, o devconsul.Options) *mesh {
	t.Helper()
	skipShort(t, "a real Consul agent")
	m := meshWithoutConsul(t)
	m.consul = devconsul.StartForTestWith(t, o)
	return m
}

// meshWithoutConsul is a mesh whose Consul agent the test starts itself
// (m.consul): its policy directory, ADS certificate and token directory.
func meshWithoutConsul(t *testing.T) *mesh {
	t.Helper()
	m := &mesh{t: t, policyDir: t.TempDir(), tlsDir: t.TempDir(), tokenDir: t.TempDir(), services: map[string]string{}}
	d, err := servingcert.OpenDir(servingcert.DirConfig{Dir: m.tlsDir, Names: servingcert.LocalNames("127.0.0.1:0"),
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	m.caFile = d.CAFile()
	return m
}

// credentials are what node's sidecar presents on ADS: TLS verified with
// the control plane's CA and its service's Consul token.
func (m *mesh) credentials(node string) xdsclient.Credentials {
	m.t.Helper()
	if m.insecure {
		return xdsclient.Credentials{Insecure: true}
	}
	return xdsclient.Credentials{CAFile: m.caFile, TokenFile: m.tokenFile(m.serviceOf(node))}
}

// serviceOf returns the service node's proxy fronts: as registered by
// m.register, else as Consul says, else from the node ID's shape
// "<service>[-<n>]-sidecar-proxy".
func (m *mesh) serviceOf(node string) string {
	m.t.Helper()
	if svc, ok := m.services[node]; ok {
		return svc
	}
	if s, _, err := m.consul.Client.Agent().Service(node, nil); err == nil && s.Proxy != nil && s.Proxy.DestinationServiceName != "" {
		return s.Proxy.DestinationServiceName
	}
	id := strings.TrimSuffix(node, "-sidecar-proxy")
	if i := strings.LastIndexByte(id, '-'); i > 0 && strings.Trim(id[i+1:], "0123456789") == "" {
		id = id[:i]
	}
	return id
}

// tokenFile returns the file holding service's Consul ACL token (a
// service identity), made on first use.
func (m *mesh) tokenFile(service string) string {
	m.t.Helper()
	path := filepath.Join(m.tokenDir, service)
	if _, err := os.Stat(path); err == nil {
		return path
	}
	tok, err := m.consul.ServiceToken(context.Background(), service)
	if err != nil {
		m.t.Fatal(err)
	}
	if err := os.WriteFile(path, []byte(tok), 0o600); err != nil {
		m.t.Fatal(err)
	}
	return path
}

// consulConfig sets the Consul part of a control plane's cfg: consulAddr
// (the mesh's agent when ""), its CA file, and the control plane's token
// (m.cpToken, else the agent's ControlPlaneToken). At cleanup it fails
// the test if the control plane said its token lacks a permission: every
// test proves consul.ControlPlaneACLRules enough.
func (m *mesh) consulConfig(cfg *controlplane.Config, consulAddr string) {
	m.t.Helper()
	cfg.ConsulAddress = consulAddr
	if consulAddr == "" {
		cfg.ConsulAddress, cfg.ConsulCAFile = m.consul.URL(), m.consul.CAFile
	}
	if m.cpToken == "" {
		tok, err := m.consul.ControlPlaneToken(context.Background(), false)
		if err != nil {
			m.t.Fatal(err)
		}
		m.cpToken = tok
	}
	cfg.ConsulToken = m.cpToken
	m.t.Cleanup(func() {
		if lines := m.cpLog.Lines("consul: ACL token lacks"); len(lines) > 0 {
			m.t.Errorf("the control plane's token lacks a permission:\n%s", strings.Join(lines, "\n"))
		}
	})
}

// writePolicy writes a policy file into the mesh's policy directory.
func (m *mesh) writePolicy(name, content string) {
	m.t.Helper()
	tmp := filepath.Join(m.policyDir, "."+name)
	if err := os.WriteFile(tmp, []byte(content), 0o644); err != nil {
		m.t.Fatal(err)
	}
	if err := os.Rename(tmp, filepath.Join(m.policyDir, name)); err != nil {
		m.t.Fatal(err)
	}
}

func serviceDefaults(service, protocol string) string {
	return fmt.Sprintf("apiVersion: meshlet.io/v1alpha1\nkind: ServiceDefaults\nmetadata:\n  name: %s\nspec:\n  service: %s\n  protocol: %s\n", service, service, protocol)
}

// startControlPlane runs the control plane against consulAddr (the mesh's
// agent when "") with m.cpToken (see consulConfig), serving ADS on xdsAddr
// ("127.0.0.1:0" when "") over TLS with the mesh's certificate.
func (m *mesh) startControlPlane(consulAddr, xdsAddr string) {
	m.t.Helper()
	m.runControlPlane(controlplane.Config{XDSAddress: cmp.Or(xdsAddr, "127.0.0.1:0")}, consulAddr)
}

// runControlPlane runs the control plane with cfg completed: the policy
// directory, a test logger, ADS over TLS with the mesh's certificate
// (m.tlsDir), Consul (consulConfig), then m.cpConfig. It returns once ADS
// serves (and the admin API, when cfg.AdminAddress is set), with the
// admin address; the control plane stops at cleanup.
func (m *mesh) runControlPlane(cfg controlplane.Config, consulAddr string) (adminAddr string) {
	m.t.Helper()
	logger, buf := testlog.New(m.t, "controlplane")
	m.cpLog = buf
	ready, adminReady := make(chan string, 1), make(chan string, 1)
	cfg.PolicyDir, cfg.Logger, cfg.XDSTLSDir = m.policyDir, logger, m.tlsDir
	cfg.Ready = func(a net.Addr) { ready <- a.String() }
	cfg.AdminReady = func(a net.Addr) { adminReady <- a.String() }
	m.consulConfig(&cfg, consulAddr)
	if m.cpConfig != nil {
		m.cpConfig(&cfg)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- controlplane.Run(ctx, cfg) }()
	m.t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			m.t.Errorf("controlplane.Run: %v", err)
		}
	})
	m.xdsAddr = ""
	timeout := time.After(10 * time.Second)
	for m.xdsAddr == "" || cfg.AdminAddress != "" && adminAddr == "" {
		select {
		case adminAddr = <-adminReady:
		case m.xdsAddr = <-ready:
		case err := <-done:
			m.t.Fatalf("control plane exited: %v", err)
		case <-timeout:
			m.t.Fatal("control plane not serving after 10s")
		}
	}
	return adminAddr
}

// proxy is a running sidecar.
type proxy struct {
	s     *sidecar.Sidecar
	log   *testlog.Buffer
	admin string // http://host:port
	stop  func()
}

// startSidecar runs a sidecar for node against xdsAddr (the mesh's when
// "").
func (m *mesh) startSidecar(node, xdsAddr string) *proxy {
	m.t.Helper()
	if xdsAddr == "" {
		xdsAddr = m.xdsAddr
	}
	logger, buf := testlog.New(m.t, node)
	s, err := sidecar.New(sidecar.Config{
		NodeID: node, XDSAddress: xdsAddr, XDSCredentials: m.credentials(node), AdminAddress: "127.0.0.1:0", DrainTimeout: 2 * time.Second,
		XDSMinBackoff: 50 * time.Millisecond, XDSMaxBackoff: 500 * time.Millisecond, Logger: logger,
	})
	if err != nil {
		m.t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()
	var once sync.Once
	p := &proxy{s: s, log: buf, admin: "http://" + s.AdminAddr().String()}
	p.stop = func() {
		once.Do(func() {
			cancel()
			if err := <-done; err != nil {
				m.t.Errorf("sidecar %s: %v", node, err)
			}
		})
	}
	m.t.Cleanup(p.stop)
	return p
}

func (p *proxy) waitReady(t *testing.T) {
	t.Helper()
	testutil.Until(t, 10*time.Second, "sidecar ready", p.s.IsReady)
}

// endpoints returns the endpoint addresses of cluster, sorted.
func (p *proxy) endpoints(cluster string) []string {
	var out []string
	for _, c := range p.s.Clusters() {
		if c.Name == cluster {
			for _, e := range c.Endpoints {
				out = append(out, e.Address)
			}
		}
	}
	slices.Sort(out)
	return out
}

// app is an HTTP server answering {"instance": id, "via": ...}.
type app struct {
	id   string
	port int
	hits atomic.Int64
	srv  *http.Server
	done chan struct{}
}

func startApp(t *testing.T, id string) *app {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	a := &app{id: id, port: l.Addr().(*net.TCPAddr).Port, done: make(chan struct{})}
	a.srv = &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		a.hits.Add(1)
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(map[string]string{"instance": id, "via": strings.Join(r.Header.Values("Via"), ", "),
			"xfcc": r.Header.Get("X-Forwarded-Client-Cert")})
	})}
	go func() {
		defer close(a.done)
		_ = a.srv.Serve(l)
	}()
	t.Cleanup(a.stop)
	return a
}

func (a *app) stop() {
	_ = a.srv.Close()
	<-a.done
}

// svc describes a registration: an app instance with a TTL check and a
// Connect sidecar with its own TTL check (so tests flip health at will).
type svc struct {
	id, name    string
	appPort     int
	sidecarPort int
	upstreams   map[string]int // destination → local bind port
	meta        map[string]string
	// sidecarCritical registers the sidecar's check as critical, so the
	// instance takes traffic only once the test marks it passing.
	sidecarCritical bool
	// sidecarReadyURL, when set, makes the sidecar's check an HTTP check
	// of that URL (its admin /ready) every second instead of a TTL check,
	// as the demo registers them: a stopping sidecar fails it.
	sidecarReadyURL string
	// sidecarBind, when set, is where the sidecar's public listener binds
	// (Proxy.Config bind_port); sidecarPort is then what others dial.
	sidecarBind int
}

func (s svc) proxyID() string { return s.id + "-sidecar-proxy" }

func (m *mesh) register(s svc) {
	m.t.Helper()
	m.services[s.proxyID()] = s.name
	var ups []api.Upstream
	for dest, port := range s.upstreams {
		ups = append(ups, api.Upstream{DestinationName: dest, LocalBindPort: port})
	}
	slices.SortFunc(ups, func(a, b api.Upstream) int { return strings.Compare(a.DestinationName, b.DestinationName) })
	sidecarStatus := api.HealthPassing
	if s.sidecarCritical {
		sidecarStatus = api.HealthCritical
	}
	err := m.consul.Client.Agent().ServiceRegister(&api.AgentServiceRegistration{
		ID: s.id, Name: s.name, Address: "127.0.0.1", Port: s.appPort, Meta: s.meta,
		Check: &api.AgentServiceCheck{CheckID: s.id + ":app", TTL: "10m", Status: api.HealthPassing},
		Connect: &api.AgentServiceConnect{SidecarService: &api.AgentServiceRegistration{
			Port:   s.sidecarPort,
			Checks: api.AgentServiceChecks{sidecarCheck(s, sidecarStatus)},
			Proxy:  proxyConfig(ups, s.sidecarBind),
		}},
	})
	if err != nil {
		m.t.Fatal(err)
	}
}

// allow writes a Consul intention letting source call destination (added
// to the destination's service-intentions entry).
func (m *mesh) allow(source, destination string) {
	m.t.Helper()
	m.intention(source, destination, api.IntentionActionAllow)
}

// intention sets the L4 intention of source to destination.
func (m *mesh) intention(source, destination string, action api.IntentionAction) {
	m.t.Helper()
	entry := &api.ServiceIntentionsConfigEntry{Kind: api.ServiceIntentions, Name: destination}
	if e, _, err := m.consul.Client.ConfigEntries().Get(api.ServiceIntentions, destination, nil); err == nil {
		entry = e.(*api.ServiceIntentionsConfigEntry)
	}
	found := false
	for _, s := range entry.Sources {
		if s.Name == source {
			s.Action, found = action, true
		}
	}
	if !found {
		entry.Sources = append(entry.Sources, &api.SourceIntention{Name: source, Action: action})
	}
	if _, _, err := m.consul.Client.ConfigEntries().Set(entry, nil); err != nil {
		m.t.Fatal(err)
	}
}

// sidecarCheck is the check of s's sidecar: TTL (set by the test), or an
// HTTP check of s.sidecarReadyURL.
func sidecarCheck(s svc, status string) *api.AgentServiceCheck {
	if s.sidecarReadyURL != "" {
		return &api.AgentServiceCheck{CheckID: s.id + ":sidecar", HTTP: s.sidecarReadyURL, Interval: "1s", Timeout: "1s", Status: status}
	}
	return &api.AgentServiceCheck{CheckID: s.id + ":sidecar", TTL: "10m", Status: status}
}

func proxyConfig(ups []api.Upstream, bind int) *api.AgentServiceConnectProxyConfig {
	pc := &api.AgentServiceConnectProxyConfig{Upstreams: ups}
	if bind != 0 {
		pc.Config = map[string]any{"bind_port": bind}
	}
	return pc
}

func (m *mesh) setCheck(checkID, status string) {
	m.t.Helper()
	if err := m.consul.Client.Agent().UpdateTTL(checkID, "set by test", status); err != nil {
		m.t.Fatal(err)
	}
}

func freePorts(t *testing.T, n int) []int {
	t.Helper()
	p, err := devconsul.FreePorts(n)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// answer is one request through the mesh.
type answer struct {
	start    time.Time
	status   int
	instance string
	via      string
	xfcc     string
	reason   string // x-meshlet-reason
	rule     string // x-meshlet-authz-rule
	err      error
}

var client = &http.Client{Timeout: 5 * time.Second}

func call(url string) answer {
	a := answer{start: time.Now()}
	resp, err := client.Get(url)
	if err != nil {
		a.err = err
		return a
	}
	defer resp.Body.Close()
	a.status = resp.StatusCode
	a.reason, a.rule = resp.Header.Get("X-Meshlet-Reason"), resp.Header.Get("X-Meshlet-Authz-Rule")
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		a.err = err
		return a
	}
	var body map[string]string
	if resp.StatusCode == http.StatusOK {
		if err := json.Unmarshal(b, &body); err != nil {
			a.err = fmt.Errorf("bad body %q: %w", b, err)
			return a
		}
		a.instance, a.via, a.xfcc = body["instance"], body["via"], body["xfcc"]
	} else {
		a.err = fmt.Errorf("%d %s (x-meshlet-reason %s)", resp.StatusCode, strings.TrimSpace(string(b)), resp.Header.Get("X-Meshlet-Reason"))
	}
	return a
}

// load sends requests to url back to back until stopped, recording each.
type load struct {
	mu      sync.Mutex
	answers []answer
	stop    chan struct{}
	done    chan struct{}
}

func startLoad(url string) *load {
	l := &load{stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(l.done)
		for {
			select {
			case <-l.stop:
				return
			default:
			}
			a := call(url)
			l.mu.Lock()
			l.answers = append(l.answers, a)
			l.mu.Unlock()
			time.Sleep(2 * time.Millisecond)
		}
	}()
	return l
}

func (l *load) finish() []answer {
	close(l.stop)
	<-l.done
	return l.snapshot()
}

func (l *load) snapshot() []answer {
	l.mu.Lock()
	defer l.mu.Unlock()
	return slices.Clone(l.answers)
}

// since returns the instances that answered requests started after t.
func since(as []answer, t time.Time) map[string]int {
	out := map[string]int{}
	for _, a := range as {
		if a.start.After(t) && a.err == nil {
			out[a.instance]++
		}
	}
	return out
}

func hostPort(port int) string { return "127.0.0.1:" + strconv.Itoa(port) }

// metricAt returns the sum of the samples of a metric whose labels include
// every label="value" pair given, from a sidecar's /metrics.
func metricAt(t *testing.T, admin, name string, labels ...string) float64 {
	t.Helper()
	resp, err := http.Get(admin + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	total := 0.0
	for line := range strings.Lines(string(b)) {
		if !strings.HasPrefix(line, name+"{") && !strings.HasPrefix(line, name+" ") {
			continue
		}
		ok := true
		for _, l := range labels {
			if !strings.Contains(line, l) {
				ok = false
			}
		}
		if ok {
			f := strings.Fields(line)
			v, _ := strconv.ParseFloat(f[len(f)-1], 64)
			total += v
		}
	}
	return total
}

func (p *proxy) metric(t *testing.T, name string, labels ...string) float64 {
	t.Helper()
	return metricAt(t, p.admin, name, labels...)
}
