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
	"github.com/meshlet/meshlet/controlplane/xdsbuild"
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
	return protocol(cat, pol, service, note{})
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
	return buildProxy(cat, pol, p, nil)
}

// buildProxy is Proxy, noting in pv (nil: nowhere) the inputs of each
// resource as it reads them.
func buildProxy(cat *model.Catalog, pol *policy.Set, p *model.Proxy, pv *provenance) (Resources, error) {
	var r Resources
	cert, roots, err := secrets(cat, p.Service)
	if err != nil {
		return r, err
	}
	r.Secrets = append(r.Secrets, cert, roots)
	pv.on(secretKey(cert.GetName())).add(leafSource(p.Service))
	pv.on(secretKey(roots.GetName())).add(caSource(""))

	// The inbound capture listener of a transparent proxy carries the
	// public listener's chains: it is built from the same inputs.
	public := pv.on(listenerKey(xds.PublicListener))
	if p.Transparent() {
		public = public.and(pv.on(listenerKey(xds.InboundCaptureListener)))
	}
	publicUDP := pv.on(listenerKey(xds.PublicUDPListener))
	localApp := pv.on(clusterKey(xds.LocalAppCluster))
	public.add(registration(p, "public listener"))
	publicUDP.add(registration(p, "public listener"))
	localApp.add(registration(p, "local app"))

	proto := protocol(cat, pol, p.Service, public.and(public.protocols()).and(publicUDP).and(localApp))
	in := xdsbuild.InboundOptions{
		HTTP:       proto.IsHTTP(),
		TLS:        xdsbuild.DownstreamTLS(minTLSVersion(pol, public), alpn(proto, true)),
		Permissive: mtlsMode(pol, p.Service, public) == policy.MTLSPermissive,
	}
	if in.HTTP {
		in.Via = p.ID
		in.Tracing = tracing(pol, public, p.Service, false)
	}
	if !in.HTTP {
		in.TCP.IdleTimeout = tcpIdleTimeout(pol, p.Service, public)
	}
	in.Rules, in.Shadow = authzRules(cat, pol, p.Service, in.HTTP, public)
	if !p.ClientOnly() {
		r.Listeners = append(r.Listeners, xdsbuild.NewInboundListener(xds.PublicListener, p.BindAddress(), p.BindPort(), in))
	}
	if proto == xds.ProtocolUDP && !p.ClientOnly() {
		// Only a service declared udp gets a UDP listener: it is plaintext
		// and unauthorized, so it is never opened implicitly.
		r.Listeners = append(r.Listeners, xdsbuild.NewUDPListener(xds.PublicUDPListener, p.BindAddress(), p.BindPort(), xds.LocalAppCluster,
			xdsbuild.UDPProxyOptions{IdleTimeout: tcpIdleTimeout(pol, p.Service, publicUDP)}))
	}
	if !p.ClientOnly() {
		r.Clusters = append(r.Clusters, xdsbuild.NewStaticCluster(xds.LocalAppCluster, p.LocalAppAddress, p.LocalAppPort, xdsbuild.ClusterOptions{Protocol: proto}))
	}

	var publicListener *listener.Listener
	for _, l := range r.Listeners {
		if l.GetName() == xds.PublicListener {
			publicListener = l
		}
	}
	seen := map[string]bool{}
	for _, u := range p.Upstreams {
		if seen[u.Service] {
			continue
		}
		seen[u.Service] = true
		name := xds.ServiceCluster(u.Service)
		lis := pv.on(listenerKey(xds.UpstreamListener(u.Service)))
		lis.and(pv.on(routeKey(name), clusterKey(name))).add(registration(p, "upstream "+u.Service))
		up := upstreamResources(cat, pol, p, u.Service, u.BindAddress, u.BindPort, pv, lis)
		r.Listeners = append(r.Listeners, up.listener)
		r.add(up)
	}
	if p.Transparent() {
		transparent(&r, cat, pol, p, publicListener, seen, pv)
	}
	otlp := pv.on(clusterKey(xds.OTLPCollectorCluster))
	if tr := collectorOf(pol, otlp); tr != nil && tr.Collector.Protocol == policy.CollectorHTTP && hasTracedListener(r.Listeners) {
		pv.tracedBy(otlp, r.Listeners)
		c, err := xdsbuild.NewOTLPCollectorCluster(tr.Collector.Endpoint)
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
// The listener's inputs are noted on lis, those of the route, cluster and
// load assignment in pv.
func upstreamResources(cat *model.Catalog, pol *policy.Set, p *model.Proxy, service, host string, port int, pv *provenance, lis note) upstream {
	name := xds.ServiceCluster(service)
	rt, cl := pv.on(routeKey(name)), pv.on(clusterKey(name))
	up := protocol(cat, pol, service, lis.and(lis.protocols()).and(rt).and(cl))
	u := upstream{service: service, protocol: up}
	switch {
	case up.IsHTTP():
		u.listener = xdsbuild.NewHTTPListener(xds.UpstreamListener(service), host, port, xdsbuild.HTTPListenerOptions{
			RouteConfigName: name,
			Via:             p.ID,
			Tracing:         tracing(pol, lis, p.Service, true),
		})
		u.route = xdsbuild.NewRouteConfigRoutes(name, outboundRoutes(pol, service, name, rt))
	case up == xds.ProtocolUDP:
		u.listener = xdsbuild.NewUDPListener(xds.UpstreamListener(service), host, port, name,
			xdsbuild.UDPProxyOptions{IdleTimeout: tcpIdleTimeout(pol, service, lis)})
	default:
		u.listener = xdsbuild.NewTCPProxyListener(xds.UpstreamListener(service), host, port, name, xdsbuild.TCPProxyOptions{
			MaxConnectAttempts: tcpConnectAttempts(pol, service, lis),
			IdleTimeout:        tcpIdleTimeout(pol, service, lis),
		})
	}
	opts := clusterOptions(pol, service, xdsbuild.ClusterOptions{Protocol: up}, cl)
	if up != xds.ProtocolUDP { // datagrams go in plaintext to the sidecars' public UDP listeners
		opts.TLS = upstreamTLS(cat, pol, p, service, up, cl)
	}
	u.cluster = xdsbuild.NewEDSCluster(name, opts)
	u.load = xdsbuild.NewLoadAssignment(name, sidecarEndpoints(cat, service, pv.on(endpointKey(name))))
	return u
}

// upstreamTLS is the UpstreamTlsContext of p's clusters to service
// (protocol proto): Consul's SNI and the SPIFFE ID of service in the
// datacenter of its first sidecar (else p's), ALPN for proto. Its inputs
// are noted on n.
func upstreamTLS(cat *model.Catalog, pol *policy.Set, p *model.Proxy, service string, proto xds.Protocol, n note) *core.TransportSocket {
	dc := p.Datacenter
	if ps := cat.ProxiesFor(service); len(ps) > 0 {
		dc = cmp.Or(ps[0].Datacenter, dc)
	}
	return xdsbuild.UpstreamTLS(minTLSVersion(pol, n), upstreamSNI(cat, service, dc), upstreamID(cat, service, dc, n), alpn(proto, false))
}

// tracing returns the tracing of an HTTP connection manager of a sidecar of
// service, nil when tracing is off; where the tracing setup comes from is
// noted on n.
func tracing(pol *policy.Set, n note, service string, outbound bool) *xdsbuild.Tracing {
	t := tracingOf(pol, n)
	if t == nil {
		return nil
	}
	return &xdsbuild.Tracing{
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
// service enters through its sidecars. The catalog is noted on n.
func sidecarEndpoints(cat *model.Catalog, service string, n note) []xdsbuild.Endpoint {
	n.add(serviceSource(service, "sidecars: catalog/health"))
	var eps []xdsbuild.Endpoint
	for _, p := range cat.ProxiesFor(service) {
		if p.Healthy && !p.ClientOnly() {
			eps = append(eps, xdsbuild.Endpoint{Host: p.Address, Port: p.Port, Weight: p.Weight, Region: p.Datacenter})
		}
	}
	return eps
}

// Proxyless returns the resources served to proxyless gRPC clients (see
// xds.IsProxylessGRPC): for every service with at least one instance, an
// API listener "<service>" with an inline route to the EDS cluster
// "<service>", whose endpoints are the service's own healthy instances.
func Proxyless(cat *model.Catalog, pol *policy.Set) Resources {
	return buildProxyless(cat, pol, nil)
}

// buildProxyless is Proxyless, noting in pv (nil: nowhere) the inputs of
// each resource as it reads them.
func buildProxyless(cat *model.Catalog, pol *policy.Set, pv *provenance) Resources {
	var r Resources
	for name, s := range cat.Services {
		if len(s.Instances) == 0 {
			continue
		}
		cn := xds.ServiceCluster(name)
		lis, cl := pv.on(listenerKey(name)), pv.on(clusterKey(cn))
		lis.and(cl).add(serviceSource(name, "catalog"))
		pv.on(endpointKey(cn)).add(serviceSource(name, "catalog/health"))
		r.Listeners = append(r.Listeners, xdsbuild.NewAPIListener(name, xdsbuild.NewRouteConfigRoutes(name, outboundRoutes(pol, name, cn, lis))))
		r.Clusters = append(r.Clusters, xdsbuild.NewEDSCluster(cn, clusterOptions(pol, name, xdsbuild.ClusterOptions{Protocol: protocol(cat, pol, name, cl)}, cl)))
		var eps []xdsbuild.Endpoint
		for _, in := range s.Instances {
			if in.Healthy {
				eps = append(eps, xdsbuild.Endpoint{Host: in.Address, Port: in.Port, Weight: in.Weight, Region: in.Datacenter})
			}
		}
		r.Endpoints = append(r.Endpoints, xdsbuild.NewLoadAssignment(cn, eps))
	}
	sortResources(&r)
	return r
}
