package server

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	cluster "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil/promlint"
	dto "github.com/prometheus/client_model/go"
	"google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"

	"github.com/meshlet/meshlet/controlplane/policy"
	"github.com/meshlet/meshlet/internal/testutil"
	"github.com/meshlet/meshlet/xds"
)

// adsClient is a bare ADS stream to a Server, driven by the test.
type adsClient struct {
	t      *testing.T
	conn   *grpc.ClientConn
	stream discovery.AggregatedDiscoveryService_StreamAggregatedResourcesClient
	node   *core.Node
	cancel context.CancelFunc
}

// serveADS serves s's ADS on a loopback port until the test's cleanups,
// registered now so that they run after those registered later (the
// clients'): s is closed and its Serve returned. It returns the address.
func serveADS(t *testing.T, s *Server) string {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan struct{})
	go func() {
		defer close(served)
		_ = s.Serve(lis)
	}()
	t.Cleanup(func() {
		s.Close()
		<-served
	})
	return lis.Addr().String()
}

func dialADS(t *testing.T, addr, node string) *adsClient {
	t.Helper()
	return dialADSNode(t, addr, &core.Node{Id: node, UserAgentName: xds.UserAgentName})
}

// dialADSNode opens an ADS stream whose requests carry node.
func dialADSNode(t *testing.T, addr string, node *core.Node) *adsClient {
	t.Helper()
	return dialADSMetadata(t, addr, node, nil)
}

// dialADSMetadata opens an ADS stream carrying md (gRPC metadata, e.g. an
// authorization token) whose requests carry node.
func dialADSMetadata(t *testing.T, addr string, node *core.Node, md metadata.MD) *adsClient {
	t.Helper()
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(metadata.NewOutgoingContext(context.Background(), md))
	stream, err := discovery.NewAggregatedDiscoveryServiceClient(conn).StreamAggregatedResources(ctx)
	if err != nil {
		cancel()
		conn.Close()
		t.Fatal(err)
	}
	c := &adsClient{t: t, conn: conn, stream: stream, node: node, cancel: cancel}
	t.Cleanup(c.close)
	return c
}

func (c *adsClient) close() {
	c.cancel()
	c.conn.Close()
}

func (c *adsClient) send(req *discovery.DiscoveryRequest) {
	c.t.Helper()
	req.Node = c.node
	if err := c.stream.Send(req); err != nil {
		c.t.Fatal(err)
	}
}

// recv waits up to 5 s for the next response.
func (c *adsClient) recv() *discovery.DiscoveryResponse {
	c.t.Helper()
	type result struct {
		resp *discovery.DiscoveryResponse
		err  error
	}
	ch := make(chan result, 1)
	go func() {
		r, err := c.stream.Recv()
		ch <- result{r, err}
	}()
	select {
	case r := <-ch:
		if r.err != nil {
			c.t.Fatal(r.err)
		}
		return r.resp
	case <-time.After(5 * time.Second):
		c.t.Fatal("no response within 5s")
		return nil
	}
}

func servePolicies(t *testing.T, files map[string]string) *policy.Set {
	t.Helper()
	in := map[string][]byte{}
	for k, v := range files {
		in[k] = []byte(v)
	}
	set, err := policy.Parse(in)
	if err != nil {
		t.Fatal(err)
	}
	return set
}

const apiHTTP = "apiVersion: meshlet.io/v1alpha1\nkind: ServiceDefaults\nmetadata: {name: api}\nspec: {service: api, protocol: http}\n"

func retryOn(cond string) string {
	return "apiVersion: meshlet.io/v1alpha1\nkind: RetryPolicy\nmetadata: {name: api-retries}\nspec:\n  service: api\n  retryOn: [" + cond + "]\n"
}

func waitStatus(t *testing.T, s *Server, what string, cond func(*Status) bool) *Status {
	t.Helper()
	return testutil.Poll(t, 5*time.Second, "status to show "+what, func() (*Status, error) {
		st := s.Status()
		if cond(st) {
			return st, nil
		}
		return nil, fmt.Errorf("status %+v", st)
	})
}

