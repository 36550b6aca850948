package server

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net"
	"slices"
	"strconv"
	"sync"
	"testing"
	"time"

	cluster "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpoint "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	promtest "github.com/prometheus/client_golang/prometheus/testutil"
	dto "github.com/prometheus/client_model/go"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/meshlet/meshlet/controlplane/model"
	"github.com/meshlet/meshlet/controlplane/policy"
	"github.com/meshlet/meshlet/controlplane/translate"
	"github.com/meshlet/meshlet/internal/testutil"
	"github.com/meshlet/meshlet/sidecar/xdsclient"
	"github.com/meshlet/meshlet/xds"
)

// mesh is web → api and admin → store, each with one sidecar.
func mesh() *model.Catalog {
	proxy := func(svc string, port int, ups ...string) *model.Proxy {
		p := &model.Proxy{ID: svc + "-1-sidecar-proxy", Service: svc, ServiceID: svc + "-1", Address: "127.0.0.1", Port: port,
			LocalAppAddress: "127.0.0.1", LocalAppPort: port - 1000, Weight: 1, Healthy: true}
		for i, u := range ups {
			p.Upstreams = append(p.Upstreams, model.Upstream{Service: u, BindAddress: "127.0.0.1", BindPort: 9191 + i})
		}
		return p
	}
	services := map[string]*model.Service{}
	proxies := map[string]*model.Proxy{}
	for i, p := range []*model.Proxy{proxy("web", 21000, "api"), proxy("api", 21001), proxy("admin", 21002, "store"), proxy("store", 21003)} {
		proxies[p.ID] = p
		services[p.Service] = &model.Service{Name: p.Service, Instances: []model.Instance{{ID: p.ServiceID, Address: "127.0.0.1", Port: 20000 + i, Weight: 1, Healthy: true}}}
	}
	cat := model.NewCatalog(services, proxies)
	cat.CA = &model.CA{TrustDomain: "td.consul", Roots: []model.Root{{ID: "r", CertPEM: "ROOT", Active: true}}}
	for s := range services {
		cat.Leaves[s] = &model.Leaf{Service: s, CertPEM: "CERT-" + s, KeyPEM: "KEY-" + s, SPIFFEID: "spiffe://td.consul/ns/default/dc/dc1/svc/" + s}
	}
	return cat
}

// with returns a copy of c sharing every value, as the Consul watcher
// builds the next catalog, with the given proxies and services replaced.
func with(c *model.Catalog, proxies []*model.Proxy, services ...*model.Service) *model.Catalog {
	ps, ss := map[string]*model.Proxy{}, map[string]*model.Service{}
	for k, v := range c.Proxies {
		ps[k] = v
	}
	for k, v := range c.Services {
		ss[k] = v
	}
	for _, p := range proxies {
		ps[p.ID] = p
	}
	for _, s := range services {
		ss[s.Name] = s
	}
	out := model.NewCatalog(ss, ps)
	out.CA, out.Leaves, out.Intentions = c.CA, c.Leaves, c.Intentions
	return out
}

// recorder is a simulated sidecar: it accepts everything, subscribes to
// what it is told to (RDS and EDS names, both secrets), and records the
// type of every response and each cluster's endpoints.
type recorder struct {
	mu        sync.Mutex
	types     []string
	endpoints map[string][]string
}

func (r *recorder) Update(typeURL, _ string, res []*anypb.Any) (map[string][]string, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.types = append(r.types, typeURL)
	switch typeURL {
	case xds.ListenerType:
		return map[string][]string{xds.SecretType: {xds.SecretRoots, xds.SecretCert}}, nil
	case xds.ClusterType:
		var eds []string
		for _, a := range res {
			c := &cluster.Cluster{}
			if err := a.UnmarshalTo(c); err != nil {
				return nil, err
			}
			if c.GetType() == cluster.Cluster_EDS {
				eds = append(eds, c.GetName())
			}
		}
		return map[string][]string{xds.EndpointType: eds}, nil
	case xds.EndpointType:
		if r.endpoints == nil {
			r.endpoints = map[string][]string{}
		}
		for _, a := range res {
			cla := &endpoint.ClusterLoadAssignment{}
			if err := a.UnmarshalTo(cla); err != nil {
				return nil, err
			}
			var eps []string
			for _, l := range cla.GetEndpoints() {
				for _, e := range l.GetLbEndpoints() {
					sa := e.GetEndpoint().GetAddress().GetSocketAddress()
					eps = append(eps, net.JoinHostPort(sa.GetAddress(), strconv.Itoa(int(sa.GetPortValue()))))
				}
			}
			r.endpoints[cla.GetClusterName()] = eps
		}
	}
	return nil, nil
}

func (r *recorder) snapshot() (types []string, endpoints map[string][]string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := map[string][]string{}
	for k, v := range r.endpoints {
		out[k] = slices.Clone(v)
	}
	return slices.Clone(r.types), out
}

