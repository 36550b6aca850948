// Package translate turns the mesh model and the policy set into Envoy xDS
// resources. Its functions are pure: the same inputs give the same resources
// in the same order, which the golden tests in testdata/ pin down.
package translate

import (
	"cmp"
	"fmt"

	cluster "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpoint "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listener "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	route "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"

	"github.com/meshlet/meshlet/controlplane/model"
	"github.com/meshlet/meshlet/controlplane/policy"
	"github.com/meshlet/meshlet/xds"
)

// Resources are the xDS resources of one node, each list sorted by name.
type Resources struct {
	Listeners []*listener.Listener
	Routes    []*route.RouteConfiguration
	Clusters  []*cluster.Cluster
	Endpoints []*endpoint.ClusterLoadAssignment
	Secrets   []*tlsv3.Secret
}

// Protocol returns the protocol of service: a ServiceDefaults policy wins,
// then the service meta "protocol" in Consul, then tcp.
func Protocol(cat *model.Catalog, pol *policy.Set, service string) xds.Protocol {
	if p, ok := pol.Protocol(service); ok {
		return p
	}
	if s, ok := cat.Services[service]; ok {
		if p, ok := xds.ParseProtocol(s.Protocol); ok {
			return p
		}
	}
	return xds.ProtocolTCP
}

// Proxy returns the resources of the sidecar p:
//   - the secrets "default" (the leaf certificate of p's service) and
//     "ROOTCA" (every Connect CA root);
//   - the public listener on p's address and port (none for a client-only
//     proxy, see model.Proxy.ClientOnly): mTLS (TLS 1.3, or 1.2
//     with MeshDefaults), authorization by RBAC from Consul intentions and
//     AuthorizationPolicy files, then an HTTP connection manager with an
//     inline route (the caller's SPIFFE ID in x-forwarded-client-cert) or a
//     TCP proxy to the local_app static cluster (idle_timeout from the
//     service's own service-wide TimeoutPolicy idle); in permissive mode a
//     plaintext filter chain as well;
//   - for a udp service, also "public_listener_udp", a UDP listener on the
//     same address and port proxying each caller's datagrams to local_app
//     (UdpProxyConfig, idle_timeout from the service-wide TimeoutPolicy
//     idle), plaintext and without authorization: UDP has no mTLS;
//   - per upstream, a listener "upstream:<service>" on its bind address and
//     port (a UDP listener for a udp service), an RDS route configuration
//     "<service>" (HTTP protocols only) with the service's retry and timeout
//     policies, an EDS cluster "<service>" with mTLS requiring the
//     upstream's exact SPIFFE ID (plaintext for udp), its connect
//     timeout, circuit breakers, outlier detection, load balancer and retry
//     budget, and its load assignment: the healthy sidecars of that service.
//
// Upstreams naming the same service twice keep the first. It returns an
// error wrapping ErrNotReady while the CA roots or the leaf certificate of
// p's service are unknown.
func Proxy(cat *model.Catalog, pol *policy.Set, p *model.Proxy) (Resources, error) {
	var r Resources
	cert, roots, err := secrets(cat, p.Service)
	if err != nil {
		return r, err
	}
	r.Secrets = append(r.Secrets, cert, roots)
	minTLS := pol.MinTLSVersion()
	proto := Protocol(cat, pol, p.Service)
	in := xds.InboundOptions{
		HTTP:       proto.IsHTTP(),
		TLS:        xds.DownstreamTLS(minTLS, alpn(proto, true)),
		Permissive: pol.MTLSMode(p.Service) == policy.MTLSPermissive,
	}
	tr := pol.Tracing()
	if in.HTTP {
		in.Via = p.ID
		in.Tracing = tracing(tr, p.Service, false)
	}
	if !in.HTTP {
		in.TCP.IdleTimeout = tcpIdleTimeout(pol, p.Service)
	}
	in.Rules, in.Shadow = authzRules(cat, pol, p.Service, in.HTTP)
	if !p.ClientOnly() {
		r.Listeners = append(r.Listeners, xds.NewInboundListener(xds.PublicListener, p.BindAddress(), p.BindPort(), in))
	}
	if proto == xds.ProtocolUDP && !p.ClientOnly() {
		// Only a service declared udp gets a UDP listener: it is plaintext
		// and unauthorized, so it is never opened implicitly.
		r.Listeners = append(r.Listeners, xds.NewUDPListener(xds.PublicUDPListener, p.BindAddress(), p.BindPort(), xds.LocalAppCluster,
			xds.UDPProxyOptions{IdleTimeout: tcpIdleTimeout(pol, p.Service)}))
	}
	if !p.ClientOnly() {
		r.Clusters = append(r.Clusters, xds.NewStaticCluster(xds.LocalAppCluster, p.LocalAppAddress, p.LocalAppPort, xds.ClusterOptions{Protocol: proto}))
	}

	var public *listener.Listener
	for _, l := range r.Listeners {
		if l.GetName() == xds.PublicListener {
			public = l
		}
	}
	seen := map[string]bool{}
	for _, u := range p.Upstreams {
		if seen[u.Service] {
			continue
		}
		seen[u.Service] = true
		up := upstreamResources(cat, pol, p, u.Service, u.BindAddress, u.BindPort, minTLS)
		r.Listeners = append(r.Listeners, up.listener)
		r.add(up)
	}
	if p.Transparent() {
		transparent(&r, cat, pol, p, public, seen, minTLS)
	}
	if tr != nil && tr.Collector.Protocol == policy.CollectorHTTP && hasTracedListener(r.Listeners) {
		c, err := xds.NewOTLPCollectorCluster(tr.Collector.Endpoint)
		if err != nil {
			return r, fmt.Errorf("translate: tracing collector: %w", err)
		}
		r.Clusters = append(r.Clusters, c)
	}
	sortResources(&r)
	return r, nil
}

