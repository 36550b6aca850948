package server

import (
	"maps"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	"github.com/envoyproxy/go-control-plane/pkg/cache/v3"

	"github.com/meshlet/meshlet/controlplane/model"
	"github.com/meshlet/meshlet/controlplane/policy"
	"github.com/meshlet/meshlet/controlplane/translate"
	"github.com/meshlet/meshlet/xds"
)

// Proxyless gRPC clients (xds.IsProxylessGRPC) are not served from the
// snapshot cache. A grpc-go client asks for exactly the resources it uses
// (the listener named after its target, then that listener's clusters and
// their endpoints), while the proxyless group holds every service of the
// catalog, and go-control-plane's snapshot cache in ADS mode answers no
// request that does not name every resource of the snapshot's type ("ADS
// mode: not responding to request ...: "api" not listed"): with more than
// one service in Consul, a gRPC client got nothing. So each type is served
// from a go-control-plane LinearCache (pkg/cache/v3/linear.go), which
// answers each request with the resources it names, in ADS too:
//
//   - Listeners and clusters (full state in state of the world): a response
//     holds every requested resource that exists; one is sent when a
//     requested resource is updated, added or deleted.
//   - Endpoints, routes, secrets: a response holds the requested resources
//     that changed since the last response on the stream; deletions are not
//     sent (state of the world cannot say them).
//   - A name that does not exist: the first request of a type (no
//     version_info) is answered at once, with the requested resources that
//     exist, possibly none; a listener or cluster that appears later is
//     pushed then. grpc-go does not take the absence of a resource it never
//     received as its deletion: it reports "does not exist" when its watch
//     timer (15 s) expires, and the channel fails RPCs with UNAVAILABLE
//     naming the resource (RPCs with WaitForReady keep waiting). A listener
//     or cluster deleted after the client had it is reported at once
//     (absent from a full-state response).
//   - Versions: one counter per type, prefixed with the server's start time
//     in milliseconds (base 36) and "-", e.g. "m4b7q0zk-12", so a client
//     reconnecting to a restarted control plane is always answered. A
//     response carries the type's current version; a client is sent a new
//     one only when a resource it names changed.
//
// Other types requested by a proxyless client go to the snapshot cache,
// which holds no snapshot for ProxylessGroup and so never answers them.

// proxylessTypes are the types served to proxyless clients, each from a
// LinearCache of its own.
func proxylessTypes() []string {
	return []string{xds.ListenerType, xds.RouteType, xds.ClusterType, xds.EndpointType, xds.SecretType}
}

// linearType is one type's LinearCache with a mirror of its version
// counter. lc and fullState are immutable; version and changed are guarded
// by Server.mu and written only by the build loop, the LinearCache's only
// writer, which calls UpdateResources exactly once per version increment
// (the cache bumps its counter by one per call).
type linearType struct {
	lc *cache.LinearCache
	// fullState is true for listeners and clusters, whose deletions are
	// sent (cache.ResourceRequiresFullStateInSotw).
	fullState bool
	// version is the LinearCache's counter: 0 before the first update.
	version uint64
	// changed holds, by resource name, the version that last updated it
	// (or, for full-state types, deleted it; deleted names are kept, one
	// small entry per name ever served).
	changed map[string]uint64
}

// changedSince reports whether a resource among names (every resource of
// the type when names is empty or holds the wildcard "*") was updated, or
// deleted where deletions are sent, after version v.
func (lt *linearType) changedSince(names []string, v uint64) bool {
	if len(names) == 0 || slices.Contains(names, "*") {
		return lt.version > v
	}
	for _, n := range names {
		if lt.changed[n] > v {
			return true
		}
	}
	return false
}

// linearVersion formats a LinearCache version as the cache does
// (versionPrefix + counter).
func linearVersion(prefix string, v uint64) string { return prefix + strconv.FormatUint(v, 10) }

// parseLinearVersion returns the counter of a version sent by a
// LinearCache with prefix, false when version is not one.
func parseLinearVersion(prefix, version string) (uint64, bool) {
	rest, ok := strings.CutPrefix(version, prefix)
	if !ok {
		return 0, false
	}
	v, err := strconv.ParseUint(rest, 10, 64)
	return v, err == nil
}

// proxylessCache holds the proxyless group's resources service by service,
// each translated from one *model.Service value and one policy set, with
// the content hash of every resource. A build translates only the services
// whose value changed (translate.Proxyless of that service alone: it reads
// nothing else of the catalog) and yields only the resources whose content
// changed, so an endpoint change costs one service's translation and one
// resource update, pushed only to the clients that asked for it. It is
// owned by the build loop.
type proxylessCache struct {
	built    bool
	pol      *policy.Set
	services map[string]*proxylessService
}

// proxylessService is the part of the proxyless group built from one
// service: by type URL, its resources by name (none or one of each type).
type proxylessService struct {
	svc *model.Service
	res map[string]map[string]hashedResource
}

// hashedResource is a resource with its content hash (version()).
type hashedResource struct {
	r    types.Resource
	hash string
}

