//go:build faults

// The fault suite (make test-faults): each test breaks part of a running
// mesh on purpose under steady load and counts what the load generator's
// client saw. Every part is a process of its own (sidecars, control plane,
// apps, Consul), so a fault is a real signal (SIGKILL, SIGSTOP, SIGTERM).

package e2e

import (
	"bufio"
	"bytes"
	"context"
	"encoding/base64"
	"encoding/csv"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/textproto"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/meshlet/meshlet/internal/devproc"
	"github.com/meshlet/meshlet/internal/testutil"
)

// faultAppEnv, when set to "<id>@<host:port>", makes the test binary an
// app process (faultApp) instead of running tests.
const faultAppEnv = "MESHLET_E2E_FAULT_APP"

func init() {
	if spec := os.Getenv(faultAppEnv); spec != "" {
		id, addr, _ := strings.Cut(spec, "@")
		os.Exit(runFaultApp(id, addr))
	}
}

// runFaultApp serves what startApp's app does ({"instance": id} on every
// path) and, on /slow?ms=N, answers after N ms; on /stream?n=N, N chunks
// 100 ms apart. It runs until killed; SIGTERM closes its listener and
// lets requests in flight finish.
func runFaultApp(id, addr string) int {
	mux := http.NewServeMux()
	answer := func(w http.ResponseWriter) {
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(map[string]string{"instance": id})
	}
	mux.HandleFunc("/slow", func(w http.ResponseWriter, r *http.Request) {
		ms, _ := strconv.Atoi(r.URL.Query().Get("ms"))
		time.Sleep(time.Duration(ms) * time.Millisecond)
		answer(w)
	})
	mux.HandleFunc("/stream", func(w http.ResponseWriter, r *http.Request) {
		n, _ := strconv.Atoi(r.URL.Query().Get("n"))
		w.Header().Set("Content-Type", "text/plain")
		for i := range n {
			fmt.Fprintf(w, "chunk %d of %s\n", i, id)
			w.(http.Flusher).Flush()
			time.Sleep(100 * time.Millisecond)
		}
	})
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) { answer(w) })
	srv := &http.Server{Handler: mux}
	l, err := net.Listen("tcp", addr)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	go func() {
		sig := make(chan os.Signal, 1)
		signal.Notify(sig, syscall.SIGTERM)
		<-sig
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_ = srv.Shutdown(ctx)
	}()
	if err := srv.Serve(l); err != http.ErrServerClosed {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	return 0
}

// faultMesh is a mesh whose every part is a process: a real Consul agent,
// the control plane (bin/controlplane, one or more replicas), "web" (the
// caller; its app is the load generator) and "api" instances, each an app
// process and a sidecar process, with mTLS and intentions.
type faultMesh struct {
	*mesh
	t       *testing.T
	cps     []*cpProc
	web     *sidecarProcess
	webBind int // web's outbound listener for api
	webSvc  svc // web-1's registration
	apis    map[string]*apiInstance
	// readyChecks makes api sidecars' Consul checks HTTP checks of their
	// /ready (sidecarReadyURL), set before instances are added.
	readyChecks bool
	// webNoFile, when set, is web's sidecar's open-files limit
	// (RLIMIT_NOFILE, set with prlimit).
	webNoFile int
	// live are the api instances whose sidecar check passed once (what
	// heartbeat refreshes), guarded by mu.
	mu   sync.Mutex
	live []string
}

// cpProc is a control plane replica running as bin/controlplane.
type cpProc struct {
	p          *devproc.Process
	xds, admin string
	log        *os.File
}

// sidecarProcess is a sidecar running as bin/sidecar.
type sidecarProcess struct {
	p     *devproc.Process
	admin string // http://host:port
	log   string // its log file
}

// publicPort is the port of the sidecar's public listener, as registered
// for its instance in fm.
func (sp *sidecarProcess) publicPort(fm *faultMesh) int {
	for _, in := range fm.apis {
		if in.sidecar == sp {
			return in.svc.sidecarPort
		}
	}
	fm.t.Fatal("not an api sidecar")
	return 0
}

// logCount counts the lines of the sidecar's log holding substr.
func (sp *sidecarProcess) logCount(substr string) int {
	b, _ := os.ReadFile(sp.log)
	return strings.Count(string(b), substr)
}

