// Package tracing makes the sidecar's OpenTelemetry spans and exports them
// over OTLP (gRPC or HTTP) to a collector or Jaeger, as configured by the
// control plane in HttpConnectionManager.tracing. Exporting never blocks
// the data path: finished spans go into a bounded queue that one goroutine
// per collector drains in batches; when the queue is full, spans are
// dropped and counted.
package tracing

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"time"

	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracegrpc"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracehttp"
	"go.opentelemetry.io/otel/sdk/resource"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	semconv "go.opentelemetry.io/otel/semconv/v1.40.0"
	"go.opentelemetry.io/otel/trace"

	"github.com/meshlet/meshlet/sidecar/config"
	"github.com/meshlet/meshlet/xds"
)

// Events receives the exporter's counts, for metrics. Implementations must
// be safe for concurrent use.
type Events interface {
	// SpansExported counts spans a collector accepted.
	SpansExported(n int)
	// SpansDropped counts spans lost: reason "queue_full" (the bounded
	// queue was full) or "export_failed" (the collector refused them or
	// could not be reached).
	SpansDropped(n int, reason string)
}

type nopEvents struct{}

func (nopEvents) SpansExported(int)        {}
func (nopEvents) SpansDropped(int, string) {}

// Batching of exports.
const (
	// BatchSize is the most spans sent in one export request.
	BatchSize = 512
	// BatchDelay is how long a span waits at most before its batch is sent.
	BatchDelay = time.Second
	// ExportTimeout bounds one export request.
	ExportTimeout = 10 * time.Second
)

// Manager owns one exporter (queue, goroutine, OTLP client) per collector
// in use, and hands out tracers for HTTP connection managers. The zero
// value is not usable; call NewManager.
type Manager struct {
	log    *slog.Logger
	events Events
	node   string

	// spanExporter builds the OTLP exporter of a provider (otlpExporter;
	// tests swap in an in-memory one).
	spanExporter func(config.TraceProvider) (sdktrace.SpanExporter, error)

	mu sync.Mutex // guards exporters and tracers
	// exporters by provider; tracers by provider and sampling.
	exporters map[config.TraceProvider]*exporter
	tracers   map[tracerKey]*HTTP
	closed    bool
}

type tracerKey struct {
	provider config.TraceProvider
	percent  float64
	outbound bool
	spawn    bool
	prop     string
}

// NewManager returns a Manager whose spans carry service.instance.id = node
// (the xDS node ID). events may be nil.
func NewManager(log *slog.Logger, events Events, node string) *Manager {
	if events == nil {
		events = nopEvents{}
	}
	return &Manager{log: log, events: events, node: node, spanExporter: otlpExporter,
		exporters: map[config.TraceProvider]*exporter{}, tracers: map[tracerKey]*HTTP{}}
}

// Sync starts an exporter for every provider in used that has none, and
// stops (flushing for up to ExportTimeout, in the background) those no
// longer used. Call it before handing out tracers for a new config.
func (m *Manager) Sync(used []config.TraceProvider) {
	want := map[config.TraceProvider]bool{}
	for _, p := range used {
		want[p] = true
	}
	var stale []*exporter
	m.mu.Lock()
	if m.closed {
		m.mu.Unlock()
		return
	}
	for p, e := range m.exporters {
		if !want[p] {
			stale = append(stale, e)
			delete(m.exporters, p)
		}
	}
	for k := range m.tracers {
		if !want[k.provider] {
			delete(m.tracers, k)
		}
	}
	for p := range want {
		if m.exporters[p] == nil {
			exp, err := m.spanExporter(p)
			if err != nil {
				m.log.Error("tracing: cannot export spans; requests are not traced", "collector", p.Endpoint, "protocol", p.Protocol, "error", err)
				continue
			}
			m.exporters[p] = startExporter(exp, p.MaxQueue, p.Protocol+" "+p.Endpoint, m.log, m.events)
			m.log.Info("tracing: exporting spans", "collector", p.Endpoint, "protocol", p.Protocol, "service", p.ServiceName)
		}
	}
	m.mu.Unlock()
	for _, e := range stale {
		go func() {
			ctx, cancel := context.WithTimeout(context.Background(), ExportTimeout)
			defer cancel()
			e.shutdown(ctx)
		}()
	}
}

