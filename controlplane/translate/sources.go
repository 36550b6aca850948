package translate

import (
	"cmp"
	"fmt"
	"slices"
	"strings"

	"github.com/meshlet/meshlet/controlplane/model"
	"github.com/meshlet/meshlet/controlplane/policy"
	"github.com/meshlet/meshlet/xds"
)

// Origins of a Source.
const (
	// OriginPolicy is a document of a policy file.
	OriginPolicy = "policy"
	// OriginConsul is an entry the Consul watcher read.
	OriginConsul = "consul"
	// OriginFlag is a control plane command-line flag (the OTLP collector
	// of -otlp-endpoint).
	OriginFlag = "flag"
)

// Kinds of Consul entries a Source names (Source.Kind with OriginConsul).
const (
	// ConsulService is a service in the catalog with its instances and
	// their health (/v1/health/service/<name>); Source.Detail says which
	// part: "catalog/health", "sidecars: catalog/health" or "meta protocol".
	ConsulService = "service"
	// ConsulConnectProxy is a connect-proxy registration (the proxy's
	// service ID is Source.Name); Source.Detail names the part: "public
	// listener", "local app" or "upstream <service>".
	ConsulConnectProxy = "connect-proxy"
	// ConsulIntentions is a service-intentions config entry (Source.Name is
	// the destination).
	ConsulIntentions = "service-intentions"
	// ConsulCARoots is the Connect CA's roots and trust domain
	// (/v1/agent/connect/ca/roots).
	ConsulCARoots = "ca-roots"
	// ConsulLeaf is a service's leaf certificate from the Connect CA
	// (/v1/agent/connect/ca/leaf/<service>; Source.Name is the service).
	ConsulLeaf = "leaf"
)

// Source is one input that shaped an xDS resource: a policy document, a
// Consul entry, or a control plane flag.
type Source struct {
	// Origin is OriginPolicy, OriginConsul or OriginFlag.
	Origin string `json:"origin"`
	// Kind is the policy document's kind (policy.KindRetryPolicy, ...), one
	// of the Consul* entry kinds, or "flag".
	Kind string `json:"kind"`
	// Name is the document's metadata.name, the Consul entry's name
	// (service name or proxy service ID; "" for the CA roots), or the
	// flag's name.
	Name string `json:"name,omitempty"`
	// File and Line locate a policy document (policy.Source): the file as
	// the policy loader read it and the line of the document's first key.
	File string `json:"file,omitempty"`
	Line int    `json:"line,omitempty"`
	// Detail narrows a Consul entry down to the part that was used.
	Detail string `json:"detail,omitempty"`
}

// String describes s for people:
//
//	policies/retry.yaml:3 (RetryPolicy api-retries)
//	consul service "api" (catalog/health)
//	consul connect-proxy registration "web-1-sidecar-proxy" (upstream api)
//	consul service-intentions "api"
//	consul Connect CA roots
//	consul leaf certificate for "web"
//	flag -otlp-endpoint
func (s Source) String() string {
	var b strings.Builder
	switch s.Origin {
	case OriginPolicy:
		fmt.Fprintf(&b, "%s:%d (%s %s)", s.File, s.Line, s.Kind, s.Name)
		return b.String()
	case OriginFlag:
		return "flag " + s.Name
	}
	b.WriteString("consul ")
	switch s.Kind {
	case ConsulConnectProxy:
		fmt.Fprintf(&b, "connect-proxy registration %q", s.Name)
	case ConsulCARoots:
		b.WriteString("Connect CA roots")
	case ConsulLeaf:
		fmt.Fprintf(&b, "leaf certificate for %q", s.Name)
	default:
		fmt.Fprintf(&b, "%s %q", s.Kind, s.Name)
	}
	if s.Detail != "" {
		fmt.Fprintf(&b, " (%s)", s.Detail)
	}
	return b.String()
}

