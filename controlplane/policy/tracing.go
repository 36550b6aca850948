package policy

import (
	"fmt"
	"net"
	"net/url"
	"strings"
)

// Trace context propagation formats (MeshTracing.Propagation).
const (
	// PropagationTraceContext is W3C Trace Context: traceparent and
	// tracestate.
	PropagationTraceContext = "tracecontext"
	// PropagationB3 is Zipkin B3 single header ("b3").
	PropagationB3 = "b3"
	// PropagationB3Multi is Zipkin B3 multiple headers (x-b3-traceid,
	// x-b3-spanid, x-b3-sampled, ...).
	PropagationB3Multi = "b3multi"
)

// OTLP collector protocols (MeshTracing.Collector.Protocol).
const (
	// CollectorGRPC is OTLP/gRPC; the endpoint is host:port (Jaeger and the
	// OpenTelemetry Collector listen on 4317).
	CollectorGRPC = "grpc"
	// CollectorHTTP is OTLP/HTTP protobuf; the endpoint is the URL of the
	// traces path, e.g. http://127.0.0.1:4318/v1/traces.
	CollectorHTTP = "http"
)

// Tracing defaults.
const (
	// DefaultTraceSampling is the percent of new traces sampled when
	// MeshTracing.Sampling is not set (Istio's default).
	DefaultTraceSampling = 1.0
)

// DefaultPropagation is the propagation when MeshTracing.Propagation is
// empty: W3C Trace Context and B3 multi-header, extracted and injected both.
var DefaultPropagation = []string{PropagationTraceContext, PropagationB3Multi}

// MeshTracing is MeshDefaults.tracing, the mesh-wide tracing setup:
//
//	tracing:
//	  sampling: 1                          # percent (0-100) of new traces; default 1
//	  propagation: [tracecontext, b3multi] # tracecontext | b3 | b3multi; default both shown
//	  collector:                           # default: the control plane's -otlp-endpoint flag
//	    protocol: grpc                     # grpc (default) | http
//	    endpoint: 127.0.0.1:4317           # host:port for grpc, a URL for http
//
// Sampling applies to requests that arrive without a sampling decision; a
// request whose incoming trace context is sampled (or not) keeps that
// decision, so one trace is whole across all hops. Tracing is on when a
// collector is known, from this block or the control plane's flags. It is
// translated to Envoy's HttpConnectionManager.tracing (random_sampling,
// provider envoy.tracers.opentelemetry with an OTLP grpc_service or
// http_service); propagation, which Envoy's OpenTelemetry tracer does not
// configure, travels in the listener's filter_metadata["meshlet"].
type MeshTracing struct {
	// Sampling is a percentage, 0-100; nil means DefaultTraceSampling.
	Sampling *float64 `yaml:"sampling,omitempty"`
	// Propagation lists the formats extracted from and injected into
	// requests; empty means DefaultPropagation.
	Propagation []string `yaml:"propagation,omitempty"`
	// Collector is where sidecars export spans; nil leaves it to the control
	// plane's -otlp-endpoint flag.
	Collector *Collector `yaml:"collector,omitempty"`
}

// Collector is an OTLP endpoint.
type Collector struct {
	// Protocol is CollectorGRPC (default) or CollectorHTTP.
	Protocol string `yaml:"protocol,omitempty"`
	// Endpoint is host:port for grpc, an http(s) URL for http. Required.
	Endpoint string `yaml:"endpoint"`
}

