package traceview_test

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracegrpc"
	"go.opentelemetry.io/otel/sdk/resource"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/trace"
	"go.uber.org/goleak"

	"github.com/meshlet/meshlet/controlplane/traceview"
	"github.com/meshlet/meshlet/internal/devjaeger"
)

func TestMain(m *testing.M) {
	code := m.Run()
	// Fetch uses http.DefaultClient: its idle keep-alive connections are
	// not leaks.
	http.DefaultClient.CloseIdleConnections()
	if code == 0 {
		if err := goleak.Find(); err != nil {
			fmt.Fprintln(os.Stderr, err)
			code = 1
		}
	}
	os.Exit(code)
}

// exportSample sends, over OTLP/gRPC to addr, one trace:
//
//	web   GET /checkout (server, 20 ms)
//	  web GET api     (client, 15 ms, resend_count=1)
//	    api GET /items (server, 10 ms, error, meshlet.reason, event "retry")
//	worker consume    (parent span not in the trace)
//
// with fixed timestamps, and returns its trace ID.
func exportSample(t *testing.T, addr string) trace.TraceID {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	provider := func(service string) *sdktrace.TracerProvider {
		exp, err := otlptracegrpc.New(ctx, otlptracegrpc.WithEndpoint(addr), otlptracegrpc.WithInsecure())
		if err != nil {
			t.Fatal(err)
		}
		return sdktrace.NewTracerProvider(
			sdktrace.WithSyncer(exp), // exported when the span ends
			sdktrace.WithResource(resource.NewSchemaless(attribute.String("service.name", service))),
		)
	}
	web, api, worker := provider("web"), provider("api"), provider("worker")

	t0 := time.Now().Add(-time.Second).Truncate(time.Millisecond)
	at := func(ms float64) time.Time { return t0.Add(time.Duration(ms * float64(time.Millisecond))) }

	rootCtx, root := web.Tracer("test").Start(ctx, "GET /checkout",
		trace.WithSpanKind(trace.SpanKindServer), trace.WithTimestamp(at(0)),
		trace.WithAttributes(attribute.Int("http.response.status_code", 200)))
	clientCtx, client := web.Tracer("test").Start(rootCtx, "GET api",
		trace.WithSpanKind(trace.SpanKindClient), trace.WithTimestamp(at(2)),
		trace.WithAttributes(attribute.Int("http.response.status_code", 200), attribute.Int("http.request.resend_count", 1)))

	// api sees the client span only as a remote parent, as after propagation.
	remote := trace.ContextWithRemoteSpanContext(context.Background(), trace.SpanContextFromContext(clientCtx))
	_, server := api.Tracer("test").Start(remote, "GET /items",
		trace.WithSpanKind(trace.SpanKindServer), trace.WithTimestamp(at(3)),
		trace.WithAttributes(attribute.Int("http.response.status_code", 503), attribute.String("meshlet.reason", "upstream_reset")))
	server.AddEvent("retry", trace.WithTimestamp(at(5.5)), trace.WithAttributes(attribute.Int("attempt", 2)))
	server.SetStatus(codes.Error, "upstream reset")
	server.End(trace.WithTimestamp(at(13.25)))
	client.End(trace.WithTimestamp(at(17)))
	root.End(trace.WithTimestamp(at(20)))

	// A span whose parent never reaches Jaeger.
	missing := trace.NewSpanContext(trace.SpanContextConfig{
		TraceID: root.SpanContext().TraceID(), SpanID: trace.SpanID{0xde, 0xad, 0xbe, 0xef, 0, 0, 0, 1},
		TraceFlags: trace.FlagsSampled, Remote: true,
	})
	_, orphan := worker.Tracer("test").Start(trace.ContextWithRemoteSpanContext(ctx, missing), "consume",
		trace.WithSpanKind(trace.SpanKindConsumer), trace.WithTimestamp(at(21)))
	orphan.End(trace.WithTimestamp(at(21.5)))

	for _, p := range []*sdktrace.TracerProvider{web, api, worker} {
		if err := p.Shutdown(ctx); err != nil { // flushes, then closes the exporter
			t.Fatal(err)
		}
	}
	return root.SpanContext().TraceID()
}

