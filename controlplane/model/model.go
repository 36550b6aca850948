// Package model is the control plane's plain-data view of the mesh: the
// services and their instances, and the sidecar proxies with their upstreams.
// Providers (the Consul watcher) fill it; the translator reads it. It knows
// neither Consul's API types nor xDS.
package model

import (
	"cmp"
	"maps"
	"net"
	"net/netip"
	"slices"
	"strconv"
)

// Catalog is one consistent view of the mesh. Values are treated as
// immutable once published: a provider builds a new Catalog for each change
// with NewCatalog.
type Catalog struct {
	// Services by name. Connect proxies are not services here; they are in
	// Proxies.
	Services map[string]*Service
	// Proxies by proxy service ID (the xDS node ID of the sidecar).
	Proxies map[string]*Proxy
	// CA is the Connect CA, nil until known.
	CA *CA
	// Leaves are the current leaf certificates by service name.
	Leaves map[string]*Leaf
	// Intentions by destination service (from Consul; policy files are
	// merged in by the translator).
	Intentions map[string]*Intentions

	// proxiesByService indexes Proxies by destination service, each list
	// sorted by proxy ID.
	proxiesByService map[string][]*Proxy
}

// NewCatalog returns a Catalog of services and proxies (either may be nil)
// with its indexes built.
func NewCatalog(services map[string]*Service, proxies map[string]*Proxy) *Catalog {
	if services == nil {
		services = map[string]*Service{}
	}
	if proxies == nil {
		proxies = map[string]*Proxy{}
	}
	c := &Catalog{Services: services, Proxies: proxies, Leaves: map[string]*Leaf{}, Intentions: map[string]*Intentions{},
		proxiesByService: map[string][]*Proxy{}}
	for _, p := range proxies {
		c.proxiesByService[p.Service] = append(c.proxiesByService[p.Service], p)
	}
	for _, list := range c.proxiesByService {
		slices.SortFunc(list, func(a, b *Proxy) int { return cmp.Compare(a.ID, b.ID) })
	}
	return c
}

// Service is a named service and all its registered instances.
type Service struct {
	Name string
	// Protocol declared in service meta "protocol" ("" when no instance
	// declares one). Instances disagreeing is resolved by taking the value of
	// the instance with the lowest ID, so the result is stable.
	Protocol string
	// Instances sorted by ID.
	Instances []Instance
}

// Instance is one registered instance of a service.
type Instance struct {
	ID         string // Consul service ID, unique per agent
	Node       string // Consul node name
	Datacenter string // Consul datacenter of the node
	Address    string // service address, or the node address when unset
	Port       int
	Meta       map[string]string
	// Weight for load balancing while passing (Consul Weights.Passing;
	// default 1).
	Weight int
	// Healthy is true when every check of the instance and of its node
	// passes (warning counts as not passing, as in Consul's ?passing filter).
	Healthy bool
	// Virtual is the instance's "virtual" tagged address (consul-k8s puts
	// its Kubernetes Service's ClusterIP and port there): where transparent
	// proxies' callers dial the service. Zero when none.
	Virtual netip.AddrPort
	// Ports are the ports of the instance's Kubernetes Service, in its
	// order (meta xds.MetaServicePorts): each Service port is a virtual
	// address on Virtual's IP too, and maps to a target port of the
	// instance. Nil for an instance of one port (Port, at Virtual).
	Ports []ServicePort
	// DialedDirectly is true when callers also dial the instance's own
	// address, though its service has a virtual address (a headless
	// Kubernetes Service selects its pod too; meta
	// xds.MetaDialedDirectly): transparent callers match it as they match
	// a headless service's instances.
	DialedDirectly bool
	// DirectPorts are more target ports dialled on the instance's own
	// address (meta xds.MetaDirectPorts: a headless Service's ports
	// beyond its own Service's), sorted.
	DirectPorts []int
}

// ServicePort is one port of a Kubernetes Service as the registrar wrote
// it: Port is the Service port (the virtual address's port), TargetPort
// the instance's port it maps to (ServicePort.targetPort, a number).
type ServicePort struct {
	Port, TargetPort int
}

