package translate

import (
	"cmp"
	"fmt"
	"slices"
	"strings"

	"github.com/meshlet/meshlet/controlplane/model"
	"github.com/meshlet/meshlet/controlplane/policy"
)

// Origins of a Source.
const (
	// OriginPolicy is a document of a policy file.
	OriginPolicy = "policy"
	// OriginConsul is an entry the Consul watcher read.
	OriginConsul = "consul"
	// OriginFlag is a control plane command-line flag (the OTLP collector
	// of -otlp-endpoint).
	OriginFlag = "flag"
)

// Kinds of Consul entries a Source names (Source.Kind with OriginConsul).
const (
	// ConsulService is a service in the catalog with its instances and
	// their health (/v1/health/service/<name>); Source.Detail says which
	// part: "catalog/health", "sidecars: catalog/health" or "meta protocol".
	ConsulService = "service"
	// ConsulConnectProxy is a connect-proxy registration (the proxy's
	// service ID is Source.Name); Source.Detail names the part: "public
	// listener", "local app" or "upstream <service>".
	ConsulConnectProxy = "connect-proxy"
	// ConsulIntentions is a service-intentions config entry (Source.Name is
	// the destination).
	ConsulIntentions = "service-intentions"
	// ConsulCARoots is the Connect CA's roots and trust domain
	// (/v1/agent/connect/ca/roots).
	ConsulCARoots = "ca-roots"
	// ConsulLeaf is a service's leaf certificate from the Connect CA
	// (/v1/agent/connect/ca/leaf/<service>; Source.Name is the service).
	ConsulLeaf = "leaf"
)

// Source is one input that shaped an xDS resource: a policy document, a
// Consul entry, or a control plane flag.
type Source struct {
	// Origin is OriginPolicy, OriginConsul or OriginFlag.
	Origin string `json:"origin"`
	// Kind is the policy document's kind (policy.KindRetryPolicy, ...), one
	// of the Consul* entry kinds, or "flag".
	Kind string `json:"kind"`
	// Name is the document's metadata.name, the Consul entry's name
	// (service name or proxy service ID; "" for the CA roots), or the
	// flag's name.
	Name string `json:"name,omitempty"`
	// File and Line locate a policy document (policy.Source): the file as
	// the policy loader read it and the line of the document's first key.
	File string `json:"file,omitempty"`
	Line int    `json:"line,omitempty"`
	// Detail narrows a Consul entry down to the part that was used.
	Detail string `json:"detail,omitempty"`
}

// String describes s for people:
//
//	policies/retry.yaml:3 (RetryPolicy api-retries)
//	consul service "api" (catalog/health)
//	consul connect-proxy registration "web-1-sidecar-proxy" (upstream api)
//	consul service-intentions "api"
//	consul Connect CA roots
//	consul leaf certificate for "web"
//	flag -otlp-endpoint
func (s Source) String() string {
	var b strings.Builder
	switch s.Origin {
	case OriginPolicy:
		fmt.Fprintf(&b, "%s:%d (%s %s)", s.File, s.Line, s.Kind, s.Name)
		return b.String()
	case OriginFlag:
		return "flag " + s.Name
	}
	b.WriteString("consul ")
	switch s.Kind {
	case ConsulConnectProxy:
		fmt.Fprintf(&b, "connect-proxy registration %q", s.Name)
	case ConsulCARoots:
		b.WriteString("Connect CA roots")
	case ConsulLeaf:
		fmt.Fprintf(&b, "leaf certificate for %q", s.Name)
	default:
		fmt.Fprintf(&b, "%s %q", s.Kind, s.Name)
	}
	if s.Detail != "" {
		fmt.Fprintf(&b, " (%s)", s.Detail)
	}
	return b.String()
}

