// Package explain answers `controlplane why <proxy> <ip:port>`: for a
// connection a proxy's application opens to an address, each decision the
// mesh takes, in order — whether the pod's interception rules redirect it
// to the sidecar or let it bypass, which filter chain of the outbound
// capture listener matches (a service by its virtual IP, an instance of a
// headless service by its own address, or the pass-through), the route and cluster, the intention or policy that
// allows or denies it, and the endpoints it would go to. It reads the
// resources the translator builds for the proxy, so the answer is what
// the sidecar was sent, not a second model of it.
package explain

import (
	"cmp"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"slices"
	"strconv"
	"strings"

	endpoint "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listener "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	rbacv3 "github.com/envoyproxy/go-control-plane/envoy/config/rbac/v3"
	route "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	httprbac "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/rbac/v3"
	hcm "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	netrbac "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/rbac/v3"
	tcpproxy "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/tcp_proxy/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"

	"github.com/meshlet/meshlet/controlplane/model"
	"github.com/meshlet/meshlet/controlplane/policy"
	"github.com/meshlet/meshlet/controlplane/translate"
	"github.com/meshlet/meshlet/xds"
)

// Outcomes of a Report.
const (
	OutcomeMesh        = "mesh"        // carried by the mesh to a service's sidecars
	OutcomeDenied      = "denied"      // refused by an intention or policy
	OutcomeBypass      = "bypass"      // not intercepted: leaves the pod directly
	OutcomePassthrough = "passthrough" // intercepted, passed through to the address
	OutcomeRefused     = "refused"     // intercepted, no chain, registry-only
)

// Step is one decision: its stage (interception, filter chain, route,
// authorization, endpoints) and what it decided, in words.
type Step struct {
	Stage    string `json:"stage"`
	Decision string `json:"decision"`
}

// Report is the answer for one connection.
type Report struct {
	Proxy       string `json:"proxy"`
	Service     string `json:"service"`
	Destination string `json:"destination"`
	Steps       []Step `json:"steps"`
	// Outcome is one of the Outcome constants.
	Outcome string `json:"outcome"`
}

// Options are what the catalog does not say.
type Options struct {
	// KubeAPIServer is the Kubernetes API server's ClusterIP and port
	// (KUBERNETES_SERVICE_HOST/PORT), which interception leaves alone;
	// zero outside Kubernetes.
	KubeAPIServer netip.AddrPort
}

// ErrUnknownProxy is returned by Find for a name that is no proxy.
var ErrUnknownProxy = errors.New("explain: no such proxy")

// Find returns the proxy named by id: a proxy service ID, or a pod's name
// (the proxy whose ID is "<pod>-<service>-sidecar-proxy"). Errors wrap
// ErrUnknownProxy and list candidates when the name is ambiguous.
func Find(cat *model.Catalog, id string) (*model.Proxy, error) {
	if p := cat.Proxies[id]; p != nil {
		return p, nil
	}
	var found []*model.Proxy
	for _, p := range cat.Proxies {
		if p.ID == xds.ProxyID(id, p.Service) {
			found = append(found, p)
		}
	}
	switch len(found) {
	case 1:
		return found[0], nil
	case 0:
		return nil, fmt.Errorf("%w: %q is neither a proxy service ID nor a pod with a sidecar", ErrUnknownProxy, id)
	}
	var ids []string
	for _, p := range found {
		ids = append(ids, p.ID)
	}
	slices.Sort(ids)
	return nil, fmt.Errorf("%w: pod %q has several proxies: %s", ErrUnknownProxy, id, strings.Join(ids, ", "))
}

