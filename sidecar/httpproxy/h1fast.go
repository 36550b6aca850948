package httpproxy

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"github.com/meshlet/meshlet/sidecar/cluster"
	"github.com/meshlet/meshlet/sidecar/config"
	"github.com/meshlet/meshlet/sidecar/rawsock"
	"github.com/meshlet/meshlet/sidecar/tlsid"
	"github.com/meshlet/meshlet/sidecar/tracing"
	"go.opentelemetry.io/otel/trace"
)

// The HTTP/1.1 fast path.
//
// Each downstream HTTP/1.1 connection is served by one goroutine that
// parses request heads in place in its own read buffer (h1head.go), routes,
// authorizes and forwards them as bytes on the upstream cluster's pooled
// HTTP/1.1 connections (cluster.H1Conn), and relays the response head
// (hop-by-hop fields dropped, Via added) and body (Content-Length,
// chunked or read-until-close framing, passed through as is), writing what
// it has before each read that would block: a small response costs one
// read and one write on each side, and a streamed one (SSE, chunked) is
// flushed chunk by chunk. Retries, per-try and route timeouts, the retry
// budget, circuit breakers, outlier detection, RBAC,
// x-forwarded-client-cert and tracing (request and attempt spans, trace
// context continued and injected) behave as on the net/http path
// (forward.go).
//
// What the fast path does not do the connection does on net/http's
// server, for the rest of its life: the bytes read so far are replayed to
// it. That is HTTP/1.0, h2c (prior knowledge), Upgrade (WebSockets),
// Expect, request bodies sent chunked or larger than the route's replay
// buffer, requests to HTTP/2 clusters, routes with an idle timeout or a
// max stream duration, and anything unusual in a head
// (net/http answers its 400s and 431s).
//
// A downstream that goes away is noticed while its request is in flight: a
// monitor, ticking every watchAfter, starts a goroutine reading the
// downstream for exchanges older than that (as net/http's background read
// does for every request); the client's EOF or reset cancels the upstream
// attempt, so a long poll's app sees its client leave.

const (
	// fastBufSize is a connection's read buffer to start with: most request
	// heads fit. It grows to fastMaxBuf for a large head or a body to
	// replay, and shrinks back after.
	fastBufSize = 4 << 10
	fastMaxBuf  = 1<<20 + 64<<10
	// fastMaxHead bounds a request head (net/http's default is 1 MiB, which
	// answers larger heads with 431 once the connection is handed over).
	fastMaxHead = 64 << 10
	// fastOutSize is a pooled output buffer (request or response head, and
	// the body bytes written with it).
	fastOutSize = 32 << 10
	// DownstreamIdleTimeout closes a keep-alive downstream connection that
	// carries no request for this long (give or take a minute), as
	// net/http's IdleTimeout does on the other path.
	DownstreamIdleTimeout = 5 * time.Minute
	// watchAfter is how long an exchange runs before the downstream is
	// watched for the client leaving.
	watchAfter = 50 * time.Millisecond
)

var outPool = sync.Pool{New: func() any { b := make([]byte, 0, fastOutSize); return &b }}

// Connection states of the fast path.
const (
	fcIdle    int32 = iota // waiting for the first byte of a request: may be closed
	fcReading              // reading a request head and body
	fcBusy                 // an upstream exchange in flight: may be watched
	fcWatched              // busy, with a goroutine reading the downstream
	fcClosed               // closed by Shutdown
)

// fastServer is the fast path's share of a Server.
type fastServer struct {
	mu     sync.Mutex // guards conns and closed
	conns  map[*fastConn]struct{}
	closed bool

	draining atomic.Bool
	// now is a coarse clock (UnixNano), moved by the monitor every
	// watchAfter, for decisions that need no precision.
	now      atomic.Int64
	wg       sync.WaitGroup // one per connection goroutine
	stop     chan struct{}  // ends the monitor
	done     chan struct{}  // closed when the monitor has returned
	stopOnce sync.Once
}

func (f *fastServer) init() {
	f.now.Store(time.Now().UnixNano())
	f.conns = map[*fastConn]struct{}{}
	f.stop = make(chan struct{})
	f.done = make(chan struct{})
}

// fastConn is one downstream connection on the fast path.
type fastConn struct {
	s    *Server
	conn net.Conn
	// rw reads and writes conn: with raw system calls for a plain TCP
	// connection (rawsock), else conn itself. The watcher reads conn.
	rw   io.ReadWriter
	peer tlsid.Peer
	// buf holds what was read and not yet used: buf[r:w].
	buf  []byte
	r, w int

	head reqHead
	resp respHead

	state atomic.Int32
	since atomic.Int64 // UnixNano when the current exchange went upstream

	// idleSet is when the read deadline (DownstreamIdleTimeout) was last
	// set (UnixNano): it is moved at most once a minute.
	idleSet int64

	// xfcc caches the x-forwarded-client-cert value for chain xfccFor.
	xfccFor *config.HTTPConnectionManager
	xfcc    []byte

	// x is the exchange in progress, nil once settled: settle records it
	// and releases its max_requests slot (heldRequest) once, before the
	// last byte of the response is written, as the net/http path does when
	// its handler returns: a scrape or a new request after the response
	// sees both.
	x           *exchange
	ex          exchange        // x's storage
	traceCtx    context.Context // the request span's context, when traced
	heldRequest *cluster.Cluster

	mu        sync.Mutex // guards up and cancelled, between the exchange and its watcher
	up        net.Conn   // the upstream connection of the attempt in flight
	cancelled bool       // the downstream left during the exchange

	// answered says the last exchange's response was written whole; when
	// the connection then ends with bytes of another request pending,
	// serve closes it lingering (linger.go).
	answered bool

	watchWG    sync.WaitGroup // the watcher goroutine, when state is fcWatched
	watchAbort atomic.Bool
	watchByte  [1]byte
	watchN     int
	watchErr   error
}

