package httpproxy

import (
	"time"
)

// Handing a connection to net/http's server: what the fast path does not
// serve (see h1fast.go) goes there with the bytes read so far replayed
// (serverConn), for the rest of the connection's life.

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
