package bench

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"text/tabwriter"
	"time"
)

// num is a float that is null in JSON when unknown (NaN) or infinite.
type num float64

func (n num) ok() bool { return !math.IsNaN(float64(n)) && !math.IsInf(float64(n), 0) }

func (n num) MarshalJSON() ([]byte, error) {
	if !n.ok() {
		return []byte("null"), nil
	}
	return json.Marshal(math.Round(float64(n)*1e4) / 1e4)
}

func (n *num) UnmarshalJSON(b []byte) error {
	if string(b) == "null" {
		*n = num(math.NaN())
		return nil
	}
	var f float64
	err := json.Unmarshal(b, &f)
	*n = num(f)
	return err
}

var nan = num(math.NaN())

// RunResult is one run of one workload against one system.
type RunResult struct {
	Workload string `json:"workload"`
	System   string `json:"system"`
	Round    int    `json:"round"`
	Rate     int    `json:"rate,omitempty"` // open-loop target req/s
	// Requests completed (failed ones included) in Seconds.
	Requests int64   `json:"requests"`
	Errors   int64   `json:"errors"`
	Seconds  float64 `json:"seconds"`
	RPS      num     `json:"rps"` // successful requests per second
	// Latency percentiles, ms.
	P50  num `json:"p50_ms"`
	P90  num `json:"p90_ms"`
	P99  num `json:"p99_ms"`
	P999 num `json:"p999_ms"`
	// CPU of the system's processes (utime+stime) during the measured run,
	// and per 1,000 successful requests.
	CPUSeconds num `json:"cpu_seconds"`
	CPUPer1k   num `json:"cpu_seconds_per_1k_requests"`
	// RSSMB is the largest sum of the processes' VmRSS sampled during the
	// run; HWMMB the sum of their VmHWM after it. MaxSidecarRSSMB is the
	// largest single sidecar's VmRSS (pairs).
	RSSMB           num `json:"rss_mb"`
	HWMMB           num `json:"hwm_mb"`
	MaxSidecarRSSMB num `json:"max_sidecar_rss_mb"`
	// AnonMB is the anonymous part (RssAnon) of RSSMB; MaxSidecarAnonMB
	// that of the largest sidecar.
	AnonMB           num         `json:"anon_mb"`
	MaxSidecarAnonMB num         `json:"max_sidecar_anon_mb"`
	Procs            []procUsage `json:"processes,omitempty"`
	// OtherLoad is the share of the proxy CPU used by processes outside
	// the system (other users of a shared machine) during the run.
	OtherLoad num `json:"proxy_cpu_other_load"`
	// QuietWait is how long the run waited for the proxy CPU to be idle;
	// Took the whole run (start, warm-up, measure, stop); Reruns how often
	// it ran again because it was noisy.
	QuietWait   time.Duration `json:"quiet_wait_ns"`
	Took        time.Duration `json:"took_ns"`
	Reruns      int           `json:"reruns,omitempty"`
	ErrorSample string        `json:"error_sample,omitempty"`
	Error       string        `json:"error,omitempty"` // the run failed
}

func (r *RunResult) fill(lr loadResult, usage []procUsage, other float64) {
	r.Requests, r.Errors, r.Seconds = lr.Requests, lr.Errors, lr.Seconds
	r.RPS = num(lr.rps())
	r.P50, r.P90, r.P99, r.P999 = num(lr.P50), num(lr.P90), num(lr.P99), num(lr.P999)
	r.ErrorSample = lr.ErrorSample
	r.Procs = usage
	r.OtherLoad = num(other)
	r.CPUSeconds, r.CPUPer1k, r.RSSMB, r.HWMMB, r.MaxSidecarRSSMB = nan, nan, nan, nan, nan
	r.AnonMB, r.MaxSidecarAnonMB = nan, nan
	if len(usage) == 0 {
		return
	}
	var cpu, rss, hwm, anon, sc, scAnon float64
	for _, u := range usage {
		cpu += u.CPUSeconds
		rss += u.RSSMB
		hwm += u.HWMMB
		anon += u.AnonMB
		if isSidecar(u.Name) && u.RSSMB > sc {
			sc, scAnon = u.RSSMB, u.AnonMB
		}
	}
	r.CPUSeconds, r.RSSMB, r.HWMMB, r.AnonMB = num(cpu), num(rss), num(hwm), num(anon)
	if ok := lr.Requests - lr.Errors; ok > 0 {
		r.CPUPer1k = num(cpu / float64(ok) * 1000)
	}
	if sc > 0 {
		r.MaxSidecarRSSMB, r.MaxSidecarAnonMB = num(sc), num(scAnon)
	}
}

