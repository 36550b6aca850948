// Package cluster holds the sidecar's upstream clusters at run time: their
// endpoints and load balancing (weighted round robin, least request, ring
// hash), connection pools with Envoy's circuit-breaker thresholds, the
// retry budget, outlier detection, and a github.com/sony/gobreaker breaker
// per endpoint. Endpoint changes keep the state and pools of endpoints that
// stay, and let requests in flight on removed endpoints finish.
package cluster

import (
	"crypto/tls"
	"errors"
	"log/slog"
	"net"
	"net/netip"
	"reflect"
	"sync"
	"sync/atomic"
	"time"

	"github.com/meshlet/meshlet/sidecar/config"
)

// Events receives what the cluster layer does, for metrics. Methods must
// be cheap and safe for concurrent use.
type Events interface {
	// Ejected reports an outlier-detection ejection.
	Ejected(cluster, endpoint, reason string)
	// BreakerState reports an endpoint breaker entering state.
	BreakerState(cluster, endpoint, state string)
	// Overflow reports a request refused by a threshold
	// ("max_connections", "max_pending_requests", "max_requests",
	// "max_retries").
	Overflow(cluster, threshold string)
	// TLSHandshake reports an upstream mTLS handshake, err nil on success.
	TLSHandshake(cluster, endpoint string, err error)
	// TLSReason names why a handshake failed (for the log line).
	TLSReason(err error) string
}

// NopEvents ignores every event.
type NopEvents struct{}

// Ejected implements Events.
func (NopEvents) Ejected(string, string, string) {}

// BreakerState implements Events.
func (NopEvents) BreakerState(string, string, string) {}

// Overflow implements Events.
func (NopEvents) Overflow(string, string) {}

// TLSHandshake implements Events.
func (NopEvents) TLSHandshake(string, string, error) {}

// TLSReason implements Events.
func (NopEvents) TLSReason(error) string { return "" }

// TLSConfigs builds the client TLS config of an mTLS cluster.
type TLSConfigs interface {
	ClientConfig(*config.UpstreamTLS) *tls.Config
}

// Manager holds the clusters of the active config. Get is safe for
// concurrent use without locks; Update and Close are serialised.
type Manager struct {
	clusters atomic.Pointer[map[string]*Cluster]
	log      *slog.Logger
	events   Events
	tls      TLSConfigs

	mu     sync.Mutex // serialises Update and Close; guards closed
	closed bool
}

// NewManager returns a Manager without clusters, logging to log, reporting
// to events and building mTLS configs with tlsConfigs (any may be nil;
// without tlsConfigs a cluster asking for TLS cannot connect).
func NewManager(log *slog.Logger, events Events, tlsConfigs TLSConfigs) *Manager {
	if log == nil {
		log = slog.Default()
	}
	if events == nil {
		events = NopEvents{}
	}
	m := &Manager{log: log, events: events, tls: tlsConfigs}
	empty := map[string]*Cluster{}
	m.clusters.Store(&empty)
	return m
}

// Get returns the cluster named name, or nil.
func (m *Manager) Get(name string) *Cluster { return (*m.clusters.Load())[name] }

// All returns the current clusters by name. The map must not be modified.
func (m *Manager) All() map[string]*Cluster { return *m.clusters.Load() }

// Update makes clusters the active set, with endpoints from eds (by EDS
// service name) or from the cluster's static assignment. A cluster whose
// settings are unchanged keeps its Cluster value and the state of endpoints
// that remain; a cluster with changed settings is replaced; removed clusters
// and endpoints are retired: idle connections close now, busy ones when
// their request finishes. An EDS cluster whose assignment is missing from
// eds keeps its current endpoints (none if new).
func (m *Manager) Update(clusters map[string]*config.Cluster, eds map[string]*config.LoadAssignment) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return
	}
	old := *m.clusters.Load()
	next := make(map[string]*Cluster, len(clusters))
	for name, cc := range clusters {
		c := old[name]
		if c == nil || !sameSettings(c.given, cc) {
			if c != nil {
				c.retire()
			}
			c = newCluster(cc, m.log, m.events, m.tls)
		}
		la := cc.Static
		if cc.Type == config.ClusterEDS {
			la = eds[cc.EDSServiceName]
		}
		if la != nil {
			c.setEndpoints(la.Endpoints)
		}
		next[name] = c
	}
	for name, c := range old {
		if _, ok := next[name]; !ok {
			c.retire()
		}
	}
	m.clusters.Store(&next)
}

// Close retires every cluster, closing idle pooled connections. Connections
// in use close when their request ends. It is idempotent.
func (m *Manager) Close() {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return
	}
	m.closed = true
	for _, c := range *m.clusters.Load() {
		c.retire()
	}
	empty := map[string]*Cluster{}
	m.clusters.Store(&empty)
}

// sameSettings compares everything but the static endpoints, which are
// applied like EDS endpoints.
func sameSettings(a, b *config.Cluster) bool {
	ac, bc := *a, *b
	ac.Static, bc.Static = nil, nil
	return reflect.DeepEqual(ac, bc)
}

