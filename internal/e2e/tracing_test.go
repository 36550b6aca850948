package e2e

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"io"
	"net"
	"net/http"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil/promlint"

	"github.com/meshlet/meshlet/controlplane/traceview"
	"github.com/meshlet/meshlet/internal/devjaeger"
	"github.com/meshlet/meshlet/internal/testutil"
)

// forwardingApp is web: GET /call calls api through its sidecar's outbound
// listener at upstream, copying the trace headers of the request it got,
// as a mesh asks of applications.
func forwardingApp(t *testing.T, upstream string) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	client := &http.Client{Timeout: 10 * time.Second}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		req, _ := http.NewRequestWithContext(r.Context(), http.MethodGet, "http://"+upstream+"/hello", nil)
		for _, k := range []string{"Traceparent", "Tracestate", "X-B3-Traceid", "X-B3-Spanid", "X-B3-Sampled", "X-B3-Parentspanid"} {
			if v := r.Header.Get(k); v != "" {
				req.Header.Set(k, v)
			}
		}
		resp, err := client.Do(req)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadGateway)
			return
		}
		defer resp.Body.Close()
		w.WriteHeader(resp.StatusCode)
		_, _ = io.Copy(w, resp.Body)
	})}
	done := make(chan struct{})
	go func() { defer close(done); _ = srv.Serve(l) }()
	t.Cleanup(func() { _ = srv.Close(); <-done })
	return l.Addr().(*net.TCPAddr).Port
}

// statusApp answers every request with code.
func statusApp(t *testing.T, code int) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		w.WriteHeader(code)
		fmt.Fprintf(w, "status %d\n", code)
	})}
	done := make(chan struct{})
	go func() { defer close(done); _ = srv.Serve(l) }()
	t.Cleanup(func() { _ = srv.Close(); <-done })
	return l.Addr().(*net.TCPAddr).Port
}

func randomHex(t *testing.T, n int) string {
	t.Helper()
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(b)
}

// traceShape is a web → api trace through both sidecars, found by role.
type traceShape struct {
	webIn, webOut *traceview.Span
	attempts      []*traceview.Span // by start time
	apiIn         []*traceview.Span
}

func shapeOf(tr *traceview.Trace) traceShape {
	var s traceShape
	for _, sp := range tr.Spans {
		switch {
		case sp.Service == "web" && sp.Operation == "inbound GET":
			s.webIn = sp
		case sp.Service == "web" && sp.Operation == "outbound GET api":
			s.webOut = sp
		case sp.Service == "web" && strings.HasPrefix(sp.Operation, "attempt "):
			s.attempts = append(s.attempts, sp)
		case sp.Service == "api" && sp.Operation == "inbound GET":
			s.apiIn = append(s.apiIn, sp)
		}
	}
	return s
}

// complete: every hop's span has arrived (each attempt reached an api
// sidecar, whose span is exported in its own batch).
func (s traceShape) complete() bool {
	return s.webIn != nil && s.webOut != nil && len(s.attempts) > 0 && len(s.apiIn) == len(s.attempts)
}

func tagString(sp *traceview.Span, key string) string {
	v, ok := sp.Tag(key)
	if !ok {
		return ""
	}
	return fmt.Sprint(v)
}

