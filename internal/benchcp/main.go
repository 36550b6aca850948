// Command benchcp is meshlet's control-plane scale benchmark (`make
// bench-cp`). It starts a Consul dev agent (ACLs on, default deny) and
// registers a mesh through the catalog API (by default 1,000 services of 10
// instances each, every instance with a passing check, and 1,000
// connect-proxy sidecars with 3 to 5 upstreams each), makes a Consul ACL
// token per meshed service (its service identity) in a file, starts the
// real control plane (bin/controlplane, its own process, ADS over TLS with
// a self-issued certificate and a token required on every stream),
// connects one simulated sidecar per registered proxy (real ADS clients,
// sidecar/xdsclient, in this process, each presenting its service's token
// and verifying the control plane's CA), all at once, waits until every
// one has a whole config, then writes a stream of endpoint changes to
// Consul at a fixed rate: flipping the check of an instance with a
// sidecar, of one without, and adding or removing an instance with a
// sidecar. For every
// change it records when each affected sidecar (one with that service
// upstream) receives the load assignment that contains it, and it
// classifies every response received during the changes as affected or
// not. It prints a table and writes a JSON file: latency from the Consul
// write to the last affected sidecar (p50/p90/p99/max), pushes to affected
// and unaffected sidecars, the control plane's peak RSS and CPU-seconds, and
// the time to the initial sync of every sidecar.
//
// Then, on the same control plane, a reconnect storm: every simulated
// sidecar stops, and all start again at once; it times their re-sync and
// counts the token reviews the control plane asked of Consul meanwhile
// (meshlet_controlplane_xds_auth_lookups_total), failing the run when they
// exceed one per distinct token (within the review cache's TTL none is
// expected). Last, the unauthenticated comparison: a fresh control plane
// with -xds-insecure on the same Consul, every sidecar connecting in
// plaintext at once, the same initial sync measured; the table gives the
// authenticated run's time and CPU as ratios to it. Before the first
// control plane starts, the agent signs every leaf certificate
// (-warm-leaves), so neither sync is paced by the Connect CA's rate limit
// and both find the agent in the same state.
package main

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/meshlet/meshlet/controlplane/xdsauth"
	"github.com/meshlet/meshlet/internal/devconsul"
	"github.com/meshlet/meshlet/sidecar/xdsclient"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintf(os.Stderr, "bench-cp: %v\n", err)
		os.Exit(1)
	}
}

type options struct {
	consulBin, cpBin, out string
	topo                  topologyConfig
	changes               int
	rate                  float64
	mix                   string
	workers               int
	consulMaxConns        int
	csrMaxPerSecond       float64
	syncTimeout           time.Duration
	changeTimeout         time.Duration
	profile               bool
	profileSync           time.Duration
	cpFlags               string
	insecure              bool
	storm                 bool
	compareInsecure       bool
	warmLeaves            bool
}

