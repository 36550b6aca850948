// Package tcpproxy is the sidecar's opaque TCP filter chain: each downstream
// connection is paired with a new connection to an endpoint of the cluster
// (round robin) and bytes are copied both ways, half-closes included.
package tcpproxy

import (
	"context"
	"crypto/tls"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/meshlet/meshlet/sidecar/cluster"
	"github.com/meshlet/meshlet/sidecar/config"
	"github.com/meshlet/meshlet/sidecar/listener"
	"github.com/meshlet/meshlet/sidecar/tlsid"
	"github.com/meshlet/meshlet/xds"
)

// Recorder receives authorization denials and connection counts, for
// metrics.
type Recorder interface {
	AuthzDenied(listener, rule string)
	// Connections adds delta (+1 opened, -1 closed) to the listener's
	// active downstream connections.
	Connections(listener string, delta int)
	// IdleTimeout counts a connection closed by the listener's TCP proxy
	// idle timeout (TcpProxy.idle_timeout).
	IdleTimeout(listener string)
}

// Proxy is the listener.Handler of the TCP proxy of one filter chain.
type Proxy struct {
	name     string
	secure   bool
	clusters *cluster.Manager
	log      *slog.Logger
	rec      Recorder
	cfg      atomic.Pointer[config.FilterChain]

	mu       sync.Mutex // guards conns and shutdown
	conns    map[net.Conn]struct{}
	shutdown bool
	wg       sync.WaitGroup // one per proxied connection
}

var _ listener.OriginalDstHandler = (*Proxy)(nil)

// New returns the handler of the TCP proxy of listener l's mTLS chain
// (secure) or plaintext chain. rec may be nil.
func New(l *config.Listener, secure bool, clusters *cluster.Manager, log *slog.Logger, rec Recorder) *Proxy {
	p := &Proxy{name: l.Name, secure: secure, clusters: clusters, log: log, rec: rec, conns: map[net.Conn]struct{}{}}
	p.cfg.Store(l.Chain(secure))
	return p
}

// Update switches the target cluster, connect attempts and authorization
// for new connections.
func (p *Proxy) Update(l *config.Listener, _ *config.Snapshot) bool {
	c := l.Chain(p.secure)
	if c == nil || c.TCP == nil {
		return false
	}
	p.cfg.Store(c)
	return true
}

// Handle proxies conn in its own goroutine.
func (p *Proxy) Handle(conn net.Conn) { p.HandleOriginalDst(conn, netip.AddrPort{}) }

// HandleOriginalDst implements listener.OriginalDstHandler: it proxies
// conn, redirected to a capture listener, in its own goroutine; an
// ORIGINAL_DST cluster (config.ClusterOriginalDst) connects to dst.
func (p *Proxy) HandleOriginalDst(conn net.Conn, dst netip.AddrPort) {
	p.mu.Lock()
	if p.shutdown {
		p.mu.Unlock()
		conn.Close()
		return
	}
	p.conns[conn] = struct{}{}
	p.wg.Add(1)
	p.mu.Unlock()
	if p.rec != nil {
		p.rec.Connections(p.name, 1)
	}
	go func() {
		defer p.wg.Done()
		if p.rec != nil {
			defer p.rec.Connections(p.name, -1)
		}
		p.serve(conn, dst)
		p.mu.Lock()
		delete(p.conns, conn)
		p.mu.Unlock()
	}()
}

// Shutdown refuses new connections and waits for open ones until ctx is
// done, then closes them.
func (p *Proxy) Shutdown(ctx context.Context) {
	p.mu.Lock()
	p.shutdown = true
	p.mu.Unlock()
	done := make(chan struct{})
	go func() {
		p.wg.Wait()
		close(done)
	}()
	select {
	case <-done:
		return
	case <-ctx.Done():
	}
	p.mu.Lock()
	for c := range p.conns {
		c.Close()
	}
	p.mu.Unlock()
	<-done
}

