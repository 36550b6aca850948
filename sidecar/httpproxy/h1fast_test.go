package httpproxy

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httptrace"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	rbacv3 "github.com/envoyproxy/go-control-plane/envoy/config/rbac/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	httprbacv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/rbac/v3"
	routerv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/router/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	"go.uber.org/goleak"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/meshlet/meshlet/internal/testutil"
	"github.com/meshlet/meshlet/sidecar/cluster"
	"github.com/meshlet/meshlet/sidecar/config"
	"github.com/meshlet/meshlet/xds"
)

// Tests of the HTTP/1.1 fast path (h1fast.go, h1head.go): the head parsers
// as units, then whole exchanges through a Server over loopback, with raw
// clients and upstreams where wire details matter. Where it is cheap the
// same exchange also runs with Options{NetHTTPOnly: true}, and the two
// paths must agree.

// --- helpers ---------------------------------------------------------------

// testRecorder is a Recorder that keeps everything it is told.
type testRecorder struct {
	mu      sync.Mutex // guards the fields below
	reqs    []RequestRecord
	retries []string // causes
	denied  []string // RetryDenied reasons
	open    int      // Connections sum
	opened  int      // Connections(+1) calls: 2 or more for a connection handed to net/http
}

var _ Recorder = (*testRecorder)(nil)

func (r *testRecorder) Request(rr RequestRecord) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.reqs = append(r.reqs, rr)
}

func (r *testRecorder) Retry(_, cause string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.retries = append(r.retries, cause)
}

func (r *testRecorder) RetryDenied(_, reason string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.denied = append(r.denied, reason)
}

func (r *testRecorder) AuthzDenied(string, string) {}

func (r *testRecorder) Connections(_ string, delta int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.open += delta
	if delta > 0 {
		r.opened++
	}
}

func (r *testRecorder) requests() []RequestRecord {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.reqs)
}

func (r *testRecorder) counts() (retries int, denied []string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.retries), slices.Clone(r.denied)
}

func (r *testRecorder) conns() (open, opened int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.open, r.opened
}

// proxyOpts configures startProxy.
type proxyOpts struct {
	endpoints   []string
	netHTTPOnly bool
	rec         Recorder
	retry       *config.RetryPolicy
	upgrades    []string
	rbac        *config.RBACFilter
	budget      *xds.RetryBudget // cluster c's retry budget; nil: the default
	bodyBuffer  int              // the "/" route's BodyBufferBytes; 0: DefaultBodyBufferBytes
	// rcvBuf, when positive, is the SO_RCVBUF of the proxy's downstream
	// sockets: a small one stands for a network that buffers less than a
	// loopback with autotuning (up to tcp_rmem's 32 MiB here).
	rcvBuf int
	// delayedClose is the chain's DelayedCloseTimeout: 0 is
	// DefaultDelayedCloseTimeout (as decoded from xDS without the field),
	// negative is 0 (off).
	delayedClose time.Duration
	// headersTimeout is the chain's RequestHeadersTimeout (0: none, as a
	// chain built by hand has); routeTimeout the "/" route's Timeout.
	headersTimeout, routeTimeout time.Duration
	// shedding is Options.Shedding.
	shedding *atomic.Bool
}

// startProxy runs a Server (Via "test-proxy") whose virtual host "*" routes
// "/missing-cluster" to an unknown cluster and "/" to cluster "c" (HTTP/1.1,
// o.endpoints, o.bodyBuffer or DefaultBodyBufferBytes), and whose virtual host
// "no-routes.internal" has no route. It returns the Server's address.
func startProxy(t *testing.T, o proxyOpts) (string, *Server) {
	t.Helper()
	clusters := cluster.NewManager(nil, nil, nil)
	t.Cleanup(clusters.Close)
	var eps []config.Endpoint
	for _, e := range o.endpoints {
		eps = append(eps, config.Endpoint{Address: e, Weight: 1})
	}
	clusters.Update(map[string]*config.Cluster{
		"c": {Name: "c", Type: config.ClusterStatic, ConnectTimeout: time.Second, Protocol: xds.ProtocolHTTP,
			Static: &config.LoadAssignment{ClusterName: "c", Endpoints: eps}, RetryBudget: o.budget},
	}, nil)
	bodyBuffer := config.DefaultBodyBufferBytes
	if o.bodyBuffer > 0 {
		bodyBuffer = o.bodyBuffer
	}
	delayedClose := config.DefaultDelayedCloseTimeout
	if o.delayedClose != 0 {
		delayedClose = max(o.delayedClose, 0)
	}
	hc := &config.HTTPConnectionManager{Via: "test-proxy", Upgrades: o.upgrades, RBAC: o.rbac, DelayedCloseTimeout: delayedClose,
		RequestHeadersTimeout: o.headersTimeout, RouteConfig: &config.RouteConfig{
			Name: "rc", VirtualHosts: []*config.VirtualHost{
				{Name: "vh", Domains: []string{"*"}, Routes: []*config.Route{
					{Name: "missing", Match: config.MatchPrefix, Path: "/missing-cluster", CaseSensitive: true, Cluster: "nope", BodyBufferBytes: config.DefaultBodyBufferBytes},
					{Name: "default", Match: config.MatchPrefix, Path: "/", CaseSensitive: true, Cluster: "c", Retry: o.retry, BodyBufferBytes: bodyBuffer, Timeout: o.routeTimeout},
				}},
				{Name: "empty", Domains: []string{"no-routes.internal"}},
			},
		}}
	l := &config.Listener{Name: "l", Chains: []*config.FilterChain{{HTTP: hc}}}
	s := NewServer(l, &config.Snapshot{}, clusters, slog.New(slog.DiscardHandler), Options{Recorder: o.rec, NetHTTPOnly: o.netHTTPOnly, Shedding: o.shedding})
	ln, err := listenWith(o.rcvBuf, 0)
	if err != nil {
		t.Fatal(err)
	}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			s.Handle(c)
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		// As serve does, but a Shutdown stuck on an exchange fails the test
		// instead of hanging it (the upstreams' cleanups, which run next,
		// then end the exchange).
		done := make(chan struct{})
		go func() {
			defer close(done)
			ctx, cancel := context.WithTimeout(context.Background(), time.Second)
			defer cancel()
			s.Shutdown(ctx)
		}()
		select {
		case <-done:
		case <-time.After(3 * time.Second):
			t.Error("Shutdown is stuck on an exchange (see TestShutdownReturnsAfterItsContext)")
		}
	})
	return ln.Addr().String(), s
}

// paths are the two ways a Server serves HTTP/1.1.
var paths = []struct {
	name        string
	netHTTPOnly bool
}{{"fast", false}, {"nethttp", true}}

// rawUpstream is a TCP upstream whose connections are served by handle,
// which reads and writes the wire itself.
type rawUpstream struct {
	ln      net.Listener
	accepts atomic.Int32
	mu      sync.Mutex // guards conns and closed
	conns   []net.Conn
	closed  bool
	wg      sync.WaitGroup
}

func newRawUpstream(t *testing.T, handle func(c net.Conn, br *bufio.Reader)) *rawUpstream {
	t.Helper()
	return newRawUpstreamWith(t, 0, 0, handle)
}

// newRawUpstreamWith is newRawUpstream whose sockets have SO_RCVBUF
// rcvBuf and TCP_MAXSEG mss (see listenWith).
func newRawUpstreamWith(t *testing.T, rcvBuf, mss int, handle func(c net.Conn, br *bufio.Reader)) *rawUpstream {
	t.Helper()
	ln, err := listenWith(rcvBuf, mss)
	if err != nil {
		t.Fatal(err)
	}
	u := &rawUpstream{ln: ln}
	u.wg.Add(1)
	go func() {
		defer u.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			u.accepts.Add(1)
			u.mu.Lock()
			if u.closed {
				u.mu.Unlock()
				c.Close()
				continue
			}
			u.conns = append(u.conns, c)
			u.wg.Add(1)
			u.mu.Unlock()
			go func() {
				defer u.wg.Done()
				defer c.Close()
				handle(c, bufio.NewReader(c))
			}()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		u.mu.Lock()
		u.closed = true
		for _, c := range u.conns {
			c.Close()
		}
		u.mu.Unlock()
		u.wg.Wait()
	})
	return u
}

func (u *rawUpstream) addr() string { return u.ln.Addr().String() }

// listenWith listens on a loopback port whose accepted sockets have
// SO_RCVBUF rcvBuf and advertise TCP_MAXSEG mss (each set before listen,
// so the window scale and the handshake see them; 0 keeps the kernel's
// autotuned buffer, and loopback's 64 KiB MSS). A small MSS makes the
// peer's send buffer small too (Linux sizes it from the MSS), as on a
// real network path.
func listenWith(rcvBuf, mss int) (net.Listener, error) {
	lc := net.ListenConfig{Control: func(_, _ string, rc syscall.RawConn) error {
		var serr error
		if err := rc.Control(func(fd uintptr) {
			if rcvBuf > 0 {
				serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, rcvBuf)
			}
			if mss > 0 && serr == nil {
				serr = syscall.SetsockoptInt(int(fd), syscall.IPPROTO_TCP, syscall.TCP_MAXSEG, mss)
			}
		}); err != nil {
			return err
		}
		return serr
	}}
	return lc.Listen(context.Background(), "tcp", "127.0.0.1:0")
}

// readReq reads one request and its body from an upstream connection.
func readReq(br *bufio.Reader) (*http.Request, []byte, error) {
	req, err := http.ReadRequest(br)
	if err != nil {
		return nil, nil, err
	}
	body, err := io.ReadAll(req.Body)
	return req, body, err
}

// echoHandler answers every request on a connection with 200 and
// "METHOD URI BODY".
func echoHandler(c net.Conn, br *bufio.Reader) {
	for {
		req, body, err := readReq(br)
		if err != nil {
			return
		}
		msg := req.Method + " " + req.RequestURI + " " + string(body)
		head := fmt.Sprintf("HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n", len(msg))
		if req.Method == http.MethodHead {
			msg = ""
		}
		if _, err := io.WriteString(c, head+msg); err != nil {
			return
		}
	}
}

// dialProxy opens a raw client connection, closed when t ends; every
// operation on it must finish within 5 s.
func dialProxy(t *testing.T, addr string) (net.Conn, *bufio.Reader) {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	t.Cleanup(func() { c.Close() })
	return c, bufio.NewReader(c)
}

func write(t *testing.T, c net.Conn, s string) {
	t.Helper()
	if _, err := io.WriteString(c, s); err != nil {
		t.Fatal(err)
	}
}

// readResp reads one response to a request with method and its whole body.
func readResp(t *testing.T, br *bufio.Reader, method string) (*http.Response, string) {
	t.Helper()
	resp, err := http.ReadResponse(br, &http.Request{Method: method})
	if err != nil {
		t.Fatalf("reading the response: %v", err)
	}
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("reading the response body: %v", err)
	}
	return resp, string(body)
}

// get sends a GET of path for Host api.internal and reads the answer.
func get(t *testing.T, c net.Conn, br *bufio.Reader, path string) (*http.Response, string) {
	t.Helper()
	write(t, c, "GET "+path+" HTTP/1.1\r\nHost: api.internal\r\n\r\n")
	return readResp(t, br, http.MethodGet)
}

// readRawHead reads a head as it is on the wire, through its blank line.
func readRawHead(t *testing.T, br *bufio.Reader) string {
	t.Helper()
	var sb strings.Builder
	for {
		line, err := br.ReadString('\n')
		sb.WriteString(line)
		if err != nil {
			t.Fatalf("reading a head: %v (so far %q)", err, sb.String())
		}
		if line == "\r\n" {
			return sb.String()
		}
	}
}

// expectEOF asserts that the peer closes the connection (nothing more
// arrives).
func expectEOF(t *testing.T, br *bufio.Reader) {
	t.Helper()
	b, err := br.ReadByte()
	if err == nil {
		rest, _ := br.Peek(br.Buffered())
		t.Fatalf("connection not closed: read %q", append([]byte{b}, rest...))
	}
	if !errors.Is(err, io.EOF) {
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			t.Fatalf("connection not closed: %v", err)
		}
	}
}

