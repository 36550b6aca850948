package config

import (
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"time"

	cluster "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpoint "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listener "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	route "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	httprbac "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/rbac/v3"
	router "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/router/v3"
	originaldst "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/listener/original_dst/v3"
	tlsinspector "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/listener/tls_inspector/v3"
	hcm "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	netrbac "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/rbac/v3"
	tcpproxy "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/tcp_proxy/v3"
	previoushosts "github.com/envoyproxy/go-control-plane/envoy/extensions/retry/host/previous_hosts/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	upstreamhttp "github.com/envoyproxy/go-control-plane/envoy/extensions/upstreams/http/v3"
	matcher "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/meshlet/meshlet/xds"
)

// ErrInvalid is wrapped by every error a Decode function returns.
var ErrInvalid = errors.New("invalid resource")

// fieldError is a problem with one field of one resource.
type fieldError struct {
	kind, name, field, msg string
}

func (e *fieldError) Error() string {
	if e.field == "" {
		return fmt.Sprintf("%s %q: %s", e.kind, e.name, e.msg)
	}
	return fmt.Sprintf("%s %q: %s: %s", e.kind, e.name, e.field, e.msg)
}

func (e *fieldError) Unwrap() error { return ErrInvalid }

func fieldErr(kind, name, field, format string, args ...any) error {
	return &fieldError{kind: kind, name: name, field: field, msg: fmt.Sprintf(format, args...)}
}

type validatable interface {
	proto.Message
	ValidateAll() error
}

// unpack unmarshals a into m (checking the type URL) and runs m's generated
// validation.
func unpack(a *anypb.Any, m validatable, kind string) error {
	if a == nil {
		return fieldErr(kind, "", "", "empty resource")
	}
	if err := a.UnmarshalTo(m); err != nil {
		return fieldErr(kind, "", "", "cannot decode %s: %v", a.GetTypeUrl(), err)
	}
	if err := m.ValidateAll(); err != nil {
		name := ""
		if n, ok := m.(interface{ GetName() string }); ok {
			name = n.GetName()
		} else if n, ok := m.(interface{ GetClusterName() string }); ok {
			name = n.GetClusterName()
		}
		return fieldErr(kind, name, "", "%v", err)
	}
	return nil
}

// DecodeListener decodes and validates an Any holding a Listener.
func DecodeListener(a *anypb.Any) (*Listener, error) {
	var l listener.Listener
	if err := unpack(a, &l, "listener"); err != nil {
		return nil, err
	}
	return decodeListener(&l)
}

