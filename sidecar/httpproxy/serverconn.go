package httpproxy

import (
	"crypto/tls"
	"net"
	"sync/atomic"
	"time"

	"github.com/meshlet/meshlet/sidecar/cluster"
)

// serverConn is an HTTP/1.1 connection given to net/http's server: one
// the fast path handed over after reading from it (those bytes are
// replayed first), or one as accepted when the fast path is off. It
// closes lingering (linger.go) when its handler answered with the request
// body unread (lingerOnClose).
type serverConn struct {
	net.Conn
	s       *Server
	pending []byte // read by the fast path, replayed first

	linger   atomic.Bool // set by lingerOnClose
	lingered atomic.Bool // the linger ran
	closing  atomic.Bool // Close was called
}

// serverConnKey is the context key of a request's *serverConn (set by the
// server's ConnContext).
type serverConnKey struct{}

// serverConn wraps conn for net/http's server; a TLS connection keeps its
// ConnectionState (serverTLSConn).
func (s *Server) serverConn(conn net.Conn, pending []byte) net.Conn {
	sc := &serverConn{Conn: conn, s: s, pending: pending}
	if tc, ok := conn.(*tls.Conn); ok {
		return &serverTLSConn{serverConn: sc, tc: tc}
	}
	return sc
}

// base returns c itself (and, promoted, a serverTLSConn's serverConn),
// for the server's ConnContext.
func (c *serverConn) base() *serverConn { return c }

func (c *serverConn) Read(p []byte) (int, error) {
	if len(c.pending) > 0 {
		n := copy(p, c.pending)
		c.pending = c.pending[n:]
		if len(c.pending) == 0 {
			c.pending = nil
		}
		return n, nil
	}
	return c.Conn.Read(p)
}

// lingerOnClose makes Close a lingering close: the handler answered while
// the request body was not all read.
func (c *serverConn) lingerOnClose() { c.linger.Store(true) }

// CloseWrite half-closes the connection when the underlying one can.
// net/http's server does it before closing a connection whose request
// body it did not read (it then waits 500 ms, its rstAvoidanceDelay, and
// closes); a tunnel passes a half-close on. After lingerOnClose it
// lingers (see Close) right away, instead of leaving the client's bytes
// unread through net/http's wait.
func (c *serverConn) CloseWrite() error {
	if c.linger.Load() && c.lingerNow() {
		return nil
	}
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return nil
}

// Close closes the connection. After lingerOnClose, and unless CloseWrite
// did it already, it first lingers: it half-closes the connection and
// reads and discards what the client still sends (lingerClose) for up to
// the chain's DelayedCloseTimeout and lingerMaxBytes, holding a 32 KiB
// pooled buffer meanwhile. A second Close (net/http's Server.Close during
// a linger) closes at once, ending the linger; so does one while the
// Server shuts down hard.
func (c *serverConn) Close() error {
	if !c.closing.Swap(true) && c.linger.Load() {
		c.lingerNow()
	}
	return c.Conn.Close()
}

// lingerNow lingers once; false when it does not (the delayed close is
// off, the Server shuts down hard, or it ran already).
func (c *serverConn) lingerNow() bool {
	d := c.s.chain.Load().DelayedCloseTimeout
	if d <= 0 || c.s.closeNow.Load() || c.lingered.Swap(true) {
		return false
	}
	bp := bufPool.Get().(*[]byte)
	lingerClose(c.Conn, c.Conn, time.Now().Add(d), *bp)
	bufPool.Put(bp)
	return true
}

// WaitReadable blocks until the connection has bytes, holding no buffer
// (cluster.WaitReadable), or returns at once when replayed bytes are left.
func (c *serverConn) WaitReadable() error {
	if len(c.pending) > 0 {
		return nil
	}
	return cluster.WaitReadable(c.Conn)
}

// serverTLSConn is a serverConn over TLS: ConnectionState gives the
// peer's identity to the server's ConnContext.
type serverTLSConn struct {
	*serverConn
	tc *tls.Conn
}

// ConnectionState returns the TLS connection's state.
func (c *serverTLSConn) ConnectionState() tls.ConnectionState { return c.tc.ConnectionState() }