// awaitUpstream waits up to 3 s for the upstream's signal on arrived that
// the request reached it, failing t otherwise.
func awaitUpstream(t *testing.T, arrived <-chan struct{}) {
	t.Helper()
	select {
	case <-arrived:
	case <-time.After(3 * time.Second):
		t.Fatal("the request did not reach the upstream")
	}
}

// waitFor polls cond until it holds, for up to 3 s (testutil.Until).
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	testutil.Until(t, 3*time.Second, what, cond)
}

// fieldList renders fields as "name: value", those forwarded only.
func fieldList(fs []field) []string {
	var out []string
	for _, f := range fs {
		if !f.drop {
			out = append(out, string(f.name)+": "+string(f.value))
		}
	}
	return out
}

// --- head parsers ----------------------------------------------------------

func TestParseRequest(t *testing.T) {
	const get = "GET /a/b?c=d HTTP/1.1\r\nHost: api.internal\r\n\r\n"
	many := func(n int) string {
		var sb strings.Builder
		sb.WriteString("GET / HTTP/1.1\r\nHost: h\r\n")
		for i := 1; i < n; i++ {
			fmt.Fprintf(&sb, "X-F%d: v\r\n", i)
		}
		return sb.String() + "\r\n"
	}
	type want struct {
		method, target, path, host string
		contentLength              int64
		closeConn, teTrailers, xfp bool
		idempotencyKey             bool
		size                       int // -1: the whole input
		kept                       []string
	}
	tests := []struct {
		name string
		in   string
		res  parseResult
		want *want // checked when res is parseOK
	}{
		{name: "GET with a query", in: get, res: parseOK, want: &want{
			method: "GET", target: "/a/b?c=d", path: "/a/b", host: "api.internal", size: -1, kept: []string{"Host: api.internal"}}},
		{name: "pipelined bytes after the head are not part of it", in: get + "GET /next HTTP/1.1\r\n", res: parseOK, want: &want{
			method: "GET", target: "/a/b?c=d", path: "/a/b", host: "api.internal", size: len(get), kept: []string{"Host: api.internal"}}},
		{name: "POST with a body", in: "POST /p HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello", res: parseOK, want: &want{
			method: "POST", target: "/p", path: "/p", host: "h", contentLength: 5, size: len("POST /p HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\n"),
			kept: []string{"Host: h", "Content-Length: 5"}}},
		{name: "names are case-insensitive, values trimmed", in: "PUT / HTTP/1.1\r\nhOsT: \t h \t\r\ncontent-LENGTH:0\r\nIDEMPOTENCY-key: k\r\n\r\n", res: parseOK, want: &want{
			method: "PUT", target: "/", path: "/", host: "h", size: -1, idempotencyKey: true,
			kept: []string{"hOsT: h", "content-LENGTH: 0", "IDEMPOTENCY-key: k"}}},
		{name: "hop-by-hop fields are dropped", in: "GET / HTTP/1.1\r\nHost: h\r\nConnection: keep-alive, X-Secret\r\nX-Secret: s\r\nKeep-Alive: timeout=5\r\n" +
			"Proxy-Connection: keep-alive\r\nTE: trailers, deflate\r\nTrailer: X-Sum\r\nX-Forwarded-Client-Cert: By=spiffe://forged\r\n" +
			"Proxy-Authorization: Basic Zm9v\r\nX-App: 1\r\n\r\n", res: parseOK, want: &want{
			method: "GET", target: "/", path: "/", host: "h", size: -1, teTrailers: true, kept: []string{"Host: h", "X-App: 1"}}},
		{name: "TE without trailers is dropped and not restored", in: "GET / HTTP/1.1\r\nHost: h\r\nTE: gzip\r\n\r\n", res: parseOK, want: &want{
			method: "GET", target: "/", path: "/", host: "h", size: -1, kept: []string{"Host: h"}}},
		{name: "Connection: close", in: "GET / HTTP/1.1\r\nHost: h\r\nConnection: Keep-Alive, CLOSE\r\n\r\n", res: parseOK, want: &want{
			method: "GET", target: "/", path: "/", host: "h", size: -1, closeConn: true, kept: []string{"Host: h"}}},
		{name: "fields named by several Connection fields", in: "GET / HTTP/1.1\r\nHost: h\r\nConnection: x-a\r\nX-A: 1\r\nconnection: X-B ,\r\nX-B: 2\r\nX-C: 3\r\n\r\n", res: parseOK, want: &want{
			method: "GET", target: "/", path: "/", host: "h", size: -1, kept: []string{"Host: h", "X-C: 3"}}},
		{name: "X-Forwarded-Proto is kept", in: "GET / HTTP/1.1\r\nHost: h\r\nX-Forwarded-Proto: https\r\n\r\n", res: parseOK, want: &want{
			method: "GET", target: "/", path: "/", host: "h", size: -1, xfp: true, kept: []string{"Host: h", "X-Forwarded-Proto: https"}}},
		{name: "X-Forwarded-Proto named in Connection is replaced", in: "GET / HTTP/1.1\r\nHost: h\r\nX-Forwarded-Proto: https\r\nConnection: x-forwarded-proto\r\n\r\n", res: parseOK, want: &want{
			method: "GET", target: "/", path: "/", host: "h", size: -1, kept: []string{"Host: h"}}},
		{name: "128 fields", in: many(128), res: parseOK, want: &want{method: "GET", target: "/", path: "/", host: "h", size: -1}},

		{name: "need more: nothing yet", in: "", res: parseNeedMore},
		{name: "need more: part of the request line", in: "GET /a HT", res: parseNeedMore},
		{name: "need more: no blank line", in: "GET / HTTP/1.1\r\nHost: h\r\n", res: parseNeedMore},
		{name: "need more: blank line without its LF", in: "GET / HTTP/1.1\r\nHost: h\r\n\r", res: parseNeedMore},
		{name: "need more: in a field", in: "GET / HTTP/1.1\r\nHost: h\r\nX-Lo", res: parseNeedMore},

		{name: "HTTP/1.0", in: "GET / HTTP/1.0\r\nHost: h\r\n\r\n", res: parseFallback},
		{name: "HTTP/2 preface", in: "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", res: parseFallback},
		{name: "lower-case version", in: "GET / http/1.1\r\nHost: h\r\n\r\n", res: parseFallback},
		{name: "absolute-form target", in: "GET http://h/ HTTP/1.1\r\nHost: h\r\n\r\n", res: parseFallback},
		{name: "asterisk-form target", in: "OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n", res: parseFallback},
		{name: "percent in the target", in: "GET /a%2Fb HTTP/1.1\r\nHost: h\r\n\r\n", res: parseFallback},
		{name: "fragment in the target", in: "GET /a#b HTTP/1.1\r\nHost: h\r\n\r\n", res: parseFallback},
		{name: "not a token method", in: "GE(T / HTTP/1.1\r\nHost: h\r\n\r\n", res: parseFallback},
		{name: "not a request line before any LF (TLS)", in: "\x16\x03\x01\x02\x00", res: parseFallback},
		{name: "empty line before the request", in: "\r\nGET / HTTP/1.1\r\nHost: h\r\n\r\n", res: parseFallback},
		{name: "obs-fold", in: "GET / HTTP/1.1\r\nHost: h\r\nX-A: a\r\n b\r\n\r\n", res: parseFallback},
		{name: "bare LF ending the request line", in: "GET / HTTP/1.1\nHost: h\r\n\r\n", res: parseFallback},
		{name: "bare LF ending a field", in: "GET / HTTP/1.1\r\nHost: h\nX-A: 1\r\n\r\n", res: parseFallback},
		{name: "bare LF blank line", in: "GET / HTTP/1.1\r\nHost: h\r\n\n", res: parseFallback},
		{name: "space before the colon", in: "GET / HTTP/1.1\r\nHost : h\r\n\r\n", res: parseFallback},
		{name: "field without a colon", in: "GET / HTTP/1.1\r\nHost: h\r\nX-A\r\n\r\n", res: parseFallback},
		{name: "control byte in a value", in: "GET / HTTP/1.1\r\nHost: h\r\nX-A: a\x01b\r\n\r\n", res: parseFallback},
		{name: "missing Host", in: "GET / HTTP/1.1\r\nX-A: 1\r\n\r\n", res: parseFallback},
		{name: "two Host fields", in: "GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n", res: parseFallback},
		{name: "two Content-Length fields, even equal", in: "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx", res: parseFallback},
		{name: "Content-Length not a number", in: "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1x\r\n\r\n", res: parseFallback},
		{name: "Content-Length empty", in: "POST / HTTP/1.1\r\nHost: h\r\nContent-Length:\r\n\r\n", res: parseFallback},
		{name: "Content-Length with a plus sign", in: "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: +1\r\n\r\nx", res: parseFallback},
		{name: "Content-Length negative", in: "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: -1\r\n\r\n", res: parseFallback},
		// net/http (strconv.ParseUint) answers 400; the fast path would
		// forward "Content-Length: -0" as is.
		{name: "Content-Length negative zero", in: "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: -0\r\n\r\n", res: parseFallback},
		{name: "Transfer-Encoding on a request", in: "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n", res: parseFallback},
		{name: "Upgrade", in: "GET / HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n", res: parseFallback},
		{name: "Upgrade h2c", in: "GET / HTTP/1.1\r\nHost: h\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n", res: parseFallback},
		{name: "Expect", in: "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\nExpect: 100-continue\r\n\r\n", res: parseFallback},
		{name: "too many fields", in: many(129), res: parseFallback},
		{name: "five Connection fields", in: "GET / HTTP/1.1\r\nHost: h\r\n" + strings.Repeat("Connection: keep-alive\r\n", 5) + "\r\n", res: parseFallback},
	}
	var h reqHead
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			res := h.parseRequest([]byte(tc.in))
			if res != tc.res {
				t.Fatalf("parseRequest = %d, want %d", res, tc.res)
			}
			w := tc.want
			if w == nil {
				return
			}
			size := w.size
			if size < 0 {
				size = len(tc.in)
			}
			got := want{method: string(h.method), target: string(h.target), path: string(h.path), host: string(h.host),
				contentLength: h.contentLength, closeConn: h.closeConn, teTrailers: h.teTrailers, xfp: h.xfp,
				idempotencyKey: h.idempotencyKey, size: h.size, kept: fieldList(h.fields)}
			exp := *w
			exp.size = size
			if w.kept == nil {
				got.kept = nil // not checked
			}
			if fmt.Sprintf("%+v", got) != fmt.Sprintf("%+v", exp) {
				t.Errorf("parsed\n %+v\nwant\n %+v", got, exp)
			}
		})
	}
}