// upstream is what one upstream service of a proxy needs: its explicit
// listener (on the upstream's bind address; a capture listener takes its
// filters), its route configuration (HTTP only), cluster and load
// assignment.
type upstream struct {
	service  string
	protocol xds.Protocol
	listener *listener.Listener
	route    *route.RouteConfiguration
	cluster  *cluster.Cluster
	load     *endpoint.ClusterLoadAssignment
}

// add appends u's route, cluster and load assignment to r.
func (r *Resources) add(u upstream) {
	if u.route != nil {
		r.Routes = append(r.Routes, u.route)
	}
	r.Clusters = append(r.Clusters, u.cluster)
	r.Endpoints = append(r.Endpoints, u.load)
}

// upstreamResources builds the resources of upstream service for proxy p,
// its listener on host:port: an HTTP connection manager routing by RDS to
// the route configuration "<service>" with the service's retry and timeout
// policies, a UDP proxy, or a TCP proxy; an EDS cluster "<service>" with
// mTLS requiring the service's SPIFFE ID (plaintext for udp) and its
// resilience settings; its load assignment, the service's healthy sidecars.
func upstreamResources(cat *model.Catalog, pol *policy.Set, p *model.Proxy, service, host string, port int, minTLS string) upstream {
	name := xds.ServiceCluster(service)
	up := Protocol(cat, pol, service)
	u := upstream{service: service, protocol: up}
	tr := pol.Tracing()
	switch {
	case up.IsHTTP():
		u.listener = xds.NewHTTPListener(xds.UpstreamListener(service), host, port, xds.HTTPListenerOptions{
			RouteConfigName: name,
			Via:             p.ID,
			Tracing:         tracing(tr, p.Service, true),
		})
		u.route = xds.NewRouteConfigRoutes(name, outboundRoutes(pol, service, name))
	case up == xds.ProtocolUDP:
		u.listener = xds.NewUDPListener(xds.UpstreamListener(service), host, port, name,
			xds.UDPProxyOptions{IdleTimeout: tcpIdleTimeout(pol, service)})
	default:
		u.listener = xds.NewTCPProxyListener(xds.UpstreamListener(service), host, port, name, xds.TCPProxyOptions{
			MaxConnectAttempts: tcpConnectAttempts(pol, service),
			IdleTimeout:        tcpIdleTimeout(pol, service),
		})
	}
	opts := clusterOptions(pol, service, xds.ClusterOptions{Protocol: up})
	if up != xds.ProtocolUDP { // datagrams go in plaintext to the sidecars' public UDP listeners
		opts.TLS = upstreamTLS(cat, p, service, up, minTLS)
	}
	u.cluster = xds.NewEDSCluster(name, opts)
	u.load = xds.NewLoadAssignment(name, sidecarEndpoints(cat, service))
	return u
}

