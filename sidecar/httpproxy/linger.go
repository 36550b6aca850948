package httpproxy

import (
	"crypto/tls"
	"io"
	"net"
	"syscall"
	"time"
)

// Lingering close.
//
// An HTTP/1.1 server that answers before it has read the whole request
// body (a 413 to an upload, a 401 before it, a failure of the proxy's
// own) and then closes the connection while the client still sends makes
// its kernel reset the connection over the unread bytes (RFC 1122
// §4.2.2.13): the reset throws away what the client has not read yet of
// the answer, and the client's next write fails ("Connection reset by
// peer", curl's error 55) before it reads the answer at all. RFC 9112
// §9.6 has the server close in stages instead: shut down the write side
// after the answer (FIN), keep reading until the client closes too or
// long enough for the answer to have arrived, then close. Envoy does this
// for HttpConnectionManager.delayed_close_timeout (1 s by default), nginx
// with lingering_close; Go's net/http server half does it
// (closeWriteAndWait: a FIN, then 500 ms without reading, so a client
// still sending fills the buffers and is reset all the same, and not at
// all for a request with Expect: 100-continue, whose connection it closes
// at once).
//
// Both HTTP/1.1 wires close that way, through lingerClose: net/http's
// server through the connection it is given (serverConn.Close), when the
// handler answered and left the request body unread (forward.endEarly);
// the fast path, which reads a request's whole body before forwarding it,
// when it ends a connection with bytes of a further request pending (a
// client pipelining past an answer the connection cannot outlive).

// lingerMaxBytes bounds what one lingering close reads and discards. The
// time bound (HTTPConnectionManager.DelayedCloseTimeout) limits how long a
// connection is held; this one limits the work for a client that never
// stops sending. It is not Go's 256 KiB (maxPostHandlerReadBytes, what its
// server reads of an unread body to keep the connection alive, before
// answering): a client sees the answer only after what it had already
// sent, and on Linux that can be the whole of its send buffer (tcp_wmem's
// maximum, 4 MiB) plus our receive buffer (tcp_rmem's, 6 MiB by default)
// plus what it writes before it notices; a loopback peer fills that in
// milliseconds. 16 MiB covers it with room, and costs a few milliseconds
// of copying at most.
const lingerMaxBytes = 16 << 20

// lingerClose half-closes conn (closeWrite) and reads and discards what
// the client still sends, through r (conn, or a reader of its socket),
// into buf, until the client closes its side (EOF), a read fails
// (reset, conn closed by a shutdown), deadline passes or lingerMaxBytes
// have been read. It returns the bytes discarded. It leaves conn open,
// with deadline as its read deadline: the caller closes it.
func lingerClose(conn net.Conn, r io.Reader, deadline time.Time, buf []byte) int64 {
	closeWrite(conn)
	if err := conn.SetReadDeadline(deadline); err != nil {
		return 0 // closed already
	}
	var n int64
	for n < lingerMaxBytes {
		m, err := r.Read(buf[:min(int64(len(buf)), lingerMaxBytes-n)])
		n += int64(m)
		if err != nil {
			break
		}
	}
	return n
}

// closeWrite shuts down conn's write side: a TLS connection sends its
// close_notify alert, then the TCP connection below it (when it can
// half-close) its FIN, for a peer that watches the socket rather than the
// alert.
func closeWrite(conn net.Conn) {
	if tc, ok := conn.(*tls.Conn); ok {
		_ = tc.CloseWrite()
		conn = tc.NetConn()
	}
	if cw, ok := conn.(interface{ CloseWrite() error }); ok {
		_ = cw.CloseWrite()
	}
}

// inputPending reports whether the peer sent bytes on conn that were not
// read yet (a TLS record counts), without blocking or consuming them (a
// MSG_PEEK). It is false for a connection without a socket of its own to
// peek at, and when the peer has closed.
func inputPending(conn net.Conn) bool {
	if tc, ok := conn.(*tls.Conn); ok {
		conn = tc.NetConn()
	}
	sc, ok := conn.(syscall.Conn) // a *net.TCPConn or a *rawsock.Conn
	if !ok {
		return false
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return false
	}
	pending := false
	_ = rc.Read(func(fd uintptr) bool {
		var b [1]byte
		for {
			n, _, err := syscall.Recvfrom(int(fd), b[:], syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
			if err == syscall.EINTR {
				continue
			}
			pending = err == nil && n > 0
			return true
		}
	})
	return pending
}
