package xdsstate

import (
	"fmt"
	"time"

	"google.golang.org/protobuf/types/known/anypb"

	"github.com/meshlet/meshlet/sidecar/config"
	"github.com/meshlet/meshlet/xds"
)

// Snapshot is one immutable view of the accepted xDS config: the decoded
// listeners, route configurations, clusters, load assignments and secrets,
// and per type the accepted version and resources as received. A Snapshot
// is never modified once made; every accepted update makes a new one.
type Snapshot struct {
	// Config holds the decoded resources the sidecar builds its listeners
	// and clusters from.
	Config *config.Snapshot
	// Types holds the accepted state of each type received so far, by type
	// URL; a type never accepted has no entry.
	Types map[string]TypeState
	// Missing lists, for people, what the accepted config references but
	// has not received (the config is warming); empty when it is complete.
	Missing []string
}

// TypeState is the accepted state of one xDS type.
type TypeState struct {
	// Version is the version_info of the last accepted response.
	Version string
	// Updated is when it was accepted.
	Updated time.Time
	// Resources are the accepted resources by name, as received (for
	// config_dump and persistence). Never modified.
	Resources map[string]*anypb.Any
}

// Version returns the accepted version of typeURL, "" if none.
func (s *Snapshot) Version(typeURL string) string { return s.Types[typeURL].Version }

// Complete reports whether nothing the config references is missing.
func (s *Snapshot) Complete() bool { return len(s.Missing) == 0 }

// haveBase reports whether listeners and clusters have been accepted: the
// warm timer runs only then.
func (s *Snapshot) haveBase() bool {
	_, l := s.Types[xds.ListenerType]
	_, c := s.Types[xds.ClusterType]
	return l && c
}

// emptySnapshot is the state before any update.
func emptySnapshot() *Snapshot {
	s := &Snapshot{Config: &config.Snapshot{}, Types: map[string]TypeState{}}
	s.Missing = missing(s)
	return s
}

// missing lists what s references but has not received.
func missing(s *Snapshot) []string {
	var miss []string
	if _, ok := s.Types[xds.ClusterType]; !ok {
		miss = append(miss, "clusters (CDS)")
	}
	if _, ok := s.Types[xds.ListenerType]; !ok {
		miss = append(miss, "listeners (LDS)")
	}
	c := s.Config
	for _, n := range config.RouteNames(c.Listeners) {
		if _, ok := c.Routes[n]; !ok {
			miss = append(miss, fmt.Sprintf("route configuration %q (RDS)", n))
		}
	}
	for _, n := range config.EndpointNames(c.Clusters) {
		if _, ok := c.Endpoints[n]; !ok {
			miss = append(miss, fmt.Sprintf("load assignment %q (EDS)", n))
		}
	}
	for _, n := range config.SecretNames(c.Listeners, c.Clusters) {
		if _, ok := c.Secrets[n]; !ok {
			miss = append(miss, fmt.Sprintf("secret %q (SDS)", n))
		}
	}
	return miss
}

// next returns the snapshot after accepting the decoded resources of one
// response of typeURL (and their raw form), and the dependent
// subscriptions to ask for: the route configuration names listeners
// reference, the load assignment names clusters reference, and the secret
// names both reference. Resources no longer referenced are pruned. prev is
// not modified.
func (prev *Snapshot) next(typeURL, version string, now time.Time, decoded map[string]any, raw map[string]*anypb.Any) (*Snapshot, map[string][]string) {
	c := *prev.Config // the maps are replaced below, never modified
	types := make(map[string]TypeState, len(prev.Types)+1)
	for k, v := range prev.Types {
		types[k] = v
	}
	var deps map[string][]string
	old := prev.Types[typeURL].Resources
	switch typeURL {
	case xds.ListenerType:
		c.Listeners = typed[*config.Listener](decoded)
		names := config.RouteNames(c.Listeners)
		c.Routes = keep(c.Routes, names, nil)
		deps = map[string][]string{xds.RouteType: names, xds.SecretType: pruneSecrets(&c)}
	case xds.ClusterType:
		c.Clusters = typed[*config.Cluster](decoded)
		names := config.EndpointNames(c.Clusters)
		c.Endpoints = keep(c.Endpoints, names, nil)
		deps = map[string][]string{xds.EndpointType: names, xds.SecretType: pruneSecrets(&c)}
	case xds.SecretType:
		names := config.SecretNames(c.Listeners, c.Clusters)
		c.Secrets = keep(c.Secrets, names, typed[*config.Secret](decoded))
		raw = keep(old, names, raw)
	case xds.RouteType:
		names := config.RouteNames(c.Listeners)
		c.Routes = keep(c.Routes, names, typed[*config.RouteConfig](decoded))
		raw = keep(old, names, raw)
	case xds.EndpointType:
		names := config.EndpointNames(c.Clusters)
		c.Endpoints = keep(c.Endpoints, names, typed[*config.LoadAssignment](decoded))
		raw = keep(old, names, raw)
	}
	types[typeURL] = TypeState{Version: version, Updated: now, Resources: raw}
	s := &Snapshot{Config: &c, Types: types}
	s.Missing = missing(s)
	return s, deps
}

// pruneSecrets drops from c the secrets its listeners and clusters no
// longer reference and returns the names they do. The raw secrets are
// pruned with the next SDS response.
func pruneSecrets(c *config.Snapshot) []string {
	names := config.SecretNames(c.Listeners, c.Clusters)
	c.Secrets = keep(c.Secrets, names, nil)
	return names
}

// keep returns the entries of fresh, else of old, whose names are in names.
// Route configurations and load assignments are sent by name in state of the
// world; those not in a response keep their last accepted value.
func keep[T any](old map[string]T, names []string, fresh map[string]T) map[string]T {
	out := make(map[string]T, len(names))
	for _, n := range names {
		if v, ok := fresh[n]; ok {
			out[n] = v
		} else if v, ok := old[n]; ok {
			out[n] = v
		}
	}
	return out
}

func typed[T any](m map[string]any) map[string]T {
	out := make(map[string]T, len(m))
	for k, v := range m {
		out[k] = v.(T)
	}
	return out
}
