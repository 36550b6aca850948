package tracing

import (
	"context"
	"net"
	"net/http"
	"strconv"
	"strings"

	"go.opentelemetry.io/contrib/propagators/b3"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/propagation"
	semconv "go.opentelemetry.io/otel/semconv/v1.40.0"
	"go.opentelemetry.io/otel/trace"

	"github.com/meshlet/meshlet/sidecar/config"
	"github.com/meshlet/meshlet/xds"
)

// Attribute keys meshlet adds next to the OpenTelemetry semantic
// conventions (HTTP and RPC spans, semconv v1.40).
const (
	// AttrReason is the typed failure reason when the sidecar failed the
	// request or the attempt (x-meshlet-reason), also in error.type.
	AttrReason = attribute.Key("meshlet.reason")
	// AttrPeerSPIFFEID is the SPIFFE ID of the peer: the caller on inbound
	// spans, the upstream's expected identity on attempts.
	AttrPeerSPIFFEID = attribute.Key("meshlet.peer.spiffe_id")
	// AttrUpstreamCluster is the cluster the request was routed to (Envoy's
	// upstream_cluster tag).
	AttrUpstreamCluster = attribute.Key("meshlet.upstream_cluster")
	// AttrRoute is the name of the route that matched.
	AttrRoute = attribute.Key("meshlet.route")
	// AttrAttempt is the 1-based attempt number on attempt spans.
	AttrAttempt = attribute.Key("meshlet.attempt")
	// AttrRetryCause is the retry_on condition that made an attempt be
	// retried, on the attempt it ends.
	AttrRetryCause = attribute.Key("meshlet.retry_cause")
)

// HTTP is the tracing of one HTTP connection manager: its tracer, sampling
// and propagation. A nil *HTTP traces nothing.
type HTTP struct {
	tracer   trace.Tracer
	prop     propagation.TextMapPropagator
	fields   []string // prop.Fields(), which makes a new slice per call
	outbound bool
	spawn    bool
}

// propagator returns the composite propagator of the formats in names.
func propagator(names []string) propagation.TextMapPropagator {
	var ps []propagation.TextMapPropagator
	var enc b3.Encoding
	for _, n := range names {
		switch n {
		case config.PropagationTraceContext:
			ps = append(ps, propagation.TraceContext{})
		case config.PropagationB3:
			enc |= b3.B3SingleHeader
		case config.PropagationB3Multi:
			enc |= b3.B3MultipleHeader
		}
	}
	if enc != 0 {
		ps = append(ps, b3.New(b3.WithInjectEncoding(enc)))
	}
	if len(ps) == 0 {
		ps = append(ps, propagation.TraceContext{})
	}
	return propagation.NewCompositeTextMapPropagator(ps...)
}

// Span start options, built once (each With* call allocates).
var (
	serverSpan = []trace.SpanStartOption{trace.WithSpanKind(trace.SpanKindServer)}
	clientSpan = []trace.SpanStartOption{trace.WithSpanKind(trace.SpanKindClient)}
)

// SpawnAttempts reports whether each upstream attempt gets its own span
// (spawn_upstream_span).
func (h *HTTP) SpawnAttempts() bool { return h != nil && h.spawn }

// Request describes a request for its span.
type Request struct {
	// Cluster and Route are the upstream cluster and the route's name; ""
	// when no route matched.
	Cluster, Route string
	// PeerID is the downstream's SPIFFE ID on inbound mTLS listeners.
	PeerID string
}

// Start continues the trace in r's headers (or starts one, sampled per the
// configured percentage) with the request's span: a server span on inbound
// listeners, a client span on outbound ones. It returns the context holding
// the span.
func (h *HTTP) Start(ctx context.Context, r *http.Request, q Request) (context.Context, trace.Span) {
	return h.StartHead(ctx, headerCarrier(r.Header), r.Method, q, func() Head {
		return Head{Method: r.Method, Path: r.URL.Path, Host: r.Host, UserAgent: r.UserAgent(), RemoteAddr: r.RemoteAddr,
			ContentType: r.Header.Get("Content-Type"), Proto: protoVersion(r)}
	})
}

