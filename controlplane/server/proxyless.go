package server

import (
	"crypto/sha256"
	"encoding/hex"
	"slices"

	"github.com/envoyproxy/go-control-plane/pkg/cache/types"

	"github.com/meshlet/meshlet/controlplane/model"
	"github.com/meshlet/meshlet/controlplane/policy"
	"github.com/meshlet/meshlet/controlplane/translate"
	"github.com/meshlet/meshlet/xds"
)

// proxylessCache holds the proxyless group's resources service by service,
// each translated from one *model.Service value and one policy set, with
// the content hash of every resource. A build translates only the services
// whose value changed (translate.Proxyless of that service alone: it reads
// nothing else of the catalog) and versions each type from the hashes, so
// an endpoint change costs one service's resources, not every service's.
type proxylessCache struct {
	built    bool
	pol      *policy.Set
	services map[string]*proxylessService
}

// proxylessService is the part of the proxyless group built from one
// service: none or one resource of each type, with its hash.
type proxylessService struct {
	svc    *model.Service
	res    translate.Resources
	hashes [3]string // listener, cluster, endpoints ("" when absent)
}

// update brings the cache to cat and pol. It returns the group's resources
// by type, false when they are those of the previous call, and how many
// services it translated.
func (c *proxylessCache) update(cat *model.Catalog, pol *policy.Set) (res []typedResources, changed bool, translated int) {
	changed = !c.built || c.pol != pol || len(c.services) != len(cat.Services)
	next := make(map[string]*proxylessService, len(cat.Services))
	for name, svc := range cat.Services {
		if e := c.services[name]; e != nil && e.svc == svc && c.pol == pol {
			next[name] = e
			continue
		}
		changed = true
		translated++
		r := translate.Proxyless(model.NewCatalog(map[string]*model.Service{name: svc}, nil), pol)
		e := &proxylessService{svc: svc, res: r}
		if len(r.Listeners) > 0 {
			e.hashes[0] = version([]types.Resource{r.Listeners[0]})
		}
		if len(r.Clusters) > 0 {
			e.hashes[1] = version([]types.Resource{r.Clusters[0]})
		}
		if len(r.Endpoints) > 0 {
			e.hashes[2] = version([]types.Resource{r.Endpoints[0]})
		}
		next[name] = e
	}
	c.built, c.pol, c.services = true, pol, next
	if !changed {
		return nil, false, translated
	}
	names := make([]string, 0, len(next))
	for name := range next {
		names = append(names, name)
	}
	slices.Sort(names) // each resource is named after its service: translate's order
	var listeners, clusters, endpoints []types.Resource
	var hl, hc, he []string
	for _, name := range names {
		e := next[name]
		for _, l := range e.res.Listeners {
			listeners, hl = append(listeners, l), append(hl, e.hashes[0])
		}
		for _, cl := range e.res.Clusters {
			clusters, hc = append(clusters, cl), append(hc, e.hashes[1])
		}
		for _, cla := range e.res.Endpoints {
			endpoints, he = append(endpoints, cla), append(he, e.hashes[2])
		}
	}
	return []typedResources{
		{t: types.Listener, typeURL: xds.ListenerType, items: listeners, version: combine(hl)},
		{t: types.Route, typeURL: xds.RouteType, version: version(nil)},
		{t: types.Cluster, typeURL: xds.ClusterType, items: clusters, version: combine(hc)},
		{t: types.Endpoint, typeURL: xds.EndpointType, items: endpoints, version: combine(he)},
		{t: types.Secret, typeURL: xds.SecretType, version: version(nil)},
	}, true, translated
}

// combine is the version of a list of resources from their content
// hashes, in order.
func combine(hashes []string) string {
	h := sha256.New()
	for _, x := range hashes {
		h.Write([]byte(x))
		h.Write([]byte{0})
	}
	return hex.EncodeToString(h.Sum(nil)[:8])
}