func (r RunResult) progressLine() string {
	head := fmt.Sprintf("  %-15s r%d %-10s", r.Workload, r.Round, r.System)
	if r.Error != "" {
		return head + " FAILED: " + oneLine(r.Error)
	}
	s := fmt.Sprintf("%s %9.0f req/s  p50 %s  p99 %s  p99.9 %s ms  errors %d", head, float64(r.RPS), fmtMS(r.P50), fmtMS(r.P99), fmtMS(r.P999), r.Errors)
	if r.CPUPer1k.ok() {
		s += fmt.Sprintf("  cpu %.3f s/1k  rss %.1f MB", float64(r.CPUPer1k), float64(r.RSSMB))
	}
	if r.OtherLoad > 0.05 {
		s += fmt.Sprintf("  (proxy CPU %.0f%% busy with other processes)", 100*float64(r.OtherLoad))
	}
	s += fmt.Sprintf("  [%v", r.Took)
	if r.QuietWait > 300*time.Millisecond {
		s += fmt.Sprintf(", waited %v for a quiet CPU", r.QuietWait)
	}
	s += "]"
	if r.ErrorSample != "" {
		s += "  [" + oneLine(r.ErrorSample) + "]"
	}
	return s
}

func oneLine(s string) string {
	s = strings.ReplaceAll(s, "\n", " | ")
	if len(s) > 400 {
		s = s[:400] + "..."
	}
	return s
}

// Figure is a median and its ratios to HAProxy's and direct's medians in
// the same workload (null where there is nothing to compare with).
type Figure struct {
	Value     num `json:"value"`
	ToHAProxy num `json:"x_haproxy"`
	ToDirect  num `json:"x_direct"`
}

// Summary is the medians of one system's rounds in one workload.
type Summary struct {
	Workload string `json:"workload"`
	System   string `json:"system"`
	Rounds   int    `json:"rounds"` // successful rounds
	Failed   int    `json:"failed_rounds"`
	Rate     int    `json:"rate,omitempty"`

	RPS  Figure `json:"rps"`
	P50  Figure `json:"p50_ms"`
	P90  Figure `json:"p90_ms"`
	P99  Figure `json:"p99_ms"`
	P999 Figure `json:"p999_ms"`
	// Added latency: this system's median percentile minus direct's.
	AddedP50  Figure `json:"added_p50_ms"`
	AddedP99  Figure `json:"added_p99_ms"`
	AddedP999 Figure `json:"added_p999_ms"`
	// Errors over all rounds and their share of requests.
	Errors    int64  `json:"errors"`
	ErrorRate Figure `json:"error_rate"`
	CPUPer1k  Figure `json:"cpu_seconds_per_1k_requests"`
	RSSMB     Figure `json:"rss_mb"`
	HWMMB     Figure `json:"hwm_mb"`
	// MaxSidecarRSSMB is the largest one sidecar's RSS (the pairs' worst).
	MaxSidecarRSSMB Figure `json:"max_sidecar_rss_mb"`
	// AnonMB and MaxSidecarAnonMB are the anonymous parts of RSSMB and
	// MaxSidecarRSSMB (RssAnon: heap, stacks; the rest is file-backed).
	AnonMB           Figure `json:"anon_mb"`
	MaxSidecarAnonMB Figure `json:"max_sidecar_anon_mb"`
	OtherLoad        num    `json:"proxy_cpu_other_load"`
}

// Goal is where one of issue 7's goals stands.
type Goal struct {
	Name     string `json:"name"`
	Target   string `json:"target"`
	Measured string `json:"measured"`
	Value    num    `json:"value"`
	Status   string `json:"status"` // PASS, MISS or n/a
}

