package translate

import (
	"cmp"
	"fmt"
	"net/netip"
	"slices"

	cluster "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listener "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	rbacv3 "github.com/envoyproxy/go-control-plane/envoy/config/rbac/v3"
	netrbac "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/rbac/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/meshlet/meshlet/controlplane/model"
	"github.com/meshlet/meshlet/controlplane/policy"
	"github.com/meshlet/meshlet/controlplane/xdsbuild"
	"github.com/meshlet/meshlet/xds"
)

// transparent adds the resources of a transparent proxy p (Consul's
// transparent proxy, on Envoy's shapes):
//   - the outbound capture listener on 127.0.0.1:<p.OutboundPort> (the
//     original_dst listener filter), with a filter chain per upstream the
//     proxy may reach — every service with a virtual address whose
//     intentions (and AuthorizationPolicy, and default action) let p's
//     service in (Reachable), plus its explicit upstreams — matched on the
//     service's virtual IPs and port and carrying the filters its explicit
//     listener would; the upstreams' routes, clusters and load assignments;
//     for every other service with a virtual address a chain that refuses
//     (denyChain), so a denied call fails at once with the rule named;
//   - for every headless service (model.Service.Headless) it may reach
//     (Reachable, or an explicit upstream) chains "direct:<service>"
//     matching its instances' own addresses and ports to the ORIGINAL_DST
//     cluster "passthrough~<service>" with the service's mTLS
//     (directChains: Consul's TransparentProxy.DialedDirectly), after the
//     virtual chains; a headless service it may not reach gets no chain;
//   - a default chain passing other destinations through to the
//     "original-destination" cluster (ORIGINAL_DST), unless MeshDefaults
//     says outbound: registry-only;
//   - the inbound capture listener on 0.0.0.0:15006: the public
//     listener's chains for connections to the app's port, and the
//     pass-through for the pod's other ports (none for a client-only
//     proxy).
//
// seen holds the explicit upstreams already added; public is the public
// listener (nil for a client-only proxy). Inputs are noted in pv.
func transparent(r *Resources, cat *model.Catalog, pol *policy.Set, p *model.Proxy, public *listener.Listener, seen map[string]bool, pv *provenance) {
	capture := pv.on(listenerKey(xds.OutboundCaptureListener))
	capture.add(registration(p, "transparent proxy"))
	var chains []xdsbuild.CaptureChain
	var outbound *listener.Listener // a traced HTTP upstream listener: its direction and extras
	var direct []string             // reachable headless services, for their chains after the virtual ones
	portsAdded := map[string]bool{} // the clusters of services' other target ports, added once
	for _, name := range cat.UpstreamNames(p) {
		svc := cat.Services[name]
		explicit := seen[name]
		if explicit {
			capture.add(registration(p, "upstream "+name))
		}
		// What decides whether p may reach name shapes the capture
		// listener and, for an implicit upstream, whether it has a route,
		// cluster and load assignment (or their direct cluster).
		cn := xds.ServiceCluster(name)
		keys := []resourceKey{routeKey(cn), clusterKey(cn), endpointKey(cn), clusterKey(xds.DirectCluster(name))}
		if svc != nil {
			for _, v := range svc.VirtualAddresses() {
				if t := svc.OtherTargetPort(int(v.Port())); t != 0 {
					keys = append(keys, clusterKey(xds.ServicePortCluster(name, t)), endpointKey(xds.ServicePortCluster(name, t)))
				}
			}
		}
		reached := capture.and(pv.on(keys...))
		if svc != nil && svc.Headless() {
			if explicit {
				direct = append(direct, name)
			} else if ok, _ := reach(cat, pol, p.Service, name, reached); ok {
				direct = append(direct, name)
			}
			continue
		}
		if svc == nil || !svc.HasVirtual() {
			continue
		}
		if explicit {
			capture.add(serviceSource(name, "virtual addresses"))
		} else {
			reached.add(serviceSource(name, "virtual addresses")) // what makes it an upstream
		}
		var ok bool
		var rule string
		if !explicit {
			ok, rule = reach(cat, pol, p.Service, name, reached)
		}
		var up upstream
		switch {
		case explicit || ok:
			up = upstreamResources(cat, pol, p, name, "127.0.0.1", 0, pv, capture)
			if up.protocol == xds.ProtocolUDP {
				continue // no UDP capture
			}
			if !explicit {
				r.add(up)
			}
		default:
			// A service p may not reach gets a chain that refuses at once,
			// naming the rule (403 authz_denied with the rule for HTTP, a
			// closed connection for TCP), with no cluster: the proxy's
			// config grows with what it may call, by a chain per other
			// service.
			up = denyChain(cat, pol, p, name, rule, capture)
			if up.listener == nil {
				continue
			}
		}
		if (explicit || ok) && svc.DialedDirectly() {
			direct = append(direct, name) // its instances' own addresses too
		}
		if up.listener.GetTrafficDirection() != core.TrafficDirection_UNSPECIFIED && outbound == nil {
			outbound = up.listener
		}
		byPort := map[uint16][]netip.Prefix{}
		var ports []uint16
		for _, v := range svc.VirtualAddresses() {
			if _, ok := byPort[v.Port()]; !ok {
				ports = append(ports, v.Port())
			}
			byPort[v.Port()] = append(byPort[v.Port()], netip.PrefixFrom(v.Addr(), v.Addr().BitLen()))
		}
		slices.Sort(ports)
		for _, port := range ports {
			chainName := xds.UpstreamListener(name)
			if len(ports) > 1 {
				chainName = fmt.Sprintf("%s:%d", chainName, port)
			}
			filters := up.listener.GetFilterChains()[0].GetFilters()
			if target := svc.OtherTargetPort(int(port)); target != 0 && (explicit || ok) {
				var res upstream
				filters, res = portUpstream(cat, pol, p, name, target, pv, capture)
				if !portsAdded[res.cluster.GetName()] {
					portsAdded[res.cluster.GetName()] = true
					r.add(res)
				}
			}
			chains = append(chains, xdsbuild.CaptureChain{Name: chainName, Prefixes: byPort[port], Port: int(port), Filters: filters})
		}
	}
	taken := map[netip.AddrPort]bool{}
	for _, name := range direct {
		c, cl := directChains(cat, pol, p, name, taken, pv, capture)
		if cl != nil {
			chains = append(chains, c...)
			r.Clusters = append(r.Clusters, cl)
		}
	}
	mode := capture
	if public == nil { // else the inbound capture listener needs the pass-through cluster anyway
		mode = mode.and(pv.on(clusterKey(xds.PassthroughCluster)))
	}
	passthrough := outboundMode(pol, mode) != policy.OutboundRegistryOnly
	pv.on(clusterKey(xds.PassthroughCluster)).add(registration(p, "transparent proxy"))
	out := xdsbuild.NewCaptureListener(xds.OutboundCaptureListener, "127.0.0.1", cmp.Or(p.OutboundPort, xds.OutboundCapturePort),
		xdsbuild.CaptureOptions{Chains: chains, Passthrough: passthrough})
	if outbound != nil {
		out.TrafficDirection, out.Metadata = outbound.TrafficDirection, outbound.Metadata
	}
	r.Listeners = append(r.Listeners, out)
	if public != nil {
		in := inboundCapture(public, p.LocalAppPort)
		in.FilterChains = append(in.FilterChains, otherPortChains(r, cat, pol, p, pv)...)
		r.Listeners = append(r.Listeners, in)
	}
	if passthrough || public != nil {
		r.Clusters = append(r.Clusters, xdsbuild.NewPassthroughCluster())
	}
}