// Why explains a connection from p's application to dst.
func Why(cat *model.Catalog, pol *policy.Set, p *model.Proxy, dst netip.AddrPort, o Options) (*Report, error) {
	r := &Report{Proxy: p.ID, Service: p.Service, Destination: dst.String()}
	res, err := translate.Proxy(cat.Scope(p), pol, p)
	if err != nil {
		return nil, fmt.Errorf("explain: %s's resources: %w", p.ID, err)
	}
	step := func(stage, format string, args ...any) {
		r.Steps = append(r.Steps, Step{Stage: stage, Decision: fmt.Sprintf(format, args...)})
	}
	dst = netip.AddrPortFrom(dst.Addr().Unmap(), dst.Port())

	if !p.Transparent() {
		for _, u := range p.Upstreams {
			if u.BindHostPort() == dst.String() {
				step("interception", "none needed: %s is the explicit upstream listener of %s (direct mode)", dst, u.Service)
				return r, r.follow(cat, pol, p, res, findListener(res.Listeners, xds.UpstreamListener(u.Service)).GetFilterChains()[0], u.Service, step)
			}
		}
		step("interception", "none: %s is not a transparent proxy, so the connection leaves the pod directly, outside the mesh (explicit upstreams only: %s)",
			p.ID, upstreamList(p))
		r.Outcome = OutcomeBypass
		return r, nil
	}

	port := cmp.Or(p.OutboundPort, xds.OutboundCapturePort)
	switch ex := p.Exclusions; {
	case dst.Addr().IsLoopback():
		step("interception", "bypass: loopback destinations are not redirected")
	case slices.ContainsFunc(ex.OutboundCIDRs, func(c netip.Prefix) bool { return c.Contains(dst.Addr()) }):
		step("interception", "bypass: %s is in an excluded CIDR (meshlet.io/exclude-outbound-cidrs: %s)", dst.Addr(), prefixList(ex.OutboundCIDRs))
	case slices.Contains(ex.OutboundPorts, int(dst.Port())):
		step("interception", "bypass: port %d is excluded (meshlet.io/exclude-outbound-ports: %s)", dst.Port(), intList(ex.OutboundPorts))
	case o.KubeAPIServer.IsValid() && dst == o.KubeAPIServer:
		step("interception", "bypass: %s is the Kubernetes API server, always reachable", dst)
	default:
		uids := []string{strconv.Itoa(xds.SidecarUID) + " (the sidecar)"}
		for _, u := range ex.UIDs {
			uids = append(uids, strconv.Itoa(u))
		}
		step("interception", "redirected to the sidecar's outbound capture listener 127.0.0.1:%d (nat OUTPUT → MESHLET_OUTBOUND → REDIRECT; connections of uid %s bypass)",
			port, strings.Join(uids, ", "))
		return r, r.capture(cat, pol, p, res, dst, step)
	}
	r.Outcome = OutcomeBypass
	return r, nil
}

// capture follows an intercepted connection through the outbound capture
// listener.
func (r *Report) capture(cat *model.Catalog, pol *policy.Set, p *model.Proxy, res translate.Resources, dst netip.AddrPort, step func(string, string, ...any)) error {
	l := findListener(res.Listeners, xds.OutboundCaptureListener)
	if l == nil {
		return fmt.Errorf("explain: %s has no %s", p.ID, xds.OutboundCaptureListener)
	}
	fc := MatchChain(l, dst)
	if fc == nil {
		step("filter chain", "none matches %s%s, and there is no default chain (MeshDefaults outbound: registry-only): the sidecar refuses the connection",
			dst, noDirectChain(cat, pol, p, dst))
		r.Outcome = OutcomeRefused
		return nil
	}
	if fc == l.GetDefaultFilterChain() {
		why := noDirectChain(cat, pol, p, dst)
		if why == "" {
			why = " (no service has virtual address " + dst.String() + ")"
		}
		step("filter chain", "%s%s: passed through to %s in plaintext (cluster %s), outside the mesh",
			fc.GetName(), why, dst, xds.PassthroughCluster)
		r.Outcome = OutcomePassthrough
		return nil
	}
	if service, ok := xds.DirectService(fc.GetName()); ok {
		return r.direct(cat, pol, p, res, fc, service, dst, step)
	}
	service, _ := xds.UpstreamService(fc.GetName())
	service, _, _ = strings.Cut(service, ":")
	step("filter chain", "%s: %s is the virtual address of service %s", fc.GetName(), dst, service)
	return r.follow(cat, pol, p, res, fc, service, step)
}

