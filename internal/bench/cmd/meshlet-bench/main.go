// Command meshlet-bench is `make bench`: the same workloads against the app
// directly, one meshlet sidecar, two sidecars with mTLS, HAProxy and nginx,
// side by side on loopback, each proxy pinned to one CPU and the load
// generator and apps to the other. It prints a table per workload (medians of
// alternating rounds, every figure also as a ratio to HAProxy and to direct)
// and where issue 7's goals stand, and writes the whole run as JSON (and the
// summary as Markdown next to it). See internal/bench.
//
//	meshlet-bench [-quick] [-rounds 3] [-duration 5s] [-workloads http-max,...] [-systems direct,sidecar,...]
//	              [-out .work/bench/bench-results.json] [-pprof DIR]
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/meshlet/meshlet/internal/bench"
)

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

// pinnedEnv marks the process as already re-executed under taskset.
const pinnedEnv = "MESHLET_BENCH_PINNED"

func run(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("meshlet-bench", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var (
		cfg       bench.Config
		quick     = fs.Bool("quick", os.Getenv("BENCH_QUICK") != "", "smoke run (~2 min): 1 round, 1.5 s runs (env BENCH_QUICK)")
		out       = fs.String("out", ".work/bench/bench-results.json", "JSON results (a Markdown summary is written next to it)")
		workloads = fs.String("workloads", "", "comma-separated workloads to run (default all): http-max, http-25pct, http-50pct, http-1k, grpc-unary, tcp-redis, conn-per-req, mtls-handshake")
		systems   = fs.String("systems", "", "comma-separated systems (default all): direct, sidecar, pair-mtls, pair-plain, haproxy, nginx")
		grpcApp   = fs.String("grpc-app", "", "internal: serve the gRPC app on this address")
		sidecar   = fs.String("sidecar", "bin/sidecar", "meshlet sidecar binary")
		vegeta    = fs.String("vegeta", "bin/vegeta", "vegeta binary (deploy/tools/vegeta), for -open-loop vegeta")
		ghz       = fs.String("ghz", "", "ghz binary (default: PATH, then $(go env GOPATH)/bin)")
		keep      = fs.Bool("keep", false, "keep the work directory (configs and logs of every run)")
	)
	fs.IntVar(&cfg.Rounds, "rounds", 3, "rounds per workload; systems alternate within a round")
	fs.DurationVar(&cfg.Duration, "duration", 5*time.Second, "measured length of each run")
	fs.DurationVar(&cfg.Warmup, "warmup", time.Second, "unmeasured load before each run")
	fs.IntVar(&cfg.ProxyCPU, "proxy-cpu", 0, "CPU the proxy under test is pinned to")
	fs.IntVar(&cfg.LoadCPU, "load-cpu", 1, "CPU the load generators, apps and this harness are pinned to")
	fs.StringVar(&cfg.OpenLoop, "open-loop", bench.OpenLoopBuiltin, "open-loop generator: builtin (wrk2-style, in this process) or vegeta (sustains about 20k req/s on one CPU)")
	fs.IntVar(&cfg.Connections, "connections", 32, "connections (closed loop) and connection cap (open loop)")
	fs.DurationVar(&cfg.QuietWait, "quiet-wait", 5*time.Second, "wait up to this long before each run for the proxy CPU to be nearly idle (shared machines)")
	fs.StringVar(&cfg.PprofDir, "pprof", "", "write CPU profiles of the sidecars (first round of each workload) to this directory")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if *grpcApp != "" {
		ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
		defer stop()
		if err := bench.ServeGRPCUpstream(ctx, *grpcApp); err != nil && ctx.Err() == nil {
			fmt.Fprintln(stderr, "meshlet-bench: gRPC app:", err)
			return 1
		}
		return 0
	}
	// Pin the harness (xDS server, TLS client, result parsing) to the load
	// CPU before the Go runtime sizes itself: re-exec under taskset.
	if os.Getenv(pinnedEnv) == "" {
		if runtime.NumCPU() < 2 {
			fmt.Fprintln(stderr, "meshlet-bench: needs at least 2 CPUs (one for the proxy, one for the load)")
			return 1
		}
		self, err := os.Executable()
		if err != nil {
			fmt.Fprintln(stderr, "meshlet-bench:", err)
			return 1
		}
		taskset, err := exec.LookPath("taskset")
		if err != nil {
			fmt.Fprintln(stderr, "meshlet-bench: taskset (util-linux) is required:", err)
			return 1
		}
		env := append(os.Environ(), pinnedEnv+"=1")
		err = syscall.Exec(taskset, append([]string{"taskset", "-c", strconv.Itoa(cfg.LoadCPU), self}, args...), env)
		fmt.Fprintln(stderr, "meshlet-bench: exec taskset:", err)
		return 1
	}
	if *quick {
		cfg.Quick = true
		if !flagSet(fs, "rounds") {
			cfg.Rounds = 1
		}
		if !flagSet(fs, "duration") {
			cfg.Duration = 1500 * time.Millisecond
		}
		if !flagSet(fs, "quiet-wait") {
			cfg.QuietWait = time.Second
		}
		if !flagSet(fs, "warmup") {
			cfg.Warmup = 500 * time.Millisecond
		}
	}
	cfg.Workloads, cfg.Systems = list(*workloads), list(*systems)

	var err error
	tools := bench.Tools{}
	missing := []string{}
	look := func(dst *string, name, hint string) {
		if *dst, err = exec.LookPath(name); err != nil {
			missing = append(missing, fmt.Sprintf("%s (%s)", name, hint))
		}
	}
	look(&tools.Wrk, "wrk", "apt-get install wrk")
	look(&tools.RedisBenchmark, "redis-benchmark", "apt-get install redis-tools")
	look(&tools.Redis, "redis-server", "apt-get install redis-server")
	look(&tools.HAProxy, "haproxy", "apt-get install haproxy")
	look(&tools.Nginx, "nginx", "apt-get install nginx libnginx-mod-stream")
	tools.Ghz = *ghz
	if tools.Ghz == "" {
		tools.Ghz = goBin("ghz")
	}
	if tools.Ghz == "" {
		missing = append(missing, "ghz (go install github.com/bojand/ghz/cmd/ghz@v0.120.0)")
	}
	for _, p := range []struct {
		dst  *string
		path string
		hint string
	}{{&tools.Sidecar, *sidecar, "make build"}, {&tools.Vegeta, *vegeta, "make bin/vegeta"}} {
		if p.dst == &tools.Vegeta && cfg.OpenLoop != bench.OpenLoopVegeta {
			continue
		}
		abs, err := filepath.Abs(p.path)
		if st, serr := os.Stat(abs); err != nil || serr != nil || st.IsDir() {
			missing = append(missing, fmt.Sprintf("%s (%s)", p.path, p.hint))
			continue
		}
		*p.dst = abs
	}
	if tools.Self, err = os.Executable(); err != nil {
		missing = append(missing, "own executable: "+err.Error())
	}
	if len(missing) > 0 {
		fmt.Fprintf(stderr, "meshlet-bench: missing: %s (`make bench` installs them)\n", strings.Join(missing, ", "))
		return 1
	}
	cfg.Tools = tools

	work, err := os.MkdirTemp("", "meshlet-bench-")
	if err != nil {
		fmt.Fprintln(stderr, "meshlet-bench:", err)
		return 1
	}
	if *keep {
		fmt.Fprintln(stderr, "meshlet-bench: work directory", work)
	} else {
		defer os.RemoveAll(work)
	}
	if err := os.Chmod(work, 0o755); err != nil { // nginx workers run as nobody
		fmt.Fprintln(stderr, "meshlet-bench:", err)
		return 1
	}
	cfg.WorkDir, cfg.Out, cfg.Progress = work, stdout, stderr
	if cfg.PprofDir != "" {
		if err := os.MkdirAll(cfg.PprofDir, 0o755); err != nil {
			fmt.Fprintln(stderr, "meshlet-bench:", err)
			return 1
		}
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	fmt.Fprintf(stderr, "meshlet-bench: %d round(s) of %v per workload and system; proxies on CPU %d, load on CPU %d\n", cfg.Rounds, cfg.Duration, cfg.ProxyCPU, cfg.LoadCPU)
	rep, err := bench.Run(ctx, cfg)
	if err != nil {
		fmt.Fprintln(stderr, "meshlet-bench:", err)
		return 1
	}
	if err := rep.WriteJSON(*out); err != nil {
		fmt.Fprintln(stderr, "meshlet-bench:", err)
		return 1
	}
	md := strings.TrimSuffix(*out, filepath.Ext(*out)) + ".md"
	if err := os.WriteFile(md, []byte(rep.Markdown()), 0o644); err != nil {
		fmt.Fprintln(stderr, "meshlet-bench:", err)
		return 1
	}
	fmt.Fprintf(stdout, "results: %s (JSON), %s (Markdown)\n", *out, md)
	return 0
}

func flagSet(fs *flag.FlagSet, name string) bool {
	set := false
	fs.Visit(func(f *flag.Flag) { set = set || f.Name == name })
	return set
}

func list(s string) []string {
	var out []string
	for _, f := range strings.Split(s, ",") {
		if f = strings.TrimSpace(f); f != "" {
			out = append(out, f)
		}
	}
	return out
}

// goBin finds a `go install`ed tool: PATH, then $GOBIN, then
// $(go env GOPATH)/bin.
func goBin(name string) string {
	if p, err := exec.LookPath(name); err == nil {
		return p
	}
	var dirs []string
	if out, err := exec.Command("go", "env", "GOBIN", "GOPATH").Output(); err == nil {
		f := strings.Split(string(out), "\n")
		if f[0] != "" {
			dirs = append(dirs, f[0])
		}
		if len(f) > 1 {
			for _, gp := range filepath.SplitList(f[1]) {
				dirs = append(dirs, filepath.Join(gp, "bin"))
			}
		}
	}
	for _, d := range dirs {
		p := filepath.Join(d, name)
		if st, err := os.Stat(p); err == nil && !st.IsDir() && st.Mode()&0o111 != 0 {
			return p
		}
	}
	return ""
}