// directChains returns the outbound capture chains of headless service
// (model.Service.Headless) for proxy p, and the ORIGINAL_DST cluster they
// go to (Consul's service-defaults TransparentProxy.DialedDirectly): for
// each port of its instances, a chain xds.DirectChain(service) (with
// ":<port>" when they use several) matching the address/32 (/128) of
// every instance that is healthy and fronted by a healthy transparent
// proxy (whose inbound capture listener serves the mTLS public chain on
// the app port) on that port, carrying a TCP proxy — for HTTP services too:
// the connection's bytes go as they are, in mTLS whose ALPN is the
// service cluster's — to xds.DirectCluster(service), which connects to
// the address the client dialled with the service's UpstreamTlsContext.
// Instance addresses already in taken (another headless service's
// instance on the same port) are left to the first service; taken gets
// the new ones. No chain and a nil cluster when no instance qualifies or
// the service is udp. The chains' inputs are noted on chain, the
// cluster's in pv.
func directChains(cat *model.Catalog, pol *policy.Set, p *model.Proxy, service string, taken map[netip.AddrPort]bool, pv *provenance, chain note) ([]xdsbuild.CaptureChain, *cluster.Cluster) {
	name := xds.DirectCluster(service)
	cl := pv.on(clusterKey(name))
	both := chain.and(cl)
	proto := protocol(cat, pol, service, both)
	if proto == xds.ProtocolUDP {
		return nil, nil
	}
	both.add(serviceSource(service, "catalog/health"), serviceSource(service, "sidecars: catalog/health"))
	byPort := map[uint16][]netip.Prefix{}
	var ports []uint16
	for _, in := range directInstances(cat, service) {
		if taken[in] {
			continue
		}
		taken[in] = true
		if _, ok := byPort[in.Port()]; !ok {
			ports = append(ports, in.Port())
		}
		byPort[in.Port()] = append(byPort[in.Port()], netip.PrefixFrom(in.Addr(), in.Addr().BitLen()))
	}
	if len(ports) == 0 {
		return nil, nil
	}
	slices.Sort(ports)
	opts := clusterOptions(pol, service, xdsbuild.ClusterOptions{}, cl)
	opts.TLS = upstreamTLS(cat, pol, p, service, proto, cl)
	tcp := tcpFilters(pol, service, xds.DirectChain(service), name, chain)
	var chains []xdsbuild.CaptureChain
	for _, port := range ports {
		chainName := xds.DirectChain(service)
		if len(ports) > 1 {
			chainName = fmt.Sprintf("%s:%d", chainName, port)
		}
		prefixes := byPort[port]
		slices.SortFunc(prefixes, func(a, b netip.Prefix) int { return a.Addr().Compare(b.Addr()) })
		chains = append(chains, xdsbuild.CaptureChain{Name: chainName, Prefixes: prefixes, Port: int(port), Filters: tcp})
	}
	return chains, xdsbuild.NewDirectCluster(name, opts)
}

