// Package config is the sidecar's validated, immutable view of its xDS
// configuration. Decode functions turn each Envoy v3 resource into a plain Go
// value, checking both the proto's own constraints (protoc-gen-validate) and
// that the sidecar supports every field that changes behaviour; their errors
// become NACK details, so they name the resource and the field.
package config

import (
	"cmp"
	"math"
	"slices"
	"time"

	"github.com/meshlet/meshlet/xds"
)

// Snapshot is one complete configuration: every accepted resource, decoded,
// by name. A Snapshot is never modified after it is built.
type Snapshot struct {
	Listeners map[string]*Listener
	Routes    map[string]*RouteConfig
	Clusters  map[string]*Cluster
	// Endpoints by cluster name (ClusterLoadAssignment.cluster_name).
	Endpoints map[string]*LoadAssignment
	// Secrets by name (SDS).
	Secrets map[string]*Secret
}

// Listener is a decoded envoy.config.listener.v3.Listener: an address and
// one filter chain, or, behind the tls_inspector listener filter, one mTLS
// chain and one plaintext chain. A capture listener (OriginalDst) has any
// number of chains, each matched on the connection's original destination,
// and an optional default chain.
type Listener struct {
	Name string
	// Address is "host:port" (Listener.address.socket_address).
	Address string
	// TLSInspector is set when the tls_inspector listener filter picks the
	// chain by transport protocol.
	TLSInspector bool
	// FiltersTimeout is listener_filters_timeout: how long tls_inspector
	// waits for a connection's first byte (DefaultListenerFiltersTimeout
	// when unset; 0: no limit of its own).
	FiltersTimeout time.Duration
	// ContinueOnFiltersTimeout is continue_on_listener_filters_timeout: a
	// connection that sent nothing within FiltersTimeout (the client of a
	// server-first protocol) gets the plaintext chain instead of being
	// closed.
	ContinueOnFiltersTimeout bool
	// Chains holds one chain, or with TLSInspector one "tls" and one
	// "raw_buffer" chain. A UDP listener has none. On a capture listener
	// (OriginalDst) it holds every filter_chains entry, in order, each with
	// its Match; Capture says which serves a connection.
	Chains []*FilterChain
	// OriginalDst is set when listener_filters has Envoy's original_dst
	// (xds.OriginalDstFilter): a capture listener, to which iptables
	// REDIRECTs connections. Each connection's original destination
	// (SO_ORIGINAL_DST, IP6T_SO_ORIGINAL_DST) selects its filter chain.
	OriginalDst bool
	// Default is a capture listener's default_filter_chain: the chain of
	// the connections no filter chain matches; nil when absent, and then
	// those connections are refused (MeshDefaults outbound:
	// registry-only). On any other listener a default_filter_chain without
	// filter_chains is that listener's one chain, in Chains, and Default
	// is nil.
	Default *FilterChain
	// Capture is a capture listener's chain selection; nil unless
	// OriginalDst.
	Capture *Capture
	// UDP is set on a UDP listener (Listener.address.socket_address.protocol
	// UDP): its udp_proxy listener filter. Such a listener has no chains.
	UDP *UDPProxy
}

// FilterChain is one decoded filter chain: an optional mTLS transport
// socket, an optional network RBAC filter, and exactly one of an HTTP
// connection manager or a TCP proxy.
type FilterChain struct {
	// Name is FilterChain.name, "" when unset (e.g. "upstream:api" on a
	// capture listener; xds.PassthroughChain for its default chain).
	Name string
	// Match is the destination part of filter_chain_match (prefix_ranges,
	// destination_port), set only on a capture listener's chains.
	Match ChainMatch
	// TransportProtocol is filter_chain_match.transport_protocol: "",
	// "tls" or "raw_buffer".
	TransportProtocol string
	// TLS is the DownstreamTlsContext, nil for plaintext.
	TLS *DownstreamTLS
	// RBAC is envoy.filters.network.rbac, nil when absent.
	RBAC *RBACFilter
	HTTP *HTTPConnectionManager
	TCP  *TCPProxy
}

// DefaultListenerFiltersTimeout is Listener.FiltersTimeout when
// listener_filters_timeout is unset (Envoy's default).
const DefaultListenerFiltersTimeout = 15 * time.Second

