package config

import (
	"errors"
	"fmt"
	"net"
	"net/url"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listener "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	tracev3 "github.com/envoyproxy/go-control-plane/envoy/config/trace/v3"
	hcm "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"

	"github.com/meshlet/meshlet/xds"
)

// Tracing is a decoded HttpConnectionManager.tracing whose provider is
// envoy.tracers.opentelemetry, plus the listener-level settings spans need.
type Tracing struct {
	// Provider is where spans go; comparable, so equal providers share one
	// exporter.
	Provider TraceProvider
	// SamplingPercent (0-100) is random_sampling: the share of requests
	// without an incoming sampling decision that start a sampled trace
	// (Envoy's default 100).
	SamplingPercent float64
	// SpawnUpstreamSpan is spawn_upstream_span: each upstream attempt gets
	// its own client span.
	SpawnUpstreamSpan bool
	// Outbound is Listener.traffic_direction OUTBOUND: the request span is
	// a client span; otherwise a server span.
	Outbound bool
	// Propagation lists the trace context formats extracted and injected
	// (ListenerExtras.tracePropagation; default tracecontext).
	Propagation []string
}

// TraceProvider is an OTLP exporter setup (OpenTelemetryConfig).
type TraceProvider struct {
	// ServiceName is service_name, the spans' service.name.
	ServiceName string
	// Protocol is xds.OTLPGRPC (grpc_service.google_grpc.target_uri, host:port)
	// or xds.OTLPHTTP (http_service.http_uri.uri, a URL).
	Protocol string
	// Endpoint is the target (host:port) or URL.
	Endpoint string
	// MaxQueue is max_cache_size: spans waiting for export beyond it are
	// dropped (counted); Envoy's default 1024.
	MaxQueue int
}

// DefaultTraceQueue is TraceProvider.MaxQueue when max_cache_size is unset.
const DefaultTraceQueue = 1024

// Trace propagation formats (ListenerExtras.tracePropagation).
const (
	PropagationTraceContext = "tracecontext"
	PropagationB3           = "b3"
	PropagationB3Multi      = "b3multi"
)

func decodeTracing(t *hcm.HttpConnectionManager_Tracing) (*Tracing, error) {
	p := t.GetProvider()
	if p == nil {
		return nil, nil // tracing block without a provider: Envoy traces nothing
	}
	var oc tracev3.OpenTelemetryConfig
	if !p.GetTypedConfig().MessageIs(&oc) {
		return nil, fmt.Errorf("provider: unsupported tracer %q (%s); supported: %s", p.GetName(), p.GetTypedConfig().GetTypeUrl(), xds.OpenTelemetryTracer)
	}
	if err := p.GetTypedConfig().UnmarshalTo(&oc); err != nil {
		return nil, fmt.Errorf("provider.typed_config: %v", err)
	}
	if err := oc.ValidateAll(); err != nil {
		return nil, fmt.Errorf("provider.typed_config: %v", err)
	}
	out := &Tracing{SamplingPercent: 100, Provider: TraceProvider{ServiceName: oc.GetServiceName(), MaxQueue: DefaultTraceQueue}}
	if oc.GetServiceName() == "" {
		out.Provider.ServiceName = "unknown_service:meshlet"
	}
	if q := oc.GetMaxCacheSize(); q != nil {
		out.Provider.MaxQueue = int(q.GetValue())
	}
	switch {
	case oc.GetGrpcService() != nil:
		g := oc.GetGrpcService().GetGoogleGrpc()
		if g == nil {
			return nil, errors.New("provider.typed_config.grpc_service: only google_grpc with a target_uri (host:port) is supported (not envoy_grpc)")
		}
		if _, _, err := net.SplitHostPort(g.GetTargetUri()); err != nil {
			return nil, fmt.Errorf("provider.typed_config.grpc_service.google_grpc.target_uri: %q is not host:port", g.GetTargetUri())
		}
		out.Provider.Protocol, out.Provider.Endpoint = xds.OTLPGRPC, g.GetTargetUri()
	case oc.GetHttpService() != nil:
		uri := oc.GetHttpService().GetHttpUri().GetUri()
		u, err := url.Parse(uri)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			return nil, fmt.Errorf("provider.typed_config.http_service.http_uri.uri: %q is not an http(s) URL", uri)
		}
		out.Provider.Protocol, out.Provider.Endpoint = xds.OTLPHTTP, uri
	default:
		return nil, errors.New("provider.typed_config: grpc_service or http_service is required")
	}
	if rs := t.GetRandomSampling(); rs != nil {
		out.SamplingPercent = rs.GetValue()
	}
	if os := t.GetOverallSampling(); os != nil && os.GetValue() < out.SamplingPercent {
		out.SamplingPercent = os.GetValue()
	}
	out.SpawnUpstreamSpan = t.GetSpawnUpstreamSpan().GetValue()
	return out, nil
}

// decodeListenerTracing completes the tracing of l's HTTP chains with the
// traffic direction and the propagation extras.
func decodeListenerTracing(l *listener.Listener, out *Listener) error {
	var extras xds.ListenerExtras
	if err := xds.DecodeExtras(l.GetMetadata(), &extras); err != nil {
		return fieldErr(xds.KindListener, out.Name, "metadata.filter_metadata[\""+xds.MetadataNamespace+"\"]", "%v", err)
	}
	prop := []string{PropagationTraceContext}
	if len(extras.TracePropagation) > 0 {
		prop = extras.TracePropagation
	}
	for i, p := range prop {
		switch p {
		case PropagationTraceContext, PropagationB3, PropagationB3Multi:
		default:
			return fieldErr(xds.KindListener, out.Name, fmt.Sprintf("metadata.filter_metadata[%q].tracePropagation[%d]", xds.MetadataNamespace, i),
				"unknown format %q (supported: %s, %s, %s)", p, PropagationTraceContext, PropagationB3, PropagationB3Multi)
		}
	}
	for _, c := range out.AllChains() {
		if c.HTTP != nil && c.HTTP.Tracing != nil {
			c.HTTP.Tracing.Outbound = l.GetTrafficDirection() == core.TrafficDirection_OUTBOUND
			c.HTTP.Tracing.Propagation = prop
		}
	}
	return nil
}

// TraceProviders returns the distinct trace providers the snapshot's HTTP
// connection managers use.
func (s *Snapshot) TraceProviders() []TraceProvider {
	seen := map[TraceProvider]bool{}
	var out []TraceProvider
	for _, l := range s.Listeners {
		for _, c := range l.AllChains() {
			if c.HTTP != nil && c.HTTP.Tracing != nil && !seen[c.HTTP.Tracing.Provider] {
				seen[c.HTTP.Tracing.Provider] = true
				out = append(out, c.HTTP.Tracing.Provider)
			}
		}
	}
	return out
}