// portUpstream returns the outbound capture chain filters for target
// port target of service, one of its Kubernetes Service's other ports
// (model.Service.OtherTargetPort), and the upstream they go to: a TCP
// proxy to the EDS cluster xds.ServicePortCluster(service, target) with
// the service's mTLS (SNI and SPIFFE ID; no ALPN: the port's bytes go as
// they are, whatever the service's protocol) and resilience settings,
// whose load assignment is the target port on the address of each
// instance fronted by a healthy transparent proxy (the callee's inbound
// capture listener terminates the mTLS there: otherPortChains). The
// chain's inputs are noted on chain, the cluster's and load assignment's
// in pv.
func portUpstream(cat *model.Catalog, pol *policy.Set, p *model.Proxy, service string, target int, pv *provenance, chain note) ([]*listener.Filter, upstream) {
	name := xds.ServicePortCluster(service, target)
	cl := pv.on(clusterKey(name))
	cl.add(serviceSource(service, "ports"))
	opts := clusterOptions(pol, service, xdsbuild.ClusterOptions{Protocol: xds.ProtocolTCP}, cl)
	opts.TLS = upstreamTLS(cat, pol, p, service, xds.ProtocolTCP, cl)
	eps := pv.on(endpointKey(name))
	eps.add(serviceSource(service, "catalog/health"), serviceSource(service, "sidecars: catalog/health"))
	var endpoints []xdsbuild.Endpoint
	if svc := cat.Services[service]; svc != nil {
		for _, in := range svc.Instances {
			if in.Healthy && fronted(cat, service, in) && slices.ContainsFunc(in.Ports, func(sp model.ServicePort) bool { return sp.TargetPort == target }) {
				endpoints = append(endpoints, xdsbuild.Endpoint{Host: in.Address, Port: target, Weight: in.Weight, Region: in.Datacenter})
			}
		}
	}
	return tcpFilters(pol, service, xds.UpstreamListener(service), name, chain), upstream{service: service, protocol: xds.ProtocolTCP,
		cluster: xdsbuild.NewEDSCluster(name, opts), load: xdsbuild.NewLoadAssignment(name, endpoints)}
}

