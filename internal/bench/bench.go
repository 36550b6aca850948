// Package bench is meshlet's side-by-side proxy benchmark (`make bench`):
// the same workloads, on loopback, against the app directly, one meshlet
// sidecar, two meshlet sidecars with mTLS, HAProxy and nginx, each proxy
// pinned to one CPU (taskset, GOMAXPROCS=1 for Go) and the load generator and
// apps to the other. Systems alternate within every round (A B C A B C ...)
// so drift on a shared machine hits all alike; the report gives medians of
// the rounds and every figure as a ratio to HAProxy and to direct.
//
// The sidecars are bin/sidecar processes configured over xDS by a real
// go-control-plane server in the harness (xds/xdstest), serving what the
// control plane's translator (controlplane/translate) makes of a small
// catalog: the listeners, routes, clusters (default resilience policies
// included), RBAC and SDS secrets (internal/testca certificates) a
// Consul-fed mesh gets.
package bench

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"time"
)

// Tools are the paths of the programs the harness runs.
type Tools struct {
	Sidecar, Self                           string // bin/sidecar; the harness itself (gRPC app)
	Wrk, Vegeta, Ghz, RedisBenchmark, Redis string
	HAProxy, Nginx                          string
}

// Config shapes a benchmark run.
type Config struct {
	Tools Tools
	// Rounds of every workload, each running every system once (≥ 1;
	// medians need 3).
	Rounds int
	// Duration of each measured run, after Warmup of the same load.
	Duration, Warmup time.Duration
	// ProxyCPU runs the proxies under test; LoadCPU the load generators,
	// the apps and the harness.
	ProxyCPU, LoadCPU int
	// Connections of the closed- and open-loop HTTP workloads.
	Connections int
	// OpenLoop is the open-loop generator: OpenLoopBuiltin (default) or
	// OpenLoopVegeta (to cross-check the built-in one at rates vegeta
	// sustains on one CPU).
	OpenLoop string
	// Workloads and Systems restrict the run (nil: all).
	Workloads, Systems []string
	// QuietWait is how long a run may wait for the proxy CPU to be nearly
	// idle (other users of a shared machine) before it starts.
	QuietWait time.Duration
	// PprofDir, when set, receives a CPU profile of the single sidecar
	// (and of the pair's sidecars) for each workload's first round.
	PprofDir string
	// WorkDir holds configs, logs and results of each run.
	WorkDir string
	// Out receives the tables; Progress a line per run.
	Out, Progress io.Writer
	// Quick marks a smoke run in the report.
	Quick bool
}

// Open-loop generators.
const (
	OpenLoopBuiltin = "builtin"
	OpenLoopVegeta  = "vegeta"
)

// Validate checks c.
func (c *Config) Validate() error {
	var errs []error
	if c.Rounds < 1 {
		errs = append(errs, errors.New("rounds must be ≥ 1"))
	}
	if c.Duration < 500*time.Millisecond {
		errs = append(errs, errors.New("duration must be ≥ 500ms"))
	}
	if c.ProxyCPU == c.LoadCPU {
		errs = append(errs, errors.New("proxy and load CPUs must differ"))
	}
	if c.OpenLoop != "" && c.OpenLoop != OpenLoopBuiltin && c.OpenLoop != OpenLoopVegeta {
		errs = append(errs, fmt.Errorf("open-loop generator %q: want builtin or vegeta", c.OpenLoop))
	}
	if c.OpenLoop == OpenLoopVegeta && c.Tools.Vegeta == "" {
		errs = append(errs, errors.New("open-loop generator vegeta: no vegeta binary"))
	}
	if c.Connections < 1 {
		errs = append(errs, errors.New("connections must be ≥ 1"))
	}
	for _, w := range c.Workloads {
		if workloadByName(w) == nil {
			errs = append(errs, fmt.Errorf("unknown workload %q", w))
		}
	}
	for _, s := range c.Systems {
		if _, ok := systemTitles[s]; !ok {
			errs = append(errs, fmt.Errorf("unknown system %q", s))
		}
	}
	if c.WorkDir == "" || c.Out == nil || c.Progress == nil {
		errs = append(errs, errors.New("WorkDir, Out and Progress are required"))
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("bench: config: %w", err)
	}
	return nil
}