// HTTP returns the tracing of an HTTP connection manager configured with
// t, or nil when t is nil or its provider has no exporter (see Sync).
func (m *Manager) HTTP(t *config.Tracing) *HTTP {
	if t == nil {
		return nil
	}
	k := tracerKey{provider: t.Provider, percent: t.SamplingPercent, outbound: t.Outbound, spawn: t.SpawnUpstreamSpan, prop: strings.Join(t.Propagation, ",")}
	m.mu.Lock()
	defer m.mu.Unlock()
	if h := m.tracers[k]; h != nil {
		return h
	}
	e := m.exporters[t.Provider]
	if e == nil {
		return nil
	}
	res := resource.NewWithAttributes(semconv.SchemaURL,
		semconv.ServiceName(t.Provider.ServiceName),
		semconv.ServiceInstanceID(m.node),
		semconv.TelemetrySDKName("meshlet"),
	)
	ratio := t.SamplingPercent / 100
	tp := sdktrace.NewTracerProvider(
		sdktrace.WithSampler(sdktrace.ParentBased(sdktrace.TraceIDRatioBased(ratio))),
		sdktrace.WithSpanProcessor(e),
		sdktrace.WithResource(res),
	)
	h := &HTTP{
		tracer:   tp.Tracer("github.com/meshlet/meshlet/sidecar"),
		prop:     propagator(t.Propagation),
		outbound: t.Outbound,
		spawn:    t.SpawnUpstreamSpan,
	}
	h.fields = h.prop.Fields()
	m.tracers[k] = h
	return h
}

// Flush exports every queued span now, waiting until ctx is done at most.
func (m *Manager) Flush(ctx context.Context) error {
	m.mu.Lock()
	es := make([]*exporter, 0, len(m.exporters))
	for _, e := range m.exporters {
		es = append(es, e)
	}
	m.mu.Unlock()
	var errs []error
	for _, e := range es {
		errs = append(errs, e.ForceFlush(ctx))
	}
	return errors.Join(errs...)
}

// Close flushes and stops every exporter, waiting until ctx is done at
// most. Later spans are discarded. It is idempotent.
func (m *Manager) Close(ctx context.Context) {
	m.mu.Lock()
	es := m.exporters
	m.exporters, m.tracers, m.closed = map[config.TraceProvider]*exporter{}, map[tracerKey]*HTTP{}, true
	m.mu.Unlock()
	var wg sync.WaitGroup
	for _, e := range es {
		wg.Go(func() { e.shutdown(ctx) })
	}
	wg.Wait()
}

// exporter is a bounded-queue span processor in front of one OTLP
// exporter. The SDK's BatchSpanProcessor drops on a full queue too, but
// only reports drops through a global meter behind an experimental
// environment flag; this one counts them into the sidecar's metrics.
type exporter struct {
	exp    sdktrace.SpanExporter
	log    *slog.Logger
	events Events
	what   string // "protocol endpoint", for logs

	queue  chan sdktrace.ReadOnlySpan
	flush  chan chan struct{}
	stop   chan struct{}
	done   chan struct{} // closed when run returns
	closed sync.Once
}

var _ sdktrace.SpanProcessor = (*exporter)(nil)

// otlpExporter returns the OTLP exporter of p, without retries (a failed
// batch is dropped and counted; the next one tries again).
func otlpExporter(p config.TraceProvider) (sdktrace.SpanExporter, error) {
	var (
		exp sdktrace.SpanExporter
		err error
	)
	ctx := context.Background()
	switch p.Protocol {
	case xds.OTLPGRPC:
		exp, err = otlptracegrpc.New(ctx, otlptracegrpc.WithEndpoint(p.Endpoint), otlptracegrpc.WithInsecure(),
			otlptracegrpc.WithTimeout(ExportTimeout), otlptracegrpc.WithRetry(otlptracegrpc.RetryConfig{Enabled: false}))
	case xds.OTLPHTTP:
		exp, err = otlptracehttp.New(ctx, otlptracehttp.WithEndpointURL(p.Endpoint),
			otlptracehttp.WithTimeout(ExportTimeout), otlptracehttp.WithRetry(otlptracehttp.RetryConfig{Enabled: false}))
	default:
		err = fmt.Errorf("unknown OTLP protocol %q", p.Protocol)
	}
	if err != nil {
		return nil, fmt.Errorf("tracing: OTLP exporter for %s: %w", p.Endpoint, err)
	}
	return exp, nil
}

