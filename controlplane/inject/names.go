package inject

import (
	"fmt"
	"strings"

	"k8s.io/apimachinery/pkg/util/validation"
)

// ServiceNames is how a Kubernetes Service (namespace, name) is named in
// Consul, where the mesh's services, identities (SPIFFE IDs), intentions
// and endpoints live. Consul CE has no namespaces, so the Kubernetes one
// goes into the name, or is dropped.
type ServiceNames string

const (
	// NamespacedNames (the default): "<name>.<namespace>", e.g. api.shop —
	// the Kubernetes DNS short form. Namespaces are boundaries: web in
	// staging and web in prod are two Consul services, two SPIFFE IDs
	// (…/svc/web.staging), two sets of intentions and endpoints. A dot
	// cannot appear in either part (DNS-1035 and DNS-1123 labels), so no
	// two Services share a name; Consul's DNS interface cannot look these
	// names up (meshlet does not use it). consul-k8s's
	// addK8SNamespaceSuffix does the same with a dash, which can collide.
	NamespacedNames ServiceNames = "namespaced"
	// FlatNames: "<name>", every namespace's Service of a name being one
	// Consul service (consul-k8s CE's default). Risk: web in staging and
	// web in prod share an identity, intentions and endpoints: a staging
	// pod is an endpoint of prod's callers and holds prod's certificate.
	FlatNames ServiceNames = "flat"
)

// Validate reports an unknown mode.
func (m ServiceNames) Validate() error {
	switch m {
	case NamespacedNames, FlatNames:
		return nil
	}
	return fmt.Errorf("inject: service names %q: want %s or %s", string(m), NamespacedNames, FlatNames)
}

// orDefault is m, or NamespacedNames when unset.
func (m ServiceNames) orDefault() ServiceNames {
	if m == "" {
		return NamespacedNames
	}
	return m
}

// Consul returns the Consul service name of Service name in namespace.
func (m ServiceNames) Consul(namespace, name string) string {
	if m.orDefault() == FlatNames {
		return name
	}
	return name + "." + namespace
}

// Kubernetes returns the Kubernetes Service name of Consul service consul
// as seen from namespace: the name without ".<namespace>" (namespaced
// names), consul itself (flat names); ok is false for a service of
// another namespace.
func (m ServiceNames) Kubernetes(namespace, consul string) (name string, ok bool) {
	if m.orDefault() == FlatNames {
		return consul, true
	}
	return strings.CutSuffix(consul, "."+namespace)
}

// Upstream resolves a service a pod of namespace names (the
// meshlet.io/upstreams annotation) to its Consul name, as Kubernetes DNS
// resolves it: "api" is namespace's api; "api.other",
// "api.other.svc" and "api.other.svc.cluster.local" are other's. With
// flat names only "api" is accepted. Errors say what is wrong with ref.
func (m ServiceNames) Upstream(namespace, ref string) (string, error) {
	parts := strings.Split(strings.TrimSuffix(ref, ".svc.cluster.local"), ".")
	if len(parts) == 3 && parts[2] == "svc" {
		parts = parts[:2]
	}
	for _, p := range parts {
		if errs := validation.IsDNS1123Label(p); len(errs) > 0 {
			return "", fmt.Errorf("%q: %s", p, strings.Join(errs, "; "))
		}
	}
	switch {
	case len(parts) == 1:
		return m.Consul(namespace, parts[0]), nil
	case len(parts) == 2 && m.orDefault() == FlatNames:
		return "", fmt.Errorf("names another namespace, but Consul names are flat (-kube-service-names=%s): name the service alone", FlatNames)
	case len(parts) == 2:
		return m.Consul(parts[1], parts[0]), nil
	}
	return "", fmt.Errorf("want <service>, <service>.<namespace> or <service>.<namespace>.svc.cluster.local")
}