func TestParseResponse(t *testing.T) {
	type want struct {
		code, minor   int
		rest          string
		contentLength int64
		chunked       bool
		closeConn     bool
		reason        string
		grpcStatus    string
		eventStream   bool
		kept          []string
	}
	tests := []struct {
		name string
		in   string
		res  parseResult
		want *want
	}{
		{name: "Content-Length", in: "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", res: parseOK, want: &want{
			code: 200, minor: 1, rest: "200 OK", contentLength: 5, kept: []string{"Content-Length: 5"}}},
		{name: "no reason phrase", in: "HTTP/1.1 204\r\n\r\n", res: parseOK, want: &want{code: 204, minor: 1, rest: "204", contentLength: -1}},
		{name: "neither length nor chunked: read until close", in: "HTTP/1.1 200 OK\r\nX-A: 1\r\n\r\n", res: parseOK, want: &want{
			code: 200, minor: 1, rest: "200 OK", contentLength: -1, kept: []string{"X-A: 1"}}},
		{name: "chunked", in: "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Sum\r\n\r\n", res: parseOK, want: &want{
			code: 200, minor: 1, rest: "200 OK", contentLength: -1, chunked: true, kept: []string{"Transfer-Encoding: chunked", "Trailer: X-Sum"}}},
		{name: "chunked and Content-Length: the length goes", in: "HTTP/1.1 200 OK\r\nContent-Length: 10\r\nTransfer-Encoding: chunked\r\n\r\n", res: parseOK, want: &want{
			code: 200, minor: 1, rest: "200 OK", contentLength: -1, chunked: true, kept: []string{"Transfer-Encoding: chunked"}}},
		{name: "another transfer coding: read until close", in: "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", res: parseOK, want: &want{
			code: 200, minor: 1, rest: "200 OK", contentLength: -1, closeConn: true}},
		{name: "HTTP/1.0 without keep-alive closes", in: "HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", res: parseOK, want: &want{
			code: 200, minor: 0, rest: "200 OK", contentLength: 2, closeConn: true, kept: []string{"Content-Length: 2"}}},
		{name: "HTTP/1.0 with keep-alive", in: "HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\nContent-Length: 2\r\n\r\n", res: parseOK, want: &want{
			code: 200, minor: 0, rest: "200 OK", contentLength: 2, kept: []string{"Content-Length: 2"}}},
		{name: "HTTP/1.0 chunked is not chunked", in: "HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", res: parseOK, want: &want{
			code: 200, minor: 0, rest: "200 OK", contentLength: -1, closeConn: true}},
		{name: "Connection: close", in: "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n", res: parseOK, want: &want{
			code: 200, minor: 1, rest: "200 OK", contentLength: 0, closeConn: true, kept: []string{"Content-Length: 0"}}},
		{name: "identical duplicate Content-Length: one forwarded", in: "HTTP/1.1 200 OK\r\nContent-Length: 3\r\ncontent-length: 3\r\n\r\n", res: parseOK, want: &want{
			code: 200, minor: 1, rest: "200 OK", contentLength: 3, kept: []string{"Content-Length: 3"}}},
		{name: "hop-by-hop fields are dropped", in: "HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Hop\r\nX-Hop: h\r\nKeep-Alive: timeout=5\r\n" +
			"Proxy-Connection: keep-alive\r\nProxy-Authenticate: Basic\r\nUpgrade: h2c\r\nX-Keep: k\r\nContent-Length: 0\r\n\r\n", res: parseOK, want: &want{
			code: 200, minor: 1, rest: "200 OK", contentLength: 0, kept: []string{"X-Keep: k", "Content-Length: 0"}}},
		{name: "fields the proxy reads", in: "HTTP/1.1 503 Service Unavailable\r\nX-Meshlet-Reason: overflow\r\nGrpc-Status: 14\r\n" +
			"Content-Type: text/event-stream; charset=utf-8\r\nContent-Length: 0\r\n\r\n", res: parseOK, want: &want{
			code: 503, minor: 1, rest: "503 Service Unavailable", contentLength: 0, reason: "overflow", grpcStatus: "14", eventStream: true,
			kept: []string{"X-Meshlet-Reason: overflow", "Grpc-Status: 14", "Content-Type: text/event-stream; charset=utf-8", "Content-Length: 0"}}},
		{name: "interim response", in: "HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n", res: parseOK, want: &want{
			code: 103, minor: 1, rest: "103 Early Hints", contentLength: -1, kept: []string{"Link: </a.css>; rel=preload"}}},

		{name: "need more: nothing yet", in: "", res: parseNeedMore},
		{name: "need more: part of the status line", in: "HTTP/1.1 2", res: parseNeedMore},
		{name: "need more: no blank line", in: "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n", res: parseNeedMore},

		{name: "HTTP/2 status line", in: "HTTP/2.0 200 OK\r\n\r\n", res: parseFallback},
		{name: "not HTTP", in: "SSH-2.0-OpenSSH_9.6\r\n\r\n", res: parseFallback},
		{name: "status line too short", in: "HTTP/1.1 20\r\n\r\n", res: parseFallback},
		{name: "status code not digits", in: "HTTP/1.1 2x0 OK\r\n\r\n", res: parseFallback},
		{name: "no space after the code", in: "HTTP/1.1 200OK\r\n\r\n", res: parseFallback},
		{name: "bare LF status line", in: "HTTP/1.1 200 OK\nContent-Length: 0\r\n\r\n", res: parseFallback},
		{name: "bare LF field", in: "HTTP/1.1 200 OK\r\nContent-Length: 0\n\r\n", res: parseFallback},
		{name: "obs-fold", in: "HTTP/1.1 200 OK\r\nX-A: a\r\n b\r\n\r\n", res: parseFallback},
		{name: "field without a colon", in: "HTTP/1.1 200 OK\r\nX-A\r\n\r\n", res: parseFallback},
		{name: "different Content-Length values", in: "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", res: parseFallback},
		{name: "Content-Length not a number", in: "HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", res: parseFallback},
		// net/http's client (strconv.ParseUint) refuses it; the fast path
		// would frame by it and forward "+2" to the client as is.
		{name: "Content-Length with a plus sign", in: "HTTP/1.1 200 OK\r\nContent-Length: +2\r\n\r\nok", res: parseFallback},
		{name: "five Connection fields", in: "HTTP/1.1 200 OK\r\n" + strings.Repeat("Connection: keep-alive\r\n", 5) + "\r\n", res: parseFallback},
	}
	var h respHead
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			res := h.parseResponse([]byte(tc.in))
			if res != tc.res {
				t.Fatalf("parseResponse = %d, want %d", res, tc.res)
			}
			if tc.want == nil {
				return
			}
			got := want{code: h.code, minor: h.minor, rest: string(h.rest), contentLength: h.contentLength, chunked: h.chunked,
				closeConn: h.closeConn, reason: string(h.reason), grpcStatus: string(h.grpcStatus), eventStream: h.eventStream,
				kept: fieldList(h.fields)}
			if fmt.Sprintf("%+v", got) != fmt.Sprintf("%+v", *tc.want) {
				t.Errorf("parsed\n %+v\nwant\n %+v", got, *tc.want)
			}
			if head := strings.Index(tc.in, "\r\n\r\n") + 4; h.size != head {
				t.Errorf("size = %d, want %d", h.size, head)
			}
		})
	}
}

func TestChunkSize(t *testing.T) {
	tests := []struct {
		name string
		line string
		n    int64
		ok   bool
	}{
		{"one digit", "5\r\n", 5, true},
		{"hex, lower case", "1a\r\n", 26, true},
		{"hex, upper case", "FF\r\n", 255, true},
		{"last chunk", "0\r\n", 0, true},
		{"leading zeros", "000a\r\n", 10, true},
		{"extension", "1a;name=value\r\n", 26, true},
		{"whitespace before an extension", "5 \t;x\r\n", 5, true},
		{"fifteen digits", "fffffffffffffff\r\n", 1<<60 - 1, true},
		{"sixteen digits", "0000000000000001\r\n", 0, false},
		{"no digits", "\r\n", 0, false},
		{"extension without a size", ";x\r\n", 0, false},
		{"not hex", "x\r\n", 0, false},
		{"junk after the digits", "5x\r\n", 0, false},
		{"negative", "-1\r\n", 0, false},
		{"bare LF", "5\n", 0, false},
		{"no line end", "5", 0, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			n, ok := chunkSize([]byte(tc.line))
			if n != tc.n || ok != tc.ok {
				t.Errorf("chunkSize(%q) = %d, %v; want %d, %v", tc.line, n, ok, tc.n, tc.ok)
			}
		})
	}
}

func TestBodyless(t *testing.T) {
	tests := []struct {
		name   string
		method string
		code   int
		want   bool
	}{
		{"HEAD", "HEAD", 200, true},
		{"204", "GET", 204, true},
		{"304", "GET", 304, true},
		{"1xx", "GET", 100, true},
		{"200", "GET", 200, false},
		{"205 is framed as usual", "POST", 205, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			h := respHead{code: tc.code}
			if got := h.bodyless([]byte(tc.method)); got != tc.want {
				t.Errorf("bodyless(%s %d) = %v, want %v", tc.method, tc.code, got, tc.want)
			}
		})
	}
}

// --- exchanges through a Server --------------------------------------------

// TestHopByHopFieldsRewritten: the upstream gets the request without
// hop-by-hop fields (and those Connection names), with Via and
// X-Forwarded-Proto (kept when the client sent one); the client gets the
// response without hop-by-hop fields, with Via. Both paths agree.
func TestHopByHopFieldsRewritten(t *testing.T) {
	const response = "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\nDate: Mon, 02 Jan 2006 15:04:05 GMT\r\n" +
		"Connection: keep-alive, X-Hop\r\nX-Hop: h\r\nKeep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\n" +
		"Proxy-Authenticate: Basic\r\nUpgrade: h2c\r\nX-Resp: r\r\n\r\nok"
	wantResp := http.Header{"Content-Type": {"text/plain"}, "Content-Length": {"2"}, "Date": {"Mon, 02 Jan 2006 15:04:05 GMT"},
		"X-Resp": {"r"}, "Via": {"1.1 test-proxy"}}
	tests := []struct {
		name    string
		fields  string // after Host
		upHdr   http.Header
		upProto string
	}{
		{
			name: "hop-by-hop fields dropped, Via and X-Forwarded-Proto added",
			fields: "Connection: keep-alive, X-Secret\r\nX-Secret: s\r\nKeep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\n" +
				"TE: trailers, deflate\r\nTrailer: X-Sum\r\nX-Forwarded-Client-Cert: By=spiffe://forged\r\nProxy-Authorization: Basic Zm9v\r\nX-App: 1\r\n",
			upHdr: http.Header{"X-App": {"1"}, "Te": {"trailers"}, "Via": {"1.1 test-proxy"}, "X-Forwarded-Proto": {"http"}},
		},
		{
			name:   "X-Forwarded-Proto from the client kept",
			fields: "X-Forwarded-Proto: https\r\n",
			upHdr:  http.Header{"Via": {"1.1 test-proxy"}, "X-Forwarded-Proto": {"https"}},
		},
		{
			name:   "X-Forwarded-Proto named in Connection replaced",
			fields: "Connection: X-Forwarded-Proto\r\nX-Forwarded-Proto: https\r\n",
			upHdr:  http.Header{"Via": {"1.1 test-proxy"}, "X-Forwarded-Proto": {"http"}},
		},
		{
			name:   "an earlier Via kept, ours after it",
			fields: "Via: 1.1 other\r\n",
			upHdr:  http.Header{"Via": {"1.1 other", "1.1 test-proxy"}, "X-Forwarded-Proto": {"http"}},
		},
	}
	for _, p := range paths {
		t.Run(p.name, func(t *testing.T) {
			type seen struct {
				uri  string
				host string
				hdr  http.Header
			}
			got := make(chan seen, 10)
			up := newRawUpstream(t, func(c net.Conn, br *bufio.Reader) {
				for {
					req, _, err := readReq(br)
					if err != nil {
						return
					}
					got <- seen{req.RequestURI, req.Host, req.Header}
					io.WriteString(c, response)
				}
			})
			rec := &testRecorder{}
			addr, _ := startProxy(t, proxyOpts{endpoints: []string{up.addr()}, netHTTPOnly: p.netHTTPOnly, rec: rec})
			c, br := dialProxy(t, addr)
			for _, tc := range tests {
				t.Run(tc.name, func(t *testing.T) {
					write(t, c, "GET /echo?q=1 HTTP/1.1\r\nHost: api.internal\r\n"+tc.fields+"\r\n")
					resp, body := readResp(t, br, http.MethodGet)
					s := <-got
					if s.uri != "/echo?q=1" || s.host != "api.internal" {
						t.Errorf("upstream got %s for host %q", s.uri, s.host)
					}
					if fmt.Sprint(s.hdr) != fmt.Sprint(tc.upHdr) {
						t.Errorf("upstream header\n %v\nwant\n %v", s.hdr, tc.upHdr)
					}
					if resp.StatusCode != 200 || body != "ok" {
						t.Errorf("got %d %q", resp.StatusCode, body)
					}
					if fmt.Sprint(resp.Header) != fmt.Sprint(wantResp) {
						t.Errorf("client header\n %v\nwant\n %v", resp.Header, wantResp)
					}
				})
			}
			if n := up.accepts.Load(); n != 1 {
				t.Errorf("upstream accepted %d connections, want 1", n)
			}
			if _, opened := rec.conns(); !p.netHTTPOnly && opened != 1 {
				t.Errorf("the connection was handed to net/http (%d opens)", opened)
			}
		})
	}
}

