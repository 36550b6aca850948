// Package telemetry holds the sidecar's Prometheus metrics. Each Sidecar has
// its own registry, served on the admin endpoint's /metrics.
package telemetry

import (
	"strconv"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/meshlet/meshlet/sidecar/cluster"
	"github.com/meshlet/meshlet/sidecar/config"
	"github.com/meshlet/meshlet/sidecar/httpproxy"
	"github.com/meshlet/meshlet/sidecar/listener"
	"github.com/meshlet/meshlet/sidecar/tcpproxy"
	"github.com/meshlet/meshlet/sidecar/tlsid"
	"github.com/meshlet/meshlet/sidecar/tracing"
	"github.com/meshlet/meshlet/sidecar/udpproxy"
	"github.com/meshlet/meshlet/xds"
)

// Metrics are the sidecar's request, resilience, xDS and tracing metrics:
//
//	meshlet_sidecar_requests_total{listener, cluster, route, code, reason}
//	    requests handled by HTTP listeners; code "0" when the downstream left
//	    first; reason is the typed failure reason when the sidecar failed the
//	    request, else ""; cluster and route are "" when no route matched
//	meshlet_sidecar_request_duration_seconds{listener, cluster, route, code, reason}
//	    histogram of the time from the request headers to the end of the
//	    response
//	meshlet_sidecar_downstream_connections_active{listener}
//	meshlet_sidecar_tcp_idle_timeouts_total{listener}
//	    TCP proxy connections closed by their idle timeout
//	meshlet_sidecar_udp_sessions_active{listener}
//	meshlet_sidecar_udp_sessions_total{listener}
//	    UDP sessions opened (one per downstream address)
//	meshlet_sidecar_udp_sessions_closed_total{listener, reason}
//	    idle_timeout, endpoint_gone, upstream_refused, upstream_error, shutdown
//	meshlet_sidecar_udp_datagrams_total{listener, direction}
//	meshlet_sidecar_udp_bytes_total{listener, direction}
//	    forwarded datagrams and their payload bytes; direction to_upstream
//	    or to_downstream
//	meshlet_sidecar_udp_datagrams_dropped_total{listener, reason}
//	    no_cluster, no_healthy_upstream, circuit_open, overflow,
//	    connect_failure, too_large, upstream_send_error, downstream_send_error
//	meshlet_sidecar_upstream_connections_active{cluster}
//	meshlet_sidecar_upstream_requests_active{cluster}
//	meshlet_sidecar_upstream_requests_pending{cluster}
//	    (requests waiting for a connection)
//	meshlet_sidecar_upstream_retries_total{cluster, cause}
//	    retries sent, by retry_on condition
//	meshlet_sidecar_upstream_retries_denied_total{cluster, reason}
//	    retries due but not sent: retry_budget_exhausted, max_retries,
//	    non_idempotent, body_too_large
//	meshlet_sidecar_upstream_overflow_total{cluster, threshold}
//	    requests refused by a circuit-breaker threshold
//	meshlet_sidecar_outlier_ejections_total{cluster, endpoint, reason}
//	meshlet_sidecar_endpoint_breaker_transitions_total{cluster, endpoint, state}
//	meshlet_sidecar_endpoint_breaker_state{cluster, endpoint}
//	    0 closed, 1 half-open, 2 open
//	meshlet_sidecar_tls_handshakes_total{side, name, result}
//	    mTLS handshakes: side "inbound" (name = listener) or "upstream"
//	    (name = cluster); result "ok" or the failure reason (expired,
//	    unknown_ca, wrong_spiffe_id, plaintext, not_tls, ...)
//	meshlet_sidecar_capture_refused_total{listener, reason}
//	    connections a capture listener (transparent interception) closed
//	    without serving them: no_filter_chain (no chain matched the original
//	    destination and there is no default chain: registry-only),
//	    not_redirected (dialled to the capture port directly), capture_loop
//	    (the original destination is a capture listener of this sidecar)
//	meshlet_sidecar_capture_passthrough_total{listener}
//	    connections no chain of a capture listener matched, given its
//	    default chain (the pass-through to their original destination)
//	meshlet_sidecar_downstream_accept_errors_total{listener, reason}
//	    failed accepts of a listener: fd_exhausted (EMFILE/ENFILE: the
//	    process or system is out of file descriptors; the connection waits
//	    in the backlog until one is free) or other
//	meshlet_sidecar_authz_denied_total{listener, rule}
//	    requests and connections refused by authorization, by rule
//	meshlet_sidecar_certificate_expiry_seconds{secret, kind, spiffe_id, serial}
//	    seconds until each certificate of each secret expires
//	meshlet_sidecar_xds_connected
//	    1 while the ADS stream to the control plane is up, else 0
//	meshlet_sidecar_xds_updates_total{type, result}
//	    xDS responses by type URL, result "ack" or "nack"
//	meshlet_sidecar_xds_version_info{type, version}
//	    1 for the last accepted version of each type URL
//	meshlet_sidecar_tracing_spans_exported_total
//	meshlet_sidecar_tracing_spans_dropped_total{reason}
//	    spans lost: queue_full (the bounded export queue was full) or
//	    export_failed (the collector refused them or was unreachable)
//
// plus the Go runtime and process collectors.
type Metrics struct {
	// Registry holds every metric; serve it with promhttp.HandlerFor.
	Registry *prometheus.Registry

	requests           *prometheus.CounterVec
	duration           *prometheus.HistogramVec
	downConns          *prometheus.GaugeVec
	tcpIdle            *prometheus.CounterVec
	udp                *udpVecs
	spansExported      prometheus.Counter
	spansDropped       *prometheus.CounterVec
	retries            *prometheus.CounterVec
	retriesDenied      *prometheus.CounterVec
	overflow           *prometheus.CounterVec
	ejections          *prometheus.CounterVec
	breakerTrans       *prometheus.CounterVec
	breakerState       *prometheus.GaugeVec
	handshakes         *prometheus.CounterVec
	authzDenied        *prometheus.CounterVec
	captureRefused     *prometheus.CounterVec
	acceptErrors       *prometheus.CounterVec
	capturePassthrough *prometheus.CounterVec

	// children caches the request metrics of each label set (sync.Map of
	// requestKey → *requestChildren), sparing the hot path the label hashing
	// and locking of WithLabelValues; conns caches gauges by listener.
	children sync.Map
	conns    sync.Map
}