// TestTraceAcrossSidecarsInJaeger: requests web → api through two sidecars
// land in a real Jaeger as one trace per request, continuing the caller's
// W3C or B3 context, with the sidecar spans in parent/child order (web's
// inbound server span → web's outbound client span, linked only because
// the web app forwarded the headers → one span per attempt → api's inbound
// server span), each retry attempt visible, and the web sidecar's /metrics
// agreeing with the traffic.
func TestTraceAcrossSidecarsInJaeger(t *testing.T) {
	jaeger := devjaeger.StartForTest(t)
	m := newMesh(t)
	ports := freePorts(t, 4)
	webSidecar, api1Sidecar, api2Sidecar, apiBind := ports[0], ports[1], ports[2], ports[3]

	m.writePolicy("services.yaml", `apiVersion: meshlet.io/v1alpha1
kind: ServiceDefaults
metadata: {name: web}
spec: {service: web, protocol: http, mtlsMode: permissive}
---
apiVersion: meshlet.io/v1alpha1
kind: ServiceDefaults
metadata: {name: api}
spec: {service: api, protocol: http}
---
apiVersion: meshlet.io/v1alpha1
kind: RetryPolicy
metadata: {name: api-retries}
spec: {service: api, retryOn: [5xx], numRetries: 2, backoff: {baseInterval: 1ms, maxInterval: 5ms}}
---
apiVersion: meshlet.io/v1alpha1
kind: MeshDefaults
metadata: {name: mesh}
spec:
  tracing:
    sampling: 100
    propagation: [tracecontext, b3multi]
    collector: {protocol: grpc, endpoint: "`+jaeger.OTLPGRPCAddr+`"}
`)
	m.startControlPlane("", "")
	webApp := forwardingApp(t, hostPort(apiBind))
	m.register(svc{id: "web-1", name: "web", appPort: webApp, sidecarPort: webSidecar, upstreams: map[string]int{"api": apiBind}})
	m.register(svc{id: "api-1", name: "api", appPort: statusApp(t, http.StatusOK), sidecarPort: api1Sidecar})
	m.register(svc{id: "api-2", name: "api", appPort: statusApp(t, http.StatusServiceUnavailable), sidecarPort: api2Sidecar})
	m.allow("web", "api")
	web := m.startSidecar("web-1-sidecar-proxy", "")
	for _, p := range []*proxy{web, m.startSidecar("api-1-sidecar-proxy", ""), m.startSidecar("api-2-sidecar-proxy", "")} {
		p.waitReady(t)
	}
	testutil.Until(t, 10*time.Second, "web's api cluster has both api sidecars", func() bool { return len(web.endpoints("api")) == 2 })

	// Requests into web's sidecar (permissive: plaintext from the test),
	// each starting its own sampled trace; api-2 always fails, so the
	// requests round robin sends there first are retried on api-1.
	type sent struct{ traceID, parent string }
	var reqs []sent
	client := &http.Client{Timeout: 10 * time.Second}
	do := func(set func(h http.Header, traceID, spanID string)) {
		t.Helper()
		s := sent{traceID: randomHex(t, 16), parent: randomHex(t, 8)}
		req, _ := http.NewRequest(http.MethodGet, "http://"+hostPort(webSidecar)+"/call", nil)
		set(req.Header, s.traceID, s.parent)
		resp, err := client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("request %s: %d %s", s.traceID, resp.StatusCode, body)
		}
		reqs = append(reqs, s)
	}
	const w3c = 8
	for range w3c {
		do(func(h http.Header, tid, sid string) { h.Set("traceparent", "00-"+tid+"-"+sid+"-01") })
	}
	do(func(h http.Header, tid, sid string) {
		h.Set("X-B3-TraceId", tid)
		h.Set("X-B3-SpanId", sid)
		h.Set("X-B3-Sampled", "1")
	})

	retried, attempts := 0, 0
	var retriedTree bytes.Buffer
	for i, s := range reqs {
		var tr *traceview.Trace
		testutil.Until(t, 30*time.Second, "trace "+s.traceID+" complete in Jaeger", func() bool {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			got, err := traceview.Fetch(ctx, jaeger.QueryURL, s.traceID)
			if err != nil {
				return false
			}
			tr = got
			return shapeOf(got).complete()
		})
		format := "W3C"
		if i == w3c {
			format = "B3"
		}
		sh := shapeOf(tr)
		attempts += len(sh.attempts)
		for _, sp := range tr.Spans {
			if sp.TraceID != strings.TrimLeft(s.traceID, "0") && sp.TraceID != s.traceID {
				t.Errorf("%s request: span %s %q has trace %s, want the caller's %s", format, sp.Service, sp.Operation, sp.TraceID, s.traceID)
			}
		}
		if sh.webIn.ParentID != s.parent || sh.webIn.Kind != "server" {
			t.Errorf("%s request: web inbound span parent %s kind %s, want the caller's span %s and server", format, sh.webIn.ParentID, sh.webIn.Kind, s.parent)
		}
		if sh.webOut.ParentID != sh.webIn.SpanID || sh.webOut.Kind != "client" {
			t.Errorf("web outbound span parent %s kind %s, want web's inbound span %s (the app forwarded the headers) and client", sh.webOut.ParentID, sh.webOut.Kind, sh.webIn.SpanID)
		}
		children := map[string]*traceview.Span{}
		for _, a := range sh.apiIn {
			children[a.ParentID] = a
			if a.Kind != "server" || !strings.HasSuffix(tagString(a, "meshlet.peer.spiffe_id"), "/svc/web") {
				t.Errorf("api inbound span kind %s peer %q, want server and web's SPIFFE ID", a.Kind, tagString(a, "meshlet.peer.spiffe_id"))
			}
		}
		for n, a := range sh.attempts {
			if a.ParentID != sh.webOut.SpanID {
				t.Errorf("%s is not a child of web's outbound span", a.Operation)
			}
			if children[a.SpanID] == nil {
				t.Errorf("%s has no api inbound span under it", a.Operation)
			}
			if want := fmt.Sprintf("attempt %d", n+1); a.Operation != want {
				t.Errorf("attempt spans out of order: %s where %s was expected", a.Operation, want)
			}
		}
		if len(sh.attempts) > 1 {
			retried++
			first, last := sh.attempts[0], sh.attempts[len(sh.attempts)-1]
			if tagString(first, "http.response.status_code") != "503" || tagString(first, "meshlet.retry_cause") != "5xx" {
				t.Errorf("retried attempt tags: status %q cause %q, want 503 and 5xx", tagString(first, "http.response.status_code"), tagString(first, "meshlet.retry_cause"))
			}
			if tagString(last, "http.response.status_code") != "200" {
				t.Errorf("last attempt status %q, want 200", tagString(last, "http.response.status_code"))
			}
			if retriedTree.Len() == 0 {
				if err := traceview.Render(&retriedTree, tr); err != nil {
					t.Fatal(err)
				}
			}
		}
	}
	if retried == 0 {
		t.Fatalf("none of %d requests was retried, though api-2 answers 503 to all", len(reqs))
	}
	t.Logf("a retried request in Jaeger (%d of %d retried):\n%s", retried, len(reqs), retriedTree.String())
	for _, want := range []string{"attempt 1", "attempt 2", "meshlet.retry_cause=5xx"} {
		if !strings.Contains(retriedTree.String(), want) {
			t.Errorf("rendered trace lacks %q", want)
		}
	}

	// The web sidecar's metrics agree with the traffic and lint clean.
	n := float64(len(reqs))
	checks := []struct {
		name   string
		metric string
		labels []string
		want   float64
	}{
		{"inbound requests", "meshlet_sidecar_requests_total", []string{`listener="public_listener"`, `cluster="local_app"`, `code="200"`}, n},
		{"outbound requests", "meshlet_sidecar_requests_total", []string{`listener="upstream:api"`, `cluster="api"`, `route="default"`, `code="200"`, `reason=""`}, n},
		{"outbound latency observations", "meshlet_sidecar_request_duration_seconds_count", []string{`listener="upstream:api"`, `cluster="api"`, `code="200"`}, n},
		{"retries match the retried traces", "meshlet_sidecar_upstream_retries_total", []string{`cluster="api"`, `cause="5xx"`}, float64(retried)},
		{"xDS connected", "meshlet_sidecar_xds_connected", nil, 1},
		{"no spans dropped", "meshlet_sidecar_tracing_spans_dropped_total", nil, 0},
	}
	for _, c := range checks {
		if got := web.metric(t, c.metric, c.labels...); got != c.want {
			t.Errorf("%s: %s%v = %v, want %v", c.name, c.metric, c.labels, got, c.want)
		}
	}
	if got := web.metric(t, "meshlet_sidecar_xds_updates_total", `result="ack"`); got < 5 {
		t.Errorf("xDS ACKs = %v, want one per type at least", got)
	}
	// Jaeger has every span; the exporter counts a batch once the collector
	// has answered, which may be a moment later.
	// Per request: inbound, outbound and one span per attempt.
	spans := 2*n + float64(attempts)
	testutil.Until(t, 10*time.Second, "web's sidecar counting its exported spans", func() bool {
		return web.metric(t, "meshlet_sidecar_tracing_spans_exported_total") == spans
	})
	resp, err := http.Get(web.admin + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	exposition, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for _, want := range []string{"meshlet_sidecar_downstream_connections_active{listener=", "meshlet_sidecar_upstream_connections_active{cluster=\"api\"}",
		`meshlet_sidecar_xds_version_info{type="type.googleapis.com/envoy.config.listener.v3.Listener"`} {
		if !bytes.Contains(exposition, []byte(want)) {
			t.Errorf("/metrics lacks %s", want)
		}
	}
	problems, err := promlint.New(bytes.NewReader(exposition)).Lint()
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		t.Errorf("promlint: %s: %s", p.Metric, p.Text)
	}
	if promtool, err := exec.LookPath("promtool"); err == nil {
		cmd := exec.Command(promtool, "check", "metrics")
		cmd.Stdin = bytes.NewReader(exposition)
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Errorf("promtool check metrics: %v\n%s", err, out)
		}
	}
}
