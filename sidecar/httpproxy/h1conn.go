package httpproxy

import (
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"github.com/meshlet/meshlet/sidecar/cluster"
	"github.com/meshlet/meshlet/sidecar/config"
	"github.com/meshlet/meshlet/sidecar/rawsock"
	"github.com/meshlet/meshlet/sidecar/tlsid"
	"github.com/meshlet/meshlet/xds"
)

// The fast path's connection loop: one goroutine per downstream
// HTTP/1.1 connection reads request heads (readHead), serves each
// exchange (h1fast.go), and is watched while an exchange is in flight
// for a client that leaves (monitor, watch).

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
	// headSince is when a request head was first seen incomplete
	// (UnixNano; 0 when none is): the read deadline is then the chain's
	// RequestHeadersTimeout from there, which bytes trickling in do not
	// move (slowloris).
	headSince int64

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

	// The request in flight, as the wire (roundTrip) sends it: *op holds
	// the head up to prefix, then the attempt's tail (requestTail); req is
	// the whole request, body its body; resend says a stale pooled
	// connection may be retried at once; routeDeadline is the route
	// timeout's (zero: none); uc is the connection of the response head
	// in resp.
	op            *[]byte
	prefix        int
	req, body     []byte
	resend        bool
	routeDeadline time.Time
	uc            cluster.H1Conn

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
			if bothFramings(fc.buf[fc.r:fc.w]) {
				// Content-Length and Transfer-Encoding both: refused, as
				// Envoy does by default (RFC 9112 §6.1 calls it a likely
				// smuggling attempt; net/http would read the chunks and keep
				// the connection).
				_, _ = io.WriteString(fc.rw, badFramingAnswer)
				lingering = true
				return
			}
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
		if !keep || s.closing() {
			// A client that did not say Connection: close may send its next
			// request at any moment, arriving after a plain close would
			// have made its kernel discard the answer (RST): linger, as
			// Envoy's delayed close does for every close it initiates.
			lingering = fc.answered && (fc.inputLeft() || !fc.head.closeConn)
			return
		}
	}
}

// badFramingAnswer is the fast path's answer to a request head with both
// Content-Length and Transfer-Encoding; the connection closes after it.
var badFramingAnswer = "HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\n" + xds.ReasonHeader + ": " +
	string(xds.ReasonDownstreamProtocolError) + "\r\nConnection: close\r\nContent-Length: 59\r\n\r\n" +
	"both Content-Length and Transfer-Encoding: request refused\n"

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
			hc := fc.s.chain.Load()
			if res == parseOK && len(fc.head.fields) > hc.HeadersCountLimit() {
				res = parseFallback // net/http answers 431 (forward.go)
			}
			if res != parseNeedMore || fc.w-fc.r >= min(fastMaxHead, hc.HeadersBytesLimit()) {
				if fc.headSince != 0 {
					// The head is in: the idle deadline again.
					now := time.Now()
					fc.headSince, fc.idleSet = 0, now.UnixNano()
					_ = fc.conn.SetReadDeadline(now.Add(DownstreamIdleTimeout))
				}
				if res == parseNeedMore {
					return parseFallback, true // too large: net/http answers 431 (its MaxHeaderBytes)
				}
				return res, true
			}
			if fc.headSince == 0 && hc.RequestHeadersTimeout > 0 {
				now := time.Now()
				fc.headSince = now.UnixNano()
				_ = fc.conn.SetReadDeadline(now.Add(hc.RequestHeadersTimeout))
			}
		} else {
			fc.r, fc.w = 0, 0
			if fc.state.Load() == fcClosed {
				return 0, false
			}
			fc.state.Store(fcIdle)
			// Shutting down, an idle connection ends; shedding ends one
			// after its response (serve), not a new one waiting for its
			// first request.
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
		if fc.headSince == 0 && fc.s.fast.now.Load()-fc.idleSet > int64(time.Minute) {
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

// bstr is b as a string without a copy, for lookups that do not keep it.
func bstr(b []byte) string {
	if len(b) == 0 {
		return ""
	}
	return unsafe.String(&b[0], len(b))
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
