package tracing

import (
	"context"
	"io"
	"log/slog"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace"
	"go.uber.org/goleak"

	"github.com/meshlet/meshlet/sidecar/config"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

var provider = config.TraceProvider{ServiceName: "web", Protocol: "grpc", Endpoint: "127.0.0.1:1", MaxQueue: 64}

// memoryManager returns a Manager whose exporter keeps spans in memory.
func memoryManager(t *testing.T, ev Events) (*Manager, *tracetest.InMemoryExporter) {
	t.Helper()
	mem := tracetest.NewInMemoryExporter()
	m := NewManager(slog.New(slog.NewTextHandler(io.Discard, nil)), ev, "web-1-sidecar-proxy")
	m.spanExporter = func(config.TraceProvider) (sdktrace.SpanExporter, error) { return mem, nil }
	m.Sync([]config.TraceProvider{provider})
	t.Cleanup(func() { m.Close(context.Background()) })
	return m, mem
}

func tracingCfg(percent float64, outbound bool, prop ...string) *config.Tracing {
	return &config.Tracing{Provider: provider, SamplingPercent: percent, Outbound: outbound, SpawnUpstreamSpan: outbound, Propagation: prop}
}

const (
	traceID = "4bf92f3577b34da6a3ce929d0e0e4736"
	spanID  = "00f067aa0ba902b7"
)

func TestPropagation(t *testing.T) {
	tests := []struct {
		name    string
		formats []string
		in      map[string]string // incoming headers
		// wantTrace is the trace the request span continues ("" = a new one).
		wantTrace string
		// wantOut are header names the upstream request must carry.
		wantOut, wantAbsent []string
	}{
		{name: "W3C in, W3C out", formats: []string{"tracecontext"},
			in:        map[string]string{"traceparent": "00-" + traceID + "-" + spanID + "-01", "tracestate": "vendor=1"},
			wantTrace: traceID, wantOut: []string{"Traceparent", "Tracestate"}, wantAbsent: []string{"B3", "X-B3-Traceid"}},
		{name: "B3 single in, B3 single out", formats: []string{"b3"},
			in:        map[string]string{"b3": traceID + "-" + spanID + "-1"},
			wantTrace: traceID, wantOut: []string{"B3"}, wantAbsent: []string{"Traceparent", "X-B3-Traceid"}},
		{name: "B3 multi in, W3C and B3 multi out", formats: []string{"tracecontext", "b3multi"},
			in:        map[string]string{"x-b3-traceid": traceID, "x-b3-spanid": spanID, "x-b3-sampled": "1"},
			wantTrace: traceID, wantOut: []string{"Traceparent", "X-B3-Traceid", "X-B3-Spanid", "X-B3-Sampled"}},
		{name: "a format not configured is not continued", formats: []string{"tracecontext"},
			in:      map[string]string{"b3": traceID + "-" + spanID + "-1"},
			wantOut: []string{"Traceparent"}},
		{name: "no incoming context starts a trace", formats: []string{"tracecontext", "b3"},
			wantOut: []string{"Traceparent", "B3"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			m, mem := memoryManager(t, nil)
			h := m.HTTP(tracingCfg(100, false, tc.formats...))
			r, _ := http.NewRequest(http.MethodGet, "http://api/items", nil)
			for k, v := range tc.in {
				r.Header.Set(k, v)
			}
			ctx, span := h.Start(context.Background(), r, Request{Cluster: "local_app", Route: "default"})
			out := http.Header{}
			h.Inject(ctx, out)
			End(span, 200, "", "", "")
			if err := m.Flush(context.Background()); err != nil {
				t.Fatal(err)
			}
			got := span.SpanContext().TraceID().String()
			if tc.wantTrace != "" && got != tc.wantTrace {
				t.Errorf("span trace ID %s, want the incoming %s", got, tc.wantTrace)
			}
			if tc.wantTrace == "" && got == traceID {
				t.Errorf("span continued a trace in a format that is not configured")
			}
			for _, k := range tc.wantOut {
				if out.Get(k) == "" {
					t.Errorf("upstream request lacks %s (has %v)", k, out)
				}
			}
			for _, k := range tc.wantAbsent {
				if out.Get(k) != "" {
					t.Errorf("upstream request carries %s in a format not configured", k)
				}
			}
			if v := out.Get("Traceparent"); v != "" && !strings.Contains(v, got) {
				t.Errorf("traceparent %q does not carry trace %s", v, got)
			}
			if spans := mem.GetSpans(); len(spans) != 1 || spans[0].SpanKind != trace.SpanKindServer {
				t.Errorf("exported %d spans (%v), want one server span", len(spans), spans)
			}
		})
	}
}

func TestSampling(t *testing.T) {
	tests := []struct {
		name        string
		percent     float64
		traceparent string
		want        bool
	}{
		{name: "0% without a decision: not sampled", percent: 0, want: false},
		{name: "100% without a decision: sampled", percent: 100, want: true},
		{name: "0% keeps an incoming sampled decision", percent: 0, traceparent: "00-" + traceID + "-" + spanID + "-01", want: true},
		{name: "100% keeps an incoming unsampled decision", percent: 100, traceparent: "00-" + traceID + "-" + spanID + "-00", want: false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			m, mem := memoryManager(t, nil)
			h := m.HTTP(tracingCfg(tc.percent, false, "tracecontext"))
			r, _ := http.NewRequest(http.MethodGet, "http://api/", nil)
			if tc.traceparent != "" {
				r.Header.Set("traceparent", tc.traceparent)
			}
			ctx, span := h.Start(context.Background(), r, Request{})
			out := http.Header{}
			h.Inject(ctx, out)
			End(span, 200, "", "", "")
			_ = m.Flush(context.Background())
			if got := span.SpanContext().IsSampled(); got != tc.want {
				t.Errorf("sampled = %v, want %v", got, tc.want)
			}
			// The decision travels on, so later hops agree with it.
			flag := "-00"
			if tc.want {
				flag = "-01"
			}
			if tp := out.Get("Traceparent"); !strings.HasSuffix(tp, flag) {
				t.Errorf("injected traceparent %q, want flags %s", tp, flag)
			}
			if n := len(mem.GetSpans()); (n == 1) != tc.want {
				t.Errorf("%d spans exported, want sampled=%v", n, tc.want)
			}
		})
	}
}

