// Package server publishes xDS snapshots built from the mesh model and the
// policy set, and serves them over ADS (state of the world) with
// go-control-plane's snapshot cache.
package server

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	"github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	xdsserver "github.com/envoyproxy/go-control-plane/pkg/server/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/protobuf/proto"

	"github.com/meshlet/meshlet/controlplane/model"
	"github.com/meshlet/meshlet/controlplane/policy"
	"github.com/meshlet/meshlet/controlplane/translate"
	"github.com/meshlet/meshlet/xds"
)

// ProxylessGroup is the snapshot-cache key shared by all proxyless gRPC
// clients (see xds.IsProxylessGRPC). The leading "~" keeps it apart from
// Consul service IDs in logs.
const ProxylessGroup = "~proxyless-grpc"

// Config configures a Server.
type Config struct {
	// Logger defaults to slog.Default().
	Logger *slog.Logger
	// GRPCOptions are appended to the server's defaults (keepalive policy
	// allowing client pings every 10 s).
	GRPCOptions []grpc.ServerOption
}

// Server builds one snapshot per sidecar and one for all proxyless gRPC
// clients whenever the catalog or the policy set changes, and serves them.
type Server struct {
	log   *slog.Logger
	cache cache.SnapshotCache
	grpc  *grpc.Server
	guard *xds.NACKGuard

	changed chan struct{} // capacity 1: a rebuild is due
	stop    context.CancelFunc
	done    chan struct{} // closed when the build loop has exited
	closeMu sync.Once

	mu sync.Mutex // guards the fields below
	// catalog and policies are the latest inputs; catalog is nil until the
	// first one arrives (no snapshot is built before that).
	catalog  *model.Catalog
	policies *policy.Set
	// versions is the last published per-type version string by node key.
	versions map[string]string
	// streams maps an open stream ID to its node (set on first request).
	streams map[int64]*core.Node
	// unknownLogged records node IDs already reported as unregistered.
	unknownLogged map[string]bool
	// notReady records, by node, the reason its snapshot was last held back
	// (logged once per reason).
	notReady map[string]string
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
		versions:      map[string]string{},
		streams:       map[int64]*core.Node{},
		unknownLogged: map[string]bool{},
		notReady:      map[string]string{},
	}
	s.cache = cache.NewSnapshotCache(true, nodeHash{}, cacheLogger{cfg.Logger})
	s.guard = xds.NewNACKGuard(s.cache, nodeHash{})
	opts := append([]grpc.ServerOption{
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 10 * time.Second, PermitWithoutStream: true}),
		grpc.MaxConcurrentStreams(1 << 16),
	}, cfg.GRPCOptions...)
	s.grpc = grpc.NewServer(opts...)
	srv := xdsserver.NewServer(ctx, s.cache, s.callbacks())
	discovery.RegisterAggregatedDiscoveryServiceServer(s.grpc, srv)
	go s.buildLoop(ctx)
	return s
}

// SetCatalog replaces the mesh model; snapshots are rebuilt asynchronously.
func (s *Server) SetCatalog(cat *model.Catalog) {
	s.mu.Lock()
	s.catalog = cat
	s.mu.Unlock()
	s.kick()
}

// SetPolicies replaces the policy set; snapshots are rebuilt asynchronously.
func (s *Server) SetPolicies(set *policy.Set) {
	s.mu.Lock()
	s.policies = set
	s.mu.Unlock()
	s.kick()
}

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

// Cache exposes the snapshot cache for inspection (tests, status).
func (s *Server) Cache() cache.SnapshotCache { return s.cache }

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

// build translates the latest inputs for every proxy and the proxyless
// group, and sets the snapshots whose content changed. A snapshot that is
// not Consistent() is logged and not set: the node keeps its last one.
func (s *Server) build(ctx context.Context) {
	s.mu.Lock()
	cat, pol := s.catalog, s.policies
	s.mu.Unlock()
	if cat == nil {
		return
	}
	start := time.Now()
	set := 0
	for id, p := range cat.Proxies {
		r, err := translate.Proxy(cat, pol, p)
		if err != nil {
			s.holdBack(id, err)
			continue
		}
		s.mu.Lock()
		delete(s.notReady, id)
		s.mu.Unlock()
		if s.publish(ctx, id, r) {
			set++
		}
	}
	if s.publish(ctx, ProxylessGroup, translate.Proxyless(cat, pol)) {
		set++
	}
	s.log.Debug("xds: snapshots built", "proxies", len(cat.Proxies), "changed", set, "took", time.Since(start))
}