// Chain returns the listener's chain for a connection that is TLS or not,
// or nil when it has none.
func (l *Listener) Chain(tls bool) *FilterChain {
	for _, c := range l.Chains {
		switch c.TransportProtocol {
		case "":
			return c
		case "tls":
			if tls {
				return c
			}
		case "raw_buffer":
			if !tls {
				return c
			}
		}
	}
	return nil
}

// DownstreamTLS is a decoded DownstreamTlsContext.
type DownstreamTLS struct {
	// CertSecret and RootsSecret name the SDS secrets presented and trusted.
	CertSecret, RootsSecret string
	RequireClientCert       bool
	// MinVersion and MaxVersion are crypto/tls versions.
	MinVersion, MaxVersion uint16
	ALPN                   []string
	// SANs, when set, are the URI SANs a peer must present one of.
	SANs []string
}

// UpstreamTLS is a decoded UpstreamTlsContext.
type UpstreamTLS struct {
	CertSecret, RootsSecret string
	SNI                     string
	MinVersion, MaxVersion  uint16
	ALPN                    []string
	// SANs are the URI SANs (SPIFFE IDs) the upstream must present one of.
	SANs []string
}

// Codec is the downstream HTTP codec (HttpConnectionManager.codec_type).
type Codec int

// Codecs.
const (
	CodecAuto  Codec = iota // HTTP/1.1 and h2c (prior knowledge), detected per connection
	CodecHTTP1              // HTTP/1.1 only
	CodecHTTP2              // h2c only
)

// HTTPConnectionManager is the decoded
// envoy.filters.network.http_connection_manager config.
type HTTPConnectionManager struct {
	StatPrefix string
	Codec      Codec
	// RouteConfigName names the RDS resource to use; "" when RouteConfig is
	// inline.
	RouteConfigName string
	// RouteConfig is the inline route configuration, nil with RDS.
	RouteConfig *RouteConfig
	// Via is the received-by value appended to the Via header of requests
	// and responses (HttpConnectionManager.via); "" adds none.
	Via string
	// RBAC is the envoy.filters.http.rbac filter, nil when absent.
	RBAC *RBACFilter
	// ForwardClientCert is forward_client_cert_details: XFCCSanitize drops
	// any incoming x-forwarded-client-cert; XFCCSanitizeSet replaces it with
	// the peer's (By, Hash and, with SetCurrentURI, URI).
	ForwardClientCert XFCC
	SetCurrentURI     bool
	// Tracing is HttpConnectionManager.tracing; nil: requests are not
	// traced (incoming trace headers still pass through untouched).
	Tracing *Tracing
	// Upgrades are the lower-case upgrade types (HTTP/1.1 Upgrade, e.g.
	// "websocket") the connection manager tunnels
	// (HttpConnectionManager.upgrade_configs, enabled ones).
	Upgrades []string
	// DelayedCloseTimeout is HttpConnectionManager.delayed_close_timeout:
	// after an HTTP/1.1 answer sent before the request body was all read
	// (a 413, a 401 before an upload), the downstream connection's write
	// side is shut down and what the client still sends is read and
	// discarded for up to this long (and a bounded size), so its kernel
	// does not reset the connection over the answer; then it is closed.
	// DefaultDelayedCloseTimeout (1 s) when the field is unset, as in
	// Envoy; 0 (the field set to 0s) disables it: the connection is closed
	// at once.
	DelayedCloseTimeout time.Duration
	// MaxRequestHeadersBytes bounds a request's head (request line and
	// header fields, as on the wire; HTTP/2: the header list) in bytes:
	// a larger one is answered 431 (HttpConnectionManager.
	// max_request_headers_kb × 1024; DefaultMaxRequestHeadersBytes when
	// unset, Envoy's 60 KiB).
	MaxRequestHeadersBytes int
	// MaxHeadersCount bounds a request's header fields: more are answered
	// 431 (HttpConnectionManager.common_http_protocol_options.
	// max_headers_count; DefaultMaxHeadersCount when unset, Envoy's 100).
	MaxHeadersCount int
	// RequestHeadersTimeout bounds the time from a request's first byte
	// to the end of its head: a client still sending it then is closed
	// (HttpConnectionManager.request_headers_timeout;
	// DefaultRequestHeadersTimeout when unset; 0, the field set to 0s,
	// disables it, as Envoy's default does).
	RequestHeadersTimeout time.Duration
}