func TestAttemptSpansAndReason(t *testing.T) {
	m, mem := memoryManager(t, nil)
	h := m.HTTP(tracingCfg(100, true, "tracecontext"))
	r, _ := http.NewRequest(http.MethodPost, "http://api/orders", nil)
	ctx, span := h.Start(context.Background(), r, Request{Cluster: "api", Route: "default"})
	_, a1 := h.StartAttempt(ctx, 1, "127.0.0.1:2001", "spiffe://td/ns/default/dc/dc1/svc/api")
	End(a1, 503, "", "", "5xx")
	_, a2 := h.StartAttempt(ctx, 2, "127.0.0.1:2002", "")
	End(a2, 0, "upstream_timeout", "", "")
	End(span, 504, "upstream_timeout", "", "")
	_ = m.Flush(context.Background())

	spans := mem.GetSpans()
	if len(spans) != 3 {
		t.Fatalf("%d spans, want the request and 2 attempts", len(spans))
	}
	byName := map[string]tracetest.SpanStub{}
	for _, s := range spans {
		byName[s.Name] = s
	}
	req, ok := byName["outbound POST api"]
	if !ok || req.SpanKind != trace.SpanKindClient {
		t.Fatalf("no client span named \"outbound POST api\" in %v", names(spans))
	}
	for _, n := range []string{"attempt 1", "attempt 2"} {
		a, ok := byName[n]
		if !ok {
			t.Fatalf("no span %q in %v", n, names(spans))
		}
		if a.Parent.SpanID() != req.SpanContext.SpanID() {
			t.Errorf("%s is not a child of the request span", n)
		}
	}
	attr := func(s tracetest.SpanStub, k string) string {
		for _, kv := range s.Attributes {
			if string(kv.Key) == k {
				return kv.Value.String()
			}
		}
		return ""
	}
	checks := []struct{ span, key, want string }{
		{"attempt 1", "meshlet.retry_cause", "5xx"},
		{"attempt 1", "http.response.status_code", "503"},
		{"attempt 1", "network.peer.port", "2001"},
		{"attempt 1", "meshlet.peer.spiffe_id", "spiffe://td/ns/default/dc/dc1/svc/api"},
		{"attempt 2", "http.request.resend_count", "1"},
		{"attempt 2", "meshlet.reason", "upstream_timeout"},
		{"outbound POST api", "meshlet.reason", "upstream_timeout"},
		{"outbound POST api", "error.type", "upstream_timeout"},
		{"outbound POST api", "service.peer.name", "api"},
		{"outbound POST api", "http.request.method", "POST"},
	}
	for _, c := range checks {
		if got := attr(byName[c.span], c.key); got != c.want {
			t.Errorf("%s %s = %q, want %q", c.span, c.key, got, c.want)
		}
	}
	if byName["outbound POST api"].Status.Description != "upstream_timeout" {
		t.Errorf("request span status %+v, want an error naming the reason", byName["outbound POST api"].Status)
	}
}

