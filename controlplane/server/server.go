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
	"slices"
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
	"github.com/meshlet/meshlet/xds"
)

// ProxylessGroup is the key under which the server records what it serves
// all proxyless gRPC clients (see xds.IsProxylessGRPC): the node hash of
// every such client, and the key of their published versions. The leading
// "~" keeps it apart from Consul service IDs in logs.
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

	changed chan struct{} // capacity 1: a rebuild is due

	// built and proxyless are owned by the build loop (no lock): what
	// each sidecar's snapshot was last built from, and the proxyless
	// clients' resources by service. A build translates only what changed.
	built     map[string]builtNode
	proxyless proxylessCache

	stop    context.CancelFunc
	done    chan struct{} // closed when the build loop has exited
	closeMu sync.Once

	mu sync.Mutex // guards the fields below
	// catalog and policies are the latest inputs; catalog is nil until the
	// first one arrives (no snapshot is built before that).
	catalog  *model.Catalog
	policies *policy.Set
	// pending holds, by trigger (TriggerConsul, TriggerPolicy), the time of
	// the first input change no build has consumed yet.
	pending map[string]time.Time
	// versions is the last published per-type version string by sidecar
	// node ID.
	versions map[string]string
	// published holds the last maxPublished snapshots set per node key
	// (ProxylessGroup: the proxyless caches' versions after each update),
	// oldest first.
	published map[string][]*published
	// streams maps an open stream ID to its state (added on the first
	// request that carries a node).
	streams map[int64]*streamState
	// unknownLogged records node IDs already reported as unregistered.
	unknownLogged map[string]bool
	// notReady records, by node key, the reason its snapshot was last held
	// back (logged once per reason); heldBack the reason's kind
	// (HeldNotReady, ...).
	notReady map[string]string
	heldBack map[string]string
	// rejections holds the NACKs not followed by an ACK of the same type.
	rejections map[rejectionKey]*Rejection
	// seq numbers NACKs and ACKs; lastACK is the number of the last ACK
	// per node and type, so a NACK explained outside the lock is not
	// recorded after a newer ACK.
	seq     uint64
	lastACK map[rejectionKey]uint64
}