func parseFlags() (*options, error) {
	o := &options{}
	fs := flag.NewFlagSet("bench-cp", flag.ContinueOnError)
	fs.StringVar(&o.consulBin, "consul", "bin/consul", "consul binary (make consul)")
	fs.StringVar(&o.cpBin, "controlplane", "bin/controlplane", "controlplane binary (make build)")
	fs.StringVar(&o.out, "out", ".work/bench-cp", "directory for the JSON result, logs and profiles")
	fs.IntVar(&o.topo.Services, "services", 1000, "services registered")
	fs.IntVar(&o.topo.Instances, "instances", 10, "instances per service")
	fs.IntVar(&o.topo.Sidecars, "sidecars", 1000, "connect-proxy sidecars registered, each a simulated ADS client")
	fs.IntVar(&o.topo.Meshed, "meshed", 1000, "services with sidecars (the first ones); sidecars are spread evenly over them")
	fs.IntVar(&o.topo.Nodes, "nodes", 100, "Consul nodes the instances are spread over")
	fs.IntVar(&o.topo.UpstreamsMin, "upstreams-min", 3, "fewest upstreams per sidecar")
	fs.IntVar(&o.topo.UpstreamsMax, "upstreams-max", 5, "most upstreams per sidecar")
	fs.IntVar(&o.topo.Hot, "hot", 10, "popular services: every sidecar's first upstream is one of them (0: all uniform)")
	fs.Float64Var(&o.topo.HTTPFraction, "http-fraction", 0.5, "share of services declaring protocol http (the others are tcp)")
	seed := fs.Uint64("seed", 1, "random seed of the topology and the change stream")
	fs.IntVar(&o.changes, "changes", 300, "endpoint changes written")
	fs.Float64Var(&o.rate, "rate", 10, "endpoint changes per second")
	fs.StringVar(&o.mix, "mix", "50,25,25", "percent of changes: sidecar instance health, plain instance health, scale out/in")
	fs.IntVar(&o.workers, "workers", 16, "concurrent catalog writes while registering")
	fs.IntVar(&o.consulMaxConns, "consul-max-conns", 4096, "Consul limits.http_max_conns_per_client: the control plane holds one blocking query (one connection) per Consul service name and per proxied service's leaf, 3,003 with the defaults, and, authenticated, one more per token review in flight (up to one per sidecar connecting with a token it has not reviewed yet); 0 keeps Consul's default of 200")
	fs.Float64Var(&o.csrMaxPerSecond, "csr-max-per-second", -1, "Connect CA csr_max_per_second (-1: Consul's default, 50; 0: unlimited)")
	fs.DurationVar(&o.syncTimeout, "sync-timeout", 4*time.Minute, "longest wait for every sidecar's first whole config")
	fs.DurationVar(&o.changeTimeout, "change-timeout", 10*time.Second, "longest wait for a change at its sidecars (later: missed)")
	fs.BoolVar(&o.profile, "profile", false, "save a CPU profile of the control plane during the changes and a heap profile after them in -out")
	fs.DurationVar(&o.profileSync, "profile-sync", 0, "save a CPU profile of the control plane's first seconds (initial sync) in -out; the changes wait for it")
	fs.StringVar(&o.cpFlags, "controlplane-flags", "", "extra flags for controlplane serve, space separated")
	fs.BoolVar(&o.insecure, "insecure", false, "run every phase against a control plane with -xds-insecure (plaintext, no tokens: the benchmark before issue 18); no comparison")
	fs.BoolVar(&o.storm, "storm", true, "after the changes, stop every simulated sidecar and start them all again at once (reconnect storm): time to all served again, CPU, token reviews asked of Consul")
	fs.BoolVar(&o.compareInsecure, "compare-insecure", true, "after the authenticated phases, start a fresh control plane with -xds-insecure on the same Consul and time the same initial sync with plaintext sidecars (ratios authenticated ÷ insecure)")
	fs.BoolVar(&o.warmLeaves, "warm-leaves", true, "before the first control plane starts, have the agent sign every meshed service's leaf certificate (not timed), so no measured sync is paced by the Connect CA's csr_max_per_second and the insecure comparison, which would find them signed, compares like with like")
	if err := fs.Parse(os.Args[1:]); err != nil {
		return nil, err
	}
	for _, f := range strings.Fields(o.cpFlags) {
		if name, _, _ := strings.Cut(strings.TrimLeft(f, "-"), "="); name == "xds-insecure" || name == "xds-tls-dir" {
			return nil, fmt.Errorf("-controlplane-flags %s: the benchmark sets it (-insecure runs every phase with -xds-insecure)", f)
		}
	}
	o.topo.Seed = *seed
	if err := o.topo.validate(); err != nil {
		return nil, err
	}
	if o.rate <= 0 || o.changes < 0 {
		return nil, errors.New("-rate must be > 0 and -changes ≥ 0")
	}
	return o, nil
}

