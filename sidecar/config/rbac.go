package config

import (
	"errors"
	"fmt"
	"regexp"
	"slices"
	"strings"

	rbacv3 "github.com/envoyproxy/go-control-plane/envoy/config/rbac/v3"
	route "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	matcher "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
)

// RBACFilter is a decoded RBAC filter (envoy.filters.http.rbac or
// envoy.filters.network.rbac): the rules enforced and the shadow rules,
// which only name the rule behind a denial.
type RBACFilter struct {
	Rules  *RBAC
	Shadow *RBAC // may be nil
}

// RBACAction is what a matching policy means.
type RBACAction int

// RBAC actions.
const (
	RBACAllow RBACAction = iota // a request must match a policy
	RBACDeny                    // a request must match no policy
)

// RBAC is a decoded envoy.config.rbac.v3.RBAC with compiled matchers.
type RBAC struct {
	Action   RBACAction
	Policies []*RBACPolicy // sorted by name
}

// RBACPolicy matches when any permission and any principal match.
type RBACPolicy struct {
	Name        string
	permissions []rbacMatcher
	principals  []rbacMatcher
}

// RBACRequest is what authorization sees of a connection or request.
type RBACRequest struct {
	// Principal is the peer's SPIFFE ID, "" when not authenticated.
	Principal string
	// Method, Path (without query) and Header are empty for a TCP
	// connection.
	Method, Path, Authority string
	// Header gives the request's header values (an http.Header, or the
	// HTTP/1.1 fast path's parsed head); nil for a TCP connection.
	Header HeaderValues
}

// HeaderValues looks up the values of a request header by name,
// case-insensitively, as http.Header.Values does.
type HeaderValues interface {
	Values(name string) []string
}

// Matches reports whether r matches the policy.
func (p *RBACPolicy) Matches(r *RBACRequest) bool {
	return anyOf(p.permissions, r) && anyOf(p.principals, r)
}

type rbacMatcher = func(*RBACRequest) bool

func anyOf(fs []rbacMatcher, r *RBACRequest) bool {
	for _, f := range fs {
		if f(r) {
			return true
		}
	}
	return false
}

func allOf(fs []rbacMatcher) rbacMatcher {
	return func(r *RBACRequest) bool {
		for _, f := range fs {
			if !f(r) {
				return false
			}
		}
		return true
	}
}

// decodeEach decodes every item with decode, naming the failing one by
// field[i].
func decodeEach[T any](field string, items []T, decode func(T) (rbacMatcher, error)) ([]rbacMatcher, error) {
	out := make([]rbacMatcher, 0, len(items))
	for i, it := range items {
		f, err := decode(it)
		if err != nil {
			return nil, fmt.Errorf("%s[%d]: %w", field, i, err)
		}
		out = append(out, f)
	}
	return out, nil
}

// DefaultDenyRule names a denial no explicit rule made.
const DefaultDenyRule = "default deny"

// match returns the first policy (by name) matching r, or nil.
func (r *RBAC) match(req *RBACRequest) *RBACPolicy {
	if r == nil {
		return nil
	}
	for _, p := range r.Policies {
		if p.Matches(req) {
			return p
		}
	}
	return nil
}

// Decide applies the filter to req: whether it is allowed and, when not,
// the name of the rule that denied it (DefaultDenyRule when no explicit
// rule did).
func (f *RBACFilter) Decide(req *RBACRequest) (bool, string) {
	m := f.Rules.match(req)
	if f.Rules.Action == RBACDeny {
		if m != nil {
			return false, m.Name
		}
		return true, ""
	}
	if m != nil {
		return true, ""
	}
	if f.Shadow != nil && f.Shadow.Action == RBACDeny {
		if s := f.Shadow.match(req); s != nil {
			return false, s.Name
		}
	}
	return false, DefaultDenyRule
}

