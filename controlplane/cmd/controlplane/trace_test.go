package main

import (
	"bytes"
	"context"
	"strings"
	"testing"

	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracegrpc"
	"go.opentelemetry.io/otel/sdk/resource"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	semconv "go.opentelemetry.io/otel/semconv/v1.40.0"
	oteltrace "go.opentelemetry.io/otel/trace"

	"github.com/meshlet/meshlet/internal/devjaeger"
)

// TestTraceCommand prints a trace exported to a real Jaeger as a tree,
// and fails clearly for a trace Jaeger does not have.
func TestTraceCommand(t *testing.T) {
	j := devjaeger.StartForTest(t)
	ctx := context.Background()
	exp, err := otlptracegrpc.New(ctx, otlptracegrpc.WithEndpoint(j.OTLPGRPCAddr), otlptracegrpc.WithInsecure())
	if err != nil {
		t.Fatal(err)
	}
	tp := sdktrace.NewTracerProvider(sdktrace.WithSyncer(exp), sdktrace.WithResource(resource.NewWithAttributes(semconv.SchemaURL, semconv.ServiceName("web"))))
	defer tp.Shutdown(ctx)
	tracer := tp.Tracer("test")
	rctx, root := tracer.Start(ctx, "inbound GET", oteltrace.WithSpanKind(oteltrace.SpanKindServer))
	_, child := tracer.Start(rctx, "outbound GET api", oteltrace.WithSpanKind(oteltrace.SpanKindClient))
	child.End()
	root.End()
	id := root.SpanContext().TraceID().String()

	var out, errb bytes.Buffer
	if code := run([]string{"trace", "-jaeger-url", j.QueryURL, "-wait-spans", "2", id}, &out, &errb); code != 0 {
		t.Fatalf("trace: exit %d, stderr %s", code, errb.String())
	}
	lines := strings.Split(strings.TrimSpace(out.String()), "\n")
	if len(lines) != 3 || !strings.Contains(lines[0], id) || !strings.HasPrefix(lines[1], "web inbound GET") || !strings.HasPrefix(lines[2], "  web outbound GET api") {
		t.Errorf("trace output:\n%s\nwant a header and the client span indented under the server span", out.String())
	}

	out.Reset()
	errb.Reset()
	missing := "0123456789abcdef0123456789abcdef"
	if code := run([]string{"trace", "-jaeger-url", j.QueryURL, missing}, &out, &errb); code != 1 || !strings.Contains(errb.String(), "not found") {
		t.Errorf("unknown trace: exit %d, stderr %q; want 1 and \"not found\"", code, errb.String())
	}
	if code := run([]string{"trace"}, &out, &errb); code != 2 {
		t.Errorf("no trace ID: exit %d, want 2 (usage)", code)
	}
}