// Report is a whole benchmark run.
type Report struct {
	Started   time.Time         `json:"started"`
	Elapsed   string            `json:"elapsed"`
	Quick     bool              `json:"quick"`
	Machine   map[string]string `json:"machine"`
	Settings  map[string]any    `json:"settings"`
	Workloads []workloadInfo    `json:"workloads"`
	Systems   map[string]string `json:"systems"`
	Summaries []Summary         `json:"summaries"`
	Goals     []Goal            `json:"goals"`
	Runs      []RunResult       `json:"runs"`

	cfg Config
}

type workloadInfo struct {
	Name    string   `json:"name"`
	Title   string   `json:"title"`
	Rate    int      `json:"rate,omitempty"`
	Systems []string `json:"systems"`
}

func newReport(cfg Config) *Report {
	return &Report{
		Started: time.Now(), Quick: cfg.Quick, Machine: machine(), Systems: systemTitles, cfg: cfg,
		Settings: map[string]any{
			"rounds": cfg.Rounds, "duration_s": cfg.Duration.Seconds(), "warmup_s": cfg.Warmup.Seconds(),
			"proxy_cpu": cfg.ProxyCPU, "load_cpu": cfg.LoadCPU, "connections": cfg.Connections,
			"app": "nginx return 200 (1 KiB) for HTTP, grpc-go interop TestService for gRPC, redis-server for TCP, all on the load CPU",
		},
	}
}

// add summarises one workload's runs and prints its table.
func (rep *Report) add(w *workload, systems []string, rate int, runs []RunResult) {
	rep.Runs = append(rep.Runs, runs...)
	rep.Workloads = append(rep.Workloads, workloadInfo{Name: w.Name, Title: w.Title, Rate: rate, Systems: systems})
	var sums []Summary
	for _, sys := range systems {
		s := Summary{Workload: w.Name, System: sys, Rate: rate}
		var ok []RunResult
		var reqs int64
		for _, r := range runs {
			if r.System != sys {
				continue
			}
			if r.Error != "" {
				s.Failed++
				continue
			}
			ok = append(ok, r)
			s.Errors += r.Errors
			reqs += r.Requests
		}
		s.Rounds = len(ok)
		med := func(f func(RunResult) num) Figure {
			var vs []float64
			for _, r := range ok {
				if v := f(r); v.ok() {
					vs = append(vs, float64(v))
				}
			}
			return Figure{Value: median(vs), ToHAProxy: nan, ToDirect: nan}
		}
		s.RPS = med(func(r RunResult) num { return r.RPS })
		s.P50 = med(func(r RunResult) num { return r.P50 })
		s.P90 = med(func(r RunResult) num { return r.P90 })
		s.P99 = med(func(r RunResult) num { return r.P99 })
		s.P999 = med(func(r RunResult) num { return r.P999 })
		s.CPUPer1k = med(func(r RunResult) num { return r.CPUPer1k })
		s.RSSMB = med(func(r RunResult) num { return r.RSSMB })
		s.HWMMB = med(func(r RunResult) num { return r.HWMMB })
		s.MaxSidecarRSSMB = med(func(r RunResult) num { return r.MaxSidecarRSSMB })
		s.AnonMB = med(func(r RunResult) num { return r.AnonMB })
		s.MaxSidecarAnonMB = med(func(r RunResult) num { return r.MaxSidecarAnonMB })
		s.OtherLoad = med(func(r RunResult) num { return r.OtherLoad }).Value
		s.ErrorRate = Figure{Value: nan, ToHAProxy: nan, ToDirect: nan}
		if reqs > 0 {
			s.ErrorRate.Value = num(float64(s.Errors) / float64(reqs))
		}
		sums = append(sums, s)
	}
	find := func(sys string) *Summary {
		for i := range sums {
			if sums[i].System == sys {
				return &sums[i]
			}
		}
		return nil
	}
	hap, dir := find(sysHAProxy), find(sysDirect)
	for i := range sums {
		s := &sums[i]
		if dir != nil {
			s.AddedP50 = Figure{Value: s.P50.Value - dir.P50.Value, ToHAProxy: nan, ToDirect: nan}
			s.AddedP99 = Figure{Value: s.P99.Value - dir.P99.Value, ToHAProxy: nan, ToDirect: nan}
			s.AddedP999 = Figure{Value: s.P999.Value - dir.P999.Value, ToHAProxy: nan, ToDirect: nan}
		} else {
			s.AddedP50, s.AddedP99, s.AddedP999 = Figure{nan, nan, nan}, Figure{nan, nan, nan}, Figure{nan, nan, nan}
		}
	}
	for i := range sums {
		s := &sums[i]
		for _, f := range []struct {
			fig *Figure
			get func(*Summary) Figure
		}{
			{&s.RPS, func(x *Summary) Figure { return x.RPS }},
			{&s.P50, func(x *Summary) Figure { return x.P50 }},
			{&s.P90, func(x *Summary) Figure { return x.P90 }},
			{&s.P99, func(x *Summary) Figure { return x.P99 }},
			{&s.P999, func(x *Summary) Figure { return x.P999 }},
			{&s.AddedP50, func(x *Summary) Figure { return x.AddedP50 }},
			{&s.AddedP99, func(x *Summary) Figure { return x.AddedP99 }},
			{&s.AddedP999, func(x *Summary) Figure { return x.AddedP999 }},
			{&s.ErrorRate, func(x *Summary) Figure { return x.ErrorRate }},
			{&s.CPUPer1k, func(x *Summary) Figure { return x.CPUPer1k }},
			{&s.RSSMB, func(x *Summary) Figure { return x.RSSMB }},
			{&s.HWMMB, func(x *Summary) Figure { return x.HWMMB }},
			{&s.MaxSidecarRSSMB, func(x *Summary) Figure { return x.RSSMB }},
			{&s.AnonMB, func(x *Summary) Figure { return x.AnonMB }},
			{&s.MaxSidecarAnonMB, func(x *Summary) Figure { return x.AnonMB }},
		} {
			if hap != nil {
				f.fig.ToHAProxy = ratio(f.fig.Value, f.get(hap).Value)
			}
			if dir != nil {
				f.fig.ToDirect = ratio(f.fig.Value, f.get(dir).Value)
			}
		}
	}
	rep.Summaries = append(rep.Summaries, sums...)
	rep.printWorkload(rep.cfg.Out, w, rate, sums)
}