// handleFast serves conn on the fast path; false when the Server is shut
// down (conn is then closed).
func (s *Server) handleFast(conn net.Conn) {
	fc := &fastConn{s: s, conn: conn, rw: conn}
	if rc, ok := rawsock.Wrap(conn).(*rawsock.Conn); ok {
		fc.rw = rc
	}
	if tc, ok := conn.(*tls.Conn); ok {
		fc.peer = tlsid.PeerOf(tc.ConnectionState())
	}
	f := &s.fast
	f.mu.Lock()
	if f.closed {
		f.mu.Unlock()
		conn.Close()
		return
	}
	f.conns[fc] = struct{}{}
	f.wg.Add(1)
	f.mu.Unlock()
	go fc.serve()
}

// monitor starts watchers for long exchanges until stop.
func (s *Server) monitor() {
	defer close(s.fast.done)
	t := time.NewTicker(watchAfter)
	defer t.Stop()
	for {
		select {
		case <-s.fast.stop:
			return
		case now := <-t.C:
			s.fast.now.Store(now.UnixNano())
			limit := now.Add(-watchAfter).UnixNano()
			s.fast.mu.Lock()
			for fc := range s.fast.conns {
				if fc.state.Load() != fcBusy || fc.since.Load() > limit {
					continue
				}
				// Add before the swap: endBusy waits only after seeing
				// fcWatched.
				fc.watchWG.Add(1)
				if fc.state.CompareAndSwap(fcBusy, fcWatched) {
					go fc.watch()
				} else {
					fc.watchWG.Done()
				}
			}
			s.fast.mu.Unlock()
		}
	}
}

// shutdownFast closes idle fast-path connections, lets busy ones finish
// their exchange (their response says Connection: close), and waits for
// them until ctx is done, then closes the rest.
func (s *Server) shutdownFast(ctx context.Context) {
	f := &s.fast
	f.draining.Store(true)
	f.mu.Lock()
	f.closed = true
	for fc := range f.conns {
		if fc.state.CompareAndSwap(fcIdle, fcClosed) {
			fc.conn.Close()
		}
	}
	f.mu.Unlock()
	done := make(chan struct{})
	go func() {
		f.wg.Wait()
		close(done)
	}()
	select {
	case <-done:
	case <-ctx.Done():
		f.mu.Lock()
		for fc := range f.conns {
			fc.cancel() // an exchange blocked on its upstream ends too
			fc.conn.Close()
		}
		f.mu.Unlock()
		<-done
	}
	f.stopOnce.Do(func() { close(f.stop) })
	<-f.done
}

func (fc *fastConn) serve() {
	s := fc.s
	handedOff := false
	s.rec.Connections(s.name, 1)
	lingering := false
	defer func() {
		if !handedOff {
			if lingering {
				fc.lingerClose()
			}
			fc.conn.Close()
			s.rec.Connections(s.name, -1)
		}
		s.fast.mu.Lock()
		delete(s.fast.conns, fc)
		s.fast.mu.Unlock()
		fc.releaseBuf()
		s.fast.wg.Done()
	}()
	for {
		res, ok := fc.readHead()
		if !ok {
			return
		}
		if res == parseFallback {
			handedOff = true
			fc.handoff()
			return
		}
		keep, fallback := fc.exchange()
		if fallback {
			handedOff = true
			fc.handoff()
			return
		}
		if !keep || s.fast.draining.Load() {
			// A client that did not say Connection: close may send its next
			// request at any moment, arriving after a plain close would
			// have made its kernel discard the answer (RST): linger, as
			// Envoy's delayed close does for every close it initiates.
			lingering = fc.answered && (fc.inputLeft() || !fc.head.closeConn)
			return
		}
	}
}

// inputLeft reports whether the client sent bytes past the request just
// answered: read already (pipelined), or waiting in the socket when the
// client did not say it would send no more (Connection: close).
func (fc *fastConn) inputLeft() bool {
	return fc.w > fc.r || (!fc.head.closeConn && inputPending(fc.conn))
}

// lingerClose half-closes the connection and reads and discards what the
// client still sends, for up to the chain's DelayedCloseTimeout (none when
// 0) and lingerMaxBytes, through a pooled output buffer; serve closes it
// after. A Shutdown that gives up closes the connection, which ends it.
func (fc *fastConn) lingerClose() {
	d := fc.s.chain.Load().DelayedCloseTimeout
	if d <= 0 || fc.state.Load() == fcClosed {
		return
	}
	op := outPool.Get().(*[]byte)
	lingerClose(fc.conn, fc.rw, time.Now().Add(d), (*op)[:cap(*op)])
	outPool.Put(op)
}

// readHead reads until buf holds a whole request head, or says to fall
// back; ok is false when the connection is done (closed, idle timeout,
// shut down).
func (fc *fastConn) readHead() (parseResult, bool) {
	for {
		if fc.w > fc.r {
			if fc.state.Load() == fcIdle && !fc.state.CompareAndSwap(fcIdle, fcReading) {
				return 0, false // closed by Shutdown
			}
			res := fc.head.parseRequest(fc.buf[fc.r:fc.w])
			if res != parseNeedMore {
				return res, true
			}
			if fc.w-fc.r >= fastMaxHead {
				return parseFallback, true // net/http answers 431
			}
		} else {
			fc.r, fc.w = 0, 0
			if fc.state.Load() == fcClosed {
				return 0, false
			}
			fc.state.Store(fcIdle)
			if fc.s.fast.draining.Load() {
				return 0, false
			}
			if len(fc.buf) > fastBufSize {
				fc.releaseBuf() // an idle connection keeps a small buffer
			}
		}
		if fc.buf == nil {
			fc.buf = make([]byte, fastBufSize)
		}
		if fc.w == len(fc.buf) {
			fc.grow(fc.w - fc.r + 1)
		}
		if fc.s.fast.now.Load()-fc.idleSet > int64(time.Minute) {
			now := time.Now()
			fc.idleSet = now.UnixNano()
			_ = fc.conn.SetReadDeadline(now.Add(DownstreamIdleTimeout))
		}
		n, err := fc.rw.Read(fc.buf[fc.w:])
		fc.w += n
		if err != nil && n == 0 {
			return 0, false
		}
	}
}

