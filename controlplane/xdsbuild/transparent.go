package xdsbuild

import (
	"net/netip"

	cluster "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listener "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	originaldst "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/listener/original_dst/v3"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/meshlet/meshlet/xds"
)

// Transparent proxying: the capture listeners and ORIGINAL_DST clusters
// of a sidecar whose pod's traffic is intercepted (iptables REDIRECT), in
// the shapes of Consul's transparent proxy on Envoy (the names and ports
// are in xds).

// NewDirectCluster returns an ORIGINAL_DST cluster (lb_policy
// CLUSTER_PROVIDED) named name whose connections go, with o.TLS (the same
// UpstreamTlsContext as the service's EDS cluster: SNI, the service's
// SPIFFE ID as the required SAN, the SDS certificates), to the address the
// client dialled: the exact instance of a headless service, whose
// sidecar's inbound capture listener terminates the mTLS. Of o only
// ConnectTimeout (default xds.DefaultConnectTimeout), Thresholds and TLS
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
// for a service's virtual address, xds.DirectChain for a headless service's
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
	// xds.PassthroughCluster, so connections no chain matches reach their
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
		Address: socketAddress(host, port),
		ListenerFilters: append([]*listener.ListenerFilter{{
			Name:       xds.OriginalDstFilter,
			ConfigType: &listener.ListenerFilter_TypedConfig{TypedConfig: xds.MustAny(&originaldst.OriginalDst{})},
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
		l.DefaultFilterChain = &listener.FilterChain{Name: xds.PassthroughChain, Filters: []*listener.Filter{{
			Name:       xds.TCPProxyFilter,
			ConfigType: &listener.Filter_TypedConfig{TypedConfig: xds.MustAny(newTCPProxy(xds.PassthroughChain, xds.PassthroughCluster, TCPProxyOptions{}))},
		}}}
	}
	return l
}

// NewPassthroughCluster returns xds.PassthroughCluster: type ORIGINAL_DST,
// lb_policy CLUSTER_PROVIDED, plaintext, Envoy's default connect timeout.
func NewPassthroughCluster() *cluster.Cluster {
	return &cluster.Cluster{
		Name:                 xds.PassthroughCluster,
		ClusterDiscoveryType: &cluster.Cluster_Type{Type: cluster.Cluster_ORIGINAL_DST},
		LbPolicy:             cluster.Cluster_CLUSTER_PROVIDED,
		ConnectTimeout:       durationpb.New(xds.DefaultConnectTimeout),
	}
}