// tcpFilters are the filters of a capture chain (statistics name
// statPrefix) proxying TCP to cluster with service's connect attempts and
// idle timeout, whose inputs are noted on chain.
func tcpFilters(pol *policy.Set, service, statPrefix, cluster string, chain note) []*listener.Filter {
	return xdsbuild.NewTCPProxyListener(statPrefix, "127.0.0.1", 0, cluster, xdsbuild.TCPProxyOptions{
		MaxConnectAttempts: tcpConnectAttempts(pol, service, chain),
		IdleTimeout:        tcpIdleTimeout(pol, service, chain),
	}).GetFilterChains()[0].GetFilters()
}

// otherPortChains returns the inbound capture listener's chains for the
// other target ports of p's own instance (its Kubernetes Service's ports
// besides the app's, model.Instance.Ports, and the ports of headless
// Services selecting its pod, model.Instance.DirectPorts), and adds their local app
// clusters xds.LocalAppPortCluster to r: per port, the public listener's
// shape (mTLS, in permissive mode a plaintext chain too) matched on that
// destination port, with network RBAC from the service's intentions (L7
// permissions cannot apply and refuse, as on a TCP service) before a TCP
// proxy to the app on that port. Ports the pod excludes from interception
// get none. Their inputs are noted in pv.
func otherPortChains(r *Resources, cat *model.Catalog, pol *policy.Set, p *model.Proxy, pv *provenance) []*listener.FilterChain {
	var targets []int
	if svc := cat.Services[p.Service]; svc != nil {
		for _, in := range svc.Instances {
			if in.ID != p.ServiceID {
				continue
			}
			ports := slices.Clone(in.DirectPorts)
			for _, sp := range in.Ports {
				ports = append(ports, sp.TargetPort)
			}
			for _, port := range ports {
				if port != p.LocalAppPort && !slices.Contains(targets, port) && !slices.Contains(p.Exclusions.InboundPorts, port) {
					targets = append(targets, port)
				}
			}
		}
	}
	slices.Sort(targets)
	var out []*listener.FilterChain
	lis := pv.on(listenerKey(xds.InboundCaptureListener))
	for _, port := range targets {
		cn := xds.LocalAppPortCluster(port)
		local := pv.on(clusterKey(cn))
		local.add(registration(p, "local app"), serviceSource(p.Service, "ports"))
		lis.add(serviceSource(p.Service, "ports"))
		o := xdsbuild.InboundOptions{
			TLS:        xdsbuild.DownstreamTLS(minTLSVersion(pol, lis), nil),
			Permissive: mtlsMode(pol, p.Service, lis) == policy.MTLSPermissive,
			Cluster:    cn,
		}
		o.TCP.IdleTimeout = tcpIdleTimeout(pol, p.Service, lis)
		o.Rules, o.Shadow = authzRules(cat, pol, p.Service, false, lis)
		name := fmt.Sprintf("%s:%d", xds.PublicListener, port)
		out = append(out, onPort(xdsbuild.NewInboundListener(name, "0.0.0.0", port, o).GetFilterChains(), name, port)...)
		r.Clusters = append(r.Clusters, xdsbuild.NewStaticCluster(cn, p.LocalAppAddress, port, xdsbuild.ClusterOptions{Protocol: xds.ProtocolTCP}))
	}
	return out
}

