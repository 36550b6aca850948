package config

import (
	"fmt"
	"net/netip"
	"strings"

	listener "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	httprbac "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/rbac/v3"
	router "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/router/v3"
	originaldst "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/listener/original_dst/v3"
	tlsinspector "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/listener/tls_inspector/v3"
	hcm "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	netrbac "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/rbac/v3"
	tcpproxy "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/tcp_proxy/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/meshlet/meshlet/xds"
)

// DecodeListener decodes and validates an Any holding a Listener.
func DecodeListener(a *anypb.Any) (*Listener, error) {
	var l listener.Listener
	if err := unpack(a, &l, xds.KindListener); err != nil {
		return nil, err
	}
	return decodeListener(&l)
}

func decodeListener(l *listener.Listener) (*Listener, error) {
	kind, name := xds.KindListener, l.GetName()
	if name == "" {
		return nil, fieldErr(kind, name, "name", "required")
	}
	if l.GetApiListener() != nil {
		return nil, fieldErr(kind, name, "api_listener", "API listeners are for proxyless gRPC clients; a sidecar needs an address")
	}
	addr, udp, err := socketAddressUDP(l.GetAddress(), true)
	if err != nil {
		return nil, fieldErr(kind, name, "address", "%v", err)
	}
	if len(l.GetAdditionalAddresses()) > 0 {
		return nil, fieldErr(kind, name, "additional_addresses", "not supported")
	}
	out := &Listener{Name: name, Address: addr}
	if udp {
		return decodeUDPListener(l, out)
	}
	if l.GetUdpListenerConfig() != nil {
		return nil, fieldErr(kind, name, "udp_listener_config", "only for a listener whose address protocol is UDP")
	}
	if err := decodeListenerFilters(l, out); err != nil {
		return nil, err
	}
	if f, why := unsupportedListenerField(l); f != "" {
		return nil, fieldErr(kind, name, f, "%s", why)
	}
	out.FiltersTimeout = DefaultListenerFiltersTimeout
	if d := l.GetListenerFiltersTimeout(); d != nil {
		if out.FiltersTimeout = d.AsDuration(); out.FiltersTimeout < 0 || !d.IsValid() {
			return nil, fieldErr(kind, name, "listener_filters_timeout", "must be a valid duration of 0 or more")
		}
	}
	out.ContinueOnFiltersTimeout = l.GetContinueOnListenerFiltersTimeout()
	if out.OriginalDst {
		if err := decodeCaptureChains(l, out); err != nil {
			return nil, err
		}
	} else if err := decodeChains(l, out); err != nil {
		return nil, err
	}
	if err := decodeListenerTracing(l, out); err != nil {
		return nil, err
	}
	return out, nil
}

// decodeListenerFilters reads the listener filters of a TCP listener:
// tls_inspector and original_dst, each at most once.
func decodeListenerFilters(l *listener.Listener, out *Listener) error {
	kind, name := xds.KindListener, out.Name
	for i, lf := range l.GetListenerFilters() {
		field := fmt.Sprintf("listener_filters[%d]", i)
		if lf.GetFilterDisabled() != nil {
			return fieldErr(kind, name, field+".filter_disabled", "not supported")
		}
		tc := lf.GetTypedConfig()
		var seen *bool
		switch {
		case tc.MessageIs(&tlsinspector.TlsInspector{}):
			seen = &out.TLSInspector
		case tc.MessageIs(&originaldst.OriginalDst{}):
			var m originaldst.OriginalDst
			if err := tc.UnmarshalTo(&m); err != nil {
				return fieldErr(kind, name, field+".typed_config", "%v", err)
			}
			if f := unsupportedField(&m); f != "" {
				return fieldErr(kind, name, field+".typed_config."+f, "not supported")
			}
			seen = &out.OriginalDst
		default:
			return fieldErr(kind, name, field, "unsupported listener filter %q (supported: %s, %s)", lf.GetName(), xds.TLSInspectorFilter, xds.OriginalDstFilter)
		}
		if *seen {
			return fieldErr(kind, name, field, "listener filter %q appears twice", lf.GetName())
		}
		*seen = true
	}
	return nil
}

