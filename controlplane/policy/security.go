package policy

import (
	"fmt"
	"slices"
	"strings"

	"k8s.io/apimachinery/pkg/util/validation"
)

// Kinds of security policy documents.
const (
	// KindMeshDefaults sets mesh-wide mTLS and authorization defaults; at
	// most one per policy directory.
	KindMeshDefaults = "MeshDefaults"
	// KindAuthorizationPolicy controls which services may call a
	// destination, shaped like a Consul service-intentions config entry.
	KindAuthorizationPolicy = "AuthorizationPolicy"
)

// mTLS modes (Consul's MutualTLSMode).
const (
	// MTLSStrict: the inbound listener accepts only mTLS (default).
	MTLSStrict = "strict"
	// MTLSPermissive: the inbound listener also accepts plaintext, for
	// migrating services into the mesh; plaintext requests carry no
	// identity and skip authorization.
	MTLSPermissive = "permissive"
)

// Authorization actions.
const (
	ActionAllow = "allow"
	ActionDeny  = "deny"
)

// MeshDefaults is the spec of the MeshDefaults document:
//
//	apiVersion: meshlet.io/v1alpha1
//	kind: MeshDefaults
//	metadata: {name: mesh}
//	spec:
//	  mtls:
//	    mode: strict            # strict (default) | permissive
//	    minTLSVersion: "1.3"    # "1.3" (default) | "1.2"
//	  authorization:
//	    defaultAction: deny     # deny (default in strict mode) | allow (default in permissive mode)
//	  tracing:                  # see MeshTracing
//	    sampling: 1             # percent of new traces (default 1)
//	    propagation: [tracecontext, b3multi]
//	    collector: {protocol: grpc, endpoint: "127.0.0.1:4317"}
//	  outbound: allow-any       # transparent proxies: a connection to an address no upstream
//	                            # matches passes through to it (allow-any, default; Istio's
//	                            # ALLOW_ANY) or is refused (registry-only; Istio's REGISTRY_ONLY)
//	  serviceAccounts:          # Kubernetes: ServiceAccounts that may act as other services
//	    - serviceAccount: default   # required: a ServiceAccount name (DNS-1123 subdomain)
//	      namespace: shop           # optional: the ServiceAccount's namespace; every namespace when empty
//	      services: [api]           # required: the services (DNS-1123 labels) its pods may register as
//
// ServiceDefaults.mtlsMode overrides the mode per service, and
// AuthorizationPolicy.defaultAction the default action per destination.
//
// On Kubernetes a sidecar's identity is its pod's ServiceAccount: the
// injection webhook refuses a pod whose service (the Service selecting it,
// or its meshlet.io/service annotation) is not its ServiceAccount's name,
// unless serviceAccounts maps that ServiceAccount to that service
// (Set.ServiceAccountMayActAs). Istio binds identities to ServiceAccounts
// the same way (spiffe://<domain>/ns/<ns>/sa/<sa>); consul-k8s requires the
// ServiceAccount to be named like the service.
type MeshDefaults struct {
	MTLS          *MeshMTLS          `yaml:"mtls,omitempty"`
	Authorization *MeshAuthorization `yaml:"authorization,omitempty"`
	Tracing       *MeshTracing       `yaml:"tracing,omitempty"`
	Outbound      string             `yaml:"outbound,omitempty"`
	// ServiceAccounts lets Kubernetes ServiceAccounts act as services
	// other than the one of their own name; empty: none may.
	ServiceAccounts []ServiceAccountBinding `yaml:"serviceAccounts,omitempty"`

	Source Source `yaml:"-"`
	Name   string `yaml:"-"`
}

// MeshMTLS is MeshDefaults.mtls.
type MeshMTLS struct {
	Mode          string `yaml:"mode,omitempty"`
	MinTLSVersion string `yaml:"minTLSVersion,omitempty"`
}

// MeshAuthorization is MeshDefaults.authorization.
type MeshAuthorization struct {
	DefaultAction string `yaml:"defaultAction,omitempty"`
}

// ServiceAccountBinding is one entry of MeshDefaults.serviceAccounts: the
// pods running as ServiceAccount in Namespace may register as (and so get
// the identity of) each of Services, besides the service named like the
// ServiceAccount.
type ServiceAccountBinding struct {
	// Namespace is the ServiceAccount's namespace (a DNS-1123 label);
	// empty binds the ServiceAccount of that name in every namespace.
	Namespace string `yaml:"namespace,omitempty"`
	// ServiceAccount is the ServiceAccount's name (a DNS-1123 subdomain,
	// as Kubernetes requires). Required.
	ServiceAccount string `yaml:"serviceAccount"`
	// Services are the service names (DNS-1123 labels, as
	// meshlet.io/service takes) the ServiceAccount may act as; at least
	// one, no duplicates.
	Services []string `yaml:"services"`
}