// proxylessChange is what one build changes in the resources of one type:
// the resources to set (new or changed) by name, and the names to delete.
type proxylessChange struct {
	set map[string]types.Resource
	del []string
}

// update brings the cache to cat and pol. It returns the changes by type
// URL (no entry for a type without changes; nil when nothing changed) and
// how many services it translated.
func (c *proxylessCache) update(cat *model.Catalog, pol *policy.Set) (changes map[string]*proxylessChange, translated int) {
	next := make(map[string]*proxylessService, len(cat.Services))
	for name, svc := range cat.Services {
		if e := c.services[name]; c.built && e != nil && e.svc == svc && c.pol == pol {
			next[name] = e
			continue
		}
		translated++
		next[name] = newProxylessService(svc, translate.Proxyless(model.NewCatalog(map[string]*model.Service{name: svc}, nil), pol))
	}
	changes = map[string]*proxylessChange{}
	change := func(typeURL string) *proxylessChange {
		ch := changes[typeURL]
		if ch == nil {
			ch = &proxylessChange{set: map[string]types.Resource{}}
			changes[typeURL] = ch
		}
		return ch
	}
	for name, e := range next {
		old := c.services[name]
		if old == e {
			continue
		}
		for typeURL, byName := range e.res {
			for n, hr := range byName {
				if prev, ok := old.get(typeURL, n); !ok || prev.hash != hr.hash {
					change(typeURL).set[n] = hr.r
				}
			}
		}
		if old != nil {
			for typeURL, byName := range old.res {
				for n := range byName {
					if _, ok := e.res[typeURL][n]; !ok {
						change(typeURL).del = append(change(typeURL).del, n)
					}
				}
			}
		}
	}
	for name, old := range c.services {
		if _, ok := next[name]; ok {
			continue
		}
		for typeURL, byName := range old.res {
			for n := range byName {
				change(typeURL).del = append(change(typeURL).del, n)
			}
		}
	}
	c.built, c.pol, c.services = true, pol, next
	if len(changes) == 0 {
		return nil, translated
	}
	return changes, translated
}

// names returns the names of the group's resources by type URL, sorted.
func (c *proxylessCache) names() map[string][]string {
	out := map[string][]string{}
	for _, e := range c.services {
		for typeURL, byName := range e.res {
			for n := range byName {
				out[typeURL] = append(out[typeURL], n)
			}
		}
	}
	for _, ns := range out {
		slices.Sort(ns)
	}
	return out
}

func newProxylessService(svc *model.Service, r translate.Resources) *proxylessService {
	e := &proxylessService{svc: svc, res: map[string]map[string]hashedResource{}}
	for _, tr := range proxyResources(r) {
		for _, it := range tr.items {
			if e.res[tr.typeURL] == nil {
				e.res[tr.typeURL] = map[string]hashedResource{}
			}
			e.res[tr.typeURL][cache.GetResourceName(it)] = hashedResource{r: it, hash: version([]types.Resource{it})}
		}
	}
	return e
}

// get returns the resource typeURL/name of e (none when e is nil).
func (e *proxylessService) get(typeURL, name string) (hashedResource, bool) {
	if e == nil {
		return hashedResource{}, false
	}
	hr, ok := e.res[typeURL][name]
	return hr, ok
}

// publishProxyless applies one build's changes to the proxyless clients'
// LinearCaches (one UpdateResources per changed type: the clients that
// name a changed resource get a response) and records the new versions,
// what they were built from and the resource names, for Status and for
// explaining NACKs. It returns whether anything changed.
func (s *Server) publishProxyless(changes map[string]*proxylessChange, names map[string][]string, in inputs) bool {
	if len(changes) == 0 {
		return false
	}
	rec := &published{versions: map[string]string{}, names: names, cat: in.cat, pol: in.pol}
	// The record is stored before the caches answer, so a NACK of the new
	// versions finds it.
	s.mu.Lock()
	for _, typeURL := range proxylessTypes() {
		lt := s.linear[typeURL]
		if ch := changes[typeURL]; ch != nil {
			lt.version++
			for n := range ch.set {
				lt.changed[n] = lt.version
			}
			if lt.fullState {
				for _, n := range ch.del {
					lt.changed[n] = lt.version
				}
			}
		}
		rec.versions[typeURL] = linearVersion(s.versionPrefix, lt.version)
	}
	s.proxylessPublished = appendHistory(s.proxylessPublished, rec)
	s.mu.Unlock()

	for _, typeURL := range slices.Sorted(maps.Keys(changes)) {
		ch := changes[typeURL]
		// The error comes only from hashing resources for delta watches,
		// which cannot fail for the generated messages set here.
		if err := s.linear[typeURL].lc.UpdateResources(ch.set, ch.del); err != nil {
			s.log.Error("xds: update the proxyless clients' resources", "type", typeURL, "error", err)
		}
	}
	s.metrics.snapshotsSet.Inc()
	s.metrics.observePush(in.pending, time.Now())
	return true
}