// unsupportedListenerField names a set Listener field that changes how
// connections are taken or given their chain in a way meshlet does not
// follow, and why; "" when none is set.
func unsupportedListenerField(l *listener.Listener) (field, why string) {
	switch {
	case l.GetFilterChainMatcher() != nil:
		return "filter_chain_matcher", "not supported: chains are selected by their filter_chain_match"
	case l.GetFcdsConfig() != nil:
		return "fcds_config", "not supported"
	case l.GetUseOriginalDst().GetValue():
		return "use_original_dst", "hand-off to the listener of the original destination is not supported: use the " + xds.OriginalDstFilter + " listener filter and filter chains matched on the destination"
	case l.GetTransparent().GetValue():
		return "transparent", "not supported (TPROXY); meshlet's interception is iptables REDIRECT"
	case l.GetBindToPort() != nil && !l.GetBindToPort().GetValue():
		return "bind_to_port", "false is not supported: every listener binds its address"
	}
	return "", ""
}

// decodeChains decodes the chains of an ordinary listener (without
// original_dst): one chain, or a tls and a raw_buffer one behind
// tls_inspector; a lone default_filter_chain is its one chain.
func decodeChains(l *listener.Listener, out *Listener) error {
	kind, name := xds.KindListener, out.Name
	chains := l.GetFilterChains()
	field := "filter_chains"
	switch {
	case len(chains) == 0 && l.GetDefaultFilterChain() != nil:
		chains, field = []*listener.FilterChain{l.GetDefaultFilterChain()}, "default_filter_chain"
	case l.GetDefaultFilterChain() != nil:
		return fieldErr(kind, name, "default_filter_chain", "alongside filter_chains only on a listener with the %s listener filter", xds.OriginalDstFilter)
	}
	switch {
	case len(chains) == 0:
		return fieldErr(kind, name, "filter_chains", "at least one filter chain is required")
	case len(chains) > 2 || (len(chains) == 2 && !out.TLSInspector):
		return fieldErr(kind, name, "filter_chains", "one filter chain, or two (tls and raw_buffer) behind %s, are supported; got %d", xds.TLSInspectorFilter, len(chains))
	}
	seen := map[string]bool{}
	for i, fc := range chains {
		f := fmt.Sprintf("%s[%d]", field, i)
		if field == "default_filter_chain" {
			f = field
		}
		c, err := decodeFilterChain(fc, kind, name, f, false)
		if err != nil {
			return err
		}
		if len(chains) == 2 && c.TransportProtocol == "" {
			return fieldErr(kind, name, f+".filter_chain_match.transport_protocol", "required with two filter chains (tls or raw_buffer)")
		}
		if seen[c.TransportProtocol] {
			return fieldErr(kind, name, f+".filter_chain_match.transport_protocol", "%q matched by two filter chains", c.TransportProtocol)
		}
		seen[c.TransportProtocol] = true
		out.Chains = append(out.Chains, c)
	}
	return nil
}

// decodeCaptureChains decodes the chains of a capture listener (with
// original_dst): filter chains matched on the original destination's
// prefix_ranges and destination_port (and, behind tls_inspector,
// transport_protocol), and the default_filter_chain, then builds their
// selection (Capture).
func decodeCaptureChains(l *listener.Listener, out *Listener) error {
	kind, name := xds.KindListener, out.Name
	if len(l.GetFilterChains()) == 0 && l.GetDefaultFilterChain() == nil {
		return fieldErr(kind, name, "filter_chains", "a filter chain or a default_filter_chain is required")
	}
	names := map[string]string{}
	named := func(c *FilterChain, field string) error {
		if c.Name == "" {
			return nil
		}
		if prev, ok := names[c.Name]; ok {
			return fieldErr(kind, name, field+".name", "%q also names %s", c.Name, prev)
		}
		names[c.Name] = field
		return nil
	}
	for i, fc := range l.GetFilterChains() {
		f := fmt.Sprintf("filter_chains[%d]", i)
		c, err := decodeFilterChain(fc, kind, name, f, true)
		if err != nil {
			return err
		}
		if c.TransportProtocol != "" && !out.TLSInspector {
			return fieldErr(kind, name, f+".filter_chain_match.transport_protocol", "needs the %s listener filter", xds.TLSInspectorFilter)
		}
		if err := named(c, f); err != nil {
			return err
		}
		out.Chains = append(out.Chains, c)
	}
	if dc := l.GetDefaultFilterChain(); dc != nil {
		if dc.GetFilterChainMatch() != nil && !proto.Equal(dc.GetFilterChainMatch(), &listener.FilterChainMatch{}) {
			return fieldErr(kind, name, "default_filter_chain.filter_chain_match", "must be empty (Envoy ignores it; it would match nothing)")
		}
		c, err := decodeFilterChain(dc, kind, name, "default_filter_chain", true)
		if err != nil {
			return err
		}
		if err := named(c, "default_filter_chain"); err != nil {
			return err
		}
		out.Default = c
	}
	capture, err := newCapture(out)
	if err != nil {
		return err
	}
	out.Capture = capture
	return nil
}

