package xdsbuild

import (
	"cmp"
	"strings"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listener "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	rbacv3 "github.com/envoyproxy/go-control-plane/envoy/config/rbac/v3"
	httprbac "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/rbac/v3"
	tlsinspector "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/listener/tls_inspector/v3"
	hcm "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	netrbac "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/rbac/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	matcher "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/meshlet/meshlet/xds"
)

// NewCertSecret returns the xds.SecretCert secret: a PEM chain (leaf first) and
// its PEM private key, inline.
func NewCertSecret(certPEM, keyPEM string) *tlsv3.Secret {
	return &tlsv3.Secret{
		Name: xds.SecretCert,
		Type: &tlsv3.Secret_TlsCertificate{TlsCertificate: &tlsv3.TlsCertificate{
			CertificateChain: &core.DataSource{Specifier: &core.DataSource_InlineString{InlineString: certPEM}},
			PrivateKey:       &core.DataSource{Specifier: &core.DataSource_InlineString{InlineString: keyPEM}},
		}},
	}
}

// NewRootsSecret returns the xds.SecretRoots secret holding every root.
func NewRootsSecret(rootsPEM []string) *tlsv3.Secret {
	var b strings.Builder
	for _, r := range rootsPEM {
		b.WriteString(strings.TrimSpace(r))
		b.WriteByte('\n')
	}
	return &tlsv3.Secret{
		Name: xds.SecretRoots,
		Type: &tlsv3.Secret_ValidationContext{ValidationContext: &tlsv3.CertificateValidationContext{
			TrustedCa: &core.DataSource{Specifier: &core.DataSource_InlineString{InlineString: b.String()}},
		}},
	}
}

func sdsRef(name string) *tlsv3.SdsSecretConfig {
	return &tlsv3.SdsSecretConfig{Name: name, SdsConfig: adsConfigSource()}
}

func tlsParams(minVersion string) *tlsv3.TlsParameters {
	v := tlsv3.TlsParameters_TLSv1_3
	if minVersion == "1.2" {
		v = tlsv3.TlsParameters_TLSv1_2
	}
	return &tlsv3.TlsParameters{TlsMinimumProtocolVersion: v, TlsMaximumProtocolVersion: tlsv3.TlsParameters_TLSv1_3}
}

// commonTLS presents xds.SecretCert and validates the peer against xds.SecretRoots,
// requiring, when sanURI is set, that the peer's URI SAN is exactly it.
func commonTLS(minVersion, sanURI string, alpn []string) *tlsv3.CommonTlsContext {
	vc := &tlsv3.CertificateValidationContext{}
	if sanURI != "" {
		vc.MatchTypedSubjectAltNames = []*tlsv3.SubjectAltNameMatcher{{
			SanType: tlsv3.SubjectAltNameMatcher_URI,
			Matcher: &matcher.StringMatcher{MatchPattern: &matcher.StringMatcher_Exact{Exact: sanURI}},
		}}
	}
	return &tlsv3.CommonTlsContext{
		TlsParams:                      tlsParams(minVersion),
		TlsCertificateSdsSecretConfigs: []*tlsv3.SdsSecretConfig{sdsRef(xds.SecretCert)},
		ValidationContextType: &tlsv3.CommonTlsContext_CombinedValidationContext{CombinedValidationContext: &tlsv3.CommonTlsContext_CombinedCertificateValidationContext{
			DefaultValidationContext:         vc,
			ValidationContextSdsSecretConfig: sdsRef(xds.SecretRoots),
		}},
		AlpnProtocols: alpn,
	}
}

// DownstreamTLS returns the transport socket of an inbound mTLS listener:
// TLS from minVersion ("1.2" or "1.3") to 1.3, xds.SecretCert presented, a
// client certificate required and validated against xds.SecretRoots (which
// caller is allowed is the RBAC filter's job).
func DownstreamTLS(minVersion string, alpn []string) *core.TransportSocket {
	return &core.TransportSocket{Name: xds.TLSTransportSocket, ConfigType: &core.TransportSocket_TypedConfig{TypedConfig: xds.MustAny(&tlsv3.DownstreamTlsContext{
		CommonTlsContext:         commonTLS(minVersion, "", alpn),
		RequireClientCertificate: wrapperspb.Bool(true),
	})}}
}

// UpstreamTLS returns the transport socket of an mTLS cluster: xds.SecretCert
// presented, the server validated against xds.SecretRoots and required to be
// exactly spiffeID (not merely any mesh certificate), SNI set to sni.
func UpstreamTLS(minVersion, sni, spiffeID string, alpn []string) *core.TransportSocket {
	return &core.TransportSocket{Name: xds.TLSTransportSocket, ConfigType: &core.TransportSocket_TypedConfig{TypedConfig: xds.MustAny(&tlsv3.UpstreamTlsContext{
		CommonTlsContext: commonTLS(minVersion, spiffeID, alpn),
		Sni:              sni,
	})}}
}