// TestKeepAliveReusesOneUpstreamConnection: requests on one client
// connection travel on one upstream connection.
func TestKeepAliveReusesOneUpstreamConnection(t *testing.T) {
	for _, p := range paths {
		t.Run(p.name, func(t *testing.T) { testKeepAliveReusesOneUpstreamConnection(t, p.netHTTPOnly) })
	}
}

func testKeepAliveReusesOneUpstreamConnection(t *testing.T, netHTTPOnly bool) {
	up := newRawUpstream(t, echoHandler)
	rec := &testRecorder{}
	addr, _ := startProxy(t, proxyOpts{netHTTPOnly: netHTTPOnly, endpoints: []string{up.addr()}, rec: rec})
	c, br := dialProxy(t, addr)
	for i := range 5 {
		path := "/r" + strconv.Itoa(i)
		if i == 2 {
			write(t, c, "POST "+path+" HTTP/1.1\r\nHost: api.internal\r\nContent-Length: 4\r\n\r\nbody")
			if _, body := readResp(t, br, http.MethodPost); body != "POST "+path+" body" {
				t.Fatalf("got %q", body)
			}
			continue
		}
		resp, body := get(t, c, br, path)
		if resp.StatusCode != 200 || body != "GET "+path+" " || resp.Close {
			t.Fatalf("request %d: %d %q close=%v", i, resp.StatusCode, body, resp.Close)
		}
	}
	// net/http's transport puts a connection back in its pool only after
	// the response body's EOF, asynchronously: a quick next request may
	// open another.
	if n := up.accepts.Load(); !netHTTPOnly && n != 1 {
		t.Errorf("upstream accepted %d connections, want 1", n)
	}
	if _, opened := rec.conns(); !netHTTPOnly && opened != 1 {
		t.Errorf("the connection was handed to net/http (%d opens)", opened)
	}
}

// TestPipelinedRequestsAnsweredInOrder: requests written in one write are
// answered one after the other, in order.
func TestPipelinedRequestsAnsweredInOrder(t *testing.T) {
	for _, p := range paths {
		t.Run(p.name, func(t *testing.T) { testPipelinedRequestsAnsweredInOrder(t, p.netHTTPOnly) })
	}
}

func testPipelinedRequestsAnsweredInOrder(t *testing.T, netHTTPOnly bool) {
	up := newRawUpstream(t, echoHandler)
	rec := &testRecorder{}
	addr, _ := startProxy(t, proxyOpts{netHTTPOnly: netHTTPOnly, endpoints: []string{up.addr()}, rec: rec})
	c, br := dialProxy(t, addr)
	write(t, c, "GET /1 HTTP/1.1\r\nHost: api.internal\r\n\r\n"+
		"POST /2 HTTP/1.1\r\nHost: api.internal\r\nContent-Length: 3\r\n\r\nabc"+
		"GET /3 HTTP/1.1\r\nHost: no-routes.internal\r\n\r\n"+
		"HEAD /4 HTTP/1.1\r\nHost: api.internal\r\n\r\n"+
		"GET /5 HTTP/1.1\r\nHost: api.internal\r\n\r\n")
	for _, w := range []struct {
		method string
		code   int
		body   string
	}{{"GET", 200, "GET /1 "}, {"POST", 200, "POST /2 abc"}, {"GET", 404, "no_route\n"}, {"HEAD", 200, ""}, {"GET", 200, "GET /5 "}} {
		resp, body := readResp(t, br, w.method)
		if resp.StatusCode != w.code || body != w.body {
			t.Errorf("got %d %q, want %d %q", resp.StatusCode, body, w.code, w.body)
		}
	}
	if _, opened := rec.conns(); !netHTTPOnly && opened != 1 {
		t.Errorf("the connection was handed to net/http (%d opens)", opened)
	}
}

// TestClientConnectionClose: "Connection: close" from the client ends the
// connection after its response, which says so.
func TestClientConnectionClose(t *testing.T) {
	for _, p := range paths {
		t.Run(p.name, func(t *testing.T) { testClientConnectionClose(t, p.netHTTPOnly) })
	}
}

func testClientConnectionClose(t *testing.T, netHTTPOnly bool) {
	up := newRawUpstream(t, echoHandler)
	addr, _ := startProxy(t, proxyOpts{netHTTPOnly: netHTTPOnly, endpoints: []string{up.addr()}})
	tests := []struct {
		name, host string
		code       int
	}{
		{"forwarded", "api.internal", 200},
		{"failed by the proxy", "no-routes.internal", 404},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c, br := dialProxy(t, addr)
			write(t, c, "GET /x HTTP/1.1\r\nHost: "+tc.host+"\r\nConnection: close\r\n\r\nGET /ignored HTTP/1.1\r\nHost: api.internal\r\n\r\n")
			head := readRawHead(t, br)
			if !strings.HasPrefix(head, "HTTP/1.1 "+strconv.Itoa(tc.code)+" ") || !strings.Contains(head, "\r\nConnection: close\r\n") {
				t.Errorf("head %q: want %d with Connection: close", head, tc.code)
			}
			resp, err := http.ReadResponse(bufio.NewReader(io.MultiReader(strings.NewReader(head), br)), nil)
			if err != nil {
				t.Fatal(err)
			}
			io.Copy(io.Discard, resp.Body)
			expectEOF(t, br)
		})
	}
}

// TestBodylessResponsesWithContentLength: responses to HEAD, 204 and 304
// carry no body whatever their Content-Length says, and the connections
// both sides stay usable.
func TestBodylessResponsesWithContentLength(t *testing.T) {
	for _, p := range paths {
		t.Run(p.name, func(t *testing.T) { testBodylessResponsesWithContentLength(t, p.netHTTPOnly) })
	}
}

func testBodylessResponsesWithContentLength(t *testing.T, netHTTPOnly bool) {
	up := newRawUpstream(t, func(c net.Conn, br *bufio.Reader) {
		for {
			req, _, err := readReq(br)
			if err != nil {
				return
			}
			switch {
			case req.Method == http.MethodHead:
				io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
			case req.URL.Path == "/204":
				io.WriteString(c, "HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n")
			case req.URL.Path == "/304":
				io.WriteString(c, "HTTP/1.1 304 Not Modified\r\nETag: \"v1\"\r\nContent-Length: 7\r\n\r\n")
			default:
				io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nafter")
			}
		}
	})
	addr, _ := startProxy(t, proxyOpts{netHTTPOnly: netHTTPOnly, endpoints: []string{up.addr()}})
	c, br := dialProxy(t, addr)
	tests := []struct {
		name, request, status, length string
	}{
		{"HEAD", "HEAD / HTTP/1.1\r\nHost: api.internal\r\n\r\n", "HTTP/1.1 200 OK", "10"},
		{"204", "GET /204 HTTP/1.1\r\nHost: api.internal\r\n\r\n", "HTTP/1.1 204 No Content", "5"},
		{"304", "GET /304 HTTP/1.1\r\nHost: api.internal\r\nIf-None-Match: \"v1\"\r\n\r\n", "HTTP/1.1 304 Not Modified", "7"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			write(t, c, tc.request)
			head := readRawHead(t, br)
			// net/http's server drops the Content-Length of a 204 or 304.
			keepsLength := !netHTTPOnly || tc.name == "HEAD"
			if !strings.HasPrefix(head, tc.status+"\r\n") || keepsLength && !strings.Contains(head, "\r\nContent-Length: "+tc.length+"\r\n") {
				t.Errorf("head %q, want %s with Content-Length %s", head, tc.status, tc.length)
			}
			// The next bytes are the next response's.
			write(t, c, "GET /after HTTP/1.1\r\nHost: api.internal\r\n\r\n")
			if line, _ := br.Peek(15); string(line) != "HTTP/1.1 200 OK" {
				t.Fatalf("after the %s response came %q", tc.name, line)
			}
			if _, body := readResp(t, br, http.MethodGet); body != "after" {
				t.Errorf("next body %q", body)
			}
		})
	}
	if n := up.accepts.Load(); !netHTTPOnly && n != 1 { // net/http: see testKeepAliveReusesOneUpstreamConnection
		t.Errorf("upstream accepted %d connections, want 1", n)
	}
}

// TestChunkedResponsePassedThroughAsItStreams: a chunked response, chunk
// extensions and trailers included, reaches the client byte for byte, each
// chunk before the upstream sends the next.
func TestChunkedResponsePassedThroughAsItStreams(t *testing.T) {
	const (
		chunk1 = "5;ext=1\r\nhello\r\n"
		rest   = "6\r\n world\r\n0\r\nX-Sum: abc\r\n\r\n"
	)
	got1 := make(chan struct{}, 2)
	stop := make(chan struct{})
	up := newRawUpstream(t, func(c net.Conn, br *bufio.Reader) {
		for {
			if _, _, err := readReq(br); err != nil {
				return
			}
			io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\nTrailer: X-Sum\r\n\r\n"+chunk1)
			select {
			case <-got1:
			case <-stop:
				return
			}
			io.WriteString(c, rest)
		}
	})
	addr, _ := startProxy(t, proxyOpts{endpoints: []string{up.addr()}})
	t.Cleanup(func() { close(stop) }) // before the proxy's Shutdown
	c, br := dialProxy(t, addr)
	for i := range 2 {
		write(t, c, "GET /stream HTTP/1.1\r\nHost: api.internal\r\n\r\n")
		head := readRawHead(t, br)
		for _, f := range []string{"Transfer-Encoding: chunked", "Trailer: X-Sum", "Via: 1.1 test-proxy"} {
			if !strings.Contains(head, "\r\n"+f+"\r\n") {
				t.Errorf("response %d head %q lacks %q", i, head, f)
			}
		}
		if strings.Contains(head, "Content-Length") || strings.Contains(head, "Connection") {
			t.Errorf("response %d head %q", i, head)
		}
		b := make([]byte, len(chunk1))
		_ = c.SetReadDeadline(time.Now().Add(2 * time.Second))
		if _, err := io.ReadFull(br, b); err != nil || string(b) != chunk1 {
			t.Fatalf("response %d: first chunk %q, %v (it must arrive before the upstream sends the next)", i, b, err)
		}
		got1 <- struct{}{}
		b = make([]byte, len(rest))
		if _, err := io.ReadFull(br, b); err != nil || string(b) != rest {
			t.Fatalf("response %d: rest %q, %v, want %q", i, b, err, rest)
		}
	}
	if n := up.accepts.Load(); n != 1 {
		t.Errorf("upstream accepted %d connections, want 1", n)
	}
}

// TestCloseDelimitedResponse: a response without length is relayed as it
// comes until the upstream closes, then the client connection is closed.
func TestCloseDelimitedResponse(t *testing.T) {
	got1 := make(chan struct{})
	stop := make(chan struct{})
	up := newRawUpstream(t, func(c net.Conn, br *bufio.Reader) {
		if _, _, err := readReq(br); err != nil {
			return
		}
		io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\npart1")
		select {
		case <-got1:
		case <-stop:
			return
		}
		io.WriteString(c, "part2")
	})
	rec := &testRecorder{}
	addr, _ := startProxy(t, proxyOpts{endpoints: []string{up.addr()}, rec: rec})
	t.Cleanup(func() { close(stop) }) // before the proxy's Shutdown
	c, br := dialProxy(t, addr)
	write(t, c, "GET /long HTTP/1.1\r\nHost: api.internal\r\n\r\n")
	head := readRawHead(t, br)
	if !strings.Contains(head, "\r\nConnection: close\r\n") || strings.Contains(head, "Content-Length") || strings.Contains(head, "Transfer-Encoding") {
		t.Errorf("head %q: want Connection: close and no framing", head)
	}
	b := make([]byte, 5)
	if _, err := io.ReadFull(br, b); err != nil || string(b) != "part1" {
		t.Fatalf("first part %q, %v", b, err)
	}
	close(got1)
	rest, err := io.ReadAll(br)
	if err != nil || string(rest) != "part2" {
		t.Errorf("rest %q, %v; want part2 then EOF", rest, err)
	}
	if r := rec.requests(); len(r) != 1 || r[0].Code != 200 {
		t.Errorf("records %+v", r)
	}
}

