// Package server publishes xDS resources built from the mesh model and the
// policy set, and serves them over ADS (state of the world): sidecars from
// go-control-plane's snapshot cache (one snapshot per node), proxyless gRPC
// clients from one go-control-plane LinearCache per type, which answers
// each client with the resources it names (see proxyless.go).
package server

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strconv"
	"sync"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	"github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	xdsserver "github.com/envoyproxy/go-control-plane/pkg/server/v3"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/protobuf/proto"

	"github.com/meshlet/meshlet/controlplane/model"
	"github.com/meshlet/meshlet/controlplane/policy"
	"github.com/meshlet/meshlet/controlplane/server/nackguard"
	"github.com/meshlet/meshlet/controlplane/translate"
	"github.com/meshlet/meshlet/controlplane/xdsauth"
	"github.com/meshlet/meshlet/xds"
)

// ProxylessGroup is the node hash of every proxyless gRPC client (see
// xds.IsProxylessGRPC): the clients share one set of resources and one
// published history (Server.proxylessPublished), though each is recorded
// and shown in Status under its own node ID. The leading "~" keeps it
// apart from Consul service IDs in logs.
const ProxylessGroup = "~proxyless-grpc"

// sidecarCacheKey is the MuxCache key of the snapshot cache.
const sidecarCacheKey = "snapshot"

// Config configures a Server.
type Config struct {
	// Logger defaults to slog.Default().
	Logger *slog.Logger
	// GRPCOptions are appended to the server's defaults (keepalive policy
	// allowing client pings every 10 s).
	GRPCOptions []grpc.ServerOption
	// StreamIdentity returns a display form of the authenticated identity
	// of the ADS stream whose context is ctx (as an authenticating gRPC
	// interceptor left it), e.g. "kubernetes:default/web pod
	// web-7d9c/uid…" or "consul-token:<accessor>", or "" when the stream
	// is not authenticated. It is called once per stream, when the stream
	// opens, without the server's lock held; Status shows the result
	// (ProxyStatus.Identity). nil: every stream's identity is "".
	StreamIdentity func(ctx context.Context) string
	// AuthDenials returns the ADS streams refused by the authenticating
	// interceptor (xdsauth.Guard.Denials), shown by Status; nil: none.
	AuthDenials func() []xdsauth.Denial
}

// Server builds one snapshot per sidecar, and the resources of all
// proxyless gRPC clients, whenever the catalog or the policy set changes,
// and serves them: each sidecar its snapshot, each proxyless client the
// resources it asks for.
// It records every ADS exchange (versions sent and acknowledged, NACKs with
// the policy documents and Consul entries behind the rejected resources)
// for Status, and counts them in its metrics (Collector).
type Server struct {
	log   *slog.Logger
	cache cache.SnapshotCache
	// linear holds the proxyless clients' LinearCache of each type of
	// proxylessTypes(); the map is immutable after New, its values'
	// mirrors guarded by mu. versionPrefix prefixes their versions.
	linear        map[string]*linearType
	versionPrefix string
	grpc          *grpc.Server
	guard         *nackguard.Guard
	metrics       *metrics
	// identity is Config.StreamIdentity (never nil).
	identity func(ctx context.Context) string
	// denials is Config.AuthDenials (nil: none).
	denials func() []xdsauth.Denial

	changed chan struct{} // capacity 1: a rebuild is due

	// built and proxyless are owned by the build loop (no lock): what
	// each sidecar's snapshot was last built from, and the proxyless
	// clients' resources by service. A build translates only what changed.
	built     map[string]builtNode
	proxyless proxylessCache

	stop    context.CancelFunc
	done    chan struct{} // closed when the build loop has exited
	closeMu sync.Once

	// mu guards the fields below, the records they hold (nodeInfo,
	// streamState and their parts), and the linearType mirrors.
	mu sync.Mutex
	// catalog and policies are the latest inputs; catalog is nil until the
	// first one arrives (no snapshot is built before that).
	catalog  *model.Catalog
	policies *policy.Set
	// pending holds, by trigger (TriggerConsul, TriggerPolicy), the time of
	// the first input change no build has consumed yet.
	pending map[string]time.Time
	// nodes holds one record per xDS node ID (a proxyless client's too):
	// every sidecar built for and every node with an open stream, until
	// pruneLocked deletes it whole.
	nodes map[string]*nodeInfo
	// streams indexes the open ADS streams by stream ID, from their
	// opening (onOpen) to their closing; a stream also joins its node's
	// record (nodeInfo.streams) at its first request that carries a node.
	streams map[int64]*streamState
	// proxylessPublished is the proxyless group's history: the versions of
	// the proxyless caches after each of the last maxPublished updates,
	// oldest first.
	proxylessPublished []*published
	// seq numbers NACKs and ACKs (see nodeType.lastACK).
	seq uint64
}