func proxyStatus(st *Status, node string) ProxyStatus {
	for _, p := range st.Proxies {
		if p.Node == node {
			return p
		}
	}
	return ProxyStatus{}
}

// TestNACKRecordedWithSourcesAndClearedByACK drives a real ADS stream: the
// route configuration "api" is NACKed, the rejection shows in Status with
// the policy document behind it and in the metrics; a fixed policy set
// brings a new version, whose ACK clears the rejection.
func TestNACKRecordedWithSourcesAndClearedByACK(t *testing.T) {
	s := New(Config{Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	reg := prometheus.NewRegistry()
	reg.MustRegister(s.Collector())
	addr := serveADS(t, s)

	if ok, why := s.Ready(); ok || !strings.Contains(why, "Consul catalog") {
		t.Errorf("Ready before any catalog = %v, %q", ok, why)
	}
	s.SetPolicies(servePolicies(t, map[string]string{"policies/api.yaml": apiHTTP, "policies/retry.yaml": retryOn("envoy-ratelimited")}))
	s.SetCatalog(catalog(true))
	const web = "web-1-sidecar-proxy"
	waitVersions(t, s, web, func(map[string]string) bool { return true })
	if ok, _ := s.Ready(); !ok {
		t.Error("not ready after the first catalog")
	}

	c := dialADS(t, addr, web)
	c.send(&discovery.DiscoveryRequest{TypeUrl: xds.RouteType, ResourceNames: []string{"api"}})
	r1 := c.recv()
	detail := `resources[0]: route configuration "api": virtual_hosts[0].routes[0]: route.retry_policy: retry_on: unsupported condition "envoy-ratelimited"`
	c.send(&discovery.DiscoveryRequest{TypeUrl: xds.RouteType, ResourceNames: []string{"api"}, ResponseNonce: r1.GetNonce(),
		ErrorDetail: &status.Status{Code: 3, Message: detail}})

	st := waitStatus(t, s, "the rejection", func(st *Status) bool { return len(st.Rejections) == 1 })
	rej := st.Rejections[0]
	if rej.Node != web || rej.TypeURL != xds.RouteType || rej.Version != r1.GetVersionInfo() || rej.AcceptedVersion != "" ||
		rej.Error != detail || !rej.Named || rej.Count != 1 || rej.Time.IsZero() {
		t.Errorf("rejection = %+v", rej)
	}
	if len(rej.Resources) != 1 || rej.Resources[0].Name != "api" {
		t.Fatalf("rejected resources = %+v, want route configuration api", rej.Resources)
	}
	var srcs []string
	for _, src := range rej.Sources() {
		srcs = append(srcs, src.String())
	}
	all := strings.Join(srcs, "\n")
	for _, want := range []string{"policies/retry.yaml:1 (RetryPolicy api-retries)", "policies/api.yaml:1 (ServiceDefaults api)",
		`consul connect-proxy registration "web-1-sidecar-proxy" (upstream api)`} {
		if !strings.Contains(all, want) {
			t.Errorf("sources lack %q:\n%s", want, all)
		}
	}
	p := proxyStatus(st, web)
	if !p.Connected || !p.Registered || p.Service != "web" || p.Kind != KindSidecar || p.Sent[xds.RouteType] != r1.GetVersionInfo() ||
		p.ACKed[xds.RouteType] != "" || p.Snapshot[xds.RouteType] != r1.GetVersionInfo() {
		t.Errorf("web's status = %+v", p)
	}
	if api := proxyStatus(st, "api-1-sidecar-proxy"); api.Connected || !api.Registered {
		t.Errorf("api's status = %+v, want registered and not connected", api)
	}

	// The fix: a condition the sidecar implements. The new version is ACKed.
	s.SetPolicies(servePolicies(t, map[string]string{"policies/api.yaml": apiHTTP, "policies/retry.yaml": retryOn("5xx")}))
	r2 := c.recv()
	if r2.GetVersionInfo() == r1.GetVersionInfo() {
		t.Fatalf("the fixed policy did not change the route version %s", r2.GetVersionInfo())
	}
	c.send(&discovery.DiscoveryRequest{TypeUrl: xds.RouteType, ResourceNames: []string{"api"}, ResponseNonce: r2.GetNonce(), VersionInfo: r2.GetVersionInfo()})
	st = waitStatus(t, s, "the rejection cleared by the ACK", func(st *Status) bool { return len(st.Rejections) == 0 })
	if got := proxyStatus(st, web).ACKed[xds.RouteType]; got != r2.GetVersionInfo() {
		t.Errorf("ACKed route version = %q, want %q", got, r2.GetVersionInfo())
	}

	// The build loop counts a snapshot and observes its push latency after
	// SetSnapshot returns, and SetSnapshot has already handed the response
	// to web's stream by then: web can receive r2 and its ACK be recorded
	// before the loop counts r2's snapshot. Wait for the counts to follow.
	var mfs []*dto.MetricFamily
	testutil.Eventually(t, 5*time.Second, "the build loop to count the snapshots it set", func() error {
		var err error
		if mfs, err = reg.Gather(); err != nil {
			return err
		}
		if v := sample(mfs, "meshlet_controlplane_snapshots_set_total", nil); v < 4 {
			return fmt.Errorf("snapshots_set_total = %v, want at least 4 (web, api, proxyless, web again)", v)
		}
		for _, trigger := range []string{TriggerConsul, TriggerPolicy} {
			if v := sample(mfs, "meshlet_controlplane_push_latency_seconds", map[string]string{"trigger": trigger}); v < 1 {
				return fmt.Errorf("push_latency_seconds{trigger=%s} has %v observations, want some", trigger, v)
			}
		}
		return nil
	})
	if v := sample(mfs, "meshlet_controlplane_xds_nacks_total", map[string]string{"node": web, "type": xds.RouteType}); v != 1 {
		t.Errorf("nacks_total{node=web, type=route} = %v, want 1", v)
	}
	if v := sample(mfs, "meshlet_controlplane_xds_acks_total", map[string]string{"type": xds.RouteType}); v != 1 {
		t.Errorf("acks_total{type=route} = %v, want 1", v)
	}
	if v := sample(mfs, "meshlet_controlplane_proxies_connected", map[string]string{"kind": KindSidecar}); v != 1 {
		t.Errorf("proxies_connected{kind=sidecar} = %v, want 1", v)
	}
	problems, err := promlint.NewWithMetricFamilies(mfs).Lint()
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		t.Errorf("promlint: %s: %s", p.Metric, p.Text)
	}
}

// TestNACKBlamesTheResourceOfItsDetails: the control plane blames the
// resource a sidecar's NACK names in its structured details
// (xds.NewNACKStatus), not one its message happens to quote.
func TestNACKBlamesTheResourceOfItsDetails(t *testing.T) {
	s := New(Config{Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	addr := serveADS(t, s)
	s.SetPolicies(servePolicies(t, map[string]string{"policies/api.yaml": apiHTTP, "policies/retry.yaml": retryOn("5xx")}))
	s.SetCatalog(catalog(true))
	const web = "web-1-sidecar-proxy"
	waitVersions(t, s, web, func(map[string]string) bool { return true })

	c := dialADS(t, addr, web)
	c.send(&discovery.DiscoveryRequest{TypeUrl: xds.ClusterType})
	r1 := c.recv()
	var names []string
	for _, a := range r1.GetResources() {
		var cl cluster.Cluster
		if err := a.UnmarshalTo(&cl); err != nil {
			t.Fatal(err)
		}
		names = append(names, cl.GetName())
	}
	if !slices.Contains(names, "api") || !slices.Contains(names, xds.LocalAppCluster) {
		t.Fatalf("web's clusters = %q, want api and %s", names, xds.LocalAppCluster)
	}
	msg := `resources[0]: cluster "` + xds.LocalAppCluster + `": the message quotes another cluster`
	c.send(&discovery.DiscoveryRequest{TypeUrl: xds.ClusterType, ResponseNonce: r1.GetNonce(),
		ErrorDetail: xds.NewNACKStatus(msg, xds.NACKDetail{TypeURL: xds.ClusterType, Name: "api", Field: "lb_policy"})})

	st := waitStatus(t, s, "the rejection", func(st *Status) bool { return len(st.Rejections) == 1 })
	rej := st.Rejections[0]
	if rej.TypeURL != xds.ClusterType || rej.Error != msg || !rej.Named {
		t.Errorf("rejection = %+v", rej)
	}
	if len(rej.Resources) != 1 || rej.Resources[0].Name != "api" || rej.Resources[0].Field != "lb_policy" {
		t.Fatalf("rejected resources = %+v, want cluster api, field lb_policy (from the details)", rej.Resources)
	}
	var srcs []string
	for _, src := range rej.Sources() {
		srcs = append(srcs, src.String())
	}
	if all := strings.Join(srcs, "\n"); !strings.Contains(all, "policies/api.yaml:1 (ServiceDefaults api)") {
		t.Errorf("sources of cluster api lack its ServiceDefaults:\n%s", all)
	}
}

// sample returns the value of the counter or gauge, or the observation
// count of the histogram, name whose labels include labels.
func sample(mfs []*dto.MetricFamily, name string, labels map[string]string) float64 {
	total := 0.0
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
	metric:
		for _, m := range mf.GetMetric() {
			for k, v := range labels {
				found := false
				for _, lp := range m.GetLabel() {
					if lp.GetName() == k && lp.GetValue() == v {
						found = true
					}
				}
				if !found {
					continue metric
				}
			}
			switch {
			case m.Counter != nil:
				total += m.GetCounter().GetValue()
			case m.Gauge != nil:
				total += m.GetGauge().GetValue()
			case m.Histogram != nil:
				total += float64(m.GetHistogram().GetSampleCount())
			}
		}
	}
	return total
}

func TestHeldBackCountedAndShown(t *testing.T) {
	s := New(Config{Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	defer s.Close()
	reg := prometheus.NewRegistry()
	reg.MustRegister(s.Collector())
	cat := catalog(true)
	delete(cat.Leaves, "web")
	s.SetCatalog(cat)
	waitVersions(t, s, "api-1-sidecar-proxy", func(map[string]string) bool { return true })
	st := waitStatus(t, s, "web held back", func(st *Status) bool { return proxyStatus(st, "web-1-sidecar-proxy").HeldBack != "" })
	if hb := proxyStatus(st, "web-1-sidecar-proxy").HeldBack; !strings.Contains(hb, `leaf certificate of service "web"`) {
		t.Errorf("HeldBack = %q", hb)
	}
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	if v := sample(mfs, "meshlet_controlplane_snapshots_held_back", map[string]string{"reason": HeldNotReady}); v != 1 {
		t.Errorf("snapshots_held_back{reason=not_ready} = %v, want 1", v)
	}
	s.SetCatalog(catalog(true))
	waitStatus(t, s, "web no longer held back", func(st *Status) bool { return proxyStatus(st, "web-1-sidecar-proxy").HeldBack == "" })
}

// identityKey is the context key under which fakeAuth stores a stream's
// identity.
type identityKey struct{}

// authStream is a server stream with the context fakeAuth gave it.
type authStream struct {
	grpc.ServerStream
	ctx context.Context
}

func (a authStream) Context() context.Context { return a.ctx }

// fakeAuth is a stream interceptor standing for the ADS authentication:
// it takes the bearer token of the stream's metadata for its identity and
// stores it in the stream's context.
func fakeAuth(srv any, ss grpc.ServerStream, _ *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	ctx := ss.Context()
	if v := metadata.ValueFromIncomingContext(ctx, xds.AuthorizationMetadataKey); len(v) > 0 {
		ctx = context.WithValue(ctx, identityKey{}, strings.TrimPrefix(v[0], xds.BearerPrefix))
	}
	return handler(srv, authStream{ss, ctx})
}

// identityOf is a Config.StreamIdentity reading what fakeAuth stored.
func identityOf(ctx context.Context) string {
	id, _ := ctx.Value(identityKey{}).(string)
	return id
}

// TestStreamIdentityShownInStatus: the identity Config.StreamIdentity
// returns for a stream's context when it opens shows in Status for the
// stream's node: that of its newest stream.
func TestStreamIdentityShownInStatus(t *testing.T) {
	const (
		webID   = "kubernetes:default/web pod web-7d9c/uid-3f1c"
		tokenID = "consul-token:6a1253d2-1785-24fd-91c2-f8e78c745511"
	)
	web := &core.Node{Id: "web-1-sidecar-proxy", UserAgentName: xds.UserAgentName}
	tests := []struct {
		name     string
		identity func(context.Context) string
		node     *core.Node
		// tokens are the bearer tokens of the node's streams, opened in
		// this order ("": none).
		tokens []string
		want   string
	}{
		{name: "authenticated sidecar", identity: identityOf, node: web, tokens: []string{webID}, want: webID},
		{name: "unauthenticated stream", identity: identityOf, node: web, tokens: []string{""}, want: ""},
		{name: "no StreamIdentity", node: web, tokens: []string{webID}, want: ""},
		{name: "proxyless client", identity: identityOf, node: grpcNode("client-a"), tokens: []string{tokenID}, want: tokenID},
		{name: "newest stream's", identity: identityOf, node: web, tokens: []string{tokenID, webID}, want: webID},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			s := New(Config{Logger: slog.New(slog.NewTextHandler(io.Discard, nil)), StreamIdentity: tc.identity,
				GRPCOptions: []grpc.ServerOption{grpc.StreamInterceptor(fakeAuth)}})
			addr := serveADS(t, s)
			s.SetCatalog(catalog(true))
			id := tc.node.GetId()
			var p ProxyStatus
			for i, token := range tc.tokens {
				md := metadata.MD{}
				if token != "" {
					md.Set(xds.AuthorizationMetadataKey, xds.BearerPrefix+token)
				}
				dialADSMetadata(t, addr, tc.node, md).send(&discovery.DiscoveryRequest{TypeUrl: xds.ClusterType})
				st := waitStatus(t, s, fmt.Sprintf("%s's stream %d", id, i+1), func(st *Status) bool { return proxyStatus(st, id).Streams == i+1 })
				p = proxyStatus(st, id)
			}
			if p.Identity != tc.want {
				t.Errorf("%s's identity = %q, want %q", id, p.Identity, tc.want)
			}
		})
	}
}

// historyCheckingCache is the server's snapshot cache, checking at each
// SetSnapshot that the node's published history already holds the
// snapshot being set: the cache may answer a watch, and the node NACK it,
// before SetSnapshot returns.
type historyCheckingCache struct {
	cache.SnapshotCache
	s      *Server
	t      *testing.T
	checks atomic.Int32
}

func (c *historyCheckingCache) SetSnapshot(ctx context.Context, node string, snap cache.ResourceSnapshot) error {
	c.s.mu.Lock()
	var h []*published
	if n := c.s.nodes[node]; n != nil {
		h = n.published
	}
	c.s.mu.Unlock()
	if len(h) == 0 || h[len(h)-1].versions[xds.RouteType] != snap.GetVersion(xds.RouteType) {
		c.t.Errorf("%s: snapshot set before its record was published (history %d long): a NACK of it would find nothing to blame", node, len(h))
	}
	c.checks.Add(1)
	return c.SnapshotCache.SetSnapshot(ctx, node, snap)
}

// TestSnapshotRecordedBeforeItIsSent: what CI once met as a NACK whose
// rejected version was "no longer held" — the record of a sidecar's
// snapshot is in its history before the cache can send the snapshot.
func TestSnapshotRecordedBeforeItIsSent(t *testing.T) {
	s := New(Config{Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	t.Cleanup(s.Close)
	hc := &historyCheckingCache{SnapshotCache: s.cache, s: s, t: t}
	s.cache = hc
	s.SetPolicies(servePolicies(t, map[string]string{"policies/api.yaml": apiHTTP}))
	s.SetCatalog(catalog(true))
	waitVersions(t, s, "web-1-sidecar-proxy", func(map[string]string) bool { return true })
	s.SetPolicies(servePolicies(t, map[string]string{"policies/api.yaml": apiHTTP, "policies/retry.yaml": retryOn("envoy-ratelimited")}))
	testutil.Until(t, 5*time.Second, "the policy change published", func() bool { return hc.checks.Load() >= 3 })
}