func parseMix(s string) ([3]int, error) {
	var m [3]int
	parts := strings.Split(s, ",")
	if len(parts) != 3 {
		return m, fmt.Errorf("-mix %q: want three comma-separated percentages", s)
	}
	for i, p := range parts {
		v, err := strconv.Atoi(strings.TrimSpace(p))
		if err != nil || v < 0 {
			return m, fmt.Errorf("-mix %q: %q is not a percentage", s, p)
		}
		m[i] = v
	}
	if m[0]+m[1]+m[2] == 0 {
		return m, fmt.Errorf("-mix %q: all zero", s)
	}
	return m, nil
}

func logf(format string, a ...any) {
	fmt.Fprintf(os.Stderr, "bench-cp: "+format+"\n", a...)
}

func run() error {
	o, err := parseFlags()
	if err != nil {
		return err
	}
	mix, err := parseMix(o.mix)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(o.out, 0o755); err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	res := &result{Machine: machine(), Config: o.config(mix)}
	wall := time.Now()

	// Consul.
	consulLog, err := os.Create(filepath.Join(o.out, "consul.log"))
	if err != nil {
		return err
	}
	defer consulLog.Close()
	var args []string
	if o.consulMaxConns > 0 {
		args = append(args, "-hcl", fmt.Sprintf("limits { http_max_conns_per_client = %d }", o.consulMaxConns))
	}
	if o.csrMaxPerSecond >= 0 {
		args = append(args, "-hcl", fmt.Sprintf("connect { ca_config { csr_max_per_second = %g } }", o.csrMaxPerSecond))
	}
	logf("starting Consul (%s)", o.consulBin)
	agent, err := devconsul.Start(ctx, devconsul.Options{Binary: o.consulBin, Log: consulLog, NodeName: "bench-cp", Args: args})
	if err != nil {
		return err
	}
	defer agent.Stop()

	topo := newTopology(o.topo)
	// ACLs on, default deny, as in production: the writer registers with
	// the management token, the control plane reads with its
	// least-privilege token.
	w, err := newWriter(agent.HTTPAddr, agent.ManagementToken)
	if err != nil {
		return err
	}
	logf("registering %d services, %d instances, %d sidecars on %d nodes", len(topo.services), topo.instanceCount(), len(topo.sidecars), len(topo.nodes))
	start := time.Now()
	if err := w.registerAll(ctx, topo, o.workers); err != nil {
		return err
	}
	res.Setup.RegisterSeconds = time.Since(start).Seconds()
	res.Setup.Services, res.Setup.Instances, res.Setup.Sidecars, res.Setup.Nodes = len(topo.services), topo.instanceCount(), len(topo.sidecars), len(topo.nodes)
	res.Setup.Fanout = fanout(topo)
	logf("registered in %.1f s", res.Setup.RegisterSeconds)

	// Sidecar credentials: a Consul ACL token per meshed service, in a
	// file, and the control plane's CA (known once it has started).
	cpToken, err := agent.ControlPlaneToken(ctx, false)
	if err != nil {
		return err
	}
	mode := cpMode{Insecure: o.insecure, TLSDir: filepath.Join(o.out, "xds-tls"), Log: "controlplane.log"}
	var tokens *tokenSet
	res.Auth.Mode = "authenticated"
	if o.insecure {
		res.Auth.Mode = "insecure"
	} else {
		logf("creating %d Consul ACL tokens (a service identity per meshed service)", o.topo.Meshed)
		start := time.Now()
		if tokens, err = makeTokens(ctx, agent, topo, filepath.Join(o.out, "tokens"), o.workers); err != nil {
			return err
		}
		res.Auth.TokensSeconds = time.Since(start).Seconds()
		res.Auth.Tokens, res.Auth.DistinctTokens = len(tokens.files), tokens.distinct
		logf("%d tokens in %.1f s, %d distinct among the %d sidecars", len(tokens.files), res.Auth.TokensSeconds, tokens.distinct, len(topo.sidecars))
		// A fresh CA and certificate every run.
		if err := os.RemoveAll(mode.TLSDir); err != nil {
			return err
		}
	}
	if o.warmLeaves {
		logf("warming the agent's leaf certificates (%d services)", o.topo.Meshed)
		start := time.Now()
		if err := warmLeaves(ctx, agent, topo, cpToken, o.workers); err != nil {
			return err
		}
		res.Setup.WarmLeavesSeconds = time.Since(start).Seconds()
		logf("leaf certificates signed in %.1f s", res.Setup.WarmLeavesSeconds)
	}

	// Control plane.
	cp, err := startControlPlane(ctx, o, agent.HTTPAddr, cpToken, mode)
	if err != nil {
		return err
	}
	defer cp.stop()
	credsOf := func(sc *sidecar) xdsclient.Credentials {
		if o.insecure {
			return xdsclient.Credentials{Insecure: true}
		}
		return xdsclient.Credentials{CAFile: cp.caFile, TokenFile: tokens.files[sc.service]}
	}
	smp := &sampler{pid: cp.pid()}
	sctx, cancelSampler := context.WithCancel(ctx)
	var sampWG sync.WaitGroup
	sampWG.Add(1)
	go func() { defer sampWG.Done(); smp.run(sctx, 200*time.Millisecond) }()
	defer func() { cancelSampler(); sampWG.Wait() }()
	readyAt := make(chan time.Duration, 1)
	go func() { readyAt <- cp.waitReady(ctx) }()
	var syncProf sync.WaitGroup
	if o.profileSync > 0 {
		syncProf.Add(1)
		go func() {
			defer syncProf.Done()
			secs := max(1, int(o.profileSync/time.Second))
			if err := fetchTo(ctx, fmt.Sprintf("http://%s/debug/pprof/profile?seconds=%d", cp.admin, secs), filepath.Join(o.out, "cp-cpu-sync.pprof")); err != nil {
				logf("sync profile: %v", err)
			}
		}()
	}

	// Simulated sidecars.
	fl, err := startFleet(ctx, topo, cp.xds, credsOf)
	if err != nil {
		return err
	}
	defer fl.stop()
	logf("%d simulated sidecars (%s) connecting to %s; waiting for every one's whole config", len(topo.sidecars), res.Auth.Mode, cp.xds)
	syncedAt, err := waitSync(ctx, fl, cp, o.syncTimeout)
	if err != nil {
		return err
	}
	res.InitialSync = cp.syncResult(syncedAt, <-readyAt)
	if m, err := scrape(ctx, fmt.Sprintf("http://%s/metrics", cp.admin)); err == nil {
		res.Auth.InitialSyncLookups = authLookups(nil, m)
	} else {
		logf("metrics: %v", err)
	}
	logf("all %d sidecars synced %.1f s after the control plane started (first catalog after %.1f s; %d token reviews asked of Consul, %d cached)",
		len(topo.sidecars), res.InitialSync.Seconds, res.InitialSync.ReadySeconds, res.Auth.InitialSyncLookups.Consul, res.Auth.InitialSyncLookups.Cached)
	tr := fl.tr

	syncProf.Wait() // one CPU profile at a time

	// Quiet period: nothing pushed for 2 s (leaf certificates and late
	// builds settle), at most 30 s.
	deadline := time.Now().Add(30 * time.Second)
	for time.Since(tr.quietSince()) < 2*time.Second && time.Now().Before(deadline) {
		time.Sleep(200 * time.Millisecond)
	}

	// Changes.
	metrics0, err := scrape(ctx, fmt.Sprintf("http://%s/metrics", cp.admin))
	if err != nil {
		return fmt.Errorf("metrics: %w", err)
	}
	cpu0 := cp.cpu()
	phase := time.Duration(float64(o.changes)/o.rate*float64(time.Second)) + time.Second
	var profWG sync.WaitGroup
	if o.profile {
		profWG.Add(1)
		go func() {
			defer profWG.Done()
			secs := max(1, int(phase/time.Second))
			if err := fetchTo(ctx, fmt.Sprintf("http://%s/debug/pprof/profile?seconds=%d", cp.admin, secs), filepath.Join(o.out, "cp-cpu-changes.pprof")); err != nil {
				logf("changes profile: %v", err)
			}
		}()
	}
	logf("writing %d endpoint changes at %g/s", o.changes, o.rate)
	tr.setMeasuring(true)
	d := &driver{t: topo, w: w, tr: tr, rng: rand.New(rand.NewPCG(o.topo.Seed+1, 7)), busy: map[string]*change{}, Timeout: o.changeTimeout, Mix: mix}
	phaseStart := time.Now()
	if err := d.run(ctx, o.changes, o.rate); err != nil {
		return err
	}
	wait := time.Now().Add(o.changeTimeout)
	for tr.pendingCount() > 0 && time.Now().Before(wait) {
		time.Sleep(50 * time.Millisecond)
	}
	time.Sleep(500 * time.Millisecond) // late pushes to unaffected sidecars still count
	tr.setMeasuring(false)
	res.Changes.PhaseSeconds = time.Since(phaseStart).Seconds()
	res.Changes.Missed = tr.missing()
	res.Controlplane.CPUSecondsChanges = (cp.cpu() - cpu0).Seconds()
	profWG.Wait()
	if o.profile {
		if err := fetchTo(ctx, fmt.Sprintf("http://%s/debug/pprof/heap", cp.admin), filepath.Join(o.out, "cp-heap.pprof")); err != nil {
			logf("heap profile: %v", err)
		}
	}
	if m, err := scrape(ctx, fmt.Sprintf("http://%s/metrics", cp.admin)); err == nil {
		res.Controlplane.Metrics = pickMetrics(m)
		const h, l = "meshlet_controlplane_push_latency_seconds", `trigger="consul"`
		res.Changes.ControlplaneMS.P50 = histogramQuantile(metrics0, m, h, l, 0.50)
		res.Changes.ControlplaneMS.P99 = histogramQuantile(metrics0, m, h, l, 0.99)
	} else {
		logf("metrics: %v", err)
	}

	// Reconnect storm: every sidecar gone, then all back at once.
	if o.storm {
		st, err := reconnectStorm(ctx, o, topo, cp, fl, credsOf, tokens)
		if err != nil {
			return err
		}
		res.Storm = st
	}

	if m, err := scrape(ctx, fmt.Sprintf("http://%s/metrics", cp.admin)); err == nil {
		res.Auth.Denied = authDenied(nil, m)
	}
	rss, hwm, _ := memory(cp.pid())
	res.Controlplane.RSSEndMB = mb(rss)
	res.Controlplane.RSSPeakMB = mb(max(hwm, smp.max()))
	res.Controlplane.CPUSecondsTotal = cp.cpu().Seconds()
	res.summarize(d.changes, tr)

	fl.stop()
	cancelSampler()
	sampWG.Wait()
	cp.stop()

	// The same initial sync without TLS and tokens.
	if o.compareInsecure && !o.insecure {
		ins, err := compareInsecure(ctx, o, topo, agent.HTTPAddr, cpToken)
		if err != nil {
			return err
		}
		res.Insecure = ins
		res.Ratios = &ratios{
			InitialSyncSeconds: res.InitialSync.Seconds / ins.InitialSync.Seconds,
			CPUSeconds:         res.InitialSync.CPUSeconds / ins.InitialSync.CPUSeconds,
		}
	}

	if c, err := cpuTime(agent.Pid()); err == nil {
		res.Consul.CPUSecondsTotal = c.Seconds()
	}
	if _, hwm, err := memory(agent.Pid()); err == nil {
		res.Consul.RSSPeakMB = mb(hwm)
	}
	res.WallSeconds = time.Since(wall).Seconds()

	res.print(os.Stdout)
	path := filepath.Join(o.out, "result.json")
	b, _ := json.MarshalIndent(res, "", "  ")
	if err := os.WriteFile(path, append(b, '\n'), 0o644); err != nil {
		return err
	}
	logs := "controlplane,consul"
	if res.Insecure != nil {
		logs = "controlplane,controlplane-insecure,consul"
	}
	fmt.Printf("\nJSON: %s   logs: %s/{%s}.log\n", path, o.out, logs)
	var errs []error
	if res.Changes.Missed > 0 {
		errs = append(errs, fmt.Errorf("%d change deliveries never arrived", res.Changes.Missed))
	}
	if st := res.Storm; st != nil && !st.OK {
		errs = append(errs, fmt.Errorf("the reconnect storm asked Consul %d token reviews for %d distinct tokens: the control plane's review cache (xdsauth.Cached) should answer a storm within its %v TTL itself, and never cost more than one review per token",
			st.Lookups.Consul, st.MaxConsulLookups, xdsauth.DefaultCacheTTL))
	}
	return errors.Join(errs...)
}

