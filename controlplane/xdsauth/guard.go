package xdsauth

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
	"k8s.io/apimachinery/pkg/util/cache"

	"github.com/meshlet/meshlet/controlplane/model"
	"github.com/meshlet/meshlet/xds"
)

// GuardConfig configures a Guard.
type GuardConfig struct {
	// Authenticator turns each stream's bearer token into an Identity
	// (usually Cached(ByTokenShape{...})). Required.
	Authenticator Authenticator
	// Consul answers whether a Consul token may act as a service
	// (service:write); nil refuses every Consul identity's sidecar nodes.
	Consul ServiceWriter
	// ServiceAccountMayActAs reports whether pods of a ServiceAccount may
	// run the proxies of service (policy.Set.ServiceAccountMayActAs:
	// the ServiceAccount's own name, or a MeshDefaults
	// spec.serviceAccounts binding); nil allows the ServiceAccount's own
	// name only.
	ServiceAccountMayActAs func(namespace, serviceAccount, service string) bool
	// KubernetesService names the Kubernetes Service of a Consul service
	// as seen from namespace (inject.ServiceNames.Kubernetes: api.shop is
	// Service api of namespace shop); ok false for another namespace's.
	// ServiceAccountMayActAs is asked about that name. nil: the Consul
	// name is the Kubernetes one.
	KubernetesService func(namespace, consulService string) (name string, ok bool)
	// Logger defaults to slog.Default().
	Logger *slog.Logger
	// MaxDenials bounds the denials kept for Denials (distinct peer,
	// identity, node and reason; oldest dropped first); 100 when 0.
	MaxDenials int
	// Now defaults to time.Now.
	Now func() time.Time
	// CatalogWait bounds how long a stream's first request waits for the
	// control plane's first catalog (sidecars connecting while it starts
	// are answered as soon as it has one); DefaultCatalogWait when 0.
	// Past it the stream is refused Unavailable (DenyUnavailable).
	CatalogWait time.Duration
}

// DefaultCatalogWait is GuardConfig.CatalogWait's default.
const DefaultCatalogWait = 30 * time.Second

// ServiceWriter answers whether a Consul identity holds service:write on
// a service (ConsulAuthenticator).
type ServiceWriter interface {
	MayActAs(ctx context.Context, id *Identity, service string) (bool, error)
}

var _ ServiceWriter = (*ConsulAuthenticator)(nil)

// Guard authenticates every ADS stream and lets it name only the nodes its
// identity may act as. Install it with ServerOptions; feed it every
// catalog with SetCatalog before the xDS server sees it.
//
// A stream is admitted when its bearer token authenticates
// (Unauthenticated otherwise: DenyNoCredential, DenyInvalidToken;
// Unavailable when the authority cannot be asked). Its first request must
// name a node the identity may act as (PermissionDenied otherwise):
//   - a proxyless gRPC client (xds.IsProxylessGRPC), any authenticated
//     identity: it is served listeners, routes, clusters and endpoints,
//     never a secret;
//   - a sidecar, the proxy of that node ID registered in Consul
//     (DenyUnregisteredNode otherwise), whose pod is the token's pod and
//     whose service its ServiceAccount may act as (Kubernetes), or whose
//     service the Consul token holds service:write on (DenyWrongNode).
//
// Later requests must name the same node (DenyNodeChanged). A stream
// whose node comes to belong to another pod or service (a registration
// replaced) is refused at its next message (DenyRevoked): nothing built
// for the new owner is sent on it.
type Guard struct {
	cfg     GuardConfig
	log     *slog.Logger
	catalog atomic.Pointer[model.Catalog]
	// hasCatalog is closed by the first SetCatalog.
	hasCatalog     chan struct{}
	hasCatalogOnce sync.Once
	// decisions caches Consul service:write answers by token hash and
	// service, for the cached review's lifetime.
	decisions *cache.LRUExpireCache
	metrics   *guardMetrics

	mu sync.Mutex // guards streams and denials
	// streams are the admitted sidecar streams that named their node.
	streams map[*guardedStream]struct{}
	// denials are the distinct denials, oldest first.
	denials []*Denial
}