// VirtualAddresses returns the distinct virtual addresses of s's
// instances, sorted: each instance's Virtual and, with the same IP, each
// of its Ports (a Kubernetes Service has one IP per family and one address
// per port; a service registered from several clusters may have more).
func (s *Service) VirtualAddresses() []netip.AddrPort {
	var out []netip.AddrPort
	add := func(a netip.AddrPort) {
		if a.IsValid() && !slices.Contains(out, a) {
			out = append(out, a)
		}
	}
	for _, in := range s.Instances {
		add(in.Virtual)
		if in.Virtual.IsValid() {
			for _, p := range in.Ports {
				if p.Port > 0 && p.Port <= 65535 {
					add(netip.AddrPortFrom(in.Virtual.Addr(), uint16(p.Port)))
				}
			}
		}
	}
	slices.SortFunc(out, func(a, b netip.AddrPort) int { return a.Compare(b) })
	return out
}

// OtherTargetPort returns the target port that Service port port of s
// maps to when that is not its instances' own port (the app's port behind
// their public listeners), from the first instance, by ID, that lists
// port in its Ports; 0 when port is the instances' own port or no instance
// lists it. Callers dial such a port on the instances' own addresses
// (xds.ServicePortCluster).
func (s *Service) OtherTargetPort(port int) int {
	for _, in := range s.Instances {
		for _, p := range in.Ports {
			if p.Port == port {
				if p.TargetPort == in.Port {
					return 0
				}
				return p.TargetPort
			}
		}
	}
	return 0
}

// HostPort returns "address:port".
func (i Instance) HostPort() string { return net.JoinHostPort(i.Address, strconv.Itoa(i.Port)) }

// Proxy is a sidecar proxy registration (Consul kind "connect-proxy").
type Proxy struct {
	// ID is the proxy's service ID in Consul and its xDS node ID.
	ID         string
	Node       string
	Datacenter string // Consul datacenter of the node
	// Service is the destination service the proxy fronts
	// (Proxy.DestinationServiceName).
	Service string
	// ServiceID is the destination instance's ID (Proxy.DestinationServiceID),
	// "" when unset.
	ServiceID string
	// Address and Port of the public listener (the proxy service's own
	// address, or the node address when unset).
	Address string
	Port    int
	// ListenAddress and ListenPort override where the public listener binds
	// (Consul Proxy.Config "bind_address" and "bind_port"); "" and 0 mean
	// Address and Port.
	ListenAddress string
	ListenPort    int
	// LocalAppAddress and LocalAppPort locate the app behind the proxy
	// (Proxy.LocalServiceAddress, default 127.0.0.1; Proxy.LocalServicePort).
	LocalAppAddress string
	LocalAppPort    int
	// Upstreams the app reaches through the proxy, sorted by destination.
	Upstreams []Upstream
	// Mode is the proxy's Consul Proxy.Mode: ModeTransparent when its pod's
	// traffic is intercepted, so every service its intentions let it reach
	// is an upstream too, matched by virtual address (translate).
	Mode ProxyMode
	// OutboundPort is Proxy.TransparentProxy.OutboundListenerPort (default
	// xds.OutboundCapturePort) in transparent mode.
	OutboundPort int
	// Exclusions are what the transparent proxy's interception leaves alone
	// (from its registration's meta; none outside Kubernetes).
	Exclusions Exclusions
	// Weight for load balancing while passing (default 1).
	Weight int
	// Healthy is true when the proxy's checks pass and, when ServiceID is
	// set and registered on the same node, the destination instance's checks
	// pass too. Only healthy proxies are endpoints of their service.
	Healthy bool
	// Pod is the Kubernetes pod the proxy runs in (from its registration's
	// meta, written by the Kubernetes registrar); zero outside Kubernetes.
	// The control plane serves the node only to a stream authenticated as
	// that pod (controlplane/xdsauth).
	Pod PodRef
}