// grow makes room for at least need more bytes after buf[r:w], moving
// them to the front.
func (fc *fastConn) grow(need int) {
	pending := fc.w - fc.r
	size := len(fc.buf)
	for size-pending < need {
		size *= 2
	}
	if size != len(fc.buf) {
		nb := make([]byte, size)
		copy(nb, fc.buf[fc.r:fc.w])
		fc.buf = nb
	} else {
		copy(fc.buf, fc.buf[fc.r:fc.w])
	}
	fc.r, fc.w = 0, pending
}

func (fc *fastConn) releaseBuf() {
	if fc.w > fc.r {
		return // pipelined bytes to keep
	}
	fc.buf, fc.r, fc.w = nil, 0, 0
}

// handoff gives the connection to net/http's server, replaying what was
// read.
func (fc *fastConn) handoff() {
	s := fc.s
	pending := append([]byte(nil), fc.buf[fc.r:fc.w]...)
	fc.buf, fc.r, fc.w = nil, 0, 0
	_ = fc.conn.SetReadDeadline(time.Time{})
	s.rec.Connections(s.name, -1) // net/http counts it again
	s.conns.push(s.serverConn(fc.conn, pending))
}

// bstr is b as a string without a copy, for lookups that do not keep it.
func bstr(b []byte) string {
	if len(b) == 0 {
		return ""
	}
	return unsafe.String(&b[0], len(b))
}

// exchange serves the request whose head is parsed: keep says the
// connection may carry another request; fallback that the request is for
// net/http's server (nothing was consumed).
func (fc *fastConn) exchange() (keep, fallback bool) {
	s := fc.s
	fc.answered = false
	h := &fc.head
	tr := s.tracer.Load()
	t := s.table.Load()
	hc := s.chain.Load()
	method := bstr(h.method)
	rt := t.routeFor(bstr(h.host), bstr(h.path), method, h)
	var c *cluster.Cluster
	if rt != nil {
		if rt.IdleTimeout > 0 || rt.MaxStreamDuration > 0 {
			return false, true
		}
		if c = s.clusters.Get(rt.Cluster); c != nil && !c.HTTP1() {
			return false, true
		}
	}
	// The body, replayable, whole in buf before anything goes upstream.
	if h.contentLength > 0 {
		limit := int64(config.DefaultBodyBufferBytes)
		if rt != nil {
			limit = int64(rt.BodyBufferBytes)
		}
		if h.contentLength > limit || int64(h.size)+h.contentLength > fastMaxBuf {
			return false, true
		}
		if !fc.readBody(h.size + int(h.contentLength)) {
			return false, false
		}
	}
	msg := fc.buf[fc.r : fc.r+h.size+int(h.contentLength)]
	body := msg[h.size:]

	x := &fc.ex
	*x = exchange{s: s, start: time.Now()}
	if rt != nil {
		x.cluster, x.route = rt.Cluster, rt.Name
	}
	keep = !h.closeConn
	if tr != nil {
		x.tr = tr
		fc.traceCtx, x.span = tr.StartHead(context.Background(), reqCarrier{h}, methodName(h.method),
			tracing.Request{Cluster: x.cluster, Route: x.route, PeerID: fc.peer.SPIFFEID}, fc.describe)
	}
	fc.x, fc.heldRequest = x, nil
	defer func() {
		fc.r += len(msg)
		fc.settle()
	}()

	// Authorization (RBAC filter), then x-forwarded-client-cert.
	if hc.RBAC != nil {
		ok, rule := hc.RBAC.Decide(&config.RBACRequest{
			Principal: fc.peer.SPIFFEID, Method: method, Path: bstr(h.path), Authority: bstr(h.host), Header: h,
		})
		if !ok {
			s.rec.AuthzDenied(s.name, rule)
			s.log.Info("authz: request denied", "listener", s.name, "peer", fc.peer.SPIFFEID, "method", string(h.method), "path", string(h.path), "rule", rule)
			x.cluster, x.route = "", ""
			return fc.fail(x, t, http.StatusForbidden, ReasonAuthzDenied, rule) && keep, false
		}
	}
	if rt == nil {
		return fc.fail(x, t, http.StatusNotFound, ReasonNoRoute, "") && keep, false
	}
	if c == nil {
		return fc.fail(x, t, http.StatusServiceUnavailable, ReasonNoCluster, "") && keep, false
	}
	if !c.AcquireRequest() {
		return fc.fail(x, t, http.StatusServiceUnavailable, ReasonOverflow, "") && keep, false
	}
	fc.heldRequest = c
	c.Budget().Deposit()

	// The upstream request: the head without hop-by-hop fields, plus
	// X-Forwarded-Proto, TE: trailers, x-forwarded-client-cert, Via; then
	// the body.
	op := outPool.Get().(*[]byte)
	defer outPool.Put(op)
	out := (*op)[:0]
	out = append(out, h.method...)
	out = append(out, ' ')
	out = append(out, h.target...)
	out = append(out, " HTTP/1.1\r\n"...)
	var traceFields []string
	if tr != nil {
		traceFields = tr.Fields() // injected anew below
	}
	for i := range h.fields {
		if f := &h.fields[i]; !f.drop && !isField(f.name, traceFields) {
			out = append(out, f.name...)
			out = append(out, ": "...)
			out = append(out, f.value...)
			out = append(out, "\r\n"...)
		}
	}
	if !h.xfp {
		if s.secure {
			out = append(out, "X-Forwarded-Proto: https\r\n"...)
		} else {
			out = append(out, "X-Forwarded-Proto: http\r\n"...)
		}
	}
	if h.teTrailers {
		out = append(out, "Te: trailers\r\n"...)
	}
	if v := fc.xfccValue(hc); len(v) > 0 {
		out = append(out, "X-Forwarded-Client-Cert: "...)
		out = append(out, v...)
		out = append(out, "\r\n"...)
	}
	if t.via != "" {
		out = append(out, "Via: 1.1 "...)
		out = append(out, t.via...)
		out = append(out, "\r\n"...)
	}
	*op = out
	prefix := len(out) // the rest (trace context, blank line, body) is per attempt

	fc.since.Store(x.start.UnixNano())
	fc.state.Store(fcBusy)
	defer func() {
		if !fc.endBusy() {
			keep = false
		}
	}()
	return fc.forward(x, t, rt, c, op, prefix, body) && keep, false
}