func (m *MeshDefaults) validate(v *validator) {
	if t := m.MTLS; t != nil {
		validMode(v, "spec.mtls.mode", t.Mode)
		switch t.MinTLSVersion {
		case "", "1.2", "1.3":
		default:
			v.errorf("spec.mtls.minTLSVersion", "must be \"1.2\" or \"1.3\" (got %q)", t.MinTLSVersion)
		}
	}
	if a := m.Authorization; a != nil {
		validAction(v, "spec.authorization.defaultAction", a.DefaultAction, true)
	}
	if t := m.Tracing; t != nil {
		t.validate(v, "spec.tracing")
	}
	switch m.Outbound {
	case "", OutboundAllowAny, OutboundRegistryOnly:
	default:
		v.errorf("spec.outbound", "must be %q or %q (got %q)", OutboundAllowAny, OutboundRegistryOnly, m.Outbound)
	}
	validBindings(v, m.ServiceAccounts)
}

// validBindings checks MeshDefaults.serviceAccounts: names Kubernetes
// accepts, at least one service each, no (namespace, serviceAccount) pair
// twice and no service twice in one entry.
func validBindings(v *validator, bindings []ServiceAccountBinding) {
	seen := map[[2]string]int{}
	for i, b := range bindings {
		f := fmt.Sprintf("spec.serviceAccounts[%d]", i)
		if b.Namespace != "" {
			if errs := validation.IsDNS1123Label(b.Namespace); len(errs) > 0 {
				v.errorf(f+".namespace", "%q is not a namespace name: %s", b.Namespace, strings.Join(errs, "; "))
			}
		}
		if b.ServiceAccount == "" {
			v.errorf(f+".serviceAccount", "required: the ServiceAccount's name")
		} else if errs := validation.IsDNS1123Subdomain(b.ServiceAccount); len(errs) > 0 {
			v.errorf(f+".serviceAccount", "%q is not a ServiceAccount name: %s", b.ServiceAccount, strings.Join(errs, "; "))
		}
		key := [2]string{b.Namespace, b.ServiceAccount}
		if j, dup := seen[key]; dup {
			where := "every namespace"
			if b.Namespace != "" {
				where = "namespace " + b.Namespace
			}
			v.errorf(f+".serviceAccount", "ServiceAccount %q of %s is already listed at spec.serviceAccounts[%d]: list all its services there", b.ServiceAccount, where, j)
		} else {
			seen[key] = i
		}
		if len(b.Services) == 0 {
			v.errorf(f+".services", "required: at least one service the ServiceAccount may act as")
		}
		for k, svc := range b.Services {
			sf := fmt.Sprintf("%s.services[%d]", f, k)
			if errs := validation.IsDNS1123Label(svc); len(errs) > 0 {
				v.errorf(sf, "%q is not a service name: %s", svc, strings.Join(errs, "; "))
			}
			if j := slices.Index(b.Services, svc); j < k {
				v.errorf(sf, "service %q is already listed at %s.services[%d]", svc, f, j)
			}
		}
	}
}

// ServiceAccountMayActAs reports whether a Kubernetes pod of namespace
// running as serviceAccount may register as service: when service is the
// ServiceAccount's own name, or when a MeshDefaults spec.serviceAccounts
// entry for that ServiceAccount, in namespace or in every namespace, lists
// service. False when either name is empty. Nil-safe (a nil Set allows
// name equality only).
func (s *Set) ServiceAccountMayActAs(namespace, serviceAccount, service string) bool {
	if service == "" || serviceAccount == "" {
		return false
	}
	if service == serviceAccount {
		return true
	}
	if s == nil || s.Mesh == nil {
		return false
	}
	for _, b := range s.Mesh.ServiceAccounts {
		if b.ServiceAccount == serviceAccount && (b.Namespace == "" || b.Namespace == namespace) && slices.Contains(b.Services, service) {
			return true
		}
	}
	return false
}

// Outbound modes of MeshDefaults.outbound.
const (
	OutboundAllowAny     = "allow-any"
	OutboundRegistryOnly = "registry-only"
)

