// Package xdsbuild builds the standard Envoy resources translate emits
// (listeners, route configurations, clusters, load assignments, secrets),
// following Envoy's v3 API. It is control-plane only: what the sidecar must
// agree on (resource and extension names, the filter_metadata["meshlet"]
// extras, defaults) is in package xds, which both sides import. Sidecar
// tests use it to decode the resources the control plane really builds.
package xdsbuild

import (
	"slices"
	"time"

	cluster "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpoint "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listener "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	rbacv3 "github.com/envoyproxy/go-control-plane/envoy/config/rbac/v3"
	route "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	httprbac "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/rbac/v3"
	router "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/router/v3"
	hcm "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	tcpproxy "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/tcp_proxy/v3"
	upstreamhttp "github.com/envoyproxy/go-control-plane/envoy/extensions/upstreams/http/v3"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/meshlet/meshlet/xds"
)

// socketAddress returns a TCP core.Address for host:port.
func socketAddress(host string, port int) *core.Address {
	return &core.Address{Address: &core.Address_SocketAddress{SocketAddress: &core.SocketAddress{
		Protocol:      core.SocketAddress_TCP,
		Address:       host,
		PortSpecifier: &core.SocketAddress_PortValue{PortValue: uint32(port)},
	}}}
}

// HTTPListenerOptions configure NewHTTPListener. Exactly one of
// RouteConfigName (RDS over ADS) and RouteConfig (inline) must be set.
type HTTPListenerOptions struct {
	// StatPrefix for the connection manager (Envoy: stat_prefix); defaults
	// to the listener name.
	StatPrefix string
	// RouteConfigName names a RouteConfiguration fetched by RDS over ADS.
	RouteConfigName string
	// RouteConfig is an inline route configuration.
	RouteConfig *route.RouteConfiguration
	// Via is the received-by part of the Via header (RFC 9110 §7.6.3) the
	// proxy appends to requests and responses; "" adds none (Envoy:
	// HttpConnectionManager.via).
	Via string
	// Tracing turns on tracing (HttpConnectionManager.tracing); nil: off.
	Tracing *Tracing
	// RBAC, when set, is an RBAC HTTP filter before the router (a
	// transparent proxy's chain for a service it may not reach: a DENY of
	// every request, named after the rule that denies it).
	RBAC *rbacv3.RBAC
}

// NewHTTPListener returns a listener on host:port whose single filter chain
// is an HTTP connection manager (codec AUTO: HTTP/1.1 and h2c) ending in the
// router filter.
func NewHTTPListener(name, host string, port int, o HTTPListenerOptions) *listener.Listener {
	l := &listener.Listener{
		Name:    name,
		Address: socketAddress(host, port),
		FilterChains: []*listener.FilterChain{{
			Filters: []*listener.Filter{{
				Name:       xds.HTTPConnectionManagerFilter,
				ConfigType: &listener.Filter_TypedConfig{TypedConfig: xds.MustAny(withUpgrades(newHCM(name, o)))},
			}},
		}},
	}
	o.Tracing.applyTo(l)
	return l
}

func newHCM(name string, o HTTPListenerOptions) *hcm.HttpConnectionManager {
	m := &hcm.HttpConnectionManager{
		CodecType:   hcm.HttpConnectionManager_AUTO,
		StatPrefix:  o.StatPrefix,
		Via:         o.Via,
		HttpFilters: []*hcm.HttpFilter{routerHTTPFilter()},
	}
	if m.StatPrefix == "" {
		m.StatPrefix = name
	}
	if o.Tracing != nil {
		m.Tracing = o.Tracing.hcmTracing()
	}
	if o.RBAC != nil {
		m.HttpFilters = append([]*hcm.HttpFilter{{
			Name:       xds.RBACHTTPFilter,
			ConfigType: &hcm.HttpFilter_TypedConfig{TypedConfig: xds.MustAny(&httprbac.RBAC{Rules: o.RBAC})},
		}}, m.HttpFilters...)
	}
	if o.RouteConfig != nil {
		m.RouteSpecifier = &hcm.HttpConnectionManager_RouteConfig{RouteConfig: o.RouteConfig}
	} else {
		m.RouteSpecifier = &hcm.HttpConnectionManager_Rds{Rds: &hcm.Rds{
			RouteConfigName: o.RouteConfigName,
			ConfigSource:    adsConfigSource(),
		}}
	}
	return m
}

// webSocketUpgrade is the upgrade type sidecars tunnel
// (HttpConnectionManager.upgrade_configs), on by default as in Istio.
const webSocketUpgrade = "websocket"

// withUpgrades enables WebSocket upgrades on m and returns it.
func withUpgrades(m *hcm.HttpConnectionManager) *hcm.HttpConnectionManager {
	m.UpgradeConfigs = []*hcm.HttpConnectionManager_UpgradeConfig{{UpgradeType: webSocketUpgrade}}
	return m
}

