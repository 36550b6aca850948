package xds

import (
	"net/netip"

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
)

// CaptureChain is one filter chain of a capture listener: the connections
// whose original destination is in Prefixes (CIDRs, e.g. "10.96.0.12/32")
// and, when Port is not 0, on Port, get Filters (as built for an explicit
// listener of the same upstream). Name is "upstream:<service>" outbound.
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