// PodRef names a Kubernetes pod: namespace, name and UID (the UID tells a
// pod from a later one of the same name, as a StatefulSet's are).
type PodRef struct {
	Namespace, Name, UID string
}

// IsZero reports a proxy outside Kubernetes.
func (r PodRef) IsZero() bool { return r == PodRef{} }

// String is "<namespace>/<name>", or "" for the zero PodRef.
func (r PodRef) String() string {
	if r.IsZero() {
		return ""
	}
	return r.Namespace + "/" + r.Name
}

// ClientOnly reports a proxy without a local application port (a Job or
// a client pod that no Service selects, registered from Kubernetes): it
// gets no public listener and is no endpoint of its service, only its
// upstreams.
func (p *Proxy) ClientOnly() bool { return p.LocalAppPort == 0 }

// Exclusions are a transparent proxy's interception exclusions: outbound
// destination ports and CIDRs, inbound ports and user IDs whose connections
// are not redirected (the pod's meshlet.io/exclude-* annotations).
type Exclusions struct {
	OutboundPorts []int
	OutboundCIDRs []netip.Prefix
	InboundPorts  []int
	UIDs          []int
}

// Equal reports whether e and o have the same content.
func (e Exclusions) Equal(o Exclusions) bool {
	return slices.Equal(e.OutboundPorts, o.OutboundPorts) && slices.Equal(e.OutboundCIDRs, o.OutboundCIDRs) &&
		slices.Equal(e.InboundPorts, o.InboundPorts) && slices.Equal(e.UIDs, o.UIDs)
}

// ProxyMode is Consul's Proxy.Mode.
type ProxyMode string

// Proxy modes: direct ("" or "direct": the app dials its explicit
// upstreams' local ports) and transparent (Consul's transparent proxy).
const (
	ModeDirect      ProxyMode = ""
	ModeTransparent ProxyMode = "transparent"
)

// Transparent reports whether p is a transparent proxy.
func (p *Proxy) Transparent() bool { return p.Mode == ModeTransparent }

// BindAddress returns the address the public listener binds.
func (p *Proxy) BindAddress() string {
	if p.ListenAddress != "" {
		return p.ListenAddress
	}
	return p.Address
}

// BindPort returns the port the public listener binds.
func (p *Proxy) BindPort() int {
	if p.ListenPort != 0 {
		return p.ListenPort
	}
	return p.Port
}

// HostPort returns the public listener's registered "address:port", where
// other sidecars reach it.
func (p *Proxy) HostPort() string { return net.JoinHostPort(p.Address, strconv.Itoa(p.Port)) }

// Upstream is a destination the app reaches through its proxy's outbound
// listener (Consul Proxy.Upstreams entry of DestinationType "service").
type Upstream struct {
	// Service is the destination service name (DestinationName).
	Service string
	// BindAddress and BindPort are where the outbound listener listens
	// (LocalBindAddress, default 127.0.0.1; LocalBindPort).
	BindAddress string
	BindPort    int
}

// BindHostPort returns "address:port" of the outbound listener.
func (u Upstream) BindHostPort() string {
	return net.JoinHostPort(u.BindAddress, strconv.Itoa(u.BindPort))
}

// ProxiedServices returns the names of the services that have at least one
// proxy, sorted: those need a leaf certificate.
func (c *Catalog) ProxiedServices() []string {
	out := make([]string, 0, len(c.proxiesByService))
	for s := range c.proxiesByService {
		out = append(out, s)
	}
	slices.Sort(out)
	return out
}

// ProxiesFor returns the proxies fronting service, sorted by ID. The slice
// is shared: callers must not modify it.
func (c *Catalog) ProxiesFor(service string) []*Proxy { return c.proxiesByService[service] }