// decodeChainMatch reads a FilterChainMatch: transport_protocol anywhere;
// prefix_ranges and destination_port only on a capture listener, where the
// original destination is what they match (without original_dst Envoy
// would match the listener's own address).
func decodeChainMatch(m *listener.FilterChainMatch, c *FilterChain, kind xds.ResourceKind, name, field string, capture bool) error {
	field += ".filter_chain_match"
	switch m.GetTransportProtocol() {
	case "", "tls", "raw_buffer":
		c.TransportProtocol = m.GetTransportProtocol()
	default:
		return fieldErr(kind, name, field+".transport_protocol", "must be tls or raw_buffer (got %q)", m.GetTransportProtocol())
	}
	supported := []string{"transport_protocol"}
	if capture {
		supported = append(supported, "destination_port", "prefix_ranges")
	}
	if f := unsupportedField(m, supported...); f != "" {
		if !capture && (f == "destination_port" || f == "prefix_ranges") {
			return fieldErr(kind, name, field+"."+f, "needs the %s listener filter (meshlet matches the destination of redirected connections only)", xds.OriginalDstFilter)
		}
		return fieldErr(kind, name, field+"."+f, "not supported (supported: %s)", strings.Join(supported, ", "))
	}
	if p := m.GetDestinationPort(); p != nil {
		if p.GetValue() < 1 || p.GetValue() > 65535 {
			return fieldErr(kind, name, field+".destination_port", "%d out of range 1-65535", p.GetValue())
		}
		c.Match.Port = int(p.GetValue())
	}
	for i, r := range m.GetPrefixRanges() {
		f := fmt.Sprintf("%s.prefix_ranges[%d]", field, i)
		a, err := netip.ParseAddr(r.GetAddressPrefix())
		if err != nil || a.Zone() != "" {
			return fieldErr(kind, name, f+".address_prefix", "%q is not an IP address", r.GetAddressPrefix())
		}
		if a.Is4In6() {
			return fieldErr(kind, name, f+".address_prefix", "%q is IPv4-mapped: use the IPv4 form", r.GetAddressPrefix())
		}
		bits := int(r.GetPrefixLen().GetValue()) // unset: 0, as in Envoy
		if bits > a.BitLen() {
			return fieldErr(kind, name, f+".prefix_len", "%d is longer than an IPv%d address", bits, map[int]int{32: 4, 128: 6}[a.BitLen()])
		}
		c.Match.Prefixes = append(c.Match.Prefixes, netip.PrefixFrom(a, bits).Masked())
	}
	return nil
}

