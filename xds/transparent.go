package xds

import (
	"net/netip"
	"strings"

	cluster "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listener "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	originaldst "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/listener/original_dst/v3"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// Transparent proxying: what the control plane and a sidecar whose pod's
// traffic is intercepted (iptables REDIRECT) agree on. The shapes follow
// Consul's transparent proxy on Envoy: an outbound listener with the
// original_dst listener filter and a filter chain per upstream matched on
// the upstream's virtual IPs and port, and a pass-through cluster of type
// ORIGINAL_DST.
const (
	// OutboundCapturePort is where intercepted outbound connections are
	// redirected (Consul's and Istio's 15001).
	OutboundCapturePort = 15001
	// InboundCapturePort is where intercepted inbound connections are
	// redirected (Istio's 15006).
	InboundCapturePort = 15006
	// OutboundCaptureListener and InboundCaptureListener name the two
	// capture listeners (Consul: "outbound_listener:127.0.0.1:15001";
	// meshlet keeps the name without the address).
	OutboundCaptureListener = "outbound_listener"
	InboundCaptureListener  = "inbound_listener"
	// PassthroughCluster is the ORIGINAL_DST cluster (lb_policy
	// CLUSTER_PROVIDED) a capture listener's default filter chain sends
	// connections to: the address they were going to (Consul:
	// "original-destination").
	PassthroughCluster = "original-destination"
	// OriginalDstFilter is Envoy's original_dst listener filter: the
	// connection's destination is its original one (SO_ORIGINAL_DST,
	// IP6T_SO_ORIGINAL_DST), which filter chains match on.
	OriginalDstFilter = "envoy.filters.listener.original_dst"
	// PassthroughChain names a capture listener's default filter chain.
	PassthroughChain = "passthrough"
	// directChainPrefix and directClusterPrefix prefix the names of the
	// chains and clusters of headless services (DirectChain,
	// DirectCluster).
	directChainPrefix   = "direct:"
	directClusterPrefix = "passthrough~"
)

// DirectChain returns the name of the outbound capture listener's filter
// chain for the instances of a headless service (a Kubernetes Service with
// clusterIP None, registered without a virtual address), which its callers
// dial by pod IP: "direct:<service>" (with ":<port>" appended by the
// translator when the instances listen on several ports). It follows
// Consul's service-defaults TransparentProxy.DialedDirectly.
func DirectChain(service string) string { return directChainPrefix + service }

// DirectService returns the service of a chain name made by DirectChain
// (without a ":<port>" suffix), and false for any other name.
func DirectService(chainName string) (string, bool) {
	s, ok := strings.CutPrefix(chainName, directChainPrefix)
	s, _, _ = strings.Cut(s, ":")
	return s, ok
}

// DirectCluster returns the name of the ORIGINAL_DST cluster (NewDirectCluster)
// that a headless service's DirectChain sends connections to:
// "passthrough~<service>", Consul's "passthrough~<sni>" for the upstreams
// it dials directly, with the service name where Consul puts the SNI, as
// meshlet's other clusters are named by service.
func DirectCluster(service string) string { return directClusterPrefix + service }

// DirectClusterService returns the service of a cluster name made by
// DirectCluster, and false for any other name.
func DirectClusterService(clusterName string) (string, bool) {
	return strings.CutPrefix(clusterName, directClusterPrefix)
}

// NewDirectCluster returns an ORIGINAL_DST cluster (lb_policy
// CLUSTER_PROVIDED) named name whose connections go, with o.TLS (the same
// UpstreamTlsContext as the service's EDS cluster: SNI, the service's
// SPIFFE ID as the required SAN, the SDS certificates), to the address the
// client dialled: the exact instance of a headless service, whose
// sidecar's inbound capture listener terminates the mTLS. Of o only
// ConnectTimeout (default DefaultConnectTimeout), Thresholds and TLS
// apply: the cluster has no endpoints, so no load balancing, outlier
// detection or endpoint breaker, and no HTTP protocol options (a TCP
// proxy carries its connections).
func NewDirectCluster(name string, o ClusterOptions) *cluster.Cluster {
	c := newCluster(name, ClusterOptions{ConnectTimeout: o.ConnectTimeout, Thresholds: o.Thresholds, TLS: o.TLS})
	c.ClusterDiscoveryType = &cluster.Cluster_Type{Type: cluster.Cluster_ORIGINAL_DST}
	c.LbPolicy = cluster.Cluster_CLUSTER_PROVIDED
	return c
}

// CaptureChain is one filter chain of a capture listener: the connections
// whose original destination is in Prefixes (CIDRs, e.g. "10.96.0.12/32")
// and, when Port is not 0, on Port, get Filters (as built for an explicit
// listener of the same upstream). Name is "upstream:<service>" outbound
// for a service's virtual address, DirectChain for a headless service's
// instances.
type CaptureChain struct {
	Name     string
	Prefixes []netip.Prefix
	Port     int
	Filters  []*listener.Filter
	// TransportSocket is the chain's downstream TLS (inbound), nil for
	// plaintext.
	TransportSocket *core.TransportSocket
}

// CaptureOptions configure NewCaptureListener.
type CaptureOptions struct {
	// Chains, in order: Envoy picks the most specific match (destination
	// port, then longest prefix), so order matters only for equal ones.
	Chains []CaptureChain
	// Passthrough adds the default filter chain: a TcpProxy to
	// PassthroughCluster, so connections no chain matches reach their
	// original destination. Without it they are closed (MeshDefaults
	// outbound: registry-only).
	Passthrough bool
	// ListenerFilters are added after original_dst (tls_inspector for an
	// inbound listener in permissive mode).
	ListenerFilters []*listener.ListenerFilter
}

// NewCaptureListener returns a capture listener named name on host:port
// with the original_dst listener filter, o.Chains as filter chains matched
// on prefix_ranges and destination_port, and the pass-through default
// chain when o.Passthrough.
func NewCaptureListener(name, host string, port int, o CaptureOptions) *listener.Listener {
	l := &listener.Listener{
		Name:    name,
		Address: SocketAddress(host, port),
		ListenerFilters: append([]*listener.ListenerFilter{{
			Name:       OriginalDstFilter,
			ConfigType: &listener.ListenerFilter_TypedConfig{TypedConfig: MustAny(&originaldst.OriginalDst{})},
		}}, o.ListenerFilters...),
	}
	for _, c := range o.Chains {
		m := &listener.FilterChainMatch{}
		for _, p := range c.Prefixes {
			m.PrefixRanges = append(m.PrefixRanges, &core.CidrRange{AddressPrefix: p.Addr().String(), PrefixLen: wrapperspb.UInt32(uint32(p.Bits()))})
		}
		if c.Port != 0 {
			m.DestinationPort = wrapperspb.UInt32(uint32(c.Port))
		}
		l.FilterChains = append(l.FilterChains, &listener.FilterChain{Name: c.Name, FilterChainMatch: m, Filters: c.Filters, TransportSocket: c.TransportSocket})
	}
	if o.Passthrough {
		l.DefaultFilterChain = &listener.FilterChain{Name: PassthroughChain, Filters: []*listener.Filter{{
			Name:       TCPProxyFilter,
			ConfigType: &listener.Filter_TypedConfig{TypedConfig: MustAny(newTCPProxy(PassthroughChain, PassthroughCluster, TCPProxyOptions{}))},
		}}}
	}
	return l
}

// NewPassthroughCluster returns PassthroughCluster: type ORIGINAL_DST,
// lb_policy CLUSTER_PROVIDED, plaintext, Envoy's default connect timeout.
func NewPassthroughCluster() *cluster.Cluster {
	return &cluster.Cluster{
		Name:                 PassthroughCluster,
		ClusterDiscoveryType: &cluster.Cluster_Type{Type: cluster.Cluster_ORIGINAL_DST},
		LbPolicy:             cluster.Cluster_CLUSTER_PROVIDED,
		ConnectTimeout:       durationpb.New(DefaultConnectTimeout),
	}
}