// noisyLoad is the share of the proxy CPU other processes may use during a
// run before it is run again (once).
const noisyLoad = 0.25

// workload is one kind of load, run against each of its systems.
type workload struct {
	Name    string
	Title   string
	kind    kind
	systems []string
	// rate returns the open-loop rate (0: closed loop) given the results so
	// far.
	rate func(prev []Summary) (int, error)
	// longer multiplies the run's duration (low rates need it for their
	// tail percentiles); 0 means 1.
	longer int
	// run measures one run against target for d.
	run func(ctx context.Context, h *harness, w *workload, target hostPort, d time.Duration, rate int) (loadResult, error)
}

var allHTTP = []string{sysDirect, sysSidecar, sysPairMTLS, sysHAProxy, sysNginx}

// workloads in the order they run: the open-loop rates come from HAProxy's
// closed-loop maximum.
var workloads = []*workload{
	{Name: "http-max", Title: "HTTP/1.1 keep-alive, 1 KiB responses, closed loop, 32 connections (wrk): max req/s", kind: kindHTTP, systems: allHTTP, run: runHTTPClosed},
	{Name: "http-25pct", Title: "HTTP/1.1 keep-alive, open loop at 25% of HAProxy's max req/s (latency from each request's due time, 32 connections)", kind: kindHTTP, systems: allHTTP, rate: fractionOfHAProxy(0.25), run: runHTTPOpen},
	{Name: "http-50pct", Title: "HTTP/1.1 keep-alive, open loop at 50% of HAProxy's max req/s (latency from each request's due time, 32 connections)", kind: kindHTTP, systems: allHTTP, rate: fractionOfHAProxy(0.50), run: runHTTPOpen},
	{Name: "http-1k", Title: "HTTP/1.1 keep-alive, open loop at 1,000 req/s (latency from each request's due time, 32 connections)", kind: kindHTTP, systems: allHTTP, rate: func([]Summary) (int, error) { return 1000, nil }, longer: 2, run: runHTTPOpen},
	{Name: "grpc-unary", Title: "gRPC unary, 1 KiB responses, closed loop, 32 concurrent calls on 4 connections (ghz)", kind: kindGRPC, systems: allHTTP, run: runGRPC},
	{Name: "tcp-redis", Title: "opaque TCP: redis-benchmark GET of a 1 KiB value, 32 connections", kind: kindRedis, systems: allHTTP, run: runRedis},
	{Name: "conn-per-req", Title: "HTTP/1.1 over opaque TCP, one connection per request (wrk, Connection: close, 32 connections): between two sidecars one mTLS handshake per request (resumed: the client sidecar caches sessions)", kind: kindConn,
		systems: []string{sysDirect, sysSidecar, sysPairPlain, sysPairMTLS, sysHAProxy, sysNginx}, run: runConnPerRequest},
	{Name: "mtls-handshake", Title: "full mTLS handshakes (TLS 1.3, ECDSA P-256, X25519, client certificate required, no resumption) terminated by the proxy, one request per connection, 16 clients in the harness", kind: kindTLS,
		systems: []string{sysSidecar, sysHAProxy, sysNginx}, run: runTLSHandshakes},
}

func workloadByName(name string) *workload {
	for _, w := range workloads {
		if w.Name == name {
			return w
		}
	}
	return nil
}

func fractionOfHAProxy(f float64) func([]Summary) (int, error) {
	return func(prev []Summary) (int, error) {
		for _, s := range prev {
			if s.Workload == "http-max" && s.System == sysHAProxy && s.RPS.Value.ok() {
				return max(100, int(math.Round(float64(s.RPS.Value)*f/100)*100)), nil
			}
		}
		return 0, errors.New("bench: the open-loop rates need HAProxy's http-max result (run http-max with haproxy)")
	}
}

func runHTTPClosed(ctx context.Context, h *harness, w *workload, target hostPort, d time.Duration, _ int) (loadResult, error) {
	return runWrk(ctx, h.cfg.Tools.Wrk, wrkOptions{URL: "http://" + target.String() + "/", Connections: h.cfg.Connections, Duration: d, Script: h.wrkScript, CPU: h.cfg.LoadCPU})
}