// routerHTTPFilter returns the terminal router HTTP filter.
func routerHTTPFilter() *hcm.HttpFilter {
	return &hcm.HttpFilter{
		Name:       xds.RouterFilter,
		ConfigType: &hcm.HttpFilter_TypedConfig{TypedConfig: xds.MustAny(&router.Router{})},
	}
}

// NewAPIListener returns a listener for proxyless gRPC clients: no address,
// an api_listener holding an HTTP connection manager with the route
// configuration inline (grpc-go resolves "xds:///<name>" by it).
func NewAPIListener(name string, rc *route.RouteConfiguration) *listener.Listener {
	return &listener.Listener{
		Name:        name,
		ApiListener: &listener.ApiListener{ApiListener: xds.MustAny(newHCM(name, HTTPListenerOptions{RouteConfig: rc}))},
	}
}

// TCPProxyOptions configure the TcpProxy of NewTCPProxyListener and of an
// inbound TCP listener (InboundOptions.TCP).
type TCPProxyOptions struct {
	// MaxConnectAttempts is TcpProxy.max_connect_attempts; 0 leaves Envoy's
	// default of 1.
	MaxConnectAttempts int
	// IdleTimeout is TcpProxy.idle_timeout: no byte either way for this
	// long closes the connection. 0 leaves the field unset, which is
	// Envoy's default of 1 h (a set 0s would disable it).
	IdleTimeout time.Duration
}

// NewTCPProxyListener returns a listener on host:port whose single filter
// chain is a TCP proxy to clusterName shaped by o.
func NewTCPProxyListener(name, host string, port int, clusterName string, o TCPProxyOptions) *listener.Listener {
	return &listener.Listener{
		Name:    name,
		Address: socketAddress(host, port),
		FilterChains: []*listener.FilterChain{{
			Filters: []*listener.Filter{{
				Name:       xds.TCPProxyFilter,
				ConfigType: &listener.Filter_TypedConfig{TypedConfig: xds.MustAny(newTCPProxy(name, clusterName, o))},
			}},
		}},
	}
}

func newTCPProxy(statPrefix, clusterName string, o TCPProxyOptions) *tcpproxy.TcpProxy {
	tp := &tcpproxy.TcpProxy{
		StatPrefix:       statPrefix,
		ClusterSpecifier: &tcpproxy.TcpProxy_Cluster{Cluster: clusterName},
	}
	if o.MaxConnectAttempts > 0 {
		tp.MaxConnectAttempts = wrapperspb.UInt32(uint32(o.MaxConnectAttempts))
	}
	if o.IdleTimeout > 0 {
		tp.IdleTimeout = durationpb.New(o.IdleTimeout)
	}
	return tp
}

// RouteOptions configure the single route of NewRouteConfig.
type RouteOptions struct {
	// Timeout is the whole-request timeout (Envoy: RouteAction.timeout).
	// Zero disables it; the route always carries the field explicitly so
	// streams are not cut by Envoy's implicit 15 s default.
	Timeout time.Duration
}

// NewRouteConfig returns a route configuration named name with one virtual
// host matching every authority ("*") and one route sending every path
// (prefix "/") to clusterName.
func NewRouteConfig(name, clusterName string, o RouteOptions) *route.RouteConfiguration {
	return &route.RouteConfiguration{
		Name: name,
		VirtualHosts: []*route.VirtualHost{{
			Name:    name,
			Domains: []string{"*"},
			Routes: []*route.Route{{
				Name:  "default",
				Match: &route.RouteMatch{PathSpecifier: &route.RouteMatch_Prefix{Prefix: "/"}},
				Action: &route.Route_Route{Route: &route.RouteAction{
					ClusterSpecifier: &route.RouteAction_Cluster{Cluster: clusterName},
					Timeout:          durationpb.New(o.Timeout),
				}},
			}},
		}},
	}
}

// ClusterOptions configure NewEDSCluster and NewStaticCluster.
type ClusterOptions struct {
	// Protocol selects the upstream HTTP protocol options: HTTP/2 for http2
	// and grpc, HTTP/1.1 for http, none for tcp.
	Protocol xds.Protocol
	// ConnectTimeout defaults to xds.DefaultConnectTimeout.
	ConnectTimeout time.Duration
	// LB is the load-balancing algorithm (default LBRoundRobin).
	LB LBPolicy
	// Thresholds set Cluster.circuit_breakers; nil leaves Envoy's defaults.
	Thresholds *Thresholds
	// Outlier sets Cluster.outlier_detection; nil means none.
	Outlier *OutlierSpec
	// Extras are meshlet-only settings carried in the cluster's metadata.
	Extras *xds.ClusterExtras
	// TLS is the upstream mTLS transport socket (UpstreamTLS); nil for
	// plaintext.
	TLS *core.TransportSocket
}