// Defaults of HTTPConnectionManager's request limits. The head size and
// field count are Envoy's defaults. Envoy has no request headers timeout
// by default; meshlet bounds a head at 10 s (HAProxy's common
// `timeout http-request`): a peer in the mesh sends a head in one write,
// and a client trickling one (slowloris) must not hold a connection.
const (
	DefaultMaxRequestHeadersBytes = 60 << 10
	DefaultMaxHeadersCount        = 100
	DefaultRequestHeadersTimeout  = 10 * time.Second
)

// HeadersBytesLimit is MaxRequestHeadersBytes, or its default when unset
// (0: a connection manager not decoded from xDS).
func (h *HTTPConnectionManager) HeadersBytesLimit() int {
	return cmp.Or(h.MaxRequestHeadersBytes, DefaultMaxRequestHeadersBytes)
}

// HeadersCountLimit is MaxHeadersCount, or its default when unset.
func (h *HTTPConnectionManager) HeadersCountLimit() int {
	return cmp.Or(h.MaxHeadersCount, DefaultMaxHeadersCount)
}

// DefaultDelayedCloseTimeout is HTTPConnectionManager.DelayedCloseTimeout
// when HttpConnectionManager.delayed_close_timeout is unset (Envoy's
// default, 1000 ms).
const DefaultDelayedCloseTimeout = time.Second

// UpgradeAllowed reports whether an upgrade of type typ (lower case) is
// tunnelled on route r: the route's upgrade_configs decide when they name
// typ, else the connection manager's.
func (h *HTTPConnectionManager) UpgradeAllowed(r *Route, typ string) bool {
	if r != nil {
		if on, ok := r.Upgrades[typ]; ok {
			return on
		}
	}
	return slices.Contains(h.Upgrades, typ)
}

// XFCC is how x-forwarded-client-cert is handled.
type XFCC int

// XFCC modes (HttpConnectionManager.ForwardClientCertDetails).
const (
	XFCCSanitize XFCC = iota
	XFCCSanitizeSet
)

// TCPProxy is the decoded envoy.filters.network.tcp_proxy config.
type TCPProxy struct {
	StatPrefix string
	Cluster    string
	// MaxConnectAttempts is TcpProxy.max_connect_attempts (default 1): a
	// failed connect is retried on another endpoint this many times minus one.
	MaxConnectAttempts int
	// IdleTimeout is TcpProxy.idle_timeout: a connection through which no
	// byte has moved either way (downstream or upstream) for this long is
	// closed on both sides. DefaultTCPIdleTimeout (1 h) when the field is
	// unset, as in Envoy; 0 (the field set to 0s) disables it.
	IdleTimeout time.Duration
}

// DefaultTCPIdleTimeout is TCPProxy.IdleTimeout when TcpProxy.idle_timeout
// is unset (Envoy's default).
const DefaultTCPIdleTimeout = time.Hour

// UDPProxy is the decoded envoy.filters.udp_listener.udp_proxy config
// (UdpProxyConfig) of a UDP listener, with the listener's datagram size.
// Datagrams travel in plaintext: there is no TLS, identity or
// authorization for UDP (Envoy's udp_proxy has none either).
type UDPProxy struct {
	StatPrefix string
	// Cluster receives every session: UdpProxyConfig.cluster, or the
	// cluster of the Route action of UdpProxyConfig.matcher.on_no_match.
	// Each downstream address is a session with its own upstream socket to
	// an endpoint the cluster's load balancer picks; the cluster's
	// circuit-breaker max_connections bounds the sessions, as in Envoy.
	Cluster string
	// IdleTimeout is UdpProxyConfig.idle_timeout: a session without a
	// datagram either way for this long ends (DefaultUDPIdleTimeout when
	// unset, as in Envoy; 0 keeps sessions until the listener goes).
	IdleTimeout time.Duration
	// MaxDownstreamDatagram and MaxUpstreamDatagram are the largest
	// datagrams read from clients and from the upstream
	// (udp_listener_config.downstream_socket_config and
	// UdpProxyConfig.upstream_socket_config max_rx_datagram_size); larger
	// ones are dropped. MaxDatagramSize when unset (Envoy's default is 1500
	// bytes; meshlet reads every datagram into a pooled 64 KiB buffer
	// anyway, so it takes any size by default).
	MaxDownstreamDatagram, MaxUpstreamDatagram int
}