// compareSources orders policy documents first (by file, line), then Consul
// entries, then flags (by kind, name, detail).
func compareSources(a, b Source) int {
	rank := map[string]int{OriginPolicy: 0, OriginConsul: 1, OriginFlag: 2}
	return cmp.Or(cmp.Compare(rank[a.Origin], rank[b.Origin]),
		cmp.Compare(a.File, b.File), cmp.Compare(a.Line, b.Line),
		cmp.Compare(a.Kind, b.Kind), cmp.Compare(a.Name, b.Name), cmp.Compare(a.Detail, b.Detail))
}

// SourceMap holds the Sources of the resources of one snapshot, by type URL
// (xds.ListenerType, ...) then resource name (a ClusterLoadAssignment by its
// cluster name). Each list is sorted (policy documents first) and has no
// duplicates.
type SourceMap map[string]map[string][]Source

// For returns the Sources of the named resources of typeURL, merged, sorted
// and without duplicates; nil when there are none.
func (m SourceMap) For(typeURL string, names ...string) []Source {
	var out []Source
	for _, n := range names {
		out = append(out, m[typeURL][n]...)
	}
	return normalize(out)
}

func normalize(s []Source) []Source {
	if len(s) == 0 {
		return nil
	}
	slices.SortFunc(s, compareSources)
	return slices.Compact(s)
}

func (m SourceMap) add(typeURL, name string, s ...Source) {
	byName := m[typeURL]
	if byName == nil {
		byName = map[string][]Source{}
		m[typeURL] = byName
	}
	byName[name] = append(byName[name], s...)
}

func (m SourceMap) normalize() {
	for _, byName := range m {
		for n, s := range byName {
			byName[n] = normalize(s)
		}
	}
}

