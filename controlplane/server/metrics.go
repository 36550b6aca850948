package server

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Triggers of a push (the trigger label of
// meshlet_controlplane_push_latency_seconds).
const (
	// TriggerConsul is a new catalog from the Consul watcher (SetCatalog).
	TriggerConsul = "consul"
	// TriggerPolicy is a new policy set from the policy watcher
	// (SetPolicies).
	TriggerPolicy = "policy"
)

// Proxy kinds (the kind label of meshlet_controlplane_proxies_connected and
// ProxyStatus.Kind).
const (
	// KindSidecar is a sidecar (meshlet's, or Envoy), keyed by its node ID.
	KindSidecar = "sidecar"
	// KindProxyless is a proxyless gRPC client (see xds.IsProxylessGRPC).
	KindProxyless = "proxyless"
)

// Reasons a proxy's snapshot is held back (the reason label of
// meshlet_controlplane_snapshots_held_back).
const (
	// HeldNotReady: the Connect CA roots or the leaf certificate of the
	// proxy's service have not arrived (translate.ErrNotReady).
	HeldNotReady = "not_ready"
	// HeldInconsistent: the snapshot failed Consistent() (a reference
	// without its resource).
	HeldInconsistent = "inconsistent"
	// HeldError: translation or the snapshot cache failed otherwise.
	HeldError = "error"
)

// LatencyBuckets are the buckets, in seconds, of the push latency and build
// duration histograms (0.5 ms to 30 s).
var LatencyBuckets = []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30}

// metrics are the Server's Prometheus metrics; it is the Collector that
// Server.Collector returns:
//
//	meshlet_controlplane_proxies_connected{kind}
//	    ADS streams whose node is known (it sent its first request), by kind:
//	    sidecar or proxyless (gauge)
//	meshlet_controlplane_push_latency_seconds{trigger}
//	    time from an input change (trigger consul: the watcher delivered a
//	    new catalog; policy: the policy watcher applied a new set) to a
//	    snapshot built from it being set in the cache (for the proxyless
//	    clients: the changed resources set in their caches); one
//	    observation per sidecar whose snapshot changed, and one for the
//	    proxyless clients when their resources changed, per trigger pending
//	    in the build (histogram)
//	meshlet_controlplane_snapshot_build_seconds
//	    one build pass over every proxy and the proxyless group (histogram)
//	meshlet_controlplane_translations_total{kind}
//	    snapshots translated again because their inputs changed, by kind:
//	    sidecar (one proxy whose catalog scope or policy set changed) or
//	    proxyless (one service of the proxyless group); the others of a
//	    build pass are kept as they were
//	meshlet_controlplane_snapshots_set_total
//	    snapshots set in the cache (a sidecar whose content changed), and
//	    builds that changed resources of the proxyless clients' caches
//	meshlet_controlplane_snapshots_held_back{reason}
//	    nodes whose last build was not published and who keep their last
//	    snapshot, by reason: not_ready, inconsistent, error (gauge)
//	meshlet_controlplane_xds_acks_total{type}
//	    responses acknowledged, by type URL
//	meshlet_controlplane_xds_nacks_total{node, type}
//	    responses rejected, by node ID and type URL
//
// type is the full type URL (type.googleapis.com/envoy.config.cluster.v3.Cluster),
// as in the sidecar's meshlet_sidecar_xds_updates_total.
type metrics struct {
	s *Server // read at scrape time for the gauges

	pushLatency  *prometheus.HistogramVec
	build        prometheus.Histogram
	translated   *prometheus.CounterVec
	snapshotsSet prometheus.Counter
	acks         *prometheus.CounterVec
	nacks        *prometheus.CounterVec
	connected    *prometheus.Desc
	heldBack     *prometheus.Desc
}

var _ prometheus.Collector = (*metrics)(nil)

func newMetrics(s *Server) *metrics {
	return &metrics{
		s: s,
		pushLatency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "meshlet_controlplane_push_latency_seconds",
			Help:    "Time from a Consul catalog or policy change to a snapshot built from it being set, per sidecar whose snapshot changed and for the proxyless clients when their resources changed, by trigger (consul or policy).",
			Buckets: LatencyBuckets,
		}, []string{"trigger"}),
		build: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "meshlet_controlplane_snapshot_build_seconds",
			Help:    "Duration of one build pass over every proxy and the proxyless group.",
			Buckets: LatencyBuckets,
		}),
		translated: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "meshlet_controlplane_translations_total",
			Help: "Snapshots translated again because their inputs changed, by kind: sidecar (a proxy whose catalog scope or policies changed) or proxyless (one service of the proxyless group).",
		}, []string{"kind"}),
		snapshotsSet: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "meshlet_controlplane_snapshots_set_total",
			Help: "Snapshots set in the cache (sidecars whose resources changed), and builds that changed the proxyless clients' resources.",
		}),
		acks: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "meshlet_controlplane_xds_acks_total",
			Help: "xDS responses acknowledged by proxies, by type URL.",
		}, []string{"type"}),
		nacks: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "meshlet_controlplane_xds_nacks_total",
			Help: "xDS responses rejected by proxies (NACK), by node ID and type URL.",
		}, []string{"node", "type"}),
		connected: prometheus.NewDesc("meshlet_controlplane_proxies_connected",
			"ADS streams whose node is known, by kind (sidecar or proxyless).", []string{"kind"}, nil),
		heldBack: prometheus.NewDesc("meshlet_controlplane_snapshots_held_back",
			"Nodes that keep their last snapshot because the latest build was not published, by reason (not_ready, inconsistent, error).", []string{"reason"}, nil),
	}
}

// Describe implements prometheus.Collector.
func (m *metrics) Describe(ch chan<- *prometheus.Desc) {
	m.pushLatency.Describe(ch)
	m.build.Describe(ch)
	m.translated.Describe(ch)
	m.snapshotsSet.Describe(ch)
	m.acks.Describe(ch)
	m.nacks.Describe(ch)
	ch <- m.connected
	ch <- m.heldBack
}

// Collect implements prometheus.Collector: the counters and histograms as
// they are, the gauges counted from the Server's state now.
func (m *metrics) Collect(ch chan<- prometheus.Metric) {
	m.pushLatency.Collect(ch)
	m.build.Collect(ch)
	m.translated.Collect(ch)
	m.snapshotsSet.Collect(ch)
	m.acks.Collect(ch)
	m.nacks.Collect(ch)

	connected := map[string]int{KindSidecar: 0, KindProxyless: 0}
	held := map[string]int{HeldNotReady: 0, HeldInconsistent: 0, HeldError: 0}
	s := m.s
	s.mu.Lock()
	for _, n := range s.nodes {
		for _, st := range n.streams {
			connected[proxyKind(st.node)]++
		}
		if n.heldReason != "" {
			held[n.heldReason]++
		}
	}
	s.mu.Unlock()
	for kind, n := range connected {
		ch <- prometheus.MustNewConstMetric(m.connected, prometheus.GaugeValue, float64(n), kind)
	}
	for reason, n := range held {
		ch <- prometheus.MustNewConstMetric(m.heldBack, prometheus.GaugeValue, float64(n), reason)
	}
}

// observePush records the push latency of one node's new snapshot for
// every trigger pending in the build that produced it.
func (m *metrics) observePush(pending map[string]time.Time, now time.Time) {
	for trigger, at := range pending {
		m.pushLatency.WithLabelValues(trigger).Observe(now.Sub(at).Seconds())
	}
}

// typeLabel is the type label value of a type URL (the URL itself).
func typeLabel(typeURL string) string {
	if typeURL == "" {
		return "unknown"
	}
	return typeURL
}