func decodeFilterChain(fc *listener.FilterChain, kind xds.ResourceKind, name, field string, capture bool) (*FilterChain, error) {
	c := &FilterChain{Name: fc.GetName()}
	if m := fc.GetFilterChainMatch(); m != nil {
		if err := decodeChainMatch(m, c, kind, name, field, capture); err != nil {
			return nil, err
		}
	}
	if c.TransportProtocol == "tls" && fc.GetTransportSocket() == nil {
		return nil, fieldErr(kind, name, field+".transport_socket", "a chain matching tls needs a TLS transport socket")
	}
	if ts := fc.GetTransportSocket(); ts != nil {
		var d tlsv3.DownstreamTlsContext
		if err := ts.GetTypedConfig().UnmarshalTo(&d); err != nil {
			return nil, fieldErr(kind, name, field+".transport_socket", "only %s with a DownstreamTlsContext is supported: %v", xds.TLSTransportSocket, err)
		}
		t, err := decodeDownstreamTLS(&d)
		if err != nil {
			return nil, fieldErr(kind, name, field+".transport_socket", "%v", err)
		}
		c.TLS = t
	}
	filters := fc.GetFilters()
	for i, f := range filters {
		ff := fmt.Sprintf("%s.filters[%d]", field, i)
		tc := f.GetTypedConfig()
		if tc == nil {
			return nil, fieldErr(kind, name, ff+".typed_config", "required")
		}
		last := i == len(filters)-1
		switch {
		case tc.MessageIs(&netrbac.RBAC{}) && !last:
			var m netrbac.RBAC
			if err := tc.UnmarshalTo(&m); err != nil {
				return nil, fieldErr(kind, name, ff+".typed_config", "%v", err)
			}
			if err := m.ValidateAll(); err != nil {
				return nil, fieldErr(kind, name, ff+".typed_config", "%v", err)
			}
			r, err := decodeRBACFilter(m.GetRules(), m.GetShadowRules())
			if err != nil {
				return nil, fieldErr(kind, name, ff+".typed_config", "%v", err)
			}
			c.RBAC = r
		case tc.MessageIs(&hcm.HttpConnectionManager{}) && last:
			var m hcm.HttpConnectionManager
			if err := tc.UnmarshalTo(&m); err != nil {
				return nil, fieldErr(kind, name, ff+".typed_config", "%v", err)
			}
			if err := m.ValidateAll(); err != nil {
				return nil, fieldErr(kind, name, ff+".typed_config", "%v", err)
			}
			h, err := decodeHCM(&m, kind, name, ff+".typed_config")
			if err != nil {
				return nil, err
			}
			c.HTTP = h
		case tc.MessageIs(&tcpproxy.TcpProxy{}) && last:
			var m tcpproxy.TcpProxy
			if err := tc.UnmarshalTo(&m); err != nil {
				return nil, fieldErr(kind, name, ff+".typed_config", "%v", err)
			}
			if err := m.ValidateAll(); err != nil {
				return nil, fieldErr(kind, name, ff+".typed_config", "%v", err)
			}
			cl := m.GetCluster()
			if cl == "" {
				return nil, fieldErr(kind, name, ff+".typed_config.cluster", "required (weighted_clusters is not supported)")
			}
			if f := unsupportedField(&m, "stat_prefix", "cluster", "max_connect_attempts", "idle_timeout"); f != "" {
				return nil, fieldErr(kind, name, ff+".typed_config."+f, "not supported (supported: stat_prefix, cluster, max_connect_attempts, idle_timeout)")
			}
			c.TCP = &TCPProxy{StatPrefix: m.GetStatPrefix(), Cluster: cl, MaxConnectAttempts: 1, IdleTimeout: DefaultTCPIdleTimeout}
			if a := m.GetMaxConnectAttempts(); a != nil {
				c.TCP.MaxConnectAttempts = int(a.GetValue())
			}
			if d := m.GetIdleTimeout(); d != nil {
				if c.TCP.IdleTimeout = d.AsDuration(); !d.IsValid() || c.TCP.IdleTimeout < 0 {
					return nil, fieldErr(kind, name, ff+".typed_config.idle_timeout", "must be a valid duration of 0 (no idle timeout) or more")
				}
			}
		default:
			return nil, fieldErr(kind, name, ff, "unsupported network filter %q (%s) here: a chain is [%s] then %s or %s",
				f.GetName(), tc.GetTypeUrl(), xds.RBACNetworkFilter, xds.HTTPConnectionManagerFilter, xds.TCPProxyFilter)
		}
	}
	if c.HTTP == nil && c.TCP == nil {
		return nil, fieldErr(kind, name, field+".filters", "must end with %s or %s", xds.HTTPConnectionManagerFilter, xds.TCPProxyFilter)
	}
	if c.HTTP != nil && c.RBAC != nil {
		return nil, fieldErr(kind, name, field+".filters", "use %s inside the HTTP connection manager, not %s", xds.RBACHTTPFilter, xds.RBACNetworkFilter)
	}
	return c, nil
}