// UDP proxy defaults and limits.
const (
	// DefaultUDPIdleTimeout is UDPProxy.IdleTimeout when
	// UdpProxyConfig.idle_timeout is unset (Envoy's default).
	DefaultUDPIdleTimeout = time.Minute
	// MaxDatagramSize is the largest UDP payload meshlet handles (65,535
	// bytes, a 64 KiB buffer), and the default datagram limit.
	MaxDatagramSize = 65535
)

// RouteConfig is a decoded envoy.config.route.v3.RouteConfiguration.
type RouteConfig struct {
	Name         string
	VirtualHosts []*VirtualHost
}

// VirtualHost is a decoded envoy.config.route.v3.VirtualHost.
type VirtualHost struct {
	Name string
	// Domains are matched against the request authority without port, in
	// Envoy's order: exact, then suffix wildcard ("*.example.com"), then
	// prefix wildcard ("foo.*"), then "*".
	Domains []string
	Routes  []*Route
}

// MatchKind is how a Route matches the path.
type MatchKind int

// Path match kinds (RouteMatch.path_specifier).
const (
	MatchPrefix MatchKind = iota // RouteMatch.prefix
	MatchPath                    // RouteMatch.path (exact)
)

// Route is a decoded envoy.config.route.v3.Route with a RouteAction to one
// cluster.
type Route struct {
	Name          string
	Match         MatchKind
	Path          string // the prefix or exact path
	CaseSensitive bool   // RouteMatch.case_sensitive, default true
	// Headers must all match (RouteMatch.headers).
	Headers []HeaderMatch
	Cluster string
	// Timeout is RouteAction.timeout: the whole exchange including retries,
	// 0 = none; for streaming responses (SSE, gRPC) it ends at the response
	// headers. Envoy's default when the field is absent is 15 s
	// (DefaultRouteTimeout).
	Timeout time.Duration
	// IdleTimeout is RouteAction.idle_timeout: no bytes either way for
	// this long resets the request; 0 = none.
	IdleTimeout time.Duration
	// MaxStreamDuration is RouteAction.max_stream_duration: a cap on any
	// request, streams included; 0 = none.
	MaxStreamDuration time.Duration
	// Retry is RouteAction.retry_policy, nil for no retries.
	Retry *RetryPolicy
	// HashHeader is the header of RouteAction.hash_policy (ring hash), "".
	HashHeader string
	// BodyBufferBytes is Route.per_request_buffer_limit_bytes: request
	// bodies up to this size can be replayed on retry (default
	// DefaultBodyBufferBytes).
	BodyBufferBytes int
	// Upgrades overrides the connection manager's upgrade types on this
	// route (RouteAction.upgrade_configs: type → enabled); nil: none.
	Upgrades map[string]bool
}

// DefaultBodyBufferBytes is Route.per_request_buffer_limit_bytes when unset
// (bytes): xds.DefaultBodyBufferBytes, the value the control plane writes.
const DefaultBodyBufferBytes = xds.DefaultBodyBufferBytes

// HeaderMatch is a decoded RouteMatch header matcher: exact value, or
// presence when Present is set. Names are canonical (":method" stays as is).
type HeaderMatch struct {
	Name    string
	Exact   string
	Present bool
	Invert  bool
}

// RetryOn is a set of retry conditions (RetryPolicy.retry_on).
type RetryOn uint32

// Retry conditions.
const (
	RetryConnectFailure RetryOn = 1 << iota
	RetryRefusedStream
	RetryReset
	Retry5xx
	RetryGatewayError
	RetryRetriableStatusCodes
	RetryGRPCCancelled
	RetryGRPCDeadlineExceeded
	RetryGRPCInternal
	RetryGRPCResourceExhausted
	RetryGRPCUnavailable
)