// New returns a Server ready to Serve. Its build loop runs until Close.
func New(cfg Config) *Server {
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.StreamIdentity == nil {
		cfg.StreamIdentity = func(context.Context) string { return "" }
	}
	ctx, cancel := context.WithCancel(context.Background())
	s := &Server{
		log:      cfg.Logger,
		identity: cfg.StreamIdentity,
		denials:  cfg.AuthDenials,
		changed:  make(chan struct{}, 1),
		stop:     cancel,
		done:     make(chan struct{}),
		policies: &policy.Set{},
		built:    map[string]builtNode{},
		pending:  map[string]time.Time{},
		nodes:    map[string]*nodeInfo{},
		streams:  map[int64]*streamState{},
	}
	s.metrics = newMetrics(s)
	s.cache = cache.NewSnapshotCache(true, nodeHash{}, cacheLogger{cfg.Logger})
	s.versionPrefix = strconv.FormatInt(time.Now().UnixMilli(), 36) + "-"
	s.linear = map[string]*linearType{}
	mux := &cache.MuxCache{
		Classify:      func(r *cache.Request) string { return s.classify(r.GetNode(), r.GetTypeUrl()) },
		ClassifyDelta: func(r *cache.DeltaRequest) string { return s.classify(r.GetNode(), r.GetTypeUrl()) },
		Caches:        map[string]cache.Cache{sidecarCacheKey: s.cache},
	}
	for _, typeURL := range proxylessTypes() {
		lt := &linearType{
			lc:        cache.NewLinearCache(typeURL, cache.WithVersionPrefix(s.versionPrefix), cache.WithLogger(cacheLogger{cfg.Logger})),
			fullState: cache.ResourceRequiresFullStateInSotw(typeURL),
			changed:   map[string]uint64{},
		}
		s.linear[typeURL] = lt
		mux.Caches[typeURL] = lt.lc
	}
	// Proxyless clients' NACKs are always parked: a LinearCache answers a
	// request carrying one of its versions only with what changed since
	// the response on the stream.
	s.guard = nackguard.New(s.cache, nodeHash{}, nackguard.WithPerResourceVersions(xds.IsProxylessGRPC))
	opts := append([]grpc.ServerOption{
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 10 * time.Second, PermitWithoutStream: true}),
		grpc.MaxConcurrentStreams(1 << 16),
	}, cfg.GRPCOptions...)
	s.grpc = grpc.NewServer(opts...)
	srv := xdsserver.NewServer(ctx, mux, s.callbacks())
	discovery.RegisterAggregatedDiscoveryServiceServer(s.grpc, srv)
	go s.buildLoop(ctx)
	return s
}

// SetCatalog replaces the mesh model; snapshots are rebuilt asynchronously.
// The push latency of TriggerConsul is measured from this call.
func (s *Server) SetCatalog(cat *model.Catalog) {
	s.mu.Lock()
	s.catalog = cat
	s.markPending(TriggerConsul)
	s.mu.Unlock()
	s.kick()
}

// SetPolicies replaces the policy set; snapshots are rebuilt asynchronously.
// The push latency of TriggerPolicy is measured from this call.
func (s *Server) SetPolicies(set *policy.Set) {
	s.mu.Lock()
	s.policies = set
	s.markPending(TriggerPolicy)
	s.mu.Unlock()
	s.kick()
}

// markPending records the first unbuilt change of trigger. s.mu must be
// held.
func (s *Server) markPending(trigger string) {
	if _, ok := s.pending[trigger]; !ok {
		s.pending[trigger] = time.Now()
	}
}

// Collector returns the server's Prometheus metrics (see the metrics type
// for names and labels), to register in the caller's registry.
func (s *Server) Collector() prometheus.Collector { return s.metrics }

func (s *Server) kick() {
	select {
	case s.changed <- struct{}{}:
	default:
	}
}

