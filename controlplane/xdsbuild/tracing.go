package xdsbuild

import (
	"fmt"
	"net"
	"net/url"
	"time"

	cluster "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listener "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	tracev3 "github.com/envoyproxy/go-control-plane/envoy/config/trace/v3"
	hcm "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	typev3 "github.com/envoyproxy/go-control-plane/envoy/type/v3"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/meshlet/meshlet/xds"
)

// Tracing configures the tracing of an HTTP connection manager.
type Tracing struct {
	// ServiceName is the service.name resource attribute of the spans
	// (OpenTelemetryConfig.service_name).
	ServiceName string
	// SamplingPercent (0-100) of requests that arrive without a sampling
	// decision start a sampled trace (random_sampling).
	SamplingPercent float64
	// Protocol is xds.OTLPGRPC or xds.OTLPHTTP; Endpoint is host:port for
	// gRPC and the traces URL for HTTP.
	Protocol, Endpoint string
	// Propagation lists the trace context formats extracted and injected
	// ("tracecontext", "b3", "b3multi"); carried in xds.ListenerExtras.
	Propagation []string
	// Outbound marks an outbound listener: its spans are clients and each
	// upstream attempt gets its own span (spawn_upstream_span).
	Outbound bool
}

// hcmTracing returns HttpConnectionManager.tracing for t.
func (t *Tracing) hcmTracing() *hcm.HttpConnectionManager_Tracing {
	otel := &tracev3.OpenTelemetryConfig{ServiceName: t.ServiceName}
	if t.Protocol == xds.OTLPHTTP {
		otel.HttpService = &core.HttpService{HttpUri: &core.HttpUri{
			Uri:              t.Endpoint,
			HttpUpstreamType: &core.HttpUri_Cluster{Cluster: xds.OTLPCollectorCluster},
			Timeout:          durationpb.New(10 * time.Second),
		}}
	} else {
		otel.GrpcService = &core.GrpcService{TargetSpecifier: &core.GrpcService_GoogleGrpc_{GoogleGrpc: &core.GrpcService_GoogleGrpc{
			TargetUri: t.Endpoint, StatPrefix: "otlp",
		}}}
	}
	return &hcm.HttpConnectionManager_Tracing{
		RandomSampling:    &typev3.Percent{Value: t.SamplingPercent},
		SpawnUpstreamSpan: wrapperspb.Bool(t.Outbound),
		Provider: &tracev3.Tracing_Http{
			Name:       xds.OpenTelemetryTracer,
			ConfigType: &tracev3.Tracing_Http_TypedConfig{TypedConfig: xds.MustAny(otel)},
		},
	}
}

// applyTo sets the listener's traffic direction and propagation
// extras for t (nil leaves l as is).
func (t *Tracing) applyTo(l *listener.Listener) {
	if t == nil {
		return
	}
	l.TrafficDirection = core.TrafficDirection_INBOUND
	if t.Outbound {
		l.TrafficDirection = core.TrafficDirection_OUTBOUND
	}
	if len(t.Propagation) > 0 {
		l.Metadata = xds.ExtrasMetadata(xds.ListenerExtras{TracePropagation: t.Propagation})
	}
}

// NewOTLPCollectorCluster returns the static cluster OTLP/HTTP exports go
// to (xds.OTLPCollectorCluster), for the host and port of the traces URL, or an
// error when the URL has none.
func NewOTLPCollectorCluster(traceURL string) (*cluster.Cluster, error) {
	u, err := url.Parse(traceURL)
	if err != nil {
		return nil, fmt.Errorf("xdsbuild: OTLP collector URL %q: %w", traceURL, err)
	}
	host, port := u.Hostname(), u.Port()
	if port == "" {
		port = map[string]string{"http": "80", "https": "443"}[u.Scheme]
	}
	var p int
	if _, err := fmt.Sscan(port, &p); err != nil || host == "" {
		return nil, fmt.Errorf("xdsbuild: OTLP collector URL %q: want scheme://host:port/path", traceURL)
	}
	if ip := net.ParseIP(host); ip == nil && host != "localhost" {
		return nil, fmt.Errorf("xdsbuild: OTLP collector URL %q: the host must be an IP address", traceURL)
	}
	return NewStaticCluster(xds.OTLPCollectorCluster, host, p, ClusterOptions{Protocol: xds.ProtocolHTTP}), nil
}
