package consul

import (
	"cmp"
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"

	"github.com/hashicorp/consul/api"

	"github.com/meshlet/meshlet/controlplane/model"
	"github.com/meshlet/meshlet/xds"
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
	b := newCatalogBuilder()
	for name, es := range entries {
		b.update(name, es)
	}
	return b.build()
}

// catalogBuilder builds Catalogs incrementally, as BuildCatalog does from
// scratch: it keeps the conversion of each service's entries and converts
// again only the services it is told changed (update, remove), and it
// reuses the *model.Service and *model.Proxy values of the previous
// Catalog whose content is unchanged, so that consumers find what changed
// by identity (model.Catalog.Same, Scope). It is not safe for concurrent
// use.
type catalogBuilder struct {
	// byName holds the conversion of each service's entries.
	byName map[string]*converted
	// healthy is the health of every typical instance by node and ID, the
	// input of a proxy's health besides its own checks.
	healthy map[instanceKey]bool
	// ownChecksPass tells, by node and ID, of every typical instance and
	// proxy, whether its service checks pass (its node's checks aside).
	ownChecksPass map[instanceKey]bool
	// proxies are the proxies of the last build by ID, with the
	// conversion they were derived from.
	proxies map[string]builtProxy
	// lastHealthy is, by service, the IDs of its sidecars that were
	// healthy at the last build where any was; held names the services
	// whose sidecars are all critical now, with the IDs kept as endpoints
	// (see build).
	lastHealthy map[string]map[string]bool
	held        map[string][]string
	// heldProxies are the healthy copies of held proxies by ID, reused
	// while their conversion is the same (consumers compare by identity).
	heldProxies map[string]builtProxy
	// recovering, set by the Watcher before build, says Consul has just
	// answered again after failing (Config.RecoveryGrace): sidecars
	// healthy before are held whatever fails them. heldInGrace tells that
	// the last build held one only because of it.
	recovering, heldInGrace bool
}

type instanceKey struct{ node, id string }

// converted is one service name's entries as model values. Proxies carry
// the health of their own checks only.
type converted struct {
	service   *model.Service // nil when no typical instance
	proxies   []*model.Proxy
	instances []instanceKey // keys this name put in catalogBuilder.healthy
}

type builtProxy struct {
	base, p *model.Proxy
}

func newCatalogBuilder() *catalogBuilder {
	return &catalogBuilder{byName: map[string]*converted{}, healthy: map[instanceKey]bool{}, proxies: map[string]builtProxy{},
		lastHealthy: map[string]map[string]bool{}, held: map[string][]string{}, ownChecksPass: map[instanceKey]bool{}}
}

// update converts the entries of service name, replacing its previous ones.
func (b *catalogBuilder) update(name string, entries []*api.ServiceEntry) {
	old := b.byName[name]
	b.remove(name)
	cv := &converted{}
	var svc *model.Service
	for _, e := range entries {
		if e.Service == nil || e.Service.Kind != api.ServiceKindTypical {
			continue
		}
		if svc == nil {
			svc = &model.Service{Name: name}
		}
		in := model.Instance{
			ID:             e.Service.ID,
			Node:           nodeName(e),
			Datacenter:     datacenter(e),
			Address:        serviceAddress(e),
			Port:           e.Service.Port,
			Meta:           e.Service.Meta,
			Weight:         passingWeight(e.Service.Weights),
			Healthy:        e.Checks.AggregatedStatus() == api.HealthPassing,
			Virtual:        virtualAddress(e.Service),
			Ports:          servicePorts(e.Service.Meta[xds.MetaServicePorts]),
			DialedDirectly: e.Service.Meta[xds.MetaDialedDirectly] == "true",
			DirectPorts:    portList(e.Service.Meta[xds.MetaDirectPorts]),
		}
		svc.Instances = append(svc.Instances, in)
		k := instanceKey{in.Node, in.ID}
		b.healthy[k] = in.Healthy
		b.ownChecksPass[k] = ownChecksPass(e.Checks)
		cv.instances = append(cv.instances, k)
	}
	if svc != nil {
		slices.SortFunc(svc.Instances, func(a, b model.Instance) int {
			return cmp.Or(cmp.Compare(a.ID, b.ID), cmp.Compare(a.Node, b.Node))
		})
		for _, in := range svc.Instances {
			if p := in.Meta["protocol"]; p != "" {
				svc.Protocol = p
				break
			}
		}
		if old != nil && old.service.Equal(svc) {
			svc = old.service
		}
	}
	cv.service = svc

	var oldProxies map[string]*model.Proxy
	if old != nil && len(old.proxies) > 0 {
		oldProxies = make(map[string]*model.Proxy, len(old.proxies))
		for _, p := range old.proxies {
			oldProxies[p.ID] = p
		}
	}
	for _, e := range entries {
		if e.Service == nil || e.Service.Kind != api.ServiceKindConnectProxy || e.Service.Proxy == nil {
			continue
		}
		p := convertProxy(e)
		if prev := oldProxies[p.ID]; prev.Equal(p) {
			p = prev
		}
		cv.proxies = append(cv.proxies, p)
		b.ownChecksPass[instanceKey{p.Node, p.ID}] = ownChecksPass(e.Checks)
	}
	b.byName[name] = cv
}