// requestTail completes the upstream request in *op after its first prefix
// bytes: the trace context of ctx (when traced), the blank line, the body.
func (fc *fastConn) requestTail(op *[]byte, prefix int, ctx context.Context, body []byte) []byte {
	*op = (*op)[:prefix]
	if x := fc.x; x.tr != nil {
		x.tr.InjectInto(ctx, outCarrier{op})
	}
	out := append(*op, "\r\n"...)
	out = append(out, body...)
	*op = out
	return out
}

// describe gives the request's head to its span when it is sampled.
func (fc *fastConn) describe() tracing.Head {
	h := &fc.head
	hd := tracing.Head{Method: methodName(h.method), Path: string(h.path), Host: string(h.host), Proto: "1.1",
		RemoteAddr: fc.conn.RemoteAddr().String()}
	hd.UserAgent, _ = h.lookup("User-Agent")
	hd.ContentType, _ = h.lookup("Content-Type")
	return hd
}

// methodName returns the method as a string, without allocating for the
// common ones.
func methodName(m []byte) string {
	switch string(m) {
	case http.MethodGet:
		return http.MethodGet
	case http.MethodPost:
		return http.MethodPost
	case http.MethodPut:
		return http.MethodPut
	case http.MethodDelete:
		return http.MethodDelete
	case http.MethodHead:
		return http.MethodHead
	case http.MethodPatch:
		return http.MethodPatch
	case http.MethodOptions:
		return http.MethodOptions
	}
	return string(m)
}

// isField reports whether name is one of names (lower case), ignoring case.
func isField(name []byte, names []string) bool {
	for _, n := range names {
		if eqLower(name, n) {
			return true
		}
	}
	return false
}

// reqCarrier reads a parsed request head's fields for trace propagation.
type reqCarrier struct{ h *reqHead }

func (c reqCarrier) Get(key string) string {
	v, _ := c.h.lookup(key)
	return v
}

func (c reqCarrier) Set(string, string) {}

func (c reqCarrier) Keys() []string {
	keys := make([]string, 0, len(c.h.fields))
	for i := range c.h.fields {
		keys = append(keys, string(c.h.fields[i].name))
	}
	return keys
}

// outCarrier appends the fields a propagator sets to a request head.
type outCarrier struct{ b *[]byte }

func (c outCarrier) Get(string) string { return "" }

func (c outCarrier) Set(key, value string) {
	b := append(*c.b, key...)
	b = append(b, ": "...)
	b = append(b, value...)
	*c.b = append(b, "\r\n"...)
}

func (c outCarrier) Keys() []string { return nil }

// settle records the exchange and releases its request slot, once.
func (fc *fastConn) settle() {
	if fc.x == nil {
		return // settled already
	}
	if fc.heldRequest != nil {
		fc.heldRequest.ReleaseRequest()
		fc.heldRequest = nil
	}
	fc.x.finish()
	fc.x, fc.traceCtx = nil, nil
}

// readBody reads until buf[r:r+n] is all there.
func (fc *fastConn) readBody(n int) bool {
	if fc.w-fc.r >= n {
		return true
	}
	if len(fc.buf)-fc.r < n {
		fc.grow(n - (fc.w - fc.r))
	}
	for fc.w-fc.r < n {
		m, err := fc.rw.Read(fc.buf[fc.w:])
		fc.w += m
		if err != nil && fc.w-fc.r < n {
			return false
		}
	}
	return true
}

// xfccValue returns the x-forwarded-client-cert value for chain hc (Envoy
// SANITIZE_SET: By, Hash, URI of the peer), nil when none is set.
func (fc *fastConn) xfccValue(hc *config.HTTPConnectionManager) []byte {
	if hc.ForwardClientCert != config.XFCCSanitizeSet || fc.peer.SPIFFEID == "" {
		return nil
	}
	if fc.xfccFor != hc {
		v := "Hash=" + fc.peer.Hash
		if fc.s.localID != nil {
			if by := fc.s.localID(); by != "" {
				v = "By=" + by + ";" + v
			}
		}
		if hc.SetCurrentURI {
			v += ";URI=" + fc.peer.SPIFFEID
		}
		fc.xfcc, fc.xfccFor = []byte(v), hc
	}
	return fc.xfcc
}

// fail answers a request the sidecar fails itself, with its typed reason
// (and the denying rule for authz_denied); false when the write failed.
func (fc *fastConn) fail(x *exchange, t *routeTable, status int, reason, rule string) bool {
	x.code, x.reason = status, reason
	op := outPool.Get().(*[]byte)
	defer outPool.Put(op)
	out := appendStatusLine((*op)[:0], status)
	if reason != "" {
		out = append(out, "X-Meshlet-Reason: "...)
		out = append(out, reason...)
		out = append(out, "\r\n"...)
	}
	if rule != "" {
		out = append(out, "X-Meshlet-Authz-Rule: "...)
		out = append(out, rule...)
		out = append(out, "\r\n"...)
	}
	out = append(out, "Content-Type: text/plain; charset=utf-8\r\nDate: "...)
	out = time.Now().UTC().AppendFormat(out, http.TimeFormat)
	out = append(out, "\r\n"...)
	if t.via != "" {
		out = append(out, "Via: 1.1 "...)
		out = append(out, t.via...)
		out = append(out, "\r\n"...)
	}
	out = append(out, "Content-Length: "...)
	out = strconv.AppendInt(out, int64(len(reason)+1), 10)
	out = append(out, "\r\n"...)
	if fc.head.closeConn || fc.s.fast.draining.Load() {
		out = append(out, "Connection: close\r\n"...)
	}
	out = append(out, "\r\n"...)
	if string(fc.head.method) != "HEAD" {
		out = append(out, reason...)
		out = append(out, '\n')
	}
	*op = out
	fc.settle()
	_, err := fc.rw.Write(out)
	fc.answered = err == nil
	return err == nil
}