// Serve serves ADS on lis until Close. It returns grpc.Server.Serve's error.
func (s *Server) Serve(lis net.Listener) error { return s.grpc.Serve(lis) }

// Close stops the build loop and the gRPC server, ending open streams. It is
// idempotent.
func (s *Server) Close() {
	s.closeMu.Do(func() {
		s.stop()
		<-s.done
		s.grpc.Stop()
	})
}

// Cache exposes the sidecars' snapshot cache for inspection (tests,
// status). The proxyless clients' resources are not in it (see
// proxyless.go).
func (s *Server) Cache() cache.SnapshotCache { return s.cache }

// classify is the MuxCache key of a request: its type URL (that type's
// LinearCache) for a proxyless client asking for one of proxylessTypes(),
// else the snapshot cache.
func (s *Server) classify(node *core.Node, typeURL string) string {
	if xds.IsProxylessGRPC(node) {
		if _, ok := s.linear[typeURL]; ok {
			return typeURL
		}
	}
	return sidecarCacheKey
}

func (s *Server) buildLoop(ctx context.Context) {
	defer close(s.done)
	for {
		select {
		case <-ctx.Done():
			return
		case <-s.changed:
			s.build(ctx)
		}
	}
}

// build translates the latest inputs for the proxies whose inputs changed
// and for the proxyless clients, sets the snapshots whose content changed
// and updates the proxyless resources that changed. A proxy's inputs are
// its scope of the catalog
// (model.Catalog.Scope: itself, its service, its upstreams' services and
// sidecars, leaves, intentions, the CA) and the policy set; when both are
// the very values of its last build (the Consul watcher keeps the values
// of what did not change) it is not translated again. So an endpoint
// change rebuilds only the sidecars with that service upstream (and the
// proxyless resources of that service), and pushes only to them (and to
// the proxyless clients that asked for that service's resources). A
// sidecar's snapshot that is not Consistent() is logged and not set: the
// node keeps its last one. (The proxyless resources are consistent by
// construction: translate.Proxyless gives each service its listener, with
// an inline route to its cluster, and the cluster's endpoints.)
func (s *Server) build(ctx context.Context) {
	s.mu.Lock()
	cat, pol, pending := s.catalog, s.policies, s.pending
	if cat != nil {
		s.pending = map[string]time.Time{}
	}
	s.mu.Unlock()
	if cat == nil {
		return
	}
	start := time.Now()
	set, rebuilt := 0, 0
	for id, p := range cat.Proxies {
		if b, ok := s.built[id]; ok && b.pol == pol && b.scope.IsScopeOf(cat, p) {
			continue
		}
		rebuilt++
		scope := cat.Scope(p)
		r, err := translate.Proxy(scope, pol, p)
		if err != nil {
			reason := HeldError
			if errors.Is(err, translate.ErrNotReady) {
				reason = HeldNotReady
			}
			s.holdBack(id, reason, err)
			s.built[id] = builtNode{scope: scope, pol: pol}
			continue
		}
		changed, ok := s.publish(ctx, id, proxyResources(r), inputs{cat: scope, pol: pol, pending: pending})
		if changed {
			set++
		}
		if ok {
			s.built[id] = builtNode{scope: scope, pol: pol}
		} else {
			delete(s.built, id) // try again next build
		}
	}
	for id := range s.built {
		if _, ok := cat.Proxies[id]; !ok {
			delete(s.built, id)
		}
	}
	s.metrics.translated.WithLabelValues(KindSidecar).Add(float64(rebuilt))
	changes, n := s.proxyless.update(cat, pol)
	s.metrics.translated.WithLabelValues(KindProxyless).Add(float64(n))
	if changes != nil && s.publishProxyless(changes, s.proxyless.names(), inputs{cat: cat, pol: pol, pending: pending}) {
		set++
	}
	took := time.Since(start)
	s.metrics.build.Observe(took.Seconds())
	s.prune(cat)
	s.log.Debug("xds: snapshots built", "proxies", len(cat.Proxies), "rebuilt", rebuilt, "changed", set, "took", took)
}

// builtNode is what a sidecar's snapshot was last built from.
type builtNode struct {
	scope *model.Catalog
	pol   *policy.Set
}

// inputs are what one snapshot is built from.
type inputs struct {
	cat     *model.Catalog // a sidecar's scope, or the whole catalog (proxyless)
	pol     *policy.Set
	pending map[string]time.Time // by trigger, see Server.pending
}

