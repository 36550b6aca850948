package translate

import (
	"errors"
	"fmt"
	"regexp"
	"slices"
	"strings"

	rbacv3 "github.com/envoyproxy/go-control-plane/envoy/config/rbac/v3"
	route "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	matcher "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"

	"github.com/meshlet/meshlet/controlplane/model"
	"github.com/meshlet/meshlet/controlplane/policy"
	"github.com/meshlet/meshlet/controlplane/xdsbuild"
	"github.com/meshlet/meshlet/xds"
)

// ErrNotReady is returned (wrapped, with the reason) when a proxy's
// resources cannot be built yet: the Connect CA roots or its service's leaf
// certificate have not arrived. Publishing plaintext instead would
// downgrade the mesh, so the proxy keeps its last config.
var ErrNotReady = errors.New("not ready")

// SPIFFEID returns Consul's SPIFFE ID of a service:
// spiffe://<trust-domain>/ns/default/dc/<dc>/svc/<service>.
func SPIFFEID(trustDomain, dc, service string) string {
	return "spiffe://" + trustDomain + "/ns/default/dc/" + dc + "/svc/" + service
}

// upstreamID is the identity a caller requires of service's sidecars: the
// SPIFFE ID of its leaf certificate when known, else the Consul form in dc.
// The leaf or the CA roots (trust domain) is noted on n.
func upstreamID(cat *model.Catalog, service, dc string, n note) string {
	if l := cat.Leaves[service]; l != nil && l.SPIFFEID != "" {
		n.add(Source{Origin: OriginConsul, Kind: ConsulLeaf, Name: service, Detail: "SPIFFE ID"})
		return l.SPIFFEID
	}
	n.add(caSource("trust domain"))
	return SPIFFEID(cat.CA.TrustDomain, cmpOr(dc, xdsbuild.DefaultRegion), service)
}

// upstreamSNI is Consul's SNI for a service: <service>.default.<dc>.internal.<trust-domain>.
func upstreamSNI(cat *model.Catalog, service, dc string) string {
	return service + ".default." + cmpOr(dc, xdsbuild.DefaultRegion) + ".internal." + cat.CA.TrustDomain
}

func cmpOr(s, def string) string {
	if s == "" {
		return def
	}
	return s
}

// alpn returns the ALPN protocols for a service protocol.
func alpn(p xds.Protocol, inbound bool) []string {
	switch {
	case !p.IsHTTP():
		return nil
	case inbound:
		return []string{"h2", "http/1.1"}
	case p.UsesHTTP2():
		return []string{"h2"}
	}
	return []string{"http/1.1"}
}

// secrets returns the proxy's SDS secrets, or ErrNotReady.
func secrets(cat *model.Catalog, service string) (cert, roots *tlsv3.Secret, err error) {
	if cat.CA == nil || len(cat.CA.Roots) == 0 {
		return nil, nil, fmt.Errorf("%w: waiting for the Connect CA roots", ErrNotReady)
	}
	leaf := cat.Leaves[service]
	if leaf == nil || leaf.CertPEM == "" || leaf.KeyPEM == "" {
		return nil, nil, fmt.Errorf("%w: waiting for the leaf certificate of service %q", ErrNotReady, service)
	}
	pems := make([]string, len(cat.CA.Roots))
	for i, r := range cat.CA.Roots {
		pems[i] = r.CertPEM
	}
	return xdsbuild.NewCertSecret(leaf.CertPEM, leaf.KeyPEM), xdsbuild.NewRootsSecret(pems), nil
}

// authzSource is a source of an authorization rule and where it comes
// from: the Consul service-intentions entry or the AuthorizationPolicy.
type authzSource struct {
	model.IntentionSource
	from Source
}