// upstreamTLS is the UpstreamTlsContext of p's clusters to service
// (protocol proto): Consul's SNI and the SPIFFE ID of service in the
// datacenter of its first sidecar (else p's), ALPN for proto.
func upstreamTLS(cat *model.Catalog, p *model.Proxy, service string, proto xds.Protocol, minTLS string) *core.TransportSocket {
	dc := p.Datacenter
	if ps := cat.ProxiesFor(service); len(ps) > 0 {
		dc = cmp.Or(ps[0].Datacenter, dc)
	}
	return xds.UpstreamTLS(minTLS, upstreamSNI(cat, service, dc), upstreamID(cat, service, dc), alpn(proto, false))
}

// tracing returns the tracing of an HTTP connection manager of a sidecar of
// service, nil when tracing is off.
func tracing(t *policy.Tracing, service string, outbound bool) *xds.Tracing {
	if t == nil {
		return nil
	}
	return &xds.Tracing{
		ServiceName:     service,
		SamplingPercent: t.SamplingPercent,
		Protocol:        t.Collector.Protocol,
		Endpoint:        t.Collector.Endpoint,
		Propagation:     t.Propagation,
		Outbound:        outbound,
	}
}

// hasTracedListener reports whether any listener traces (tracing sets the
// traffic direction), i.e. needs the OTLP collector cluster.
func hasTracedListener(ls []*listener.Listener) bool {
	for _, l := range ls {
		if l.GetTrafficDirection() != 0 {
			return true
		}
	}
	return false
}

// sidecarEndpoints returns the public listeners of the healthy sidecars of
// service (client-only proxies have none): in the mesh, traffic to a
// service enters through its sidecars.
func sidecarEndpoints(cat *model.Catalog, service string) []xds.Endpoint {
	var eps []xds.Endpoint
	for _, p := range cat.ProxiesFor(service) {
		if p.Healthy && !p.ClientOnly() {
			eps = append(eps, xds.Endpoint{Host: p.Address, Port: p.Port, Weight: p.Weight, Region: p.Datacenter})
		}
	}
	return eps
}

// Proxyless returns the resources served to proxyless gRPC clients (see
// xds.IsProxylessGRPC): for every service with at least one instance, an
// API listener "<service>" with an inline route to the EDS cluster
// "<service>", whose endpoints are the service's own healthy instances.
func Proxyless(cat *model.Catalog, pol *policy.Set) Resources {
	var r Resources
	for name, s := range cat.Services {
		if len(s.Instances) == 0 {
			continue
		}
		cn := xds.ServiceCluster(name)
		r.Listeners = append(r.Listeners, xds.NewAPIListener(name, xds.NewRouteConfigRoutes(name, outboundRoutes(pol, name, cn))))
		r.Clusters = append(r.Clusters, xds.NewEDSCluster(cn, clusterOptions(pol, name, xds.ClusterOptions{Protocol: Protocol(cat, pol, name)})))
		var eps []xds.Endpoint
		for _, in := range s.Instances {
			if in.Healthy {
				eps = append(eps, xds.Endpoint{Host: in.Address, Port: in.Port, Weight: in.Weight, Region: in.Datacenter})
			}
		}
		r.Endpoints = append(r.Endpoints, xds.NewLoadAssignment(cn, eps))
	}
	sortResources(&r)
	return r
}