func appendStatusLine(b []byte, code int) []byte {
	b = append(b, "HTTP/1.1 "...)
	b = strconv.AppendInt(b, int64(code), 10)
	b = append(b, ' ')
	return append(append(b, http.StatusText(code)...), "\r\n"...)
}

// forward sends req (head and body) on attempts until one gives the
// response to relay, or the request fails; it reports whether the
// downstream connection may carry another request.
func (fc *fastConn) forward(x *exchange, t *routeTable, rt *config.Route, c *cluster.Cluster, op *[]byte, prefix int, body []byte) bool {
	h := &fc.head
	hasBody := len(body) > 0
	spawn := x.tr != nil && x.tr.SpawnAttempts() && x.span.IsRecording()
	req := fc.requestTail(op, prefix, fc.traceCtx, body)
	p := rt.Retry
	var hashKey uint64
	var hasKey bool
	if name := rt.HashHeader; name != "" {
		if v, ok := h.lookup(name); ok {
			hashKey, hasKey = cluster.HashKey(v), true
		}
	}
	idempotent := h.idempotencyKey
	switch string(h.method) {
	case http.MethodGet, http.MethodHead, http.MethodOptions, http.MethodTrace, http.MethodPut, http.MethodDelete:
		idempotent = true
	}
	var routeDeadline time.Time
	ctx := context.Background()
	if rt.Timeout > 0 {
		routeDeadline = x.start.Add(rt.Timeout)
		var cancel context.CancelFunc
		ctx, cancel = context.WithDeadline(ctx, routeDeadline)
		defer cancel()
	}
	var triedBuf [4]*cluster.Endpoint
	tried := triedBuf[:0]
	retries := 0
	budgetDenied := false
	var last *failure
	for {
		var avoid []*cluster.Endpoint
		if p != nil && p.OtherHost {
			avoid = tried
		}
		att, picked := c.Pick(hashKey, hasKey, avoid)
		if picked != cluster.Picked {
			fl := last
			if fl == nil {
				fl = &failure{http.StatusServiceUnavailable, ReasonNoHealthyUpstream}
				if picked == cluster.CircuitOpen {
					fl.reason = ReasonCircuitOpen
				}
			}
			return fc.failWith(x, t, fl)
		}
		ep := att.Endpoint()
		tried = append(tried, ep)
		var perTry time.Duration
		if p != nil {
			perTry = p.PerTry
		}
		var aspan trace.Span
		if spawn {
			// Each attempt its own span, whose context the request carries.
			var actx context.Context
			actx, aspan = x.tr.StartAttempt(fc.traceCtx, retries+1, ep.Address, c.PeerID())
			req = fc.requestTail(op, prefix, actx, body)
		}
		uc, err := fc.attempt(ctx, ep, req, perTry, routeDeadline, !hasBody && idempotent)
		var cond string
		sent := true
		if err == nil {
			rh := &fc.resp
			cond = statusCondition(rh.code, bstr(rh.grpcStatus), p)
			if notReached(rh.code, bstr(rh.reason)) {
				cond, sent = "connect-failure", false
			}
			if cond == "" || !fc.mayRetry(rt, c, cond, sent, retries, idempotent, &budgetDenied) {
				x.attempt = aspan // ended with the response
				return fc.relay(x, t, rt, att, uc, routeDeadline, perTry, budgetDenied)
			}
			code := rh.code
			reason := string(rh.reason)
			uc.Release(false)
			fc.setUp(nil)
			att.End(cluster.OutcomeForStatus(code))
			last = &failure{code, ""}
			fc.s.rec.Retry(c.Name(), cond)
			x.endAttempt(aspan, code, reason, cond, retries+1)
		} else {
			if fc.isCancelled() {
				att.End(cluster.OutcomeCancelled)
				x.endAttempt(aspan, 0, "", "", 0)
				return false
			}
			att.End(cluster.OutcomeLocalFailure)
			var ue *cluster.UpstreamError
			if !errors.As(err, &ue) {
				ue = &cluster.UpstreamError{Kind: cluster.KindReset, Sent: true, Err: err}
			}
			timedOut := !routeDeadline.IsZero() && !time.Now().Before(routeDeadline)
			fl, cond := failureFor(ue, timedOut)
			fc.s.log.Debug("httpproxy: attempt failed", "listener", fc.s.name, "cluster", c.Name(), "endpoint", ep.Address,
				"attempt", retries+1, "reason", fl.reason, "error", err)
			if timedOut || !fc.mayRetry(rt, c, cond, ue.Sent, retries, idempotent, &budgetDenied) {
				if budgetDenied && fl.reason != ReasonOverflow {
					fl.reason = ReasonRetryBudgetExhausted
				}
				x.endAttempt(aspan, 0, fl.reason, "", 0)
				return fc.failWith(x, t, fl)
			}
			last = fl
			fc.s.rec.Retry(c.Name(), cond)
			x.endAttempt(aspan, 0, fl.reason, cond, retries+1)
		}
		retries++
		if !c.AcquireRetry() {
			fc.s.rec.RetryDenied(c.Name(), "max_retries")
			return fc.failWith(x, t, &failure{http.StatusServiceUnavailable, ReasonOverflow})
		}
		ok := sleepBackoff(ctx, p, retries)
		c.ReleaseRetry()
		if fc.isCancelled() {
			return false
		}
		if !ok {
			return fc.failWith(x, t, &failure{http.StatusGatewayTimeout, ReasonUpstreamTimeout})
		}
	}
}

// failWith answers fl as the net/http path does (ServeHTTP: s.fail).
func (fc *fastConn) failWith(x *exchange, t *routeTable, fl *failure) bool {
	return fc.fail(x, t, fl.status, fl.reason, "") && !fc.head.closeConn
}

