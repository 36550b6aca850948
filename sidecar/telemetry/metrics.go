// Package telemetry holds the sidecar's Prometheus metrics. Each Sidecar has
// its own registry, served on the admin endpoint's /metrics.
package telemetry

import (
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/meshlet/meshlet/sidecar/cluster"
	"github.com/meshlet/meshlet/sidecar/config"
	"github.com/meshlet/meshlet/sidecar/httpproxy"
	"github.com/meshlet/meshlet/sidecar/tlsid"
)

// Metrics are the sidecar's request and resilience metrics:
//
//	meshlet_sidecar_requests_total{listener, cluster, code, reason}
//	    requests handled by HTTP listeners; code "0" when the downstream left
//	    first; reason is the typed failure reason when the sidecar failed the
//	    request, else ""
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
//	meshlet_sidecar_authz_denied_total{listener, rule}
//	    requests and connections refused by authorization, by rule
//	meshlet_sidecar_certificate_expiry_seconds{secret, kind, spiffe_id, serial}
//	    seconds until each certificate of each secret expires
//
// plus the Go runtime and process collectors.
type Metrics struct {
	// Registry holds every metric; serve it with promhttp.HandlerFor.
	Registry *prometheus.Registry

	requests      *prometheus.CounterVec
	retries       *prometheus.CounterVec
	retriesDenied *prometheus.CounterVec
	overflow      *prometheus.CounterVec
	ejections     *prometheus.CounterVec
	breakerTrans  *prometheus.CounterVec
	breakerState  *prometheus.GaugeVec
	handshakes    *prometheus.CounterVec
	authzDenied   *prometheus.CounterVec
}

var (
	_ cluster.Events     = (*Metrics)(nil)
	_ httpproxy.Recorder = (*Metrics)(nil)
)

// New returns Metrics registered in a new registry.
func New() *Metrics {
	m := &Metrics{
		Registry: prometheus.NewRegistry(),
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "meshlet_sidecar_requests_total", Help: "HTTP requests handled, by listener, cluster, status code and typed failure reason.",
		}, []string{"listener", "cluster", "code", "reason"}),
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
	m.Registry.MustRegister(m.handshakes, m.authzDenied)
	m.Registry.MustRegister(m.requests, m.retries, m.retriesDenied, m.overflow, m.ejections, m.breakerTrans, m.breakerState,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

// Request implements httpproxy.Recorder.
func (m *Metrics) Request(listener, cluster string, code int, reason string) {
	m.requests.WithLabelValues(listener, cluster, statusText(code), reason).Inc()
}

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