// OutboundMode returns MeshDefaults.outbound, OutboundAllowAny by default.
func (s *Set) OutboundMode() string {
	if s != nil && s.Mesh != nil && s.Mesh.Outbound != "" {
		return s.Mesh.Outbound
	}
	return OutboundAllowAny
}

func (m *MeshDefaults) add(set *Set, v *validator) {
	if prev := set.Mesh; prev != nil {
		v.errorf("kind", "only one MeshDefaults document is allowed; %q is already defined at %s", prev.Name, prev.Source)
		return
	}
	set.Mesh = m
}

func validMode(v *validator, field, mode string) {
	switch mode {
	case "", MTLSStrict, MTLSPermissive:
	default:
		v.errorf(field, "must be %s or %s (got %q)", MTLSStrict, MTLSPermissive, mode)
	}
}

func validAction(v *validator, field, action string, optional bool) {
	switch action {
	case ActionAllow, ActionDeny:
	case "":
		if !optional {
			v.errorf(field, "required: %s or %s", ActionAllow, ActionDeny)
		}
	default:
		v.errorf(field, "must be %s or %s (got %q)", ActionAllow, ActionDeny, action)
	}
}

// AuthorizationPolicy is the spec of an AuthorizationPolicy document, the
// policy-file twin of a Consul service-intentions config entry:
//
//	spec:
//	  service: api                 # the destination
//	  defaultAction: deny          # optional: overrides MeshDefaults for this destination
//	  sources:
//	    - name: web                # a source service, or "*" for any other
//	      action: allow            # L4: the whole connection or request
//	    - name: admin
//	      permissions:             # L7 (HTTP services): the first match decides
//	        - action: allow
//	          http:
//	            pathPrefix: /admin # or pathExact
//	            methods: [GET]
//	            headers: [{name: x-role, exact: ops}]   # exact, prefix, suffix or present; invert
//	        - action: deny
//	          http: {pathPrefix: /}
//
// As with intentions, the most specific source decides (a named source over
// "*"); a source has either an action (L4) or permissions (L7); requests no
// permission matches, and callers no source matches, get the default action.
// A source also named by a Consul intention for the same destination is
// decided by this policy.
type AuthorizationPolicy struct {
	Service       string                `yaml:"service"`
	DefaultAction string                `yaml:"defaultAction,omitempty"`
	Sources       []AuthorizationSource `yaml:"sources"`

	Source Source `yaml:"-"`
	Name   string `yaml:"-"`
}

// AuthorizationSource is one source of an AuthorizationPolicy.
type AuthorizationSource struct {
	Name        string                    `yaml:"name"`
	Action      string                    `yaml:"action,omitempty"`
	Permissions []AuthorizationPermission `yaml:"permissions,omitempty"`
}

// AuthorizationPermission is one L7 permission.
type AuthorizationPermission struct {
	Action string     `yaml:"action"`
	HTTP   *HTTPMatch `yaml:"http"`
}

// HTTPMatch matches HTTP requests (Consul IntentionHTTPPermission).
type HTTPMatch struct {
	PathExact  string        `yaml:"pathExact,omitempty"`
	PathPrefix string        `yaml:"pathPrefix,omitempty"`
	Methods    []string      `yaml:"methods,omitempty"`
	Headers    []HeaderMatch `yaml:"headers,omitempty"`
}

// HeaderMatch matches one request header: exactly one of Exact, Prefix,
// Suffix or Present; Invert negates it.
type HeaderMatch struct {
	Name    string `yaml:"name"`
	Exact   string `yaml:"exact,omitempty"`
	Prefix  string `yaml:"prefix,omitempty"`
	Suffix  string `yaml:"suffix,omitempty"`
	Present bool   `yaml:"present,omitempty"`
	Invert  bool   `yaml:"invert,omitempty"`
}