func decodeRBACFilter(rules, shadow *rbacv3.RBAC) (*RBACFilter, error) {
	f := &RBACFilter{}
	var err error
	if rules == nil {
		// Envoy: no rules means the filter allows everything.
		f.Rules = &RBAC{Action: RBACDeny}
	} else if f.Rules, err = decodeRBAC(rules); err != nil {
		return nil, fmt.Errorf("rules: %w", err)
	}
	if shadow != nil {
		if f.Shadow, err = decodeRBAC(shadow); err != nil {
			return nil, fmt.Errorf("shadow_rules: %w", err)
		}
	}
	return f, nil
}

func decodeRBAC(r *rbacv3.RBAC) (*RBAC, error) {
	out := &RBAC{}
	switch r.GetAction() {
	case rbacv3.RBAC_ALLOW:
		out.Action = RBACAllow
	case rbacv3.RBAC_DENY:
		out.Action = RBACDeny
	default:
		return nil, fmt.Errorf("action: only ALLOW and DENY are supported, not %s", r.GetAction())
	}
	if len(r.GetAuditLoggingOptions().GetLoggerConfigs()) > 0 {
		return nil, errors.New("audit loggers are not supported")
	}
	names := make([]string, 0, len(r.GetPolicies()))
	for n := range r.GetPolicies() {
		names = append(names, n)
	}
	slices.Sort(names)
	for _, n := range names {
		p := r.GetPolicies()[n]
		if p.GetCondition() != nil || p.GetCheckedCondition() != nil {
			return nil, fmt.Errorf("policies[%q]: conditions are not supported", n)
		}
		perms, err := decodeEach(fmt.Sprintf("policies[%q].permissions", n), p.GetPermissions(), decodePermission)
		if err != nil {
			return nil, err
		}
		principals, err := decodeEach(fmt.Sprintf("policies[%q].principals", n), p.GetPrincipals(), decodePrincipal)
		if err != nil {
			return nil, err
		}
		out.Policies = append(out.Policies, &RBACPolicy{Name: n, permissions: perms, principals: principals})
	}
	return out, nil
}

func decodePermission(p *rbacv3.Permission) (rbacMatcher, error) {
	switch r := p.GetRule().(type) {
	case *rbacv3.Permission_Any:
		return func(*RBACRequest) bool { return r.Any }, nil
	case *rbacv3.Permission_AndRules:
		fs, err := decodeEach("rules", r.AndRules.GetRules(), decodePermission)
		return allOf(fs), err
	case *rbacv3.Permission_OrRules:
		fs, err := decodeEach("rules", r.OrRules.GetRules(), decodePermission)
		return func(q *RBACRequest) bool { return anyOf(fs, q) }, err
	case *rbacv3.Permission_NotRule:
		f, err := decodePermission(r.NotRule)
		return func(q *RBACRequest) bool { return !f(q) }, err
	case *rbacv3.Permission_Header:
		return decodeHeaderPermission(r.Header)
	case *rbacv3.Permission_UrlPath:
		sm, ok := r.UrlPath.GetRule().(*matcher.PathMatcher_Path)
		if !ok {
			return nil, errors.New("url_path: only path is supported")
		}
		m, err := stringMatcher(sm.Path)
		return func(q *RBACRequest) bool { return m(q.Path) }, err
	}
	return nil, fmt.Errorf("unsupported permission %T (supported: any, and_rules, or_rules, not_rule, header, url_path)", p.GetRule())
}