// ProxySources returns, for every resource Proxy builds for p, the policy
// documents and Consul entries it was built from, mirroring Proxy:
//   - secret "default": the leaf certificate of p's service; "ROOTCA": the
//     Connect CA roots;
//   - public_listener: p's connect-proxy registration, the protocol of p's
//     service (its ServiceDefaults, else Consul service meta), its
//     ServiceDefaults (mtlsMode), MeshDefaults (mTLS, default action,
//     tracing), its service-wide TimeoutPolicy (idle) when it is TCP, its
//     AuthorizationPolicy and Consul service-intentions, and
//     the Connect CA (trust domain of the RBAC principals); cluster
//     local_app: the registration and the protocol;
//   - public_listener_udp of a udp service: the registration, the
//     protocol, the service-wide TimeoutPolicy (idle);
//   - per upstream service u: listener "upstream:u" (the registration's
//     upstream, u's protocol, the service-wide RetryPolicy and
//     TimeoutPolicy (idle) of a TCP or UDP upstream, MeshDefaults when it
//     traces), route configuration "u" (every
//     RetryPolicy and TimeoutPolicy of u, a ringHash LoadBalancerPolicy),
//     cluster "u" (CircuitBreakerPolicy, OutlierDetectionPolicy,
//     LoadBalancerPolicy, the RetryPolicy with the retry budget, the
//     TimeoutPolicy with the connect timeout, MeshDefaults' minimum TLS
//     version, and u's leaf certificate or the CA for its identity), and
//     endpoints "u" (u's sidecars in the Consul catalog and their health);
//   - cluster "passthrough~h" of a headless service h a transparent proxy
//     dials directly: h's instances and sidecars in the Consul catalog
//     and their health, h's cluster policies, MeshDefaults' minimum TLS
//     version and h's leaf certificate or the CA for its identity;
//   - cluster otlp_collector: MeshDefaults' tracing collector, or the
//     -otlp-endpoint flag.
//
// A resource with no known input has an empty list. It returns Proxy's
// error when Proxy cannot build p's resources (then there is no snapshot to
// explain).
func ProxySources(cat *model.Catalog, pol *policy.Set, p *model.Proxy) (SourceMap, error) {
	r, err := Proxy(cat, pol, p)
	if err != nil {
		return nil, err
	}
	m := SourceMap{}
	registration := func(detail string) Source {
		return Source{Origin: OriginConsul, Kind: ConsulConnectProxy, Name: p.ID, Detail: detail}
	}
	mesh := meshSource(pol)
	tracing := tracingSources(pol)
	for _, s := range r.Secrets {
		switch s.GetName() {
		case xds.SecretCert:
			m.add(xds.SecretType, s.GetName(), leafSource(p.Service))
		case xds.SecretRoots:
			m.add(xds.SecretType, s.GetName(), caSource(""))
		default:
			m.add(xds.SecretType, s.GetName())
		}
	}
	upstreams := map[string]bool{}
	for _, u := range p.Upstreams {
		upstreams[u.Service] = true
	}
	for _, l := range r.Listeners {
		name := l.GetName()
		if name == xds.PublicUDPListener {
			m.add(xds.ListenerType, name, registration("public listener"))
			m.add(xds.ListenerType, name, protocolSources(cat, pol, p.Service)...)
			m.add(xds.ListenerType, name, tcpIdleSources(pol, p.Service)...)
			continue
		}
		if name == xds.PublicListener {
			m.add(xds.ListenerType, name, registration("public listener"), caSource("trust domain"))
			m.add(xds.ListenerType, name, protocolSources(cat, pol, p.Service)...)
			if d := serviceDefaults(pol, p.Service); d != nil {
				m.add(xds.ListenerType, name, docSource(policy.KindServiceDefaults, d.Name, d.Source))
			}
			m.add(xds.ListenerType, name, mesh...)
			if a := pol.Authorization(p.Service); a != nil {
				m.add(xds.ListenerType, name, docSource(policy.KindAuthorizationPolicy, a.Name, a.Source))
			}
			if !Protocol(cat, pol, p.Service).IsHTTP() {
				m.add(xds.ListenerType, name, tcpIdleSources(pol, p.Service)...)
			}
			if cat.Intentions[p.Service] != nil {
				m.add(xds.ListenerType, name, Source{Origin: OriginConsul, Kind: ConsulIntentions, Name: p.Service})
			}
			if l.GetTrafficDirection() != 0 {
				m.add(xds.ListenerType, name, tracing...)
			}
			continue
		}
		u, ok := xds.UpstreamService(name)
		if !ok || !upstreams[u] {
			m.add(xds.ListenerType, name)
			continue
		}
		m.add(xds.ListenerType, name, registration("upstream "+u))
		m.add(xds.ListenerType, name, protocolSources(cat, pol, u)...)
		if !Protocol(cat, pol, u).IsHTTP() {
			for _, rp := range pol.RetriesFor(u) {
				if rp.Match == nil {
					m.add(xds.ListenerType, name, docSource(policy.KindRetryPolicy, rp.Name, rp.Source))
				}
			}
			m.add(xds.ListenerType, name, tcpIdleSources(pol, u)...)
		}
		if l.GetTrafficDirection() != 0 {
			m.add(xds.ListenerType, name, tracing...)
		}
	}
	for _, rc := range r.Routes {
		u := rc.GetName()
		m.add(xds.RouteType, u, registration("upstream "+u))
		m.add(xds.RouteType, u, protocolSources(cat, pol, u)...)
		m.add(xds.RouteType, u, routeSources(pol, u)...)
	}
	for _, c := range r.Clusters {
		name := c.GetName()
		switch {
		case name == xds.LocalAppCluster:
			m.add(xds.ClusterType, name, registration("local app"))
			m.add(xds.ClusterType, name, protocolSources(cat, pol, p.Service)...)
		case name == xds.OTLPCollectorCluster:
			m.add(xds.ClusterType, name, tracing...)
		case upstreams[name]:
			m.add(xds.ClusterType, name, registration("upstream "+name))
			m.add(xds.ClusterType, name, protocolSources(cat, pol, name)...)
			m.add(xds.ClusterType, name, clusterSources(pol, name)...)
			if Protocol(cat, pol, name) == xds.ProtocolUDP {
				break // plaintext: no TLS version, no identity
			}
			if pol != nil && pol.Mesh != nil && pol.Mesh.MTLS != nil && pol.Mesh.MTLS.MinTLSVersion != "" {
				m.add(xds.ClusterType, name, mesh...)
			}
			if l := cat.Leaves[name]; l != nil && l.SPIFFEID != "" {
				m.add(xds.ClusterType, name, Source{Origin: OriginConsul, Kind: ConsulLeaf, Name: name, Detail: "SPIFFE ID"})
			} else {
				m.add(xds.ClusterType, name, caSource("trust domain"))
			}
		default:
			svc, ok := xds.DirectClusterService(name)
			if !ok {
				m.add(xds.ClusterType, name)
				break
			}
			// A headless service's ORIGINAL_DST cluster: its instances and
			// their sidecars decide whether it exists; its connect timeout,
			// thresholds and mTLS come as for the service's own cluster.
			m.add(xds.ClusterType, name, Source{Origin: OriginConsul, Kind: ConsulService, Name: svc, Detail: "catalog/health"},
				Source{Origin: OriginConsul, Kind: ConsulService, Name: svc, Detail: "sidecars: catalog/health"})
			m.add(xds.ClusterType, name, clusterSources(pol, svc)...)
			if pol != nil && pol.Mesh != nil && pol.Mesh.MTLS != nil && pol.Mesh.MTLS.MinTLSVersion != "" {
				m.add(xds.ClusterType, name, mesh...)
			}
			if l := cat.Leaves[svc]; l != nil && l.SPIFFEID != "" {
				m.add(xds.ClusterType, name, Source{Origin: OriginConsul, Kind: ConsulLeaf, Name: svc, Detail: "SPIFFE ID"})
			} else {
				m.add(xds.ClusterType, name, caSource("trust domain"))
			}
		}
	}
	for _, e := range r.Endpoints {
		name := e.GetClusterName()
		m.add(xds.EndpointType, name, Source{Origin: OriginConsul, Kind: ConsulService, Name: name, Detail: "sidecars: catalog/health"})
	}
	m.normalize()
	return m, nil
}