// TestInterimResponsesSkipped: 100 and 103 before the final response do not
// reach the client.
func TestInterimResponsesSkipped(t *testing.T) {
	for _, p := range paths {
		t.Run(p.name, func(t *testing.T) { testInterimResponsesSkipped(t, p.netHTTPOnly) })
	}
}

func testInterimResponsesSkipped(t *testing.T, netHTTPOnly bool) {
	up := newRawUpstream(t, func(c net.Conn, br *bufio.Reader) {
		for {
			if _, _, err := readReq(br); err != nil {
				return
			}
			io.WriteString(c, "HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n")
			io.WriteString(c, "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
		}
	})
	addr, _ := startProxy(t, proxyOpts{netHTTPOnly: netHTTPOnly, endpoints: []string{up.addr()}})
	c, br := dialProxy(t, addr)
	for range 2 {
		write(t, c, "GET / HTTP/1.1\r\nHost: api.internal\r\n\r\n")
		if line, _ := br.Peek(15); string(line) != "HTTP/1.1 200 OK" {
			t.Fatalf("first response line %q", line)
		}
		if _, body := readResp(t, br, http.MethodGet); body != "ok" {
			t.Errorf("body %q", body)
		}
	}
}

// TestMalformedUpstreamResponse: a response the proxy cannot read is a 503
// upstream_reset, and the client connection stays usable.
func TestMalformedUpstreamResponse(t *testing.T) {
	for _, p := range paths {
		t.Run(p.name, func(t *testing.T) { testMalformedUpstreamResponse(t, p.netHTTPOnly) })
	}
}

func testMalformedUpstreamResponse(t *testing.T, netHTTPOnly bool) {
	tests := []struct {
		name, response string
	}{
		{"status code not digits", "HTTP/1.1 2x0 OK\r\nContent-Length: 0\r\n\r\n"},
		{"not HTTP", "SSH-2.0-OpenSSH_9.6\r\n\r\n"},
		{"conflicting Content-Length", "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab"},
		{"an upgrade nobody asked for", "HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: Upgrade\r\n\r\n"},
		{"closed in the head", "HTTP/1.1 200 OK\r\nContent-Le"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			up := newRawUpstream(t, func(c net.Conn, br *bufio.Reader) {
				if _, _, err := readReq(br); err == nil {
					io.WriteString(c, tc.response)
				}
			})
			addr, _ := startProxy(t, proxyOpts{netHTTPOnly: netHTTPOnly, endpoints: []string{up.addr()}})
			c, br := dialProxy(t, addr)
			for range 2 {
				resp, body := get(t, c, br, "/")
				if resp.StatusCode != 503 || resp.Header.Get(ReasonHeader) != string(xds.ReasonUpstreamReset) || resp.ContentLength != int64(len(body)) {
					t.Errorf("got %d %s=%q length %d %q", resp.StatusCode, ReasonHeader, resp.Header.Get(ReasonHeader), resp.ContentLength, body)
				}
			}
		})
	}
}

// TestRequestBodies: a request body with Content-Length reaches the
// upstream exactly, written in pieces or not; one larger than the route's
// BodyBufferBytes is handed to net/http and still arrives.
func TestRequestBodies(t *testing.T) {
	for _, p := range paths {
		t.Run(p.name, func(t *testing.T) { testRequestBodies(t, p.netHTTPOnly) })
	}
}

func testRequestBodies(t *testing.T, netHTTPOnly bool) {
	up := newRawUpstream(t, func(c net.Conn, br *bufio.Reader) {
		for {
			req, body, err := readReq(br)
			if err != nil {
				return
			}
			fmt.Fprintf(c, "HTTP/1.1 200 OK\r\nX-Length: %s\r\nContent-Length: %d\r\n\r\n%s", req.Header.Get("Content-Length"), len(body), body)
		}
	})
	tests := []struct {
		name    string
		size    int
		pieces  int
		handoff bool
	}{
		{name: "empty", size: 0, pieces: 1},
		{name: "small, with the head", size: 5, pieces: 1},
		{name: "larger than the 4 KiB read buffer", size: 60 << 10, pieces: 1},
		{name: "larger than the read buffer, in pieces", size: 60 << 10, pieces: 7},
		{name: "larger than BodyBufferBytes: net/http", size: 100 << 10, pieces: 3, handoff: true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			rec := &testRecorder{}
			addr, _ := startProxy(t, proxyOpts{netHTTPOnly: netHTTPOnly, endpoints: []string{up.addr()}, rec: rec})
			c, br := dialProxy(t, addr)
			body := make([]byte, tc.size)
			for i := range body {
				body[i] = 'a' + byte(i%26)
			}
			msg := append([]byte(fmt.Sprintf("POST /upload HTTP/1.1\r\nHost: api.internal\r\nContent-Length: %d\r\n\r\n", tc.size)), body...)
			step := len(msg)/tc.pieces + 1
			for len(msg) > 0 {
				n := min(step, len(msg))
				if _, err := c.Write(msg[:n]); err != nil {
					t.Fatal(err)
				}
				msg = msg[n:]
			}
			resp, got := readResp(t, br, http.MethodPost)
			if resp.StatusCode != 200 || got != string(body) || resp.Header.Get("X-Length") != strconv.Itoa(tc.size) {
				t.Errorf("got %d, %d bytes (equal %v), upstream Content-Length %q; want %d bytes",
					resp.StatusCode, len(got), got == string(body), resp.Header.Get("X-Length"), tc.size)
			}
			// The connection carries another request.
			write(t, c, "POST /again HTTP/1.1\r\nHost: api.internal\r\nContent-Length: 2\r\n\r\nhi")
			if _, got := readResp(t, br, http.MethodPost); got != "hi" {
				t.Errorf("next request: %q", got)
			}
			if _, opened := rec.conns(); !netHTTPOnly && (opened > 1) != tc.handoff {
				t.Errorf("%d opens: handed to net/http %v, want %v", opened, opened > 1, tc.handoff)
			}
		})
	}
}

// TestLargeResponse: large responses, with a length or chunked, arrive
// intact.
func TestLargeResponse(t *testing.T) {
	for _, p := range paths {
		t.Run(p.name, func(t *testing.T) { testLargeResponse(t, p.netHTTPOnly) })
	}
}

func testLargeResponse(t *testing.T, netHTTPOnly bool) {
	payload := make([]byte, 5<<20)
	for i := range payload {
		payload[i] = byte(i * 7)
	}
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/length" {
			w.Header().Set("Content-Length", strconv.Itoa(len(payload)))
		}
		w.Write(payload) // without a length: chunked
	}))
	t.Cleanup(up.Close)
	addr, _ := startProxy(t, proxyOpts{netHTTPOnly: netHTTPOnly, endpoints: []string{up.Listener.Addr().String()}})
	c, br := dialProxy(t, addr)
	for _, tc := range []struct{ name, path string }{{"Content-Length", "/length"}, {"chunked", "/chunked"}} {
		t.Run(tc.name, func(t *testing.T) {
			resp, body := get(t, c, br, tc.path)
			if resp.StatusCode != 200 || body != string(payload) {
				t.Errorf("got %d, %d bytes (equal %v), want %d bytes", resp.StatusCode, len(body), body == string(payload), len(payload))
			}
			if chunked := len(resp.TransferEncoding) > 0; chunked != (tc.path == "/chunked") {
				t.Errorf("transfer encoding %v", resp.TransferEncoding)
			}
		})
	}
}

// TestLocalFailureAnswers: requests the proxy fails itself carry the typed
// reason, Via and a Content-Length, on both paths.
func TestLocalFailureAnswers(t *testing.T) {
	tests := []struct {
		name, host, path, method string
		code                     int
		reason                   xds.FailureReason
	}{
		{"no route", "no-routes.internal", "/", "GET", 404, xds.ReasonNoRoute},
		{"no route, HEAD", "no-routes.internal", "/", "HEAD", 404, xds.ReasonNoRoute},
		{"no cluster", "api.internal", "/missing-cluster", "GET", 503, xds.ReasonNoCluster},
		{"no endpoint", "api.internal", "/", "GET", 503, xds.ReasonNoHealthyUpstream},
	}
	for _, p := range paths {
		t.Run(p.name, func(t *testing.T) {
			addr, _ := startProxy(t, proxyOpts{netHTTPOnly: p.netHTTPOnly})
			c, br := dialProxy(t, addr)
			for _, tc := range tests {
				t.Run(tc.name, func(t *testing.T) {
					write(t, c, tc.method+" "+tc.path+" HTTP/1.1\r\nHost: "+tc.host+"\r\n\r\n")
					resp, body := readResp(t, br, tc.method)
					wantBody := string(tc.reason) + "\n"
					if tc.method == "HEAD" {
						wantBody = ""
					}
					if resp.StatusCode != tc.code || resp.Header.Get(ReasonHeader) != string(tc.reason) || body != wantBody ||
						resp.Header.Get("Via") != "1.1 test-proxy" {
						t.Errorf("got %d %s=%q Via=%q %q", resp.StatusCode, ReasonHeader, resp.Header.Get(ReasonHeader), resp.Header.Get("Via"), body)
					}
					if got := resp.Header.Get("Content-Length"); got != strconv.Itoa(len(tc.reason)+1) && !(p.netHTTPOnly && tc.method == "HEAD") {
						t.Errorf("Content-Length %q, want %d", got, len(tc.reason)+1)
					}
				})
			}
		})
	}
}

// TestRequestRecordedBeforeLastByte: the request's record exists when the
// client has read the whole response.
func TestRequestRecordedBeforeLastByte(t *testing.T) {
	for _, p := range paths {
		t.Run(p.name, func(t *testing.T) { testRequestRecordedBeforeLastByte(t, p.netHTTPOnly) })
	}
}

func testRequestRecordedBeforeLastByte(t *testing.T, netHTTPOnly bool) {
	up := newRawUpstream(t, func(c net.Conn, br *bufio.Reader) {
		for {
			req, _, err := readReq(br)
			if err != nil {
				return
			}
			switch req.URL.Path {
			case "/chunked":
				io.WriteString(c, "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Sum\r\n\r\n2\r\nok\r\n0\r\nX-Sum: 1\r\n\r\n")
			case "/bad":
				io.WriteString(c, "HTTP/1.1 2x0\r\n\r\n")
				return
			default:
				io.WriteString(c, "HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok")
			}
		}
	})
	rec := &testRecorder{}
	addr, _ := startProxy(t, proxyOpts{netHTTPOnly: netHTTPOnly, endpoints: []string{up.addr()}, rec: rec})
	c, br := dialProxy(t, addr)
	tests := []struct {
		name, method, host, path string
		code                     int
		reason                   xds.FailureReason
	}{
		{"Content-Length", "GET", "api.internal", "/length", 201, ""},
		{"chunked with trailers", "GET", "api.internal", "/chunked", 200, ""},
		{"HEAD", "HEAD", "api.internal", "/length", 201, ""},
		{"no route", "GET", "no-routes.internal", "/", 404, xds.ReasonNoRoute},
		{"malformed response", "GET", "api.internal", "/bad", 503, xds.ReasonUpstreamReset},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			before := len(rec.requests())
			write(t, c, tc.method+" "+tc.path+" HTTP/1.1\r\nHost: "+tc.host+"\r\n\r\n")
			resp, _ := readResp(t, br, tc.method)
			r := rec.requests() // at once: no waiting
			if len(r) != before+1 {
				t.Fatalf("%d records after the response, want %d", len(r), before+1)
			}
			if got := r[before]; got.Code != tc.code || got.Reason != tc.reason || resp.StatusCode != tc.code || got.Listener != "l" {
				t.Errorf("record %+v, response %d; want code %d reason %q", got, resp.StatusCode, tc.code, tc.reason)
			}
		})
	}
}

// --- handoff to net/http ---------------------------------------------------