func ratio(a, b num) num {
	if !a.ok() || !b.ok() || b == 0 {
		return nan
	}
	return a / b
}

func median(vs []float64) num {
	if len(vs) == 0 {
		return nan
	}
	slices.Sort(vs)
	n := len(vs)
	if n%2 == 1 {
		return num(vs[n/2])
	}
	return num((vs[n/2-1] + vs[n/2]) / 2)
}

// printWorkload prints one workload's table: per system a line of
// medians, then the same figures as ratios to HAProxy and to direct.
func (rep *Report) printWorkload(out io.Writer, w *workload, rate int, sums []Summary) {
	title := w.Title
	if rate > 0 {
		title += fmt.Sprintf(" [%d req/s]", rate)
	}
	fmt.Fprintf(out, "\n== %s: %s\n   medians of %d rounds, %v each\n", w.Name, title, rep.cfg.Rounds, rep.cfg.Duration)
	tw := tabwriter.NewWriter(out, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "system\t\treq/s\tp50 ms\tp90 ms\tp99 ms\tp99.9 ms\t+p50 ms\t+p99 ms\t+p99.9 ms\terrors\tCPU s/1k req\tRSS MB\t")
	for _, s := range sums {
		if s.Rounds == 0 {
			fmt.Fprintf(tw, "%s\t\tall %d rounds failed\t\t\t\t\t\t\t\t\t\t\t\n", s.System, s.Failed)
			continue
		}
		errs := fmt.Sprintf("%d", s.Errors)
		if s.Failed > 0 {
			errs += fmt.Sprintf(" (%d failed runs)", s.Failed)
		}
		fmt.Fprintf(tw, "%s\t\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t\n", s.System, fmtRate(s.RPS.Value),
			fmtMS(s.P50.Value), fmtMS(s.P90.Value), fmtMS(s.P99.Value), fmtMS(s.P999.Value),
			fmtMS(s.AddedP50.Value), fmtMS(s.AddedP99.Value), fmtMS(s.AddedP999.Value), errs, fmtCPU(s.CPUPer1k.Value), fmtMB(s.RSSMB.Value))
		for _, rr := range []struct {
			label string
			get   func(Figure) num
		}{{"×haproxy", func(f Figure) num { return f.ToHAProxy }}, {"×direct", func(f Figure) num { return f.ToDirect }}} {
			cells := []num{rr.get(s.RPS), rr.get(s.P50), rr.get(s.P90), rr.get(s.P99), rr.get(s.P999),
				rr.get(s.AddedP50), rr.get(s.AddedP99), rr.get(s.AddedP999), rr.get(s.ErrorRate), rr.get(s.CPUPer1k), rr.get(s.RSSMB)}
			has := false
			for _, c := range cells {
				has = has || c.ok()
			}
			if !has {
				continue
			}
			fmt.Fprintf(tw, "\t%s", rr.label)
			for _, c := range cells {
				fmt.Fprintf(tw, "\t%s", fmtRatio(c))
			}
			fmt.Fprint(tw, "\t\n")
		}
	}
	tw.Flush()
}

