package cluster

import (
	"bufio"
	"context"
	"net"
	"time"

	"github.com/meshlet/meshlet/xds"
)

// H1Conn is a pooled HTTP/1.1 connection to an endpoint lent to a caller
// that speaks HTTP/1.1 on it itself: the HTTP proxy's fast path, which
// writes the request head and body as bytes and reads the response from
// Reader. It holds one of the cluster's connection slots (max_connections)
// until Release. An H1Conn is used by one goroutine at a time.
type H1Conn struct{ c *h1Conn }

// HTTP1 reports whether the cluster's upstream protocol is HTTP/1.1 (its
// endpoints' connections can be lent as H1Conn).
func (c *Cluster) HTTP1() bool {
	p := c.cfg.Protocol
	return p != xds.ProtocolHTTP2 && p != xds.ProtocolGRPC
}

// GetH1 returns an idle pooled connection to the endpoint (reused true) or
// a new one, as RoundTrip would use: within max_connections, waiting as
// pending (max_pending_requests) for a slot, with the cluster's mTLS. ctx
// bounds the connect and the wait. An idle connection is first checked for
// an EOF the upstream left while it was idle (one peek syscall) unless
// trustIdle is set, for a request the caller can send again on another
// connection when the first read finds the connection closed. Errors are
// *UpstreamError: KindOverflow, KindConnectFailure, KindTLSHandshake, or
// KindTimeout when ctx ended the wait.
func (e *Endpoint) GetH1(ctx context.Context, trustIdle bool) (H1Conn, bool, error) {
	c, reused, err := e.h1.get(ctx, trustIdle)
	if err != nil {
		return H1Conn{}, false, err
	}
	c.written.Store(0)
	return H1Conn{c}, reused, nil
}

// Reader returns the connection's buffered reader (16 KiB).
func (h H1Conn) Reader() *bufio.Reader { return h.c.br }

// Write writes p to the connection, counting the bytes that reached the
// socket (Written).
func (h H1Conn) Write(p []byte) (int, error) { return h.c.Write(p) }

// Written returns the bytes written since GetH1: 0 means nothing of the
// request can have reached the upstream.
func (h H1Conn) Written() int64 { return h.c.written.Load() }

// SetDeadline sets the connection's read and write deadlines.
func (h H1Conn) SetDeadline(t time.Time) error { return h.c.conn.SetDeadline(t) }

// Conn returns the connection (a *tls.Conn for an mTLS cluster), for
// deadlines and WaitReadable.
func (h H1Conn) Conn() net.Conn { return h.c.conn }

// Release gives the connection back: to the pool when reuse is set (the
// response was read to its end and the connection may carry another
// request), else it is closed and its slot freed. A connection is
// released once.
func (h H1Conn) Release(reuse bool) {
	if reuse {
		h.c.pool.put(h.c)
		return
	}
	h.c.close()
}