// reconnectStorm stops every client of fl, then starts a new client per
// sidecar at once against the same control plane and measures the time
// until each has a whole config again, the control plane's CPU meanwhile
// and the token reviews it asked of Consul (all should be cached within
// the cache's TTL; at most one per distinct token in any case).
func reconnectStorm(ctx context.Context, o *options, topo *topology, cp *controlPlane, fl *fleet, creds func(*sidecar) xdsclient.Credentials, tokens *tokenSet) (*stormResult, error) {
	fl.stop()
	time.Sleep(time.Second) // the control plane ends the streams
	metricsURL := fmt.Sprintf("http://%s/metrics", cp.admin)
	m0, err := scrape(ctx, metricsURL)
	if err != nil {
		return nil, fmt.Errorf("metrics: %w", err)
	}
	cpu0 := cp.cpu()
	st := &stormResult{Sidecars: len(topo.sidecars)}
	logf("reconnect storm: all %d simulated sidecars stopped, starting them again at once", len(topo.sidecars))
	again, err := startFleet(ctx, topo, cp.xds, creds)
	if err != nil {
		return nil, err
	}
	defer again.stop()
	syncedAt, err := waitSync(ctx, again, cp, o.syncTimeout)
	if err != nil {
		return nil, fmt.Errorf("reconnect storm: %w", err)
	}
	st.Seconds = syncedAt.Sub(again.started).Seconds()
	st.CPUSeconds = (cp.cpu() - cpu0).Seconds()
	m1, err := scrape(ctx, metricsURL)
	if err != nil {
		return nil, fmt.Errorf("metrics: %w", err)
	}
	st.Lookups = authLookups(m0, m1)
	st.Denied = authDenied(m0, m1)
	// The oldest cached review is at most as old as the control plane.
	st.CacheAgeSeconds = syncedAt.Sub(cp.started).Seconds()
	st.WithinTTL = syncedAt.Sub(cp.started) < xdsauth.DefaultCacheTTL
	if tokens != nil {
		st.MaxConsulLookups = tokens.distinct
	}
	st.OK = st.Lookups.Consul <= st.MaxConsulLookups
	logf("reconnect storm: all %d sidecars served again after %.1f s (control plane CPU %.1f s); token reviews asked of Consul %d, cached %d",
		len(topo.sidecars), st.Seconds, st.CPUSeconds, st.Lookups.Consul, st.Lookups.Cached)
	return st, nil
}