// holdBack logs, once per reason, that node keeps its last snapshot.
func (s *Server) holdBack(node, reason string, err error) {
	if !s.setHeldBack(node, reason, err.Error()) {
		s.log.Info("xds: snapshot held back; the proxy keeps its last config", "node", node, "reason", err)
	}
}

// prune forgets the nodes that are neither in cat nor connected.
func (s *Server) prune(cat *model.Catalog) {
	s.mu.Lock()
	s.pruneLocked(cat)
	s.mu.Unlock()
}

// typedResources are the resources of one type in a snapshot, with their
// version (a content hash).
type typedResources struct {
	t       types.ResponseType
	typeURL string
	items   []types.Resource
	version string
}

// proxyResources returns r by type, each with its content hash as version.
func proxyResources(r translate.Resources) []typedResources {
	out := []typedResources{
		{t: types.Listener, typeURL: xds.ListenerType, items: toResources(r.Listeners)},
		{t: types.Route, typeURL: xds.RouteType, items: toResources(r.Routes)},
		{t: types.Cluster, typeURL: xds.ClusterType, items: toResources(r.Clusters)},
		{t: types.Endpoint, typeURL: xds.EndpointType, items: toResources(r.Endpoints)},
		{t: types.Secret, typeURL: xds.SecretType, items: toResources(r.Secrets)},
	}
	for i := range out {
		out[i].version = version(out[i].items)
	}
	return out
}

// publish sets node's snapshot from res when its content changed. changed
// reports whether it did; ok is false when the snapshot could not be set
// (inconsistent, or the cache refused it) and the node keeps its last one.
func (s *Server) publish(ctx context.Context, node string, res []typedResources, in inputs) (changed, ok bool) {
	snap := &cache.Snapshot{}
	rec := &published{versions: map[string]string{}, names: map[string][]string{}, cat: in.cat, pol: in.pol}
	var all string
	for _, tr := range res {
		snap.Resources[tr.t] = cache.NewResources(tr.version, tr.items)
		all += tr.version + "/"
		rec.versions[tr.typeURL] = tr.version
		names := make([]string, 0, len(tr.items))
		for _, it := range tr.items {
			names = append(names, cache.GetResourceName(it))
		}
		rec.names[tr.typeURL] = names
	}

	s.mu.Lock()
	unchanged := s.nodeLocked(node).version == all
	s.mu.Unlock()
	if unchanged {
		s.setHeldBack(node, "", "")
		return false, true
	}
	if err := snap.Consistent(); err != nil {
		s.setHeldBack(node, HeldInconsistent, "inconsistent snapshot: "+err.Error())
		s.log.Error("xds: inconsistent snapshot not published; node keeps its last one", "node", node, "error", err)
		return false, false
	}
	// The record is stored before the cache answers the node's watch (a
	// stream may send the snapshot and get its NACK back before SetSnapshot
	// returns), so that the NACK finds what it rejects, as the proxyless
	// group's does; it is taken back if the cache refuses the snapshot.
	s.mu.Lock()
	n := s.nodeLocked(node)
	before := n.published
	n.published = appendHistory(n.published, rec)
	s.mu.Unlock()
	if err := s.cache.SetSnapshot(ctx, node, snap); err != nil {
		s.mu.Lock()
		if h := n.published; len(h) > 0 && h[len(h)-1] == rec {
			n.published = before
		}
		s.mu.Unlock()
		s.setHeldBack(node, HeldError, "set snapshot: "+err.Error())
		s.log.Error("xds: set snapshot", "node", node, "error", err)
		return false, false
	}
	now := time.Now()
	s.mu.Lock()
	n.version, n.heldBack, n.heldReason = all, "", ""
	s.mu.Unlock()
	s.metrics.snapshotsSet.Inc()
	s.metrics.observePush(in.pending, now)
	return true, true
}

func toResources[T types.Resource](in []T) []types.Resource {
	out := make([]types.Resource, len(in))
	for i, r := range in {
		out[i] = r
	}
	return out
}

// version is a content hash of resources (deterministic marshalling), so a
// type whose resources did not change keeps its version and is not pushed.
func version(items []types.Resource) string {
	h := sha256.New()
	opts := proto.MarshalOptions{Deterministic: true}
	var b []byte
	for _, r := range items {
		var err error
		b, err = opts.MarshalAppend(b[:0], r)
		if err != nil {
			panic(fmt.Sprintf("server: marshal %T: %v", r, err)) // generated messages always marshal
		}
		h.Write(b)
		h.Write([]byte{0})
	}
	return hex.EncodeToString(h.Sum(nil)[:8])
}