// startExporter queues up to queue spans (config.DefaultTraceQueue when
// 0) for exp and starts the goroutine that sends them.
func startExporter(exp sdktrace.SpanExporter, queue int, what string, log *slog.Logger, events Events) *exporter {
	if queue <= 0 {
		queue = config.DefaultTraceQueue
	}
	e := &exporter{
		exp: exp, log: log, events: events, what: what,
		queue: make(chan sdktrace.ReadOnlySpan, queue),
		flush: make(chan chan struct{}),
		stop:  make(chan struct{}),
		done:  make(chan struct{}),
	}
	go e.run()
	return e
}

// OnStart implements sdktrace.SpanProcessor.
func (e *exporter) OnStart(context.Context, sdktrace.ReadWriteSpan) {}

// OnEnd queues a sampled span without blocking, or counts it dropped.
func (e *exporter) OnEnd(s sdktrace.ReadOnlySpan) {
	if !s.SpanContext().IsSampled() {
		return
	}
	select {
	case <-e.stop:
		e.events.SpansDropped(1, "queue_full")
	case e.queue <- s:
	default:
		e.events.SpansDropped(1, "queue_full")
	}
}

// Shutdown implements sdktrace.SpanProcessor. TracerProviders share
// exporters, so it does nothing: Manager stops exporters itself.
func (e *exporter) Shutdown(context.Context) error { return nil }

// ForceFlush implements sdktrace.SpanProcessor: it exports what is queued.
func (e *exporter) ForceFlush(ctx context.Context) error {
	ack := make(chan struct{})
	select {
	case e.flush <- ack:
	case <-e.done:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
	select {
	case <-ack:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (e *exporter) shutdown(ctx context.Context) {
	e.closed.Do(func() { close(e.stop) })
	select {
	case <-e.done:
	case <-ctx.Done():
	}
	if err := e.exp.Shutdown(ctx); err != nil {
		e.log.Debug("tracing: exporter shutdown", "collector", e.what, "error", err)
	}
}

func (e *exporter) run() {
	defer close(e.done)
	batch := make([]sdktrace.ReadOnlySpan, 0, BatchSize)
	timer := time.NewTimer(BatchDelay)
	defer timer.Stop()
	failing := false
	send := func() {
		if len(batch) == 0 {
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), ExportTimeout)
		err := e.exp.ExportSpans(ctx, batch)
		cancel()
		if err != nil {
			e.events.SpansDropped(len(batch), "export_failed")
			if !failing {
				e.log.Warn("tracing: exporting spans failed; dropping them until the collector answers", "collector", e.what, "spans", len(batch), "error", err)
			}
			failing = true
		} else {
			e.events.SpansExported(len(batch))
			if failing {
				e.log.Info("tracing: exporting spans again", "collector", e.what)
			}
			failing = false
		}
		clear(batch)
		batch = batch[:0]
	}
	drain := func() {
		for {
			select {
			case s := <-e.queue:
				batch = append(batch, s)
				if len(batch) == BatchSize {
					send()
				}
			default:
				send()
				return
			}
		}
	}
	for {
		select {
		case s := <-e.queue:
			batch = append(batch, s)
			if len(batch) == BatchSize {
				send()
			}
		case <-timer.C:
			send()
			timer.Reset(BatchDelay)
		case ack := <-e.flush:
			drain()
			close(ack)
		case <-e.stop:
			drain()
			return
		}
	}
}

// Tracer returns the tracer behind h, for tests.
func (h *HTTP) Tracer() trace.Tracer { return h.tracer }
