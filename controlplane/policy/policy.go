// Package policy loads, validates and watches meshlet policy files: YAML
// documents shaped like Kubernetes objects (apiVersion, kind, metadata, spec),
// one or more per file, in one directory. Errors name the file, the line and
// the field; a directory is applied as a whole or not at all.
package policy

import (
	"fmt"
	"slices"
	"strings"

	"github.com/meshlet/meshlet/xds"
)

// APIVersion is the apiVersion every policy document must carry.
const APIVersion = "meshlet.io/v1alpha1"

// Kinds of policy documents.
const (
	// KindServiceDefaults sets per-service defaults (today: the protocol),
	// like Consul's service-defaults config entry.
	KindServiceDefaults = "ServiceDefaults"
)

// Source locates a policy document: the file it came from and the line of
// its first key. It is carried into xDS resource metadata so a rejected
// resource can be traced back to its file.
type Source struct {
	File string
	Line int
}

// String returns "file:line".
func (s Source) String() string { return fmt.Sprintf("%s:%d", s.File, s.Line) }

// Metadata is the metadata block of a document.
type Metadata struct {
	// Name identifies the document within its kind; required, unique per
	// kind across the directory.
	Name string `yaml:"name"`
	// Labels are free-form and not interpreted.
	Labels map[string]string `yaml:"labels,omitempty"`
}

// ServiceDefaults is the spec of a ServiceDefaults document:
//
//	apiVersion: meshlet.io/v1alpha1
//	kind: ServiceDefaults
//	metadata: {name: api}
//	spec:
//	  service: api     # required: the service these defaults apply to
//	  protocol: http   # tcp (default) | http | http2 | grpc | udp
//	  mtlsMode: strict # strict | permissive (default: MeshDefaults, else strict)
//
// A protocol set here overrides the service meta "protocol" in Consul.
type ServiceDefaults struct {
	// Service is the Consul service name the defaults apply to. Required.
	Service string `yaml:"service"`
	// Protocol is tcp, http, http2, grpc or udp (plaintext between the
	// sidecars: no mTLS and no authorization for UDP). Empty leaves the
	// protocol to Consul service meta (default tcp).
	Protocol string `yaml:"protocol,omitempty"`
	// MTLSMode is strict or permissive for the service's inbound listener;
	// empty follows MeshDefaults (Consul: service-defaults MutualTLSMode).
	MTLSMode string `yaml:"mtlsMode,omitempty"`

	// Source is where the document was read from (set by the loader).
	Source Source `yaml:"-"`
	// Name is metadata.name (set by the loader).
	Name string `yaml:"-"`
}

func (d *ServiceDefaults) validate(v *validator) {
	if d.Service == "" {
		v.errorf("spec.service", "required: the service name these defaults apply to")
	}
	if d.Protocol != "" {
		if _, ok := xds.ParseProtocol(d.Protocol); !ok {
			v.errorf("spec.protocol", "unsupported protocol %q (want tcp, http, http2, grpc or udp)", d.Protocol)
		}
	}
	validMode(v, "spec.mtlsMode", d.MTLSMode)
}

// Set is a validated set of policies, the whole content of a policy
// directory. The zero value (no policies) is valid, and so is a nil *Set. A
// Set is immutable once returned by Load or Parse.
type Set struct {
	// ServiceDefaults by service name.
	ServiceDefaults map[string]*ServiceDefaults
	// Retries and Timeouts by destination service: at most one per distinct
	// match (Match.Key), in file order.
	Retries  map[string][]*RetryPolicy
	Timeouts map[string][]*TimeoutPolicy
	// Service-wide policies by destination service.
	CircuitBreakers   map[string]*CircuitBreakerPolicy
	OutlierDetections map[string]*OutlierDetectionPolicy
	LoadBalancers     map[string]*LoadBalancerPolicy
	// Authorizations by destination service.
	Authorizations map[string]*AuthorizationPolicy
	// Mesh is the MeshDefaults document, nil when there is none.
	Mesh *MeshDefaults
	// Files lists the files the set was read from, sorted.
	Files []string

	// defaultCollector is the OTLP collector when MeshDefaults names none
	// (WithDefaultCollector).
	defaultCollector *Collector
}