// compareInsecure starts a fresh control plane with -xds-insecure on the
// same Consul, connects every sidecar in plaintext at once and measures
// the initial sync as the authenticated run did.
func compareInsecure(ctx context.Context, o *options, topo *topology, consulAddr, cpToken string) (*insecureResult, error) {
	cp, err := startControlPlane(ctx, o, consulAddr, cpToken, cpMode{Insecure: true, Log: "controlplane-insecure.log"})
	if err != nil {
		return nil, err
	}
	defer cp.stop()
	readyAt := make(chan time.Duration, 1)
	go func() { readyAt <- cp.waitReady(ctx) }()
	fl, err := startFleet(ctx, topo, cp.xds, func(*sidecar) xdsclient.Credentials { return xdsclient.Credentials{Insecure: true} })
	if err != nil {
		return nil, err
	}
	defer fl.stop()
	logf("insecure comparison: %d plaintext sidecars connecting to %s", len(topo.sidecars), cp.xds)
	syncedAt, err := waitSync(ctx, fl, cp, o.syncTimeout)
	if err != nil {
		return nil, fmt.Errorf("insecure comparison: %w", err)
	}
	out := &insecureResult{InitialSync: cp.syncResult(syncedAt, <-readyAt)}
	logf("insecure comparison: all %d sidecars synced %.1f s after the control plane started (CPU %.1f s)", len(topo.sidecars), out.InitialSync.Seconds, out.InitialSync.CPUSeconds)
	return out, nil
}