// direct explains a chain of headless service (xds.DirectChain): a TCP
// proxy to its ORIGINAL_DST cluster, which dials dst itself over mTLS.
func (r *Report) direct(cat *model.Catalog, pol *policy.Set, p *model.Proxy, res translate.Resources, fc *listener.FilterChain, service string, dst netip.AddrPort, step func(string, string, ...any)) error {
	what := "headless service " + service
	serves := service + "'s public listener"
	if svc := cat.Services[service]; svc != nil {
		if !svc.Headless() {
			what = "service " + service + ", dialled directly (a headless Service selects it too)"
		}
		for _, in := range svc.Instances {
			if a, err := netip.ParseAddr(in.Address); err == nil && a.Unmap() == dst.Addr() && in.Port != int(dst.Port()) {
				serves = service + "'s chains for its other target port"
			}
		}
	}
	step("filter chain", "%s: %s is an instance of %s; mTLS to the original destination", fc.GetName(), dst, what)
	var clusterName string
	for _, f := range fc.GetFilters() {
		if f.GetName() != xds.TCPProxyFilter {
			continue
		}
		var t tcpproxy.TcpProxy
		if err := f.GetTypedConfig().UnmarshalTo(&t); err != nil {
			return fmt.Errorf("explain: %s: %w", fc.GetName(), err)
		}
		clusterName = t.GetCluster()
	}
	step("route", "TCP proxy (for every protocol of a service dialled directly) to cluster %s (ORIGINAL_DST: the address the application dialled)", clusterName)
	ok, rule := translate.ReachRule(cat, pol, p.Service, service)
	if !ok { // an explicit upstream gets its chain regardless
		step("authorization", "denied by %s at the sidecar of %s (mTLS, then RBAC on %s's SPIFFE ID): HTTP requests get 403 %s, TCP connections are closed",
			rule, dst.Addr(), p.Service, xds.ReasonAuthzDenied)
		r.Outcome = OutcomeDenied
		return nil
	}
	step("authorization", "allowed by %s (enforced by the sidecar of %s: mTLS, then RBAC on %s's SPIFFE ID)", rule, dst.Addr(), p.Service)
	var id, sni string
	for _, c := range res.Clusters {
		if c.GetName() != clusterName {
			continue
		}
		var u tlsv3.UpstreamTlsContext
		if err := c.GetTransportSocket().GetTypedConfig().UnmarshalTo(&u); err != nil {
			return fmt.Errorf("explain: cluster %s: %w", clusterName, err)
		}
		sni = u.GetSni()
		if sans := u.GetCommonTlsContext().GetCombinedValidationContext().GetDefaultValidationContext().GetMatchTypedSubjectAltNames(); len(sans) > 0 {
			id = sans[0].GetMatcher().GetExact()
		}
	}
	step("endpoints", "cluster %s to %s only, over mTLS (SNI %s, requiring %s): the pod's inbound interception hands it to its sidecar's %s, which serves %s on port %d",
		clusterName, dst, sni, id, xds.InboundCaptureListener, serves, dst.Port())
	r.Outcome = OutcomeMesh
	return nil
}

// noDirectChain says why dst, when it is an instance of a headless
// service, has no chain of its own: p may not reach the service, or the
// instance is not ready or has no transparent sidecar. "" when dst is no
// such instance.
func noDirectChain(cat *model.Catalog, pol *policy.Set, p *model.Proxy, dst netip.AddrPort) string {
	names := make([]string, 0, len(cat.Services))
	for name := range cat.Services {
		names = append(names, name)
	}
	slices.Sort(names)
	for _, name := range names {
		svc := cat.Services[name]
		if !svc.Headless() {
			continue
		}
		for _, in := range svc.Instances {
			addr, err := netip.ParseAddr(in.Address)
			if err != nil || netip.AddrPortFrom(addr.Unmap(), uint16(in.Port)) != dst {
				continue
			}
			if ok, rule := translate.ReachRule(cat, pol, p.Service, name); !ok {
				return fmt.Sprintf(" (%s is an instance of headless service %s, which %s may not reach: %s)",
					dst, name, p.Service, rule)
			}
			return fmt.Sprintf(" (%s is an instance of headless service %s that is not ready or has no transparent sidecar)", dst, name)
		}
	}
	return ""
}