func fmtRate(v num) string {
	if !v.ok() {
		return "–"
	}
	return fmt.Sprintf("%.0f", float64(v))
}

func fmtMS(v num) string {
	if !v.ok() {
		return "–"
	}
	switch a := math.Abs(float64(v)); {
	case a >= 100:
		return fmt.Sprintf("%.0f", float64(v))
	case a >= 10:
		return fmt.Sprintf("%.1f", float64(v))
	default:
		return fmt.Sprintf("%.3f", float64(v))
	}
}

func fmtCPU(v num) string {
	if !v.ok() {
		return "–"
	}
	return fmt.Sprintf("%.4f", float64(v))
}

func fmtMB(v num) string {
	if !v.ok() {
		return "–"
	}
	return fmt.Sprintf("%.1f", float64(v))
}

func fmtRatio(v num) string {
	if !v.ok() {
		return "–"
	}
	return fmt.Sprintf("%.2f×", float64(v))
}

func (rep *Report) summary(w, sys string) *Summary {
	for i := range rep.Summaries {
		if s := &rep.Summaries[i]; s.Workload == w && s.System == sys && s.Rounds > 0 {
			return s
		}
	}
	return nil
}

// finish evaluates the goals and prints them.
func (rep *Report) finish() {
	rep.Elapsed = time.Since(rep.Started).Round(time.Second).String()
	rep.Goals = rep.goals()
	out := rep.cfg.Out
	fmt.Fprintf(out, "\n== goals (issue 7), from this run's medians\n")
	tw := tabwriter.NewWriter(out, 0, 0, 2, ' ', 0)
	for _, g := range rep.Goals {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", g.Status, g.Name, g.Target, g.Measured)
	}
	tw.Flush()
	fmt.Fprintf(out, "\nsystems:\n")
	for _, s := range []string{sysDirect, sysSidecar, sysPairMTLS, sysPairPlain, sysHAProxy, sysNginx} {
		fmt.Fprintf(out, "  %-10s %s\n", s, systemTitles[s])
	}
	fmt.Fprintf(out, "machine: %s, %s CPUs; proxy on CPU %d, load generator and apps on CPU %d; %s\n",
		rep.Machine["cpu_model"], rep.Machine["nproc"], rep.cfg.ProxyCPU, rep.cfg.LoadCPU, rep.Elapsed)
}