// apiInstance is one instance of api: its app and sidecar processes.
type apiInstance struct {
	svc     svc
	app     *devproc.Process
	sidecar *sidecarProcess
}

// faultPolicies are the caller's resilience policies every fault test
// runs with: what README "Resilience" recommends for idempotent calls
// (retries on 5xx, connect failures and resets to another endpoint,
// outlier detection ejecting an endpoint after 3 consecutive failures,
// reviewed every second).
const faultPolicies = `apiVersion: meshlet.io/v1alpha1
kind: RetryPolicy
metadata: {name: api-retries}
spec:
  service: api
  retryOn: [5xx, connect-failure, reset]
  numRetries: 2
  perTryTimeout: 2s
  backoff: {baseInterval: 10ms, maxInterval: 100ms}
---
apiVersion: meshlet.io/v1alpha1
kind: OutlierDetectionPolicy
metadata: {name: api-outliers}
spec:
  service: api
  consecutive5xx: 3
  consecutiveLocalOriginFailures: 3
  interval: 1s
  baseEjectionTime: 30s
  maxEjectionPercent: 50
`

// newFaultMesh starts Consul, n control plane replicas and web's sidecar,
// and api instances api-1..apis, and waits until web's sidecar has every
// api instance as an endpoint.
func newFaultMesh(t *testing.T, replicas, apis int) *faultMesh {
	t.Helper()
	return newFaultMeshOn(t, newMesh(t), replicas, apis)
}

// newFaultMeshOn is newFaultMesh on mesh m (whose Consul agent the test
// started, e.g. a Cluster's client agent).
func newFaultMeshOn(t *testing.T, m *mesh, replicas, apis int) *faultMesh {
	t.Helper()
	return newFaultMeshWith(t, &faultMesh{mesh: m}, replicas, apis)
}

// newFaultMeshWith is newFaultMeshOn with fm's options (mesh,
// readyChecks) set.
func newFaultMeshWith(t *testing.T, fm *faultMesh, replicas, apis int) *faultMesh {
	t.Helper()
	fm.t, fm.apis = t, map[string]*apiInstance{}
	fm.writePolicy("services.yaml", serviceDefaults("api", "http")+"---\n"+serviceDefaults("web", "http"))
	fm.writePolicy("resilience.yaml", faultPolicies)
	for range replicas {
		fm.startCP("")
	}
	ports := freePorts(t, 2)
	fm.webBind = ports[1]
	fm.webSvc = svc{id: "web-1", name: "web", appPort: freePorts(t, 1)[0], sidecarPort: ports[0], upstreams: map[string]int{"api": fm.webBind}}
	fm.register(fm.webSvc)
	fm.allow("web", "api")
	for i := 1; i <= apis; i++ {
		fm.addAPI(fmt.Sprintf("api-%d", i))
	}
	fm.web = fm.startSidecar("web-1-sidecar-proxy", "")
	fm.waitAPIs()
	return fm
}

// xdsAddrs is what sidecars dial: every replica's ADS address.
func (fm *faultMesh) xdsAddrs() string {
	var as []string
	for _, cp := range fm.cps {
		as = append(as, cp.xds)
	}
	return strings.Join(as, ",")
}

