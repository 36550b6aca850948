package main

import (
	"fmt"
	"net"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	cluster "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	endpoint "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listener "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	hcm "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/meshlet/meshlet/sidecar/xdsclient"
	"github.com/meshlet/meshlet/xds"
)

// sim is one simulated sidecar: an xdsclient.Handler that decodes just
// enough to follow the dependent subscriptions the way the real sidecar
// does (RDS names from listeners, EDS names from clusters, the two SDS
// secrets), keeps every cluster's endpoint set, and reports EDS updates to
// the tracker. It accepts every response (ACK).
type sim struct {
	id string
	tr *tracker

	mu sync.Mutex // guards the fields below
	// endpoints by cluster: the sorted "host:port" list joined by ",".
	endpoints map[string]string
	edsNames  []string // clusters of type EDS, sorted
	rdsNames  []string // route configurations, sorted
	got       map[string]bool
	synced    bool
}

var _ xdsclient.Handler = (*sim)(nil)

func newSim(id string, tr *tracker) *sim {
	return &sim{id: id, tr: tr, endpoints: map[string]string{}, got: map[string]bool{}}
}

// Update implements xdsclient.Handler.
func (s *sim) Update(typeURL, version string, resources []*anypb.Any) (map[string][]string, error) {
	now := time.Now()
	var deps map[string][]string
	var eds map[string]string
	switch typeURL {
	case xds.ListenerType:
		var rds []string
		for _, r := range resources {
			l := &listener.Listener{}
			if err := r.UnmarshalTo(l); err != nil {
				return nil, fmt.Errorf("listener: %w", err)
			}
			for _, fc := range l.GetFilterChains() {
				for _, f := range fc.GetFilters() {
					if f.GetName() != xds.HTTPConnectionManagerFilter {
						continue
					}
					m := &hcm.HttpConnectionManager{}
					if err := f.GetTypedConfig().UnmarshalTo(m); err != nil {
						return nil, fmt.Errorf("listener %q: %w", l.GetName(), err)
					}
					if n := m.GetRds().GetRouteConfigName(); n != "" {
						rds = append(rds, n)
					}
				}
			}
		}
		slices.Sort(rds)
		rds = slices.Compact(rds)
		s.mu.Lock()
		s.rdsNames = rds
		s.mu.Unlock()
		deps = map[string][]string{xds.RouteType: rds, xds.SecretType: {xds.SecretRoots, xds.SecretCert}}
	case xds.ClusterType:
		var names []string
		for _, r := range resources {
			c := &cluster.Cluster{}
			if err := r.UnmarshalTo(c); err != nil {
				return nil, fmt.Errorf("cluster: %w", err)
			}
			if c.GetType() == cluster.Cluster_EDS {
				names = append(names, c.GetName())
			}
		}
		slices.Sort(names)
		s.mu.Lock()
		s.edsNames = names
		s.mu.Unlock()
		deps = map[string][]string{xds.EndpointType: names}
	case xds.EndpointType:
		eds = make(map[string]string, len(resources))
		for _, r := range resources {
			cla := &endpoint.ClusterLoadAssignment{}
			if err := r.UnmarshalTo(cla); err != nil {
				return nil, fmt.Errorf("cluster load assignment: %w", err)
			}
			var eps []string
			for _, loc := range cla.GetEndpoints() {
				for _, lb := range loc.GetLbEndpoints() {
					sa := lb.GetEndpoint().GetAddress().GetSocketAddress()
					eps = append(eps, net.JoinHostPort(sa.GetAddress(), strconv.Itoa(int(sa.GetPortValue()))))
				}
			}
			slices.Sort(eps)
			eds[cla.GetClusterName()] = strings.Join(eps, ",")
		}
	}
	s.mu.Lock()
	s.got[typeURL] = true
	changed := 0
	for c, eps := range eds {
		if old, ok := s.endpoints[c]; !ok || old != eps {
			changed++
		}
		s.endpoints[c] = eps
	}
	justSynced := false
	if !s.synced && s.completeLocked() {
		s.synced, justSynced = true, true
	}
	s.mu.Unlock()
	s.tr.onPush(s.id, typeURL, now, eds, changed, justSynced)
	return deps, nil
}

// completeLocked reports whether the sidecar has a whole config: listeners,
// clusters, both secrets, its route configurations and every EDS cluster's
// endpoints. s.mu must be held.
func (s *sim) completeLocked() bool {
	if !s.got[xds.ListenerType] || !s.got[xds.ClusterType] || !s.got[xds.SecretType] {
		return false
	}
	if len(s.rdsNames) > 0 && !s.got[xds.RouteType] {
		return false
	}
	for _, n := range s.edsNames {
		if _, ok := s.endpoints[n]; !ok {
			return false
		}
	}
	return true
}

