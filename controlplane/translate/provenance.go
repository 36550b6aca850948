package translate

import (
	"slices"

	listener "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"

	"github.com/meshlet/meshlet/controlplane/model"
	"github.com/meshlet/meshlet/controlplane/policy"
	"github.com/meshlet/meshlet/xds"
)

// provenance collects, while Proxy or Proxyless builds resources, the
// Sources each resource is built from: the function that reads a policy
// document or a Consul entry to shape a resource notes that input against
// the resource (by type URL and name), so ProxySources and
// ProxylessSources come out of the code path that builds the resources. A
// nil *provenance notes nothing: Proxy and Proxyless build without one.
type provenance struct {
	m SourceMap
}

func newProvenance() *provenance { return &provenance{m: SourceMap{}} }

// resourceKey names one resource: its type URL and its name (a
// ClusterLoadAssignment by its cluster name).
type resourceKey struct{ typeURL, name string }

func listenerKey(name string) resourceKey { return resourceKey{xds.ListenerType, name} }
func routeKey(name string) resourceKey    { return resourceKey{xds.RouteType, name} }
func clusterKey(name string) resourceKey  { return resourceKey{xds.ClusterType, name} }
func endpointKey(name string) resourceKey { return resourceKey{xds.EndpointType, name} }
func secretKey(name string) resourceKey   { return resourceKey{xds.SecretType, name} }

// protocolOfType is the pseudo type URL under which a listener's protocol
// sources are kept apart (see tracedBy); provenance.sources drops it.
const protocolOfType = "meshlet.protocol-of"

// protocols returns a note on the protocol pseudo keys of n's listeners.
func (n note) protocols() note {
	var keys []resourceKey
	for _, k := range n.keys {
		if k.typeURL == xds.ListenerType {
			keys = append(keys, resourceKey{protocolOfType, k.name})
		}
	}
	return note{pv: n.pv, keys: keys}
}

// tracedBy notes on n what makes every traced listener of ls (tracing sets
// the traffic direction) speak HTTP: the protocol sources they all share.
// The OTLP collector cluster exists while one listener traces; an input
// all of them owe their protocol to takes it away.
func (pv *provenance) tracedBy(n note, ls []*listener.Listener) {
	if pv == nil {
		return
	}
	var common []Source
	first := true
	for _, l := range ls {
		if l.GetTrafficDirection() == 0 {
			continue
		}
		srcs := pv.m[protocolOfType][l.GetName()]
		if first {
			common, first = slices.Clone(srcs), false
			continue
		}
		common = slices.DeleteFunc(common, func(s Source) bool { return !slices.Contains(srcs, s) })
	}
	n.add(common...)
}

// on returns a note for the resources keys.
func (pv *provenance) on(keys ...resourceKey) note {
	if pv == nil {
		return note{}
	}
	return note{pv: pv, keys: keys}
}

// note adds Sources to the resources it names. A note may name a resource
// the build ends up not making (the denied upstream of a transparent
// proxy, the public listener of a client-only proxy): provenance.sources
// keeps only the resources built. The zero note notes nothing.
type note struct {
	pv   *provenance
	keys []resourceKey
}

// and returns a note naming the resources of n and of o.
func (n note) and(o note) note {
	if n.pv == nil {
		return o
	}
	if o.pv == nil {
		return n
	}
	keys := make([]resourceKey, 0, len(n.keys)+len(o.keys))
	return note{pv: n.pv, keys: append(append(keys, n.keys...), o.keys...)}
}

// add notes s against every resource of n.
func (n note) add(s ...Source) {
	if n.pv == nil || len(s) == 0 {
		return
	}
	for _, k := range n.keys {
		n.pv.m.add(k.typeURL, k.name, s...)
	}
}

// sources returns what pv noted for the resources of r, every one of them
// present (with no Sources when nothing was noted), lists sorted and
// without duplicates.
func (pv *provenance) sources(r Resources) SourceMap {
	m := SourceMap{}
	keep := func(k resourceKey) {
		m.add(k.typeURL, k.name, pv.m[k.typeURL][k.name]...)
	}
	for _, x := range r.Listeners {
		keep(listenerKey(x.GetName()))
	}
	for _, x := range r.Routes {
		keep(routeKey(x.GetName()))
	}
	for _, x := range r.Clusters {
		keep(clusterKey(x.GetName()))
	}
	for _, x := range r.Endpoints {
		keep(endpointKey(x.GetClusterName()))
	}
	for _, x := range r.Secrets {
		keep(secretKey(x.GetName()))
	}
	m.normalize()
	return m
}

// The readers below return what translate uses of a policy document or a
// Consul entry and note the input that decided it; each mirrors nothing
// but the accessor it wraps.

