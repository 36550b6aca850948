// Package translate turns the mesh model and the policy set into Envoy xDS
// resources. Its functions are pure: the same inputs give the same resources
// in the same order, which the golden tests in testdata/ pin down.
package translate

import (
	cluster "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	endpoint "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listener "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	route "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"

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
//   - the public listener on p's address and port, forwarding to the
//     local_app static cluster (the app at LocalAppAddress:LocalAppPort),
//     through an HTTP connection manager with an inline route configuration
//     or a TCP proxy, by the protocol of p's service;
//   - per upstream, a listener "upstream:<service>" on its bind address and
//     port, an RDS route configuration "<service>" (HTTP protocols only) with
//     the service's retry and timeout policies, an EDS cluster "<service>"
//     with its connect timeout, circuit breakers, outlier detection, load
//     balancer and retry budget, and its load assignment: the healthy
//     sidecars of that service.
//
// Upstreams naming the same service twice keep the first.
func Proxy(cat *model.Catalog, pol *policy.Set, p *model.Proxy) Resources {
	var r Resources
	proto := Protocol(cat, pol, p.Service)
	if proto.IsHTTP() {
		r.Listeners = append(r.Listeners, xds.NewHTTPListener(xds.PublicListener, p.BindAddress(), p.BindPort(), xds.HTTPListenerOptions{
			RouteConfig: xds.NewRouteConfig(xds.LocalAppCluster, xds.LocalAppCluster, xds.RouteOptions{}),
			Via:         p.ID,
		}))
	} else {
		r.Listeners = append(r.Listeners, xds.NewTCPListener(xds.PublicListener, p.BindAddress(), p.BindPort(), xds.LocalAppCluster))
	}
	r.Clusters = append(r.Clusters, xds.NewStaticCluster(xds.LocalAppCluster, p.LocalAppAddress, p.LocalAppPort, xds.ClusterOptions{Protocol: proto}))

	seen := map[string]bool{}
	for _, u := range p.Upstreams {
		if seen[u.Service] {
			continue
		}
		seen[u.Service] = true
		name := xds.ServiceCluster(u.Service)
		up := Protocol(cat, pol, u.Service)
		if up.IsHTTP() {
			r.Listeners = append(r.Listeners, xds.NewHTTPListener(xds.UpstreamListener(u.Service), u.BindAddress, u.BindPort, xds.HTTPListenerOptions{
				RouteConfigName: name,
				Via:             p.ID,
			}))
			r.Routes = append(r.Routes, xds.NewRouteConfigRoutes(name, outboundRoutes(pol, u.Service, name)))
		} else {
			r.Listeners = append(r.Listeners, xds.NewTCPListenerAttempts(xds.UpstreamListener(u.Service), u.BindAddress, u.BindPort, name, tcpConnectAttempts(pol, u.Service)))
		}
		r.Clusters = append(r.Clusters, xds.NewEDSCluster(name, clusterOptions(pol, u.Service, xds.ClusterOptions{Protocol: up})))
		r.Endpoints = append(r.Endpoints, xds.NewLoadAssignment(name, sidecarEndpoints(cat, u.Service)))
	}
	sortResources(&r)
	return r
}

// sidecarEndpoints returns the public listeners of the healthy sidecars of
// service: in the mesh, traffic to a service enters through its sidecars.
func sidecarEndpoints(cat *model.Catalog, service string) []xds.Endpoint {
	var eps []xds.Endpoint
	for _, p := range cat.ProxiesFor(service) {
		if p.Healthy {
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