// TestHandoffToNetHTTP: what the fast path does not serve is handed to
// net/http with the bytes read so far, and works, including after a first
// request the fast path served on the same connection; the connection
// gauge ends at zero.
func TestHandoffToNetHTTP(t *testing.T) {
	upstream := func(t *testing.T) string {
		up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if strings.EqualFold(r.Header.Get("Upgrade"), "websocket") {
				conn, brw, err := http.NewResponseController(w).Hijack()
				if err != nil {
					return
				}
				defer conn.Close()
				io.WriteString(conn, "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
				b := make([]byte, 4)
				for {
					if _, err := io.ReadFull(brw, b); err != nil {
						return
					}
					conn.Write(b)
				}
			}
			body, _ := io.ReadAll(r.Body)
			fmt.Fprintf(w, "%s %s %s %s", r.Proto, r.Method, r.URL.Path, body)
		}))
		t.Cleanup(up.Close)
		return up.Listener.Addr().String()
	}
	const chunkedPost = "POST /chunked HTTP/1.1\r\nHost: api.internal\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
	tests := []struct {
		name string
		run  func(t *testing.T, c net.Conn, br *bufio.Reader)
	}{
		{"HTTP/1.0", func(t *testing.T, c net.Conn, br *bufio.Reader) {
			write(t, c, "GET /old HTTP/1.0\r\nHost: api.internal\r\n\r\n")
			resp, body := readResp(t, br, http.MethodGet)
			if resp.StatusCode != 200 || body != "HTTP/1.1 GET /old " {
				t.Errorf("got %d %q", resp.StatusCode, body)
			}
			expectEOF(t, br)
		}},
		{"chunked request body", func(t *testing.T, c net.Conn, br *bufio.Reader) {
			write(t, c, chunkedPost)
			if resp, body := readResp(t, br, http.MethodPost); resp.StatusCode != 200 || body != "HTTP/1.1 POST /chunked hello world" {
				t.Errorf("got %d %q", resp.StatusCode, body)
			}
		}},
		{"Expect: 100-continue", func(t *testing.T, c net.Conn, br *bufio.Reader) {
			write(t, c, "PUT /put HTTP/1.1\r\nHost: api.internal\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
			if head := readRawHead(t, br); !strings.HasPrefix(head, "HTTP/1.1 100 Continue\r\n") {
				t.Fatalf("got %q, want 100 Continue", head)
			}
			write(t, c, "data")
			if resp, body := readResp(t, br, http.MethodPut); resp.StatusCode != 200 || body != "HTTP/1.1 PUT /put data" {
				t.Errorf("got %d %q", resp.StatusCode, body)
			}
		}},
		{"Upgrade: websocket", func(t *testing.T, c net.Conn, br *bufio.Reader) {
			write(t, c, "GET /ws HTTP/1.1\r\nHost: api.internal\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"+
				"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
			resp, err := http.ReadResponse(br, &http.Request{Method: http.MethodGet})
			if err != nil || resp.StatusCode != http.StatusSwitchingProtocols {
				t.Fatalf("got %v, %v; want 101", resp, err)
			}
			for _, msg := range []string{"ping", "pong"} {
				write(t, c, msg)
				b := make([]byte, 4)
				if _, err := io.ReadFull(br, b); err != nil || string(b) != msg {
					t.Fatalf("echo %q, %v; want %q", b, err, msg)
				}
			}
		}},
		{"GET on the fast path, then a chunked POST, then a GET", func(t *testing.T, c net.Conn, br *bufio.Reader) {
			if resp, body := get(t, c, br, "/first"); resp.StatusCode != 200 || body != "HTTP/1.1 GET /first " {
				t.Fatalf("got %d %q", resp.StatusCode, body)
			}
			write(t, c, chunkedPost)
			if resp, body := readResp(t, br, http.MethodPost); resp.StatusCode != 200 || body != "HTTP/1.1 POST /chunked hello world" {
				t.Errorf("got %d %q", resp.StatusCode, body)
			}
			if resp, body := get(t, c, br, "/third"); resp.StatusCode != 200 || body != "HTTP/1.1 GET /third " {
				t.Errorf("got %d %q", resp.StatusCode, body)
			}
		}},
		{"GET and a chunked POST pipelined", func(t *testing.T, c net.Conn, br *bufio.Reader) {
			write(t, c, "GET /first HTTP/1.1\r\nHost: api.internal\r\n\r\n"+chunkedPost)
			if resp, body := readResp(t, br, http.MethodGet); resp.StatusCode != 200 || body != "HTTP/1.1 GET /first " {
				t.Errorf("got %d %q", resp.StatusCode, body)
			}
			if resp, body := readResp(t, br, http.MethodPost); resp.StatusCode != 200 || body != "HTTP/1.1 POST /chunked hello world" {
				t.Errorf("got %d %q", resp.StatusCode, body)
			}
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			rec := &testRecorder{}
			addr, _ := startProxy(t, proxyOpts{endpoints: []string{upstream(t)}, rec: rec, upgrades: []string{"websocket"}})
			c, br := dialProxy(t, addr)
			tc.run(t, c, br)
			if _, opened := rec.conns(); opened < 2 {
				t.Errorf("not handed to net/http (%d opens)", opened)
			}
			c.Close()
			waitFor(t, "the connection gauge to return to 0", func() bool { open, _ := rec.conns(); return open == 0 })
		})
	}
}

// TestHandoffH2CPriorKnowledge: an h2c client (prior knowledge) is served
// by net/http, both requests on the one connection the fast path handed
// over. (Go's client may dial a spare connection when the first is not
// back in its pool yet, and then not use it: which connection carried each
// request is asked of the client, not counted at the proxy.)
func TestHandoffH2CPriorKnowledge(t *testing.T) {
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "%s %s", r.Proto, r.URL.Path)
	}))
	t.Cleanup(up.Close)
	rec := &testRecorder{}
	addr, _ := startProxy(t, proxyOpts{endpoints: []string{up.Listener.Addr().String()}, rec: rec})
	protos := new(http.Protocols)
	protos.SetUnencryptedHTTP2(true)
	tr := &http.Transport{Protocols: protos}
	t.Cleanup(tr.CloseIdleConnections)
	client := &http.Client{Transport: tr, Timeout: 5 * time.Second}
	for i := range 2 {
		var reused bool
		req, err := http.NewRequest(http.MethodGet, "http://"+addr+"/h2c", nil)
		if err != nil {
			t.Fatal(err)
		}
		req = req.WithContext(httptrace.WithClientTrace(req.Context(), &httptrace.ClientTrace{
			GotConn: func(info httptrace.GotConnInfo) { reused = info.Reused },
		}))
		resp, err := client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.ProtoMajor != 2 || resp.StatusCode != 200 || string(body) != "HTTP/1.1 /h2c" {
			t.Errorf("got %s %d %q", resp.Proto, resp.StatusCode, body)
		}
		if i == 1 && !reused {
			t.Error("the second request did not reuse the first connection")
		}
	}
	if _, opened := rec.conns(); opened < 2 {
		t.Errorf("%d opens: the connection was not handed to net/http", opened)
	}
}

// --- upstream connections ---------------------------------------------------

// TestStalePooledConnection: an upstream that closes each connection after
// one response (without Connection: close) loses no request, on both
// wires: GETs meeting the closed pooled connection go again on a new one,
// and a POST finds the closed idle connection out before using it.
func TestStalePooledConnection(t *testing.T) {
	var mu sync.Mutex
	var seen []string
	closed := make(chan [2]string, 100) // the closed connection's upstream and proxy addresses
	up := newRawUpstream(t, func(c net.Conn, br *bufio.Reader) {
		req, body, err := readReq(br)
		if err != nil {
			return
		}
		mu.Lock()
		seen = append(seen, req.Method+" "+req.URL.Path+" "+string(body))
		mu.Unlock()
		msg := req.URL.Path + " " + string(body)
		fmt.Fprintf(c, "HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s", len(msg), msg)
		local, remote := c.LocalAddr().String(), c.RemoteAddr().String()
		c.Close()
		closed <- [2]string{local, remote}
	})
	tests := []struct {
		name      string
		requests  []string // "METHOD /path body"
		waitClose bool     // wait for the upstream to close before the next request
	}{
		{"GETs back to back", []string{"GET /g1 ", "GET /g2 ", "GET /g3 ", "GET /g4 ", "GET /g5 "}, false},
		{"POSTs after the idle connection closed", []string{"GET /warm ", "POST /p1 one", "POST /p2 two", "GET /g ", "POST /p3 three"}, true},
	}
	// resetting answers the first request of each connection and resets
	// the connection (SO_LINGER 0) once the next has arrived: the
	// keep-alive race met as a reset rather than a FIN, deterministically.
	var answered atomic.Int32
	resetting := newRawUpstream(t, func(c net.Conn, br *bufio.Reader) {
		if _, _, err := readReq(br); err != nil {
			return
		}
		answered.Add(1)
		io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
		if _, _, err := readReq(br); err != nil {
			return
		}
		c.(*net.TCPConn).SetLinger(0)
	})
	for _, p := range paths {
		t.Run(p.name, func(t *testing.T) {
			t.Run("GETs meeting a reset", func(t *testing.T) {
				answered.Store(0)
				addr, _ := startProxy(t, proxyOpts{endpoints: []string{resetting.addr()}, netHTTPOnly: p.netHTTPOnly})
				c, br := dialProxy(t, addr)
				for i := range 4 {
					if resp, got := get(t, c, br, "/"); resp.StatusCode != 200 || got != "ok" {
						t.Errorf("GET %d: got %d %s=%q %q", i, resp.StatusCode, ReasonHeader, resp.Header.Get(ReasonHeader), got)
					}
				}
				if n := answered.Load(); n != 4 {
					t.Errorf("the upstream answered %d GETs, want 4", n)
				}
			})
			for _, tc := range tests {
				t.Run(tc.name, func(t *testing.T) {
					mu.Lock()
					seen = nil
					mu.Unlock()
					for len(closed) > 0 {
						<-closed
					}
					addr, _ := startProxy(t, proxyOpts{endpoints: []string{up.addr()}, netHTTPOnly: p.netHTTPOnly})
					c, br := dialProxy(t, addr)
					for _, r := range tc.requests {
						method, rest, _ := strings.Cut(r, " ")
						path, body, _ := strings.Cut(rest, " ")
						write(t, c, fmt.Sprintf("%s %s HTTP/1.1\r\nHost: api.internal\r\nContent-Length: %d\r\n\r\n%s", method, path, len(body), body))
						resp, got := readResp(t, br, method)
						if resp.StatusCode != 200 || got != path+" "+body {
							t.Errorf("%s: got %d %s=%q %q", r, resp.StatusCode, ReasonHeader, resp.Header.Get(ReasonHeader), got)
						}
						if tc.waitClose {
							select {
							case conn := <-closed:
								// The FIN reached the proxy's socket (its
								// kernel acknowledged it): an idle connection
								// the upstream closed, which the pool must not
								// use for the next POST. Until then the next
								// request meets the keep-alive race instead,
								// which no client can win for a POST.
								waitFinAcked(t, conn[0], conn[1])
							case <-time.After(3 * time.Second):
								t.Fatal("the upstream did not close")
							}
						}
					}
					mu.Lock()
					defer mu.Unlock()
					if !slices.Equal(seen, tc.requests) {
						t.Errorf("upstream saw %q, want each request once: %q", seen, tc.requests)
					}
				})
			}
		})
	}
}

// TestClientLeavingCancelsUpstream: a client that leaves while its request
// waits on a long poll cancels the upstream request, on both wires.
func TestClientLeavingCancelsUpstream(t *testing.T) {
	for _, p := range paths {
		t.Run(p.name, func(t *testing.T) {
			arrived := make(chan struct{}, 1)
			cancelled := make(chan time.Time, 1)
			stop := make(chan struct{})
			up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				arrived <- struct{}{}
				select {
				case <-r.Context().Done():
					cancelled <- time.Now()
				case <-stop:
				}
			}))
			t.Cleanup(up.Close)
			rec := &testRecorder{}
			addr, _ := startProxy(t, proxyOpts{endpoints: []string{up.Listener.Addr().String()}, rec: rec, netHTTPOnly: p.netHTTPOnly})
			t.Cleanup(func() { close(stop) }) // before the proxy's Shutdown
			c, _ := dialProxy(t, addr)
			write(t, c, "GET /poll HTTP/1.1\r\nHost: api.internal\r\n\r\n")
			awaitUpstream(t, arrived)
			time.Sleep(200 * time.Millisecond) // the scenario: a client that gives up after a while
			left := time.Now()
			c.Close()
			select {
			case at := <-cancelled:
				if d := at.Sub(left); d > time.Second {
					t.Errorf("upstream request cancelled %v after the client left", d)
				}
			case <-time.After(2 * time.Second):
				t.Fatal("the upstream request was not cancelled after the client left")
			}
			waitFor(t, "the request's record", func() bool { return len(rec.requests()) == 1 })
			if r := rec.requests()[0]; r.Code != 0 {
				t.Errorf("record %+v, want code 0 (the client left)", r)
			}
		})
	}
}