// syncResult is the initial sync of cp, its last sidecar synced at
// syncedAt.
func (cp *controlPlane) syncResult(syncedAt time.Time, ready time.Duration) syncResult {
	r := syncResult{Seconds: syncedAt.Sub(cp.started).Seconds(), ReadySeconds: ready.Seconds(), CPUSeconds: cp.cpu().Seconds()}
	if rss, _, err := memory(cp.pid()); err == nil {
		r.RSSMB = mb(rss)
	}
	return r
}

func (o *options) config(mix [3]int) map[string]any {
	return map[string]any{
		"services": o.topo.Services, "instances_per_service": o.topo.Instances, "sidecars": o.topo.Sidecars,
		"meshed_services": o.topo.Meshed, "nodes": o.topo.Nodes, "upstreams": fmt.Sprintf("%d-%d", o.topo.UpstreamsMin, o.topo.UpstreamsMax),
		"hot_services": o.topo.Hot, "http_fraction": o.topo.HTTPFraction, "seed": o.topo.Seed,
		"changes": o.changes, "rate_per_second": o.rate,
		"mix_percent":                      map[string]int{kindSidecarHealth: mix[0], kindPlainHealth: mix[1], "scale-out/in": mix[2]},
		"consul_http_max_conns_per_client": cmpOr(o.consulMaxConns, 200), "csr_max_per_second": o.csrMaxPerSecond,
		"controlplane_flags": o.cpFlags,
		"ads":                map[bool]string{false: "tls+token", true: "insecure"}[o.insecure], "reconnect_storm": o.storm,
		"compare_insecure": o.compareInsecure && !o.insecure, "warm_leaves": o.warmLeaves,
	}
}