// ProxylessSources returns the inputs of every resource Proxyless builds:
// per service s, the API listener "s" (s in the catalog, its RetryPolicy
// and TimeoutPolicy documents, a ringHash LoadBalancerPolicy), cluster "s"
// (s in the catalog, its protocol and service-wide policies) and endpoints "s" (s's
// instances in the catalog and their health).
func ProxylessSources(cat *model.Catalog, pol *policy.Set) SourceMap {
	r := Proxyless(cat, pol)
	m := SourceMap{}
	for _, l := range r.Listeners {
		s := l.GetName()
		m.add(xds.ListenerType, s, Source{Origin: OriginConsul, Kind: ConsulService, Name: s, Detail: "catalog"})
		m.add(xds.ListenerType, s, routeSources(pol, s)...)
	}
	for _, c := range r.Clusters {
		s := c.GetName()
		m.add(xds.ClusterType, s, Source{Origin: OriginConsul, Kind: ConsulService, Name: s, Detail: "catalog"})
		m.add(xds.ClusterType, s, protocolSources(cat, pol, s)...)
		m.add(xds.ClusterType, s, clusterSources(pol, s)...)
	}
	for _, e := range r.Endpoints {
		s := e.GetClusterName()
		m.add(xds.EndpointType, s, Source{Origin: OriginConsul, Kind: ConsulService, Name: s, Detail: "catalog/health"})
	}
	m.normalize()
	return m
}

// serviceDefaults returns the ServiceDefaults of service, or nil.
func serviceDefaults(pol *policy.Set, service string) *policy.ServiceDefaults {
	if pol == nil {
		return nil
	}
	return pol.ServiceDefaults[service]
}

func docSource(kind, name string, src policy.Source) Source {
	return Source{Origin: OriginPolicy, Kind: kind, Name: name, File: src.File, Line: src.Line}
}

func caSource(detail string) Source {
	return Source{Origin: OriginConsul, Kind: ConsulCARoots, Detail: detail}
}