// nodeHash keys sidecars by node ID and every proxyless gRPC client by
// ProxylessGroup.
type nodeHash struct{}

var _ cache.NodeHash = nodeHash{}

func (nodeHash) ID(node *core.Node) string {
	if xds.IsProxylessGRPC(node) {
		return ProxylessGroup
	}
	return node.GetId()
}

// callbacks are the ADS server's callbacks. The server registers no delta
// callbacks: delta (incremental) streams are served but not recorded.
func (s *Server) callbacks() xdsserver.CallbackFuncs {
	return xdsserver.CallbackFuncs{
		StreamOpenFunc:     s.onOpen,
		StreamRequestFunc:  s.onRequest,
		StreamResponseFunc: s.onResponse,
		StreamClosedFunc:   s.onClosed,
	}
}

// onOpen indexes a new stream with its authenticated identity.
func (s *Server) onOpen(ctx context.Context, id int64, _ string) error {
	st := newStreamState(s.identity(ctx))
	s.mu.Lock()
	s.streams[id] = st
	s.mu.Unlock()
	return nil
}

// onResponse records the version and nonce of each response sent.
func (s *Server) onResponse(_ context.Context, id int64, _ *discovery.DiscoveryRequest, resp *discovery.DiscoveryResponse) {
	s.guard.OnStreamResponse(id, resp)
	s.mu.Lock()
	if st := s.streams[id]; st != nil {
		ts := st.typ(resp.GetTypeUrl())
		ts.sentVersion, ts.sentNonce, ts.sentAt = resp.GetVersionInfo(), resp.GetNonce(), time.Now()
	}
	s.mu.Unlock()
}

// onClosed forgets the stream; a node that is gone from the catalog and
// has no other stream loses its record.
func (s *Server) onClosed(id int64, node *core.Node) {
	s.guard.OnStreamClosed(id)
	s.mu.Lock()
	if st := s.streams[id]; st != nil && st.node != nil && s.nodes[st.node.GetId()] != nil {
		delete(s.nodes[st.node.GetId()].streams, id)
	}
	delete(s.streams, id)
	if s.catalog != nil {
		s.pruneLocked(s.catalog)
	}
	s.mu.Unlock()
	s.log.Info("xds: stream closed", "stream", id, "node", node.GetId())
}

// request is what onRequest recorded of a request under the lock.
type request struct {
	node  *core.Node
	first bool // the stream's first request that carries its node
	// unknown: node is a sidecar not registered in Consul, not reported
	// yet.
	unknown bool
	ack     bool
	seq     uint64 // Server.seq of the request
	// rejected is, for a NACK of the last response sent, its version; snap
	// is the snapshot published with that version (the newest one when
	// rejected is ""), nil when none is known.
	rejected string
	snap     *published
}

// onRequest logs each new node; records ACKs (a request acknowledging the
// version of the last response sent on the stream), which clear the node's
// rejection of that type; and records and logs every NACK (a request
// carrying error_detail) with the node, the type, the rejected version, the
// error and the sources of the rejected resources, and parks the NACKed
// watch until the snapshot changes (for a proxyless client: until a
// resource it names changes).
func (s *Server) onRequest(id int64, req *discovery.DiscoveryRequest) error {
	now := time.Now()
	r, ok := s.recordRequest(id, req, now)
	if !ok {
		s.guard.OnStreamRequest(id, req)
		return nil
	}
	if r.first {
		s.log.Info("xds: stream opened", "stream", id, "node", r.node.GetId(), "userAgent", r.node.GetUserAgentName())
	}
	if r.unknown {
		s.log.Warn("xds: no connect-proxy is registered in Consul with this node ID; it gets config once one is",
			"node", r.node.GetId())
	}
	if r.ack {
		s.metrics.acks.WithLabelValues(typeLabel(req.GetTypeUrl())).Inc()
	}
	if req.GetErrorDetail() != nil {
		s.recordNACK(id, req, r, now)
	}
	return nil
}