func newCluster(name string, o ClusterOptions) *cluster.Cluster {
	ct := o.ConnectTimeout
	if ct == 0 {
		ct = xds.DefaultConnectTimeout
	}
	c := &cluster.Cluster{
		Name:           name,
		ConnectTimeout: durationpb.New(ct),
		LbPolicy:       cluster.Cluster_ROUND_ROBIN,
	}
	if o.Protocol.IsHTTP() {
		opts := &upstreamhttp.HttpProtocolOptions{}
		if o.Protocol.UsesHTTP2() {
			opts.UpstreamProtocolOptions = &upstreamhttp.HttpProtocolOptions_ExplicitHttpConfig_{ExplicitHttpConfig: &upstreamhttp.HttpProtocolOptions_ExplicitHttpConfig{
				ProtocolConfig: &upstreamhttp.HttpProtocolOptions_ExplicitHttpConfig_Http2ProtocolOptions{Http2ProtocolOptions: &core.Http2ProtocolOptions{}},
			}}
		} else {
			opts.UpstreamProtocolOptions = &upstreamhttp.HttpProtocolOptions_ExplicitHttpConfig_{ExplicitHttpConfig: &upstreamhttp.HttpProtocolOptions_ExplicitHttpConfig{
				ProtocolConfig: &upstreamhttp.HttpProtocolOptions_ExplicitHttpConfig_HttpProtocolOptions{HttpProtocolOptions: &core.Http1ProtocolOptions{}},
			}}
		}
		c.TypedExtensionProtocolOptions = map[string]*anypb.Any{xds.HTTPProtocolOptionsKey: xds.MustAny(opts)}
	}
	applyResilience(c, o)
	c.TransportSocket = o.TLS
	return c
}

// NewEDSCluster returns a cluster whose endpoints come from EDS over ADS,
// under the cluster's own name.
func NewEDSCluster(name string, o ClusterOptions) *cluster.Cluster {
	c := newCluster(name, o)
	c.ClusterDiscoveryType = &cluster.Cluster_Type{Type: cluster.Cluster_EDS}
	c.EdsClusterConfig = &cluster.Cluster_EdsClusterConfig{EdsConfig: adsConfigSource()}
	return c
}

// NewStaticCluster returns a STATIC cluster with the single endpoint
// host:port in its inline load assignment.
func NewStaticCluster(name, host string, port int, o ClusterOptions) *cluster.Cluster {
	c := newCluster(name, o)
	c.ClusterDiscoveryType = &cluster.Cluster_Type{Type: cluster.Cluster_STATIC}
	c.LoadAssignment = NewLoadAssignment(name, []Endpoint{{Host: host, Port: port}})
	return c
}

// Endpoint is one upstream host for NewLoadAssignment.
type Endpoint struct {
	Host string
	Port int
	// Weight is the load-balancing weight (Envoy:
	// LbEndpoint.load_balancing_weight); 0 means 1.
	Weight int
	// Region names the endpoint's locality (Envoy: Locality.region): the
	// Consul datacenter. "" becomes DefaultRegion.
	Region string
}

// DefaultRegion is the locality region of endpoints whose datacenter is
// unknown. grpc-go rejects localities without an ID, so there always is one.
const DefaultRegion = "dc1"

// NewLoadAssignment returns the ClusterLoadAssignment of clusterName with the
// given endpoints, all HEALTHY, grouped into one locality per region (sorted,
// each of weight 1: grpc-go ignores localities of weight 0 and rejects
// localities without an ID).
func NewLoadAssignment(clusterName string, endpoints []Endpoint) *endpoint.ClusterLoadAssignment {
	byRegion := map[string][]*endpoint.LbEndpoint{}
	var regions []string
	for _, e := range endpoints {
		w := e.Weight
		if w <= 0 {
			w = 1
		}
		r := e.Region
		if r == "" {
			r = DefaultRegion
		}
		if _, ok := byRegion[r]; !ok {
			regions = append(regions, r)
		}
		byRegion[r] = append(byRegion[r], &endpoint.LbEndpoint{
			HostIdentifier: &endpoint.LbEndpoint_Endpoint{Endpoint: &endpoint.Endpoint{
				Address: socketAddress(e.Host, e.Port),
			}},
			HealthStatus:        core.HealthStatus_HEALTHY,
			LoadBalancingWeight: wrapperspb.UInt32(uint32(w)),
		})
	}
	slices.Sort(regions)
	cla := &endpoint.ClusterLoadAssignment{ClusterName: clusterName, Endpoints: []*endpoint.LocalityLbEndpoints{}}
	for _, r := range regions {
		cla.Endpoints = append(cla.Endpoints, &endpoint.LocalityLbEndpoints{
			Locality:            &core.Locality{Region: r},
			LbEndpoints:         byRegion[r],
			LoadBalancingWeight: wrapperspb.UInt32(1),
		})
	}
	return cla
}

// adsConfigSource returns a config source pointing at the ADS stream.
func adsConfigSource() *core.ConfigSource {
	return &core.ConfigSource{
		ResourceApiVersion:    core.ApiVersion_V3,
		ConfigSourceSpecifier: &core.ConfigSource_Ads{Ads: &core.AggregatedConfigSource{}},
	}
}