// New returns a Server ready to Serve. Its build loop runs until Close.
func New(cfg Config) *Server {
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	ctx, cancel := context.WithCancel(context.Background())
	s := &Server{
		log:           cfg.Logger,
		changed:       make(chan struct{}, 1),
		stop:          cancel,
		done:          make(chan struct{}),
		policies:      &policy.Set{},
		built:         map[string]builtNode{},
		pending:       map[string]time.Time{},
		versions:      map[string]string{},
		published:     map[string][]*published{},
		streams:       map[int64]*streamState{},
		unknownLogged: map[string]bool{},
		notReady:      map[string]string{},
		heldBack:      map[string]string{},
		rejections:    map[rejectionKey]*Rejection{},
		lastACK:       map[rejectionKey]uint64{},
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
	s.mu.Lock()
	same := s.notReady[node] == err.Error()
	s.notReady[node] = err.Error()
	s.heldBack[node] = reason
	s.mu.Unlock()
	if !same {
		s.log.Info("xds: snapshot held back; the proxy keeps its last config", "node", node, "reason", err)
	}
}

// prune forgets the state of sidecars that are neither in cat nor
// connected.
func (s *Server) prune(cat *model.Catalog) {
	s.mu.Lock()
	defer s.mu.Unlock()
	connected := map[string]bool{}
	for _, st := range s.streams {
		connected[st.node.GetId()] = true
	}
	gone := func(node string) bool {
		_, registered := cat.Proxies[node]
		return node != ProxylessGroup && !registered && !connected[node]
	}
	for _, m := range []map[string]string{s.notReady, s.heldBack} {
		for node := range m {
			if gone(node) {
				delete(m, node)
			}
		}
	}
	for node := range s.published {
		if gone(node) {
			delete(s.published, node)
		}
	}
	for k := range s.rejections {
		if gone(k.node) {
			delete(s.rejections, k)
		}
	}
	for k := range s.lastACK {
		if gone(k.node) {
			delete(s.lastACK, k)
		}
	}
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
	unchanged := s.versions[node] == all
	if unchanged {
		delete(s.notReady, node)
		delete(s.heldBack, node)
	}
	s.mu.Unlock()
	if unchanged {
		return false, true
	}
	if err := snap.Consistent(); err != nil {
		s.mu.Lock()
		s.notReady[node] = "inconsistent snapshot: " + err.Error()
		s.heldBack[node] = HeldInconsistent
		s.mu.Unlock()
		s.log.Error("xds: inconsistent snapshot not published; node keeps its last one", "node", node, "error", err)
		return false, false
	}
	if err := s.cache.SetSnapshot(ctx, node, snap); err != nil {
		s.mu.Lock()
		s.notReady[node] = "set snapshot: " + err.Error()
		s.heldBack[node] = HeldError
		s.mu.Unlock()
		s.log.Error("xds: set snapshot", "node", node, "error", err)
		return false, false
	}
	now := time.Now()
	s.mu.Lock()
	s.versions[node] = all
	delete(s.notReady, node)
	delete(s.heldBack, node)
	s.recordPublishedLocked(node, rec)
	s.mu.Unlock()
	s.metrics.snapshotsSet.Inc()
	s.metrics.observePush(in.pending, now)
	return true, true
}

// recordPublishedLocked appends rec to key's history of published
// snapshots, keeping the last maxPublished. s.mu must be held.
func (s *Server) recordPublishedLocked(key string, rec *published) {
	h := append(s.published[key], rec)
	if len(h) > maxPublished {
		h = slices.Clone(h[len(h)-maxPublished:])
	}
	s.published[key] = h
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

func (s *Server) callbacks() xdsserver.CallbackFuncs {
	return xdsserver.CallbackFuncs{
		StreamRequestFunc:  s.onRequest,
		StreamResponseFunc: s.onResponse,
		StreamClosedFunc:   s.onClosed,
	}
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
// has no other stream loses its rejections.
func (s *Server) onClosed(id int64, node *core.Node) {
	s.guard.OnStreamClosed(id)
	s.mu.Lock()
	delete(s.streams, id)
	cat := s.catalog
	s.mu.Unlock()
	if cat != nil {
		s.prune(cat)
	}
	s.log.Info("xds: stream closed", "stream", id, "node", node.GetId())
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
	typeURL := req.GetTypeUrl()
	s.mu.Lock()
	st := s.streams[id]
	first := st == nil
	if first {
		if req.GetNode() == nil {
			s.mu.Unlock()
			s.guard.OnStreamRequest(id, req)
			return nil
		}
		st = &streamState{node: req.GetNode(), opened: now, types: map[string]*typeState{}}
		s.streams[id] = st
	}
	node := st.node
	key := rejectionKey{node.GetId(), typeURL}
	var unknown bool
	if first && s.catalog != nil && !xds.IsProxylessGRPC(node) {
		if _, ok := s.catalog.Proxies[node.GetId()]; !ok && !s.unknownLogged[node.GetId()] {
			unknown = true
			s.unknownLogged[node.GetId()] = true
		}
	}
	ts := st.typ(typeURL)
	ts.subscribed = req.GetResourceNames()
	s.seq++
	seq := s.seq
	var ack bool
	var snap *published
	rejected := ""
	if req.GetErrorDetail() == nil {
		if n := req.GetResponseNonce(); n != "" && n == ts.sentNonce && n != ts.ackedNonce && req.GetVersionInfo() == ts.sentVersion {
			ack = true
			ts.ackedNonce, ts.ackedVersion, ts.ackedAt = n, req.GetVersionInfo(), now
			s.lastACK[key] = seq
			delete(s.rejections, key)
		}
	} else {
		if req.GetResponseNonce() == ts.sentNonce {
			rejected = ts.sentVersion
		}
		snap = s.publishedLocked(nodeHash{}.ID(node), typeURL, rejected)
	}
	s.mu.Unlock()
	if first {
		s.log.Info("xds: stream opened", "stream", id, "node", node.GetId(), "userAgent", node.GetUserAgentName())
	}
	if unknown {
		s.log.Warn("xds: no connect-proxy is registered in Consul with this node ID; it gets config once one is",
			"node", node.GetId())
	}
	if ack {
		s.metrics.acks.WithLabelValues(typeLabel(typeURL)).Inc()
	}
	if d := req.GetErrorDetail(); d != nil {
		accepted := req.GetVersionInfo()
		guarded, parked := s.guard.OnStreamRequest(id, req)
		if rejected == "" {
			rejected = guarded
		}
		res, named := blame(nodeHash{}.ID(node), node.GetId(), snap, typeURL, d, req.GetResourceNames())
		r := &Rejection{Node: node.GetId(), TypeURL: typeURL, Version: rejected, AcceptedVersion: accepted,
			Error: d.GetMessage(), Time: now, FirstTime: now, Count: 1, Named: named, Resources: res}
		s.mu.Lock()
		if s.lastACK[key] < seq {
			if prev := s.rejections[key]; prev != nil && prev.Version == r.Version {
				r.FirstTime, r.Count = prev.FirstTime, prev.Count+1
			}
			s.rejections[key] = r
		}
		s.mu.Unlock()
		s.metrics.nacks.WithLabelValues(node.GetId(), typeLabel(typeURL)).Inc()
		var sources []string
		for _, src := range r.Sources() {
			sources = append(sources, src.String())
		}
		s.log.Warn("xds: NACK: the proxy rejected an update and keeps its last accepted config",
			"node", node.GetId(), "type", typeURL, "rejectedVersion", rejected,
			"acceptedVersion", accepted, "error", d.GetMessage(), "resources", resourceNames(res),
			"sources", sources, "heldUntilConfigChanges", parked)
	}
	return nil
}

// publishedLocked returns the newest snapshot published for key whose
// typeURL version is version (the newest one when version is ""), or nil.
// s.mu must be held.
func (s *Server) publishedLocked(key, typeURL, version string) *published {
	h := s.published[key]
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
