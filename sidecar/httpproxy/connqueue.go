package httpproxy

import (
	"net"
	"sync"
)

// connQueue is a net.Listener fed by the sidecar's own accept loop, so an
// http.Server can serve connections accepted elsewhere.
type connQueue struct {
	ch        chan net.Conn
	closed    chan struct{}
	closeOnce sync.Once
}

func newConnQueue() *connQueue {
	return &connQueue{ch: make(chan net.Conn), closed: make(chan struct{})}
}

// push hands conn to the server, or closes it when the queue is closed.
func (q *connQueue) push(conn net.Conn) {
	select {
	case q.ch <- conn:
	case <-q.closed:
		conn.Close()
	}
}

// Accept implements net.Listener.
func (q *connQueue) Accept() (net.Conn, error) {
	select {
	case c := <-q.ch:
		return c, nil
	case <-q.closed:
		return nil, net.ErrClosed
	}
}

// Close implements net.Listener; it is idempotent.
func (q *connQueue) Close() error {
	q.closeOnce.Do(func() { close(q.closed) })
	return nil
}

// Addr implements net.Listener; the queue has no address of its own.
func (q *connQueue) Addr() net.Addr { return queueAddr{} }

type queueAddr struct{}

func (queueAddr) Network() string { return "tcp" }
func (queueAddr) String() string  { return "sidecar-listener" }
