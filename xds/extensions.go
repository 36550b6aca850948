package xds

import (
	"fmt"

	"github.com/envoyproxy/go-control-plane/pkg/wellknown"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
)

// Extension names and typed-config type URLs the sidecar understands.
const (
	HTTPConnectionManagerFilter = wellknown.HTTPConnectionManager // "envoy.filters.network.http_connection_manager"
	TCPProxyFilter              = wellknown.TCPProxy              // "envoy.filters.network.tcp_proxy"
	RouterFilter                = wellknown.Router                // "envoy.filters.http.router"
	// HTTPProtocolOptionsKey keys Cluster.typed_extension_protocol_options.
	HTTPProtocolOptionsKey = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
)

// Extension names for mTLS and authorization.
const (
	TLSTransportSocket = "envoy.transport_sockets.tls"
	TLSInspectorFilter = "envoy.filters.listener.tls_inspector"
	RBACHTTPFilter     = "envoy.filters.http.rbac"
	RBACNetworkFilter  = "envoy.filters.network.rbac"
)

// PreviousHostsPredicate is the retry host predicate that makes a retry
// prefer an endpoint not tried yet (Envoy
// envoy.retry_host_predicates.previous_hosts).
const PreviousHostsPredicate = "envoy.retry_host_predicates.previous_hosts"

// OpenTelemetryTracer is the tracing provider name of
// HttpConnectionManager.tracing.provider (Envoy's OpenTelemetry tracer).
const OpenTelemetryTracer = "envoy.tracers.opentelemetry"

// OTLP protocols of the OpenTelemetry tracer's export: gRPC
// (OpenTelemetryConfig.grpc_service) or HTTP (http_service).
const (
	OTLPGRPC = "grpc" // OTLP/gRPC to host:port
	OTLPHTTP = "http" // OTLP/HTTP protobuf to a URL
)

// UDPProxyFilter is the UDP listener filter that proxies datagrams to a
// cluster, one session per downstream address (Envoy's udp_proxy).
const UDPProxyFilter = "envoy.filters.udp_listener.udp_proxy"

// MustAny wraps m in an Any, panicking only if m cannot be marshalled, which
// for the generated Envoy messages built here does not happen.
func MustAny(m proto.Message) *anypb.Any {
	a, err := anypb.New(m)
	if err != nil {
		panic(fmt.Sprintf("xds: marshal %T: %v", m, err))
	}
	return a
}