// serve connects down to an endpoint of the cluster (to dst for an
// ORIGINAL_DST cluster), trying up to MaxConnectAttempts endpoints (others
// first) when connecting fails, and pipes bytes until both sides are done.
func (p *Proxy) serve(down net.Conn, dst netip.AddrPort) {
	defer down.Close()
	chain := p.cfg.Load()
	if chain.RBAC != nil {
		var peer tlsid.Peer
		if tc, ok := down.(*tls.Conn); ok {
			peer = tlsid.PeerOf(tc.ConnectionState())
		}
		if ok, rule := chain.RBAC.Decide(&config.RBACRequest{Principal: peer.SPIFFEID}); !ok {
			if p.rec != nil {
				p.rec.AuthzDenied(p.name, rule)
			}
			p.log.Info("authz: connection denied", "listener", p.name, "peer", peer.SPIFFEID, "remote", down.RemoteAddr().String(), "rule", rule)
			return
		}
	}
	cfg := chain.TCP
	c := p.clusters.Get(cfg.Cluster)
	if c == nil {
		p.log.Warn("tcpproxy: connection closed", "listener", p.name, "cluster", cfg.Cluster, "reason", xds.ReasonNoCluster)
		return
	}
	originalDst := c.Config().Type == config.ClusterOriginalDst
	if originalDst && !dst.IsValid() {
		p.log.Warn("tcpproxy: connection closed", "listener", p.name, "cluster", cfg.Cluster, "reason", xds.ReasonNoOriginalDst)
		return
	}
	var triedBuf [4]*cluster.Endpoint
	tried := triedBuf[:0]
	for attempt := 1; ; attempt++ {
		var att *cluster.Attempt
		var picked cluster.PickResult
		if originalDst {
			att, picked = c.PickOriginalDst(dst) // every attempt to the one destination
		} else {
			att, picked = c.Pick(0, false, tried)
		}
		if picked != cluster.Picked {
			reason := xds.ReasonNoHealthyUpstream
			if picked == cluster.CircuitOpen {
				reason = xds.ReasonCircuitOpen
			}
			p.log.Warn("tcpproxy: connection closed", "listener", p.name, "cluster", cfg.Cluster, "reason", reason, "attempts", attempt-1)
			return
		}
		ep := att.Endpoint()
		tried = append(tried, ep)
		up, err := ep.Dial(context.Background())
		if err != nil {
			var ue *cluster.UpstreamError
			overflow := errors.As(err, &ue) && ue.Kind == cluster.KindOverflow
			if overflow {
				att.End(cluster.OutcomeCancelled) // not the endpoint's fault
				p.log.Warn("tcpproxy: connection closed", "listener", p.name, "cluster", cfg.Cluster, "reason", xds.ReasonOverflow, "error", err)
				return
			}
			att.End(cluster.OutcomeLocalFailure)
			if attempt < cfg.MaxConnectAttempts {
				p.log.Debug("tcpproxy: connect failed; trying again", "listener", p.name, "endpoint", ep.Address, "attempt", attempt, "error", err)
				continue
			}
			p.log.Warn("tcpproxy: connection closed", "listener", p.name, "cluster", cfg.Cluster, "endpoint", ep.Address,
				"reason", xds.ReasonConnectFailure, "attempts", attempt, "error", err)
			return
		}
		if PipeIdle(down, up, cfg.IdleTimeout) {
			if p.rec != nil {
				p.rec.IdleTimeout(p.name)
			}
			p.log.Debug("tcpproxy: connection closed", "listener", p.name, "cluster", cfg.Cluster, "reason", xds.ReasonIdleTimeout, "idle", cfg.IdleTimeout)
		}
		up.Close()
		att.End(cluster.OutcomeSuccess)
		return
	}
}

// Pipe copies a→b and b→a until both directions end. A clean EOF on one
// side half-closes the other (CloseWrite), so protocols that half-close keep
// working; an error in either direction closes both connections.
func Pipe(a, b net.Conn) { PipeIdle(a, b, 0) }

// PipeIdle is Pipe with an idle timeout (Envoy's TcpProxy.idle_timeout):
// when no byte has moved in either direction for idle (none received, and
// none sent: a connection draining its bytes to a slow reader is not
// idle, as in Envoy), both connections are closed and it reports true. 0
// disables the timeout.
//
// No timer is armed per read: each direction reads under a deadline that is
// moved at most once per idleSlice(idle) (an eighth of idle, at most 10 s),
// and a direction that moved bytes within its slice records the time. So
// the check costs nothing per byte or per read, spliced copies between two
// plain sockets stay spliced, and a connection is closed between idle and
// idle + idleSlice(idle) after its last byte.
func PipeIdle(a, b net.Conn, idle time.Duration) (timedOut bool) {
	// Copy between the raw TCP connections so io.Copy can splice; wrappers
	// (connection-slot accounting) still get their Close from the caller.
	a, b = unwrap(a), unwrap(b)
	var clock *idleClock
	if idle > 0 {
		clock = &idleClock{idle: idle, slice: idleSlice(idle), conns: [2]net.Conn{a, b}}
		clock.last.Store(time.Now().UnixNano())
		clock.moving() // the counts at the start
	}
	var wg sync.WaitGroup
	var once sync.Once
	abort := func() {
		once.Do(func() {
			a.Close()
			b.Close()
		})
	}
	half := func(dst, src net.Conn) {
		defer wg.Done()
		var err error
		if clock == nil {
			_, err = copyConn(dst, src)
		} else {
			err = clock.copy(dst, src)
		}
		if err != nil && !errors.Is(err, net.ErrClosed) {
			abort()
			return
		}
		if cw, ok := dst.(interface{ CloseWrite() error }); ok {
			if cw.CloseWrite() == nil {
				return
			}
		}
		abort()
	}
	wg.Add(2)
	go half(b, a)
	go half(a, b)
	wg.Wait()
	return clock != nil && clock.expired.Load()
}