// TestShutdownDrainsFastPath: Shutdown closes an idle connection at once,
// lets a request in flight finish (its response says Connection: close),
// then returns, leaving no goroutine behind.
func TestShutdownDrainsFastPath(t *testing.T) {
	leaks := goleak.IgnoreCurrent()
	t.Cleanup(func() { goleak.VerifyNone(t, leaks) })
	arrived := make(chan struct{}, 1)
	release := make(chan struct{})
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/slow" {
			arrived <- struct{}{}
			<-release
		}
		io.WriteString(w, r.URL.Path)
	}))
	t.Cleanup(up.Close)
	var once sync.Once
	unblock := func() { once.Do(func() { close(release) }) }
	addr, s := startProxy(t, proxyOpts{endpoints: []string{up.Listener.Addr().String()}})
	t.Cleanup(unblock) // before the proxy's Shutdown

	idle, idleBR := dialProxy(t, addr)
	if resp, body := get(t, idle, idleBR, "/fast"); resp.StatusCode != 200 || body != "/fast" {
		t.Fatalf("got %d %q", resp.StatusCode, body)
	}
	busy, busyBR := dialProxy(t, addr)
	write(t, busy, "GET /slow HTTP/1.1\r\nHost: api.internal\r\n\r\n")
	awaitUpstream(t, arrived)

	done := make(chan struct{})
	go func() {
		defer close(done)
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		s.Shutdown(ctx)
	}()
	_ = idle.SetReadDeadline(time.Now().Add(2 * time.Second))
	expectEOF(t, idleBR)
	select {
	case <-done:
		t.Fatal("Shutdown returned with a request in flight")
	default:
	}
	unblock()
	head := readRawHead(t, busyBR)
	if !strings.HasPrefix(head, "HTTP/1.1 200 ") || !strings.Contains(head, "\r\nConnection: close\r\n") {
		t.Errorf("in-flight response head %q: want 200 with Connection: close", head)
	}
	resp, err := http.ReadResponse(bufio.NewReader(io.MultiReader(strings.NewReader(head), busyBR)), nil)
	if err != nil {
		t.Fatal(err)
	}
	if body, _ := io.ReadAll(resp.Body); string(body) != "/slow" {
		t.Errorf("body %q", body)
	}
	expectEOF(t, busyBR)
	select {
	case <-done:
	case <-time.After(3 * time.Second):
		t.Fatal("Shutdown did not return after the last request")
	}
}

// TestShutdownReturnsAfterItsContext: Shutdown(ctx) returns soon after ctx
// ends although a request waits on an upstream that does not answer, as on
// the net/http path. Here the client sent the first byte of its next
// request during the exchange, which ends the fast path's downstream
// watcher (as net/http's background read stops at a pipelined byte).
func TestShutdownReturnsAfterItsContext(t *testing.T) {
	watched := func(s *Server) bool {
		s.fast.mu.Lock()
		defer s.fast.mu.Unlock()
		for fc := range s.fast.conns {
			if fc.state.Load() == fcWatched {
				return true
			}
		}
		return false
	}
	for _, p := range paths {
		t.Run(p.name, func(t *testing.T) {
			arrived := make(chan struct{}, 1)
			stop := make(chan struct{})
			up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				arrived <- struct{}{}
				select {
				case <-r.Context().Done():
				case <-stop:
				}
			}))
			t.Cleanup(up.Close)
			addr, s := startProxy(t, proxyOpts{endpoints: []string{up.Listener.Addr().String()}, netHTTPOnly: p.netHTTPOnly})
			done := make(chan struct{})
			t.Cleanup(func() {
				close(stop) // lets a stuck Shutdown finish
				<-done
			})
			c, _ := dialProxy(t, addr)
			write(t, c, "GET /hang HTTP/1.1\r\nHost: api.internal\r\n\r\n")
			awaitUpstream(t, arrived)
			if !p.netHTTPOnly {
				waitFor(t, "the downstream watcher", func() bool { return watched(s) })
			}
			write(t, c, "GET /next HTTP/1.1\r\nHost: api.internal\r\n\r\n")

			const grace = 200 * time.Millisecond
			start := time.Now()
			go func() {
				defer close(done)
				ctx, cancel := context.WithTimeout(context.Background(), grace)
				defer cancel()
				s.Shutdown(ctx)
			}()
			select {
			case <-done:
			case <-time.After(grace + time.Second):
				t.Errorf("Shutdown has not returned %v after its context ended", time.Since(start)-grace)
			}
		})
	}
}

// TestRetries: a GET answered 503 is retried on the other endpoint under a
// 5xx retry policy; a POST is not (unless it has an Idempotency-Key). Both
// paths agree.
func TestRetries(t *testing.T) {
	for _, p := range paths {
		t.Run(p.name, func(t *testing.T) {
			var mu sync.Mutex
			hits := map[string]int{} // "bad GET", "good POST"...
			count := func(which string) http.HandlerFunc {
				return func(w http.ResponseWriter, r *http.Request) {
					io.Copy(io.Discard, r.Body)
					mu.Lock()
					hits[which+" "+r.Method]++
					mu.Unlock()
					if which == "bad" {
						w.WriteHeader(http.StatusServiceUnavailable)
						return
					}
					io.WriteString(w, "good")
				}
			}
			bad := httptest.NewServer(count("bad"))
			t.Cleanup(bad.Close)
			good := httptest.NewServer(count("good"))
			t.Cleanup(good.Close)
			rec := &testRecorder{}
			addr, _ := startProxy(t, proxyOpts{endpoints: []string{bad.Listener.Addr().String(), good.Listener.Addr().String()}, rec: rec,
				netHTTPOnly: p.netHTTPOnly, retry: &config.RetryPolicy{On: config.Retry5xx, NumRetries: 1, OtherHost: true}})
			c, br := dialProxy(t, addr)
			hit := func(k string) int {
				mu.Lock()
				defer mu.Unlock()
				return hits[k]
			}

			for range 4 {
				if resp, body := get(t, c, br, "/"); resp.StatusCode != 200 || body != "good" {
					t.Errorf("GET: got %d %q, want the retry's 200", resp.StatusCode, body)
				}
			}
			retries, _ := rec.counts()
			if hit("bad GET") == 0 || hit("good GET") != 4 || retries != hit("bad GET") {
				t.Errorf("GETs: bad %d, good %d, retries %d; want bad > 0, good 4, one retry per bad", hit("bad GET"), hit("good GET"), retries)
			}

			got503 := 0
			for range 2 {
				write(t, c, "POST / HTTP/1.1\r\nHost: api.internal\r\nContent-Length: 4\r\n\r\ndata")
				if resp, _ := readResp(t, br, http.MethodPost); resp.StatusCode == 503 {
					got503++
				}
			}
			after, denied := rec.counts()
			if got503 != 1 || hit("bad POST") != 1 || hit("good POST") != 1 || after != retries || !slices.Contains(denied, "non_idempotent") {
				t.Errorf("POSTs: client saw %d 503s, bad %d, good %d, retries %d (before %d), denied %q; want one 503 not retried",
					got503, hit("bad POST"), hit("good POST"), after, retries, denied)
			}

			for range 2 {
				write(t, c, "POST / HTTP/1.1\r\nHost: api.internal\r\nIdempotency-Key: k1\r\nContent-Length: 4\r\n\r\ndata")
				if resp, body := readResp(t, br, http.MethodPost); resp.StatusCode != 200 || body != "good" {
					t.Errorf("POST with an Idempotency-Key: got %d %q, want the retry's 200", resp.StatusCode, body)
				}
			}
		})
	}
}

// --- bugs --------------------------------------------------------------------

// TestConnectionHeaderCannotStripRequestFraming: a client naming
// Content-Length or Host in Connection must not make the upstream see a
// different message: the body stays the body (no request smuggled to the
// upstream, no response desynchronised) and the Host stays. net/http
// writes both from the parsed request whatever Connection says.
func TestConnectionHeaderCannotStripRequestFraming(t *testing.T) {
	const smuggled = "GET /smuggled HTTP/1.1\r\nHost: api.internal\r\n\r\n"
	tests := []struct {
		name string
		// requests are sent one after the other on one connection, each
		// expecting its answer.
		requests, answers []string
		upstream          []string // the requests the upstream must see
	}{
		{
			name: "Content-Length",
			requests: []string{
				fmt.Sprintf("POST /p HTTP/1.1\r\nHost: api.internal\r\nConnection: Content-Length\r\nContent-Length: %d\r\n\r\n%s", len(smuggled), smuggled),
				"GET /next HTTP/1.1\r\nHost: api.internal\r\n\r\n",
			},
			answers:  []string{fmt.Sprintf("POST /p host=api.internal body=%q", smuggled), `GET /next host=api.internal body=""`},
			upstream: []string{"POST /p", "GET /next"},
		},
		{
			name:     "Host",
			requests: []string{"GET /h HTTP/1.1\r\nHost: api.internal\r\nConnection: Host\r\n\r\n"},
			answers:  []string{`GET /h host=api.internal body=""`},
			upstream: []string{"GET /h"},
		},
	}
	for _, p := range paths {
		t.Run(p.name, func(t *testing.T) {
			for _, tc := range tests {
				t.Run(tc.name, func(t *testing.T) {
					var mu sync.Mutex
					var seen []string
					up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
						body, _ := io.ReadAll(r.Body)
						mu.Lock()
						seen = append(seen, r.Method+" "+r.URL.Path)
						mu.Unlock()
						fmt.Fprintf(w, "%s %s host=%s body=%q", r.Method, r.URL.Path, r.Host, body)
					}))
					t.Cleanup(up.Close)
					addr, _ := startProxy(t, proxyOpts{endpoints: []string{up.Listener.Addr().String()}, netHTTPOnly: p.netHTTPOnly})
					c, br := dialProxy(t, addr)
					for i, req := range tc.requests {
						write(t, c, req)
						method, _, _ := strings.Cut(req, " ")
						if resp, body := readResp(t, br, method); resp.StatusCode != 200 || body != tc.answers[i] {
							t.Errorf("request %d answered %d %q, want 200 %q", i+1, resp.StatusCode, body, tc.answers[i])
						}
					}
					mu.Lock()
					defer mu.Unlock()
					if !slices.Equal(seen, tc.upstream) {
						t.Errorf("upstream saw %q, want %q", seen, tc.upstream)
					}
				})
			}
		})
	}
}

// TestConnectionHeaderCannotStripResponseFraming: an upstream naming
// Content-Length or Transfer-Encoding in Connection must not leave the
// client a response without framing on a keep-alive connection.
func TestConnectionHeaderCannotStripResponseFraming(t *testing.T) {
	responses := map[string]string{
		"/length":  "HTTP/1.1 200 OK\r\nConnection: Content-Length\r\nContent-Length: 2\r\n\r\nok",
		"/chunked": "HTTP/1.1 200 OK\r\nConnection: Transfer-Encoding\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
	}
	for _, p := range paths {
		t.Run(p.name, func(t *testing.T) {
			up := newRawUpstream(t, func(c net.Conn, br *bufio.Reader) {
				for {
					req, _, err := readReq(br)
					if err != nil {
						return
					}
					io.WriteString(c, responses[req.URL.Path])
				}
			})
			addr, _ := startProxy(t, proxyOpts{endpoints: []string{up.addr()}, netHTTPOnly: p.netHTTPOnly})
			for _, path := range []string{"/length", "/chunked"} {
				t.Run(path[1:], func(t *testing.T) {
					c, br := dialProxy(t, addr)
					write(t, c, "GET "+path+" HTTP/1.1\r\nHost: api.internal\r\n\r\n")
					head := readRawHead(t, br)
					lower := strings.ToLower(head)
					if !strings.Contains(lower, "\r\ncontent-length:") && !strings.Contains(lower, "\r\ntransfer-encoding:") &&
						!strings.Contains(lower, "\r\nconnection: close\r\n") {
						t.Fatalf("response without framing on a keep-alive connection: %q", head)
					}
					resp, err := http.ReadResponse(bufio.NewReader(io.MultiReader(strings.NewReader(head), br)), nil)
					if err != nil {
						t.Fatal(err)
					}
					if body, err := io.ReadAll(resp.Body); err != nil || string(body) != "ok" {
						t.Errorf("body %q, %v", body, err)
					}
				})
			}
		})
	}
}