// follow explains a chain to service: its route and cluster, the rule
// that allows or denies, and the endpoints.
func (r *Report) follow(cat *model.Catalog, pol *policy.Set, p *model.Proxy, res translate.Resources, fc *listener.FilterChain, service string, step func(string, string, ...any)) error {
	var clusterName string
	for _, f := range fc.GetFilters() {
		switch f.GetName() {
		case xds.RBACNetworkFilter:
			var rb netrbac.RBAC
			if err := f.GetTypedConfig().UnmarshalTo(&rb); err != nil {
				return fmt.Errorf("explain: %s: %w", fc.GetName(), err)
			}
			step("authorization", "denied by %s: %s's sidecar closes the connection", ruleNames(rb.GetRules()), p.Service)
			r.Outcome = OutcomeDenied
			return nil
		case xds.HTTPConnectionManagerFilter:
			var m hcm.HttpConnectionManager
			if err := f.GetTypedConfig().UnmarshalTo(&m); err != nil {
				return fmt.Errorf("explain: %s: %w", fc.GetName(), err)
			}
			for _, hf := range m.GetHttpFilters() {
				if hf.GetName() == xds.RBACHTTPFilter {
					var rb httprbac.RBAC
					if err := hf.GetTypedConfig().UnmarshalTo(&rb); err != nil {
						return fmt.Errorf("explain: %s: %w", fc.GetName(), err)
					}
					step("authorization", "denied by %s: %s's sidecar answers every request 403 %s, naming the rule in x-meshlet-authz-rule",
						ruleNames(rb.GetRules()), p.Service, xds.ReasonAuthzDenied)
					r.Outcome = OutcomeDenied
					return nil
				}
			}
			rc := findRoute(res.Routes, m.GetRds().GetRouteConfigName())
			if rc == nil {
				rc = m.GetRouteConfig()
			}
			var lines []string
			for _, vh := range rc.GetVirtualHosts() {
				for _, rt := range vh.GetRoutes() {
					lines = append(lines, describeRoute(rt))
					if clusterName == "" {
						clusterName = rt.GetRoute().GetCluster()
					}
				}
			}
			step("route", "HTTP, route configuration %q: %s", rc.GetName(), strings.Join(lines, "; "))
		case xds.TCPProxyFilter:
			var t tcpproxy.TcpProxy
			if err := f.GetTypedConfig().UnmarshalTo(&t); err != nil {
				return fmt.Errorf("explain: %s: %w", fc.GetName(), err)
			}
			clusterName = t.GetCluster()
			step("route", "TCP proxy to cluster %s", clusterName)
		}
	}
	ok, rule := translate.ReachRule(cat, pol, p.Service, service)
	if !ok {
		step("authorization", "denied by %s at %s's sidecars (mTLS, then RBAC on %s's SPIFFE ID): HTTP requests get 403 %s, TCP connections are closed",
			rule, service, p.Service, xds.ReasonAuthzDenied)
		r.Outcome = OutcomeDenied
		return nil
	}
	step("authorization", "allowed by %s (enforced by %s's sidecars: mTLS, then RBAC on %s's SPIFFE ID)", rule, service, p.Service)
	la := findLoad(res.Endpoints, clusterName)
	var eps []string
	for _, le := range la.GetEndpoints() {
		for _, e := range le.GetLbEndpoints() {
			sa := e.GetEndpoint().GetAddress().GetSocketAddress()
			eps = append(eps, netip.AddrPortFrom(netip.MustParseAddr(sa.GetAddress()), uint16(sa.GetPortValue())).String())
		}
	}
	if len(eps) == 0 {
		step("endpoints", "none healthy: requests fail with 503 %s", xds.ReasonNoHealthyUpstream)
	} else if port, other := strings.CutPrefix(clusterName, service+":"); other {
		step("endpoints", "cluster %s over mTLS to target port %s of %s's healthy instances, whose pods' inbound interception hands it to their sidecar's %s: %s",
			clusterName, port, service, xds.InboundCaptureListener, strings.Join(eps, ", "))
	} else {
		step("endpoints", "cluster %s over mTLS to the public listeners of %s's healthy sidecars: %s", clusterName, service, strings.Join(eps, ", "))
	}
	r.Outcome = OutcomeMesh
	return nil
}

