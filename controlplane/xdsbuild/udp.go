package xdsbuild

import (
	"time"

	xdscore "github.com/cncf/xds/go/xds/core/v3"
	matcher "github.com/cncf/xds/go/xds/type/matcher/v3"
	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listener "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	udpproxy "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/udp/udp_proxy/v3"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/meshlet/meshlet/xds"
)

// udpRouteAction is the name of the action of a udp_proxy matcher that
// sends a session to a cluster (its typed config is a udp_proxy Route).
const udpRouteAction = "route"

// udpSocketAddress returns a UDP core.Address for host:port.
func udpSocketAddress(host string, port int) *core.Address {
	a := socketAddress(host, port)
	a.GetSocketAddress().Protocol = core.SocketAddress_UDP
	return a
}

// UDPProxyOptions configure NewUDPListener.
type UDPProxyOptions struct {
	// IdleTimeout is UdpProxyConfig.idle_timeout: a session without a
	// datagram either way for this long ends. 0 leaves the field unset:
	// Envoy's default of 1 min.
	IdleTimeout time.Duration
}

// NewUDPListener returns a UDP listener on host:port (Envoy's shape: a UDP
// socket address, no filter chains, the udp_proxy listener filter) proxying
// each downstream address's datagrams to clusterName, named as Envoy
// prefers now (UdpProxyConfig.matcher whose on_no_match is a Route action;
// the older UdpProxyConfig.cluster is deprecated). Nothing secures the
// datagrams: there is no TLS for UDP.
func NewUDPListener(name, host string, port int, clusterName string, o UDPProxyOptions) *listener.Listener {
	cfg := &udpproxy.UdpProxyConfig{
		StatPrefix:     name,
		RouteSpecifier: &udpproxy.UdpProxyConfig_Matcher{Matcher: udpClusterMatcher(clusterName)},
	}
	if o.IdleTimeout > 0 {
		cfg.IdleTimeout = durationpb.New(o.IdleTimeout)
	}
	return &listener.Listener{
		Name:    name,
		Address: udpSocketAddress(host, port),
		ListenerFilters: []*listener.ListenerFilter{{
			Name:       xds.UDPProxyFilter,
			ConfigType: &listener.ListenerFilter_TypedConfig{TypedConfig: xds.MustAny(cfg)},
		}},
	}
}

// udpClusterMatcher returns the udp_proxy matcher that sends every session
// to clusterName: no match tree, only on_no_match with a Route action.
func udpClusterMatcher(clusterName string) *matcher.Matcher {
	return &matcher.Matcher{OnNoMatch: &matcher.Matcher_OnMatch{OnMatch: &matcher.Matcher_OnMatch_Action{
		Action: &xdscore.TypedExtensionConfig{Name: udpRouteAction, TypedConfig: xds.MustAny(&udpproxy.Route{Cluster: clusterName})},
	}}}
}
