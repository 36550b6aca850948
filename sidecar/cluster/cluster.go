// Package cluster holds the sidecar's upstream clusters at run time: their
// endpoints, round-robin selection, and one connection pool per endpoint.
// Endpoint changes keep the pools of endpoints that stay, and let requests in
// flight on removed endpoints finish before their connections close.
package cluster

import (
	"context"
	"net"
	"net/http"
	"reflect"
	"sync"
	"sync/atomic"
	"time"

	"github.com/meshlet/meshlet/sidecar/config"
	"github.com/meshlet/meshlet/xds"
)

// Pool defaults for an endpoint's HTTP connection pool.
const (
	// DefaultMaxIdleConnsPerEndpoint bounds idle keep-alive connections kept
	// per endpoint.
	DefaultMaxIdleConnsPerEndpoint = 256
	// DefaultIdleConnTimeout closes pooled connections idle this long.
	DefaultIdleConnTimeout = 60 * time.Second
)

// Manager holds the clusters of the active config. Get is safe for
// concurrent use without locks; Update and Close are serialised.
type Manager struct {
	clusters atomic.Pointer[map[string]*Cluster]

	mu     sync.Mutex // serialises Update and Close; guards closed
	closed bool
}

// NewManager returns a Manager without clusters.
func NewManager() *Manager {
	m := &Manager{}
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
// settings are unchanged keeps its Cluster value and the pools of endpoints
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
		if c == nil || !sameSettings(c.cfg, cc) {
			if c != nil {
				c.retire()
			}
			c = &Cluster{cfg: cc}
			c.endpoints.Store(&endpointSet{})
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
	cfg       *config.Cluster
	endpoints atomic.Pointer[endpointSet]
	rr        atomic.Uint64
}

type endpointSet struct {
	list []*Endpoint
}

// Name returns the cluster name.
func (c *Cluster) Name() string { return c.cfg.Name }

// Config returns the cluster's decoded config.
func (c *Cluster) Config() *config.Cluster { return c.cfg }

// Endpoints returns the current endpoints. The slice must not be modified.
func (c *Cluster) Endpoints() []*Endpoint { return c.endpoints.Load().list }

// Pick returns the next endpoint in round-robin order, or nil when the
// cluster has none.
func (c *Cluster) Pick() *Endpoint {
	list := c.endpoints.Load().list
	switch len(list) {
	case 0:
		return nil
	case 1:
		return list[0]
	}
	return list[(c.rr.Add(1)-1)%uint64(len(list))]
}

// setEndpoints installs eps, reusing Endpoint values (and pools) by address
// and retiring the ones that disappear. Only Manager.Update calls it.
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
			e = newEndpoint(c.cfg, ce.Address)
		}
		e.weight.Store(ce.Weight)
		list = append(list, e)
	}
	c.endpoints.Store(&endpointSet{list: list})
	for _, e := range byAddr {
		e.retire()
	}
}

func (c *Cluster) retire() {
	for _, e := range c.endpoints.Load().list {
		e.retire()
	}
}

// Endpoint is one upstream host of a cluster with its connection pool.
type Endpoint struct {
	// Address is "host:port".
	Address string

	weight  atomic.Uint32
	retired atomic.Bool
	dialer  net.Dialer
	// transport is the HTTP connection pool, made on first use.
	transport     atomic.Pointer[http.Transport]
	transportOnce sync.Once
	http2         bool
}

func newEndpoint(cfg *config.Cluster, addr string) *Endpoint {
	e := &Endpoint{
		Address: addr,
		dialer:  net.Dialer{Timeout: cfg.ConnectTimeout, KeepAlive: 30 * time.Second},
		http2:   cfg.Protocol == xds.ProtocolHTTP2 || cfg.Protocol == xds.ProtocolGRPC,
	}
	return e
}

// Weight returns the endpoint's load-balancing weight.
func (e *Endpoint) Weight() uint32 { return e.weight.Load() }

// Retired reports whether the endpoint left its cluster.
func (e *Endpoint) Retired() bool { return e.retired.Load() }

// Dial opens a TCP connection to the endpoint, bounded by the cluster's
// connect timeout and ctx.
func (e *Endpoint) Dial(ctx context.Context) (net.Conn, error) {
	return e.dialer.DialContext(ctx, "tcp", e.Address)
}

// Transport returns the endpoint's HTTP connection pool: HTTP/1.1 with
// keep-alive, or HTTP/2 cleartext (prior knowledge) for HTTP/2 clusters.
// It never uses proxy environment variables and never adds
// Accept-Encoding.
func (e *Endpoint) Transport() *http.Transport {
	e.transportOnce.Do(func() {
		t := &http.Transport{
			DialContext:         e.dialer.DialContext,
			MaxIdleConnsPerHost: DefaultMaxIdleConnsPerEndpoint,
			IdleConnTimeout:     DefaultIdleConnTimeout,
			DisableCompression:  true,
		}
		t.Protocols = new(http.Protocols)
		if e.http2 {
			t.Protocols.SetUnencryptedHTTP2(true)
		} else {
			t.Protocols.SetHTTP1(true)
		}
		e.transport.Store(t)
		if e.retired.Load() {
			t.CloseIdleConnections()
		}
	})
	return e.transport.Load()
}

// Release is called when a request on the endpoint has finished; on a
// retired endpoint it closes the connections that are now idle.
func (e *Endpoint) Release() {
	if e.retired.Load() {
		if t := e.transport.Load(); t != nil {
			t.CloseIdleConnections()
		}
	}
}

func (e *Endpoint) retire() {
	e.retired.Store(true)
	if t := e.transport.Load(); t != nil {
		t.CloseIdleConnections()
	}
}