// authzSources merges the Consul intentions of destination with its
// AuthorizationPolicy (whose sources win for the same name): named sources
// first (sorted), then "*".
func authzSources(cat *model.Catalog, pol *policy.Set, destination string) []authzSource {
	byName := map[string]authzSource{}
	if in := cat.Intentions[destination]; in != nil {
		from := Source{Origin: OriginConsul, Kind: ConsulIntentions, Name: destination}
		for _, s := range in.Sources {
			byName[s.Name] = authzSource{s, from}
		}
	}
	if p := pol.Authorization(destination); p != nil {
		from := docSource(policy.KindAuthorizationPolicy, p.Name, p.Source)
		for i, s := range p.Sources {
			src := model.IntentionSource{Name: s.Name, Action: s.Action, Origin: fmt.Sprintf("%s spec.sources[%d]", p.Source, i)}
			for _, perm := range s.Permissions {
				m := model.HTTPMatch{PathExact: perm.HTTP.PathExact, PathPrefix: perm.HTTP.PathPrefix, Methods: perm.HTTP.Methods}
				for _, h := range perm.HTTP.Headers {
					m.Headers = append(m.Headers, model.HeaderMatch{Name: h.Name, Exact: h.Exact, Prefix: h.Prefix, Suffix: h.Suffix, Present: h.Present, Invert: h.Invert})
				}
				src.Permissions = append(src.Permissions, model.IntentionPermission{Action: perm.Action, HTTP: m})
			}
			byName[s.Name] = authzSource{src, from}
		}
	}
	out := make([]authzSource, 0, len(byName))
	for _, s := range byName {
		out = append(out, s)
	}
	slices.SortFunc(out, func(a, b authzSource) int {
		switch {
		case a.Name == b.Name:
			return 0
		case a.Name == "*":
			return 1
		case b.Name == "*":
			return -1
		}
		return strings.Compare(a.Name, b.Name)
	})
	return out
}

// authzRules translates the authorization of destination into Envoy RBAC:
// rules to enforce and shadow rules that only name the rule behind a
// denial. As with Consul intentions the most specific source decides (the
// "*" principal excludes every named source), L7 permissions apply in order
// (each excludes the ones before it), and what no rule covers gets the
// default action. With default deny the rules are an ALLOW RBAC and the
// explicit denies its shadow; with default allow the reverse. The
// documents and Consul entries behind the rules are noted on n.
func authzRules(cat *model.Catalog, pol *policy.Set, destination string, http bool, n note) (rules, shadow *rbacv3.RBAC) {
	n.add(caSource("trust domain"))
	td := cat.CA.TrustDomain
	allow := &rbacv3.RBAC{Action: rbacv3.RBAC_ALLOW, Policies: map[string]*rbacv3.Policy{}}
	deny := &rbacv3.RBAC{Action: rbacv3.RBAC_DENY, Policies: map[string]*rbacv3.Policy{}}
	sources := authzSources(cat, pol, destination)
	var named []*rbacv3.Principal
	for _, s := range sources {
		if s.Name != "*" {
			named = append(named, sourcePrincipal(td, s.Name))
		}
	}
	add := func(action, name string, perm *rbacv3.Permission, who *rbacv3.Principal) {
		target := allow
		if action == policy.ActionDeny {
			target = deny
		}
		target.Policies[name] = &rbacv3.Policy{Permissions: []*rbacv3.Permission{perm}, Principals: []*rbacv3.Principal{who}}
	}
	for _, s := range sources {
		n.add(s.from)
		who := sourcePrincipal(td, s.Name)
		if s.Name == "*" && len(named) > 0 {
			who = &rbacv3.Principal{Identifier: &rbacv3.Principal_AndIds{AndIds: &rbacv3.Principal_Set{Ids: []*rbacv3.Principal{
				who, {Identifier: &rbacv3.Principal_NotId{NotId: orIDs(named)}},
			}}}}
		}
		switch {
		case s.Action != "":
			add(s.Action, s.Origin, anyPermission(), who)
		case !http:
			// L7 permissions cannot apply to a TCP service: fail closed.
			add(policy.ActionDeny, s.Origin+" (L7 permissions on a TCP service)", anyPermission(), who)
		default:
			var before []*rbacv3.Permission
			for k, p := range s.Permissions {
				m := httpPermission(p.HTTP)
				cond := m
				if len(before) > 0 {
					cond = andRules(m, &rbacv3.Permission{Rule: &rbacv3.Permission_NotRule{NotRule: orRules(before...)}})
				}
				add(p.Action, fmt.Sprintf("%s permissions[%d]", s.Origin, k), cond, who)
				before = append(before, m)
			}
		}
	}
	if defaultAction(pol, destination, n) == policy.ActionAllow {
		return deny, allow
	}
	return allow, deny
}

// sourcePrincipal matches the SPIFFE ID of a source service in any
// datacenter and namespace of the trust domain, or any identity of the
// trust domain for "*".
func sourcePrincipal(td, name string) *rbacv3.Principal {
	m := &matcher.StringMatcher{MatchPattern: &matcher.StringMatcher_Prefix{Prefix: "spiffe://" + td + "/"}}
	if name != "*" {
		m = &matcher.StringMatcher{MatchPattern: &matcher.StringMatcher_SafeRegex{SafeRegex: &matcher.RegexMatcher{
			Regex: "^spiffe://" + regexp.QuoteMeta(td) + "/ns/[^/]+/dc/[^/]+/svc/" + regexp.QuoteMeta(name) + "$",
		}}}
	}
	return &rbacv3.Principal{Identifier: &rbacv3.Principal_Authenticated_{Authenticated: &rbacv3.Principal_Authenticated{PrincipalName: m}}}
}

