package config

import (
	"fmt"

	matcher "github.com/cncf/xds/go/xds/type/matcher/v3"
	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listener "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	udpproxy "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/udp/udp_proxy/v3"

	"github.com/meshlet/meshlet/xds"
)

// decodeUDPListener decodes a listener whose address is UDP: no filter
// chains, exactly one listener filter, the udp_proxy, and of
// udp_listener_config only the downstream datagram size. Everything else
// Envoy has for UDP (QUIC, GRO, hash policies, session filters, tunneling,
// access logs, matcher trees) is NACKed with its field.
func decodeUDPListener(l *listener.Listener, out *Listener) (*Listener, error) {
	kind, name := xds.KindListener, out.Name
	switch {
	case len(l.GetFilterChains()) > 0:
		return nil, fieldErr(kind, name, "filter_chains", "a UDP listener has no filter chains (its %s listener filter proxies the datagrams)", xds.UDPProxyFilter)
	case l.GetDefaultFilterChain() != nil:
		return nil, fieldErr(kind, name, "default_filter_chain", "a UDP listener has no filter chains (its %s listener filter proxies the datagrams)", xds.UDPProxyFilter)
	case l.GetListenerFiltersTimeout() != nil || l.GetContinueOnListenerFiltersTimeout():
		return nil, fieldErr(kind, name, "listener_filters_timeout", "only for TCP listeners")
	}
	out.UDP = &UDPProxy{MaxDownstreamDatagram: MaxDatagramSize, MaxUpstreamDatagram: MaxDatagramSize, IdleTimeout: DefaultUDPIdleTimeout}
	if c := l.GetUdpListenerConfig(); c != nil {
		if f := unsupportedField(c, "downstream_socket_config"); f != "" {
			return nil, fieldErr(kind, name, "udp_listener_config."+f, "not supported (supported: downstream_socket_config.max_rx_datagram_size)")
		}
		n, err := datagramSize(c.GetDownstreamSocketConfig())
		if err != nil {
			return nil, fieldErr(kind, name, "udp_listener_config.downstream_socket_config."+err.field, "%s", err.msg)
		}
		out.UDP.MaxDownstreamDatagram = n
	}
	filters := l.GetListenerFilters()
	if len(filters) != 1 {
		return nil, fieldErr(kind, name, "listener_filters", "a UDP listener needs exactly one listener filter, %s (got %d)", xds.UDPProxyFilter, len(filters))
	}
	field := "listener_filters[0]"
	tc := filters[0].GetTypedConfig()
	if !tc.MessageIs(&udpproxy.UdpProxyConfig{}) {
		return nil, fieldErr(kind, name, field, "unsupported UDP listener filter %q (supported: %s)", filters[0].GetName(), xds.UDPProxyFilter)
	}
	field += ".typed_config"
	var m udpproxy.UdpProxyConfig
	if err := tc.UnmarshalTo(&m); err != nil {
		return nil, fieldErr(kind, name, field, "%v", err)
	}
	if err := m.ValidateAll(); err != nil {
		return nil, fieldErr(kind, name, field, "%v", err)
	}
	if f := unsupportedField(&m, "stat_prefix", "cluster", "matcher", "idle_timeout", "upstream_socket_config"); f != "" {
		return nil, fieldErr(kind, name, field+"."+f, "not supported (supported: stat_prefix, cluster or matcher, idle_timeout, upstream_socket_config.max_rx_datagram_size)")
	}
	out.UDP.StatPrefix = m.GetStatPrefix()
	switch rs := m.GetRouteSpecifier().(type) {
	case *udpproxy.UdpProxyConfig_Cluster:
		//lint:ignore SA1019 Envoy still accepts it; we decode what control planes send
		out.UDP.Cluster = rs.Cluster
	case *udpproxy.UdpProxyConfig_Matcher:
		c, err := udpMatcherCluster(rs.Matcher)
		if err != nil {
			return nil, fieldErr(kind, name, field+".matcher."+err.field, "%s", err.msg)
		}
		out.UDP.Cluster = c
	}
	if out.UDP.Cluster == "" {
		return nil, fieldErr(kind, name, field+".cluster", "required (or a matcher whose on_no_match routes to a cluster)")
	}
	if d := m.GetIdleTimeout(); d != nil {
		if out.UDP.IdleTimeout = d.AsDuration(); !d.IsValid() || out.UDP.IdleTimeout < 0 {
			return nil, fieldErr(kind, name, field+".idle_timeout", "must be a valid duration of 0 (no idle timeout) or more")
		}
	}
	if c := m.GetUpstreamSocketConfig(); c != nil {
		n, err := datagramSize(c)
		if err != nil {
			return nil, fieldErr(kind, name, field+".upstream_socket_config."+err.field, "%s", err.msg)
		}
		out.UDP.MaxUpstreamDatagram = n
	}
	return out, nil
}

// subfieldError is a problem with a field inside a sub-message, its path
// relative to that message.
type subfieldError struct{ field, msg string }

// datagramSize reads max_rx_datagram_size (1-MaxDatagramSize; default
// MaxDatagramSize) of a UdpSocketConfig, refusing its other fields.
func datagramSize(c *core.UdpSocketConfig) (int, *subfieldError) {
	if f := unsupportedField(c, "max_rx_datagram_size"); f != "" {
		return 0, &subfieldError{f, "not supported (supported: max_rx_datagram_size)"}
	}
	v := c.GetMaxRxDatagramSize()
	if v == nil {
		return MaxDatagramSize, nil
	}
	if v.GetValue() < 1 || v.GetValue() > MaxDatagramSize {
		return 0, &subfieldError{"max_rx_datagram_size", fmt.Sprintf("must be 1-%d (got %d)", MaxDatagramSize, v.GetValue())}
	}
	return int(v.GetValue()), nil
}

// udpMatcherCluster returns the cluster of a udp_proxy matcher that has no
// match tree, only on_no_match with a Route action (what a single-cluster
// UDP proxy looks like in Envoy's current config).
func udpMatcherCluster(m *matcher.Matcher) (string, *subfieldError) {
	if f := unsupportedField(m, "on_no_match"); f != "" {
		return "", &subfieldError{f, "not supported: only on_no_match with a route action to one cluster"}
	}
	om := m.GetOnNoMatch()
	if om == nil {
		return "", &subfieldError{"on_no_match", "required: a route action to the cluster"}
	}
	if f := unsupportedField(om, "action"); f != "" {
		return "", &subfieldError{"on_no_match." + f, "not supported: only a route action to one cluster"}
	}
	a := om.GetAction()
	var r udpproxy.Route
	if err := a.GetTypedConfig().UnmarshalTo(&r); err != nil {
		return "", &subfieldError{"on_no_match.action.typed_config", fmt.Sprintf("want a %s Route: %v", xds.UDPProxyFilter, err)}
	}
	if r.GetCluster() == "" {
		return "", &subfieldError{"on_no_match.action.typed_config.cluster", "required"}
	}
	return r.GetCluster(), nil
}