func (p *AuthorizationPolicy) validate(v *validator) {
	requireService(v, p.Service)
	validAction(v, "spec.defaultAction", p.DefaultAction, true)
	if len(p.Sources) == 0 {
		v.errorf("spec.sources", "required: at least one source")
	}
	seen := map[string]int{}
	for i, s := range p.Sources {
		f := fmt.Sprintf("spec.sources[%d]", i)
		switch {
		case s.Name == "":
			v.errorf(f+".name", "required: a service name or \"*\"")
		case s.Name != "*" && strings.ContainsAny(s.Name, "*/ "):
			v.errorf(f+".name", "must be a service name or exactly \"*\" (got %q)", s.Name)
		}
		if j, dup := seen[s.Name]; dup {
			v.errorf(f+".name", "source %q is already listed at spec.sources[%d]", s.Name, j)
		}
		seen[s.Name] = i
		switch {
		case s.Action != "" && len(s.Permissions) > 0:
			v.errorf(f, "set action (L4) or permissions (L7), not both")
		case s.Action == "" && len(s.Permissions) == 0:
			v.errorf(f, "set action (L4) or permissions (L7)")
		}
		validAction(v, f+".action", s.Action, true)
		for k, perm := range s.Permissions {
			pf := fmt.Sprintf("%s.permissions[%d]", f, k)
			validAction(v, pf+".action", perm.Action, false)
			if perm.HTTP == nil {
				v.errorf(pf+".http", "required: what requests the permission matches")
				continue
			}
			perm.HTTP.validate(v, pf+".http")
		}
	}
}

func (m *HTTPMatch) validate(v *validator, field string) {
	if m.PathExact != "" && m.PathPrefix != "" {
		v.errorf(field, "set pathExact or pathPrefix, not both")
	}
	for _, f := range []struct{ name, val string }{{"pathExact", m.PathExact}, {"pathPrefix", m.PathPrefix}} {
		if f.val != "" && !strings.HasPrefix(f.val, "/") {
			v.errorf(field+"."+f.name, "must start with \"/\" (got %q)", f.val)
		}
	}
	for i, meth := range m.Methods {
		if meth == "" || strings.ToUpper(meth) != meth {
			v.errorf(fmt.Sprintf("%s.methods[%d]", field, i), "must be an uppercase method token like GET (got %q)", meth)
		}
	}
	for i, h := range m.Headers {
		hf := fmt.Sprintf("%s.headers[%d]", field, i)
		if h.Name == "" {
			v.errorf(hf+".name", "required")
		}
		n := 0
		for _, set := range []bool{h.Exact != "", h.Prefix != "", h.Suffix != "", h.Present} {
			if set {
				n++
			}
		}
		if n != 1 {
			v.errorf(hf, "set exactly one of exact, prefix, suffix or present")
		}
	}
	if m.PathExact == "" && m.PathPrefix == "" && len(m.Methods) == 0 && len(m.Headers) == 0 {
		v.errorf(field, "matches nothing specific: set a path, methods or headers")
	}
}

func (p *AuthorizationPolicy) add(set *Set, v *validator) {
	addOne(set.Authorizations, p.Service, p, KindAuthorizationPolicy, v, func(q *AuthorizationPolicy) (string, Source) { return q.Name, q.Source })
}

// MTLSMode returns the mTLS mode of service: ServiceDefaults.mtlsMode, else
// MeshDefaults, else strict.
func (s *Set) MTLSMode(service string) string {
	if s != nil {
		if d := s.ServiceDefaults[service]; d != nil && d.MTLSMode != "" {
			return d.MTLSMode
		}
		if s.Mesh != nil && s.Mesh.MTLS != nil && s.Mesh.MTLS.Mode != "" {
			return s.Mesh.MTLS.Mode
		}
	}
	return MTLSStrict
}

// MinTLSVersion returns "1.2" or "1.3" (default).
func (s *Set) MinTLSVersion() string {
	if s != nil && s.Mesh != nil && s.Mesh.MTLS != nil && s.Mesh.MTLS.MinTLSVersion != "" {
		return s.Mesh.MTLS.MinTLSVersion
	}
	return "1.3"
}

// DefaultAction returns the authorization default for destination:
// AuthorizationPolicy.defaultAction, else MeshDefaults, else deny in strict
// mode and allow in permissive mode.
func (s *Set) DefaultAction(destination string) string {
	if s != nil {
		if p := s.Authorizations[destination]; p != nil && p.DefaultAction != "" {
			return p.DefaultAction
		}
		if s.Mesh != nil && s.Mesh.Authorization != nil && s.Mesh.Authorization.DefaultAction != "" {
			return s.Mesh.Authorization.DefaultAction
		}
	}
	if s.MTLSMode(destination) == MTLSPermissive {
		return ActionAllow
	}
	return ActionDeny
}

// Authorization returns the AuthorizationPolicy of destination, or nil.
func (s *Set) Authorization(destination string) *AuthorizationPolicy {
	if s == nil {
		return nil
	}
	return s.Authorizations[destination]
}