func decodeListener(l *listener.Listener) (*Listener, error) {
	kind, name := "listener", l.GetName()
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
	kind, name := "listener", out.Name
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
	kind, name := "listener", out.Name
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
	kind, name := "listener", out.Name
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
func decodeChainMatch(m *listener.FilterChainMatch, c *FilterChain, kind, name, field string, capture bool) error {
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

func decodeFilterChain(fc *listener.FilterChain, kind, name, field string, capture bool) (*FilterChain, error) {
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

// unsupportedField returns the name of the first field set in m that is
// not among supported (proto field names), or "" when there is none, so a
// NACK can name a field the sidecar would otherwise silently ignore.
func unsupportedField(m proto.Message, supported ...string) string {
	var found protoreflect.FieldDescriptor
	m.ProtoReflect().Range(func(fd protoreflect.FieldDescriptor, _ protoreflect.Value) bool {
		if !slices.Contains(supported, string(fd.Name())) && (found == nil || fd.Number() < found.Number()) {
			found = fd // the lowest field number, for a stable message
		}
		return true
	})
	if found == nil {
		return ""
	}
	return string(found.Name())
}

func tlsVersion(v tlsv3.TlsParameters_TlsProtocol, def uint16) (uint16, error) {
	switch v {
	case tlsv3.TlsParameters_TLS_AUTO:
		return def, nil
	case tlsv3.TlsParameters_TLSv1_2:
		return tls.VersionTLS12, nil
	case tlsv3.TlsParameters_TLSv1_3:
		return tls.VersionTLS13, nil
	}
	return 0, fmt.Errorf("TLS version %s is not supported (1.2 or 1.3)", v)
}

// decodeCommonTLS reads the SDS secret names, TLS versions, ALPN and URI SAN
// matchers of a CommonTlsContext.
func decodeCommonTLS(c *tlsv3.CommonTlsContext) (cert, roots string, minV, maxV uint16, alpn, sans []string, err error) {
	if len(c.GetTlsCertificates()) > 0 {
		return "", "", 0, 0, nil, nil, errors.New("common_tls_context.tls_certificates: inline certificates are not supported; use SDS")
	}
	sds := c.GetTlsCertificateSdsSecretConfigs()
	if len(sds) != 1 || !isADS(sds[0].GetSdsConfig()) {
		return "", "", 0, 0, nil, nil, errors.New("common_tls_context.tls_certificate_sds_secret_configs: exactly one, over ADS")
	}
	cert = sds[0].GetName()
	cvc := c.GetCombinedValidationContext()
	if cvc == nil || !isADS(cvc.GetValidationContextSdsSecretConfig().GetSdsConfig()) {
		return "", "", 0, 0, nil, nil, errors.New("common_tls_context.combined_validation_context: required, with its SDS secret over ADS")
	}
	roots = cvc.GetValidationContextSdsSecretConfig().GetName()
	for i, m := range cvc.GetDefaultValidationContext().GetMatchTypedSubjectAltNames() {
		e, ok := m.GetMatcher().GetMatchPattern().(*matcher.StringMatcher_Exact)
		if m.GetSanType() != tlsv3.SubjectAltNameMatcher_URI || !ok {
			return "", "", 0, 0, nil, nil, fmt.Errorf("match_typed_subject_alt_names[%d]: only exact URI matches are supported", i)
		}
		sans = append(sans, e.Exact)
	}
	if minV, err = tlsVersion(c.GetTlsParams().GetTlsMinimumProtocolVersion(), tls.VersionTLS12); err != nil {
		return
	}
	if maxV, err = tlsVersion(c.GetTlsParams().GetTlsMaximumProtocolVersion(), tls.VersionTLS13); err != nil {
		return
	}
	if minV > maxV {
		err = errors.New("tls_params: minimum above maximum")
	}
	return cert, roots, minV, maxV, c.GetAlpnProtocols(), sans, err
}

func decodeDownstreamTLS(d *tlsv3.DownstreamTlsContext) (*DownstreamTLS, error) {
	if err := d.ValidateAll(); err != nil {
		return nil, err
	}
	cert, roots, minV, maxV, alpn, sans, err := decodeCommonTLS(d.GetCommonTlsContext())
	if err != nil {
		return nil, err
	}
	return &DownstreamTLS{CertSecret: cert, RootsSecret: roots, RequireClientCert: d.GetRequireClientCertificate().GetValue(),
		MinVersion: minV, MaxVersion: maxV, ALPN: alpn, SANs: sans}, nil
}

func decodeUpstreamTLS(u *tlsv3.UpstreamTlsContext) (*UpstreamTLS, error) {
	if err := u.ValidateAll(); err != nil {
		return nil, err
	}
	cert, roots, minV, maxV, alpn, sans, err := decodeCommonTLS(u.GetCommonTlsContext())
	if err != nil {
		return nil, err
	}
	if len(sans) == 0 {
		return nil, errors.New("common_tls_context.combined_validation_context.default_validation_context.match_typed_subject_alt_names: required: the upstream's SPIFFE ID")
	}
	return &UpstreamTLS{CertSecret: cert, RootsSecret: roots, SNI: u.GetSni(), MinVersion: minV, MaxVersion: maxV, ALPN: alpn, SANs: sans}, nil
}

func decodeHCM(m *hcm.HttpConnectionManager, kind, name, field string) (*HTTPConnectionManager, error) {
	h := &HTTPConnectionManager{StatPrefix: m.GetStatPrefix(), Via: m.GetVia(), DelayedCloseTimeout: DefaultDelayedCloseTimeout}
	if d := m.GetDelayedCloseTimeout(); d != nil {
		if h.DelayedCloseTimeout = d.AsDuration(); !d.IsValid() || h.DelayedCloseTimeout < 0 {
			return nil, fieldErr(kind, name, field+".delayed_close_timeout", "must be a valid duration of 0 (no delayed close) or more")
		}
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

// DecodeRouteConfig decodes and validates an Any holding a
// RouteConfiguration.
func DecodeRouteConfig(a *anypb.Any) (*RouteConfig, error) {
	var rc route.RouteConfiguration
	if err := unpack(a, &rc, "route configuration"); err != nil {
		return nil, err
	}
	return decodeRouteConfig(&rc)
}

func decodeRouteConfig(rc *route.RouteConfiguration) (*RouteConfig, error) {
	kind, name := "route configuration", rc.GetName()
	if err := rc.ValidateAll(); err != nil {
		return nil, fieldErr(kind, name, "", "%v", err)
	}
	if rc.GetVhds() != nil {
		return nil, fieldErr(kind, name, "vhds", "not supported")
	}
	out := &RouteConfig{Name: name}
	domains := map[string]string{}
	for i, vh := range rc.GetVirtualHosts() {
		vf := fmt.Sprintf("virtual_hosts[%d]", i)
		v := &VirtualHost{Name: vh.GetName()}
		for j, d := range vh.GetDomains() {
			d = strings.ToLower(d)
			if prev, ok := domains[d]; ok {
				return nil, fieldErr(kind, name, fmt.Sprintf("%s.domains[%d]", vf, j), "domain %q is also in virtual host %q", d, prev)
			}
			if strings.Count(d, "*") > 1 || (strings.Contains(d, "*") && d != "*" && !strings.HasPrefix(d, "*") && !strings.HasSuffix(d, "*")) {
				return nil, fieldErr(kind, name, fmt.Sprintf("%s.domains[%d]", vf, j), "wildcard only as a whole prefix or suffix: %q", d)
			}
			domains[d] = vh.GetName()
			v.Domains = append(v.Domains, d)
		}
		if vh.GetRequireTls() != route.VirtualHost_NONE {
			return nil, fieldErr(kind, name, vf+".require_tls", "not supported")
		}
		for j, r := range vh.GetRoutes() {
			rt, err := decodeRoute(r)
			if err != nil {
				return nil, fieldErr(kind, name, fmt.Sprintf("%s.routes[%d]", vf, j), "%v", err)
			}
			v.Routes = append(v.Routes, rt)
		}
		out.VirtualHosts = append(out.VirtualHosts, v)
	}
	return out, nil
}

func decodeRoute(r *route.Route) (*Route, error) {
	out := &Route{Name: r.GetName(), CaseSensitive: true, BodyBufferBytes: DefaultBodyBufferBytes}
	m := r.GetMatch()
	if cs := m.GetCaseSensitive(); cs != nil {
		out.CaseSensitive = cs.GetValue()
	}
	switch p := m.GetPathSpecifier().(type) {
	case *route.RouteMatch_Prefix:
		out.Match, out.Path = MatchPrefix, p.Prefix
	case *route.RouteMatch_Path:
		out.Match, out.Path = MatchPath, p.Path
	default:
		return nil, fmt.Errorf("match: only prefix and path matches are supported")
	}
	if len(m.GetQueryParameters()) > 0 || m.GetGrpc() != nil || m.GetRuntimeFraction() != nil ||
		m.GetTlsContext() != nil || len(m.GetDynamicMetadata()) > 0 || len(m.GetFilterState()) > 0 {
		return nil, fmt.Errorf("match: only the path and headers are supported (query parameters and others are not)")
	}
	for i, h := range m.GetHeaders() {
		hm, err := decodeHeaderMatch(h)
		if err != nil {
			return nil, fmt.Errorf("match.headers[%d]: %w", i, err)
		}
		out.Headers = append(out.Headers, hm)
	}
	if !out.CaseSensitive {
		out.Path = strings.ToLower(out.Path)
	}
	ra, ok := r.GetAction().(*route.Route_Route)
	if !ok {
		return nil, fmt.Errorf("action: only route actions are supported (not redirect, direct_response or others)")
	}
	a := ra.Route
	c := a.GetCluster()
	if c == "" {
		return nil, fmt.Errorf("route.cluster: required (cluster_header and weighted_clusters are not supported)")
	}
	out.Cluster = c
	out.Timeout = DefaultRouteTimeout
	if t := a.GetTimeout(); t != nil {
		out.Timeout = t.AsDuration()
	}
	out.IdleTimeout = a.GetIdleTimeout().AsDuration()
	out.MaxStreamDuration = a.GetMaxStreamDuration().GetMaxStreamDuration().AsDuration()
	for name, d := range map[string]time.Duration{"route.timeout": out.Timeout, "route.idle_timeout": out.IdleTimeout, "route.max_stream_duration": out.MaxStreamDuration} {
		if d < 0 {
			return nil, fmt.Errorf("%s: must not be negative", name)
		}
	}
	for i, hp := range a.GetHashPolicy() {
		h := hp.GetHeader()
		if h == nil || i > 0 {
			return nil, fmt.Errorf("route.hash_policy: only one header hash policy is supported")
		}
		out.HashHeader = h.GetHeaderName()
	}
	if b := r.GetPerRequestBufferLimitBytes(); b != nil {
		out.BodyBufferBytes = int(b.GetValue())
	}
	if rp := a.GetRetryPolicy(); rp != nil {
		p, err := decodeRetryPolicy(rp)
		if err != nil {
			return nil, fmt.Errorf("route.retry_policy: %w", err)
		}
		var extras xds.RouteExtras
		if err := xds.DecodeExtras(r.GetMetadata(), &extras); err != nil {
			return nil, fmt.Errorf("metadata.filter_metadata[%q]: %w", xds.MetadataNamespace, err)
		}
		switch extras.NonIdempotent {
		case "", "safe":
		case "retry":
			p.NonIdempotentRetry = true
		default:
			return nil, fmt.Errorf("metadata.filter_metadata[%q].nonIdempotent: %q is not safe or retry", xds.MetadataNamespace, extras.NonIdempotent)
		}
		out.Retry = p
	}
	for i, u := range a.GetUpgradeConfigs() {
		if u.GetConnectConfig() != nil {
			return nil, fmt.Errorf("route.upgrade_configs[%d].connect_config: CONNECT termination is not supported", i)
		}
		if out.Upgrades == nil {
			out.Upgrades = map[string]bool{}
		}
		out.Upgrades[strings.ToLower(u.GetUpgradeType())] = u.GetEnabled() == nil || u.GetEnabled().GetValue()
	}
	return out, nil
}

func decodeHeaderMatch(h *route.HeaderMatcher) (HeaderMatch, error) {
	out := HeaderMatch{Name: h.GetName(), Invert: h.GetInvertMatch()}
	if !strings.HasPrefix(out.Name, ":") {
		out.Name = http.CanonicalHeaderKey(out.Name)
	}
	switch spec := h.GetHeaderMatchSpecifier().(type) {
	case *route.HeaderMatcher_PresentMatch:
		out.Present = true
		if !spec.PresentMatch {
			out.Invert = !out.Invert
		}
	case *route.HeaderMatcher_ExactMatch:
		out.Exact = spec.ExactMatch
	case *route.HeaderMatcher_StringMatch:
		e, ok := spec.StringMatch.GetMatchPattern().(*matcher.StringMatcher_Exact)
		if !ok || spec.StringMatch.GetIgnoreCase() {
			return out, errors.New("only exact string matches are supported")
		}
		out.Exact = e.Exact
	default:
		return out, errors.New("only exact and present header matches are supported")
	}
	return out, nil
}

func decodeRetryPolicy(rp *route.RetryPolicy) (*RetryPolicy, error) {
	p := &RetryPolicy{NumRetries: 1, BackoffBase: 25 * time.Millisecond}
	for tok := range strings.SplitSeq(rp.GetRetryOn(), ",") {
		tok = strings.TrimSpace(tok)
		if tok == "" {
			continue
		}
		c, ok := RetryConditions[tok]
		if !ok {
			return nil, fmt.Errorf("retry_on: unsupported condition %q", tok)
		}
		p.On |= c
	}
	if n := rp.GetNumRetries(); n != nil {
		p.NumRetries = int(n.GetValue())
	}
	p.PerTry = rp.GetPerTryTimeout().AsDuration()
	if b := rp.GetRetryBackOff(); b != nil {
		p.BackoffBase = b.GetBaseInterval().AsDuration()
		p.BackoffMax = b.GetMaxInterval().AsDuration()
	}
	if p.BackoffMax == 0 {
		p.BackoffMax = 10 * p.BackoffBase
	}
	for _, c := range rp.GetRetriableStatusCodes() {
		p.StatusCodes = append(p.StatusCodes, int(c))
	}
	for i, hp := range rp.GetRetryHostPredicate() {
		if hp.GetName() != xds.PreviousHostsPredicate && !hp.GetTypedConfig().MessageIs(&previoushosts.PreviousHostsPredicate{}) {
			return nil, fmt.Errorf("retry_host_predicate[%d]: unsupported %q (supported: %s)", i, hp.GetName(), xds.PreviousHostsPredicate)
		}
		p.OtherHost = true
	}
	if rp.GetRetryPriority() != nil || len(rp.GetRetryOptionsPredicates()) > 0 || len(rp.GetRetriableHeaders()) > 0 ||
		len(rp.GetRetriableRequestHeaders()) > 0 || rp.GetRateLimitedRetryBackOff() != nil || rp.GetPerTryIdleTimeout() != nil {
		return nil, errors.New("only retry_on, num_retries, per_try_timeout, retry_back_off, retriable_status_codes and the previous_hosts predicate are supported")
	}
	return p, nil
}

// DecodeCluster decodes and validates an Any holding a Cluster.
func DecodeCluster(a *anypb.Any) (*Cluster, error) {
	var c cluster.Cluster
	if err := unpack(a, &c, "cluster"); err != nil {
		return nil, err
	}
	kind, name := "cluster", c.GetName()
	if name == "" {
		return nil, fieldErr(kind, name, "name", "required")
	}
	out := &Cluster{Name: name, ConnectTimeout: xds.DefaultConnectTimeout, Protocol: xds.ProtocolTCP}
	if ct := c.GetConnectTimeout(); ct != nil {
		out.ConnectTimeout = ct.AsDuration()
	}
	switch c.GetType() {
	case cluster.Cluster_EDS:
		out.Type = ClusterEDS
		if !isADS(c.GetEdsClusterConfig().GetEdsConfig()) {
			return nil, fieldErr(kind, name, "eds_cluster_config.eds_config", "only ADS is supported")
		}
		out.EDSServiceName = c.GetEdsClusterConfig().GetServiceName()
		if out.EDSServiceName == "" {
			out.EDSServiceName = name
		}
	case cluster.Cluster_STATIC:
		out.Type = ClusterStatic
		la, err := decodeLoadAssignment(c.GetLoadAssignment())
		if err != nil {
			return nil, fieldErr(kind, name, "load_assignment", "%v", err)
		}
		out.Static = la
	case cluster.Cluster_ORIGINAL_DST:
		if err := decodeOriginalDstCluster(&c, out); err != nil {
			return nil, err
		}
		return out, nil
	default:
		if c.GetClusterType() != nil {
			return nil, fieldErr(kind, name, "cluster_type", "custom cluster types are not supported")
		}
		return nil, fieldErr(kind, name, "type", "unsupported discovery type %s (supported: STATIC, EDS, ORIGINAL_DST)", c.GetType())
	}
	switch c.GetLbPolicy() {
	case cluster.Cluster_CLUSTER_PROVIDED:
		return nil, fieldErr(kind, name, "lb_policy", "CLUSTER_PROVIDED is only for type ORIGINAL_DST (this cluster is %s)", c.GetType())
	case cluster.Cluster_ROUND_ROBIN:
		out.LB = LBRoundRobin
	case cluster.Cluster_LEAST_REQUEST:
		out.LB, out.ChoiceCount = LBLeastRequest, 2
		if n := c.GetLeastRequestLbConfig().GetChoiceCount(); n != nil {
			out.ChoiceCount = int(n.GetValue())
		}
	case cluster.Cluster_RING_HASH:
		out.LB, out.RingSize = LBRingHash, 1024
		if n := c.GetRingHashLbConfig().GetMinimumRingSize(); n != nil {
			out.RingSize = int(min(n.GetValue(), 1<<20))
		}
	default:
		return nil, fieldErr(kind, name, "lb_policy", "unsupported %s (supported: ROUND_ROBIN, LEAST_REQUEST, RING_HASH)", c.GetLbPolicy())
	}
	if c.GetOriginalDstLbConfig() != nil {
		return nil, fieldErr(kind, name, "original_dst_lb_config", "only for type ORIGINAL_DST")
	}
	return out, decodeClusterCommon(&c, out)
}

// decodeOriginalDstCluster decodes the ORIGINAL_DST specifics: lb_policy
// CLUSTER_PROVIDED, no endpoints, of original_dst_lb_config only
// upstream_port_override, and no per-host health state (its hosts last one
// connection: outlier detection and endpoint breakers would never see a
// second one). cleanup_interval is accepted: meshlet keeps no host beyond
// its connection.
func decodeOriginalDstCluster(c *cluster.Cluster, out *Cluster) error {
	kind, name := "cluster", out.Name
	out.Type, out.LB = ClusterOriginalDst, LBClusterProvided
	if c.GetLbPolicy() != cluster.Cluster_CLUSTER_PROVIDED {
		return fieldErr(kind, name, "lb_policy", "an ORIGINAL_DST cluster needs CLUSTER_PROVIDED (got %s)", c.GetLbPolicy())
	}
	if c.GetLoadAssignment() != nil {
		return fieldErr(kind, name, "load_assignment", "an ORIGINAL_DST cluster has no endpoints: each connection goes to its original destination")
	}
	if c.GetEdsClusterConfig() != nil {
		return fieldErr(kind, name, "eds_cluster_config", "an ORIGINAL_DST cluster has no endpoints")
	}
	switch lc := c.GetLbConfig().(type) {
	case nil:
	case *cluster.Cluster_OriginalDstLbConfig_:
		od := lc.OriginalDstLbConfig
		if f := unsupportedField(od, "upstream_port_override"); f != "" {
			return fieldErr(kind, name, "original_dst_lb_config."+f, "not supported (supported: upstream_port_override): the destination is the connection's original one")
		}
		if p := od.GetUpstreamPortOverride(); p != nil {
			if p.GetValue() < 1 || p.GetValue() > 65535 {
				return fieldErr(kind, name, "original_dst_lb_config.upstream_port_override", "%d out of range 1-65535", p.GetValue())
			}
			out.PortOverride = int(p.GetValue())
		}
	default:
		return fieldErr(kind, name, "lb_config", "only original_dst_lb_config goes with ORIGINAL_DST")
	}
	if c.GetOutlierDetection() != nil {
		return fieldErr(kind, name, "outlier_detection", "not supported on ORIGINAL_DST: each host serves one connection")
	}
	if err := decodeClusterCommon(c, out); err != nil {
		return err
	}
	if out.EndpointBreaker != nil {
		return fieldErr(kind, name, "metadata.filter_metadata[\""+xds.MetadataNamespace+"\"].endpointBreaker", "not supported on ORIGINAL_DST: each host serves one connection")
	}
	return nil
}

// decodeClusterCommon decodes what every cluster type has: circuit
// breakers, outlier detection, meshlet's extras, upstream TLS and HTTP
// protocol options.
func decodeClusterCommon(c *cluster.Cluster, out *Cluster) error {
	kind, name := "cluster", out.Name
	out.Thresholds = DefaultThresholds
	maxRetriesSet := false
	for i, t := range c.GetCircuitBreakers().GetThresholds() {
		if t.GetPriority() != core.RoutingPriority_DEFAULT {
			continue // no route asks for HIGH priority
		}
		if t.GetRetryBudget() != nil {
			return fieldErr(kind, name, fmt.Sprintf("circuit_breakers.thresholds[%d].retry_budget", i),
				"not supported: meshlet's retry budget is metadata.filter_metadata[%q].retryBudget", xds.MetadataNamespace)
		}
		maxRetriesSet = maxRetriesSet || t.GetMaxRetries() != nil
		for _, f := range []struct {
			dst *int
			v   *wrapperspb.UInt32Value
		}{
			{&out.Thresholds.MaxConnections, t.GetMaxConnections()}, {&out.Thresholds.MaxPendingRequests, t.GetMaxPendingRequests()},
			{&out.Thresholds.MaxRequests, t.GetMaxRequests()}, {&out.Thresholds.MaxRetries, t.GetMaxRetries()},
		} {
			if f.v != nil {
				*f.dst = int(f.v.GetValue())
			}
		}
	}
	if od := c.GetOutlierDetection(); od != nil {
		o, err := decodeOutlier(od)
		if err != nil {
			return fieldErr(kind, name, "outlier_detection", "%v", err)
		}
		out.Outlier = o
	}
	var extras xds.ClusterExtras
	if err := xds.DecodeExtras(c.GetMetadata(), &extras); err != nil {
		return fieldErr(kind, name, "metadata.filter_metadata[\""+xds.MetadataNamespace+"\"]", "%v", err)
	}
	if b := extras.RetryBudget; b != nil && (b.Ratio < 0 || b.Ratio > 1 || b.MinRetriesPerSecond < 0 || b.TTL <= 0) {
		return fieldErr(kind, name, "metadata.filter_metadata[\""+xds.MetadataNamespace+"\"].retryBudget", "ratio must be 0-1, minRetriesPerSecond ≥ 0, ttl > 0")
	}
	if b := extras.EndpointBreaker; b != nil && (b.ConsecutiveFailures == 0 && b.FailureRatio == 0 || b.OpenInterval <= 0 || b.FailureRatio < 0 || b.FailureRatio > 1) {
		return fieldErr(kind, name, "metadata.filter_metadata[\""+xds.MetadataNamespace+"\"].endpointBreaker", "needs consecutiveFailures or failureRatio (0-1), and openInterval > 0")
	}
	out.RetryBudget, out.EndpointBreaker = extras.RetryBudget, extras.EndpointBreaker
	if out.RetryBudget != nil && !maxRetriesSet {
		// A retry budget bounds retries; Envoy ignores max_retries when
		// CircuitBreakers.Thresholds.retry_budget is set, and Istio sets it
		// to the maximum for the same reason. Only an explicit max_retries
		// still caps the retries in flight.
		out.Thresholds.MaxRetries = UnlimitedRetries
	}
	if ts := c.GetTransportSocket(); ts != nil {
		var u tlsv3.UpstreamTlsContext
		if err := ts.GetTypedConfig().UnmarshalTo(&u); err != nil {
			return fieldErr(kind, name, "transport_socket", "only %s with an UpstreamTlsContext is supported: %v", xds.TLSTransportSocket, err)
		}
		t, err := decodeUpstreamTLS(&u)
		if err != nil {
			return fieldErr(kind, name, "transport_socket", "%v", err)
		}
		out.TLS = t
	}
	for key, opts := range c.GetTypedExtensionProtocolOptions() {
		if key != xds.HTTPProtocolOptionsKey {
			return fieldErr(kind, name, "typed_extension_protocol_options", "unsupported key %q", key)
		}
		var po upstreamhttp.HttpProtocolOptions
		if err := opts.UnmarshalTo(&po); err != nil {
			return fieldErr(kind, name, "typed_extension_protocol_options["+key+"]", "%v", err)
		}
		switch {
		case po.GetExplicitHttpConfig().GetHttp2ProtocolOptions() != nil:
			out.Protocol = xds.ProtocolHTTP2
		case po.GetExplicitHttpConfig().GetHttpProtocolOptions() != nil:
			out.Protocol = xds.ProtocolHTTP
		default:
			return fieldErr(kind, name, "typed_extension_protocol_options["+key+"]", "only explicit_http_config with HTTP/1.1 or HTTP/2 is supported")
		}
	}
	return nil
}

func decodeOutlier(od *cluster.OutlierDetection) (*OutlierDetection, error) {
	u32 := func(v *wrapperspb.UInt32Value, def uint32) int {
		if v == nil {
			return int(def)
		}
		return int(v.GetValue())
	}
	dur := func(d *durationpb.Duration, def time.Duration) time.Duration {
		if d == nil {
			return def
		}
		return d.AsDuration()
	}
	o := &OutlierDetection{
		SplitLocalOrigin:   od.GetSplitExternalLocalOriginErrors(),
		Interval:           dur(od.GetInterval(), 10*time.Second),
		BaseEjectionTime:   dur(od.GetBaseEjectionTime(), 30*time.Second),
		MaxEjectionTime:    dur(od.GetMaxEjectionTime(), 300*time.Second),
		MaxEjectionPercent: u32(od.GetMaxEjectionPercent(), 10),
	}
	// A detector runs when its enforcing percentage is above 0 (Envoy's
	// defaults: 100 for consecutive 5xx and local-origin, 0 for gateway).
	if u32(od.GetEnforcingConsecutive_5Xx(), 100) > 0 {
		o.Consecutive5xx = u32(od.GetConsecutive_5Xx(), 5)
	}
	if u32(od.GetEnforcingConsecutiveGatewayFailure(), 0) > 0 {
		o.ConsecutiveGatewayErrors = u32(od.GetConsecutiveGatewayFailure(), 5)
	}
	if o.SplitLocalOrigin && u32(od.GetEnforcingConsecutiveLocalOriginFailure(), 100) > 0 {
		o.ConsecutiveLocalOriginFailures = u32(od.GetConsecutiveLocalOriginFailure(), 5)
	}
	if v := od.GetEnforcingSuccessRate(); v != nil && v.GetValue() > 0 {
		return nil, errors.New("enforcing_success_rate: success-rate ejection is not supported (set it to 0)")
	}
	if v := od.GetEnforcingFailurePercentage(); v.GetValue() > 0 {
		return nil, errors.New("enforcing_failure_percentage: failure-percentage ejection is not supported")
	}
	if o.MaxEjectionPercent > 100 {
		return nil, fmt.Errorf("max_ejection_percent: %d is above 100", o.MaxEjectionPercent)
	}
	return o, nil
}

// DecodeLoadAssignment decodes and validates an Any holding a
// ClusterLoadAssignment.
func DecodeLoadAssignment(a *anypb.Any) (*LoadAssignment, error) {
	var la endpoint.ClusterLoadAssignment
	if err := unpack(a, &la, "cluster load assignment"); err != nil {
		return nil, err
	}
	out, err := decodeLoadAssignment(&la)
	if err != nil {
		return nil, fieldErr("cluster load assignment", la.GetClusterName(), "", "%v", err)
	}
	return out, nil
}

func decodeLoadAssignment(la *endpoint.ClusterLoadAssignment) (*LoadAssignment, error) {
	if la == nil {
		return nil, errors.New("required")
	}
	out := &LoadAssignment{ClusterName: la.GetClusterName()}
	for i, loc := range la.GetEndpoints() {
		if loc.GetPriority() != 0 {
			return nil, fmt.Errorf("endpoints[%d].priority: only priority 0 is supported", i)
		}
		for j, lbe := range loc.GetLbEndpoints() {
			f := fmt.Sprintf("endpoints[%d].lb_endpoints[%d]", i, j)
			ep := lbe.GetEndpoint()
			if ep == nil {
				return nil, fmt.Errorf("%s.endpoint: required (named endpoints are not supported)", f)
			}
			// TCP or UDP: a UDP cluster's datagrams go to the same host:port.
			addr, _, err := socketAddressUDP(ep.GetAddress(), false)
			if err != nil {
				return nil, fmt.Errorf("%s.endpoint.address: %w", f, err)
			}
			switch lbe.GetHealthStatus() {
			case core.HealthStatus_UNKNOWN, core.HealthStatus_HEALTHY:
			default:
				continue // UNHEALTHY, DRAINING, TIMEOUT, DEGRADED take no new traffic
			}
			w := uint32(1)
			if lw := lbe.GetLoadBalancingWeight(); lw != nil {
				w = lw.GetValue()
			}
			out.Endpoints = append(out.Endpoints, Endpoint{Address: addr, Weight: w})
		}
	}
	return out, nil
}

// socketAddressUDP returns "host:port" of a TCP or UDP socket address, and
// whether it is UDP. For listeners the host must be an IP address and port
// 0 is refused.
func socketAddressUDP(a *core.Address, forListener bool) (string, bool, error) {
	addr, err := socketHostPort(a, forListener)
	return addr, a.GetSocketAddress().GetProtocol() == core.SocketAddress_UDP, err
}

func socketHostPort(a *core.Address, forListener bool) (string, error) {
	sa := a.GetSocketAddress()
	if sa == nil {
		return "", errors.New("a socket_address is required (pipes and internal addresses are not supported)")
	}
	if p := sa.GetProtocol(); p != core.SocketAddress_TCP && p != core.SocketAddress_UDP {
		return "", fmt.Errorf("protocol %s is not supported", p)
	}
	pv, ok := sa.GetPortSpecifier().(*core.SocketAddress_PortValue)
	if !ok {
		return "", errors.New("port_value is required (named ports are not supported)")
	}
	if pv.PortValue == 0 || pv.PortValue > 65535 {
		return "", fmt.Errorf("port %d out of range 1-65535", pv.PortValue)
	}
	host := sa.GetAddress()
	if forListener {
		if _, err := netip.ParseAddr(host); err != nil {
			return "", fmt.Errorf("listener address %q is not an IP address", host)
		}
	} else if host == "" {
		return "", errors.New("address is required")
	}
	return net.JoinHostPort(host, strconv.Itoa(int(pv.PortValue))), nil
}

func isADS(cs *core.ConfigSource) bool {
	return cs != nil && cs.GetAds() != nil
}

func sortedKeys(set map[string]bool) []string {
	out := make([]string, 0, len(set))
	for k := range set {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}