func newSet() *Set {
	return &Set{
		ServiceDefaults:   map[string]*ServiceDefaults{},
		Retries:           map[string][]*RetryPolicy{},
		Timeouts:          map[string][]*TimeoutPolicy{},
		CircuitBreakers:   map[string]*CircuitBreakerPolicy{},
		OutlierDetections: map[string]*OutlierDetectionPolicy{},
		LoadBalancers:     map[string]*LoadBalancerPolicy{},
		Authorizations:    map[string]*AuthorizationPolicy{},
	}
}

// spec is implemented by every kind's spec type.
type spec interface {
	validate(*validator)
	// add records the validated document in set, reporting conflicts with
	// documents already there.
	add(set *Set, v *validator)
}

// kinds maps each kind to a constructor of its spec.
var kinds = map[string]func(name string, src Source) spec{
	KindServiceDefaults:        func(n string, s Source) spec { return &ServiceDefaults{Name: n, Source: s} },
	KindRetryPolicy:            func(n string, s Source) spec { return &RetryPolicy{Name: n, Source: s} },
	KindTimeoutPolicy:          func(n string, s Source) spec { return &TimeoutPolicy{Name: n, Source: s} },
	KindCircuitBreakerPolicy:   func(n string, s Source) spec { return &CircuitBreakerPolicy{Name: n, Source: s} },
	KindOutlierDetectionPolicy: func(n string, s Source) spec { return &OutlierDetectionPolicy{Name: n, Source: s} },
	KindLoadBalancerPolicy:     func(n string, s Source) spec { return &LoadBalancerPolicy{Name: n, Source: s} },
	KindMeshDefaults:           func(n string, s Source) spec { return &MeshDefaults{Name: n, Source: s} },
	KindAuthorizationPolicy:    func(n string, s Source) spec { return &AuthorizationPolicy{Name: n, Source: s} },
}

