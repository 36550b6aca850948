package cluster

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/meshlet/meshlet/sidecar/rawsock"
)

// Pool defaults.
const (
	// DefaultIdleConnTimeout closes pooled connections idle this long.
	DefaultIdleConnTimeout = 60 * time.Second
	// maxIdlePerEndpoint bounds idle keep-alive connections per endpoint.
	maxIdlePerEndpoint = 256
)

// h1Pool is an endpoint's HTTP/1.1 keep-alive connection pool. Connections
// count against the cluster's max_connections; a request that finds no idle
// connection and no free slot waits as pending (max_pending_requests) for
// one to come back or close.
type h1Pool struct {
	e *Endpoint

	mu   sync.Mutex // guards idle
	idle []*h1Conn  // LIFO: the most recently used first out
}

type h1Conn struct {
	conn    net.Conn // counts bytes written
	br      *bufio.Reader
	bw      *bufio.Writer
	pool    *h1Pool
	written atomic.Int64 // bytes handed to the socket for the current request
	idleAt  time.Time
	once    sync.Once
}

// Write counts bytes reaching the socket.
func (c *h1Conn) Write(p []byte) (int, error) {
	n, err := c.conn.Write(p)
	c.written.Add(int64(n))
	return n, err
}

func (c *h1Conn) close() {
	c.once.Do(func() {
		c.conn.Close()
		c.pool.e.cluster.releaseConn()
	})
}

// get returns an idle connection (reused=true) or a new one. An idle
// connection is checked alive (a peek at its socket) unless trustIdle is
// set: the caller then detects a connection the upstream closed while idle
// from the EOF or reset of its first read, and sends the request again.
func (p *h1Pool) get(ctx context.Context, trustIdle bool) (*h1Conn, bool, error) {
	c := p.e.cluster
	pending := false
	defer func() {
		if pending {
			c.pending.Add(-1)
		}
	}()
	for {
		if conn := p.popIdle(trustIdle); conn != nil {
			return conn, true, nil
		}
		if c.acquireConn() {
			raw, err := c.dialer.DialContext(ctx, "tcp", p.e.Address)
			if err != nil {
				c.releaseConn()
				return nil, false, &UpstreamError{Kind: KindConnectFailure, Err: err}
			}
			// Requests and responses go through raw system calls (see
			// rawsock), TLS records included.
			conn, err := p.e.secure(ctx, rawsock.Wrap(raw))
			if err != nil {
				c.releaseConn()
				return nil, false, err
			}
			hc := &h1Conn{conn: conn, pool: p}
			hc.br = bufio.NewReaderSize(conn, 16<<10)
			// bw is made on first use: the HTTP/1.1 fast path writes
			// requests straight to the connection (H1Conn.Write).
			return hc, false, nil
		}
		if c.evictIdle(p) {
			continue // a slot was freed
		}
		wait := c.waitChan() // taken before re-checking, so no wake-up is missed
		if !pending {
			if c.pending.Add(1) > int64(c.cfg.Thresholds.MaxPendingRequests) {
				c.pending.Add(-1)
				c.events.Overflow(c.cfg.Name, "max_pending_requests")
				return nil, false, &UpstreamError{Kind: KindOverflow, Err: errMaxPending}
			}
			pending = true
			continue
		}
		select {
		case <-wait:
		case <-ctx.Done():
			return nil, false, &UpstreamError{Kind: KindTimeout, Err: ctx.Err()}
		}
	}
}

func (p *h1Pool) popIdle(trustIdle bool) *h1Conn {
	now := time.Now()
	for {
		p.mu.Lock()
		n := len(p.idle)
		if n == 0 {
			p.mu.Unlock()
			return nil
		}
		conn := p.idle[n-1]
		p.idle[n-1] = nil
		p.idle = p.idle[:n-1]
		p.mu.Unlock()
		if now.Sub(conn.idleAt) < DefaultIdleConnTimeout && (trustIdle || conn.alive()) {
			return conn
		}
		conn.close()
	}
}