func (rep *Report) goals() []Goal {
	var gs []Goal
	na := func(name, target string) Goal {
		return Goal{Name: name, Target: target, Measured: "not measured in this run", Value: nan, Status: "n/a"}
	}
	status := func(ok bool) string {
		if ok {
			return "PASS"
		}
		return "MISS"
	}

	name, target := "HTTP/1.1 max req/s, one sidecar", "≥ 1.0× HAProxy (stretch 1.2×)"
	if s := rep.summary("http-max", sysSidecar); s != nil && s.RPS.ToHAProxy.ok() {
		v := s.RPS.ToHAProxy
		st := status(v >= 1.0)
		if v >= 1.2 {
			st = "PASS (stretch)"
		}
		gs = append(gs, Goal{name, target, fmt.Sprintf("%.2f× (%.0f vs %.0f req/s)", float64(v), float64(s.RPS.Value), float64(rep.summary("http-max", sysHAProxy).RPS.Value)), v, st})
	} else {
		gs = append(gs, na(name, target))
	}

	name, target = "added p99 at 50% of HAProxy's max, one sidecar", "≤ HAProxy's added p99"
	s, hs := rep.summary("http-50pct", sysSidecar), rep.summary("http-50pct", sysHAProxy)
	if s != nil && hs != nil && s.AddedP99.Value.ok() && hs.AddedP99.Value.ok() {
		a, b := s.AddedP99.Value, hs.AddedP99.Value
		m := fmt.Sprintf("+%s ms vs HAProxy +%s ms", fmtMS(a), fmtMS(b))
		if r := ratio(a, b); r.ok() && b > 0 {
			m += fmt.Sprintf(" (%.2f×)", float64(r))
		}
		gs = append(gs, Goal{name, target, m, ratio(a, b), status(a <= b)})
	} else {
		gs = append(gs, na(name, target))
	}

	name, target = "added p99 at 1,000 req/s, two sidecars with mTLS", "≤ 0.3 ms"
	if s := rep.summary("http-1k", sysPairMTLS); s != nil && s.AddedP99.Value.ok() {
		v := s.AddedP99.Value
		gs = append(gs, Goal{name, target, fmt.Sprintf("+%s ms (p99 %s ms vs direct %s ms)", fmtMS(v), fmtMS(s.P99.Value), fmtMS(s.P99.Value-v)), v, status(v <= 0.3)})
	} else {
		gs = append(gs, na(name, target))
	}

	name, target = "sidecar RSS at 1,000 req/s", "≤ 30 MB"
	if s := rep.summary("http-1k", sysSidecar); s != nil && s.RSSMB.Value.ok() {
		v := s.RSSMB.Value
		m := fmt.Sprintf("%.1f MB (anonymous %.1f MB, the rest the binary's file-backed pages; VmHWM %.1f MB)", float64(v), float64(s.AnonMB.Value), float64(s.HWMMB.Value))
		if p := rep.summary("http-1k", sysPairMTLS); p != nil && p.MaxSidecarRSSMB.Value.ok() {
			m += fmt.Sprintf("; largest sidecar of the mTLS pair %.1f MB (anonymous %.1f MB)", float64(p.MaxSidecarRSSMB.Value), float64(p.MaxSidecarAnonMB.Value))
			v = max(v, p.MaxSidecarRSSMB.Value)
		}
		gs = append(gs, Goal{name, target, m, v, status(v <= 30)})
	} else {
		gs = append(gs, na(name, target))
	}

	name, target = "CPU-seconds per 1,000 requests at 50% of HAProxy's max, one sidecar", "≤ 1.2× HAProxy"
	if s := rep.summary("http-50pct", sysSidecar); s != nil && s.CPUPer1k.ToHAProxy.ok() {
		v := s.CPUPer1k.ToHAProxy
		m := fmt.Sprintf("%.2f× (%.4f vs %.4f s)", float64(v), float64(s.CPUPer1k.Value), float64(rep.summary("http-50pct", sysHAProxy).CPUPer1k.Value))
		if c := rep.summary("http-max", sysSidecar); c != nil && c.CPUPer1k.ToHAProxy.ok() {
			m += fmt.Sprintf("; at max load %.2f×", float64(c.CPUPer1k.ToHAProxy))
		}
		gs = append(gs, Goal{name, target, m, v, status(v <= 1.2)})
	} else {
		gs = append(gs, na(name, target))
	}
	return gs
}

// WriteJSON writes the report to path.
func (rep *Report) WriteJSON(path string) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	b, err := json.MarshalIndent(rep, "", "  ")
	if err != nil {
		return fmt.Errorf("bench: report: %w", err)
	}
	return os.WriteFile(path, append(b, '\n'), 0o644)
}

