package httpproxy

import (
	"bufio"
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"

	"github.com/meshlet/meshlet/internal/testutil"
	"github.com/meshlet/meshlet/sidecar/cluster"
	"github.com/meshlet/meshlet/sidecar/config"
	"github.com/meshlet/meshlet/xds"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func TestRouteTableMatching(t *testing.T) {
	rc := &config.RouteConfig{Name: "rc", VirtualHosts: []*config.VirtualHost{
		{Name: "exact", Domains: []string{"api.example.com", "api.example.com:8080"}, Routes: []*config.Route{
			{Name: "health", Match: config.MatchPath, Path: "/health", CaseSensitive: true, Cluster: "health"},
			{Name: "v1", Match: config.MatchPrefix, Path: "/v1/", CaseSensitive: false, Cluster: "v1"},
			{Name: "rest", Match: config.MatchPrefix, Path: "/", CaseSensitive: true, Cluster: "rest"},
		}},
		{Name: "suffix", Domains: []string{"*.example.com"}, Routes: []*config.Route{{Match: config.MatchPrefix, Path: "/", Cluster: "suffix"}}},
		{Name: "longer-suffix", Domains: []string{"*.eu.example.com"}, Routes: []*config.Route{{Match: config.MatchPrefix, Path: "/", Cluster: "eu"}}},
		{Name: "prefix", Domains: []string{"api.*"}, Routes: []*config.Route{{Match: config.MatchPrefix, Path: "/", Cluster: "prefix"}}},
		{Name: "any", Domains: []string{"*"}, Routes: []*config.Route{{Match: config.MatchPrefix, Path: "/only/", Cluster: "any"}}},
	}}
	table := newRouteTable(rc, "")
	tests := []struct {
		name, host, path, want string
	}{
		{"exact host, exact path", "api.example.com", "/health", "health"},
		{"exact path does not match a longer one", "api.example.com", "/healthz", "rest"},
		{"case-insensitive prefix", "api.example.com", "/V1/users?x=1", "v1"},
		{"host with port falls back to the bare host", "API.example.com:9999", "/x", "rest"},
		{"host with a listed port", "api.example.com:8080", "/x", "rest"},
		{"suffix wildcard", "web.example.com", "/", "suffix"},
		{"longest suffix wins", "a.eu.example.com", "/", "eu"},
		{"prefix wildcard", "api.internal", "/", "prefix"},
		{"catch-all host", "other", "/only/x", "any"},
		{"no route in the catch-all host", "other", "/else", ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got := ""
			if r := table.routeFor(tc.host, tc.path, "GET", nil); r != nil {
				got = r.Cluster
			}
			if got != tc.want {
				t.Errorf("route(%q, %q) = %q, want %q", tc.host, tc.path, got, tc.want)
			}
		})
	}
}

// proxy runs a Server for one route "/" → cluster "c" with the given
// endpoints and route timeout, and returns its address.
func proxy(t *testing.T, proto xds.Protocol, timeout time.Duration, endpoints ...string) string {
	t.Helper()
	clusters := cluster.NewManager(nil, nil, nil)
	t.Cleanup(clusters.Close)
	var eps []config.Endpoint
	for _, e := range endpoints {
		eps = append(eps, config.Endpoint{Address: e, Weight: 1})
	}
	clusters.Update(map[string]*config.Cluster{
		"c": {Name: "c", Type: config.ClusterStatic, ConnectTimeout: time.Second, Protocol: proto, Static: &config.LoadAssignment{ClusterName: "c", Endpoints: eps}},
	}, nil)
	l := &config.Listener{Name: "l", Chains: []*config.FilterChain{{HTTP: &config.HTTPConnectionManager{Via: "test-proxy", RouteConfig: &config.RouteConfig{
		Name: "rc", VirtualHosts: []*config.VirtualHost{
			{Name: "vh", Domains: []string{"*"}, Routes: []*config.Route{
				{Match: config.MatchPrefix, Path: "/missing-cluster", CaseSensitive: true, Cluster: "nope"},
				{Match: config.MatchPrefix, Path: "/", CaseSensitive: true, Cluster: "c", Timeout: timeout},
			}},
			{Name: "empty", Domains: []string{"no-routes.internal"}},
		},
	}}}}}
	return serve(t, NewServer(l, &config.Snapshot{}, clusters, slog.New(slog.NewTextHandler(io.Discard, nil)), Options{}))
}

// serve runs s on a loopback listener until tb ends and returns its address.
func serve(tb testing.TB, s *Server) string { return serveTLS(tb, s, nil) }

// serveTLS is serve terminating TLS with srvTLS first (nil: plaintext), as
// the sidecar's inbound listener does: the handshake, bounded to 5 s, is
// done before Handle.
func serveTLS(tb testing.TB, s *Server, srvTLS *tls.Config) string {
	tb.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	var wg sync.WaitGroup
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			if srvTLS == nil {
				s.Handle(c)
				continue
			}
			wg.Go(func() {
				tc := tls.Server(c, srvTLS)
				ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
				defer cancel()
				if err := tc.HandshakeContext(ctx); err != nil {
					c.Close()
					return
				}
				s.Handle(tc)
			})
		}
	})
	tb.Cleanup(func() {
		ln.Close()
		wg.Wait()
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		s.Shutdown(ctx)
	})
	return ln.Addr().String()
}