type requestKey struct {
	listener, cluster, route string
	code                     int
	reason                   xds.FailureReason
}

type requestChildren struct {
	count    prometheus.Counter
	duration prometheus.Observer
}

var (
	_ cluster.Events           = (*Metrics)(nil)
	_ httpproxy.Recorder       = (*Metrics)(nil)
	_ tcpproxy.Recorder        = (*Metrics)(nil)
	_ udpproxy.Recorder        = (*Metrics)(nil)
	_ tracing.Events           = (*Metrics)(nil)
	_ listener.CaptureRecorder = (*Metrics)(nil)
)

// DurationBuckets are the request duration histogram's buckets, in seconds
// (0.5 ms to 60 s).
var DurationBuckets = []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60}

// New returns Metrics registered in a new registry.
func New() *Metrics {
	m := &Metrics{
		Registry: prometheus.NewRegistry(),
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "meshlet_sidecar_requests_total", Help: "HTTP requests handled, by listener, cluster, route, status code and typed failure reason.",
		}, []string{"listener", "cluster", "route", "code", "reason"}),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "meshlet_sidecar_request_duration_seconds", Help: "Time from the request headers to the end of the response, by listener, cluster, route, status code and typed failure reason.",
			Buckets: DurationBuckets,
		}, []string{"listener", "cluster", "route", "code", "reason"}),
		downConns: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "meshlet_sidecar_downstream_connections_active", Help: "Open downstream connections, by listener.",
		}, []string{"listener"}),
		spansExported: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "meshlet_sidecar_tracing_spans_exported_total", Help: "Spans accepted by the OTLP collector.",
		}),
		spansDropped: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "meshlet_sidecar_tracing_spans_dropped_total", Help: "Spans lost, by reason: queue_full or export_failed.",
		}, []string{"reason"}),
		retries: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "meshlet_sidecar_upstream_retries_total", Help: "Retries sent to upstream clusters, by retry_on condition.",
		}, []string{"cluster", "cause"}),
		retriesDenied: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "meshlet_sidecar_upstream_retries_denied_total", Help: "Retries that were due but not sent, by reason.",
		}, []string{"cluster", "reason"}),
		overflow: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "meshlet_sidecar_upstream_overflow_total", Help: "Requests refused by a circuit-breaker threshold.",
		}, []string{"cluster", "threshold"}),
		ejections: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "meshlet_sidecar_outlier_ejections_total", Help: "Endpoints ejected by outlier detection.",
		}, []string{"cluster", "endpoint", "reason"}),
		breakerTrans: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "meshlet_sidecar_endpoint_breaker_transitions_total", Help: "Endpoint breaker state changes, by the state entered.",
		}, []string{"cluster", "endpoint", "state"}),
		breakerState: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "meshlet_sidecar_endpoint_breaker_state", Help: "Endpoint breaker state: 0 closed, 1 half-open, 2 open.",
		}, []string{"cluster", "endpoint"}),
	}
	m.handshakes = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "meshlet_sidecar_tls_handshakes_total", Help: "mTLS handshakes by side, listener or cluster, and result (ok or the failure reason).",
	}, []string{"side", "name", "result"})
	m.authzDenied = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "meshlet_sidecar_authz_denied_total", Help: "Requests and connections refused by authorization, by the rule that refused them.",
	}, []string{"listener", "rule"})
	m.tcpIdle = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "meshlet_sidecar_tcp_idle_timeouts_total", Help: "TCP proxy connections closed because no byte moved either way for the idle timeout, by listener.",
	}, []string{"listener"})
	m.captureRefused = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "meshlet_sidecar_capture_refused_total", Help: "Connections a capture listener closed without serving them, by reason: no_filter_chain, not_redirected, capture_loop.",
	}, []string{"listener", "reason"})
	m.capturePassthrough = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "meshlet_sidecar_capture_passthrough_total", Help: "Connections no filter chain of a capture listener matched, given its default chain (pass-through to the original destination).",
	}, []string{"listener"})
	m.acceptErrors = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "meshlet_sidecar_downstream_accept_errors_total", Help: "Failed accepts of a listener, by reason: fd_exhausted (EMFILE/ENFILE) or other.",
	}, []string{"listener", "reason"})
	m.Registry.MustRegister(m.handshakes, m.authzDenied, m.tcpIdle, m.captureRefused, m.capturePassthrough, m.acceptErrors)
	m.udp = newUDPVecs(m.Registry)
	m.Registry.MustRegister(m.duration, m.downConns, m.spansExported, m.spansDropped)
	m.Registry.MustRegister(m.requests, m.retries, m.retriesDenied, m.overflow, m.ejections, m.breakerTrans, m.breakerState,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

// Request implements httpproxy.Recorder.
func (m *Metrics) Request(r httpproxy.RequestRecord) {
	k := requestKey{listener: r.Listener, cluster: r.Cluster, route: r.Route, code: r.Code, reason: r.Reason}
	v, ok := m.children.Load(k)
	if !ok {
		labels := []string{r.Listener, r.Cluster, r.Route, statusText(r.Code), string(r.Reason)}
		v, _ = m.children.LoadOrStore(k, &requestChildren{count: m.requests.WithLabelValues(labels...), duration: m.duration.WithLabelValues(labels...)})
	}
	c := v.(*requestChildren)
	c.count.Inc()
	c.duration.Observe(r.Duration.Seconds())
}

// Connections implements httpproxy.Recorder and tcpproxy.Recorder.
func (m *Metrics) Connections(listener string, delta int) {
	v, ok := m.conns.Load(listener)
	if !ok {
		v, _ = m.conns.LoadOrStore(listener, m.downConns.WithLabelValues(listener))
	}
	v.(prometheus.Gauge).Add(float64(delta))
}

// IdleTimeout implements tcpproxy.Recorder.
func (m *Metrics) IdleTimeout(listener string) { m.tcpIdle.WithLabelValues(listener).Inc() }

// SpansExported implements tracing.Events.
func (m *Metrics) SpansExported(n int) { m.spansExported.Add(float64(n)) }

// SpansDropped implements tracing.Events.
func (m *Metrics) SpansDropped(n int, reason string) {
	m.spansDropped.WithLabelValues(reason).Add(float64(n))
}

// ClusterStats are the live counters of one upstream cluster, read at each
// scrape.
type ClusterStats struct {
	Connections, Requests, Pending int64
}

// WatchClusters registers the upstream_* gauges, read from stats at each
// scrape (by cluster name).
func (m *Metrics) WatchClusters(stats func() map[string]ClusterStats) {
	m.Registry.MustRegister(&funcCollector{
		descs: []*prometheus.Desc{
			prometheus.NewDesc("meshlet_sidecar_upstream_connections_active", "Open upstream connections, by cluster.", []string{"cluster"}, nil),
			prometheus.NewDesc("meshlet_sidecar_upstream_requests_active", "Requests in flight to the cluster.", []string{"cluster"}, nil),
			prometheus.NewDesc("meshlet_sidecar_upstream_requests_pending", "Requests waiting for an upstream connection.", []string{"cluster"}, nil),
		},
		collect: func(d []*prometheus.Desc, ch chan<- prometheus.Metric) {
			for name, st := range stats() {
				ch <- prometheus.MustNewConstMetric(d[0], prometheus.GaugeValue, float64(st.Connections), name)
				ch <- prometheus.MustNewConstMetric(d[1], prometheus.GaugeValue, float64(st.Requests), name)
				ch <- prometheus.MustNewConstMetric(d[2], prometheus.GaugeValue, float64(st.Pending), name)
			}
		},
	})
}

// XDSStatus is the ADS client's state, read at each scrape.
type XDSStatus struct {
	Connected bool
	// Versions, ACKs and NACKs by type URL.
	Versions    map[string]string
	ACKs, NACKs map[string]uint64
}

// WatchXDS registers the xds_* metrics, read from status at each scrape.
func (m *Metrics) WatchXDS(status func() XDSStatus) {
	m.Registry.MustRegister(&funcCollector{
		descs: []*prometheus.Desc{
			prometheus.NewDesc("meshlet_sidecar_xds_connected", "1 while the ADS stream to the control plane is up.", nil, nil),
			prometheus.NewDesc("meshlet_sidecar_xds_updates_total", "xDS responses by type URL and result (ack or nack).", []string{"type", "result"}, nil),
			prometheus.NewDesc("meshlet_sidecar_xds_version_info", "The last accepted version of each xDS type (value 1).", []string{"type", "version"}, nil),
		},
		collect: func(d []*prometheus.Desc, ch chan<- prometheus.Metric) {
			st := status()
			up := 0.0
			if st.Connected {
				up = 1
			}
			ch <- prometheus.MustNewConstMetric(d[0], prometheus.GaugeValue, up)
			for t, n := range st.ACKs {
				ch <- prometheus.MustNewConstMetric(d[1], prometheus.CounterValue, float64(n), t, "ack")
			}
			for t, n := range st.NACKs {
				ch <- prometheus.MustNewConstMetric(d[1], prometheus.CounterValue, float64(n), t, "nack")
			}
			for t, v := range st.Versions {
				ch <- prometheus.MustNewConstMetric(d[2], prometheus.GaugeValue, 1, t, v)
			}
		},
	})
}

// funcCollector reads values at scrape time.
type funcCollector struct {
	descs   []*prometheus.Desc
	collect func([]*prometheus.Desc, chan<- prometheus.Metric)
}

func (c *funcCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range c.descs {
		ch <- d
	}
}

func (c *funcCollector) Collect(ch chan<- prometheus.Metric) { c.collect(c.descs, ch) }

// Retry implements httpproxy.Recorder.
func (m *Metrics) Retry(cluster, cause string) { m.retries.WithLabelValues(cluster, cause).Inc() }

// RetryDenied implements httpproxy.Recorder.
func (m *Metrics) RetryDenied(cluster, reason string) {
	m.retriesDenied.WithLabelValues(cluster, reason).Inc()
}

// Ejected implements cluster.Events.
func (m *Metrics) Ejected(cluster, endpoint, reason string) {
	m.ejections.WithLabelValues(cluster, endpoint, reason).Inc()
}

// BreakerState implements cluster.Events.
func (m *Metrics) BreakerState(cluster, endpoint, state string) {
	m.breakerTrans.WithLabelValues(cluster, endpoint, state).Inc()
	v := map[string]float64{"closed": 0, "half-open": 1, "open": 2}[state]
	m.breakerState.WithLabelValues(cluster, endpoint).Set(v)
}

// Overflow implements cluster.Events.
func (m *Metrics) Overflow(cluster, threshold string) {
	m.overflow.WithLabelValues(cluster, threshold).Inc()
}

// InboundHandshake records an inbound handshake: reason "" for success.
func (m *Metrics) InboundHandshake(listener, reason string) {
	if reason == "" {
		reason = "ok"
	}
	m.handshakes.WithLabelValues("inbound", listener, reason).Inc()
}

// TLSHandshake implements cluster.Events.
func (m *Metrics) TLSHandshake(cluster, _ string, err error) {
	result := "ok"
	if err != nil {
		result = tlsid.Reason(err)
	}
	m.handshakes.WithLabelValues("upstream", cluster, result).Inc()
}

// TLSReason implements cluster.Events.
func (m *Metrics) TLSReason(err error) string { return tlsid.Reason(err) }

// AuthzDenied implements httpproxy.Recorder and tcpproxy.Recorder.
func (m *Metrics) AuthzDenied(listener, rule string) {
	m.authzDenied.WithLabelValues(listener, rule).Inc()
}

// CaptureRefused implements listener.CaptureRecorder.
func (m *Metrics) CaptureRefused(listener, reason string) {
	m.captureRefused.WithLabelValues(listener, reason).Inc()
}

// AcceptError implements listener.AcceptRecorder.
func (m *Metrics) AcceptError(listener, reason string) {
	m.acceptErrors.WithLabelValues(listener, reason).Inc()
}

// CapturePassthrough implements listener.CaptureRecorder.
func (m *Metrics) CapturePassthrough(listener string) {
	m.capturePassthrough.WithLabelValues(listener).Inc()
}

// WatchCertificates registers meshlet_sidecar_certificate_expiry_seconds,
// read from secrets at each scrape.
func (m *Metrics) WatchCertificates(secrets func() map[string]*config.Secret) {
	m.Registry.MustRegister(&certCollector{secrets: secrets, desc: prometheus.NewDesc(
		"meshlet_sidecar_certificate_expiry_seconds", "Seconds until a certificate of an SDS secret expires.",
		[]string{"secret", "kind", "spiffe_id", "serial"}, nil)})
}

type certCollector struct {
	secrets func() map[string]*config.Secret
	desc    *prometheus.Desc
}

func (c *certCollector) Describe(ch chan<- *prometheus.Desc) { ch <- c.desc }

func (c *certCollector) Collect(ch chan<- prometheus.Metric) {
	now := time.Now()
	for _, s := range c.secrets() {
		for _, ci := range s.Infos(now) {
			ch <- prometheus.MustNewConstMetric(c.desc, prometheus.GaugeValue, ci.NotAfter.Sub(now).Seconds(), ci.Secret, ci.Kind, ci.SPIFFEID, ci.Serial)
		}
	}
}

var statusTexts = func() [600]string {
	var t [600]string
	for i := range t {
		t[i] = strconv.Itoa(i)
	}
	return t
}()

func statusText(code int) string {
	if code >= 0 && code < len(statusTexts) {
		return statusTexts[code]
	}
	return strconv.Itoa(code)
}