// protocol is Protocol, noting the ServiceDefaults declaring it or the
// Consul service meta it came from (nothing for the tcp default).
func protocol(cat *model.Catalog, pol *policy.Set, service string, n note) xds.Protocol {
	if p, ok := pol.Protocol(service); ok {
		d := pol.ServiceDefaults[service]
		n.add(docSource(policy.KindServiceDefaults, d.Name, d.Source))
		return p
	}
	if s, ok := cat.Services[service]; ok {
		if p, ok := xds.ParseProtocol(s.Protocol); ok {
			n.add(Source{Origin: OriginConsul, Kind: ConsulService, Name: service, Detail: "meta protocol"})
			return p
		}
	}
	return xds.ProtocolTCP
}

// minTLSVersion is policy.Set.MinTLSVersion, noting MeshDefaults when it
// sets the version.
func minTLSVersion(pol *policy.Set, n note) string {
	if pol != nil && pol.Mesh != nil && pol.Mesh.MTLS != nil && pol.Mesh.MTLS.MinTLSVersion != "" {
		n.add(meshSource(pol)...)
	}
	return pol.MinTLSVersion()
}

// mtlsMode is policy.Set.MTLSMode, noting the ServiceDefaults or
// MeshDefaults that sets the mode.
func mtlsMode(pol *policy.Set, service string, n note) string {
	if pol != nil {
		if d := pol.ServiceDefaults[service]; d != nil && d.MTLSMode != "" {
			n.add(docSource(policy.KindServiceDefaults, d.Name, d.Source))
		} else if pol.Mesh != nil && pol.Mesh.MTLS != nil && pol.Mesh.MTLS.Mode != "" {
			n.add(meshSource(pol)...)
		}
	}
	return pol.MTLSMode(service)
}

// defaultAction is policy.Set.DefaultAction, noting the
// AuthorizationPolicy or MeshDefaults that sets it, else what decides the
// mTLS mode it follows.
func defaultAction(pol *policy.Set, destination string, n note) string {
	switch {
	case pol == nil:
	case pol.Authorizations[destination] != nil && pol.Authorizations[destination].DefaultAction != "":
		a := pol.Authorizations[destination]
		n.add(docSource(policy.KindAuthorizationPolicy, a.Name, a.Source))
	case pol.Mesh != nil && pol.Mesh.Authorization != nil && pol.Mesh.Authorization.DefaultAction != "":
		n.add(meshSource(pol)...)
	default:
		mtlsMode(pol, destination, n)
	}
	return pol.DefaultAction(destination)
}

// outboundMode is policy.Set.OutboundMode, noting MeshDefaults when it
// sets the mode.
func outboundMode(pol *policy.Set, n note) string {
	if pol != nil && pol.Mesh != nil && pol.Mesh.Outbound != "" {
		n.add(meshSource(pol)...)
	}
	return pol.OutboundMode()
}

// tracingOf is policy.Set.Tracing, noting where the tracing setup comes
// from when tracing is on: MeshDefaults (its tracing block), and the
// -otlp-endpoint flag when MeshDefaults names no collector.
func tracingOf(pol *policy.Set, n note) *policy.Tracing {
	t := pol.Tracing()
	if t == nil {
		return nil
	}
	if pol != nil && pol.Mesh != nil && pol.Mesh.Tracing != nil {
		n.add(meshSource(pol)...)
		if pol.Mesh.Tracing.Collector != nil {
			return t
		}
	}
	n.add(Source{Origin: OriginFlag, Kind: "flag", Name: "-otlp-endpoint"})
	return t
}

// collectorOf is policy.Set.Tracing for the OTLP collector, noting where
// the collector comes from when tracing is on: MeshDefaults when it names
// one, else the -otlp-endpoint flag.
func collectorOf(pol *policy.Set, n note) *policy.Tracing {
	t := pol.Tracing()
	if t == nil {
		return nil
	}
	if pol != nil && pol.Mesh != nil && pol.Mesh.Tracing != nil && pol.Mesh.Tracing.Collector != nil {
		n.add(meshSource(pol)...)
	} else {
		n.add(Source{Origin: OriginFlag, Kind: "flag", Name: "-otlp-endpoint"})
	}
	return t
}

// retrySource and timeoutSource are the Sources of policy documents.
func retrySource(p *policy.RetryPolicy) Source {
	return docSource(policy.KindRetryPolicy, p.Name, p.Source)
}

func timeoutSource(p *policy.TimeoutPolicy) Source {
	return docSource(policy.KindTimeoutPolicy, p.Name, p.Source)
}

// registration is the Source of part (detail) of p's connect-proxy
// registration.
func registration(p *model.Proxy, detail string) Source {
	return Source{Origin: OriginConsul, Kind: ConsulConnectProxy, Name: p.ID, Detail: detail}
}

// serviceSource is the Source of part (detail) of service's entry in the
// Consul catalog.
func serviceSource(service, detail string) Source {
	return Source{Origin: OriginConsul, Kind: ConsulService, Name: service, Detail: detail}
}