func TestTypedFailureReasons(t *testing.T) {
	closedPort := testutil.RefusedAddr(t)
	hang := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-r.Context().Done():
		case <-time.After(5 * time.Second):
		}
	}))
	defer hang.Close()
	reset := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		conn, _, _ := w.(http.Hijacker).Hijack()
		conn.Close() // no response at all
	}))
	defer reset.Close()

	tests := []struct {
		name      string
		endpoints []string
		timeout   time.Duration
		path      string
		status    int
		reason    xds.FailureReason
	}{
		{"no route", []string{hang.Listener.Addr().String()}, 0, "", http.StatusNotFound, xds.ReasonNoRoute},
		{"unknown cluster", []string{hang.Listener.Addr().String()}, 0, "/missing-cluster", http.StatusServiceUnavailable, xds.ReasonNoCluster},
		{"no endpoints", nil, 0, "/", http.StatusServiceUnavailable, xds.ReasonNoHealthyUpstream},
		{"connection refused", []string{closedPort}, 0, "/", http.StatusServiceUnavailable, xds.ReasonConnectFailure},
		{"route timeout", []string{hang.Listener.Addr().String()}, 100 * time.Millisecond, "/", http.StatusGatewayTimeout, xds.ReasonUpstreamTimeout},
		{"upstream closes without answering", []string{reset.Listener.Addr().String()}, 0, "/", http.StatusServiceUnavailable, xds.ReasonUpstreamReset},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			addr := proxy(t, xds.ProtocolHTTP, tc.timeout, tc.endpoints...)
			req, _ := http.NewRequest(http.MethodGet, "http://"+addr+tc.path, nil)
			if tc.path == "" {
				req.URL.Path = "/"
				req.Host = "no-routes.internal" // a virtual host without routes
			}
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			body, _ := io.ReadAll(resp.Body)
			if resp.StatusCode != tc.status || resp.Header.Get(ReasonHeader) != string(tc.reason) {
				t.Errorf("got %d %s=%q (%q), want %d %q", resp.StatusCode, ReasonHeader, resp.Header.Get(ReasonHeader), body, tc.status, tc.reason)
			}
		})
	}
}

func TestHeadersTrailersAndVia(t *testing.T) {
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Trailer", "X-Checksum")
		fmt.Fprintf(w, "x-secret=%q keep-alive=%q te=%q via=%q host=%q",
			r.Header.Get("X-Secret"), r.Header.Get("Keep-Alive"), r.Header.Get("Te"), r.Header.Get("Via"), r.Host)
		w.Header().Set("X-Checksum", "abc")
	}))
	defer up.Close()
	addr := proxy(t, xds.ProtocolHTTP, 0, up.Listener.Addr().String())

	conn, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	fmt.Fprint(conn, "GET /x HTTP/1.1\r\nHost: api.internal\r\nConnection: keep-alive, X-Secret\r\nX-Secret: s\r\nKeep-Alive: timeout=5\r\nTE: trailers, deflate\r\n\r\n")
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	want := `x-secret="" keep-alive="" te="trailers" via="1.1 test-proxy" host="api.internal"`
	if string(body) != want {
		t.Errorf("upstream saw %s\nwant        %s", body, want)
	}
	if got := resp.Header.Get("Via"); got != "1.1 test-proxy" {
		t.Errorf("response Via = %q", got)
	}
	if got := resp.Trailer.Get("X-Checksum"); got != "abc" {
		t.Errorf("trailer X-Checksum = %q, want abc (trailers %v)", got, resp.Trailer)
	}
}

func TestServerSentEventsAreFlushedAsTheyCome(t *testing.T) {
	release := make(chan struct{})
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/event-stream")
		fmt.Fprint(w, "data: first\n\n")
		w.(http.Flusher).Flush()
		select {
		case <-release:
		case <-r.Context().Done():
			return
		}
		fmt.Fprint(w, "data: second\n\n")
	}))
	defer up.Close()
	defer close(release)
	addr := proxy(t, xds.ProtocolHTTP, 0, up.Listener.Addr().String())
	resp, err := http.Get("http://" + addr + "/events")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	line, err := bufio.NewReader(resp.Body).ReadString('\n')
	if err != nil || line != "data: first\n" {
		t.Fatalf("first event = %q, %v (it must arrive before the stream ends)", line, err)
	}
}

func TestGRPCOverH2C(t *testing.T) {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	gs := grpc.NewServer()
	hs := health.NewServer()
	hs.SetServingStatus("known", healthpb.HealthCheckResponse_SERVING)
	healthpb.RegisterHealthServer(gs, hs)
	go func() { _ = gs.Serve(lis) }()
	defer gs.Stop()

	addr := proxy(t, xds.ProtocolGRPC, 0, lis.Addr().String())
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	hc := healthpb.NewHealthClient(conn)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()

	resp, err := hc.Check(ctx, &healthpb.HealthCheckRequest{Service: "known"})
	if err != nil || resp.GetStatus() != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("unary: %v %v", resp, err)
	}
	// grpc-status travels in trailers: an error code must survive the proxy.
	_, err = hc.Check(ctx, &healthpb.HealthCheckRequest{Service: "unknown"})
	if status.Code(err) != codes.NotFound {
		t.Errorf("unknown service: got %v, want NotFound", err)
	}
	// Server streaming: the first message arrives while the stream is open.
	stream, err := hc.Watch(ctx, &healthpb.HealthCheckRequest{Service: "known"})
	if err != nil {
		t.Fatal(err)
	}
	msg, err := stream.Recv()
	if err != nil || msg.GetStatus() != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("watch: %v %v", msg, err)
	}
	hs.SetServingStatus("known", healthpb.HealthCheckResponse_NOT_SERVING)
	msg, err = stream.Recv()
	if err != nil || msg.GetStatus() != healthpb.HealthCheckResponse_NOT_SERVING {
		t.Fatalf("watch update: %v %v", msg, err)
	}
	if strings.Contains(fmt.Sprint(err), "EOF") {
		t.Fatal(err)
	}
}