func decodeHeaderPermission(h *route.HeaderMatcher) (rbacMatcher, error) {
	name := h.GetName()
	get := func(q *RBACRequest) (string, bool) {
		switch name {
		case ":method":
			return q.Method, q.Method != ""
		case ":path":
			return q.Path, q.Path != ""
		case ":authority", "host":
			return q.Authority, q.Authority != ""
		}
		if q.Header == nil {
			return "", false
		}
		vs := q.Header.Values(name)
		return strings.Join(vs, ","), len(vs) > 0
	}
	var test func(string, bool) bool
	switch s := h.GetHeaderMatchSpecifier().(type) {
	case *route.HeaderMatcher_PresentMatch:
		test = func(_ string, present bool) bool { return present == s.PresentMatch }
	case *route.HeaderMatcher_ExactMatch:
		//lint:ignore SA1019 Envoy still accepts it; we decode what control planes send
		test = func(v string, present bool) bool { return present && v == s.ExactMatch }
	case *route.HeaderMatcher_StringMatch:
		m, err := stringMatcher(s.StringMatch)
		if err != nil {
			return nil, err
		}
		test = func(v string, present bool) bool { return present && m(v) }
	default:
		return nil, errors.New("header: only present, exact and string matches are supported")
	}
	invert := h.GetInvertMatch()
	return func(q *RBACRequest) bool {
		v, present := get(q)
		return test(v, present) != invert
	}, nil
}

func decodePrincipal(p *rbacv3.Principal) (rbacMatcher, error) {
	switch id := p.GetIdentifier().(type) {
	case *rbacv3.Principal_Any:
		return func(*RBACRequest) bool { return id.Any }, nil
	case *rbacv3.Principal_Authenticated_:
		if id.Authenticated.GetPrincipalName() == nil {
			return func(q *RBACRequest) bool { return q.Principal != "" }, nil
		}
		m, err := stringMatcher(id.Authenticated.GetPrincipalName())
		return func(q *RBACRequest) bool { return q.Principal != "" && m(q.Principal) }, err
	case *rbacv3.Principal_AndIds:
		fs, err := decodeEach("ids", id.AndIds.GetIds(), decodePrincipal)
		return allOf(fs), err
	case *rbacv3.Principal_OrIds:
		fs, err := decodeEach("ids", id.OrIds.GetIds(), decodePrincipal)
		return func(q *RBACRequest) bool { return anyOf(fs, q) }, err
	case *rbacv3.Principal_NotId:
		f, err := decodePrincipal(id.NotId)
		return func(q *RBACRequest) bool { return !f(q) }, err
	}
	return nil, fmt.Errorf("unsupported principal %T (supported: any, authenticated, and_ids, or_ids, not_id)", p.GetIdentifier())
}

// stringMatcher compiles an Envoy StringMatcher; safe_regex uses Go's RE2
// engine, the syntax Envoy's safe_regex also uses.
func stringMatcher(m *matcher.StringMatcher) (func(string) bool, error) {
	fold := m.GetIgnoreCase()
	norm := func(s string) string {
		if fold {
			return strings.ToLower(s)
		}
		return s
	}
	switch p := m.GetMatchPattern().(type) {
	case *matcher.StringMatcher_Exact:
		want := norm(p.Exact)
		return func(s string) bool { return norm(s) == want }, nil
	case *matcher.StringMatcher_Prefix:
		want := norm(p.Prefix)
		return func(s string) bool { return strings.HasPrefix(norm(s), want) }, nil
	case *matcher.StringMatcher_Suffix:
		want := norm(p.Suffix)
		return func(s string) bool { return strings.HasSuffix(norm(s), want) }, nil
	case *matcher.StringMatcher_Contains:
		want := norm(p.Contains)
		return func(s string) bool { return strings.Contains(norm(s), want) }, nil
	case *matcher.StringMatcher_SafeRegex:
		re, err := regexp.Compile(p.SafeRegex.GetRegex())
		if err != nil {
			return nil, fmt.Errorf("safe_regex %q: %w", p.SafeRegex.GetRegex(), err)
		}
		return func(s string) bool {
			// Envoy's safe_regex must match the whole string.
			loc := re.FindStringIndex(s)
			return loc != nil && loc[0] == 0 && loc[1] == len(s)
		}, nil
	}
	return nil, errors.New("unsupported string matcher")
}
