package main

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net"
	"net/http"
	"strconv"
	"sync"
	"time"

	"github.com/hashicorp/consul/api"
)

// topology is the mesh the benchmark registers in Consul: services with
// their instances spread over nodes, some instances with a connect-proxy
// sidecar whose upstreams are other meshed services.
type topology struct {
	nodes     []node
	services  []*service
	sidecars  []*sidecar            // the simulated ones, in registration order
	byService map[string]*service   // by name
	down      map[string][]*sidecar // downstream sidecars by upstream service
}

type node struct{ name, addr string }

type service struct {
	name      string
	http      bool
	instances []*instance
	sidecars  []*sidecar
	// extra is the instance added by a scale-out change, nil when none.
	extra *instance
}

type instance struct {
	id, checkID string
	node        node
	port        int
	critical    bool     // the check's current status
	sidecar     *sidecar // nil for a plain instance
}

type sidecar struct {
	id, service string
	inst        *instance
	port        int
	upstreams   []string
}

// endpoint is how the sidecar appears in its service's EDS: the proxy's
// address (the node's) and port.
func (s *sidecar) endpoint() string {
	return net.JoinHostPort(s.inst.node.addr, strconv.Itoa(s.port))
}

// topologyConfig sizes the mesh.
type topologyConfig struct {
	Services, Instances, Sidecars, Meshed, Nodes int
	UpstreamsMin, UpstreamsMax, Hot              int
	HTTPFraction                                 float64
	Seed                                         uint64
}

func (c topologyConfig) validate() error {
	switch {
	case c.Services < 2 || c.Instances < 1 || c.Nodes < 1:
		return fmt.Errorf("need at least 2 services, 1 instance each and 1 node")
	case c.Meshed < 2 || c.Meshed > c.Services:
		return fmt.Errorf("-meshed must be within [2, -services]")
	case c.Sidecars < c.Meshed || c.Sidecars%c.Meshed != 0:
		return fmt.Errorf("-sidecars must be a multiple of -meshed (sidecars are spread evenly over the meshed services)")
	case c.Sidecars/c.Meshed > c.Instances:
		return fmt.Errorf("more sidecars per meshed service (%d) than instances (%d)", c.Sidecars/c.Meshed, c.Instances)
	case c.UpstreamsMin < 1 || c.UpstreamsMax < c.UpstreamsMin || c.UpstreamsMax >= c.Meshed:
		return fmt.Errorf("upstreams per sidecar must be within [1, -meshed-1]")
	case c.Hot < 0 || c.Hot > c.Meshed:
		return fmt.Errorf("-hot must be within [0, -meshed]")
	}
	return nil
}

// newTopology lays the mesh out deterministically from c.Seed. Meshed
// services are the first c.Meshed ones; each sidecar's first upstream is one
// of the c.Hot first (popular) services when c.Hot > 0, the others uniform
// over the meshed services; none is its own service.
func newTopology(c topologyConfig) *topology {
	rng := rand.New(rand.NewPCG(c.Seed, c.Seed^0x9e3779b97f4a7c15))
	t := &topology{byService: map[string]*service{}, down: map[string][]*sidecar{}}
	for i := range c.Nodes {
		t.nodes = append(t.nodes, node{name: fmt.Sprintf("bench-node-%03d", i), addr: fmt.Sprintf("10.%d.%d.%d", 1+i/65536, (i/256)%256, i%256)})
	}
	perService := c.Sidecars / c.Meshed
	n := 0
	for i := range c.Services {
		s := &service{name: fmt.Sprintf("svc-%04d", i), http: float64(i%100) < c.HTTPFraction*100}
		for k := range c.Instances {
			in := &instance{id: fmt.Sprintf("%s-%d", s.name, k), node: t.nodes[n%len(t.nodes)], port: 8000 + k}
			n++
			in.checkID = in.id + "-check"
			if i < c.Meshed && k < perService {
				sc := &sidecar{id: in.id + "-sidecar-proxy", service: s.name, inst: in, port: 21000 + k}
				in.sidecar = sc
				s.sidecars = append(s.sidecars, sc)
				t.sidecars = append(t.sidecars, sc)
			}
			s.instances = append(s.instances, in)
		}
		t.services = append(t.services, s)
		t.byService[s.name] = s
	}
	for _, sc := range t.sidecars {
		want := c.UpstreamsMin + rng.IntN(c.UpstreamsMax-c.UpstreamsMin+1)
		seen := map[string]bool{sc.service: true}
		for len(sc.upstreams) < want {
			pool := c.Meshed
			if len(sc.upstreams) == 0 && c.Hot > 0 {
				pool = c.Hot
			}
			u := t.services[rng.IntN(pool)].name
			if seen[u] {
				continue
			}
			seen[u] = true
			sc.upstreams = append(sc.upstreams, u)
			t.down[u] = append(t.down[u], sc)
		}
	}
	return t
}

// instanceCount is the number of service instances (sidecars not counted).
func (t *topology) instanceCount() int {
	n := 0
	for _, s := range t.services {
		n += len(s.instances)
	}
	return n
}

// writer writes the topology and its changes to Consul through the catalog
// API. Its HTTP client connects from 127.0.0.2, so its connections do not
// count against the per-client-IP connection limit of the agent
// (limits.http_max_conns_per_client) that the control plane, on 127.0.0.1,
// is subject to.
type writer struct {
	c *api.Client
}