// RetryConditions maps retry_on tokens to conditions.
var RetryConditions = map[xds.RetryOn]RetryOn{
	xds.RetryConnectFailure: RetryConnectFailure, xds.RetryRefusedStream: RetryRefusedStream, xds.RetryReset: RetryReset,
	xds.Retry5xx: Retry5xx, xds.RetryGatewayError: RetryGatewayError, xds.RetryRetriableStatusCodes: RetryRetriableStatusCodes,
	xds.RetryGRPCCancelled: RetryGRPCCancelled, xds.RetryGRPCDeadlineExceeded: RetryGRPCDeadlineExceeded, xds.RetryGRPCInternal: RetryGRPCInternal,
	xds.RetryGRPCResourceExhausted: RetryGRPCResourceExhausted, xds.RetryGRPCUnavailable: RetryGRPCUnavailable,
}

// RetryPolicy is a decoded envoy.config.route.v3.RetryPolicy plus meshlet's
// route extras.
type RetryPolicy struct {
	On         RetryOn
	NumRetries int           // num_retries (Envoy default 1)
	PerTry     time.Duration // per_try_timeout, until the response headers; 0 = none
	// BackoffBase and BackoffMax shape the full-jitter exponential backoff
	// (retry_back_off; defaults 25 ms and 10 × base).
	BackoffBase, BackoffMax time.Duration
	StatusCodes             []int // retriable_status_codes
	// OtherHost is set by the previous_hosts retry host predicate: retries
	// prefer endpoints not tried yet.
	OtherHost bool
	// NonIdempotentRetry is RouteExtras.nonIdempotent == "retry".
	NonIdempotentRetry bool
}

// DefaultRouteTimeout is RouteAction.timeout when the field is absent
// (Envoy's default).
const DefaultRouteTimeout = 15 * time.Second

// ClusterType is the cluster discovery type (Cluster.type).
type ClusterType int

// Supported cluster discovery types.
const (
	ClusterEDS    ClusterType = iota // endpoints from EDS over ADS
	ClusterStatic                    // endpoints inline in load_assignment
	// ClusterOriginalDst (ORIGINAL_DST, lb_policy CLUSTER_PROVIDED) has no
	// endpoints of its own: each connection goes to its original
	// destination, the address a capture listener read from the
	// redirected connection (xds.PassthroughCluster). Only the TCP proxy
	// of a capture listener's chain has one to give it.
	ClusterOriginalDst
)

// LBPolicy is the load-balancing algorithm (Cluster.lb_policy).
type LBPolicy int

// Supported algorithms.
const (
	LBRoundRobin   LBPolicy = iota // weighted round robin
	LBLeastRequest                 // power of ChoiceCount choices
	LBRingHash                     // consistent hashing on the route's hash policy
	// LBClusterProvided is CLUSTER_PROVIDED, the only policy of an
	// ORIGINAL_DST cluster: the destination is the connection's own.
	LBClusterProvided
)

// Thresholds are connection-pool limits (CircuitBreakers.Thresholds,
// priority DEFAULT; Envoy's defaults when unset). The zero value stands for
// DefaultThresholds.
type Thresholds struct {
	MaxConnections, MaxPendingRequests, MaxRequests, MaxRetries int
}

// DefaultThresholds are Envoy's circuit breaker defaults. A cluster with a
// retry budget (Cluster.RetryBudget) and no explicit max_retries gets
// UnlimitedRetries instead of 3: the budget bounds its retries, as Envoy's
// CircuitBreakers.Thresholds.retry_budget overrides max_retries.
var DefaultThresholds = Thresholds{MaxConnections: 1024, MaxPendingRequests: 1024, MaxRequests: 1024, MaxRetries: 3}

// UnlimitedRetries is Thresholds.MaxRetries when nothing but the retry
// budget limits retries in flight: the largest max_retries xDS can carry
// (2^32-1, the value Istio sets).
const UnlimitedRetries = math.MaxUint32

// OutlierDetection is a decoded envoy.config.cluster.v3.OutlierDetection.
// A consecutive count of 0 means that detector is off (enforcing 0).
type OutlierDetection struct {
	Consecutive5xx, ConsecutiveGatewayErrors, ConsecutiveLocalOriginFailures int
	// SplitLocalOrigin is split_external_local_origin_errors: when false,
	// local-origin failures count as 5xx (503).
	SplitLocalOrigin                            bool
	Interval, BaseEjectionTime, MaxEjectionTime time.Duration
	MaxEjectionPercent                          int
}