// fronted reports whether instance in of service is fronted by a healthy
// transparent proxy with a public listener (Proxy.ServiceID on the same
// node), whose pod's inbound interception hands a connection dialled to
// the instance's own address to the sidecar's mTLS chains.
func fronted(cat *model.Catalog, service string, in model.Instance) bool {
	return slices.ContainsFunc(cat.ProxiesFor(service), func(q *model.Proxy) bool {
		return q.ServiceID == in.ID && q.Node == in.Node && q.Healthy && q.Transparent() && !q.ClientOnly()
	})
}

// directInstances returns the addresses (IP and port) of the instances of
// service that a caller's sidecar may dial directly: every instance of a
// headless service, the instances dialled directly (model.Instance.
// DialedDirectly) of one with a virtual address; healthy, with an IP
// address and a port, and fronted (Proxy.ServiceID on the same node) by a
// healthy transparent proxy with a public listener, so that their pod's
// inbound interception hands the connection to the sidecar's mTLS chain
// (on the instance's port, on its Service's other target ports and on its
// headless Services' ports: otherPortChains). Other instances' connections keep the pass-through.
func directInstances(cat *model.Catalog, service string) []netip.AddrPort {
	svc := cat.Services[service]
	if svc == nil {
		return nil
	}
	headless := svc.Headless()
	var out []netip.AddrPort
	for _, in := range svc.Instances {
		addr, err := netip.ParseAddr(in.Address)
		if err != nil || !in.Healthy || in.Port <= 0 || in.Port > 65535 || !headless && !in.DialedDirectly || !fronted(cat, service, in) {
			continue
		}
		addr = addr.Unmap()
		out = append(out, netip.AddrPortFrom(addr, uint16(in.Port)))
		for _, sp := range in.Ports {
			if a := netip.AddrPortFrom(addr, uint16(sp.TargetPort)); sp.TargetPort != in.Port && !slices.Contains(out, a) {
				out = append(out, a)
			}
		}
		for _, port := range in.DirectPorts {
			if a := netip.AddrPortFrom(addr, uint16(port)); !slices.Contains(out, a) {
				out = append(out, a)
			}
		}
	}
	return out
}

// inboundCapture is the inbound capture listener: public's filter chains
// (mTLS, RBAC, the app) for connections whose original destination port is
// appPort, public's listener filters after original_dst, and the
// pass-through for the other ports.
func inboundCapture(public *listener.Listener, appPort int) *listener.Listener {
	in := xdsbuild.NewCaptureListener(xds.InboundCaptureListener, "0.0.0.0", xds.InboundCapturePort, xdsbuild.CaptureOptions{Passthrough: true})
	in.ListenerFilters = append(in.ListenerFilters, public.GetListenerFilters()...)
	in.ListenerFiltersTimeout = public.GetListenerFiltersTimeout()
	in.ContinueOnListenerFiltersTimeout = public.GetContinueOnListenerFiltersTimeout()
	in.TrafficDirection, in.Metadata = public.GetTrafficDirection(), public.GetMetadata()
	in.FilterChains = onPort(public.GetFilterChains(), xds.PublicListener, appPort)
	return in
}

// onPort returns copies of an inbound listener's chains for the inbound
// capture listener: matched on destination port too, named name (with
// ":<transport_protocol>" when they match one).
func onPort(chains []*listener.FilterChain, name string, port int) []*listener.FilterChain {
	out := make([]*listener.FilterChain, 0, len(chains))
	for _, c := range chains {
		fc := proto.Clone(c).(*listener.FilterChain)
		if fc.FilterChainMatch == nil {
			fc.FilterChainMatch = &listener.FilterChainMatch{}
		}
		fc.FilterChainMatch.DestinationPort = wrapperspb.UInt32(uint32(port))
		fc.Name = name
		if tp := fc.FilterChainMatch.GetTransportProtocol(); tp != "" {
			fc.Name += ":" + tp
		}
		out = append(out, fc)
	}
	return out
}