// remove forgets service name.
func (b *catalogBuilder) remove(name string) {
	cv := b.byName[name]
	if cv == nil {
		return
	}
	for _, k := range cv.instances {
		delete(b.healthy, k)
		delete(b.ownChecksPass, k)
	}
	for _, p := range cv.proxies {
		delete(b.ownChecksPass, instanceKey{p.Node, p.ID})
	}
	delete(b.byName, name)
}

// build returns the Catalog of every service updated and not removed. A
// proxy is healthy when its checks pass and, when its destination instance
// (same node, DestinationServiceID) is registered, that instance's checks
// pass too.
//
// When no sidecar of a service is healthy, the ones that were healthy at
// the last build where any was, are still registered and are critical
// only because of node checks (serfHealth: Consul's servers lost touch
// with their agents, e.g. one frozen or restarting; the sidecars' and
// their apps' own checks pass) stay healthy (are held) until a sidecar of
// the service passes again, or until their own checks fail or they
// deregister: a Consul outage must not look like every instance left.
// While recovering (the Watcher's Config.RecoveryGrace after a failed
// query answered again) they are held whatever fails them: a restarted
// agent's first answers show its TTL checks critical, as restored. It is the mesh's panic routing, as Envoy routes to every
// host of a cluster whose healthy share falls under its
// healthy_panic_threshold: a node truly dead costs what an empty endpoint
// set would (retries, outlier detection, 503), a live one keeps serving.
func (b *catalogBuilder) build() *model.Catalog {
	cat := b.buildRaw()
	bySvc := map[string][]*model.Proxy{}
	for _, p := range cat.Proxies {
		if !p.ClientOnly() {
			bySvc[p.Service] = append(bySvc[p.Service], p)
		}
	}
	held, heldProxies, inGrace := map[string][]string{}, map[string]builtProxy{}, false
	for svc, ps := range bySvc {
		healthy := map[string]bool{}
		for _, p := range ps {
			if p.Healthy {
				healthy[p.ID] = true
			}
		}
		if len(healthy) > 0 {
			b.lastHealthy[svc] = healthy
			continue
		}
		for _, p := range ps {
			// Held: healthy before, and critical through node checks only
			// (a sidecar failing a check of its own, or new, is not).
			if b.lastHealthy[svc][p.ID] && (b.nodeChecksOnly(p) || b.recovering) {
				if !b.nodeChecksOnly(p) {
					inGrace = true
				}
				h := b.heldProxies[p.ID]
				if h.base != p {
					cp := *p
					cp.Healthy = true
					h = builtProxy{base: p, p: &cp}
				}
				cat.Proxies[p.ID] = h.p
				heldProxies[p.ID] = h
				held[svc] = append(held[svc], p.ID)
			}
		}
		slices.Sort(held[svc])
	}
	for svc := range b.lastHealthy {
		if bySvc[svc] == nil {
			delete(b.lastHealthy, svc)
		}
	}
	b.held, b.heldProxies, b.heldInGrace = held, heldProxies, inGrace
	if len(held) > 0 {
		return model.NewCatalog(cat.Services, cat.Proxies)
	}
	return cat
}

// nodeChecksOnly reports whether only node checks (serfHealth, the
// agent's liveness, and other checks of no service) fail p: its own
// checks and, when registered, its destination instance's pass.
func (b *catalogBuilder) nodeChecksOnly(p *model.Proxy) bool {
	if !b.ownChecksPass[instanceKey{p.Node, p.ID}] {
		return false
	}
	if p.ServiceID != "" {
		if ok, known := b.ownChecksPass[instanceKey{p.Node, p.ServiceID}]; known && !ok {
			return false
		}
	}
	return true
}

// ownChecksPass reports whether every check of a service (ServiceID set)
// among checks passes: node checks are left out.
func ownChecksPass(checks api.HealthChecks) bool {
	for _, c := range checks {
		if c.ServiceID != "" && c.Status != api.HealthPassing {
			return false
		}
	}
	return true
}

// heldServices returns, by service, the sidecars the last build kept as
// endpoints although every sidecar of the service was critical (see
// build).
func (b *catalogBuilder) heldServices() map[string][]string { return b.held }

// buildRaw is build without holding endpoints.
func (b *catalogBuilder) buildRaw() *model.Catalog {
	services := make(map[string]*model.Service, len(b.byName))
	proxies := make(map[string]*model.Proxy, len(b.proxies))
	built := make(map[string]builtProxy, len(b.proxies))
	for name, cv := range b.byName {
		if cv.service != nil {
			services[name] = cv.service
		}
		for _, base := range cv.proxies {
			healthy := base.Healthy
			if healthy && base.ServiceID != "" {
				if h, ok := b.healthy[instanceKey{base.Node, base.ServiceID}]; ok && !h {
					healthy = false
				}
			}
			p := base
			if prev, ok := b.proxies[base.ID]; ok && prev.base == base && prev.p.Healthy == healthy {
				p = prev.p
			} else if healthy != base.Healthy {
				cp := *base
				cp.Healthy = healthy
				p = &cp
			}
			proxies[p.ID] = p
			built[p.ID] = builtProxy{base: base, p: p}
		}
	}
	b.proxies = built
	return model.NewCatalog(services, proxies)
}