func (t *MeshTracing) validate(v *validator, field string) {
	if t.Sampling != nil && (*t.Sampling < 0 || *t.Sampling > 100) {
		v.errorf(field+".sampling", "must be a percentage between 0 and 100 (got %g)", *t.Sampling)
	}
	seen := map[string]bool{}
	for i, p := range t.Propagation {
		f := fmt.Sprintf("%s.propagation[%d]", field, i)
		switch p {
		case PropagationTraceContext, PropagationB3, PropagationB3Multi:
		default:
			v.errorf(f, "unknown format %q (want %s, %s or %s)", p, PropagationTraceContext, PropagationB3, PropagationB3Multi)
		}
		if seen[p] {
			v.errorf(f, "%q listed twice", p)
		}
		seen[p] = true
	}
	if c := t.Collector; c != nil {
		if sub, msg := c.problem(); msg != "" {
			v.errorf(field+".collector."+sub, "%s", msg)
		}
	}
}

// Validate checks the protocol and the endpoint's shape for it. It returns
// an error naming the field and what is wrong with it.
func (c *Collector) Validate() error {
	if sub, msg := c.problem(); msg != "" {
		return fmt.Errorf("%s: %s", sub, msg)
	}
	return nil
}

// problem returns the field (protocol or endpoint) and what is wrong with
// it, or "" when c is valid.
func (c *Collector) problem() (field, msg string) {
	switch c.Protocol {
	case "", CollectorGRPC:
		if c.Endpoint == "" {
			return "endpoint", "required (host:port of an OTLP/gRPC collector, e.g. 127.0.0.1:4317)"
		}
		if strings.Contains(c.Endpoint, "://") {
			return "endpoint", fmt.Sprintf("%q: a grpc endpoint is host:port, not a URL", c.Endpoint)
		}
		if _, _, err := net.SplitHostPort(c.Endpoint); err != nil {
			return "endpoint", fmt.Sprintf("%q: %v", c.Endpoint, err)
		}
	case CollectorHTTP:
		u, err := url.Parse(c.Endpoint)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			return "endpoint", fmt.Sprintf("%q: an http endpoint is the URL of the traces path, e.g. http://127.0.0.1:4318/v1/traces", c.Endpoint)
		}
	default:
		return "protocol", fmt.Sprintf("must be %s or %s (got %q)", CollectorGRPC, CollectorHTTP, c.Protocol)
	}
	return "", ""
}

// WithDefaultCollector returns a copy of s (nil: an empty set) whose
// tracing uses c when MeshDefaults names no collector: the control plane's
// -otlp-endpoint flag. A nil or empty c returns s unchanged.
func (s *Set) WithDefaultCollector(c *Collector) *Set {
	if c == nil || c.Endpoint == "" {
		return s
	}
	var cp Set
	if s != nil {
		cp = *s
	}
	cc := *c
	cp.defaultCollector = &cc
	return &cp
}

// Tracing is the effective tracing setup: MeshDefaults.tracing with
// defaults applied, and the WithDefaultCollector collector when the policy
// names none. It returns nil (tracing off) when no collector is known.
func (s *Set) Tracing() *Tracing {
	var mt *MeshTracing
	var fallback *Collector
	if s != nil {
		fallback = s.defaultCollector
		if s.Mesh != nil {
			mt = s.Mesh.Tracing
		}
	}
	out := &Tracing{SamplingPercent: DefaultTraceSampling, Propagation: DefaultPropagation}
	if fallback != nil && fallback.Endpoint != "" {
		c := *fallback
		out.Collector = c
	}
	if mt != nil {
		if mt.Sampling != nil {
			out.SamplingPercent = *mt.Sampling
		}
		if len(mt.Propagation) > 0 {
			out.Propagation = mt.Propagation
		}
		if mt.Collector != nil {
			out.Collector = *mt.Collector
		}
	}
	if out.Collector.Endpoint == "" {
		return nil
	}
	if out.Collector.Protocol == "" {
		out.Collector.Protocol = CollectorGRPC
	}
	return out
}

// Tracing is the resolved tracing setup Set.Tracing returns.
type Tracing struct {
	// SamplingPercent is 0-100.
	SamplingPercent float64
	// Propagation lists formats (PropagationTraceContext, ...).
	Propagation []string
	// Collector has its protocol set.
	Collector Collector
}