// mayRetry is forward.mayRetry for the fast path (bodies are always
// buffered whole, so replayable).
func (fc *fastConn) mayRetry(rt *config.Route, c *cluster.Cluster, cond string, sent bool, retries int, idempotent bool, budgetDenied *bool) bool {
	return retryAllowed(retryAsk{p: rt.Retry, c: c, rec: fc.s.rec, cond: cond, sent: sent, retries: retries,
		idempotent: idempotent, replayable: true, gone: fc.isCancelled()}, budgetDenied)
}

// staleConn reports the errors of a pooled connection the upstream closed
// while it was idle, met by the request's write or its first read: EOF,
// reset, broken pipe.
func staleConn(err error) bool {
	return errors.Is(err, io.EOF) || errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE)
}

var errResponseHead = errors.New("httpproxy: malformed or oversized response head")

// attempt sends req on a connection to ep and reads the final response
// head into fc.resp. The per-try timeout and the route deadline bound it
// as a read deadline. A request that met a pooled connection the upstream
// had just closed goes again at once on another when resend is set (no
// body, idempotent), as net/http does.
func (fc *fastConn) attempt(ctx context.Context, ep *cluster.Endpoint, req []byte, perTry time.Duration, routeDeadline time.Time, resend bool) (cluster.H1Conn, error) {
	for try := 0; ; try++ {
		uc, reused, err := ep.GetH1(ctx, resend && try == 0)
		if err != nil {
			return uc, err
		}
		if !fc.setUp(uc.Conn()) {
			uc.Release(false)
			return cluster.H1Conn{}, &cluster.UpstreamError{Kind: cluster.KindReset, Err: context.Canceled}
		}
		deadline := routeDeadline
		if perTry > 0 {
			if d := time.Now().Add(perTry); deadline.IsZero() || d.Before(deadline) {
				deadline = d
			}
		}
		if !deadline.IsZero() {
			_ = uc.SetDeadline(deadline)
		}
		fc.resp.size = 0
		_, err = uc.Write(req)
		if err == nil {
			err = readResponseHead(uc.Reader(), &fc.resp)
		} else if uc.Written() > 0 && (errors.Is(err, syscall.EPIPE) || errors.Is(err, syscall.ECONNRESET)) &&
			readResponseHead(uc.Reader(), &fc.resp) == nil {
			// The upstream closed while the body was being written, after
			// answering (a 413, a 401 before an upload; its kernel reset the
			// connection over the unread body): that answer, already in the
			// socket, is the response, not a reset, as net/http's transport
			// has it. The rest of the body goes nowhere, and the connection
			// cannot be reused.
			fc.resp.closeConn = true
			return uc, nil
		}
		if err == nil {
			return uc, nil
		}
		sent := uc.Written() > 0
		uc.Release(false)
		fc.setUp(nil)
		if reused && fc.resp.size == 0 && staleConn(err) {
			// The upstream closed an idle connection as the request went out
			// (keep-alive race): it did not process the request.
			if resend && try == 0 {
				continue
			}
			err = &cluster.UpstreamError{Kind: cluster.KindReset, Sent: sent, Err: err}
		}
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			return cluster.H1Conn{}, &cluster.UpstreamError{Kind: cluster.KindTimeout, Sent: sent, Err: err}
		}
		var ue *cluster.UpstreamError
		if !errors.As(err, &ue) {
			err = &cluster.UpstreamError{Kind: cluster.KindReset, Sent: sent, Err: err}
		}
		return cluster.H1Conn{}, err
	}
}

// readResponseHead reads the final response head from br into rh,
// skipping interim 1xx responses; rh's slices point into br's buffer until
// the next read. rh.size is 0 when nothing of a response arrived.
func readResponseHead(br *bufio.Reader, rh *respHead) error {
	rh.size = 0
	skipped := 0
	for {
		n := br.Buffered()
		if n == 0 {
			if _, err := br.Peek(1); err != nil {
				if skipped > 0 {
					rh.size = skipped
				}
				return err
			}
			continue
		}
		b, _ := br.Peek(n)
		switch rh.parseResponse(b) {
		case parseOK:
			if rh.code >= 100 && rh.code < 200 {
				if rh.code == http.StatusSwitchingProtocols {
					return errResponseHead // no upgrade was asked for
				}
				skipped += rh.size
				_, _ = br.Discard(rh.size)
				continue
			}
			return nil
		case parseFallback:
			// More fields than the in-place parser takes, or an irregular
			// head: net/http's reader decides, as on the other path.
			rh.size = 1
			return readResponseHeadStd(br, rh)
		}
		if n == br.Size() {
			rh.size = 1
			return readResponseHeadStd(br, rh) // a head larger than the buffer
		}
		if _, err := br.Peek(n + 1); err != nil {
			rh.size = 1 // part of a head arrived: not a stale connection
			return err
		}
	}
}

// readResponseHeadStd reads the final response head with net/http's
// reader (http.ReadResponse: lines of any length, up to its limits) for
// the heads the in-place parser does not take, and describes it in rh
// with fields of their own (rh.size 0: the head is consumed already), the
// framing fields written anew; br is left at the start of the body, which
// is relayed raw as for any other response.
func readResponseHeadStd(br *bufio.Reader, rh *respHead) error {
	for {
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			return fmt.Errorf("%w: %w", errResponseHead, err)
		}
		if resp.StatusCode == http.StatusSwitchingProtocols {
			return errResponseHead
		}
		if resp.StatusCode < 200 {
			continue
		}
		*rh = respHead{code: resp.StatusCode, minor: resp.ProtoMinor, contentLength: resp.ContentLength, closeConn: resp.Close,
			fields: rh.fields[:0]}
		rh.rest = fmt.Appendf(nil, "%03d %s", resp.StatusCode, strings.TrimPrefix(resp.Status, strconv.Itoa(resp.StatusCode)+" "))
		rh.chunked = len(resp.TransferEncoding) > 0 && resp.TransferEncoding[len(resp.TransferEncoding)-1] == "chunked"
		if len(resp.TransferEncoding) > 0 && !rh.chunked {
			rh.closeConn = true
		}
		h := resp.Header
		removeHopByHop(h, false)
		delete(h, "Content-Length")
		if rh.chunked {
			h["Transfer-Encoding"] = []string{"chunked"}
		} else if rh.contentLength >= 0 {
			h["Content-Length"] = []string{strconv.FormatInt(rh.contentLength, 10)}
		}
		if rh.chunked && len(resp.Trailer) > 0 {
			names := make([]string, 0, len(resp.Trailer))
			for k := range resp.Trailer {
				names = append(names, k)
			}
			h["Trailer"] = []string{strings.Join(names, ", ")}
		}
		rh.reason = []byte(h.Get(ReasonHeader))
		rh.grpcStatus = []byte(h.Get("Grpc-Status"))
		rh.eventStream = strings.HasPrefix(h.Get("Content-Type"), "text/event-stream")
		for k, vs := range h {
			for _, v := range vs {
				rh.fields = append(rh.fields, field{name: []byte(k), value: []byte(v)})
			}
		}
		return nil
	}
}