func cmpOr(v, def int) int {
	if v == 0 {
		return def
	}
	return v
}

func mb(b int64) float64 { return float64(b) / (1 << 20) }

// controlPlane is the bin/controlplane process under test.
type controlPlane struct {
	cmd   *exec.Cmd
	xds   string
	admin string
	// caFile verifies its ADS certificate ("" with -xds-insecure).
	caFile string
	// maxConns is the agent's limits.http_max_conns_per_client.
	maxConns  int
	started   time.Time
	exited    chan struct{}
	stopOnce  sync.Once
	logFile   *os.File
	lastCPU   time.Duration
	lastCPUMu sync.Mutex
}

// cpMode is how a control plane serves ADS.
type cpMode struct {
	// Insecure serves plaintext without authentication (-xds-insecure);
	// otherwise TLS with a certificate it issues itself in TLSDir, and a
	// Consul ACL token required on every stream.
	Insecure bool
	TLSDir   string
	// Log names its log file in -out.
	Log string
}

func startControlPlane(ctx context.Context, o *options, consulAddr, consulToken string, mode cpMode) (*controlPlane, error) {
	ports, err := devconsul.FreePorts(2)
	if err != nil {
		return nil, err
	}
	policyDir := filepath.Join(o.out, "policies")
	if err := os.MkdirAll(policyDir, 0o755); err != nil {
		return nil, err
	}
	logFile, err := os.Create(filepath.Join(o.out, mode.Log))
	if err != nil {
		return nil, err
	}
	cp := &controlPlane{xds: net.JoinHostPort("127.0.0.1", strconv.Itoa(ports[0])), admin: net.JoinHostPort("127.0.0.1", strconv.Itoa(ports[1])),
		exited: make(chan struct{}), logFile: logFile, maxConns: cmpOr(o.consulMaxConns, 200)}
	args := []string{"serve", "-xds-addr", cp.xds, "-admin-addr", cp.admin, "-admin-pprof", "-consul-addr", consulAddr, "-policy-dir", policyDir}
	if mode.Insecure {
		args = append(args, "-xds-insecure")
	} else {
		args = append(args, "-xds-tls-dir", mode.TLSDir)
		cp.caFile = filepath.Join(mode.TLSDir, "ca.crt")
	}
	args = append(args, strings.Fields(o.cpFlags)...)
	cp.cmd = exec.Command(o.cpBin, args...)
	cp.cmd.Env = append(os.Environ(), "CONSUL_HTTP_TOKEN="+consulToken) // not on the command line
	cp.cmd.Stdout, cp.cmd.Stderr = logFile, logFile
	cp.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	logf("starting the control plane: %s %s", o.cpBin, strings.Join(args, " "))
	cp.started = time.Now()
	if err := cp.cmd.Start(); err != nil {
		logFile.Close()
		return nil, fmt.Errorf("start %s: %w", o.cpBin, err)
	}
	go func() { _ = cp.cmd.Wait(); close(cp.exited) }()
	deadline := time.Now().Add(30 * time.Second)
	for {
		c, err := net.DialTimeout("tcp", cp.xds, time.Second)
		if err == nil {
			c.Close()
			if _, err := os.Stat(cp.caFile); cp.caFile == "" || err == nil {
				return cp, nil
			}
		}
		select {
		case <-cp.exited:
			return nil, fmt.Errorf("%s exited at start (see %s)", o.cpBin, logFile.Name())
		case <-ctx.Done():
			cp.stop()
			return nil, ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			cp.stop()
			return nil, fmt.Errorf("%s does not serve xDS on %s (or has not written %s) after 30 s", o.cpBin, cp.xds, cmp.Or(cp.caFile, "its CA"))
		}
	}
}