// Cluster is one upstream cluster.
type Cluster struct {
	given     *config.Cluster // as passed to Update, for change detection
	cfg       *config.Cluster // in effect: given with defaults filled in
	log       *slog.Logger
	events    Events
	dialer    net.Dialer
	tlsConfig *tls.Config // nil for plaintext
	endpoints atomic.Pointer[endpointSet]
	rr        uint64Counter
	budget    *RetryBudget
	outlier   *outlierDetector // nil without outlier detection

	// Circuit-breaker counters (Envoy thresholds).
	requests atomic.Int64 // requests in flight
	retries  atomic.Int64 // retries in flight
	conns    atomic.Int64 // open connections
	pending  atomic.Int64 // requests waiting for a connection

	waitMu sync.Mutex    // guards waitCh
	waitCh chan struct{} // closed and replaced when a connection frees up
}

func newCluster(given *config.Cluster, log *slog.Logger, events Events, tlsConfigs TLSConfigs) *Cluster {
	cfg := given
	if cfg.Thresholds == (config.Thresholds{}) {
		withDefaults := *cfg
		withDefaults.Thresholds = config.DefaultThresholds
		cfg = &withDefaults
	}
	c := &Cluster{
		given:  given,
		cfg:    cfg,
		log:    log,
		events: events,
		dialer: net.Dialer{Timeout: cfg.ConnectTimeout, KeepAlive: 30 * time.Second},
		budget: NewRetryBudget(cfg.RetryBudget),
		waitCh: make(chan struct{}),
	}
	if cfg.Outlier != nil {
		c.outlier = &outlierDetector{cfg: *cfg.Outlier, cluster: cfg.Name, log: log, events: events}
	}
	if cfg.TLS != nil {
		if tlsConfigs != nil {
			c.tlsConfig = tlsConfigs.ClientConfig(cfg.TLS)
		} else {
			c.tlsConfig = &tls.Config{GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
				return nil, errors.New("cluster: no TLS configs for an mTLS cluster")
			}}
		}
	}
	c.endpoints.Store(newEndpointSet(nil, cfg))
	return c
}

// Name returns the cluster name.
func (c *Cluster) Name() string { return c.cfg.Name }

// Config returns the cluster's decoded config.
func (c *Cluster) Config() *config.Cluster { return c.cfg }

// Endpoints returns the current endpoints. The slice must not be modified.
func (c *Cluster) Endpoints() []*Endpoint { return c.endpoints.Load().list }

// PeerID returns the SPIFFE ID the cluster's mTLS requires of its
// endpoints (the first exact SAN match), "" for plaintext clusters.
func (c *Cluster) PeerID() string {
	if t := c.cfg.TLS; t != nil && len(t.SANs) > 0 {
		return t.SANs[0]
	}
	return ""
}

// Stats are a cluster's live counters (Envoy: upstream_rq_active,
// upstream_rq_pending_active, upstream_cx_active, upstream_rq_retry active).
type Stats struct {
	Requests, Pending, Connections, Retries int64
}

// Stats returns the cluster's live counters.
func (c *Cluster) Stats() Stats {
	return Stats{Requests: c.requests.Load(), Pending: c.pending.Load(), Connections: c.conns.Load(), Retries: c.retries.Load()}
}

// Budget returns the cluster's retry budget.
func (c *Cluster) Budget() *RetryBudget { return c.budget }

// PickResult says why Pick found no endpoint.
type PickResult int

// Pick results.
const (
	Picked            PickResult = iota
	NoHealthyUpstream            // no endpoint at all, or all ejected
	CircuitOpen                  // endpoints exist but every breaker is open
)

// Pick chooses an endpoint by the cluster's algorithm (key is the request's
// hash for ring hash) among endpoints not ejected and whose breaker is not
// open, preferring those not in tried (a retry goes elsewhere when it can),
// and starts an attempt on it.
func (c *Cluster) Pick(key uint64, hasKey bool, tried []*Endpoint) (*Attempt, PickResult) {
	set := c.endpoints.Load()
	if len(set.list) == 0 {
		return nil, NoHealthyUpstream
	}
	now := time.Now().UnixNano()
	breakerOpen := false
	healthy := func(e *Endpoint) bool {
		if c.outlier != nil && !c.outlier.available(e, now) {
			return false
		}
		if e.breaker != nil && !e.breaker.available(now) {
			breakerOpen = true
			return false
		}
		return true
	}
	for _, avoidTried := range []bool{true, false} {
		if !avoidTried && len(tried) == 0 {
			break
		}
		for range 3 { // a breaker may refuse between the check and Begin
			e := set.pick(c.cfg, &c.rr, key, hasKey, func(e *Endpoint) bool {
				if avoidTried && len(tried) > 0 && contains(tried, e) {
					return false
				}
				return healthy(e)
			})
			if e == nil {
				break
			}
			if a, ok := e.Begin(); ok {
				return a, Picked
			}
			breakerOpen = true
		}
	}
	if breakerOpen {
		return nil, CircuitOpen
	}
	return nil, NoHealthyUpstream
}