func kindNames() []string {
	out := make([]string, 0, len(kinds))
	for k := range kinds {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}

func (d *ServiceDefaults) add(set *Set, v *validator) {
	d.Protocol = strings.ToLower(d.Protocol)
	if prev, ok := set.ServiceDefaults[d.Service]; ok {
		v.errorf("spec.service", "service %q already has ServiceDefaults %q at %s", d.Service, prev.Name, prev.Source)
		return
	}
	set.ServiceDefaults[d.Service] = d
}

func (p *RetryPolicy) add(set *Set, v *validator) {
	for _, prev := range set.Retries[p.Service] {
		if prev.Match.Key() == p.Match.Key() {
			v.errorf(conflictField(p.Match), "service %q already has RetryPolicy %q for the same match at %s", p.Service, prev.Name, prev.Source)
			return
		}
	}
	set.Retries[p.Service] = append(set.Retries[p.Service], p)
}

func (p *TimeoutPolicy) add(set *Set, v *validator) {
	for _, prev := range set.Timeouts[p.Service] {
		if prev.Match.Key() == p.Match.Key() {
			v.errorf(conflictField(p.Match), "service %q already has TimeoutPolicy %q for the same match at %s", p.Service, prev.Name, prev.Source)
			return
		}
	}
	set.Timeouts[p.Service] = append(set.Timeouts[p.Service], p)
}

func conflictField(m *Match) string {
	if m == nil {
		return "spec.service"
	}
	return "spec.match"
}

func (p *CircuitBreakerPolicy) add(set *Set, v *validator) {
	addOne(set.CircuitBreakers, p.Service, p, KindCircuitBreakerPolicy, v, func(q *CircuitBreakerPolicy) (string, Source) { return q.Name, q.Source })
}

func (p *OutlierDetectionPolicy) add(set *Set, v *validator) {
	addOne(set.OutlierDetections, p.Service, p, KindOutlierDetectionPolicy, v, func(q *OutlierDetectionPolicy) (string, Source) { return q.Name, q.Source })
}

func (p *LoadBalancerPolicy) add(set *Set, v *validator) {
	addOne(set.LoadBalancers, p.Service, p, KindLoadBalancerPolicy, v, func(q *LoadBalancerPolicy) (string, Source) { return q.Name, q.Source })
}

// addOne adds a service-wide policy, one per service and kind.
func addOne[T any](m map[string]T, service string, p T, kind string, v *validator, id func(T) (string, Source)) {
	if prev, ok := m[service]; ok {
		pn, ps := id(prev)
		v.errorf("spec.service", "service %q already has %s %q at %s", service, kind, pn, ps)
		return
	}
	m[service] = p
}

// RetriesFor returns the RetryPolicy documents of service (nil-safe).
func (s *Set) RetriesFor(service string) []*RetryPolicy {
	if s == nil {
		return nil
	}
	return s.Retries[service]
}

// TimeoutsFor returns the TimeoutPolicy documents of service (nil-safe).
func (s *Set) TimeoutsFor(service string) []*TimeoutPolicy {
	if s == nil {
		return nil
	}
	return s.Timeouts[service]
}

// CircuitBreaker returns the CircuitBreakerPolicy of service, or nil.
func (s *Set) CircuitBreaker(service string) *CircuitBreakerPolicy {
	if s == nil {
		return nil
	}
	return s.CircuitBreakers[service]
}

// OutlierDetection returns the OutlierDetectionPolicy of service, or nil.
func (s *Set) OutlierDetection(service string) *OutlierDetectionPolicy {
	if s == nil {
		return nil
	}
	return s.OutlierDetections[service]
}

// LoadBalancer returns the LoadBalancerPolicy of service, or nil.
func (s *Set) LoadBalancer(service string) *LoadBalancerPolicy {
	if s == nil {
		return nil
	}
	return s.LoadBalancers[service]
}

// Summary counts the documents by kind, e.g. "3 ServiceDefaults, 2
// RetryPolicy", or "no policies".
func (s *Set) Summary() string {
	if s == nil {
		return "no policies"
	}
	retries, timeouts := 0, 0
	for _, l := range s.Retries {
		retries += len(l)
	}
	for _, l := range s.Timeouts {
		timeouts += len(l)
	}
	var parts []string
	for _, c := range []struct {
		kind string
		n    int
	}{
		{KindServiceDefaults, len(s.ServiceDefaults)}, {KindRetryPolicy, retries}, {KindTimeoutPolicy, timeouts},
		{KindCircuitBreakerPolicy, len(s.CircuitBreakers)}, {KindOutlierDetectionPolicy, len(s.OutlierDetections)},
		{KindLoadBalancerPolicy, len(s.LoadBalancers)}, {KindAuthorizationPolicy, len(s.Authorizations)},
		{KindMeshDefaults, boolCount(s.Mesh != nil)},
	} {
		if c.n > 0 {
			parts = append(parts, fmt.Sprintf("%d %s", c.n, c.kind))
		}
	}
	if len(parts) == 0 {
		return "no policies"
	}
	return strings.Join(parts, ", ")
}

func boolCount(b bool) int {
	if b {
		return 1
	}
	return 0
}

// Protocol returns the protocol a policy declares for service, and false
// when none does.
func (s *Set) Protocol(service string) (xds.Protocol, bool) {
	if s == nil {
		return "", false
	}
	d, ok := s.ServiceDefaults[service]
	if !ok || d.Protocol == "" {
		return "", false
	}
	p, _ := xds.ParseProtocol(d.Protocol)
	return p, true
}

// Error is one problem in a policy file.
type Error struct {
	File  string // path as given to Load
	Line  int    // 1-based; 0 when the problem has no line (an unreadable file)
	Field string // dotted path such as "spec.protocol"; "" for a syntax error
	Msg   string
}

// Error returns "file:line: field: message".
func (e *Error) Error() string {
	var b strings.Builder
	b.WriteString(e.File)
	if e.Line > 0 {
		fmt.Fprintf(&b, ":%d", e.Line)
	}
	b.WriteString(": ")
	if e.Field != "" {
		b.WriteString(e.Field)
		b.WriteString(": ")
	}
	b.WriteString(e.Msg)
	return b.String()
}

// Errors is every problem found in one load, in file and line order. Load
// returns it as its error.
type Errors []*Error

// Error joins the problems one per line.
func (es Errors) Error() string {
	lines := make([]string, len(es))
	for i, e := range es {
		lines[i] = e.Error()
	}
	return strings.Join(lines, "\n")
}