// holdBack logs, once per reason, that node keeps its last snapshot.
func (s *Server) holdBack(node string, err error) {
	s.mu.Lock()
	same := s.notReady[node] == err.Error()
	s.notReady[node] = err.Error()
	s.mu.Unlock()
	if !same {
		s.log.Info("xds: snapshot held back; the proxy keeps its last config", "node", node, "reason", err)
	}
}

func (s *Server) publish(ctx context.Context, node string, r translate.Resources) bool {
	snap := &cache.Snapshot{}
	var all string
	add := func(t types.ResponseType, items []types.Resource) {
		v := version(items)
		snap.Resources[t] = cache.NewResources(v, items)
		all += v + "/"
	}
	add(types.Listener, toResources(r.Listeners))
	add(types.Route, toResources(r.Routes))
	add(types.Cluster, toResources(r.Clusters))
	add(types.Endpoint, toResources(r.Endpoints))
	add(types.Secret, toResources(r.Secrets))

	s.mu.Lock()
	unchanged := s.versions[node] == all
	s.mu.Unlock()
	if unchanged {
		return false
	}
	if err := snap.Consistent(); err != nil {
		s.log.Error("xds: inconsistent snapshot not published; node keeps its last one", "node", node, "error", err)
		return false
	}
	if err := s.cache.SetSnapshot(ctx, node, snap); err != nil {
		s.log.Error("xds: set snapshot", "node", node, "error", err)
		return false
	}
	s.mu.Lock()
	s.versions[node] = all
	s.mu.Unlock()
	return true
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
	for _, r := range items {
		b, err := opts.Marshal(r)
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
		StreamRequestFunc: s.onRequest,
		StreamResponseFunc: func(_ context.Context, id int64, _ *discovery.DiscoveryRequest, resp *discovery.DiscoveryResponse) {
			s.guard.OnStreamResponse(id, resp)
		},
		StreamClosedFunc: func(id int64, node *core.Node) {
			s.guard.OnStreamClosed(id)
			s.mu.Lock()
			delete(s.streams, id)
			s.mu.Unlock()
			s.log.Info("xds: stream closed", "stream", id, "node", node.GetId())
		},
	}
}

// onRequest logs each new node and every NACK (a request carrying
// error_detail) with the node, the type, the rejected version and the
// error, and parks the NACKed watch until the snapshot changes.
func (s *Server) onRequest(id int64, req *discovery.DiscoveryRequest) error {
	node := req.GetNode()
	s.mu.Lock()
	first := s.streams[id] == nil
	if first && node != nil {
		s.streams[id] = node
	} else {
		node = s.streams[id]
	}
	var unknown bool
	if first && s.catalog != nil && !xds.IsProxylessGRPC(node) {
		if _, ok := s.catalog.Proxies[node.GetId()]; !ok && !s.unknownLogged[node.GetId()] {
			unknown = true
			s.unknownLogged[node.GetId()] = true
		}
	}
	s.mu.Unlock()
	if first {
		s.log.Info("xds: stream opened", "stream", id, "node", node.GetId(), "userAgent", node.GetUserAgentName())
	}
	if unknown {
		s.log.Warn("xds: no connect-proxy is registered in Consul with this node ID; it gets config once one is",
			"node", node.GetId())
	}
	if d := req.GetErrorDetail(); d != nil {
		accepted := req.GetVersionInfo()
		rejected, parked := s.guard.OnStreamRequest(id, req)
		s.log.Warn("xds: NACK: the proxy rejected an update and keeps its last accepted config",
			"node", node.GetId(), "type", req.GetTypeUrl(), "rejectedVersion", rejected,
			"acceptedVersion", accepted, "error", d.GetMessage(), "heldUntilConfigChanges", parked)
	}
	return nil
}

// cacheLogger adapts slog to go-control-plane's logger at debug level.
type cacheLogger struct{ l *slog.Logger }

func (c cacheLogger) Debugf(f string, a ...any) { c.l.Debug(fmt.Sprintf(f, a...)) }
func (c cacheLogger) Infof(f string, a ...any)  { c.l.Debug(fmt.Sprintf(f, a...)) }
func (c cacheLogger) Warnf(f string, a ...any)  { c.l.Warn(fmt.Sprintf(f, a...)) }
func (c cacheLogger) Errorf(f string, a ...any) { c.l.Error(fmt.Sprintf(f, a...)) }
