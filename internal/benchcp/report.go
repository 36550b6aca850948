package main

import (
	"cmp"
	"fmt"
	"io"
	"math"
	"slices"
	"strconv"
	"strings"
	"time"
)

// Goals of issue 7 for the control plane.
const (
	goalP99 = time.Second
	goalRSS = 1 << 30
)

// result is the JSON written to <out>/result.json.
type result struct {
	Machine map[string]any `json:"machine"`
	Config  map[string]any `json:"config"`
	Setup   struct {
		Services        int     `json:"services"`
		Instances       int     `json:"instances"`
		Sidecars        int     `json:"sidecars"`
		Nodes           int     `json:"nodes"`
		RegisterSeconds float64 `json:"register_seconds"`
		// WarmLeavesSeconds is how long the agent took to sign every
		// meshed service's leaf certificate before the control plane
		// started (-warm-leaves; 0 when off).
		WarmLeavesSeconds float64 `json:"warm_leaves_seconds"`
		// Fanout is how many sidecars have each meshed service upstream.
		Fanout summary `json:"fanout"`
	} `json:"setup"`
	// Auth is how the sidecars dialled the control plane under test.
	Auth struct {
		// Mode is "authenticated" (ADS over TLS, a Consul ACL token on
		// every stream) or "insecure" (-insecure: -xds-insecure).
		Mode string `json:"mode"`
		// Tokens were made one per meshed service; DistinctTokens are the
		// different ones the sidecars present.
		Tokens         int     `json:"tokens"`
		DistinctTokens int     `json:"distinct_tokens"`
		TokensSeconds  float64 `json:"tokens_seconds"`
		// InitialSyncLookups are the token reviews of the initial sync
		// (about one asked of Consul per distinct token).
		InitialSyncLookups lookupCount `json:"initial_sync_lookups"`
		// Denied counts the streams refused over the run, by reason.
		Denied map[string]int `json:"denied"`
	} `json:"auth"`
	InitialSync syncResult `json:"initial_sync"`
	Changes     struct {
		Total  int            `json:"total"`
		ByKind map[string]int `json:"by_kind"`
		// Affected counts changes with at least one affected sidecar.
		Affected int `json:"affected"`
		// LatencyMS: per affected change, from just before the Consul
		// write to the last affected sidecar receiving it.
		LatencyMS summary `json:"latency_ms"`
		// DeliveryMS: per (change, affected sidecar).
		DeliveryMS summary `json:"delivery_ms"`
		// AffectedPerChange: sidecars per affected change.
		AffectedPerChange summary `json:"affected_sidecars_per_change"`
		// WriteMS: the Consul write itself (catalog register/deregister).
		WriteMS summary `json:"consul_write_ms"`
		// ControlplaneMS estimates, from the control plane's own push
		// latency histogram (upper bucket bounds), the part of the latency
		// from the watcher delivering a new catalog to the snapshot being
		// set, per node whose snapshot changed.
		ControlplaneMS struct {
			P50 float64 `json:"p50_le"`
			P99 float64 `json:"p99_le"`
		} `json:"controlplane_catalog_to_snapshot_ms"`
		Missed       int        `json:"missed_deliveries"`
		Pushes       pushCounts `json:"pushes"`
		PhaseSeconds float64    `json:"phase_seconds"`
	} `json:"changes"`
	Controlplane struct {
		RSSPeakMB         float64            `json:"rss_peak_mb"`
		RSSEndMB          float64            `json:"rss_end_mb"`
		CPUSecondsChanges float64            `json:"cpu_seconds_changes"`
		CPUSecondsTotal   float64            `json:"cpu_seconds_total"`
		Metrics           map[string]float64 `json:"metrics"`
	} `json:"controlplane"`
	Storm *stormResult `json:"reconnect_storm,omitempty"`
	// Insecure is the initial sync of a fresh control plane with
	// -xds-insecure on the same Consul (-compare-insecure), Ratios the
	// authenticated run's over it.
	Insecure *insecureResult `json:"insecure,omitempty"`
	Ratios   *ratios         `json:"authenticated_over_insecure,omitempty"`
	Consul   struct {
		RSSPeakMB       float64 `json:"rss_peak_mb"`
		CPUSecondsTotal float64 `json:"cpu_seconds_total"`
	} `json:"consul"`
	Goals struct {
		// P99Ratio is the p99 change latency ÷ 1 s; RSSRatio the peak RSS ÷
		// 1 GiB. ≤ 1 meets the goal.
		P99Ratio float64 `json:"p99_latency_ratio"`
		RSSRatio float64 `json:"rss_ratio"`
		Met      bool    `json:"met"`
	} `json:"goals"`
	WallSeconds float64 `json:"wall_seconds"`
}