// expectation is one change awaited at one sidecar: the endpoint present
// (or absent) in the cluster's load assignment.
type expectation struct {
	ch       *change
	cluster  string
	endpoint string
	present  bool
}

func (e *expectation) met(eps string) bool {
	has := false
	for _, ep := range strings.Split(eps, ",") {
		if ep == e.endpoint {
			has = true
			break
		}
	}
	return has == e.present
}

// tracker collects initial sync times, the pending expectations of the
// change phase, and what every push during it was.
type tracker struct {
	mu sync.Mutex // guards the fields below
	// synced counts sidecars with a whole config; syncedAt is when the
	// last did; syncDone is closed when all want sidecars have.
	synced, want int
	syncedAt     time.Time
	syncDone     chan struct{}
	// lastPush is the time of the latest response to any sidecar, for the
	// quiet period before the change phase.
	lastPush time.Time
	// measuring is set during the change phase; only then are pushes
	// classified.
	measuring bool
	pending   map[string][]*expectation // by sidecar ID
	// deliveries are the latencies of every (change, affected sidecar).
	deliveries []time.Duration
	pushes     pushCounts
}

// pushCounts classifies the responses received during the change phase.
type pushCounts struct {
	// Affected are EDS responses that delivered at least one awaited
	// change to that sidecar.
	Affected int `json:"affected"`
	// Unaffected are responses that delivered no awaited change: by type
	// (short name), and among EDS ones those whose endpoints changed
	// anyway and those that changed nothing (no-op).
	Unaffected       int            `json:"unaffected"`
	UnaffectedByType map[string]int `json:"unaffected_by_type"`
	UnaffectedEDSNew int            `json:"unaffected_eds_with_changed_endpoints"`
	UnaffectedNoop   int            `json:"unaffected_eds_noop"`
}

func newTracker(want int) *tracker {
	return &tracker{want: want, syncDone: make(chan struct{}), pending: map[string][]*expectation{},
		pushes: pushCounts{UnaffectedByType: map[string]int{}}}
}

func (t *tracker) onPush(id, typeURL string, at time.Time, eds map[string]string, changed int, justSynced bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.lastPush = at
	if justSynced {
		t.synced++
		if t.synced == t.want {
			t.syncedAt = at
			close(t.syncDone)
		}
	}
	if !t.measuring {
		return
	}
	delivered := false
	if typeURL == xds.EndpointType {
		list := t.pending[id]
		kept := list[:0]
		for _, e := range list {
			eps, ok := eds[e.cluster]
			if ok && e.met(eps) {
				delivered = true
				d := at.Sub(e.ch.t0)
				t.deliveries = append(t.deliveries, d)
				e.ch.delivered(d, at)
				continue
			}
			kept = append(kept, e)
		}
		if len(kept) == 0 {
			delete(t.pending, id)
		} else {
			t.pending[id] = kept
		}
	}
	if delivered {
		t.pushes.Affected++
		return
	}
	t.pushes.Unaffected++
	t.pushes.UnaffectedByType[shortType(typeURL)]++
	if typeURL == xds.EndpointType {
		if changed > 0 {
			t.pushes.UnaffectedEDSNew++
		} else {
			t.pushes.UnaffectedNoop++
		}
	}
}

// expect registers the expectations of ch at every sidecar in ids, before
// the write that makes the change.
func (t *tracker) expect(ch *change, ids []string, cluster, ep string, present bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	ch.want = len(ids)
	if ch.want == 0 {
		close(ch.done)
	}
	for _, id := range ids {
		t.pending[id] = append(t.pending[id], &expectation{ch: ch, cluster: cluster, endpoint: ep, present: present})
	}
}

// missing drops every pending expectation and returns how many there were
// (never delivered).
func (t *tracker) missing() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	n := 0
	for _, l := range t.pending {
		n += len(l)
	}
	t.pending = map[string][]*expectation{}
	return n
}

func (t *tracker) pendingCount() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	n := 0
	for _, l := range t.pending {
		n += len(l)
	}
	return n
}

func (t *tracker) setMeasuring(on bool) {
	t.mu.Lock()
	t.measuring = on
	t.mu.Unlock()
}

func (t *tracker) quietSince() time.Time {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.lastPush
}

func shortType(typeURL string) string {
	switch typeURL {
	case xds.ListenerType:
		return "LDS"
	case xds.RouteType:
		return "RDS"
	case xds.ClusterType:
		return "CDS"
	case xds.EndpointType:
		return "EDS"
	case xds.SecretType:
		return "SDS"
	}
	return typeURL
}