func runConnPerRequest(ctx context.Context, h *harness, w *workload, target hostPort, d time.Duration, _ int) (loadResult, error) {
	return runWrk(ctx, h.cfg.Tools.Wrk, wrkOptions{URL: "http://" + target.String() + "/", Connections: h.cfg.Connections, Duration: d, CloseEach: true, Script: h.wrkScript, CPU: h.cfg.LoadCPU})
}

func runHTTPOpen(ctx context.Context, h *harness, w *workload, target hostPort, d time.Duration, rate int) (loadResult, error) {
	if h.cfg.OpenLoop != OpenLoopVegeta {
		return runOpenLoop(ctx, openLoopOptions{Addr: target.String(), Rate: rate, Duration: d, Connections: h.cfg.Connections})
	}
	return runVegeta(ctx, h.cfg.Tools.Vegeta, vegetaOptions{URL: "http://" + target.String() + "/", Rate: rate, Duration: d, Connections: h.cfg.Connections, Dir: h.cfg.WorkDir, CPU: h.cfg.LoadCPU})
}

func runGRPC(ctx context.Context, h *harness, w *workload, target hostPort, d time.Duration, _ int) (loadResult, error) {
	return runGhz(ctx, h.cfg.Tools.Ghz, ghzOptions{Addr: target.String(), Concurrency: h.cfg.Connections, Connections: 4, Duration: d, CPU: h.cfg.LoadCPU})
}

// runRedis sizes redis-benchmark's request count (it has no duration) from
// a short first run, so each run lasts about d.
func runRedis(ctx context.Context, h *harness, w *workload, target hostPort, d time.Duration, _ int) (loadResult, error) {
	o := redisOptions{Host: target.host, Port: target.port, Connections: h.cfg.Connections, Requests: 5000, CPU: h.cfg.LoadCPU}
	probe, err := runRedisBenchmark(ctx, h.cfg.Tools.RedisBenchmark, o)
	if err != nil {
		return probe, err
	}
	o.Requests = max(5000, int(probe.rps()*d.Seconds()))
	return runRedisBenchmark(ctx, h.cfg.Tools.RedisBenchmark, o)
}

func runTLSHandshakes(ctx context.Context, h *harness, w *workload, target hostPort, d time.Duration, _ int) (loadResult, error) {
	o := h.tlsClient(target)
	o.Concurrency, o.Duration = 16, d
	return runTLSClient(ctx, o)
}

// harness is one benchmark run's state.
type harness struct {
	cfg        Config
	apps       map[kind]hostPort
	appProcs   []*proc
	mesh       *mesh
	adminAddr  map[string]string // by sidecar node
	proxyPorts map[string]int    // HAProxy's and nginx's listener
	tlsFiles   tlsPaths
	wrkScript  string
	ports      portAlloc
}

// Run runs the benchmark and returns its report, which it also prints to
// cfg.Out.
func Run(ctx context.Context, cfg Config) (*Report, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	h := &harness{cfg: cfg, apps: map[kind]hostPort{}, adminAddr: map[string]string{}, proxyPorts: map[string]int{}}
	defer h.close()
	if err := h.setup(ctx); err != nil {
		return nil, err
	}
	rep := newReport(cfg)
	for _, w := range workloads {
		if len(cfg.Workloads) > 0 && !slices.Contains(cfg.Workloads, w.Name) {
			continue
		}
		systems := h.systemsOf(w)
		if len(systems) == 0 {
			continue
		}
		rate := 0
		if w.rate != nil {
			var err error
			if rate, err = w.rate(rep.Summaries); err != nil {
				fmt.Fprintf(cfg.Progress, "skipping %s: %v\n", w.Name, err)
				continue
			}
		}
		var runs []RunResult
		for round := 1; round <= cfg.Rounds; round++ {
			for _, sys := range systems {
				if ctx.Err() != nil {
					return nil, ctx.Err()
				}
				r := h.runOne(ctx, w, sys, round, rate)
				if r.Error == "" && r.OtherLoad > noisyLoad {
					// Another user of the machine took much of the proxy's
					// CPU: run again once, keep the quieter run.
					fmt.Fprintln(cfg.Progress, r.progressLine()+"  → noisy, running again")
					r2 := h.runOne(ctx, w, sys, round, rate)
					r2.Reruns = 1
					if r2.Error == "" && r2.OtherLoad < r.OtherLoad {
						r = r2
					} else {
						r.Reruns = 1
					}
				}
				fmt.Fprintln(cfg.Progress, r.progressLine())
				runs = append(runs, r)
			}
		}
		rep.add(w, systems, rate, runs)
	}
	rep.finish()
	return rep, nil
}