// recordRequest records req on stream id: the stream joins its node's
// record at its first request that carries a node; an ACK is recorded on
// the stream and the node. ok is false when req is not recorded (no node
// known yet).
func (s *Server) recordRequest(id int64, req *discovery.DiscoveryRequest, now time.Time) (r request, ok bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := s.streams[id]
	if st == nil || (st.node == nil && req.GetNode() == nil) {
		return request{}, false
	}
	r.first = st.node == nil
	if r.first {
		st.node, st.opened = req.GetNode(), now
	}
	r.node = st.node
	n := s.nodeLocked(r.node.GetId())
	if r.first {
		n.streams[id] = st
		r.unknown = s.unknownLocked(r.node, n)
	}
	typeURL := req.GetTypeUrl()
	ts := st.typ(typeURL)
	ts.subscribed = req.GetResourceNames()
	s.seq++
	r.seq = s.seq
	if req.GetErrorDetail() == nil {
		if r.ack = ts.ack(req, now); r.ack {
			n.typ(typeURL).ack(r.seq)
		}
		return r, true
	}
	if req.GetResponseNonce() == ts.sentNonce {
		r.rejected = ts.sentVersion
	}
	r.snap = findPublished(s.historyLocked(r.node), typeURL, r.rejected)
	return r, true
}

// unknownLocked reports whether node, whose record is n, is a sidecar not
// registered in Consul that was not reported yet, and marks it reported.
// s.mu must be held.
func (s *Server) unknownLocked(node *core.Node, n *nodeInfo) bool {
	if s.catalog == nil || xds.IsProxylessGRPC(node) || n.unknownLogged {
		return false
	}
	_, registered := s.catalog.Proxies[node.GetId()]
	n.unknownLogged = !registered
	return !registered
}

// recordNACK records and logs req, a NACK recorded by recordRequest as r,
// with the resources it blames, and parks its watch (nackguard).
func (s *Server) recordNACK(id int64, req *discovery.DiscoveryRequest, r request, now time.Time) {
	d, typeURL, accepted := req.GetErrorDetail(), req.GetTypeUrl(), req.GetVersionInfo()
	guarded, parked := s.guard.OnStreamRequest(id, req)
	if r.rejected == "" {
		r.rejected = guarded
	}
	res, named := blame(nodeHash{}.ID(r.node), r.node.GetId(), r.snap, typeURL, d, req.GetResourceNames())
	rej := &Rejection{Node: r.node.GetId(), TypeURL: typeURL, Version: r.rejected, AcceptedVersion: accepted,
		Error: d.GetMessage(), Time: now, FirstTime: now, Count: 1, Named: named, Resources: res}
	s.mu.Lock()
	if n := s.nodes[r.node.GetId()]; n != nil { // nil: pruned since, stream closed
		n.typ(typeURL).reject(rej, r.seq)
	}
	s.mu.Unlock()
	s.metrics.nacks.WithLabelValues(r.node.GetId(), typeLabel(typeURL)).Inc()
	var sources []string
	for _, src := range rej.Sources() {
		sources = append(sources, src.String())
	}
	s.log.Warn("xds: NACK: the proxy rejected an update and keeps its last accepted config",
		"node", r.node.GetId(), "type", typeURL, "rejectedVersion", r.rejected,
		"acceptedVersion", accepted, "error", d.GetMessage(), "resources", resourceNames(res),
		"sources", sources, "heldUntilConfigChanges", parked)
}

// findPublished returns the newest snapshot of h whose typeURL version is
// version (the newest one when version is ""), or nil.
func findPublished(h []*published, typeURL, version string) *published {
	for i := len(h) - 1; i >= 0; i-- {
		if version == "" || h[i].versions[typeURL] == version {
			return h[i]
		}
	}
	return nil
}

func resourceNames(res []RejectedResource) []string {
	out := make([]string, len(res))
	for i, r := range res {
		out[i] = r.Name
	}
	return out
}

// cacheLogger adapts slog to go-control-plane's logger at debug level.
type cacheLogger struct{ l *slog.Logger }

func (c cacheLogger) Debugf(f string, a ...any) { c.l.Debug(fmt.Sprintf(f, a...)) }
func (c cacheLogger) Infof(f string, a ...any)  { c.l.Debug(fmt.Sprintf(f, a...)) }
func (c cacheLogger) Warnf(f string, a ...any)  { c.l.Warn(fmt.Sprintf(f, a...)) }
func (c cacheLogger) Errorf(f string, a ...any) { c.l.Error(fmt.Sprintf(f, a...)) }