// relay writes the response whose head is in fc.resp to the downstream and
// copies its body; it reports whether the downstream connection may carry
// another request.
func (fc *fastConn) relay(x *exchange, t *routeTable, rt *config.Route, att *cluster.Attempt, uc cluster.H1Conn, routeDeadline time.Time, perTry time.Duration, budgetDenied bool) bool {
	rh := &fc.resp
	h := &fc.head
	x.code = rh.code
	if x.span != nil && len(rh.grpcStatus) > 0 {
		x.grpcStatus = string(rh.grpcStatus)
	}
	outcome := cluster.OutcomeForStatus(rh.code)
	bodyless := rh.bodyless(h.method)
	untilClose := !bodyless && rh.contentLength < 0 && !rh.chunked
	keep := !h.closeConn && !untilClose && !fc.s.fast.draining.Load()

	op := outPool.Get().(*[]byte)
	defer outPool.Put(op)
	out := append((*op)[:0], "HTTP/1.1 "...)
	out = append(out, rh.rest...)
	out = append(out, "\r\n"...)
	for i := range rh.fields {
		if f := &rh.fields[i]; !f.drop {
			out = append(out, f.name...)
			out = append(out, ": "...)
			out = append(out, f.value...)
			out = append(out, "\r\n"...)
		}
	}
	if t.via != "" {
		if rh.minor == 1 {
			out = append(out, "Via: 1.1 "...)
		} else {
			out = append(out, "Via: 1.0 "...)
		}
		out = append(out, t.via...)
		out = append(out, "\r\n"...)
	}
	if budgetDenied {
		out = append(out, "X-Meshlet-Reason: retry_budget_exhausted\r\n"...)
	}
	if !keep {
		out = append(out, "Connection: close\r\n"...)
	}
	out = append(out, "\r\n"...)
	br := uc.Reader()
	_, _ = br.Discard(rh.size)

	// The route timeout covers the body unless the response streams; the
	// per-try timeout ends at the headers.
	streaming := rh.contentLength < 0 || rh.eventStream
	switch {
	case !routeDeadline.IsZero() && !streaming:
		if perTry > 0 {
			_ = uc.SetDeadline(routeDeadline)
		}
	case !routeDeadline.IsZero() || perTry > 0:
		_ = uc.SetDeadline(time.Time{})
	}

	bc := bodyCopier{dst: fc.rw, br: br, out: out}
	var err error
	switch {
	case bodyless:
	case rh.chunked:
		err = bc.chunked()
	case rh.contentLength >= 0:
		err = bc.exactly(rh.contentLength)
	default:
		err = bc.untilEOF()
	}
	live := fc.setUp(nil) // false: the watcher poisoned the connection's deadline
	if err != nil {
		*op = bc.out[:0]
		switch {
		case fc.isCancelled():
			outcome = cluster.OutcomeCancelled
		case !errors.Is(err, errDownstreamWrite):
			outcome = cluster.OutcomeLocalFailure
			fc.s.log.Debug("httpproxy: response body aborted", "listener", fc.s.name, "cluster", x.cluster, "error", err)
		}
		x.aborted = true
		uc.Release(false)
		att.End(outcome)
		return false // the response is cut short: close the downstream
	}
	if !routeDeadline.IsZero() && !streaming {
		_ = uc.SetDeadline(time.Time{})
	}
	uc.Release(live && !rh.closeConn && !untilClose)
	att.End(outcome)
	// Accounting first, then the last bytes of the response.
	fc.settle()
	err = bc.flush()
	*op = bc.out[:0]
	fc.answered = err == nil
	return keep && err == nil
}

// bodyCopier relays a response body from br to dst through out, writing
// what it holds before any read that would block.
type bodyCopier struct {
	dst io.Writer
	br  *bufio.Reader
	out []byte
}

func (b *bodyCopier) flush() error {
	if len(b.out) == 0 {
		return nil
	}
	_, err := b.dst.Write(b.out)
	b.out = b.out[:0]
	if err != nil {
		return errDownstreamWrite
	}
	return nil
}

// fill makes br hold at least one byte, flushing out first.
func (b *bodyCopier) fill() error {
	if b.br.Buffered() > 0 {
		return nil
	}
	if err := b.flush(); err != nil {
		return err
	}
	_, err := b.br.Peek(1)
	return err
}

// take moves up to n buffered bytes of br to the output.
func (b *bodyCopier) take(n int64) (int, error) {
	if err := b.fill(); err != nil {
		return 0, err
	}
	avail := b.br.Buffered()
	if int64(avail) > n {
		avail = int(n)
	}
	p, _ := b.br.Peek(avail)
	if len(b.out)+len(p) > cap(b.out) {
		if err := b.flush(); err != nil {
			return 0, err
		}
		if len(p) > cap(b.out)/2 {
			// Straight from the reader's buffer.
			if _, err := b.dst.Write(p); err != nil {
				return 0, errDownstreamWrite
			}
			_, _ = b.br.Discard(len(p))
			return len(p), nil
		}
	}
	b.out = append(b.out, p...)
	_, _ = b.br.Discard(len(p))
	return len(p), nil
}