// alive reports whether an idle connection can carry a request: its socket
// has nothing to read. An upstream that closed it while idle (keep-alive
// timeout, restart) left an EOF or a TLS close_notify there; a request
// sent on it would be lost as a reset, which a POST could not retry.
func (c *h1Conn) alive() bool {
	raw := c.conn
	if tc, ok := raw.(*tls.Conn); ok {
		raw = tc.NetConn()
	}
	tcp, ok := raw.(syscall.Conn) // a *net.TCPConn or a *rawsock.Conn
	if !ok {
		return true
	}
	rc, err := tcp.SyscallConn()
	if err != nil {
		return true
	}
	readable := false
	_ = rc.Read(func(fd uintptr) bool {
		var b [1]byte
		for {
			_, _, err := syscall.Recvfrom(int(fd), b[:], syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
			if err == syscall.EINTR {
				continue
			}
			readable = err != syscall.EAGAIN
			return true
		}
	})
	return !readable && c.br.Buffered() == 0
}

func (p *h1Pool) put(conn *h1Conn) {
	if p.e.retired.Load() {
		conn.close()
		return
	}
	conn.idleAt = time.Now()
	p.mu.Lock()
	if len(p.idle) >= maxIdlePerEndpoint {
		p.mu.Unlock()
		conn.close()
		return
	}
	p.idle = append(p.idle, conn)
	p.mu.Unlock()
	p.e.cluster.wake()
}

// evictOne closes one idle connection, freeing a cluster slot.
func (p *h1Pool) evictOne() bool {
	p.mu.Lock()
	n := len(p.idle)
	if n == 0 {
		p.mu.Unlock()
		return false
	}
	conn := p.idle[0] // the oldest
	copy(p.idle, p.idle[1:])
	p.idle[n-1] = nil
	p.idle = p.idle[:n-1]
	p.mu.Unlock()
	conn.close()
	return true
}

func (p *h1Pool) closeIdle() {
	p.mu.Lock()
	idle := p.idle
	p.idle = nil
	p.mu.Unlock()
	for _, c := range idle {
		c.close()
	}
}

var aLongTimeAgo = time.Unix(1, 0)

// roundTrip writes req on a pooled connection and reads the response
// head. The response body returns the connection to the pool at EOF, or
// closes it when closed early.
func (p *h1Pool) roundTrip(ctx context.Context, req *http.Request, headerTimeout time.Duration) (*http.Response, error) {
	resp, err := p.roundTripOnce(ctx, req, headerTimeout)
	var ue *UpstreamError
	if errors.As(err, &ue) && errors.Is(ue.Err, errStaleConn) && req.Body == nil && isIdempotent(req) {
		// As net/http does: a request without body that met a keep-alive
		// race goes again at once on another connection.
		return p.roundTripOnce(ctx, req, headerTimeout)
	}
	return resp, err
}

// isIdempotent reports RFC 9110 §9.2.2 idempotent methods, or a request
// carrying an Idempotency-Key header.
func isIdempotent(req *http.Request) bool {
	switch req.Method {
	case http.MethodGet, http.MethodHead, http.MethodOptions, http.MethodTrace, http.MethodPut, http.MethodDelete:
		return true
	}
	return req.Header.Get("Idempotency-Key") != ""
}

func (p *h1Pool) roundTripOnce(ctx context.Context, req *http.Request, headerTimeout time.Duration) (*http.Response, error) {
	conn, reused, err := p.get(ctx, false)
	if err != nil {
		return nil, err
	}
	// Cancelling ctx unblocks any read or write on the connection.
	stop := context.AfterFunc(ctx, func() { conn.conn.SetDeadline(aLongTimeAgo) })
	fail := func(err error) (*http.Response, error) {
		stop()
		conn.close()
		kind := KindReset
		var ne net.Error
		if ctx.Err() != nil || (headerTimeout > 0 && errors.As(err, &ne) && ne.Timeout()) {
			kind = KindTimeout
		}
		return nil, &UpstreamError{Kind: kind, Sent: conn.written.Load() > 0, Err: err}
	}
	conn.written.Store(0)
	if headerTimeout > 0 {
		conn.conn.SetDeadline(time.Now().Add(headerTimeout))
	}
	if req.Header["User-Agent"] == nil {
		req.Header["User-Agent"] = emptyValue // keep net/http from adding its own
	}
	if conn.bw == nil {
		conn.bw = bufio.NewWriterSize(conn, 16<<10)
	}
	// A request with a body is written while the response is read (full
	// duplex), so an upstream that answers early (413, 401, a streaming
	// echo) is heard instead of blocking the writer or dying as a reset.
	var writeDone chan error
	if req.Body != nil && req.Body != http.NoBody {
		writeDone = make(chan error, 1)
		body := &bodyReadErr{ReadCloser: req.Body}
		req.Body = body
		go func() {
			err := req.Write(conn.bw)
			if err == nil {
				err = conn.bw.Flush()
			}
			if body.err != nil {
				// The downstream's body failed (malformed, or its client
				// left): the upstream will not get the rest, so it will not
				// answer; abort the exchange now rather than at the route
				// timeout. The caller tells the cause (Downstream).
				_ = conn.conn.Close()
			}
			writeDone <- err
		}()
	} else {
		err := req.Write(conn.bw) // a head larger than bw reaches the socket
		if err == nil {
			err = conn.bw.Flush()
		}
		if err != nil {
			if reused && staleErr(err) {
				err = errStaleConn // the keep-alive race, met by the write
			}
			return fail(err)
		}
	}
	var resp *http.Response
	if reused {
		// The first byte of the response: on a connection the upstream
		// closed while idle there is none, only its FIN or, as the request
		// reached the closed socket, its reset (the fast path's wire and
		// net/http's Transport treat both alike).
		if _, err = conn.br.Peek(1); err != nil && staleErr(err) {
			err = errStaleConn
		}
	}
	if err == nil {
		resp, err = readFinalResponse(conn.br, req)
	}
	if err == nil && headerTimeout > 0 {
		conn.conn.SetDeadline(time.Time{}) // the per-try timeout ends at the headers
	}
	if err != nil {
		if writeDone != nil {
			// The writer may be the one that failed (the upstream stopped
			// reading): wait for it once the connection is closed.
			defer func() { <-writeDone }()
		}
		// errStaleConn: the upstream closed an idle connection as the
		// request went out (keep-alive race); it did not process it.
		return fail(err)
	}
	if resp.StatusCode == http.StatusSwitchingProtocols {
		// The connection now carries the upgraded protocol (WebSocket...):
		// it leaves the pool for good, as the response body.
		if writeDone != nil {
			if err := <-writeDone; err != nil {
				return fail(err)
			}
		}
		conn.conn.SetDeadline(time.Time{})
		conn.bw = nil // flushed; writes now go straight to the socket
		resp.Body = &upgradedConn{conn: conn, br: conn.br, stop: stop}
		return resp, nil
	}
	resp.Body = &h1Body{rc: resp.Body, conn: conn, stop: stop, reuse: !resp.Close && !req.Close, writeDone: writeDone}
	return resp, nil
}

// readFinalResponse reads the response to req, skipping interim 1xx
// responses (100 Continue, 103 Early Hints) other than 101.
func readFinalResponse(br *bufio.Reader, req *http.Request) (*http.Response, error) {
	for {
		resp, err := http.ReadResponse(br, req)
		if err != nil || resp.StatusCode >= 200 || resp.StatusCode == http.StatusSwitchingProtocols || resp.StatusCode < 100 {
			return resp, err
		}
	}
}

// upgradedConn is the body of a 101 Switching Protocols response: the
// upstream connection itself, read through the bytes already buffered.
// It implements io.ReadWriteCloser (as net/http's Transport does for 101)
// and CloseWrite. Closing it closes the connection and frees its slot
// under max_connections.
type upgradedConn struct {
	conn *h1Conn
	br   *bufio.Reader // dropped once drained, sparing idle tunnels its buffer
	stop func() bool
}

func (u *upgradedConn) Read(p []byte) (int, error) {
	if u.br != nil {
		if u.br.Buffered() > 0 {
			return u.br.Read(p)
		}
		u.br, u.conn.br = nil, nil
	}
	return u.conn.conn.Read(p)
}

func (u *upgradedConn) Write(p []byte) (int, error) { return u.conn.conn.Write(p) }

// WaitReadable blocks until the connection has bytes to read, without a
// buffer, when it is a plain socket with nothing buffered; it returns at
// once otherwise (TLS may hold decrypted bytes the socket does not show).
func (u *upgradedConn) WaitReadable() error {
	if u.br != nil {
		if u.br.Buffered() > 0 {
			return nil
		}
		u.br, u.conn.br = nil, nil // drained: an idle tunnel keeps no buffer
	}
	return WaitReadable(u.conn.conn)
}

// WaitReadable blocks until the plain TCP connection c is readable (or
// closed, or past its read deadline), holding no buffer; a connection with
// a WaitReadable method of its own (one replaying bytes it read) answers
// for itself; for any other kind it returns nil at once.
func WaitReadable(c net.Conn) error {
	if w, ok := c.(interface{ WaitReadable() error }); ok {
		return w.WaitReadable() // a wrapper that knows what it buffers
	}
	tc, ok := c.(syscall.Conn) // a *net.TCPConn or a *rawsock.Conn
	if !ok {
		return nil
	}
	rc, err := tc.SyscallConn()
	if err != nil {
		return nil
	}
	var peekErr error
	err = rc.Read(func(fd uintptr) bool {
		// Peek, as the poller only reports readiness edges after a read
		// that found nothing: data, EOF and errors all end the wait.
		var b [1]byte
		for {
			_, _, err := syscall.Recvfrom(int(fd), b[:], syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
			switch err {
			case syscall.EINTR:
				continue
			case syscall.EAGAIN:
				return false
			}
			peekErr = nil
			return true
		}
	})
	if err != nil {
		return err
	}
	return peekErr
}

// CloseWrite half-closes the connection (TCP FIN, or TLS close_notify),
// so the upstream reads EOF while its answers still flow back.
func (u *upgradedConn) CloseWrite() error {
	if cw, ok := u.conn.conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return nil
}

// Close closes the upstream connection.
func (u *upgradedConn) Close() error {
	u.stop()
	u.conn.close()
	return nil
}

// staleErr reports the errors of a pooled connection the upstream closed
// while it was idle, met before any byte of the response: EOF, reset,
// broken pipe.
func staleErr(err error) bool {
	return errors.Is(err, io.EOF) || errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE)
}

var (
	emptyValue   = []string{""}
	errStaleConn = errors.New("pooled connection closed by the upstream before the response")
)

// h1Body returns its connection to the pool once fully read and once the
// request body has been written.
type h1Body struct {
	rc    io.ReadCloser
	conn  *h1Conn
	stop  func() bool
	reuse bool
	done  atomic.Bool
	// writeDone reports the end of the request's writer (full duplex); nil
	// for requests written before the response was read, and once the
	// writer's end was seen. Read and Close are called by one goroutine.
	writeDone chan error
}

func (b *h1Body) Read(p []byte) (int, error) {
	n, err := b.rc.Read(p)
	if err != nil {
		b.release(errors.Is(err, io.EOF))
	}
	return n, err
}

// Close releases the connection (to the pool after a full read, else
// closed: closing first keeps the body from draining a long stream) and
// waits for the request's writer, so that the request body is no longer
// read once Close returns. A writer still running is one the upstream
// answered before the request body was all sent (a 413, a 401 before an
// upload): the connection is closed under it, which ends its writes, but
// a writer blocked reading the request body (from a client that paused)
// holds Close until that read returns: the caller makes it return first
// (the HTTP proxy sets a past read deadline on its downstream).
func (b *h1Body) Close() error {
	if !b.done.Load() {
		b.release(false)
	}
	if b.writeDone != nil {
		<-b.writeDone
		b.writeDone = nil
	}
	return nil
}

func (b *h1Body) release(reuse bool) {
	if !b.done.CompareAndSwap(false, true) {
		return
	}
	if b.writeDone != nil {
		select {
		case err := <-b.writeDone:
			b.writeDone = nil
			if err != nil {
				reuse = false
			}
		default:
			// The upstream answered before the request body was all sent: the
			// connection cannot be reused, and closing it (below) ends the
			// writer's writes. The answer is whole; Close waits for the
			// writer, which may have to be unblocked by its caller first.
			reuse = false
		}
	}
	if !b.stop() { // the context fired: the deadline is poisoned
		reuse = false
	}
	if reuse && b.reuse {
		b.conn.pool.put(b.conn)
		return
	}
	b.conn.close()
	b.rc.Close()
}

// bodyReadErr records the first error other than io.EOF of reading a
// request body, which Request.Write reports only as an opaque error.
type bodyReadErr struct {
	io.ReadCloser
	err error // written by the request writer before writeDone
}

func (b *bodyReadErr) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	if err != nil && err != io.EOF && b.err == nil {
		b.err = err
	}
	return n, err
}
