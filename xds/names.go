// Package xds is the contract meshlet's control plane and sidecar both
// import, trimmed to what both must agree on: the resource type URLs they
// exchange, the names given to the resources of one proxy and their parse
// functions, the node metadata that tells proxy kinds apart, the extension
// names, the meshlet-only extras carried in filter_metadata["meshlet"], the
// pod annotations, the defaults the sidecar applies to unset fields, and the
// contract words both sides spell only through typed constants: retry
// conditions (RetryOn), failure reasons (FailureReason), and the kinds and
// structured details of a NACK (ResourceKind, NACKDetail).
// TestContractWordsOnlyInXDS keeps other packages from spelling them. The
// control plane builds the Envoy resources themselves (controlplane/xdsbuild).
//
// Names follow the shapes Consul Connect gives Envoy, so a config dump reads
// the way Consul users expect: "public_listener" and "local_app" for the
// inbound side, "upstream:<service>" for an outbound listener, and the
// destination service name for its route configuration and cluster.
package xds

import (
	"strings"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
)

// Type URLs of the resources served over ADS (xDS v3, state of the world).
const (
	ListenerType = resource.ListenerType
	RouteType    = resource.RouteType
	ClusterType  = resource.ClusterType
	EndpointType = resource.EndpointType
	SecretType   = resource.SecretType
)

// Resource names used in a sidecar's snapshot.
const (
	// PublicListener is the inbound listener that receives mesh traffic for
	// the local app, on the connect-proxy service's address and port (Consul:
	// "public_listener").
	PublicListener = "public_listener"
	// LocalAppCluster is the static cluster pointing at the local app
	// (Consul: Proxy.LocalServiceAddress:LocalServicePort).
	LocalAppCluster = "local_app"
	// PublicUDPListener is the inbound UDP listener of a udp service's
	// sidecar, on the same address and port as PublicListener.
	PublicUDPListener = "public_listener_udp"
	// upstreamListenerPrefix prefixes outbound listener names.
	upstreamListenerPrefix = "upstream:"
)

// Names of SDS secrets in a sidecar's snapshot (Istio's names).
const (
	// SecretCert is the workload's certificate chain and private key.
	SecretCert = "default"
	// SecretRoots is the trust bundle: every CA root.
	SecretRoots = "ROOTCA"
)

// OTLPCollectorCluster names the static cluster an OTLP/HTTP http_service
// points at (Envoy's HttpUri needs a cluster; the meshlet sidecar posts to
// the URI itself).
const OTLPCollectorCluster = "otlp_collector"

// UpstreamListener returns the name of the outbound listener that a proxy
// opens on an upstream's local bind port: "upstream:<service>".
func UpstreamListener(service string) string { return upstreamListenerPrefix + service }

// UpstreamService returns the destination service of an outbound listener
// name made by UpstreamListener, and false for any other name.
func UpstreamService(listenerName string) (string, bool) {
	return strings.CutPrefix(listenerName, upstreamListenerPrefix)
}

// ServiceCluster returns the name of the cluster (and of its
// ClusterLoadAssignment and outbound RouteConfiguration) for a destination
// service. It is the service name itself, which is also what grpc-go's
// proxyless clients see.
func ServiceCluster(service string) string { return service }

// Protocol is the application protocol a service declares. It chooses the
// sidecar's filter chain: an HTTP connection manager for http, http2 and
// grpc, a TCP proxy for tcp, a UDP listener with a UDP proxy for udp.
// Values follow Consul's service-defaults "Protocol" field (udp is
// meshlet's).
type Protocol string

// Protocols a service may declare.
const (
	ProtocolTCP   Protocol = "tcp"   // opaque bytes; the default
	ProtocolHTTP  Protocol = "http"  // HTTP/1.1 to the upstream (downstream may be HTTP/1.1 or h2c)
	ProtocolHTTP2 Protocol = "http2" // HTTP/2 cleartext (h2c, prior knowledge) to the upstream
	ProtocolGRPC  Protocol = "grpc"  // gRPC: HTTP/2 to the upstream
	// ProtocolUDP is datagrams (DNS, media...), proxied per session by UDP
	// listeners, in plaintext between sidecars: no mTLS, no identity, no
	// authorization (Envoy's udp_proxy has none either).
	ProtocolUDP Protocol = "udp"
)

// ParseProtocol returns the Protocol named by s, and false when s is not one
// of tcp, http, http2, grpc, udp. Matching is case-insensitive.
func ParseProtocol(s string) (Protocol, bool) {
	switch p := Protocol(strings.ToLower(s)); p {
	case ProtocolTCP, ProtocolHTTP, ProtocolHTTP2, ProtocolGRPC, ProtocolUDP:
		return p, true
	}
	return "", false
}

// IsHTTP reports whether p is carried by an HTTP connection manager.
func (p Protocol) IsHTTP() bool { return p == ProtocolHTTP || p == ProtocolHTTP2 || p == ProtocolGRPC }

// UsesHTTP2 reports whether the upstream side of p speaks HTTP/2.
func (p Protocol) UsesHTTP2() bool { return p == ProtocolHTTP2 || p == ProtocolGRPC }

// UserAgentName is the xDS node user_agent_name meshlet's sidecar sends.
const UserAgentName = "meshlet"

// IsProxylessGRPC reports whether node is a proxyless gRPC client (grpc-go,
// grpc-java, C-core: user_agent_name starting with "gRPC"), or declares itself
// one with Istio's node metadata GENERATOR=grpc. Such clients receive API
// listeners for every service instead of a sidecar's listeners.
func IsProxylessGRPC(node *core.Node) bool {
	if strings.HasPrefix(node.GetUserAgentName(), "gRPC") {
		return true
	}
	return node.GetMetadata().GetFields()["GENERATOR"].GetStringValue() == "grpc"
}
