// Package model is the control plane's plain-data view of the mesh: the
// services and their instances, and the sidecar proxies with their upstreams.
// Providers (the Consul watcher) fill it; the translator reads it. It knows
// neither Consul's API types nor xDS.
package model

import (
	"cmp"
	"maps"
	"net"
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
	// Weight for load balancing while passing (default 1).
	Weight int
	// Healthy is true when the proxy's checks pass and, when ServiceID is
	// set and registered on the same node, the destination instance's checks
	// pass too. Only healthy proxies are endpoints of their service.
	Healthy bool
}

// ClientOnly reports a proxy without a local application port (a Job or
// a client pod that no Service selects, registered from Kubernetes): it
// gets no public listener and is no endpoint of its service, only its
// upstreams.
func (p *Proxy) ClientOnly() bool { return p.LocalAppPort == 0 }

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
// service, and for each upstream its service entry, its proxies and its leaf
// certificate. translate.Proxy reads nothing else of a catalog, so it builds
// the same resources for p from c.Scope(p) as from c, and two scopes that
// are Same build the same resources (with the same policies). The values are
// shared with c. In the scope, Proxies holds p only and ProxiesFor answers
// for p's upstreams only.
func (c *Catalog) Scope(p *Proxy) *Catalog {
	s := &Catalog{
		Services:         make(map[string]*Service, len(p.Upstreams)+1),
		Proxies:          map[string]*Proxy{p.ID: p},
		CA:               c.CA,
		Leaves:           make(map[string]*Leaf, len(p.Upstreams)+1),
		Intentions:       map[string]*Intentions{},
		proxiesByService: make(map[string][]*Proxy, len(p.Upstreams)),
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
	if v, ok := c.Intentions[p.Service]; ok {
		s.Intentions[p.Service] = v
	}
	for _, u := range p.Upstreams {
		add(u.Service)
		if ps, ok := c.proxiesByService[u.Service]; ok {
			s.proxiesByService[u.Service] = ps
		}
	}
	return s
}

// IsScopeOf reports whether c is Same as full.Scope(p), without building
// that scope: a build loop asks it of every proxy's last scope on every
// change, and most are unchanged.
func (c *Catalog) IsScopeOf(full *Catalog, p *Proxy) bool {
	if c == nil || full == nil || c.CA != full.CA || len(c.Proxies) != 1 || c.Proxies[p.ID] != p {
		return false
	}
	nServices, nLeaves, nLists := 0, 0, 0
	// Services and leaves: p's service and each upstream, once.
	for i := -1; i < len(p.Upstreams); i++ {
		name := p.Service
		if i >= 0 {
			name = p.Upstreams[i].Service
			if name == p.Service || seenUpstream(p, i, name) {
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
	for i, u := range p.Upstreams {
		if seenUpstream(p, i, u.Service) {
			continue
		}
		ps, ok := full.proxiesByService[u.Service]
		if qs, ok2 := c.proxiesByService[u.Service]; ok != ok2 || !slices.Equal(ps, qs) {
			return false
		}
		if ok {
			nLists++
		}
	}
	in, ok := full.Intentions[p.Service]
	if jn, ok2 := c.Intentions[p.Service]; ok != ok2 || in != jn {
		return false
	}
	nIntentions := 0
	if ok {
		nIntentions = 1
	}
	return len(c.Services) == nServices && len(c.Leaves) == nLeaves &&
		len(c.proxiesByService) == nLists && len(c.Intentions) == nIntentions
}

// seenUpstream reports whether an upstream before position i names name.
func seenUpstream(p *Proxy, i int, name string) bool {
	for j := 0; j < i; j++ {
		if p.Upstreams[j].Service == name {
			return true
		}
	}
	return false
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
		i.Port == o.Port && i.Weight == o.Weight && i.Healthy == o.Healthy && maps.Equal(i.Meta, o.Meta)
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
		p.Weight == o.Weight && p.Healthy == o.Healthy && slices.Equal(p.Upstreams, o.Upstreams)
}