// TestEndpointChangePushesOnlyToAffectedSidecars: when api's sidecar
// fails, web (api upstream) gets one EDS update and admin (store upstream)
// gets nothing; only web's snapshot is set again.
func TestEndpointChangePushesOnlyToAffectedSidecars(t *testing.T) {
	s := New(Config{Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan struct{})
	go func() { defer close(served); _ = s.Serve(lis) }()
	ctx, cancel := context.WithCancel(context.Background())
	var clients sync.WaitGroup
	defer func() {
		cancel()
		clients.Wait()
		s.Close()
		<-served
	}()
	cat := mesh()
	s.SetCatalog(cat)

	sidecars := map[string]*recorder{"web-1-sidecar-proxy": {}, "admin-1-sidecar-proxy": {}}
	for id, r := range sidecars {
		c, err := xdsclient.New(xdsclient.Config{Server: lis.Addr().String(), Node: &core.Node{Id: id}, Handler: r, Credentials: xdsclient.Credentials{Insecure: true},
			Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
		if err != nil {
			t.Fatal(err)
		}
		clients.Add(1)
		go func() { defer clients.Done(); _ = c.Run(ctx) }()
	}
	for id, r := range sidecars {
		testutil.Until(t, 5*time.Second, id+"'s endpoints", func() bool {
			_, eps := r.snapshot()
			return len(eps) > 0
		})
	}
	// The initial exchange settles: the first build pass has ended (its
	// duration observed, after the proxyless caches it updates last) and
	// each sidecar has acknowledged its current snapshot of every type it
	// subscribes to.
	testutil.Eventually(t, 5*time.Second, "the first build pass to end", func() error {
		m := &dto.Metric{}
		if err := s.metrics.build.Write(m); err != nil {
			return err
		}
		if m.GetHistogram().GetSampleCount() == 0 {
			return errors.New("no build observed")
		}
		return nil
	})
	for id := range sidecars {
		testutil.Eventually(t, 5*time.Second, id+" to acknowledge its snapshot", func() error {
			p := proxyStatus(s.Status(), id)
			for _, typ := range []string{xds.ListenerType, xds.ClusterType, xds.EndpointType, xds.SecretType} {
				if v := p.Snapshot[typ]; v == "" || p.ACKed[typ] != v {
					return fmt.Errorf("%s: snapshot %q, acknowledged %q", typ, v, p.ACKed[typ])
				}
			}
			return nil
		})
	}
	webBefore, _ := sidecars["web-1-sidecar-proxy"].snapshot()
	adminBefore, _ := sidecars["admin-1-sidecar-proxy"].snapshot()
	setBefore := promtest.ToFloat64(s.metrics.snapshotsSet)
	translated := func() float64 { return promtest.ToFloat64(s.metrics.translated.WithLabelValues(KindSidecar)) }
	translatedBefore := translated()

	failing := *cat.Proxies["api-1-sidecar-proxy"]
	failing.Healthy = false
	s.SetCatalog(with(cat, []*model.Proxy{&failing}))
	web := sidecars["web-1-sidecar-proxy"]
	testutil.Until(t, 5*time.Second, "web's api endpoints to be empty", func() bool {
		_, eps := web.snapshot()
		return len(eps["api"]) == 0
	})
	time.Sleep(300 * time.Millisecond) // room for a wrong push to arrive
	webAfter, _ := web.snapshot()
	adminAfter, _ := sidecars["admin-1-sidecar-proxy"].snapshot()
	if got := webAfter[len(webBefore):]; !slices.Equal(got, []string{xds.EndpointType}) {
		t.Errorf("web got %v, want one EDS update", got)
	}
	if got := adminAfter[len(adminBefore):]; len(got) > 0 {
		t.Errorf("admin, which has no api upstream, got %v", got)
	}
	if d := promtest.ToFloat64(s.metrics.snapshotsSet) - setBefore; d != 1 {
		t.Errorf("%v snapshots set, want 1 (web's)", d)
	}
	// Translated: api's sidecar (its own value changed, not its resources)
	// and web (api upstream); not admin nor store.
	if d := translated() - translatedBefore; d != 2 {
		t.Errorf("%v sidecars translated, want 2 (api's and web's)", d)
	}

	// A new catalog with the same values (the watcher's answer to a change
	// of something no proxy reads) sets nothing.
	setBefore, translatedBefore = promtest.ToFloat64(s.metrics.snapshotsSet), translated()
	s.SetCatalog(with(cat, []*model.Proxy{&failing}))
	time.Sleep(200 * time.Millisecond)
	if d := promtest.ToFloat64(s.metrics.snapshotsSet) - setBefore; d != 0 {
		t.Errorf("%v snapshots set for an unchanged catalog", d)
	}
	if d := translated() - translatedBefore; d != 0 {
		t.Errorf("%v sidecars translated for an unchanged catalog", d)
	}
}

// proxylessState returns the resources of the proxyless clients' caches
// by type and name, and the types' current versions.
func proxylessState(s *Server) (map[string]map[string]types.Resource, map[string]string) {
	res := map[string]map[string]types.Resource{}
	for typ, lt := range s.linear {
		res[typ] = lt.lc.GetResources()
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	v := map[string]string{}
	if h := s.proxylessPublished; len(h) > 0 {
		v = maps.Clone(h[len(h)-1].versions)
	}
	return res, v
}

// TestProxylessGroupServiceByService: the proxyless clients' caches, built
// service by service and only for the services that changed, hold what
// translate.Proxyless gives for the whole catalog, and a type's version
// changes only when one of its resources does.
func TestProxylessGroupServiceByService(t *testing.T) {
	s := New(Config{Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	defer s.Close()
	pol := &policy.Set{}
	// check waits until the caches hold what translate.Proxyless gives for
	// cat (every type: the build updates them one after the other), and
	// returns the types' versions.
	check := func(cat *model.Catalog) map[string]string {
		t.Helper()
		want := translate.Proxyless(cat, pol)
		return testutil.Poll(t, 5*time.Second, "the proxyless caches to hold translate.Proxyless", func() (map[string]string, error) {
			res, versions := proxylessState(s)
			diff := ""
			for typ, list := range map[string][]types.Resource{
				xds.ListenerType: toResources(want.Listeners), xds.ClusterType: toResources(want.Clusters), xds.EndpointType: toResources(want.Endpoints),
				xds.RouteType: toResources(want.Routes), xds.SecretType: toResources(want.Secrets),
			} {
				if got := res[typ]; len(got) != len(list) {
					diff += fmt.Sprintf("%s: %d resources, want %d; ", typ, len(got), len(list))
				}
				for _, r := range list {
					if !proto.Equal(res[typ][getName(r)], r) {
						diff += fmt.Sprintf("%s %q differs from translate.Proxyless; ", typ, getName(r))
					}
				}
			}
			if diff != "" {
				return nil, errors.New(diff)
			}
			return versions, nil
		})
	}
	translated := func() float64 { return promtest.ToFloat64(s.metrics.translated.WithLabelValues(KindProxyless)) }
	cat := mesh()
	s.SetCatalog(cat)
	v1 := check(cat)
	if n := translated(); n != float64(len(cat.Services)) {
		t.Errorf("%v services translated for the first catalog, want %d", n, len(cat.Services))
	}

	api := *cat.Services["api"]
	api.Instances = []model.Instance{api.Instances[0]}
	api.Instances[0].Healthy = false
	cat2 := with(cat, nil, &api)
	before := translated()
	s.SetCatalog(cat2)
	v2 := check(cat2)
	if v2[xds.EndpointType] == v1[xds.EndpointType] || v2[xds.ListenerType] != v1[xds.ListenerType] || v2[xds.ClusterType] != v1[xds.ClusterType] {
		t.Errorf("versions %v → %v: want only the endpoints' to change", v1, v2)
	}
	if d := translated() - before; d != 1 {
		t.Errorf("%v services translated for api's change, want 1", d)
	}

	// The first content again, in new values: every service is translated,
	// only api's endpoints are updated.
	s.SetCatalog(mesh())
	v3 := check(mesh())
	if v3[xds.EndpointType] == v2[xds.EndpointType] || v3[xds.ListenerType] != v1[xds.ListenerType] || v3[xds.ClusterType] != v1[xds.ClusterType] {
		t.Errorf("versions %v → %v: want only the endpoints' to change", v2, v3)
	}
	// The same content in new values once more: every service is
	// translated, nothing is updated. Then api's change again, which the
	// versions show as the only update since v3.
	before = translated()
	cat4 := mesh()
	s.SetCatalog(cat4)
	testutil.Until(t, 5*time.Second, "the new values to be translated", func() bool { return translated()-before == float64(len(cat.Services)) })
	cat5 := with(cat4, nil, &api)
	s.SetCatalog(cat5)
	v5 := check(cat5)
	if d := translated() - before; d != float64(len(cat.Services)+1) {
		t.Errorf("%v services translated, want %d (all, then api)", d, len(cat.Services)+1)
	}
	counter := func(v string) uint64 {
		n, ok := parseLinearVersion(s.versionPrefix, v)
		if !ok {
			t.Fatalf("version %q is not a proxyless cache version", v)
		}
		return n
	}
	if counter(v5[xds.EndpointType]) != counter(v3[xds.EndpointType])+1 || v5[xds.ListenerType] != v3[xds.ListenerType] || v5[xds.ClusterType] != v3[xds.ClusterType] {
		t.Errorf("versions %v → %v: want one endpoints update (api's)", v3, v5)
	}

	// store leaves Consul: its listener, cluster and endpoints are deleted.
	services := maps.Clone(cat5.Services)
	delete(services, "store")
	cat6 := model.NewCatalog(services, cat5.Proxies)
	cat6.CA, cat6.Leaves = cat5.CA, cat5.Leaves
	s.SetCatalog(cat6)
	v6 := check(cat6)
	for _, typ := range []string{xds.ListenerType, xds.ClusterType, xds.EndpointType} {
		if counter(v6[typ]) != counter(v5[typ])+1 {
			t.Errorf("%s: version %s → %s, want one update (store's deletion)", typ, v5[typ], v6[typ])
		}
	}
}

func getName(r types.Resource) string {
	if e, ok := r.(*endpoint.ClusterLoadAssignment); ok {
		return e.GetClusterName()
	}
	return r.(interface{ GetName() string }).GetName()
}