// Scope returns the part of c that the resources of proxy p are built from:
// p, the CA, the service entry, leaf certificate and intentions of p's
// service, and for each upstream (UpstreamNames) its service entry, its
// proxies and its leaf certificate; for a transparent proxy every
// intention too (they decide which services it may reach). translate.Proxy
// reads nothing else of a catalog, so it builds the same resources for p
// from c.Scope(p) as from c, and two scopes that are Same build the same
// resources (with the same policies). The values are shared with c. In the
// scope, Proxies holds p only and ProxiesFor answers for p's upstreams only.
func (c *Catalog) Scope(p *Proxy) *Catalog {
	names := c.UpstreamNames(p)
	s := &Catalog{
		Services:         make(map[string]*Service, len(names)+1),
		Proxies:          map[string]*Proxy{p.ID: p},
		CA:               c.CA,
		Leaves:           make(map[string]*Leaf, len(names)+1),
		Intentions:       map[string]*Intentions{},
		proxiesByService: make(map[string][]*Proxy, len(names)),
	}
	add := func(service string) {
		if v, ok := c.Services[service]; ok {
			s.Services[service] = v
		}
		if v, ok := c.Leaves[service]; ok {
			s.Leaves[service] = v
		}
	}
	add(p.Service)
	if p.Transparent() {
		maps.Copy(s.Intentions, c.Intentions)
	} else if v, ok := c.Intentions[p.Service]; ok {
		s.Intentions[p.Service] = v
	}
	for _, name := range names {
		add(name)
		if ps, ok := c.proxiesByService[name]; ok {
			s.proxiesByService[name] = ps
		}
	}
	return s
}

// UpstreamNames returns the services p may have resources for, each once:
// its explicit upstreams, and for a transparent proxy every service with a
// virtual address and every headless service with proxies (Headless; its
// callers dial its instances directly), sorted (translate keeps those its
// intentions let it reach).
func (c *Catalog) UpstreamNames(p *Proxy) []string {
	var names []string
	for _, u := range p.Upstreams {
		if !slices.Contains(names, u.Service) {
			names = append(names, u.Service)
		}
	}
	if p.Transparent() {
		start := len(names)
		for name, svc := range c.Services {
			if (svc.HasVirtual() || svc.Headless() && len(c.proxiesByService[name]) > 0) && !slices.Contains(names[:start], name) {
				names = append(names, name)
			}
		}
		slices.Sort(names[start:])
	}
	return names
}

// HasVirtual reports whether an instance of s has a virtual address.
func (s *Service) HasVirtual() bool {
	for _, in := range s.Instances {
		if in.Virtual.IsValid() {
			return true
		}
	}
	return false
}

// DialedDirectly reports whether an instance of s is dialled on its own
// address (Instance.DialedDirectly), or s is headless.
func (s *Service) DialedDirectly() bool {
	return s.Headless() || slices.ContainsFunc(s.Instances, func(in Instance) bool { return in.DialedDirectly })
}

// Headless reports whether s has instances and none has a virtual
// address: a Kubernetes Service with clusterIP None (the registrar gives
// its instances no virtual tagged address), whose callers resolve its name
// to the instances' addresses and dial one (a StatefulSet member), or a
// service registered without one elsewhere. Consul's counterpart is
// service-defaults TransparentProxy.DialedDirectly.
func (s *Service) Headless() bool { return len(s.Instances) > 0 && !s.HasVirtual() }

