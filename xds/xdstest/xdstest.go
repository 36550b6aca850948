// Package xdstest runs a real go-control-plane ADS management server on a
// loopback port for tests: snapshots are set by hand, so tests can serve
// exactly the resources they need, including deliberately invalid ones, and
// inspect every request the client sent (ACKs, NACKs and their details).
// Like meshlet's control plane it parks NACKed watches
// (controlplane/server/nackguard).
package xdstest

import (
	"context"
	"net"
	"slices"
	"sync"
	"testing"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	"github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	xdsserver "github.com/envoyproxy/go-control-plane/pkg/server/v3"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/proto"

	"github.com/meshlet/meshlet/controlplane/server/nackguard"
)

// Server is a running management server.
type Server struct {
	// Addr is the server's "127.0.0.1:port".
	Addr string
	// Cache holds the snapshots served, keyed by node ID.
	Cache cache.SnapshotCache

	grpc *grpc.Server
	lis  net.Listener
	stop context.CancelFunc
	done chan struct{}

	mu       sync.Mutex // guards requests and times
	requests []*discovery.DiscoveryRequest
	times    []time.Time // arrival time of each request
}

// Start starts a server on 127.0.0.1 with a free port and stops it when t
// ends.
func Start(t testing.TB) *Server {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := startOnCache(lis, cache.NewSnapshotCache(true, cache.IDHash{}, nil), true)
	t.Cleanup(s.Stop)
	return s
}

// StartOn starts a server on lis, a listener the test opened (e.g. inside
// a network namespace of its own), and stops it when t ends.
func StartOn(t testing.TB, lis net.Listener) *Server {
	t.Helper()
	s := startOnCache(lis, cache.NewSnapshotCache(true, cache.IDHash{}, nil), true)
	t.Cleanup(s.Stop)
	return s
}

// StartUnguarded starts a server without the NACK guard: plain
// go-control-plane behaviour, which resends a rejected version at once. It
// lets tests check that clients pace their NACKs against such servers.
func StartUnguarded(t testing.TB) *Server {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := startOnCache(lis, cache.NewSnapshotCache(true, cache.IDHash{}, nil), false)
	t.Cleanup(s.Stop)
	return s
}

// Restart starts a new server on the same address as a stopped one,
// serving the same cache.
func (s *Server) Restart(t testing.TB) *Server {
	t.Helper()
	var lis net.Listener
	var err error
	for i := 0; i < 50; i++ { // the old socket may linger for a moment
		if lis, err = net.Listen("tcp", s.Addr); err == nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		t.Fatal(err)
	}
	n := startOnCache(lis, s.Cache, true)
	t.Cleanup(n.Stop)
	return n
}

func startOnCache(lis net.Listener, c cache.SnapshotCache, guarded bool) *Server {
	ctx, cancel := context.WithCancel(context.Background())
	s := &Server{Addr: lis.Addr().String(), Cache: c, lis: lis, stop: cancel, done: make(chan struct{})}
	s.grpc = grpc.NewServer()
	guard := nackguard.New(c, cache.IDHash{})
	srv := xdsserver.NewServer(ctx, c, xdsserver.CallbackFuncs{
		StreamRequestFunc: func(id int64, req *discovery.DiscoveryRequest) error {
			s.mu.Lock()
			s.requests = append(s.requests, proto.Clone(req).(*discovery.DiscoveryRequest))
			s.times = append(s.times, time.Now())
			s.mu.Unlock()
			if guarded {
				guard.OnStreamRequest(id, req)
			}
			return nil
		},
		StreamResponseFunc: func(_ context.Context, id int64, _ *discovery.DiscoveryRequest, resp *discovery.DiscoveryResponse) {
			guard.OnStreamResponse(id, resp)
		},
		StreamClosedFunc: func(id int64, _ *core.Node) { guard.OnStreamClosed(id) },
	})
	discovery.RegisterAggregatedDiscoveryServiceServer(s.grpc, srv)
	go func() {
		defer close(s.done)
		_ = s.grpc.Serve(lis)
	}()
	return s
}

// Stop stops the server, ending open streams. It is idempotent.
func (s *Server) Stop() {
	s.stop()
	s.grpc.Stop()
	<-s.done
}

// Resources are the resources of one snapshot by type.
type Resources struct {
	Listeners, Routes, Clusters, Endpoints, Secrets []types.Resource
}

// Set publishes a snapshot for node with one version for all types. It
// does not check consistency, so tests can serve anything.
func (s *Server) Set(t testing.TB, node, version string, r Resources) {
	t.Helper()
	snap := &cache.Snapshot{}
	snap.Resources[types.Listener] = cache.NewResources(version, r.Listeners)
	snap.Resources[types.Route] = cache.NewResources(version, r.Routes)
	snap.Resources[types.Cluster] = cache.NewResources(version, r.Clusters)
	snap.Resources[types.Endpoint] = cache.NewResources(version, r.Endpoints)
	snap.Resources[types.Secret] = cache.NewResources(version, r.Secrets)
	if err := s.Cache.SetSnapshot(context.Background(), node, snap); err != nil {
		t.Fatal(err)
	}
}

// Requests returns a copy of every request received so far.
func (s *Server) Requests() []*discovery.DiscoveryRequest {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.requests)
}

// RequestTimes returns the arrival time of every request, in the order of
// Requests.
func (s *Server) RequestTimes() []time.Time {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.times)
}

// WaitRequest polls until a received request satisfies match and returns
// it, failing t after timeout.
func (s *Server) WaitRequest(t testing.TB, timeout time.Duration, what string, match func(*discovery.DiscoveryRequest) bool) *discovery.DiscoveryRequest {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		for _, r := range s.Requests() {
			if match(r) {
				return r
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("xdstest: no request %s within %v (got %d requests)", what, timeout, len(s.Requests()))
		}
		time.Sleep(10 * time.Millisecond)
	}
}