// maxIdleSlice caps idleSlice, so long idle timeouts (Envoy's default is an
// hour) are still enforced within seconds of their due time.
const maxIdleSlice = 10 * time.Second

// idleSlice is how long a direction of PipeIdle reads before it records
// whether it moved bytes: an eighth of idle, between 1 ms and maxIdleSlice.
func idleSlice(idle time.Duration) time.Duration {
	return min(max(idle/8, time.Millisecond), maxIdleSlice)
}

// errIdle ends a direction of PipeIdle whose connection timed out.
var errIdle = errors.New("tcpproxy: idle timeout")

// idleClock is the idle state shared by both directions of one PipeIdle.
type idleClock struct {
	idle, slice time.Duration
	// last is when a direction last saw bytes move (UnixNano), recorded at
	// the end of the slice in which they moved.
	last    atomic.Int64
	expired atomic.Bool
	// conns are PipeIdle's two connections; moved is the count of bytes
	// their peers had acknowledged plus those they had received at the
	// last check (tcpBytes), and mu guards it (held only by a direction
	// deciding whether the connection is idle).
	conns [2]net.Conn
	mu    sync.Mutex
	moved [2]uint64
}

// moving reports whether either connection delivered bytes to its peer or
// received bytes from it since the last call (TCP_INFO bytes_acked and
// bytes_received grew); copy calls it whenever it records activity, so
// growth it reports is traffic after the last recorded activity.
//   - A direction blocked writing to a slow reader records nothing until
//     its write returns, yet the connection is not idle while its bytes
//     drain: Envoy's idle timeout counts bytes sent as well as received
//     (its BytesSent connection event).
//   - A read whose deadline passed while the proxy was not scheduled (a
//     loaded host) returns the timeout without reading bytes that arrived
//     in time: Go checks the deadline before it reads. The kernel's count
//     says they arrived, so the connection is not idle.
//
// A peer that stops reading and sending altogether moves neither count,
// and the connection idles out.
func (c *idleClock) moving() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	moved := false
	for i, conn := range c.conns {
		n, ok := tcpBytes(conn)
		if !ok {
			continue
		}
		if n != c.moved[i] {
			moved = true
		}
		c.moved[i] = n
	}
	return moved
}

// copy is copyConn under the idle clock: it reads src in slices bounded by
// read deadlines and returns errIdle (having closed nothing itself) once
// neither direction has moved a byte for c.idle.
func (c *idleClock) copy(dst, src net.Conn) error {
	for {
		now := time.Now()
		deadline := time.Unix(0, c.last.Load()).Add(c.idle)
		if slice := now.Add(c.slice); slice.Before(deadline) {
			deadline = slice
		}
		if err := src.SetReadDeadline(deadline); err != nil {
			return err
		}
		n, err := copyConn(dst, src)
		if n > 0 {
			c.last.Store(time.Now().UnixNano())
			c.moving() // traffic so far is accounted for
		}
		if err == nil || !errors.Is(err, os.ErrDeadlineExceeded) {
			return err
		}
		if time.Since(time.Unix(0, c.last.Load())) >= c.idle {
			if c.moving() {
				c.last.Store(time.Now().UnixNano())
				continue
			}
			c.expired.Store(true)
			return errIdle
		}
	}
}

// copyBufSize is the buffer of one direction of a connection with a TLS
// side: a full TLS record's plaintext.
const copyBufSize = 16 << 10

var copyBufPool = sync.Pool{New: func() any { b := make([]byte, copyBufSize); return &b }}

// copyConn copies src to dst until src's EOF (nil) or an error, and returns
// the bytes written. Between two plain TCP sockets io.Copy splices in the
// kernel. Otherwise each chunk goes through a pooled buffer, taken from a
// plain socket only once it has bytes to read: an idle connection holds no
// buffer on its plain side (a TLS side may have bytes buffered inside
// crypto/tls, so its read waits in a buffer).
func copyConn(dst, src net.Conn) (int64, error) {
	_, srcTCP := src.(*net.TCPConn)
	if _, dstTCP := dst.(*net.TCPConn); srcTCP && dstTCP {
		return io.Copy(dst, src)
	}
	var written int64
	for {
		if srcTCP {
			if err := cluster.WaitReadable(src); err != nil {
				return written, err
			}
		}
		bp := copyBufPool.Get().(*[]byte)
		n, rerr := src.Read(*bp)
		var werr error
		if n > 0 {
			var w int
			w, werr = dst.Write((*bp)[:n])
			written += int64(w)
		}
		copyBufPool.Put(bp)
		switch {
		case werr != nil:
			return written, werr
		case rerr == io.EOF:
			return written, nil
		case rerr != nil:
			return written, rerr
		}
	}
}

func unwrap(c net.Conn) net.Conn {
	for {
		u, ok := c.(interface{ Unwrap() net.Conn })
		if !ok {
			return c
		}
		c = u.Unwrap()
	}
}