func leafSource(service string) Source {
	return Source{Origin: OriginConsul, Kind: ConsulLeaf, Name: service}
}

// meshSource is the MeshDefaults document, if any.
func meshSource(pol *policy.Set) []Source {
	if pol == nil || pol.Mesh == nil {
		return nil
	}
	return []Source{docSource(policy.KindMeshDefaults, pol.Mesh.Name, pol.Mesh.Source)}
}

// tracingSources is where the tracing setup comes from: MeshDefaults (its
// tracing block), and the -otlp-endpoint flag when MeshDefaults names no
// collector.
func tracingSources(pol *policy.Set) []Source {
	if pol.Tracing() == nil {
		return nil
	}
	var out []Source
	if pol != nil && pol.Mesh != nil && pol.Mesh.Tracing != nil {
		out = append(out, meshSource(pol)...)
		if pol.Mesh.Tracing.Collector != nil {
			return out
		}
	}
	return append(out, Source{Origin: OriginFlag, Kind: "flag", Name: "-otlp-endpoint"})
}

// protocolSources is where Protocol(cat, pol, service) comes from: the
// ServiceDefaults declaring it, else the Consul service meta, else nothing
// (the tcp default).
func protocolSources(cat *model.Catalog, pol *policy.Set, service string) []Source {
	if _, ok := pol.Protocol(service); ok {
		d := serviceDefaults(pol, service)
		return []Source{docSource(policy.KindServiceDefaults, d.Name, d.Source)}
	}
	if s, ok := cat.Services[service]; ok {
		if _, ok := xds.ParseProtocol(s.Protocol); ok {
			return []Source{{Origin: OriginConsul, Kind: ConsulService, Name: service, Detail: "meta protocol"}}
		}
	}
	return nil
}

// routeSources are the documents outboundRoutes reads for service.
func routeSources(pol *policy.Set, service string) []Source {
	var out []Source
	for _, p := range pol.RetriesFor(service) {
		out = append(out, docSource(policy.KindRetryPolicy, p.Name, p.Source))
	}
	for _, p := range pol.TimeoutsFor(service) {
		out = append(out, docSource(policy.KindTimeoutPolicy, p.Name, p.Source))
	}
	if lb := pol.LoadBalancer(service); lb != nil && lb.Algorithm == policy.AlgorithmRingHash {
		out = append(out, docSource(policy.KindLoadBalancerPolicy, lb.Name, lb.Source))
	}
	return out
}

// tcpIdleSources is the service-wide TimeoutPolicy with an idle timeout
// that tcpIdleTimeout reads for a TCP service.
func tcpIdleSources(pol *policy.Set, service string) []Source {
	for _, p := range pol.TimeoutsFor(service) {
		if p.Match == nil && p.Idle > 0 {
			return []Source{docSource(policy.KindTimeoutPolicy, p.Name, p.Source)}
		}
	}
	return nil
}

// clusterSources are the documents clusterOptions reads for service.
func clusterSources(pol *policy.Set, service string) []Source {
	var out []Source
	for _, p := range pol.RetriesFor(service) {
		if p.Match == nil && p.Budget != nil {
			out = append(out, docSource(policy.KindRetryPolicy, p.Name, p.Source))
		}
	}
	for _, p := range pol.TimeoutsFor(service) {
		if p.Match == nil && p.Connect > 0 {
			out = append(out, docSource(policy.KindTimeoutPolicy, p.Name, p.Source))
		}
	}
	if p := pol.CircuitBreaker(service); p != nil {
		out = append(out, docSource(policy.KindCircuitBreakerPolicy, p.Name, p.Source))
	}
	if p := pol.OutlierDetection(service); p != nil {
		out = append(out, docSource(policy.KindOutlierDetectionPolicy, p.Name, p.Source))
	}
	if p := pol.LoadBalancer(service); p != nil {
		out = append(out, docSource(policy.KindLoadBalancerPolicy, p.Name, p.Source))
	}
	return out
}