// syncResult is an initial sync: every simulated sidecar connecting at
// once to a control plane just started.
type syncResult struct {
	// Seconds from the control plane's start to the last simulated
	// sidecar having a whole config (listeners, routes, clusters,
	// endpoints, secrets); ReadySeconds to its first catalog (/ready).
	Seconds      float64 `json:"seconds"`
	ReadySeconds float64 `json:"ready_seconds"`
	// CPUSeconds is the control plane's CPU from its start to then.
	CPUSeconds float64 `json:"controlplane_cpu_seconds"`
	RSSMB      float64 `json:"controlplane_rss_mb"`
}

// stormResult is the reconnect storm: every simulated sidecar stopped,
// then all started again at once against the same control plane.
type stormResult struct {
	Sidecars int `json:"sidecars"`
	// Seconds from the restart to the last sidecar having a whole config
	// again; CPUSeconds the control plane's CPU meanwhile.
	Seconds    float64 `json:"seconds"`
	CPUSeconds float64 `json:"controlplane_cpu_seconds"`
	// Lookups are the token reviews during the storm; MaxConsulLookups
	// the most allowed (one per distinct token); OK whether Lookups.Consul
	// stayed within it.
	Lookups          lookupCount `json:"lookups"`
	MaxConsulLookups int         `json:"max_consul_lookups"`
	OK               bool        `json:"ok"`
	// CacheAgeSeconds bounds the age of the oldest cached review at the
	// storm's end (the control plane's uptime); WithinTTL whether it is
	// below the cache's TTL, in which case no Consul lookup is expected.
	CacheAgeSeconds float64        `json:"cache_age_seconds"`
	WithinTTL       bool           `json:"within_cache_ttl"`
	Denied          map[string]int `json:"denied"`
}

// insecureResult is the unauthenticated comparison.
type insecureResult struct {
	InitialSync syncResult `json:"initial_sync"`
}

// ratios are the authenticated initial sync's figures over the insecure
// one's.
type ratios struct {
	InitialSyncSeconds float64 `json:"initial_sync_seconds"`
	CPUSeconds         float64 `json:"initial_sync_cpu_seconds"`
}

// summary is a distribution: count, p50, p90, p99, max, mean.
type summary struct {
	N    int     `json:"n"`
	P50  float64 `json:"p50"`
	P90  float64 `json:"p90"`
	P99  float64 `json:"p99"`
	Max  float64 `json:"max"`
	Mean float64 `json:"mean"`
}