func TestFetchAndRenderRealJaeger(t *testing.T) {
	j := devjaeger.StartForTest(t)
	id := exportSample(t, j.OTLPGRPCAddr).String()

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	tr, err := traceview.WaitTrace(ctx, j.QueryURL, id, 4)
	if err != nil {
		t.Fatal(err)
	}
	if got := tr.Services(); !slices.Equal(got, []string{"api", "web", "worker"}) {
		t.Errorf("services = %v", got)
	}
	var b strings.Builder
	if err := traceview.Render(&b, tr); err != nil {
		t.Fatal(err)
	}
	out := b.String()
	t.Logf("rendered:\n%s", out)
	lines := strings.Split(strings.TrimSuffix(out, "\n"), "\n")

	header := fmt.Sprintf("trace %s: 4 spans, services api, web, worker, duration 21.500ms", id)
	if lines[0] != header {
		t.Errorf("header = %q, want %q", lines[0], header)
	}
	// One row per expected line, in order: exact indentation, then
	// patterns the rest of the line must match.
	tests := []struct {
		name   string
		indent int
		want   []string // regular expressions
	}{
		{"root server span", 0, []string{`^web GET /checkout  20\.000ms  \+0\.000ms  server  `, `http.response.status_code=200`}},
		{"client child", 2, []string{`^web GET api  15\.000ms  \+2\.000ms  client  `, `http.response.status_code=200`, `http.request.resend_count=1`}},
		{"api server under the client span", 4, []string{`^api GET /items  10\.250ms  \+3\.000ms  server  `,
			`http.response.status_code=503`, `error=true`, `otel.status_description="upstream reset"`, `meshlet.reason=upstream_reset`}},
		{"retry event under the api span", 6, []string{`^event retry  \+5\.500ms  attempt=2$`}},
		{"orphan shown as root", 0, []string{`^worker consume  0\.500ms  \+21\.000ms  consumer  `, `\(parent deadbeef00000001 not in trace\)$`}},
	}
	if len(lines) != 1+len(tests) {
		t.Fatalf("got %d lines, want %d:\n%s", len(lines), 1+len(tests), out)
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			line := lines[1+i]
			rest := strings.TrimLeft(line, " ")
			if indent := len(line) - len(rest); indent != tt.indent {
				t.Errorf("line %q: indent %d, want %d", line, indent, tt.indent)
			}
			for _, re := range tt.want {
				if !regexp.MustCompile(re).MatchString(rest) {
					t.Errorf("line %q does not match %s", line, re)
				}
			}
		})
	}

	t.Run("search", func(t *testing.T) {
		tests := []struct {
			name    string
			service string
			want    []string
		}{
			{"known service", "api", []string{id}},
			{"unknown service", "nobody", nil},
		}
		for _, tt := range tests {
			t.Run(tt.name, func(t *testing.T) {
				got, err := traceview.Search(ctx, j.QueryURL, tt.service, 10)
				if err != nil {
					t.Fatal(err)
				}
				if !slices.Equal(got, tt.want) {
					t.Errorf("Search(%q) = %v, want %v", tt.service, got, tt.want)
				}
			})
		}
	})
}

func TestFetchErrorsRealJaeger(t *testing.T) {
	j := devjaeger.StartForTest(t)
	closed, err := devjaeger.FreePorts(1)
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name     string
		queryURL string
		id       string
		wantIs   error // nil: any error
		wantText string
	}{
		{"unknown 128-bit id", j.QueryURL, "0af7651916cd43dd8448eb211c80319c", traceview.ErrNotFound, "trace not found"},
		{"unknown 64-bit id", j.QueryURL, "00f067aa0ba902b7", traceview.ErrNotFound, "trace not found"},
		{"not hex", j.QueryURL, "not-a-trace", traceview.ErrBadTraceID, "bad trace id"},
		{"too long", j.QueryURL, strings.Repeat("f", 33), traceview.ErrBadTraceID, "bad trace id"},
		{"jaeger down", fmt.Sprintf("http://127.0.0.1:%d", closed[0]), "0af7651916cd43dd8448eb211c80319c", nil, "connection refused"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			tr, err := traceview.Fetch(ctx, tt.queryURL, tt.id)
			if err == nil {
				t.Fatalf("Fetch(%s) = %+v, want an error", tt.id, tr)
			}
			t.Logf("error: %v", err)
			if tt.wantIs != nil && !errors.Is(err, tt.wantIs) {
				t.Errorf("error %q is not %v", err, tt.wantIs)
			}
			if !strings.HasPrefix(err.Error(), "traceview: ") || !strings.Contains(err.Error(), tt.wantText) {
				t.Errorf("error %q: want prefix \"traceview: \" and %q", err, tt.wantText)
			}
		})
	}

	t.Run("wait times out", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
		defer cancel()
		_, err := traceview.WaitTrace(ctx, j.QueryURL, "0af7651916cd43dd8448eb211c80319c", 1)
		if !errors.Is(err, context.DeadlineExceeded) || !errors.Is(err, traceview.ErrNotFound) {
			t.Errorf("WaitTrace error %q: want deadline exceeded and not found", err)
		}
	})
}
