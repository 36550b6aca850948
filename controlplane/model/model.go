// Package model is the control plane's plain-data view of the mesh: the
// services and their instances, and the sidecar proxies with their upstreams.
// Providers (the Consul watcher) fill it; the translator reads it. It knows
// neither Consul's API types nor xDS.
package model

import (
	"cmp"
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
