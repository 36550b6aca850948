package consul

import (
	"cmp"
	"fmt"
	"slices"
	"strconv"

	"github.com/hashicorp/consul/api"

	"github.com/meshlet/meshlet/controlplane/model"
)

// DefaultLocalAddress is used for a proxy's LocalServiceAddress and an
// upstream's LocalBindAddress when the registration leaves them empty, as
// Consul does.
const DefaultLocalAddress = "127.0.0.1"

// BuildCatalog converts health entries (service name → entries from
// /v1/health/service/<name>) into a Catalog. Entries of kind connect-proxy
// become Proxies; typical services become Services; other kinds (gateways)
// are ignored. It is pure and deterministic.
func BuildCatalog(entries map[string][]*api.ServiceEntry) *model.Catalog {
	services := map[string]*model.Service{}
	proxies := map[string]*model.Proxy{}
	type key struct{ node, id string }
	instances := map[key]model.Instance{}

	for name, es := range entries {
		for _, e := range es {
			if e.Service == nil || e.Service.Kind != api.ServiceKindTypical {
				continue
			}
			s := services[name]
			if s == nil {
				s = &model.Service{Name: name}
				services[name] = s
			}
			in := model.Instance{
				ID:         e.Service.ID,
				Node:       nodeName(e),
				Datacenter: datacenter(e),
				Address:    serviceAddress(e),
				Port:       e.Service.Port,
				Meta:       e.Service.Meta,
				Weight:     passingWeight(e.Service.Weights),
				Healthy:    e.Checks.AggregatedStatus() == api.HealthPassing,
			}
			s.Instances = append(s.Instances, in)
			instances[key{in.Node, in.ID}] = in
		}
	}
	for _, s := range services {
		slices.SortFunc(s.Instances, func(a, b model.Instance) int {
			return cmp.Or(cmp.Compare(a.ID, b.ID), cmp.Compare(a.Node, b.Node))
		})
		for _, in := range s.Instances {
			if p := in.Meta["protocol"]; p != "" {
				s.Protocol = p
				break
			}
		}
	}

	for _, es := range entries {
		for _, e := range es {
			if e.Service == nil || e.Service.Kind != api.ServiceKindConnectProxy || e.Service.Proxy == nil {
				continue
			}
			pc := e.Service.Proxy
			p := &model.Proxy{
				ID:              e.Service.ID,
				Node:            nodeName(e),
				Datacenter:      datacenter(e),
				Service:         pc.DestinationServiceName,
				ServiceID:       pc.DestinationServiceID,
				Address:         serviceAddress(e),
				Port:            e.Service.Port,
				LocalAppAddress: cmp.Or(pc.LocalServiceAddress, DefaultLocalAddress),
				LocalAppPort:    pc.LocalServicePort,
				Weight:          passingWeight(e.Service.Weights),
				Healthy:         e.Checks.AggregatedStatus() == api.HealthPassing,
			}
			p.ListenAddress, _ = pc.Config["bind_address"].(string)
			p.ListenPort = intFromConfig(pc.Config["bind_port"])
			if p.Healthy && p.ServiceID != "" {
				if in, ok := instances[key{p.Node, p.ServiceID}]; ok && !in.Healthy {
					p.Healthy = false
				}
			}
			for _, u := range pc.Upstreams {
				if u.DestinationType != "" && u.DestinationType != api.UpstreamDestTypeService {
					continue // prepared queries are not supported
				}
				p.Upstreams = append(p.Upstreams, model.Upstream{
					Service:     u.DestinationName,
					BindAddress: cmp.Or(u.LocalBindAddress, DefaultLocalAddress),
					BindPort:    u.LocalBindPort,
				})
			}
			slices.SortStableFunc(p.Upstreams, func(a, b model.Upstream) int { return cmp.Compare(a.Service, b.Service) })
			proxies[p.ID] = p
		}
	}
	return model.NewCatalog(services, proxies)
}

func nodeName(e *api.ServiceEntry) string {
	if e.Node == nil {
		return ""
	}
	return e.Node.Node
}

func datacenter(e *api.ServiceEntry) string {
	if e.Node == nil {
		return ""
	}
	return e.Node.Datacenter
}

func serviceAddress(e *api.ServiceEntry) string {
	if e.Service.Address != "" {
		return e.Service.Address
	}
	if e.Node != nil {
		return e.Node.Address
	}
	return ""
}

func passingWeight(w api.AgentWeights) int {
	if w.Passing > 0 {
		return w.Passing
	}
	return 1
}

// intFromConfig reads a port from an opaque Proxy.Config value, which JSON
// decoding makes a float64, or a string when written quoted.
func intFromConfig(v any) int {
	switch n := v.(type) {
	case float64:
		return int(n)
	case int:
		return n
	case string:
		i, _ := strconv.Atoi(n)
		return i
	case nil:
		return 0
	default:
		i, _ := strconv.Atoi(fmt.Sprint(n))
		return i
	}
}