// PickOriginalDst starts an attempt on dst, the original destination of a
// redirected connection, for an ORIGINAL_DST cluster
// (config.ClusterOriginalDst; Envoy's lb_policy CLUSTER_PROVIDED): a host
// of its own for the one connection, on the cluster's PortOverride when
// set, dialled like any endpoint (connect timeout, max_connections, the
// cluster's TLS). It returns NoHealthyUpstream for another cluster type or
// an invalid dst.
func (c *Cluster) PickOriginalDst(dst netip.AddrPort) (*Attempt, PickResult) {
	if c.cfg.Type != config.ClusterOriginalDst || !dst.IsValid() || dst.Port() == 0 {
		return nil, NoHealthyUpstream
	}
	if p := c.cfg.PortOverride; p != 0 {
		dst = netip.AddrPortFrom(dst.Addr(), uint16(p))
	}
	e := newEndpoint(c, dst.String())
	e.weight.Store(1)
	a, ok := e.Begin()
	if !ok { // only an endpoint breaker refuses, and decoding refuses one on ORIGINAL_DST
		return nil, CircuitOpen
	}
	return a, Picked
}

func contains(list []*Endpoint, e *Endpoint) bool {
	for _, x := range list {
		if x == e {
			return true
		}
	}
	return false
}

// AcquireRequest counts a request against max_requests, or reports the
// threshold reached (the request must fail fast).
func (c *Cluster) AcquireRequest() bool {
	if c.requests.Add(1) > int64(c.cfg.Thresholds.MaxRequests) {
		c.requests.Add(-1)
		c.events.Overflow(c.cfg.Name, "max_requests")
		return false
	}
	return true
}

// ReleaseRequest ends a request counted by AcquireRequest.
func (c *Cluster) ReleaseRequest() { c.requests.Add(-1) }

// AcquireRetry counts a retry against max_retries.
func (c *Cluster) AcquireRetry() bool {
	if c.retries.Add(1) > int64(c.cfg.Thresholds.MaxRetries) {
		c.retries.Add(-1)
		c.events.Overflow(c.cfg.Name, "max_retries")
		return false
	}
	return true
}

// ReleaseRetry ends a retry counted by AcquireRetry.
func (c *Cluster) ReleaseRetry() { c.retries.Add(-1) }

func (c *Cluster) acquireConn() bool {
	if c.conns.Add(1) > int64(c.cfg.Thresholds.MaxConnections) {
		c.conns.Add(-1)
		return false
	}
	return true
}

func (c *Cluster) releaseConn() {
	c.conns.Add(-1)
	c.wake()
}

// waitChan returns a channel closed at the next wake.
func (c *Cluster) waitChan() <-chan struct{} {
	c.waitMu.Lock()
	defer c.waitMu.Unlock()
	return c.waitCh
}

// wake tells requests waiting for a connection that one may be free. It is
// cheap when nobody waits.
func (c *Cluster) wake() {
	if c.pending.Load() == 0 {
		return
	}
	c.waitMu.Lock()
	close(c.waitCh)
	c.waitCh = make(chan struct{})
	c.waitMu.Unlock()
}

// evictIdle closes an idle connection of another endpoint to free a slot
// for except's endpoint, and reports whether it did.
func (c *Cluster) evictIdle(except *h1Pool) bool {
	for _, e := range c.Endpoints() {
		if e.h1 != except && e.h1.evictOne() {
			return true
		}
	}
	return false
}

// setEndpoints installs eps, reusing Endpoint values by address and retiring
// the ones that disappear. Only Manager.Update calls it.
func (c *Cluster) setEndpoints(eps []config.Endpoint) {
	cur := c.endpoints.Load().list
	byAddr := make(map[string]*Endpoint, len(cur))
	for _, e := range cur {
		byAddr[e.Address] = e
	}
	list := make([]*Endpoint, 0, len(eps))
	for _, ce := range eps {
		e, ok := byAddr[ce.Address]
		if ok {
			delete(byAddr, ce.Address)
		} else {
			e = newEndpoint(c, ce.Address)
		}
		e.weight.Store(ce.Weight)
		list = append(list, e)
	}
	c.endpoints.Store(newEndpointSet(list, c.cfg))
	for _, e := range byAddr {
		if e.outlier.ejectedUntil.Load() != 0 && c.outlier != nil {
			c.outlier.ejected.Add(-1)
		}
		e.retire()
	}
}

func (c *Cluster) retire() {
	for _, e := range c.endpoints.Load().list {
		e.retire()
	}
}

// uint64Counter is a round-robin position.
type uint64Counter struct{ v atomic.Uint64 }

func (r *uint64Counter) next() uint64 { return r.v.Add(1) - 1 }