// convertProxy converts a connect-proxy entry; Healthy reflects its own
// checks only.
func convertProxy(e *api.ServiceEntry) *model.Proxy {
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
	if pc.Mode == api.ProxyModeTransparent {
		p.Mode = model.ModeTransparent
		p.OutboundPort = xds.OutboundCapturePort
		if tp := pc.TransparentProxy; tp != nil && tp.OutboundListenerPort != 0 {
			p.OutboundPort = tp.OutboundListenerPort
		}
		p.Exclusions = exclusions(e.Service.Meta)
	}
	if m := e.Service.Meta; m[MetaPodName] != "" {
		p.Pod = model.PodRef{Namespace: m[MetaK8sNamespace], Name: m[MetaPodName], UID: m[MetaPodUID]}
	}
	p.ListenAddress, _ = pc.Config["bind_address"].(string)
	p.ListenPort = intFromConfig(pc.Config["bind_port"])
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
	return p
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

// Meta keys naming the Kubernetes pod of an instance or proxy, written by
// the Kubernetes registrar (consul-k8s's keys): model.Proxy.Pod.
const (
	MetaK8sNamespace = "k8s-namespace"
	MetaPodName      = "pod-name"
	MetaPodUID       = "pod-uid"
)

// Meta keys of a transparent proxy's interception exclusions (comma
// lists), written by the Kubernetes registrar from the pod's
// meshlet.io/exclude-* annotations; `controlplane why` reads them.
const (
	MetaExcludeOutboundPorts = "meshlet-exclude-outbound-ports"
	MetaExcludeOutboundCIDRs = "meshlet-exclude-outbound-cidrs"
	MetaExcludeInboundPorts  = "meshlet-exclude-inbound-ports"
	MetaExcludeUIDs          = "meshlet-exclude-uids"
)

// exclusions reads a proxy's exclusion meta; items that do not parse are
// skipped (the webhook validated them).
func exclusions(meta map[string]string) model.Exclusions {
	ints := func(key string) []int {
		var out []int
		for item := range strings.SplitSeq(meta[key], ",") {
			if n, err := strconv.Atoi(strings.TrimSpace(item)); err == nil {
				out = append(out, n)
			}
		}
		return out
	}
	var ex model.Exclusions
	ex.OutboundPorts, ex.InboundPorts, ex.UIDs = ints(MetaExcludeOutboundPorts), ints(MetaExcludeInboundPorts), ints(MetaExcludeUIDs)
	for item := range strings.SplitSeq(meta[MetaExcludeOutboundCIDRs], ",") {
		if p, err := netip.ParsePrefix(strings.TrimSpace(item)); err == nil {
			ex.OutboundCIDRs = append(ex.OutboundCIDRs, p)
		}
	}
	return ex
}

// VirtualTaggedAddress is the tagged address holding an instance's virtual
// address (consul-k8s writes its Kubernetes Service's ClusterIP there).
const VirtualTaggedAddress = "virtual"

// virtualAddress reads an instance's virtual tagged address; zero when
// absent or not an IP and port.
func virtualAddress(s *api.AgentService) netip.AddrPort {
	v, ok := s.TaggedAddresses[VirtualTaggedAddress]
	if !ok || v.Port <= 0 || v.Port > 65535 {
		return netip.AddrPort{}
	}
	a, err := netip.ParseAddr(v.Address)
	if err != nil {
		return netip.AddrPort{}
	}
	return netip.AddrPortFrom(a.Unmap(), uint16(v.Port))
}

// servicePorts reads meta xds.MetaServicePorts ("<port>:<targetPort>,...");
// pairs that are not two ports in 1-65535 are left out, and nil when none
// is left.
func servicePorts(v string) []model.ServicePort {
	var out []model.ServicePort
	for item := range strings.SplitSeq(v, ",") {
		a, b, ok := strings.Cut(strings.TrimSpace(item), ":")
		port, err1 := strconv.Atoi(a)
		target, err2 := strconv.Atoi(b)
		if !ok || err1 != nil || err2 != nil || port < 1 || port > 65535 || target < 1 || target > 65535 {
			continue
		}
		out = append(out, model.ServicePort{Port: port, TargetPort: target})
	}
	return out
}

// portList reads meta xds.MetaDirectPorts ("9090,9300"): the ports in
// 1-65535, sorted, without duplicates; nil when none.
func portList(v string) []int {
	var out []int
	for item := range strings.SplitSeq(v, ",") {
		if n, err := strconv.Atoi(strings.TrimSpace(item)); err == nil && n >= 1 && n <= 65535 && !slices.Contains(out, n) {
			out = append(out, n)
		}
	}
	slices.Sort(out)
	return out
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