func orIDs(ids []*rbacv3.Principal) *rbacv3.Principal {
	if len(ids) == 1 {
		return ids[0]
	}
	return &rbacv3.Principal{Identifier: &rbacv3.Principal_OrIds{OrIds: &rbacv3.Principal_Set{Ids: ids}}}
}

func anyPermission() *rbacv3.Permission {
	return &rbacv3.Permission{Rule: &rbacv3.Permission_Any{Any: true}}
}

func andRules(ps ...*rbacv3.Permission) *rbacv3.Permission {
	if len(ps) == 1 {
		return ps[0]
	}
	return &rbacv3.Permission{Rule: &rbacv3.Permission_AndRules{AndRules: &rbacv3.Permission_Set{Rules: ps}}}
}

func orRules(ps ...*rbacv3.Permission) *rbacv3.Permission {
	if len(ps) == 1 {
		return ps[0]
	}
	return &rbacv3.Permission{Rule: &rbacv3.Permission_OrRules{OrRules: &rbacv3.Permission_Set{Rules: ps}}}
}

// httpPermission matches what m describes: path, any of the methods, all
// headers.
func httpPermission(m model.HTTPMatch) *rbacv3.Permission {
	var all []*rbacv3.Permission
	path := func(sm *matcher.StringMatcher) *rbacv3.Permission {
		return &rbacv3.Permission{Rule: &rbacv3.Permission_UrlPath{UrlPath: &matcher.PathMatcher{
			Rule: &matcher.PathMatcher_Path{Path: sm},
		}}}
	}
	switch {
	case m.PathExact != "":
		all = append(all, path(&matcher.StringMatcher{MatchPattern: &matcher.StringMatcher_Exact{Exact: m.PathExact}}))
	case m.PathPrefix != "":
		all = append(all, path(&matcher.StringMatcher{MatchPattern: &matcher.StringMatcher_Prefix{Prefix: m.PathPrefix}}))
	case m.PathRegex != "":
		all = append(all, path(&matcher.StringMatcher{MatchPattern: &matcher.StringMatcher_SafeRegex{SafeRegex: &matcher.RegexMatcher{Regex: m.PathRegex}}}))
	}
	if len(m.Methods) > 0 {
		var ms []*rbacv3.Permission
		for _, meth := range m.Methods {
			ms = append(ms, header(":method", &matcher.StringMatcher{MatchPattern: &matcher.StringMatcher_Exact{Exact: meth}}, false, false))
		}
		all = append(all, orRules(ms...))
	}
	for _, h := range m.Headers {
		var sm *matcher.StringMatcher
		switch {
		case h.Exact != "":
			sm = &matcher.StringMatcher{MatchPattern: &matcher.StringMatcher_Exact{Exact: h.Exact}}
		case h.Prefix != "":
			sm = &matcher.StringMatcher{MatchPattern: &matcher.StringMatcher_Prefix{Prefix: h.Prefix}}
		case h.Suffix != "":
			sm = &matcher.StringMatcher{MatchPattern: &matcher.StringMatcher_Suffix{Suffix: h.Suffix}}
		case h.Regex != "":
			sm = &matcher.StringMatcher{MatchPattern: &matcher.StringMatcher_SafeRegex{SafeRegex: &matcher.RegexMatcher{Regex: h.Regex}}}
		}
		all = append(all, header(h.Name, sm, h.Present, h.Invert))
	}
	if len(all) == 0 {
		return anyPermission()
	}
	return andRules(all...)
}

func header(name string, sm *matcher.StringMatcher, present, invert bool) *rbacv3.Permission {
	hm := &route.HeaderMatcher{Name: name, InvertMatch: invert}
	if sm != nil {
		hm.HeaderMatchSpecifier = &route.HeaderMatcher_StringMatch{StringMatch: sm}
	} else if present {
		hm.HeaderMatchSpecifier = &route.HeaderMatcher_PresentMatch{PresentMatch: true}
	}
	return &rbacv3.Permission{Rule: &rbacv3.Permission_Header{Header: hm}}
}