func newWriter(addr, token string) (*writer, error) {
	c, err := api.NewClient(&api.Config{Address: addr, Token: token, Transport: benchTransport(64)})
	if err != nil {
		return nil, err
	}
	return &writer{c: c}, nil
}

// benchTransport is the HTTP transport of the benchmark's own Consul
// clients: from 127.0.0.2, outside the control plane's connection limit,
// keeping up to idle connections.
func benchTransport(idle int) *http.Transport {
	return &http.Transport{
		DialContext:         (&net.Dialer{LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, 2)}, Timeout: 5 * time.Second}).DialContext,
		MaxIdleConnsPerHost: idle,
		IdleConnTimeout:     30 * time.Second,
	}
}

func (t *topology) instanceReg(s *service, in *instance) *api.CatalogRegistration {
	meta := map[string]string{}
	if s.http {
		meta["protocol"] = "http"
	}
	status := api.HealthPassing
	if in.critical {
		status = api.HealthCritical
	}
	return &api.CatalogRegistration{
		Node: in.node.name, Address: in.node.addr, SkipNodeUpdate: true,
		Service: &api.AgentService{ID: in.id, Service: s.name, Port: in.port, Meta: meta},
		Check: &api.AgentCheck{Node: in.node.name, CheckID: in.checkID, Name: "app", Status: status,
			ServiceID: in.id, ServiceName: s.name},
	}
}

func (t *topology) sidecarReg(sc *sidecar) *api.CatalogRegistration {
	p := &api.AgentServiceConnectProxyConfig{
		DestinationServiceName: sc.service, DestinationServiceID: sc.inst.id,
		LocalServiceAddress: "127.0.0.1", LocalServicePort: sc.inst.port,
	}
	for j, u := range sc.upstreams {
		p.Upstreams = append(p.Upstreams, api.Upstream{DestinationName: u, LocalBindPort: 30000 + j})
	}
	return &api.CatalogRegistration{
		Node: sc.inst.node.name, Address: sc.inst.node.addr, SkipNodeUpdate: true,
		Service: &api.AgentService{Kind: api.ServiceKindConnectProxy, ID: sc.id, Service: sc.service + "-sidecar-proxy", Port: sc.port, Proxy: p},
		Check: &api.AgentCheck{Node: sc.inst.node.name, CheckID: sc.id + "-check", Name: "proxy", Status: api.HealthPassing,
			ServiceID: sc.id, ServiceName: sc.service + "-sidecar-proxy"},
	}
}

// registerAll registers every node, instance (with a passing check) and
// sidecar with `workers` concurrent catalog writes.
func (w *writer) registerAll(ctx context.Context, t *topology, workers int) error {
	regs := make(chan *api.CatalogRegistration)
	errc := make(chan error, workers)
	var wg sync.WaitGroup
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for r := range regs {
				if err := w.register(ctx, r); err != nil {
					errc <- err
					return
				}
			}
		}()
	}
	send := func(r *api.CatalogRegistration) bool {
		select {
		case regs <- r:
			return true
		case err := <-errc:
			errc <- err
			return false
		}
	}
	func() {
		defer close(regs)
		for _, n := range t.nodes {
			if !send(&api.CatalogRegistration{Node: n.name, Address: n.addr}) {
				return
			}
		}
	}()
	wg.Wait() // nodes first, so SkipNodeUpdate finds them
	regs = make(chan *api.CatalogRegistration)
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for r := range regs {
				if err := w.register(ctx, r); err != nil {
					errc <- err
					return
				}
			}
		}()
	}
	func() {
		defer close(regs)
		for _, s := range t.services {
			for _, in := range s.instances {
				if !send(t.instanceReg(s, in)) {
					return
				}
				if in.sidecar != nil && !send(t.sidecarReg(in.sidecar)) {
					return
				}
			}
		}
	}()
	wg.Wait()
	select {
	case err := <-errc:
		return err
	default:
		return nil
	}
}

// register writes r, retrying transient failures a few times.
func (w *writer) register(ctx context.Context, r *api.CatalogRegistration) error {
	var err error
	for attempt := range 5 {
		if _, err = w.c.Catalog().Register(r, (&api.WriteOptions{}).WithContext(ctx)); err == nil {
			return nil
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		time.Sleep(time.Duration(attempt+1) * 100 * time.Millisecond)
	}
	return fmt.Errorf("register %s on %s: %w", serviceID(r), r.Node, err)
}

func (w *writer) deregister(ctx context.Context, nodeName, serviceID string) error {
	_, err := w.c.Catalog().Deregister(&api.CatalogDeregistration{Node: nodeName, ServiceID: serviceID}, (&api.WriteOptions{}).WithContext(ctx))
	if err != nil {
		return fmt.Errorf("deregister %s on %s: %w", serviceID, nodeName, err)
	}
	return nil
}

// setCheck writes the status of an instance's check.
func (w *writer) setCheck(ctx context.Context, s *service, in *instance, critical bool) error {
	status := api.HealthPassing
	if critical {
		status = api.HealthCritical
	}
	return w.register(ctx, &api.CatalogRegistration{
		Node: in.node.name, Address: in.node.addr, SkipNodeUpdate: true,
		Check: &api.AgentCheck{Node: in.node.name, CheckID: in.checkID, Name: "app", Status: status,
			ServiceID: in.id, ServiceName: s.name},
	})
}

func serviceID(r *api.CatalogRegistration) string {
	if r.Service != nil {
		return r.Service.ID
	}
	return "node"
}