// exactly relays n bytes; the last of them may stay in out (the caller
// flushes).
func (b *bodyCopier) exactly(n int64) error {
	for n > 0 {
		m, err := b.take(n)
		if err != nil {
			if err == io.EOF {
				return io.ErrUnexpectedEOF
			}
			return err
		}
		n -= int64(m)
	}
	return nil
}

// untilEOF relays everything until the upstream closes.
func (b *bodyCopier) untilEOF() error {
	for {
		if _, err := b.take(1 << 30); err != nil {
			if err == io.EOF {
				return nil
			}
			return err
		}
	}
}

// line relays one line (through '\n') and returns it; the slice is valid
// until the next read.
func (b *bodyCopier) line() ([]byte, error) {
	for {
		if err := b.fill(); err != nil {
			if err == io.EOF {
				return nil, io.ErrUnexpectedEOF
			}
			return nil, err
		}
		p, _ := b.br.Peek(b.br.Buffered())
		for i, c := range p {
			if c == '\n' {
				line := p[:i+1]
				if len(b.out)+len(line) > cap(b.out) {
					if err := b.flush(); err != nil {
						return nil, err
					}
				}
				b.out = append(b.out, line...)
				start := len(b.out) - len(line)
				_, _ = b.br.Discard(len(line))
				return b.out[start:], nil
			}
		}
		if len(p) >= 4096 {
			return nil, errResponseHead // a chunk-size or trailer line that long is not HTTP
		}
		if err := b.flush(); err != nil {
			return nil, err
		}
		if _, err := b.br.Peek(len(p) + 1); err != nil {
			if err == io.EOF {
				return nil, io.ErrUnexpectedEOF
			}
			return nil, err
		}
	}
}

var errChunk = errors.New("httpproxy: malformed chunked response body")

// chunked relays a chunked body (RFC 9112 §7.1) as it is: each chunk,
// the last chunk and the trailer section.
func (b *bodyCopier) chunked() error {
	for {
		line, err := b.line()
		if err != nil {
			return err
		}
		size, ok := chunkSize(line)
		if !ok {
			return errChunk
		}
		if size == 0 {
			break
		}
		if err := b.exactly(size); err != nil {
			return err
		}
		crlf, err := b.line()
		if err != nil {
			return err
		}
		if len(crlf) != 2 || crlf[0] != '\r' {
			return errChunk
		}
	}
	// Trailer fields, up to the blank line.
	for {
		line, err := b.line()
		if err != nil {
			return err
		}
		if len(line) <= 2 && (len(line) == 1 || line[0] == '\r') {
			return nil
		}
	}
}

// chunkSize parses a chunk-size line ("1a;ext=v\r\n").
func chunkSize(line []byte) (int64, bool) {
	var n int64
	digits := 0
	for _, c := range line {
		var d byte
		switch {
		case '0' <= c && c <= '9':
			d = c - '0'
		case 'a' <= c && c <= 'f':
			d = c - 'a' + 10
		case 'A' <= c && c <= 'F':
			d = c - 'A' + 10
		default:
			if digits == 0 || (c != ';' && c != '\r' && c != ' ' && c != '\t') {
				return 0, false
			}
			return n, true
		}
		if digits == 15 {
			return 0, false
		}
		n = n<<4 | int64(d)
		digits++
	}
	return 0, false
}

// setUp records the upstream connection of the attempt in flight (nil
// after), for the watcher to cancel; false when the downstream already
// left.
func (fc *fastConn) setUp(c net.Conn) bool {
	fc.mu.Lock()
	defer fc.mu.Unlock()
	fc.up = c
	return !fc.cancelled
}

func (fc *fastConn) isCancelled() bool {
	fc.mu.Lock()
	defer fc.mu.Unlock()
	return fc.cancelled
}

// watch reads the downstream while an exchange is in flight: an error
// (EOF, reset) means the client left, which cancels the upstream attempt;
// a byte (a pipelined request) ends the watch. endBusy stops it.
func (fc *fastConn) watch() {
	defer fc.watchWG.Done()
	for {
		n, err := fc.conn.Read(fc.watchByte[:])
		if n > 0 {
			fc.watchN = n
			return
		}
		if err == nil {
			continue
		}
		if fc.watchAbort.Load() {
			return // endBusy stopped the watch
		}
		if errors.Is(err, os.ErrDeadlineExceeded) {
			// The idle deadline of a long exchange: push it on.
			_ = fc.conn.SetReadDeadline(time.Now().Add(DownstreamIdleTimeout))
			continue
		}
		fc.watchErr = err
		fc.cancel()
		return
	}
}

// cancel marks the exchange in flight cancelled (the downstream left, or
// the server stops) and unblocks its upstream reads and writes.
func (fc *fastConn) cancel() {
	fc.mu.Lock()
	defer fc.mu.Unlock()
	fc.cancelled = true
	if fc.up != nil {
		_ = fc.up.SetDeadline(aLongTimeAgo)
	}
}

var aLongTimeAgo = time.Unix(1, 0)

// endBusy ends the exchange's busy state, stopping its watcher if one was
// started; false when the downstream left.
func (fc *fastConn) endBusy() bool {
	if fc.state.CompareAndSwap(fcBusy, fcReading) {
		return true
	}
	// Watched: stop the watcher and take what it read.
	fc.watchAbort.Store(true)
	_ = fc.conn.SetReadDeadline(aLongTimeAgo)
	fc.watchWG.Wait()
	fc.watchAbort.Store(false)
	now := time.Now()
	fc.idleSet = now.UnixNano()
	_ = fc.conn.SetReadDeadline(now.Add(DownstreamIdleTimeout))
	fc.state.Store(fcReading)
	gone := fc.watchErr != nil || fc.cancelled
	if fc.watchN > 0 {
		if fc.w == len(fc.buf) {
			fc.grow(1)
		}
		fc.buf[fc.w] = fc.watchByte[0]
		fc.w++
		fc.watchN = 0
	}
	fc.watchErr = nil
	fc.mu.Lock()
	fc.cancelled = false
	fc.mu.Unlock()
	return !gone
}