func (h *harness) systemsOf(w *workload) []string {
	var out []string
	for _, s := range w.systems {
		if len(h.cfg.Systems) == 0 || slices.Contains(h.cfg.Systems, s) {
			out = append(out, s)
		}
	}
	return out
}

// setup starts the apps and the xDS server.
func (h *harness) setup(ctx context.Context) error {
	ports, err := h.ports.take(8)
	if err != nil {
		return err
	}
	h.apps[kindHTTP], h.apps[kindGRPC], h.apps[kindRedis] = loopback(ports[0]), loopback(ports[1]), loopback(ports[2])
	// One connection per request, and mTLS terminated by the proxy, end at
	// the HTTP app too.
	h.apps[kindConn], h.apps[kindTLS] = h.apps[kindHTTP], h.apps[kindHTTP]
	h.proxyPorts[sysHAProxy], h.proxyPorts[sysNginx] = ports[3], ports[4]

	dir := filepath.Join(h.cfg.WorkDir, "apps")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	h.wrkScript = filepath.Join(h.cfg.WorkDir, "summary.lua")
	if err := os.WriteFile(h.wrkScript, []byte(wrkScript), 0o644); err != nil {
		return err
	}
	// The apps, on the load generator's CPU.
	conf := filepath.Join(dir, "app-nginx.conf")
	if err := os.WriteFile(conf, []byte(appNginxConf(dir, ports[0])), 0o644); err != nil {
		return err
	}
	for _, s := range []procSpec{
		{name: "app-nginx", bin: h.cfg.Tools.Nginx, args: []string{"-e", "stderr", "-p", dir, "-c", conf}},
		{name: "app-grpc", bin: h.cfg.Tools.Self, args: []string{"-grpc-app", h.apps[kindGRPC].String()}, env: []string{"GOMAXPROCS=1"}},
		{name: "app-redis", bin: h.cfg.Tools.Redis, args: []string{"--port", strconv.Itoa(ports[2]), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--protected-mode", "no"}},
	} {
		s.cpu, s.dir = h.cfg.LoadCPU, dir
		p, err := startProc(s)
		if err != nil {
			return err
		}
		h.appProcs = append(h.appProcs, p)
	}
	for i, k := range []kind{kindHTTP, kindGRPC, kindRedis} {
		if err := waitListening(ctx, h.apps[k].String(), 15*time.Second, h.appProcs[i]); err != nil {
			return err
		}
	}
	if err := seedRedis(h.apps[kindRedis]); err != nil {
		return err
	}

	// The mesh: xDS server and snapshots for every sidecar.
	h.mesh, err = startMesh(h.apps, h.ports.take)
	if err != nil {
		return err
	}
	nodes := []string{nodeSingle, nodePairDown, nodePlainDown}
	for _, s := range meshServices {
		nodes = append(nodes, nodePairUp(s.name), nodePlainUp(s.name))
	}
	admin, err := h.ports.take(len(nodes))
	if err != nil {
		return err
	}
	for i, n := range nodes {
		h.adminAddr[n] = loopback(admin[i]).String()
	}
	h.tlsFiles, err = writeTLSFiles(h.cfg.WorkDir, h.mesh)
	return err
}

// seedRedis stores the 1 KiB value redis-benchmark's GET reads.
func seedRedis(addr hostPort) error {
	c, err := net.DialTimeout("tcp", addr.String(), 5*time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	val := make([]byte, bodySize)
	for i := range val {
		val[i] = 'x'
	}
	cmd := fmt.Sprintf("*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n", len(redisKey), redisKey, len(val), val)
	if _, err := io.WriteString(c, cmd); err != nil {
		return err
	}
	buf := make([]byte, 5)
	if _, err := io.ReadFull(c, buf); err != nil || string(buf) != "+OK\r\n" {
		return fmt.Errorf("bench: seeding redis: %q %v", buf, err)
	}
	return nil
}

func (h *harness) close() {
	if h.mesh != nil {
		h.mesh.close()
	}
	for _, p := range h.appProcs {
		p.stop(5 * time.Second)
	}
}

// runOne runs workload w against sys once: start the system, warm it up,
// measure, stop it.
func (h *harness) runOne(ctx context.Context, w *workload, sys string, round, rate int) (res RunResult) {
	res = RunResult{Workload: w.Name, System: sys, Round: round, Rate: rate}
	began := time.Now()
	defer func() { res.Took = time.Since(began).Round(100 * time.Millisecond) }()
	res.QuietWait = waitQuiet(ctx, h.cfg.ProxyCPU, h.cfg.QuietWait)
	dir := filepath.Join(h.cfg.WorkDir, fmt.Sprintf("%s-%s-r%d", w.Name, sys, round))
	if err := os.MkdirAll(dir, 0o755); err != nil {
		res.Error = err.Error()
		return res
	}
	r, err := h.startSystem(ctx, sys, w.kind, dir)
	if err != nil {
		res.Error = err.Error()
		return res
	}
	defer r.stop()
	if h.cfg.Warmup > 0 {
		if _, err := w.run(ctx, h, w, r.target, h.cfg.Warmup, rate); err != nil {
			res.Error = "warm-up: " + err.Error()
			return res
		}
	}
	var profDone chan error
	if h.cfg.PprofDir != "" && round == 1 && sys != sysDirect && sys != sysHAProxy && sys != sysNginx {
		profDone = h.profile(ctx, r, w.Name, sys)
	}
	d := h.cfg.Duration * time.Duration(max(1, w.longer))
	meter := startUsage(r.procs, h.cfg.ProxyCPU)
	lr, err := w.run(ctx, h, w, r.target, d, rate)
	usage, other := meter.stop()
	if profDone != nil {
		if perr := <-profDone; perr != nil {
			fmt.Fprintf(h.cfg.Progress, "  profile %s/%s: %v\n", w.Name, sys, perr)
		}
	}
	for _, p := range r.procs {
		if e := p.exited(); e != nil && err == nil {
			err = e
		}
	}
	if err != nil {
		res.Error = err.Error()
		return res
	}
	res.fill(lr, usage, other)
	return res
}

// Listener ports come from below Linux's default ephemeral range
// (32768-60999): the workloads open and close tens of thousands of
// connections, whose local ports would otherwise collide with a port
// picked with ":0" and released before its listener binds it.
const (
	portLow  = 20000
	portHigh = 32000
)

// portAlloc hands out loopback ports that are free now, from below the
// ephemeral range.
type portAlloc struct {
	mu   sync.Mutex // guards next
	next int        // next candidate; 0: not started
}

// take returns n distinct loopback ports that are free now.
func (a *portAlloc) take(n int) ([]int, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.next == 0 {
		a.next = portLow + rand.IntN(portHigh-portLow)
	}
	out := make([]int, 0, n)
	for tries := 0; len(out) < n; tries++ {
		if tries > portHigh-portLow {
			return nil, fmt.Errorf("bench: no free port between %d and %d", portLow, portHigh)
		}
		p := a.next
		a.next++
		if a.next >= portHigh {
			a.next = portLow
		}
		l, err := net.Listen("tcp", loopback(p).String())
		if err != nil {
			continue
		}
		l.Close()
		out = append(out, p)
	}
	return out, nil
}

// waitQuiet waits, up to limit, until other processes use less than a
// quarter of cpu, and returns how long it waited.
func waitQuiet(ctx context.Context, cpu int, limit time.Duration) time.Duration {
	start := time.Now()
	for time.Since(start) < limit && ctx.Err() == nil {
		b0, t0, err := coreTicks(cpu)
		if err != nil {
			break
		}
		time.Sleep(250 * time.Millisecond)
		b1, t1, err := coreTicks(cpu)
		if err != nil || t1 == t0 || float64(b1-b0)/float64(t1-t0) < 0.25 {
			break
		}
	}
	return time.Since(start).Round(time.Millisecond)
}