// startCP starts a control plane replica serving ADS on xdsAddr (a free
// port when "") and waits until it serves; it is killed at cleanup.
func (fm *faultMesh) startCP(xdsAddr string) *cpProc {
	t := fm.t
	t.Helper()
	if fm.cpToken == "" {
		tok, err := fm.consul.ControlPlaneToken(context.Background(), false)
		if err != nil {
			t.Fatal(err)
		}
		fm.cpToken = tok
	}
	if xdsAddr == "" {
		xdsAddr = hostPort(freePorts(t, 1)[0])
	}
	cp := &cpProc{xds: xdsAddr, admin: hostPort(freePorts(t, 1)[0])}
	cp.log = devproc.TestLog(t, fmt.Sprintf("controlplane-%d.log", len(fm.cps)+1))
	args := []string{"-consul-addr", fm.consul.URL(), "-consul-token", fm.cpToken, "-xds-addr", cp.xds, "-xds-tls-dir", fm.tlsDir,
		"-policy-dir", fm.policyDir, "-admin-addr", cp.admin}
	if fm.consul.CAFile != "" {
		args = append(args, "-consul-ca-file", fm.consul.CAFile)
	}
	p, err := devproc.Start(devproc.Spec{Name: "controlplane", Path: builtBinary(t, "MESHLET_CONTROLPLANE_BIN", "controlplane/cmd/controlplane"),
		Args: args, Log: cp.log, StopGrace: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	cp.p = p
	t.Cleanup(p.Stop)
	if err := p.WaitReady(context.Background(), 20*time.Second, 0, func(ctx context.Context) error { return httpReady("http://" + cp.admin + "/ready") }); err != nil {
		t.Fatal(err)
	}
	for i, old := range fm.cps {
		if old.xds == xdsAddr {
			fm.cps[i] = cp
			return cp
		}
	}
	fm.cps = append(fm.cps, cp)
	return cp
}

// startSidecar runs node's sidecar process against every replica, its
// admin endpoint on admin (a free port when "").
func (fm *faultMesh) startSidecar(node, admin string) *sidecarProcess {
	t := fm.t
	t.Helper()
	creds := fm.credentials(node)
	if admin == "" {
		admin = hostPort(freePorts(t, 1)[0])
	}
	log := devproc.TestLog(t, node+".log")
	path, args := sidecarBinary(t), []string{"-node-id", node, "-xds-addr", fm.xdsAddrs(), "-xds-ca-file", creds.CAFile, "-token-file", creds.TokenFile,
		"-admin-addr", admin, "-drain-timeout", "5s"}
	if fm.webNoFile > 0 && strings.HasPrefix(node, "web-") {
		path, args = "prlimit", append([]string{fmt.Sprintf("--nofile=%d:%d", fm.webNoFile, fm.webNoFile), "--", path}, args...)
	}
	p, err := devproc.Start(devproc.Spec{Name: node, Path: path, Args: args, Log: log, StopGrace: 10 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Stop)
	sp := &sidecarProcess{p: p, admin: "http://" + admin, log: log.Name()}
	if err := p.WaitReady(context.Background(), 20*time.Second, 0, func(ctx context.Context) error { return httpReady(sp.admin + "/ready") }); err != nil {
		t.Fatal(err)
	}
	return sp
}

// addAPI registers api instance id in Consul and starts its app and
// sidecar.
func (fm *faultMesh) addAPI(id string) *apiInstance {
	fm.t.Helper()
	in := fm.addInstance("api", id)
	fm.apis[id] = in
	fm.mu.Lock()
	fm.live = append(fm.live, id)
	fm.mu.Unlock()
	return in
}

// addInstance registers instance id of service name in Consul and starts
// its app and sidecar.
func (fm *faultMesh) addInstance(name, id string) *apiInstance {
	t := fm.t
	t.Helper()
	ports := freePorts(t, 3)
	// The sidecar's check passes once it is ready, as a check of its
	// public listener would: callers must not be sent to it before.
	in := &apiInstance{svc: svc{id: id, name: name, appPort: ports[0], sidecarPort: ports[1], sidecarCritical: true}}
	if fm.readyChecks {
		in.svc.sidecarReadyURL = "http://" + hostPort(ports[2]) + "/ready"
	}
	in.app = startFaultApp(t, id, ports[0])
	fm.register(in.svc)
	in.sidecar = fm.startSidecar(in.svc.proxyID(), hostPort(ports[2]))
	if !fm.readyChecks {
		fm.setCheck(id+":sidecar", api.HealthPassing)
	}
	return in
}

// startFaultApp runs the test binary as app id on 127.0.0.1:port.
func startFaultApp(t *testing.T, id string, port int) *devproc.Process {
	t.Helper()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cmd := devproc.Spec{Name: id, Path: self, Log: devproc.TestLog(t, id+".log"), StopGrace: 10 * time.Second}
	p, err := startWithEnv(cmd, faultAppEnv+"="+id+"@"+hostPort(port))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Stop)
	if err := p.WaitReady(context.Background(), 10*time.Second, 0, func(context.Context) error {
		c, err := net.Dial("tcp", hostPort(port))
		if err == nil {
			c.Close()
		}
		return err
	}); err != nil {
		t.Fatal(err)
	}
	return p
}

// startWithEnv is devproc.Start with env added to this process's.
func startWithEnv(s devproc.Spec, env ...string) (*devproc.Process, error) {
	old := make(map[string]*string, len(env))
	envMu.Lock()
	defer envMu.Unlock()
	for _, kv := range env {
		k, v, _ := strings.Cut(kv, "=")
		if prev, ok := os.LookupEnv(k); ok {
			old[k] = &prev
		} else {
			old[k] = nil
		}
		os.Setenv(k, v)
	}
	defer func() {
		for k, v := range old {
			if v == nil {
				os.Unsetenv(k)
			} else {
				os.Setenv(k, *v)
			}
		}
	}()
	return devproc.Start(s)
}

var envMu sync.Mutex

// apiEndpoints returns the addresses of web's api endpoints with their
// health flags ("healthy", "/failed_outlier_check").
func (fm *faultMesh) apiEndpoints() map[string]string {
	resp, err := http.Get(fm.web.admin + "/clusters")
	if err != nil {
		return nil
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	out := map[string]string{}
	for line := range strings.Lines(string(b)) {
		rest, ok := strings.CutPrefix(strings.TrimSpace(line), "api::")
		if !ok {
			continue
		}
		if addr, flags, ok := strings.Cut(rest, "::health_flags::"); ok {
			out[addr] = flags
		}
	}
	return out
}

// activeRequests sums web's requests in flight to api (rq_active of
// every api endpoint in its /clusters).
func (fm *faultMesh) activeRequests() int { return fm.activeRequestsTo("api") }

// activeRequestsTo sums web's requests in flight to cluster.
func (fm *faultMesh) activeRequestsTo(cluster string) int {
	resp, err := http.Get(fm.web.admin + "/clusters")
	if err != nil {
		return 0
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	n := 0
	for line := range strings.Lines(string(b)) {
		line = strings.TrimSpace(line)
		if i := strings.Index(line, "::rq_active::"); strings.HasPrefix(line, cluster+"::") && i > 0 {
			v, _ := strconv.Atoi(line[i+len("::rq_active::"):])
			n += v
		}
	}
	return n
}

// waitAPIs waits until web's sidecar has exactly the sidecars of fm.apis
// as healthy api endpoints.
func (fm *faultMesh) waitAPIs() {
	fm.t.Helper()
	testutil.Eventually(fm.t, 20*time.Second, "web's sidecar having every api instance", fm.apisMatch)
}

// apisMatch says how web's api endpoints differ from the sidecars of
// fm.apis, all healthy; nil when they do not.
func (fm *faultMesh) apisMatch() error {
	var want []string
	for _, in := range fm.apis {
		want = append(want, hostPort(in.svc.sidecarPort))
	}
	slices.Sort(want)
	got := fm.apiEndpoints()
	var healthy []string
	for a, f := range got {
		if f == "healthy" {
			healthy = append(healthy, a)
		}
	}
	slices.Sort(healthy)
	if !slices.Equal(healthy, want) || len(got) != len(want) {
		return fmt.Errorf("healthy endpoints %v, want %v (all: %v)", healthy, want, got)
	}
	return nil
}

// took measures how long cond takes to hold from start, polling for at
// most timeout; it fails the test naming what.
func took(t *testing.T, start time.Time, timeout time.Duration, what string, cond func() bool) time.Duration {
	t.Helper()
	testutil.Until(t, timeout, what, cond)
	return time.Since(start)
}

func httpReady(url string) error {
	resp, err := http.Get(url)
	if err != nil {
		return err
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("%s: %s", url, resp.Status)
	}
	return nil
}

// builtBinary returns $env, else bin/<base of pkg> built once per test
// binary run into a temporary directory.
func builtBinary(t *testing.T, env, pkg string) string {
	t.Helper()
	if p := os.Getenv(env); p != "" {
		return p
	}
	builtMu.Lock()
	defer builtMu.Unlock()
	if p, ok := built[pkg]; ok {
		return p
	}
	dir, err := os.MkdirTemp("", "meshlet-e2e-bin-")
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, filepath.Base(pkg))
	if out, err := exec.Command("go", "build", "-o", path, "github.com/meshlet/meshlet/"+pkg).CombinedOutput(); err != nil {
		t.Fatalf("go build %s: %v\n%s", pkg, err, out)
	}
	built[pkg] = path
	return path
}

var (
	builtMu sync.Mutex
	built   = map[string]string{}
)

// hit is one request of a vegeta run.
type hit struct {
	at      time.Time
	code    int
	latency time.Duration
	err     string
	reason  string // x-meshlet-reason
}

// vegetaRun is a fixed-rate load (vegeta attack, open loop) running in the
// background.
type vegetaRun struct {
	rate  int
	cmd   *exec.Cmd
	start time.Time
	out   string
	done  chan error
	log   bytes.Buffer
}

// startVegeta sends GET url at rate requests a second for at most d, or
// until stop (vegeta's -timeout 5s a request, keep-alive connections).
func startVegeta(t *testing.T, url string, rate int, d time.Duration) *vegetaRun {
	t.Helper()
	bin := lookVegeta(t)
	v := &vegetaRun{rate: rate, out: filepath.Join(t.TempDir(), "vegeta.bin"), done: make(chan error, 1)}
	ctx, cancel := context.WithTimeout(context.Background(), d+30*time.Second)
	cmd := exec.CommandContext(ctx, bin, "attack", "-rate", fmt.Sprintf("%d/1s", rate), "-duration", d.String(),
		"-timeout", "5s", "-max-workers", "200", "-output", v.out)
	cmd.Stdin = strings.NewReader("GET " + url + "\n")
	cmd.Stdout, cmd.Stderr = &v.log, &v.log
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		cancel()
		t.Fatal(err)
	}
	v.start, v.cmd = time.Now(), cmd
	go func() { v.done <- cmd.Wait(); cancel() }()
	return v
}

// stop ends the run (SIGINT: vegeta stops sending and writes what it
// has) and returns every request's result.
func (v *vegetaRun) stop(t *testing.T) []hit {
	t.Helper()
	_ = v.cmd.Process.Signal(os.Interrupt)
	return v.wait(t)
}

// wait waits for the run's end and returns every request's result.
func (v *vegetaRun) wait(t *testing.T) []hit {
	t.Helper()
	if err := <-v.done; err != nil {
		t.Fatalf("vegeta attack: %v\n%s", err, v.log.String())
	}
	out, err := exec.Command(lookVegeta(t), "encode", "-to", "csv", v.out).Output()
	if err != nil {
		t.Fatalf("vegeta encode: %v", err)
	}
	cr := csv.NewReader(bytes.NewReader(out))
	cr.FieldsPerRecord = -1
	var hits []hit
	for {
		rec, err := cr.Read()
		if err == io.EOF {
			break
		}
		if err != nil || len(rec) < 6 {
			t.Fatalf("vegeta csv: %v %q", err, rec)
		}
		ns, _ := strconv.ParseInt(rec[0], 10, 64)
		code, _ := strconv.Atoi(rec[1])
		lat, _ := strconv.ParseInt(rec[2], 10, 64)
		h := hit{at: time.Unix(0, ns), code: code, latency: time.Duration(lat), err: rec[5]}
		if len(rec) >= 12 { // the response's headers, base64 of their wire form
			if b, err := base64.StdEncoding.DecodeString(rec[11]); err == nil {
				if m, err := textproto.NewReader(bufio.NewReader(bytes.NewReader(b))).ReadMIMEHeader(); err == nil || len(m) > 0 {
					h.reason = m.Get("X-Meshlet-Reason")
				}
			}
		}
		hits = append(hits, h)
	}
	if len(hits) == 0 {
		t.Fatal("vegeta sent no request")
	}
	return hits
}

// failed returns the requests that did not get a 2xx answer.
func failed(hits []hit) []hit {
	var out []hit
	for _, h := range hits {
		if h.code < 200 || h.code > 299 || h.err != "" {
			out = append(out, h)
		}
	}
	return out
}

// lookVegeta finds vegeta: $MESHLET_VEGETA_BIN, bin/vegeta of the
// repository (make bin/vegeta), else PATH.
func lookVegeta(t *testing.T) string {
	t.Helper()
	if p := os.Getenv("MESHLET_VEGETA_BIN"); p != "" {
		return p
	}
	if p, err := filepath.Abs("../../bin/vegeta"); err == nil {
		if _, err := os.Stat(p); err == nil {
			return p
		}
	}
	return lookTool(t, "vegeta", "make bin/vegeta")
}

// faultReport is one line of the fault table (README "Reliability"),
// logged as "FAULT | fault | req/s | sent | lost | recovery".
func faultReport(t *testing.T, fault string, rate int, hits []hit, recovery string) {
	t.Helper()
	bad := failed(hits)
	t.Logf("FAULT | %s | %d | %d | %d | %s", fault, rate, len(hits), len(bad), recovery)
	if len(bad) > 0 {
		var sample []string
		for _, h := range bad[:min(len(bad), 10)] {
			sample = append(sample, fmt.Sprintf("%s: %d %s (x-meshlet-reason %q)", h.at.Format("15:04:05.000"), h.code, h.err, h.reason))
		}
		t.Errorf("%s: %d of %d requests failed, e.g.:\n%s", fault, len(bad), len(hits), strings.Join(sample, "\n"))
	}
}

// cpStatus is what a replica's /status says of the proxies it knows.
type cpStatus struct {
	Proxies []struct {
		Node      string            `json:"node"`
		Connected bool              `json:"connected"`
		ACKed     map[string]string `json:"acked"`
	} `json:"proxies"`
}

// connected returns the nodes with a stream to cp now.
func (cp *cpProc) connected() []string {
	resp, err := http.Get("http://" + cp.admin + "/status")
	if err != nil {
		return nil
	}
	defer resp.Body.Close()
	var st cpStatus
	if json.NewDecoder(resp.Body).Decode(&st) != nil {
		return nil
	}
	var out []string
	for _, p := range st.Proxies {
		if p.Connected {
			out = append(out, p.Node)
		}
	}
	slices.Sort(out)
	return out
}

// nodes returns every sidecar's node ID, sorted.
func (fm *faultMesh) nodes() []string {
	out := []string{"web-1-sidecar-proxy"}
	for _, in := range fm.apis {
		if in.sidecar.p.State() == nil {
			out = append(out, in.svc.proxyID())
		}
	}
	slices.Sort(out)
	return out
}

// xdsState is a sidecar's ADS state (/config_dump's "xds").
func (sp *sidecarProcess) xdsState() (connected bool, acks uint64, versions map[string]string) {
	resp, err := http.Get(sp.admin + "/config_dump")
	if err != nil {
		return false, 0, nil
	}
	defer resp.Body.Close()
	var d struct {
		XDS struct {
			Connected bool              `json:"connected"`
			ACKs      uint64            `json:"acks"`
			Versions  map[string]string `json:"versions"`
		} `json:"xds"`
	}
	if json.NewDecoder(resp.Body).Decode(&d) != nil {
		return false, 0, nil
	}
	return d.XDS.Connected, d.XDS.ACKs, d.XDS.Versions
}

// heartbeat updates the TTL checks (app and sidecar) of web and of every
// api instance added so far to passing every interval until the test
// ends, as a service refreshing its TTL check does: after a Consul agent
// restart, which restores TTL checks as critical, the next beat passes
// them again.
func (fm *faultMesh) heartbeat(interval time.Duration) {
	stop, done := make(chan struct{}), make(chan struct{})
	fm.t.Cleanup(func() { close(stop); <-done })
	go func() {
		defer close(done)
		tick := time.NewTicker(interval)
		defer tick.Stop()
		for {
			select {
			case <-stop:
				return
			case <-tick.C:
			}
			fm.mu.Lock()
			ids := slices.Clone(fm.live)
			fm.mu.Unlock()
			for _, id := range append(ids, "web-1") {
				for _, check := range []string{id + ":app", id + ":sidecar"} {
					_ = fm.consul.Client.Agent().UpdateTTL(check, "heartbeat", api.HealthPassing)
				}
			}
		}
	}()
}

// deregister removes instance id (and its sidecar registration) from
// Consul, as an orchestrator does before stopping it.
func (fm *faultMesh) deregister(id string) {
	fm.t.Helper()
	for _, sid := range []string{id + "-sidecar-proxy", id} {
		if err := fm.consul.Client.Agent().ServiceDeregister(sid); err != nil {
			fm.t.Fatal(err)
		}
	}
}
