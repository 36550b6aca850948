package telemetry

import (
	"bytes"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/prometheus/client_golang/prometheus/testutil/promlint"
	"github.com/prometheus/common/expfmt"

	"github.com/meshlet/meshlet/sidecar/httpproxy"
)

// known feeds a fixed workload into m.
func known(m *Metrics) {
	for range 3 {
		m.Request(httpproxy.RequestRecord{Listener: "upstream:api", Cluster: "api", Route: "default", Code: 200, Duration: 2 * time.Millisecond})
	}
	m.Request(httpproxy.RequestRecord{Listener: "upstream:api", Cluster: "api", Route: "default", Code: 503, Reason: "no_healthy_upstream", Duration: 30 * time.Millisecond})
	m.Retry("api", "5xx")
	m.Retry("api", "5xx")
	m.RetryDenied("api", "retry_budget_exhausted")
	m.Overflow("api", "max_requests")
	m.Ejected("api", "127.0.0.1:1", "consecutive_5xx")
	m.BreakerState("api", "127.0.0.1:1", "open")
	m.InboundHandshake("public_listener", "")
	m.InboundHandshake("public_listener", "unknown_ca")
	m.AuthzDenied("public_listener", "deny-all")
	m.Connections("public_listener", 1)
	m.Connections("public_listener", 1)
	m.Connections("public_listener", -1)
	m.IdleTimeout("upstream:store")
	m.CaptureRefused("outbound_listener", "no_filter_chain")
	m.CaptureRefused("outbound_listener", "no_filter_chain")
	m.CapturePassthrough("outbound_listener")
	m.SpansExported(7)
	m.SpansDropped(2, "queue_full")
	m.WatchClusters(func() map[string]ClusterStats {
		return map[string]ClusterStats{"api": {Connections: 4, Requests: 2, Pending: 1}}
	})
	m.WatchXDS(func() XDSStatus {
		return XDSStatus{Connected: true,
			Versions: map[string]string{"type.googleapis.com/envoy.config.cluster.v3.Cluster": "abc"},
			ACKs:     map[string]uint64{"type.googleapis.com/envoy.config.cluster.v3.Cluster": 3},
			NACKs:    map[string]uint64{"type.googleapis.com/envoy.config.cluster.v3.Cluster": 1}}
	})
}

func TestMetricsCountsAndLabels(t *testing.T) {
	m := New()
	known(m)
	var buf bytes.Buffer
	fams, err := m.Registry.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range fams {
		if _, err := expfmt.MetricFamilyToText(&buf, f); err != nil {
			t.Fatal(err)
		}
	}
	text := buf.String()
	tests := []struct {
		name string
		line string // an exact exposition line
	}{
		{"requests by cluster, route, code", `meshlet_sidecar_requests_total{cluster="api",code="200",listener="upstream:api",reason="",route="default"} 3`},
		{"failed requests carry the reason", `meshlet_sidecar_requests_total{cluster="api",code="503",listener="upstream:api",reason="no_healthy_upstream",route="default"} 1`},
		{"latency histogram count", `meshlet_sidecar_request_duration_seconds_count{cluster="api",code="200",listener="upstream:api",reason="",route="default"} 3`},
		{"latency histogram bucket", `meshlet_sidecar_request_duration_seconds_bucket{cluster="api",code="200",listener="upstream:api",reason="",route="default",le="0.0025"} 3`},
		{"latency below a bucket", `meshlet_sidecar_request_duration_seconds_bucket{cluster="api",code="200",listener="upstream:api",reason="",route="default",le="0.001"} 0`},
		{"retries", `meshlet_sidecar_upstream_retries_total{cause="5xx",cluster="api"} 2`},
		{"retries denied", `meshlet_sidecar_upstream_retries_denied_total{cluster="api",reason="retry_budget_exhausted"} 1`},
		{"overflow", `meshlet_sidecar_upstream_overflow_total{cluster="api",threshold="max_requests"} 1`},
		{"ejections", `meshlet_sidecar_outlier_ejections_total{cluster="api",endpoint="127.0.0.1:1",reason="consecutive_5xx"} 1`},
		{"breaker state", `meshlet_sidecar_endpoint_breaker_state{cluster="api",endpoint="127.0.0.1:1"} 2`},
		{"handshakes ok", `meshlet_sidecar_tls_handshakes_total{name="public_listener",result="ok",side="inbound"} 1`},
		{"handshake failures", `meshlet_sidecar_tls_handshakes_total{name="public_listener",result="unknown_ca",side="inbound"} 1`},
		{"authz denials", `meshlet_sidecar_authz_denied_total{listener="public_listener",rule="deny-all"} 1`},
		{"active downstream connections", `meshlet_sidecar_downstream_connections_active{listener="public_listener"} 1`},
		{"TCP idle timeouts", `meshlet_sidecar_tcp_idle_timeouts_total{listener="upstream:store"} 1`},
		{"capture refusals", `meshlet_sidecar_capture_refused_total{listener="outbound_listener",reason="no_filter_chain"} 2`},
		{"capture pass-through", `meshlet_sidecar_capture_passthrough_total{listener="outbound_listener"} 1`},
		{"active upstream connections", `meshlet_sidecar_upstream_connections_active{cluster="api"} 4`},
		{"pending upstream requests", `meshlet_sidecar_upstream_requests_pending{cluster="api"} 1`},
		{"xDS connected", `meshlet_sidecar_xds_connected 1`},
		{"xDS ACKs", `meshlet_sidecar_xds_updates_total{result="ack",type="type.googleapis.com/envoy.config.cluster.v3.Cluster"} 3`},
		{"xDS NACKs", `meshlet_sidecar_xds_updates_total{result="nack",type="type.googleapis.com/envoy.config.cluster.v3.Cluster"} 1`},
		{"xDS version", `meshlet_sidecar_xds_version_info{type="type.googleapis.com/envoy.config.cluster.v3.Cluster",version="abc"} 1`},
		{"spans exported", `meshlet_sidecar_tracing_spans_exported_total 7`},
		{"spans dropped", `meshlet_sidecar_tracing_spans_dropped_total{reason="queue_full"} 2`},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if !strings.Contains(text, tc.line+"\n") {
				t.Errorf("missing line:\n%s", tc.line)
			}
		})
	}
	if testing.Verbose() {
		t.Log(text)
	}
}

// TestMetricsLint runs the client library's linter and, when it is
// installed (Debian package prometheus), promtool check metrics.
func TestMetricsLint(t *testing.T) {
	m := New()
	known(m)
	fams, err := m.Registry.Gather()
	if err != nil {
		t.Fatal(err)
	}
	problems, err := promlint.NewWithMetricFamilies(fams).Lint()
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		t.Errorf("promlint: %s: %s", p.Metric, p.Text)
	}
	if _, err := testutil.GatherAndCount(m.Registry); err != nil {
		t.Fatal(err)
	}
	promtool, err := exec.LookPath("promtool")
	if err != nil {
		t.Log("promtool not installed (Debian package prometheus); checked with promlint only")
		return
	}
	var buf bytes.Buffer
	for _, f := range fams {
		if _, err := expfmt.MetricFamilyToText(&buf, f); err != nil {
			t.Fatal(err)
		}
	}
	cmd := exec.Command(promtool, "check", "metrics")
	cmd.Stdin = &buf
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Errorf("promtool check metrics: %v\n%s", err, out)
	}
}