// IsScopeOf reports whether c is Same as full.Scope(p), without building
// that scope: a build loop asks it of every proxy's last scope on every
// change, and most are unchanged.
func (c *Catalog) IsScopeOf(full *Catalog, p *Proxy) bool {
	if c == nil || full == nil || c.CA != full.CA || len(c.Proxies) != 1 || c.Proxies[p.ID] != p {
		return false
	}
	names := full.UpstreamNames(p)
	nServices, nLeaves, nLists := 0, 0, 0
	// Services and leaves: p's service and each upstream, once.
	for i := -1; i < len(names); i++ {
		name := p.Service
		if i >= 0 {
			name = names[i]
			if name == p.Service {
				continue
			}
		}
		v, ok := full.Services[name]
		if w, ok2 := c.Services[name]; ok != ok2 || v != w {
			return false
		}
		if ok {
			nServices++
		}
		l, ok := full.Leaves[name]
		if m, ok2 := c.Leaves[name]; ok != ok2 || l != m {
			return false
		}
		if ok {
			nLeaves++
		}
	}
	// Proxies by service: each upstream, once.
	for _, name := range names {
		ps, ok := full.proxiesByService[name]
		if qs, ok2 := c.proxiesByService[name]; ok != ok2 || !slices.Equal(ps, qs) {
			return false
		}
		if ok {
			nLists++
		}
	}
	if p.Transparent() {
		if !sameValues(c.Intentions, full.Intentions) {
			return false
		}
	} else {
		in, ok := full.Intentions[p.Service]
		if jn, ok2 := c.Intentions[p.Service]; ok != ok2 || in != jn {
			return false
		}
		if len(c.Intentions) != boolInt(ok) {
			return false
		}
	}
	return len(c.Services) == nServices && len(c.Leaves) == nLeaves && len(c.proxiesByService) == nLists
}

func boolInt(b bool) int {
	if b {
		return 1
	}
	return 0
}

// Same reports whether c and o hold the very same values (pointer
// identity) under the same keys: the same CA, services, proxies, leaves,
// intentions and proxies by service. Providers that reuse the values of
// their previous Catalog for what did not change (the Consul watcher does)
// let consumers find what changed this way, without comparing contents.
// Catalogs with equal contents in distinct values are not Same.
func (c *Catalog) Same(o *Catalog) bool {
	if c == o {
		return true
	}
	if c == nil || o == nil || c.CA != o.CA {
		return false
	}
	if !sameValues(c.Services, o.Services) || !sameValues(c.Proxies, o.Proxies) ||
		!sameValues(c.Leaves, o.Leaves) || !sameValues(c.Intentions, o.Intentions) ||
		len(c.proxiesByService) != len(o.proxiesByService) {
		return false
	}
	for k, a := range c.proxiesByService {
		b, ok := o.proxiesByService[k]
		if !ok || !slices.Equal(a, b) {
			return false
		}
	}
	return true
}

func sameValues[K comparable, V comparable](a, b map[K]V) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if w, ok := b[k]; !ok || w != v {
			return false
		}
	}
	return true
}

// Equal reports whether s and o have the same content.
func (s *Service) Equal(o *Service) bool {
	if s == o {
		return true
	}
	if s == nil || o == nil || s.Name != o.Name || s.Protocol != o.Protocol {
		return false
	}
	return slices.EqualFunc(s.Instances, o.Instances, Instance.Equal)
}

// Equal reports whether i and o have the same content.
func (i Instance) Equal(o Instance) bool {
	return i.ID == o.ID && i.Node == o.Node && i.Datacenter == o.Datacenter && i.Address == o.Address &&
		i.Port == o.Port && i.Weight == o.Weight && i.Healthy == o.Healthy && i.Virtual == o.Virtual && slices.Equal(i.Ports, o.Ports) && i.DialedDirectly == o.DialedDirectly && slices.Equal(i.DirectPorts, o.DirectPorts) && maps.Equal(i.Meta, o.Meta)
}

// Equal reports whether p and o have the same content.
func (p *Proxy) Equal(o *Proxy) bool {
	if p == o {
		return true
	}
	if p == nil || o == nil {
		return false
	}
	return p.ID == o.ID && p.Node == o.Node && p.Datacenter == o.Datacenter && p.Service == o.Service &&
		p.ServiceID == o.ServiceID && p.Address == o.Address && p.Port == o.Port &&
		p.ListenAddress == o.ListenAddress && p.ListenPort == o.ListenPort &&
		p.LocalAppAddress == o.LocalAppAddress && p.LocalAppPort == o.LocalAppPort &&
		p.Weight == o.Weight && p.Healthy == o.Healthy && slices.Equal(p.Upstreams, o.Upstreams) &&
		p.Mode == o.Mode && p.OutboundPort == o.OutboundPort && p.Exclusions.Equal(o.Exclusions) && p.Pod == o.Pod
}