func decodeHCM(m *hcm.HttpConnectionManager, kind xds.ResourceKind, name, field string) (*HTTPConnectionManager, error) {
	h := &HTTPConnectionManager{StatPrefix: m.GetStatPrefix(), Via: m.GetVia(), DelayedCloseTimeout: DefaultDelayedCloseTimeout,
		MaxRequestHeadersBytes: DefaultMaxRequestHeadersBytes, MaxHeadersCount: DefaultMaxHeadersCount, RequestHeadersTimeout: DefaultRequestHeadersTimeout}
	if d := m.GetDelayedCloseTimeout(); d != nil {
		if h.DelayedCloseTimeout = d.AsDuration(); !d.IsValid() || h.DelayedCloseTimeout < 0 {
			return nil, fieldErr(kind, name, field+".delayed_close_timeout", "must be a valid duration of 0 (no delayed close) or more")
		}
	}
	if d := m.GetRequestHeadersTimeout(); d != nil {
		if h.RequestHeadersTimeout = d.AsDuration(); !d.IsValid() || h.RequestHeadersTimeout < 0 {
			return nil, fieldErr(kind, name, field+".request_headers_timeout", "must be a valid duration of 0 (none) or more")
		}
	}
	if v := m.GetMaxRequestHeadersKb(); v != nil {
		// Envoy's range: 1 to 8192 KiB (its proto validation says so too).
		if v.GetValue() < 1 || v.GetValue() > 8192 {
			return nil, fieldErr(kind, name, field+".max_request_headers_kb", "%d out of range 1-8192", v.GetValue())
		}
		h.MaxRequestHeadersBytes = int(v.GetValue()) << 10
	}
	if v := m.GetCommonHttpProtocolOptions().GetMaxHeadersCount(); v != nil {
		if v.GetValue() < 1 {
			return nil, fieldErr(kind, name, field+".common_http_protocol_options.max_headers_count", "must be 1 or more")
		}
		h.MaxHeadersCount = int(v.GetValue())
	}
	switch m.GetCodecType() {
	case hcm.HttpConnectionManager_AUTO:
		h.Codec = CodecAuto
	case hcm.HttpConnectionManager_HTTP1:
		h.Codec = CodecHTTP1
	case hcm.HttpConnectionManager_HTTP2:
		h.Codec = CodecHTTP2
	default:
		return nil, fieldErr(kind, name, field+".codec_type", "unsupported codec %s", m.GetCodecType())
	}
	switch rs := m.GetRouteSpecifier().(type) {
	case *hcm.HttpConnectionManager_Rds:
		if !isADS(rs.Rds.GetConfigSource()) {
			return nil, fieldErr(kind, name, field+".rds.config_source", "only ADS is supported")
		}
		h.RouteConfigName = rs.Rds.GetRouteConfigName()
	case *hcm.HttpConnectionManager_RouteConfig:
		rc, err := decodeRouteConfig(rs.RouteConfig)
		if err != nil {
			return nil, fieldErr(kind, name, field+".route_config", "%v", err)
		}
		h.RouteConfig = rc
	default:
		return nil, fieldErr(kind, name, field, "route_config or rds is required (scoped routes are not supported)")
	}
	filters := m.GetHttpFilters()
	if len(filters) == 0 {
		return nil, fieldErr(kind, name, field+".http_filters", "must end with %s", xds.RouterFilter)
	}
	for i, f := range filters {
		ff := fmt.Sprintf("%s.http_filters[%d]", field, i)
		tc := f.GetTypedConfig()
		isRouter := tc.MessageIs(&router.Router{}) || (tc == nil && f.GetName() == xds.RouterFilter)
		switch {
		case isRouter && i != len(filters)-1:
			return nil, fieldErr(kind, name, ff, "%s must be the last HTTP filter", xds.RouterFilter)
		case !isRouter && i == len(filters)-1:
			return nil, fieldErr(kind, name, ff, "the last HTTP filter must be %s", xds.RouterFilter)
		case tc.MessageIs(&httprbac.RBAC{}):
			var r httprbac.RBAC
			if err := tc.UnmarshalTo(&r); err != nil {
				return nil, fieldErr(kind, name, ff, "%v", err)
			}
			if err := r.ValidateAll(); err != nil {
				return nil, fieldErr(kind, name, ff, "%v", err)
			}
			if r.GetMatcher() != nil || r.GetShadowMatcher() != nil {
				return nil, fieldErr(kind, name, ff, "matchers are not supported; use rules")
			}
			rf, err := decodeRBACFilter(r.GetRules(), r.GetShadowRules())
			if err != nil {
				return nil, fieldErr(kind, name, ff, "%v", err)
			}
			h.RBAC = rf
		case !isRouter && !f.GetIsOptional():
			return nil, fieldErr(kind, name, ff, "unsupported HTTP filter %q", f.GetName())
		}
	}
	for i, u := range m.GetUpgradeConfigs() {
		if len(u.GetFilters()) > 0 {
			return nil, fieldErr(kind, name, fmt.Sprintf("%s.upgrade_configs[%d].filters", field, i), "per-upgrade filter chains are not supported")
		}
		if u.GetEnabled() == nil || u.GetEnabled().GetValue() {
			h.Upgrades = append(h.Upgrades, strings.ToLower(u.GetUpgradeType()))
		}
	}
	if t := m.GetTracing(); t != nil {
		tr, err := decodeTracing(t)
		if err != nil {
			return nil, fieldErr(kind, name, field+".tracing", "%v", err)
		}
		h.Tracing = tr
	}
	switch m.GetForwardClientCertDetails() {
	case hcm.HttpConnectionManager_SANITIZE:
		h.ForwardClientCert = XFCCSanitize
	case hcm.HttpConnectionManager_SANITIZE_SET:
		h.ForwardClientCert = XFCCSanitizeSet
		h.SetCurrentURI = m.GetSetCurrentClientCertDetails().GetUri()
	default:
		return nil, fieldErr(kind, name, field+".forward_client_cert_details", "only SANITIZE and SANITIZE_SET are supported")
	}
	return h, nil
}