// Head is what a request's span records of its head, for callers that
// have no *http.Request (the HTTP/1.1 fast path).
type Head struct {
	// Method and Path (without the query) of the request; Host its
	// authority; UserAgent and ContentType those fields ("" when absent);
	// RemoteAddr the downstream's host:port.
	Method, Path, Host, UserAgent, ContentType, RemoteAddr string
	// Proto is the HTTP version: "1.1", "1.0" or "2".
	Proto string
}

// StartHead is Start for a request of method whose trace context is read
// from carrier; describe, called only when the span records (is sampled),
// gives the rest of the head for its attributes. method must not change
// after the call (it names the span).
func (h *HTTP) StartHead(ctx context.Context, carrier propagation.TextMapCarrier, method string, q Request, describe func() Head) (context.Context, trace.Span) {
	ctx = h.prop.Extract(ctx, carrier)
	opts, name := serverSpan, "inbound "+method
	if h.outbound {
		opts, name = clientSpan, "outbound "+method+" "+q.Cluster
	}
	ctx, span := h.tracer.Start(ctx, name, opts...)
	if !span.IsRecording() {
		return ctx, span
	}
	hd := describe()
	attrs := make([]attribute.KeyValue, 0, 12)
	attrs = append(attrs,
		semconv.HTTPRequestMethodKey.String(hd.Method),
		semconv.URLPath(hd.Path),
		semconv.ServerAddress(hd.Host),
		semconv.NetworkProtocolVersion(hd.Proto),
	)
	if hd.UserAgent != "" {
		attrs = append(attrs, semconv.UserAgentOriginal(hd.UserAgent))
	}
	if q.Route != "" {
		attrs = append(attrs, AttrRoute.String(q.Route))
	}
	if q.Cluster != "" {
		attrs = append(attrs, AttrUpstreamCluster.String(q.Cluster))
	}
	if h.outbound {
		if q.Cluster != "" {
			attrs = append(attrs, semconv.ServicePeerName(q.Cluster))
		}
	} else {
		if host, _, err := net.SplitHostPort(hd.RemoteAddr); err == nil {
			attrs = append(attrs, semconv.ClientAddress(host))
		}
		if q.PeerID != "" {
			attrs = append(attrs, AttrPeerSPIFFEID.String(q.PeerID))
			if svc := serviceOf(q.PeerID); svc != "" {
				attrs = append(attrs, semconv.ServicePeerName(svc))
			}
		}
	}
	if strings.HasPrefix(hd.ContentType, "application/grpc") {
		attrs = append(attrs, semconv.RPCSystemNameGRPC, semconv.RPCMethod(strings.TrimPrefix(hd.Path, "/")))
	}
	span.SetAttributes(attrs...)
	return ctx, span
}

// Fields returns the header names (lower case) the configured propagation
// formats read and write, so a caller that writes a request's header
// itself can leave out the incoming ones it injects anew.
// The slice is shared: callers must not modify it.
func (h *HTTP) Fields() []string { return h.fields }

// InjectInto writes the trace context of ctx into carrier in every
// configured format.
func (h *HTTP) InjectInto(ctx context.Context, carrier propagation.TextMapCarrier) {
	h.prop.Inject(ctx, carrier)
}

// Inject writes the trace context of ctx into header in every configured
// format.
func (h *HTTP) Inject(ctx context.Context, header http.Header) {
	h.prop.Inject(ctx, headerCarrier(header))
}

// StartAttempt starts the client span of attempt n (1-based) to endpoint
// (host:port) under the request's span in ctx. Callers skip it when the
// request's span is not recording (not sampled): the request's context
// then propagates the decision.
func (h *HTTP) StartAttempt(ctx context.Context, n int, endpoint, peerID string) (context.Context, trace.Span) {
	ctx, span := h.tracer.Start(ctx, "attempt "+strconv.Itoa(n), clientSpan...)
	if !span.IsRecording() {
		return ctx, span
	}
	attrs := []attribute.KeyValue{AttrAttempt.Int(n)}
	if n > 1 {
		attrs = append(attrs, semconv.HTTPRequestResendCount(n-1))
	}
	if host, port, err := net.SplitHostPort(endpoint); err == nil {
		p, _ := strconv.Atoi(port)
		attrs = append(attrs, semconv.NetworkPeerAddress(host), semconv.NetworkPeerPort(p))
	}
	if peerID != "" {
		attrs = append(attrs, AttrPeerSPIFFEID.String(peerID))
	}
	span.SetAttributes(attrs...)
	return ctx, span
}