func (cp *controlPlane) pid() int { return cp.cmd.Process.Pid }

// cpu returns the process's CPU time so far (the last known value once it
// has exited).
func (cp *controlPlane) cpu() time.Duration {
	cp.lastCPUMu.Lock()
	defer cp.lastCPUMu.Unlock()
	if c, err := cpuTime(cp.pid()); err == nil {
		cp.lastCPU = c
	}
	return cp.lastCPU
}

// waitReady polls /ready and returns the time from start to its first 200.
func (cp *controlPlane) waitReady(ctx context.Context) time.Duration {
	for ctx.Err() == nil {
		resp, err := http.Get("http://" + cp.admin + "/ready")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return time.Since(cp.started)
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
	return 0
}

func (cp *controlPlane) stop() {
	cp.stopOnce.Do(func() {
		cp.cpu()
		_ = syscall.Kill(-cp.pid(), syscall.SIGTERM)
		select {
		case <-cp.exited:
		case <-time.After(10 * time.Second):
			_ = syscall.Kill(-cp.pid(), syscall.SIGKILL)
			<-cp.exited
		}
		cp.logFile.Close()
	})
}

func machine() map[string]any {
	m := map[string]any{"cpus": runtime.NumCPU(), "go": runtime.Version(), "goos": runtime.GOOS, "goarch": runtime.GOARCH}
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "model name" {
				m["cpu_model"] = strings.TrimSpace(v)
				break
			}
		}
	}
	if b, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		m["kernel"] = strings.TrimSpace(string(b))
	}
	if b, err := os.ReadFile("/proc/loadavg"); err == nil {
		m["loadavg_at_start"] = strings.Join(strings.Fields(string(b))[:3], " ")
	}
	return m
}