// Cluster is a decoded envoy.config.cluster.v3.Cluster.
type Cluster struct {
	// TLS is the UpstreamTlsContext, nil for plaintext.
	TLS  *UpstreamTLS
	Name string
	Type ClusterType
	// EDSServiceName is the ClusterLoadAssignment name to fetch
	// (eds_cluster_config.service_name, default the cluster name).
	EDSServiceName string
	// ConnectTimeout is Cluster.connect_timeout (default 5 s).
	ConnectTimeout time.Duration
	// Protocol is the upstream protocol: ProtocolHTTP2 when HttpProtocolOptions
	// asks for HTTP/2, ProtocolHTTP for HTTP/1.1, ProtocolTCP when the
	// cluster has no HTTP options (used by TCP proxies, or HTTP/1.1 when an
	// HTTP route points at it).
	Protocol xds.Protocol
	// Static holds the inline endpoints of a STATIC cluster.
	Static *LoadAssignment
	// PortOverride is an ORIGINAL_DST cluster's
	// original_dst_lb_config.upstream_port_override: connections go to
	// their original destination's address on this port; 0 keeps the
	// original port.
	PortOverride int
	// LB is lb_policy; ChoiceCount is least_request_lb_config.choice_count
	// (default 2); RingSize is ring_hash_lb_config.minimum_ring_size
	// (default 1024): each endpoint gets RingSize/4 ring entries per unit of
	// weight, a count independent of the number of endpoints so membership
	// changes move only the keys of the endpoints that change.
	LB          LBPolicy
	ChoiceCount int
	RingSize    int
	// Thresholds are the DEFAULT-priority circuit breakers.
	Thresholds Thresholds
	// Outlier is outlier_detection, nil when absent.
	Outlier *OutlierDetection
	// RetryBudget and EndpointBreaker come from meshlet's cluster extras
	// (metadata "meshlet"); nil when absent.
	RetryBudget     *xds.RetryBudget
	EndpointBreaker *xds.EndpointBreaker
}

// LoadAssignment is a decoded envoy.config.endpoint.v3.ClusterLoadAssignment
// holding only the endpoints that may receive traffic (health status
// HEALTHY or UNKNOWN), in the order given.
type LoadAssignment struct {
	ClusterName string
	Endpoints   []Endpoint
}

// Endpoint is one upstream host.
type Endpoint struct {
	// Address is "host:port".
	Address string
	// Weight is LbEndpoint.load_balancing_weight (default 1).
	Weight uint32
}

// AllChains returns the listener's filter chains followed by its default
// chain when it has one (a capture listener's).
func (l *Listener) AllChains() []*FilterChain {
	if l.Default == nil {
		return l.Chains
	}
	return append(slices.Clip(l.Chains), l.Default)
}

// RouteNames returns the RDS names the listeners reference, sorted.
func RouteNames(listeners map[string]*Listener) []string {
	set := map[string]bool{}
	for _, l := range listeners {
		for _, c := range l.AllChains() {
			if c.HTTP != nil && c.HTTP.RouteConfigName != "" {
				set[c.HTTP.RouteConfigName] = true
			}
		}
	}
	return sortedKeys(set)
}

// SecretNames returns the SDS names the listeners and clusters reference,
// sorted.
func SecretNames(listeners map[string]*Listener, clusters map[string]*Cluster) []string {
	set := map[string]bool{}
	for _, l := range listeners {
		for _, c := range l.AllChains() {
			if t := c.TLS; t != nil {
				set[t.CertSecret], set[t.RootsSecret] = true, true
			}
		}
	}
	for _, c := range clusters {
		if t := c.TLS; t != nil {
			set[t.CertSecret], set[t.RootsSecret] = true, true
		}
	}
	delete(set, "")
	return sortedKeys(set)
}

// EndpointNames returns the EDS names the clusters reference, sorted.
func EndpointNames(clusters map[string]*Cluster) []string {
	set := map[string]bool{}
	for _, c := range clusters {
		if c.Type == ClusterEDS {
			set[c.EDSServiceName] = true
		}
	}
	return sortedKeys(set)
}