// End records the outcome on span and ends it: the response status code
// (0 when there was none), the typed reason when the sidecar failed it
// ("" otherwise), the grpc-status when there is one, and for attempts the
// retry_on condition that made it be retried. Server spans are errors
// from 500 up, client spans from 400 up (OpenTelemetry HTTP conventions).
func End(span trace.Span, code int, reason xds.FailureReason, grpcStatus, retryCause string) {
	if span.IsRecording() {
		attrs := make([]attribute.KeyValue, 0, 5)
		if code > 0 {
			attrs = append(attrs, semconv.HTTPResponseStatusCode(code))
		}
		if grpcStatus != "" {
			attrs = append(attrs, semconv.RPCResponseStatusCodeKey.String(grpcStatus))
		}
		if retryCause != "" {
			attrs = append(attrs, AttrRetryCause.String(retryCause))
		}
		switch {
		case reason != "":
			attrs = append(attrs, AttrReason.String(string(reason)), semconv.ErrorTypeKey.String(string(reason)))
			span.SetStatus(codes.Error, string(reason))
		case code == 0:
			attrs = append(attrs, semconv.ErrorTypeKey.String("cancelled"))
		case code >= 500, code >= 400 && isClient(span):
			attrs = append(attrs, semconv.ErrorTypeKey.String(strconv.Itoa(code)))
			span.SetStatus(codes.Error, "")
		}
		span.SetAttributes(attrs...)
	}
	span.End()
}

// isClient reports whether span is a client span (the SDK's read-only view
// exposes the kind).
func isClient(span trace.Span) bool {
	if ro, ok := span.(interface{ SpanKind() trace.SpanKind }); ok {
		return ro.SpanKind() == trace.SpanKindClient
	}
	return false
}

// headerCarrier is propagation.HeaderCarrier without the allocation of
// canonicalising the propagators' lower-case keys on every Get and Set.
type headerCarrier http.Header

// canonical maps the keys of the W3C and B3 propagators to their canonical
// MIME form.
var canonical = map[string]string{
	"traceparent": "Traceparent", "tracestate": "Tracestate", "b3": "B3",
	"x-b3-traceid": "X-B3-Traceid", "x-b3-spanid": "X-B3-Spanid", "x-b3-parentspanid": "X-B3-Parentspanid",
	"x-b3-sampled": "X-B3-Sampled", "x-b3-flags": "X-B3-Flags",
}

func canonicalKey(k string) string {
	if c, ok := canonical[k]; ok {
		return c
	}
	return http.CanonicalHeaderKey(k)
}

func (c headerCarrier) Get(key string) string {
	if v := c[canonicalKey(key)]; len(v) > 0 {
		return v[0]
	}
	return ""
}

func (c headerCarrier) Set(key, value string) { c[canonicalKey(key)] = []string{value} }

func (c headerCarrier) Keys() []string {
	out := make([]string, 0, len(c))
	for k := range c {
		out = append(out, k)
	}
	return out
}

var _ propagation.TextMapCarrier = headerCarrier(nil)

// serviceOf returns the service of a Consul SPIFFE ID
// (spiffe://<td>/ns/<ns>/dc/<dc>/svc/<service>), "" when it has none.
func serviceOf(id string) string {
	i := strings.LastIndex(id, "/svc/")
	if i < 0 {
		return ""
	}
	return id[i+len("/svc/"):]
}

func protoVersion(r *http.Request) string {
	if r.ProtoMajor == 2 {
		return "2"
	}
	if r.ProtoMinor == 0 {
		return "1.0"
	}
	return "1.1"
}