// summarize returns the distribution of vs (nearest-rank percentiles).
func summarize(vs []float64) summary {
	if len(vs) == 0 {
		return summary{}
	}
	s := slices.Clone(vs)
	slices.Sort(s)
	rank := func(p float64) float64 {
		i := int(math.Ceil(p*float64(len(s)))) - 1
		return s[max(0, min(i, len(s)-1))]
	}
	sum := 0.0
	for _, v := range s {
		sum += v
	}
	return summary{N: len(s), P50: rank(0.50), P90: rank(0.90), P99: rank(0.99), Max: s[len(s)-1], Mean: sum / float64(len(s))}
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

func fanout(t *topology) summary {
	var vs []float64
	for _, s := range t.services {
		if len(s.sidecars) > 0 {
			vs = append(vs, float64(len(t.down[s.name])))
		}
	}
	return summarize(vs)
}

func (r *result) summarize(changes []*change, tr *tracker) {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	r.Changes.Total = len(changes)
	r.Changes.ByKind = map[string]int{}
	var lat, per, writes, deliveries []float64
	for _, c := range changes {
		r.Changes.ByKind[c.kind]++
		writes = append(writes, ms(c.write))
		if c.want == 0 {
			continue
		}
		r.Changes.Affected++
		per = append(per, float64(c.want))
		if c.got == c.want {
			lat = append(lat, ms(c.last))
		}
	}
	for _, d := range tr.deliveries {
		deliveries = append(deliveries, ms(d))
	}
	r.Changes.LatencyMS = summarize(lat)
	r.Changes.DeliveryMS = summarize(deliveries)
	r.Changes.AffectedPerChange = summarize(per)
	r.Changes.WriteMS = summarize(writes)
	r.Changes.Pushes = tr.pushes
	r.Goals.P99Ratio = r.Changes.LatencyMS.P99 / ms(goalP99)
	r.Goals.RSSRatio = r.Controlplane.RSSPeakMB / (goalRSS / (1 << 20))
	r.Goals.Met = r.Goals.P99Ratio <= 1 && r.Goals.RSSRatio <= 1 && r.Changes.Missed == 0 && r.Changes.Pushes.Unaffected == 0
}

// histogramQuantile estimates quantile q (0..1) of the Prometheus histogram
// samples name{<label>,le=...} observed between two scrapes, as the upper
// bound of the bucket it falls in, in milliseconds; 1e9 beyond the last
// finite bucket, -1 when nothing was observed.
func histogramQuantile(before, after map[string]float64, name, label string, q float64) float64 {
	type bucket struct{ le, n float64 }
	var bs []bucket
	prefix := name + "_bucket{" + label + ",le=\""
	for k, v := range after {
		rest, ok := strings.CutPrefix(k, prefix)
		if !ok {
			continue
		}
		le, err := strconv.ParseFloat(strings.TrimSuffix(rest, "\"}"), 64)
		if err != nil {
			continue
		}
		bs = append(bs, bucket{le, v - before[k]})
	}
	slices.SortFunc(bs, func(a, b bucket) int { return cmp.Compare(a.le, b.le) })
	if len(bs) == 0 || bs[len(bs)-1].n == 0 {
		return -1
	}
	total := bs[len(bs)-1].n
	for _, b := range bs {
		if b.n >= q*total && !math.IsInf(b.le, 1) {
			return b.le * 1000
		}
	}
	return 1e9 // beyond the last finite bucket
}

// pickMetrics keeps the control plane's own metrics worth reporting.
func pickMetrics(m map[string]float64) map[string]float64 {
	out := map[string]float64{}
	for k, v := range m {
		switch {
		case strings.HasPrefix(k, "meshlet_controlplane_snapshot_build_seconds_sum"),
			strings.HasPrefix(k, "meshlet_controlplane_snapshot_build_seconds_count"),
			strings.HasPrefix(k, "meshlet_controlplane_snapshots_set_total"),
			k == "go_goroutines", k == "go_memstats_heap_inuse_bytes", k == "process_resident_memory_bytes":
			out[k] = v
		}
	}
	return out
}

func (r *result) print(w io.Writer) {
	c := &r.Changes
	fmt.Fprintf(w, "\nmeshlet control-plane scale benchmark (%v CPUs, %v, load %v at start)\n", r.Machine["cpus"], r.Machine["cpu_model"], r.Machine["loadavg_at_start"])
	fmt.Fprintf(w, "mesh: %d services, %d instances, %d sidecars (simulated ADS clients) on %d nodes; fan-out per meshed service mean %.1f, max %.0f\n",
		r.Setup.Services, r.Setup.Instances, r.Setup.Sidecars, r.Setup.Nodes, r.Setup.Fanout.Mean, r.Setup.Fanout.Max)
	fmt.Fprintf(w, "registration through the catalog API: %.1f s\n\n", r.Setup.RegisterSeconds)
	row := func(k, v string) { fmt.Fprintf(w, "  %-46s %s\n", k, v) }
	dist := func(s summary, unit string) string {
		return fmt.Sprintf("p50 %.0f  p90 %.0f  p99 %.0f  max %.0f %s (n=%d)", s.P50, s.P90, s.P99, s.Max, unit, s.N)
	}
	syncRow := func(k string, s syncResult) {
		row(k, fmt.Sprintf("%.1f s (first catalog %.1f s; control plane CPU %.1f s, RSS then %.0f MB)", s.Seconds, s.ReadySeconds, s.CPUSeconds, s.RSSMB))
	}
	if r.Auth.Mode == "authenticated" {
		fmt.Fprintf(w, "ADS over TLS, a Consul ACL token per stream: %d tokens (one per meshed service, made in %.1f s), %d distinct among the %d sidecars\n",
			r.Auth.Tokens, r.Auth.TokensSeconds, r.Auth.DistinctTokens, r.Setup.Sidecars)
	} else {
		fmt.Fprintf(w, "ADS in plaintext without tokens (-insecure)\n")
	}
	if r.Setup.WarmLeavesSeconds > 0 {
		fmt.Fprintf(w, "leaf certificates signed by the agent before the control plane started: %.1f s (-warm-leaves)\n", r.Setup.WarmLeavesSeconds)
	}
	fmt.Fprintln(w)
	syncRow("initial sync of every sidecar ("+r.Auth.Mode+")", r.InitialSync)
	if r.Auth.Mode == "authenticated" {
		l := r.Auth.InitialSyncLookups
		row("  token reviews: asked of Consul / cached", fmt.Sprintf("%d / %d (%d distinct tokens)", l.Consul, l.Cached, r.Auth.DistinctTokens))
	}
	if r.Insecure != nil {
		syncRow("initial sync of every sidecar (insecure)", r.Insecure.InitialSync)
	}
	if r.Ratios != nil {
		row("authenticated ÷ insecure", fmt.Sprintf("time to all served %.2f×, control plane CPU %.2f×", r.Ratios.InitialSyncSeconds, r.Ratios.CPUSeconds))
	}
	row("changes written", fmt.Sprintf("%d at %v/s (%s), %d with affected sidecars", c.Total, r.Config["rate_per_second"], kinds(c.ByKind), c.Affected))
	row("write → all affected sidecars have it", dist(c.LatencyMS, "ms"))
	row("write → each affected sidecar", dist(c.DeliveryMS, "ms"))
	row("affected sidecars per change", fmt.Sprintf("mean %.1f, max %.0f", c.AffectedPerChange.Mean, c.AffectedPerChange.Max))
	row("Consul write itself", dist(c.WriteMS, "ms"))
	row("of which catalog → snapshot set (histogram)", fmt.Sprintf("p50 ≤ %g  p99 ≤ %g ms", c.ControlplaneMS.P50, c.ControlplaneMS.P99))
	row("pushes to affected sidecars", fmt.Sprintf("%d", c.Pushes.Affected))
	row("pushes to unaffected sidecars", fmt.Sprintf("%d %v (EDS with changed endpoints %d, no-op %d)", c.Pushes.Unaffected, c.Pushes.UnaffectedByType, c.Pushes.UnaffectedEDSNew, c.Pushes.UnaffectedNoop))
	row("deliveries missed", fmt.Sprintf("%d", c.Missed))
	if st := r.Storm; st != nil {
		row("reconnect storm: all served again", fmt.Sprintf("%.1f s after %d sidecars restarted at once (control plane CPU %.1f s)", st.Seconds, st.Sidecars, st.CPUSeconds))
		if r.Auth.Mode == "authenticated" {
			expect := "expected 0: within the cache TTL"
			if !st.WithinTTL {
				expect = "cache entries may have expired"
			}
			verdict := "OK"
			if !st.OK {
				verdict = "FAIL"
			}
			row("  token reviews: asked of Consul / cached", fmt.Sprintf("%d / %d (at most %d, one per distinct token: %s; %s, cache age ≤ %.0f s)",
				st.Lookups.Consul, st.Lookups.Cached, st.MaxConsulLookups, verdict, expect, st.CacheAgeSeconds))
		}
		if len(st.Denied) > 0 {
			row("  streams refused during the storm", fmt.Sprintf("%v", st.Denied))
		}
	}
	if len(r.Auth.Denied) > 0 {
		row("streams refused (whole "+r.Auth.Mode+" run)", fmt.Sprintf("%v", r.Auth.Denied))
	}
	row("control plane RSS peak / at end", fmt.Sprintf("%.0f MB / %.0f MB", r.Controlplane.RSSPeakMB, r.Controlplane.RSSEndMB))
	row("control plane CPU during changes / total", fmt.Sprintf("%.1f s over %.0f s / %.1f s", r.Controlplane.CPUSecondsChanges, c.PhaseSeconds, r.Controlplane.CPUSecondsTotal))
	row("Consul RSS peak / CPU total", fmt.Sprintf("%.0f MB / %.1f s", r.Consul.RSSPeakMB, r.Consul.CPUSecondsTotal))
	fmt.Fprintf(w, "\ngoals (issue 7): p99 %.0f ms ÷ 1 s = %.2f×   RSS %.0f MB ÷ 1 GiB = %.2f×   unaffected pushes %d   → %s\n",
		c.LatencyMS.P99, r.Goals.P99Ratio, r.Controlplane.RSSPeakMB, r.Goals.RSSRatio, c.Pushes.Unaffected, map[bool]string{true: "MET", false: "NOT MET"}[r.Goals.Met])
	if r.Ratios != nil || (r.Storm != nil && r.Auth.Mode == "authenticated") {
		fmt.Fprintf(w, "trust (issue 18):")
		if q := r.Ratios; q != nil {
			fmt.Fprintf(w, " authenticated ÷ insecure initial sync: time %.2f×, CPU %.2f×  ", q.InitialSyncSeconds, q.CPUSeconds)
		}
		if st := r.Storm; st != nil && r.Auth.Mode == "authenticated" {
			fmt.Fprintf(w, " reconnect storm: %d Consul lookups for %d tokens → %s", st.Lookups.Consul, st.MaxConsulLookups, map[bool]string{true: "OK", false: "FAIL"}[st.OK])
		}
		fmt.Fprintln(w)
	}
}

func kinds(m map[string]int) string {
	var parts []string
	for _, k := range []string{kindSidecarHealth, kindPlainHealth, kindScaleOut, kindScaleIn} {
		if m[k] > 0 {
			parts = append(parts, fmt.Sprintf("%s %d", k, m[k]))
		}
	}
	return strings.Join(parts, ", ")
}