func names(spans tracetest.SpanStubs) []string {
	var out []string
	for _, s := range spans {
		out = append(out, s.Name)
	}
	return out
}

// blockingExporter holds every export until released.
type blockingExporter struct {
	release  chan struct{}
	exported atomic.Int64
	once     sync.Once
}

func (b *blockingExporter) ExportSpans(ctx context.Context, spans []sdktrace.ReadOnlySpan) error {
	select {
	case <-b.release:
	case <-ctx.Done():
		return ctx.Err()
	}
	b.exported.Add(int64(len(spans)))
	return nil
}

func (b *blockingExporter) Shutdown(context.Context) error {
	b.once.Do(func() { close(b.release) })
	return nil
}

type countingEvents struct{ exported, dropped atomic.Int64 }

func (c *countingEvents) SpansExported(n int)          { c.exported.Add(int64(n)) }
func (c *countingEvents) SpansDropped(n int, _ string) { c.dropped.Add(int64(n)) }

func TestFullQueueDropsWithoutBlocking(t *testing.T) {
	ev := &countingEvents{}
	blocked := &blockingExporter{release: make(chan struct{})}
	m := NewManager(slog.New(slog.NewTextHandler(io.Discard, nil)), ev, "n")
	m.spanExporter = func(config.TraceProvider) (sdktrace.SpanExporter, error) { return blocked, nil }
	p := provider
	p.MaxQueue = 8
	m.Sync([]config.TraceProvider{p})
	cfg := tracingCfg(100, false)
	cfg.Provider = p
	h := m.HTTP(cfg)

	// The collector hangs: ending spans must not wait for it.
	const n = 2000
	start := time.Now()
	for range n {
		r, _ := http.NewRequest(http.MethodGet, "http://api/", nil)
		_, span := h.Start(context.Background(), r, Request{})
		End(span, 200, "", "", "")
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Fatalf("ending %d spans took %v with a hung collector", n, d)
	}
	// At most the queue plus the batch in flight are held; the rest dropped.
	if got := ev.dropped.Load(); got < n-8-BatchSize || got == 0 {
		t.Errorf("dropped %d of %d spans with a queue of 8 and a hung collector", got, n)
	}
	close(blocked.release)
	blocked.once.Do(func() {})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	m.Close(ctx)
	if got := ev.exported.Load() + ev.dropped.Load(); got != n {
		t.Errorf("exported %d + dropped %d = %d, want every one of %d spans accounted for", ev.exported.Load(), ev.dropped.Load(), got, n)
	}
}
