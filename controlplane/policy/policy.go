// Package policy loads, validates and watches meshlet policy files: YAML
// documents shaped like Kubernetes objects (apiVersion, kind, metadata, spec),
// one or more per file, in one directory. Errors name the file, the line and
// the field; a directory is applied as a whole or not at all.
package policy

import (
	"fmt"
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
//	  protocol: http   # tcp (default) | http | http2 | grpc
//
// A protocol set here overrides the service meta "protocol" in Consul.
type ServiceDefaults struct {
	// Service is the Consul service name the defaults apply to. Required.
	Service string `yaml:"service"`
	// Protocol is tcp, http, http2 or grpc. Empty leaves the protocol to
	// Consul service meta (default tcp).
	Protocol string `yaml:"protocol,omitempty"`

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
			v.errorf("spec.protocol", "unsupported protocol %q (want tcp, http, http2 or grpc)", d.Protocol)
		}
	}
}

// Set is a validated set of policies, the whole content of a policy
// directory. The zero value (no policies) is valid. A Set is immutable once
// returned by Load.
type Set struct {
	// ServiceDefaults by service name.
	ServiceDefaults map[string]*ServiceDefaults
	// Files lists the files the set was read from, sorted.
	Files []string
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