// denyChain is the listener (for its filters) of a chain refusing every
// connection to service: an HTTP connection manager whose RBAC filter denies
// every request by rule, or a network RBAC filter before a TCP proxy. nil
// listener for a udp service. Its protocol's source is noted on n.
func denyChain(cat *model.Catalog, pol *policy.Set, p *model.Proxy, service, rule string, n note) upstream {
	proto := protocol(cat, pol, service, n)
	deny := &rbacv3.RBAC{Action: rbacv3.RBAC_DENY, Policies: map[string]*rbacv3.Policy{rule: {
		Permissions: []*rbacv3.Permission{anyPermission()},
		Principals:  []*rbacv3.Principal{{Identifier: &rbacv3.Principal_Any{Any: true}}},
	}}}
	name := xds.ServiceCluster(service)
	u := upstream{service: service, protocol: proto}
	switch {
	case proto.IsHTTP():
		u.listener = xdsbuild.NewHTTPListener(xds.UpstreamListener(service), "127.0.0.1", 0, xdsbuild.HTTPListenerOptions{
			RouteConfig: xdsbuild.NewRouteConfig(name, name, xdsbuild.RouteOptions{}), Via: p.ID, RBAC: deny,
		})
	case proto == xds.ProtocolUDP:
	default:
		l := xdsbuild.NewTCPProxyListener(xds.UpstreamListener(service), "127.0.0.1", 0, name, xdsbuild.TCPProxyOptions{})
		l.FilterChains[0].Filters = append([]*listener.Filter{{Name: xds.RBACNetworkFilter, ConfigType: &listener.Filter_TypedConfig{
			TypedConfig: xds.MustAny(&netrbac.RBAC{Rules: deny, StatPrefix: xds.UpstreamListener(service)}),
		}}}, l.FilterChains[0].Filters...)
		u.listener = l
	}
	return u
}

// Reachable reports whether a proxy of service source may reach
// destination, which decides a transparent proxy's upstreams (Consul's rule:
// the services its intentions allow it to reach): the rule for source
// among the destination's intentions and AuthorizationPolicy sources (its
// own name first, then "*"), allowing for an allow rule or L7 permissions
// (some requests may pass), else the destination's default action.
func Reachable(cat *model.Catalog, pol *policy.Set, source, destination string) bool {
	ok, _ := reach(cat, pol, source, destination, note{})
	return ok
}

// ReachRule is Reachable with the rule that decides, in words: an
// intention or policy source's origin ("consul intention web => api"), or
// "default allow"/"default deny".
func ReachRule(cat *model.Catalog, pol *policy.Set, source, destination string) (bool, string) {
	return reach(cat, pol, source, destination, note{})
}

// reach is Reachable with the rule that decides: an intention or policy
// source's origin ("consul intention web => api"), or the default action.
// Where the deciding rule comes from is noted on n.
func reach(cat *model.Catalog, pol *policy.Set, source, destination string, n note) (bool, string) {
	sources := authzSources(cat, pol, destination)
	for _, want := range []string{source, "*"} {
		for _, s := range sources {
			if s.Name != want {
				continue
			}
			n.add(s.from)
			if s.Action == "" {
				for _, perm := range s.Permissions {
					if perm.Action == policy.ActionAllow {
						return true, s.Origin
					}
				}
				return false, s.Origin
			}
			return s.Action == policy.ActionAllow, s.Origin
		}
	}
	if a := defaultAction(pol, destination, n); a == policy.ActionAllow {
		return true, "default allow"
	}
	return false, "default deny"
}