// Denial is a refused stream, counted per distinct peer host, identity,
// node and reason.
type Denial struct {
	Reason   xds.AuthDenial `json:"reason"`
	Peer     string         `json:"peer"`               // the client's IP
	Identity string         `json:"identity,omitempty"` // Identity.String(), "" without one
	Node     string         `json:"node,omitempty"`
	Detail   string         `json:"detail"`
	Count    int            `json:"count"`
	First    time.Time      `json:"first"`
	Last     time.Time      `json:"last"`
}

// NewGuard returns a Guard; it panics without an Authenticator.
func NewGuard(cfg GuardConfig) *Guard {
	if cfg.Authenticator == nil {
		panic("xdsauth: GuardConfig.Authenticator is required")
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.MaxDenials <= 0 {
		cfg.MaxDenials = 100
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.CatalogWait <= 0 {
		cfg.CatalogWait = DefaultCatalogWait
	}
	if cfg.ServiceAccountMayActAs == nil {
		cfg.ServiceAccountMayActAs = func(_, sa, svc string) bool { return sa == svc }
	}
	if cfg.KubernetesService == nil {
		cfg.KubernetesService = func(_, svc string) (string, bool) { return svc, true }
	}
	return &Guard{cfg: cfg, log: cfg.Logger, decisions: cache.NewLRUExpireCache(DefaultCacheEntries),
		metrics: newGuardMetrics(), streams: map[*guardedStream]struct{}{}, hasCatalog: make(chan struct{})}
}

// ServerOptions installs the Guard on a gRPC server.
func (g *Guard) ServerOptions() []grpc.ServerOption {
	return []grpc.ServerOption{grpc.ChainStreamInterceptor(g.StreamInterceptor)}
}

// Collector returns the Guard's metrics:
// meshlet_controlplane_xds_auth_denied_total{reason} (streams refused, by
// xds.AuthDenial) and meshlet_controlplane_xds_auth_lookups_total{authority,
// result} (see ObserveLookup).
func (g *Guard) Collector() prometheus.Collector { return g.metrics }

// ObserveLookup returns the CacheOptions.Observe of authority
// ("kubernetes" or "consul"): lookups_total{authority, result}, result
// being ok, invalid, unavailable (a question asked of the authority) or
// cached (answered from the cache).
func (g *Guard) ObserveLookup(authority Kind) func(result string) {
	return func(result string) { g.metrics.lookups.WithLabelValues(string(authority), result).Inc() }
}

// SetCatalog gives the Guard the catalog the xDS server is about to build
// from, and refuses, from their next message on, the open streams whose
// node now belongs to another pod or service. Call it before the server's
// SetCatalog, so no snapshot built from cat reaches a stream cat revokes.
func (g *Guard) SetCatalog(cat *model.Catalog) {
	g.catalog.Store(cat)
	g.hasCatalogOnce.Do(func() { close(g.hasCatalog) })
	g.mu.Lock()
	streams := make([]*guardedStream, 0, len(g.streams))
	for s := range g.streams {
		streams = append(streams, s)
	}
	g.mu.Unlock()
	for _, s := range streams {
		if reason, detail := g.recheck(s, cat); reason != "" {
			s.deny(g.refuse(s.peer, s.id, s.node, xds.DenyRevoked, detail))
			g.forget(s)
		}
	}
}

// recheck re-applies the checks that need no authority to an admitted
// stream: "" when it may go on.
func (g *Guard) recheck(s *guardedStream, cat *model.Catalog) (xds.AuthDenial, string) {
	p := cat.Proxies[s.node]
	if p == nil {
		return "", "" // deregistered: nothing new is built for it
	}
	if s.id.Kind == KindConsul {
		if p.Service != s.service {
			return xds.DenyRevoked, fmt.Sprintf("node %q now fronts service %q, not %q", s.node, p.Service, s.service)
		}
		return "", ""
	}
	if reason, detail := g.kubeMayBe(s.id, p); reason != "" {
		return xds.DenyRevoked, detail
	}
	return "", ""
}

// Denials returns the distinct denials kept, oldest first.
func (g *Guard) Denials() []Denial {
	g.mu.Lock()
	defer g.mu.Unlock()
	out := make([]Denial, len(g.denials))
	for i, d := range g.denials {
		out[i] = *d
	}
	return out
}

// StreamInterceptor is the grpc.StreamServerInterceptor that
// authenticates a stream before its handler runs and authorizes every
// request it receives.
func (g *Guard) StreamInterceptor(srv any, ss grpc.ServerStream, _ *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	ctx := ss.Context()
	peerIP := peerHost(ctx)
	token, ok := bearer(ctx)
	if !ok {
		return g.refuse(peerIP, nil, "", xds.DenyNoCredential,
			"no bearer token in the "+xds.AuthorizationMetadataKey+" metadata: give the sidecar -token-file (a projected ServiceAccount token of audience "+xds.TokenAudience+", or a Consul ACL token)")
	}
	id, err := g.cfg.Authenticator.Authenticate(ctx, token)
	if err != nil {
		reason := xds.DenyInvalidToken
		if !errors.Is(err, ErrInvalidToken) {
			reason = xds.DenyUnavailable
		}
		return g.refuse(peerIP, nil, "", reason, strings.TrimPrefix(err.Error(), "xdsauth: "))
	}
	s := &guardedStream{ServerStream: ss, g: g, ctx: WithIdentity(ctx, id), id: id, peer: peerIP}
	err = handler(srv, s)
	g.forget(s)
	if d := s.denial.Load(); d != nil {
		return *d
	}
	return err
}

// refuse counts, records and logs (once per distinct denial) a refused
// stream and returns the status error the client gets.
func (g *Guard) refuse(peerIP string, id *Identity, node string, reason xds.AuthDenial, detail string) error {
	g.metrics.denied.WithLabelValues(string(reason)).Inc()
	ident := ""
	if id != nil {
		ident = id.String()
	}
	now := g.cfg.Now()
	g.mu.Lock()
	var d *Denial
	for _, x := range g.denials {
		if x.Peer == peerIP && x.Identity == ident && x.Node == node && x.Reason == reason {
			d = x
			break
		}
	}
	first := d == nil
	if first {
		d = &Denial{Reason: reason, Peer: peerIP, Identity: ident, Node: node, First: now}
		g.denials = append(g.denials, d)
		if len(g.denials) > g.cfg.MaxDenials {
			g.denials = slices.Delete(g.denials, 0, len(g.denials)-g.cfg.MaxDenials)
		}
	}
	d.Count++
	d.Last, d.Detail = now, detail
	g.mu.Unlock()
	if first {
		g.log.Warn("xds: stream refused", "reason", reason, "peer", peerIP, "identity", ident, "node", node, "detail", detail)
	}
	code := codes.PermissionDenied
	switch reason {
	case xds.DenyNoCredential, xds.DenyInvalidToken:
		code = codes.Unauthenticated
	case xds.DenyUnavailable:
		code = codes.Unavailable
	}
	who := "an unauthenticated client"
	if ident != "" {
		who = ident
	}
	msg := fmt.Sprintf("meshlet: xDS stream refused (%s): %s", reason, who)
	if node != "" {
		msg += fmt.Sprintf(" may not act as node %q", node)
	}
	return status.Error(code, msg+": "+detail)
}

func (g *Guard) forget(s *guardedStream) {
	g.mu.Lock()
	delete(g.streams, s)
	g.mu.Unlock()
}

// authorize decides whether id may act as node; "" when it may. service is
// the node's service (for a sidecar).
func (g *Guard) authorize(ctx context.Context, id *Identity, node *core.Node) (reason xds.AuthDenial, detail, service string) {
	t := time.NewTimer(g.cfg.CatalogWait)
	select {
	case <-g.hasCatalog:
		t.Stop()
	case <-ctx.Done():
		t.Stop()
		return xds.DenyUnavailable, "the stream ended while the control plane waited for Consul's catalog", ""
	case <-t.C:
		return xds.DenyUnavailable, fmt.Sprintf("the control plane has not read Consul's catalog after %v", g.cfg.CatalogWait), ""
	}
	cat := g.catalog.Load()
	if xds.IsProxylessGRPC(node) {
		return "", "", ""
	}
	p := cat.Proxies[node.GetId()]
	if p == nil {
		return xds.DenyUnregisteredNode, fmt.Sprintf("no proxy with service ID %q is registered in Consul, so nothing says whose it is (a sidecar started before its registration retries)", node.GetId()), ""
	}
	switch id.Kind {
	case KindKubernetes:
		reason, detail := g.kubeMayBe(id, p)
		return reason, detail, p.Service
	case KindConsul:
		ok, err := g.consulMayBe(ctx, id, p.Service)
		if err != nil {
			reason := xds.DenyUnavailable
			if errors.Is(err, ErrInvalidToken) {
				reason = xds.DenyInvalidToken
			}
			return reason, strings.TrimPrefix(err.Error(), "xdsauth: "), p.Service
		}
		if !ok {
			return xds.DenyWrongNode, fmt.Sprintf("the Consul token lacks service:write on %q, the service node %q fronts (give it a service identity for %q)", p.Service, p.ID, p.Service), p.Service
		}
		return "", "", p.Service
	}
	return xds.DenyWrongNode, "unknown identity kind " + string(id.Kind), p.Service
}

// kubeMayBe checks that a Kubernetes identity's pod runs proxy p and that
// its ServiceAccount may act as p's service.
func (g *Guard) kubeMayBe(id *Identity, p *model.Proxy) (xds.AuthDenial, string) {
	switch {
	case p.Pod.IsZero():
		return xds.DenyWrongNode, fmt.Sprintf("node %q is not the proxy of a Kubernetes pod; a ServiceAccount token acts only as its own pod's proxies", p.ID)
	case id.PodName == "":
		return xds.DenyWrongNode, "the token is not bound to a pod: use a projected ServiceAccount token (audience " + xds.TokenAudience + "), as injection mounts"
	case p.Pod.Namespace != id.Namespace || p.Pod.Name != id.PodName:
		return xds.DenyWrongNode, fmt.Sprintf("node %q is the proxy of pod %s, not of the token's pod %s/%s", p.ID, p.Pod, id.Namespace, id.PodName)
	case p.Pod.UID != "" && id.PodUID != "" && p.Pod.UID != id.PodUID:
		return xds.DenyWrongNode, fmt.Sprintf("node %q is the proxy of pod %s uid %s, a later pod than the token's (uid %s)", p.ID, p.Pod, p.Pod.UID, id.PodUID)
	}
	svc, ok := g.cfg.KubernetesService(id.Namespace, p.Service)
	switch {
	case !ok:
		return xds.DenyWrongNode, fmt.Sprintf("node %q fronts %q, a service of another namespace than %s", p.ID, p.Service, id.Namespace)
	case !g.cfg.ServiceAccountMayActAs(id.Namespace, id.ServiceAccount, svc):
		return xds.DenyWrongNode, fmt.Sprintf("ServiceAccount %s/%s may not act as service %q: run the pod as ServiceAccount %q, or allow it in MeshDefaults spec.serviceAccounts", id.Namespace, id.ServiceAccount, svc, svc)
	}
	return "", ""
}

// consulMayBe asks (or remembers) whether a Consul identity holds
// service:write on service.
func (g *Guard) consulMayBe(ctx context.Context, id *Identity, service string) (bool, error) {
	if g.cfg.Consul == nil {
		return false, nil
	}
	sum := sha256.Sum256([]byte(id.secret))
	key := string(sum[:]) + "\x00" + service
	if v, ok := g.decisions.Get(key); ok {
		return v.(bool), nil
	}
	ok, err := g.cfg.Consul.MayActAs(ctx, id, service)
	if err != nil {
		return false, err
	}
	ttl := DefaultCacheTTL
	if !id.Expires.IsZero() {
		ttl = min(ttl, id.Expires.Sub(g.cfg.Now()))
	}
	if !ok {
		ttl = min(ttl, DefaultNegativeTTL)
	}
	if ttl > 0 {
		g.decisions.Add(key, ok, ttl)
	}
	return ok, nil
}

// guardedStream is an admitted stream: its context carries the Identity,
// and each request is authorized before the xDS server sees it.
type guardedStream struct {
	grpc.ServerStream
	g    *Guard
	ctx  context.Context
	id   *Identity
	peer string

	// node, service and proxyless are set by the first request naming a
	// node; only RecvMsg's goroutine (go-control-plane's receive loop)
	// writes them, recheck reads them once the stream is in g.streams.
	node      string
	service   string
	proxyless bool
	// denial, once set, is returned for every later message and by the
	// interceptor when the handler ends.
	denial atomic.Pointer[error]
}

func (s *guardedStream) Context() context.Context { return s.ctx }

func (s *guardedStream) deny(err error) { s.denial.CompareAndSwap(nil, &err) }

type nodeRequest interface{ GetNode() *core.Node }

// RecvMsg receives the next request and authorizes the node it names: a
// request that is refused never reaches the xDS server.
func (s *guardedStream) RecvMsg(m any) error {
	if err := s.ServerStream.RecvMsg(m); err != nil {
		return err
	}
	if d := s.denial.Load(); d != nil {
		return *d
	}
	req, ok := m.(nodeRequest)
	if !ok {
		return nil
	}
	node := req.GetNode()
	if s.node == "" {
		if node.GetId() == "" {
			err := s.g.refuse(s.peer, s.id, "", xds.DenyWrongNode, "the stream's first request names no node")
			s.deny(err)
			return err
		}
		reason, detail, service := s.g.authorize(s.ctx, s.id, node)
		if reason != "" {
			err := s.g.refuse(s.peer, s.id, node.GetId(), reason, detail)
			s.deny(err)
			return err
		}
		s.node, s.service, s.proxyless = node.GetId(), service, xds.IsProxylessGRPC(node)
		if !s.proxyless {
			s.g.mu.Lock()
			s.g.streams[s] = struct{}{}
			s.g.mu.Unlock()
		}
		return nil
	}
	if node != nil && (node.GetId() != s.node || xds.IsProxylessGRPC(node) != s.proxyless) {
		err := s.g.refuse(s.peer, s.id, node.GetId(), xds.DenyNodeChanged, fmt.Sprintf("the stream named node %q first", s.node))
		s.deny(err)
		return err
	}
	return nil
}

// SendMsg sends a response unless the stream was refused meanwhile (its
// node's registration changed hands).
func (s *guardedStream) SendMsg(m any) error {
	if d := s.denial.Load(); d != nil {
		return *d
	}
	return s.ServerStream.SendMsg(m)
}

// bearer returns the token of the stream's authorization metadata.
func bearer(ctx context.Context) (string, bool) {
	md, _ := metadata.FromIncomingContext(ctx)
	for _, v := range md.Get(xds.AuthorizationMetadataKey) {
		if len(v) > len(xds.BearerPrefix) && strings.EqualFold(v[:len(xds.BearerPrefix)], xds.BearerPrefix) {
			if tok := strings.TrimSpace(v[len(xds.BearerPrefix):]); tok != "" {
				return tok, true
			}
		}
	}
	return "", false
}

func peerHost(ctx context.Context) string {
	p, ok := peer.FromContext(ctx)
	if !ok || p.Addr == nil {
		return ""
	}
	if h, _, err := net.SplitHostPort(p.Addr.String()); err == nil {
		return h
	}
	return p.Addr.String()
}

type guardMetrics struct {
	denied  *prometheus.CounterVec
	lookups *prometheus.CounterVec
}

func newGuardMetrics() *guardMetrics {
	m := &guardMetrics{
		denied: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "meshlet_controlplane_xds_auth_denied_total",
			Help: "ADS streams refused, by reason (no_credential, invalid_token, wrong_node, unregistered_node, node_changed, revoked, unavailable)."}, []string{"reason"}),
		lookups: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "meshlet_controlplane_xds_auth_lookups_total",
			Help: "Token reviews: asked of the authority (result ok, invalid, unavailable) or answered from the cache (cached)."}, []string{"authority", "result"}),
	}
	for _, r := range xds.AuthDenials {
		m.denied.WithLabelValues(string(r))
	}
	return m
}

func (m *guardMetrics) Describe(ch chan<- *prometheus.Desc) {
	m.denied.Describe(ch)
	m.lookups.Describe(ch)
}

func (m *guardMetrics) Collect(ch chan<- prometheus.Metric) {
	m.denied.Collect(ch)
	m.lookups.Collect(ch)
}