// InboundOptions configure NewInboundListener.
type InboundOptions struct {
	// HTTP selects an HTTP connection manager routing to xds.LocalAppCluster;
	// otherwise a TCP proxy.
	HTTP bool
	// Via is the HTTP connection manager's via.
	Via string
	// TLS is the downstream mTLS transport socket (DownstreamTLS).
	TLS *core.TransportSocket
	// Permissive adds a plaintext filter chain (selected by tls_inspector's
	// transport_protocol "raw_buffer") without authorization.
	Permissive bool
	// Rules and Shadow are the RBAC rules enforced on mTLS traffic and the
	// shadow rules used only to name the rule behind a denial.
	Rules, Shadow *rbacv3.RBAC
	// Tracing turns on tracing of HTTP requests (server spans); nil: off.
	Tracing *Tracing
	// TCP shapes the TCP proxy to xds.LocalAppCluster when HTTP is false
	// (its idle timeout; connect attempts stay 1).
	TCP TCPProxyOptions
	// Cluster is the local app's cluster the chains send to;
	// xds.LocalAppCluster when empty (xds.LocalAppPortCluster for a
	// Service's other target port).
	Cluster string
}

// PermissiveDetectTimeout is a permissive listener's
// listener_filters_timeout: how long tls_inspector waits for a connection's
// first byte. A client that has sent nothing by then, the plaintext client
// of a server-first protocol (MySQL, SMTP, FTP...) waiting for the server's
// greeting, gets the plaintext chain (continue_on_listener_filters_timeout)
// rather than being closed; a TLS client's ClientHello comes with its first
// packet, long before. Istio's PROTOCOL_DETECTION_TIMEOUT was the same.
const PermissiveDetectTimeout = 100 * time.Millisecond

// NewInboundListener returns the public listener: an mTLS filter chain
// (RBAC, then the HTTP connection manager or TCP proxy to the local app,
// with the caller's SPIFFE ID in x-forwarded-client-cert for HTTP) and, in
// permissive mode, a plaintext chain chosen by tls_inspector (plaintext as
// well when no byte arrives within PermissiveDetectTimeout).
func NewInboundListener(name, host string, port int, o InboundOptions) *listener.Listener {
	l := &listener.Listener{Name: name, Address: socketAddress(host, port)}
	tlsChain := &listener.FilterChain{Filters: inboundFilters(name, o, true), TransportSocket: o.TLS}
	if o.HTTP {
		o.Tracing.applyTo(l)
	}
	if !o.Permissive {
		l.FilterChains = []*listener.FilterChain{tlsChain}
		return l
	}
	l.ListenerFilters = []*listener.ListenerFilter{{
		Name:       xds.TLSInspectorFilter,
		ConfigType: &listener.ListenerFilter_TypedConfig{TypedConfig: xds.MustAny(&tlsinspector.TlsInspector{})},
	}}
	l.ListenerFiltersTimeout = durationpb.New(PermissiveDetectTimeout)
	l.ContinueOnListenerFiltersTimeout = true
	tlsChain.FilterChainMatch = &listener.FilterChainMatch{TransportProtocol: "tls"}
	l.FilterChains = []*listener.FilterChain{tlsChain, {
		FilterChainMatch: &listener.FilterChainMatch{TransportProtocol: "raw_buffer"},
		Filters:          inboundFilters(name, o, false),
	}}
	return l
}

func inboundFilters(name string, o InboundOptions, secure bool) []*listener.Filter {
	if o.HTTP {
		m := withUpgrades(newHCM(name, HTTPListenerOptions{
			RouteConfig: NewRouteConfig(cmp.Or(o.Cluster, xds.LocalAppCluster), cmp.Or(o.Cluster, xds.LocalAppCluster), RouteOptions{}),
			Via:         o.Via,
			Tracing:     o.Tracing,
		}))
		m.ForwardClientCertDetails = hcm.HttpConnectionManager_SANITIZE
		if secure {
			m.ForwardClientCertDetails = hcm.HttpConnectionManager_SANITIZE_SET
			m.SetCurrentClientCertDetails = &hcm.HttpConnectionManager_SetCurrentClientCertDetails{Uri: true}
			if o.Rules != nil {
				m.HttpFilters = append([]*hcm.HttpFilter{{
					Name: xds.RBACHTTPFilter,
					ConfigType: &hcm.HttpFilter_TypedConfig{TypedConfig: xds.MustAny(&httprbac.RBAC{
						Rules: o.Rules, ShadowRules: o.Shadow, ShadowRulesStatPrefix: "denied_by_",
					})},
				}}, m.HttpFilters...)
			}
		}
		return []*listener.Filter{{Name: xds.HTTPConnectionManagerFilter, ConfigType: &listener.Filter_TypedConfig{TypedConfig: xds.MustAny(m)}}}
	}
	var fs []*listener.Filter
	if secure && o.Rules != nil {
		fs = append(fs, &listener.Filter{Name: xds.RBACNetworkFilter, ConfigType: &listener.Filter_TypedConfig{TypedConfig: xds.MustAny(&netrbac.RBAC{
			Rules: o.Rules, ShadowRules: o.Shadow, StatPrefix: name, ShadowRulesStatPrefix: "denied_by_",
		})}})
	}
	return append(fs, &listener.Filter{Name: xds.TCPProxyFilter, ConfigType: &listener.Filter_TypedConfig{TypedConfig: xds.MustAny(newTCPProxy(name, cmp.Or(o.Cluster, xds.LocalAppCluster), o.TCP))}})
}