// compareSources orders policy documents first (by file, line), then Consul
// entries, then flags (by kind, name, detail).
func compareSources(a, b Source) int {
	rank := map[string]int{OriginPolicy: 0, OriginConsul: 1, OriginFlag: 2}
	return cmp.Or(cmp.Compare(rank[a.Origin], rank[b.Origin]),
		cmp.Compare(a.File, b.File), cmp.Compare(a.Line, b.Line),
		cmp.Compare(a.Kind, b.Kind), cmp.Compare(a.Name, b.Name), cmp.Compare(a.Detail, b.Detail))
}

// SourceMap holds the Sources of the resources of one snapshot, by type URL
// (xds.ListenerType, ...) then resource name (a ClusterLoadAssignment by its
// cluster name). Each list is sorted (policy documents first) and has no
// duplicates.
type SourceMap map[string]map[string][]Source

// For returns the Sources of the named resources of typeURL, merged, sorted
// and without duplicates; nil when there are none.
func (m SourceMap) For(typeURL string, names ...string) []Source {
	var out []Source
	for _, n := range names {
		out = append(out, m[typeURL][n]...)
	}
	return normalize(out)
}

func normalize(s []Source) []Source {
	if len(s) == 0 {
		return nil
	}
	slices.SortFunc(s, compareSources)
	return slices.Compact(s)
}

func (m SourceMap) add(typeURL, name string, s ...Source) {
	byName := m[typeURL]
	if byName == nil {
		byName = map[string][]Source{}
		m[typeURL] = byName
	}
	byName[name] = append(byName[name], s...)
}

func (m SourceMap) normalize() {
	for _, byName := range m {
		for n, s := range byName {
			byName[n] = normalize(s)
		}
	}
}

// ProxySources returns, for every resource Proxy builds for p, the policy
// documents, Consul entries and flags it was built from. They are noted by
// the code that builds the resources, as it reads each input for a
// resource (see provenance): for instance the secrets note the leaf
// certificate and the CA roots, the public listener its registration, the
// protocol's ServiceDefaults or service meta, the documents deciding its
// mTLS, authorization (AuthorizationPolicy, Consul service-intentions) and
// tracing, an upstream's route its RetryPolicy and TimeoutPolicy
// documents, its cluster the service-wide documents and identity, its
// endpoints the Consul catalog; a transparent proxy's capture listener the
// services it matches and the rules deciding whether it may reach them.
//
// Every resource Proxy builds is in the map, with an empty list when it has
// no known input. It returns Proxy's error when Proxy cannot build p's
// resources (then there is no snapshot to explain).
func ProxySources(cat *model.Catalog, pol *policy.Set, p *model.Proxy) (SourceMap, error) {
	pv := newProvenance()
	r, err := buildProxy(cat, pol, p, pv)
	if err != nil {
		return nil, err
	}
	return pv.sources(r), nil
}

// ProxylessSources returns the inputs of every resource Proxyless builds,
// noted as Proxyless builds them: per service s, the API listener "s" (s
// in the catalog, its RetryPolicy and TimeoutPolicy documents, a ringHash
// LoadBalancerPolicy), cluster "s" (s in the catalog, its protocol and
// service-wide policies) and endpoints "s" (s's instances in the catalog
// and their health).
func ProxylessSources(cat *model.Catalog, pol *policy.Set) SourceMap {
	pv := newProvenance()
	return pv.sources(buildProxyless(cat, pol, pv))
}

func docSource(kind, name string, src policy.Source) Source {
	return Source{Origin: OriginPolicy, Kind: kind, Name: name, File: src.File, Line: src.Line}
}

func caSource(detail string) Source {
	return Source{Origin: OriginConsul, Kind: ConsulCARoots, Detail: detail}
}

func leafSource(service string) Source {
	return Source{Origin: OriginConsul, Kind: ConsulLeaf, Name: service}
}

// meshSource is the MeshDefaults document, if any.
func meshSource(pol *policy.Set) []Source {
	if pol == nil || pol.Mesh == nil {
		return nil
	}
	return []Source{docSource(policy.KindMeshDefaults, pol.Mesh.Name, pol.Mesh.Source)}
}