// Markdown returns the summary table in Markdown (for the README): rows
// workload × system, each figure with its ratio to HAProxy and to direct.
func (rep *Report) Markdown() string {
	var b strings.Builder
	b.WriteString("| workload | system | req/s | ×HAProxy | ×direct | p99 ms | ×HAProxy | ×direct | added p99 ms | ×HAProxy | CPU s / 1k req | ×HAProxy | RSS MB | ×HAProxy |\n")
	b.WriteString("|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n")
	for _, s := range rep.Summaries {
		if s.Rounds == 0 {
			fmt.Fprintf(&b, "| %s | %s | failed |||||||||||| \n", s.Workload, s.System)
			continue
		}
		fmt.Fprintf(&b, "| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", s.Workload, s.System,
			fmtRate(s.RPS.Value), fmtRatio(s.RPS.ToHAProxy), fmtRatio(s.RPS.ToDirect),
			fmtMS(s.P99.Value), fmtRatio(s.P99.ToHAProxy), fmtRatio(s.P99.ToDirect),
			fmtMS(s.AddedP99.Value), fmtRatio(s.AddedP99.ToHAProxy),
			fmtCPU(s.CPUPer1k.Value), fmtRatio(s.CPUPer1k.ToHAProxy),
			fmtMB(s.RSSMB.Value), fmtRatio(s.RSSMB.ToHAProxy))
	}
	b.WriteString("\n| goal | target | measured | status |\n|---|---|---|---|\n")
	for _, g := range rep.Goals {
		fmt.Fprintf(&b, "| %s | %s | %s | %s |\n", g.Name, g.Target, g.Measured, g.Status)
	}
	return b.String()
}

// machine describes the host: CPU model, count, kernel, Go.
func machine() map[string]string {
	m := map[string]string{"go": runtime.Version()}
	if b, err := os.ReadFile("/sys/devices/system/cpu/online"); err == nil {
		m["cpus_online"] = strings.TrimSpace(string(b)) // runtime.NumCPU is 1 here: the harness is pinned
	}
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		n := 0
		for line := range strings.Lines(string(b)) {
			k, v, ok := strings.Cut(line, ":")
			switch k = strings.TrimSpace(k); {
			case ok && k == "model name" && m["cpu_model"] == "":
				m["cpu_model"] = strings.TrimSpace(v)
			case ok && k == "processor":
				n++
			}
		}
		m["nproc"] = fmt.Sprint(n)
	}
	if b, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		m["kernel"] = strings.TrimSpace(string(b))
	}
	if b, err := os.ReadFile("/proc/loadavg"); err == nil {
		m["loadavg_at_start"] = strings.TrimSpace(string(b))
	}
	return m
}

// profile fetches a CPU profile from each meshlet sidecar of r for about
// the measured run, into the pprof directory.
func (h *harness) profile(ctx context.Context, r *running, workload, sys string) chan error {
	done := make(chan error, 1)
	secs := max(1, int(h.cfg.Duration.Seconds())-1)
	go func() {
		var (
			wg   sync.WaitGroup
			mu   sync.Mutex // guards errs
			errs []string
		)
		for _, p := range r.procs {
			if !isSidecar(p.name) {
				continue
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				if err := h.fetchProfile(ctx, p.name, filepath.Join(h.cfg.PprofDir, fmt.Sprintf("%s-%s-%s.pprof", workload, sys, p.name)), secs); err != nil {
					mu.Lock()
					errs = append(errs, err.Error())
					mu.Unlock()
				}
			}()
		}
		wg.Wait()
		if len(errs) > 0 {
			done <- errors.New(strings.Join(errs, "; "))
			return
		}
		done <- nil
	}()
	return done
}

func (h *harness) fetchProfile(ctx context.Context, node, path string, secs int) error {
	url := fmt.Sprintf("http://%s/debug/pprof/profile?seconds=%d", h.adminAddr[node], secs)
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("%s: status %d", url, resp.StatusCode)
	}
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	defer f.Close()
	_, err = io.Copy(f, resp.Body)
	return err
}