// MatchChain selects the filter chain of l for original destination dst
// as Envoy does: chains whose destination_port equals dst's port win over
// those without one; among them, the longest prefix_range containing dst's
// address (a chain without prefix ranges matches any address); else the
// default filter chain (nil when none).
func MatchChain(l *listener.Listener, dst netip.AddrPort) *listener.FilterChain {
	var best *listener.FilterChain
	bestPort, bestBits := false, -2
	for _, fc := range l.GetFilterChains() {
		m := fc.GetFilterChainMatch()
		withPort := m.GetDestinationPort() != nil
		if withPort && m.GetDestinationPort().GetValue() != uint32(dst.Port()) {
			continue
		}
		bits := -1
		if len(m.GetPrefixRanges()) > 0 {
			bits = -2
			for _, cr := range m.GetPrefixRanges() {
				a, err := netip.ParseAddr(cr.GetAddressPrefix())
				if err != nil {
					continue
				}
				pfx := netip.PrefixFrom(a, int(cr.GetPrefixLen().GetValue()))
				if pfx.Contains(dst.Addr()) && pfx.Bits() > bits {
					bits = pfx.Bits()
				}
			}
			if bits == -2 {
				continue
			}
		}
		if withPort && !bestPort || withPort == bestPort && bits > bestBits {
			best, bestPort, bestBits = fc, withPort, bits
		}
	}
	if best == nil {
		return l.GetDefaultFilterChain()
	}
	return best
}

// ruleNames lists an RBAC's policy names (the rules translate named).
func ruleNames(rb *rbacv3.RBAC) string {
	var names []string
	for name := range rb.GetPolicies() {
		names = append(names, name)
	}
	slices.Sort(names)
	return strings.Join(names, ", ")
}

func describeRoute(rt *route.Route) string {
	var b strings.Builder
	switch pm := rt.GetMatch().GetPathSpecifier().(type) {
	case *route.RouteMatch_Prefix:
		fmt.Fprintf(&b, "prefix %s", pm.Prefix)
	case *route.RouteMatch_Path:
		fmt.Fprintf(&b, "path %s", pm.Path)
	default:
		b.WriteString("a match")
	}
	a := rt.GetRoute()
	fmt.Fprintf(&b, " → cluster %s", a.GetCluster())
	if t := a.GetTimeout(); t != nil && t.AsDuration() > 0 {
		fmt.Fprintf(&b, ", timeout %v", t.AsDuration())
	} else if t != nil {
		b.WriteString(", no timeout")
	}
	if rp := a.GetRetryPolicy(); rp != nil {
		fmt.Fprintf(&b, ", retries %d on %s", rp.GetNumRetries().GetValue(), rp.GetRetryOn())
	}
	return b.String()
}

func findListener(ls []*listener.Listener, name string) *listener.Listener {
	for _, l := range ls {
		if l.GetName() == name {
			return l
		}
	}
	return nil
}

func findRoute(rs []*route.RouteConfiguration, name string) *route.RouteConfiguration {
	for _, rc := range rs {
		if rc.GetName() == name {
			return rc
		}
	}
	return nil
}

func findLoad(ls []*endpoint.ClusterLoadAssignment, name string) *endpoint.ClusterLoadAssignment {
	for _, la := range ls {
		if la.GetClusterName() == name {
			return la
		}
	}
	return nil
}

func upstreamList(p *model.Proxy) string {
	if len(p.Upstreams) == 0 {
		return "none"
	}
	var s []string
	for _, u := range p.Upstreams {
		s = append(s, u.Service+" at "+u.BindHostPort())
	}
	return strings.Join(s, ", ")
}

func intList(v []int) string {
	var s []string
	for _, n := range v {
		s = append(s, strconv.Itoa(n))
	}
	return strings.Join(s, ",")
}

func prefixList(v []netip.Prefix) string {
	var s []string
	for _, p := range v {
		s = append(s, p.String())
	}
	return strings.Join(s, ",")
}

// WriteText prints r for people: one line per step, then the outcome.
func (r *Report) WriteText(w io.Writer) error {
	_, err := fmt.Fprintf(w, "%s (%s) → %s\n", r.Proxy, r.Service, r.Destination)
	for i, s := range r.Steps {
		if err == nil {
			_, err = fmt.Fprintf(w, "  %d. %-13s %s\n", i+1, s.Stage, s.Decision)
		}
	}
	if err == nil {
		_, err = fmt.Fprintf(w, "  outcome: %s\n", r.Outcome)
	}
	return err
}