// TestResponseHeadsNetHTTPRelays: response heads the net/http path relays
// (http.ReadResponse takes them) are relayed by the fast path too, not
// failed with 503: the fast path has no net/http to fall back to for a
// response.
func TestResponseHeadsNetHTTPRelays(t *testing.T) {
	var fields strings.Builder
	for i := range 150 {
		fmt.Fprintf(&fields, "X-Field-%d: v\r\n", i)
	}
	responses := map[string]string{
		"/many-fields": "HTTP/1.1 200 OK\r\n" + fields.String() + "Content-Length: 2\r\n\r\nok",
		"/large-head":  "HTTP/1.1 200 OK\r\nX-Large: " + strings.Repeat("a", 20<<10) + "\r\nContent-Length: 2\r\n\r\nok",
	}
	for _, p := range paths {
		t.Run(p.name, func(t *testing.T) {
			up := newRawUpstream(t, func(c net.Conn, br *bufio.Reader) {
				for {
					req, _, err := readReq(br)
					if err != nil {
						return
					}
					io.WriteString(c, responses[req.URL.Path])
				}
			})
			addr, _ := startProxy(t, proxyOpts{endpoints: []string{up.addr()}, netHTTPOnly: p.netHTTPOnly})
			c, br := dialProxy(t, addr)
			for _, path := range []string{"/many-fields", "/large-head"} {
				t.Run(path[1:], func(t *testing.T) {
					resp, body := get(t, c, br, path)
					if resp.StatusCode != 200 || body != "ok" {
						t.Errorf("got %d %s=%q %q", resp.StatusCode, ReasonHeader, resp.Header.Get(ReasonHeader), body)
					}
				})
			}
		})
	}
}

// TestRBACDoesNotSeeDownstreamXFCC: the RBAC filter decides on the request
// without the client's x-forwarded-client-cert, which is never trusted
// (net/http path: authorize deletes it first): a forged one must not
// satisfy a header rule.
func TestRBACDoesNotSeeDownstreamXFCC(t *testing.T) {
	rbac := rbacFilter(t, &rbacv3.Permission{Rule: &rbacv3.Permission_Header{Header: &routev3.HeaderMatcher{
		Name: "x-forwarded-client-cert", HeaderMatchSpecifier: &routev3.HeaderMatcher_PresentMatch{PresentMatch: true}}}})
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "reached") }))
	t.Cleanup(up.Close)
	for _, p := range paths {
		t.Run(p.name, func(t *testing.T) {
			addr, _ := startProxy(t, proxyOpts{endpoints: []string{up.Listener.Addr().String()}, netHTTPOnly: p.netHTTPOnly, rbac: rbac})
			c, br := dialProxy(t, addr)
			write(t, c, "GET /admin HTTP/1.1\r\nHost: api.internal\r\nX-Forwarded-Client-Cert: By=spiffe://forged;URI=spiffe://admin\r\n\r\n")
			if resp, body := readResp(t, br, http.MethodGet); resp.StatusCode != 403 || resp.Header.Get(ReasonHeader) != string(xds.ReasonAuthzDenied) {
				t.Errorf("forged x-forwarded-client-cert: got %d %q, want 403 %s", resp.StatusCode, body, xds.ReasonAuthzDenied)
			}
		})
	}
}

// rbacFilter returns the RBAC filter of an HTTP connection manager that
// allows requests matching perm (any principal), decoded as the xDS client
// decodes it.
func rbacFilter(t *testing.T, perm *rbacv3.Permission) *config.RBACFilter {
	t.Helper()
	rules := &httprbacv3.RBAC{Rules: &rbacv3.RBAC{Action: rbacv3.RBAC_ALLOW, Policies: map[string]*rbacv3.Policy{
		"header-rule": {Permissions: []*rbacv3.Permission{perm}, Principals: []*rbacv3.Principal{{Identifier: &rbacv3.Principal_Any{Any: true}}}},
	}}}
	f := decodeHCM(t, func(m *hcmv3.HttpConnectionManager) {
		m.HttpFilters = append([]*hcmv3.HttpFilter{
			{Name: "envoy.filters.http.rbac", ConfigType: &hcmv3.HttpFilter_TypedConfig{TypedConfig: packAny(t, rules)}},
		}, m.HttpFilters...)
	}).RBAC
	if f == nil {
		t.Fatal("no RBAC filter decoded")
	}
	return f
}

// packAny packs m into an Any, failing t if it cannot.
func packAny(t *testing.T, m proto.Message) *anypb.Any {
	t.Helper()
	a, err := anypb.New(m)
	if err != nil {
		t.Fatal(err)
	}
	return a
}

// decodeHCM returns the HTTP connection manager of listener "l" routing
// every request to cluster "c" with the router filter, after edit changed
// it (nil: none), decoded as the xDS client decodes it.
func decodeHCM(t *testing.T, edit func(*hcmv3.HttpConnectionManager)) *config.HTTPConnectionManager {
	t.Helper()
	m := &hcmv3.HttpConnectionManager{
		StatPrefix: "l",
		RouteSpecifier: &hcmv3.HttpConnectionManager_RouteConfig{RouteConfig: &routev3.RouteConfiguration{Name: "rc", VirtualHosts: []*routev3.VirtualHost{{
			Name: "vh", Domains: []string{"*"}, Routes: []*routev3.Route{{
				Match:  &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_Prefix{Prefix: "/"}},
				Action: &routev3.Route_Route{Route: &routev3.RouteAction{ClusterSpecifier: &routev3.RouteAction_Cluster{Cluster: "c"}}},
			}},
		}}}},
		HttpFilters: []*hcmv3.HttpFilter{
			{Name: "envoy.filters.http.router", ConfigType: &hcmv3.HttpFilter_TypedConfig{TypedConfig: packAny(t, &routerv3.Router{})}},
		},
	}
	if edit != nil {
		edit(m)
	}
	l := &listenerv3.Listener{
		Name: "l",
		Address: &corev3.Address{Address: &corev3.Address_SocketAddress{SocketAddress: &corev3.SocketAddress{
			Address: "127.0.0.1", PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: 15001}}}},
		FilterChains: []*listenerv3.FilterChain{{Filters: []*listenerv3.Filter{{
			Name: "envoy.filters.network.http_connection_manager", ConfigType: &listenerv3.Filter_TypedConfig{TypedConfig: packAny(t, m)},
		}}}},
	}
	dl, err := config.DecodeListener(packAny(t, l))
	if err != nil {
		t.Fatal(err)
	}
	return dl.Chains[0].HTTP
}

// TestRetryBudgetReason: when a retry is due and the retry budget has no
// token, the answer says retry_budget_exhausted, on both wires: the
// upstream's own answer relayed (its reason replaced), and the sidecar's
// failure after a connect failure.
func TestRetryBudgetReason(t *testing.T) {
	dead, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	deadAddr := dead.Addr().String()
	dead.Close()
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set(ReasonHeader, "from-upstream")
		w.WriteHeader(http.StatusServiceUnavailable)
		io.WriteString(w, "busy")
	}))
	t.Cleanup(up.Close)
	empty := &xds.RetryBudget{TTL: xds.Duration(10 * time.Second)} // no ratio, no reserve: never a token
	retry := &config.RetryPolicy{On: config.Retry5xx | config.RetryConnectFailure, NumRetries: 2}
	tests := []struct {
		name     string
		endpoint string
		code     int
		body     string
	}{
		{"relayed", up.Listener.Addr().String(), 503, "busy"},
		{"failed", deadAddr, 503, string(xds.ReasonRetryBudgetExhausted) + "\n"},
	}
	for _, p := range paths {
		t.Run(p.name, func(t *testing.T) {
			for _, tc := range tests {
				t.Run(tc.name, func(t *testing.T) {
					rec := &testRecorder{}
					addr, _ := startProxy(t, proxyOpts{endpoints: []string{tc.endpoint}, netHTTPOnly: p.netHTTPOnly, rec: rec, retry: retry, budget: empty})
					c, br := dialProxy(t, addr)
					resp, body := get(t, c, br, "/")
					if resp.StatusCode != tc.code || body != tc.body || resp.Header.Values(ReasonHeader)[0] != string(xds.ReasonRetryBudgetExhausted) || len(resp.Header.Values(ReasonHeader)) != 1 {
						t.Errorf("got %d %s=%q %q", resp.StatusCode, ReasonHeader, resp.Header.Values(ReasonHeader), body)
					}
					if retries, denied := rec.counts(); retries != 0 || !slices.Equal(denied, []string{string(xds.ReasonRetryBudgetExhausted)}) {
						t.Errorf("retries %d, denied %v", retries, denied)
					}
				})
			}
		})
	}
}

// TestGRPCFailureOverHTTP1: the sidecar's own answer to a gRPC request
// (content-type application/grpc) sent over HTTP/1.1 is a gRPC status on
// both wires, as over h2c (TestGRPCLocalRepliesAreGRPCStatuses).
func TestGRPCFailureOverHTTP1(t *testing.T) {
	for _, p := range paths {
		t.Run(p.name, func(t *testing.T) {
			addr, _ := startProxy(t, proxyOpts{netHTTPOnly: p.netHTTPOnly})
			c, br := dialProxy(t, addr)
			for _, tc := range []struct {
				name, host, path, grpcStatus string
				reason                       xds.FailureReason
			}{
				{"no route", "no-routes.internal", "/svc/M", "12", xds.ReasonNoRoute},
				{"no endpoint", "api.internal", "/svc/M", "14", xds.ReasonNoHealthyUpstream},
			} {
				t.Run(tc.name, func(t *testing.T) {
					write(t, c, "POST "+tc.path+" HTTP/1.1\r\nHost: "+tc.host+"\r\nContent-Type: application/grpc\r\nTE: trailers\r\nContent-Length: 0\r\n\r\n")
					resp, body := readResp(t, br, http.MethodPost)
					if resp.StatusCode != 200 || resp.Header.Get("Content-Type") != "application/grpc" || resp.Header.Get("Grpc-Status") != tc.grpcStatus ||
						resp.Header.Get(ReasonHeader) != string(tc.reason) || resp.Header.Get("Grpc-Message") != "meshlet:%20"+string(tc.reason) || body != "" {
						t.Errorf("got %d %v %q", resp.StatusCode, resp.Header, body)
					}
				})
			}
		})
	}
}

// waitFinAcked waits until the TCP connection from local to remote
// (IPv4, "ip:port") has left FIN_WAIT1 in /proc/net/tcp: the peer's kernel
// received and acknowledged local's FIN (FIN_WAIT2, TIME_WAIT, or gone).
func waitFinAcked(t *testing.T, local, remote string) {
	t.Helper()
	hexAddr := func(s string) string {
		ap := netip.MustParseAddrPort(s)
		a := ap.Addr().As4()
		return fmt.Sprintf("%02X%02X%02X%02X:%04X", a[3], a[2], a[1], a[0], ap.Port())
	}
	l, r := hexAddr(local), hexAddr(remote)
	testutil.Until(t, 5*time.Second, "the FIN of "+local+" acknowledged by "+remote, func() bool {
		b, err := os.ReadFile("/proc/net/tcp")
		if err != nil {
			t.Fatal(err)
		}
		for _, line := range strings.Split(string(b), "\n") {
			f := strings.Fields(line)
			if len(f) > 3 && f[1] == l && f[2] == r {
				return f[3] != "04" // FIN_WAIT1
			}
		}
		return true
	})
}
