// Package udpproxy is the sidecar's UDP proxy (Envoy's udp_proxy listener
// filter): the datagrams of each downstream address form a session with its
// own connected upstream socket to an endpoint of the cluster, picked by the
// cluster's load balancer; answers from that socket go back to the
// downstream address from the listener's socket. A session ends after its
// idle timeout without a datagram either way (Envoy's 1 min by default),
// when its endpoint leaves the cluster or is ejected (the next datagram
// opens a session elsewhere), when the upstream refuses (ICMP port
// unreachable), or with the listener. The cluster's max_connections bounds
// the sessions, as in Envoy.
//
// Datagrams travel in plaintext: UDP has no TLS, so there is no mTLS, no
// peer identity and no authorization on UDP listeners.
//
// Cost: one goroutine reads the listener's socket (one 64 KiB buffer); each
// session has one goroutine waiting for its upstream socket to be readable
// without holding a buffer, reading each answer into a pooled 64 KiB
// buffer. Nothing allocates per datagram and no timer is armed per
// datagram: a session's idle timeout is a read deadline moved only when it
// fires.
package udpproxy

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"github.com/meshlet/meshlet/sidecar/cluster"
	"github.com/meshlet/meshlet/sidecar/config"
	"github.com/meshlet/meshlet/sidecar/listener"
	"github.com/meshlet/meshlet/xds"
)

// Recorder makes the meters of UDP listeners, for metrics.
type Recorder interface {
	// UDPMeter returns the meter of the UDP listener named listener. It is
	// called when a proxy is made or renamed, not per datagram.
	UDPMeter(listener string) Meter
}

// Meter counts one UDP listener's sessions and datagrams. Its methods run
// per datagram: they must not block.
type Meter interface {
	// SessionOpened counts a new session (and one more active).
	SessionOpened()
	// SessionClosed counts a session that ended (one less active), by
	// reason: idle_timeout (xds.ReasonIdleTimeout), or one of the session
	// end reasons below: endpoint_gone, upstream_refused, upstream_error or
	// shutdown.
	SessionClosed(reason string)
	// Datagram counts one datagram of n bytes forwarded to the upstream
	// (toUpstream) or back to the downstream.
	Datagram(toUpstream bool, n int)
	// Dropped counts a datagram not forwarded, by reason: no_cluster,
	// no_healthy_upstream, circuit_open, overflow (max sessions, the
	// cluster's max_connections), connect_failure, too_large,
	// upstream_send_error, downstream_send_error (the xds.FailureReason
	// constants of those words).
	Dropped(reason xds.FailureReason)
}

// Session end reasons (Meter.SessionClosed) other than idle_timeout
// (xds.ReasonIdleTimeout): a session that ends is not a failed datagram,
// so these words are not xds.FailureReason values.
const (
	ReasonEndpointGone    = "endpoint_gone"
	ReasonUpstreamRefused = "upstream_refused"
	ReasonUpstreamError   = "upstream_error"
	ReasonShutdown        = "shutdown"
)

// bufSize is the pooled buffer of one datagram: any UDP payload fits.
const bufSize = 64 << 10

var bufPool = sync.Pool{New: func() any { b := make([]byte, bufSize); return &b }}

// state is what Update swaps: the listener's name, config and meter.
type state struct {
	name  string
	cfg   *config.UDPProxy
	meter Meter
}

// Proxy is the listener.PacketHandler of one UDP listener.
type Proxy struct {
	clusters *cluster.Manager
	log      *slog.Logger
	rec      Recorder
	st       atomic.Pointer[state]

	mu       sync.Mutex // guards sessions and closed
	sessions map[netip.AddrPort]*session
	closed   bool
	wg       sync.WaitGroup // one per session goroutine
}

var _ listener.PacketHandler = (*Proxy)(nil)

// New returns the UDP proxy of listener l (l.UDP must be set), with its
// sessions' upstreams from clusters. rec may be nil.
func New(l *config.Listener, clusters *cluster.Manager, log *slog.Logger, rec Recorder) *Proxy {
	p := &Proxy{clusters: clusters, log: log, rec: rec, sessions: map[netip.AddrPort]*session{}}
	p.st.Store(p.newState(l, nil))
	return p
}

func (p *Proxy) newState(l *config.Listener, prev *state) *state {
	st := &state{name: l.Name, cfg: l.UDP}
	switch {
	case prev != nil && prev.name == l.Name:
		st.meter = prev.meter
	case p.rec != nil:
		st.meter = p.rec.UDPMeter(l.Name)
	default:
		st.meter = nopMeter{}
	}
	return st
}

// Update implements listener.PacketHandler: the cluster and datagram
// limits apply to new sessions and reads, the idle timeout to every
// session from its next check.
func (p *Proxy) Update(l *config.Listener, _ *config.Snapshot) {
	if l.UDP != nil {
		p.st.Store(p.newState(l, p.st.Load()))
	}
}

// Sessions returns the number of open sessions.
func (p *Proxy) Sessions() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.sessions)
}

// Serve implements listener.PacketHandler: it reads pc (a *net.UDPConn)
// until pc is closed, forwarding each datagram on its downstream address's
// session, opened on its first datagram.
func (p *Proxy) Serve(pc net.PacketConn) {
	uc, ok := pc.(*net.UDPConn)
	if !ok {
		p.log.Error("udpproxy: not a UDP socket", "listener", p.st.Load().name)
		return
	}
	bp := bufPool.Get().(*[]byte)
	defer bufPool.Put(bp)
	buf := *bp
	var delay time.Duration
	for {
		st := p.st.Load()
		n, _, flags, from, err := uc.ReadMsgUDPAddrPort(buf[:st.cfg.MaxDownstreamDatagram], nil)
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			delay = min(max(delay*2, 5*time.Millisecond), time.Second)
			p.log.Warn("udpproxy: read failed; retrying", "listener", st.name, "error", err, "delay", delay)
			time.Sleep(delay)
			continue
		}
		delay = 0
		if flags&syscall.MSG_TRUNC != 0 {
			st.meter.Dropped(xds.ReasonTooLarge)
			continue
		}
		s := p.session(st, from, uc)
		if s == nil {
			continue
		}
		if _, err := s.up.Write(buf[:n]); err != nil {
			st.meter.Dropped(xds.ReasonUpstreamSendError)
			if errors.Is(err, syscall.ECONNREFUSED) {
				s.end(ReasonUpstreamRefused)
			}
			continue
		}
		st.meter.Datagram(true, n)
	}
}

// session returns the live session of from, marking it active, or opens
// one; nil when the datagram is dropped (counted).
func (p *Proxy) session(st *state, from netip.AddrPort, down *net.UDPConn) *session {
	now := time.Now().UnixNano()
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return nil
	}
	s := p.sessions[from]
	if s != nil && !s.ep.Retired() && !s.ep.Ejected() {
		// Under p.mu, so an idle check that takes the lock next sees it.
		s.last.Store(now)
		p.mu.Unlock()
		return s
	}
	p.mu.Unlock()
	if s != nil { // its endpoint left the cluster or was ejected
		s.end(ReasonEndpointGone)
	}
	s, drop := p.open(st, from, down, now)
	if s == nil {
		st.meter.Dropped(drop)
		return nil
	}
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		s.release(cluster.OutcomeCancelled)
		return nil
	}
	p.sessions[from] = s
	p.wg.Add(1)
	p.mu.Unlock()
	st.meter.SessionOpened()
	go s.run()
	return s
}

// open picks an endpoint and connects a socket to it, or returns the drop
// reason.
func (p *Proxy) open(st *state, from netip.AddrPort, down *net.UDPConn, now int64) (*session, xds.FailureReason) {
	c := p.clusters.Get(st.cfg.Cluster)
	if c == nil {
		return nil, xds.ReasonNoCluster
	}
	att, picked := c.Pick(0, false, nil)
	switch picked {
	case cluster.Picked:
	case cluster.CircuitOpen:
		return nil, xds.ReasonCircuitOpen
	default:
		return nil, xds.ReasonNoHealthyUpstream
	}
	ep := att.Endpoint()
	up, err := ep.DialUDP(context.Background())
	if err != nil {
		var ue *cluster.UpstreamError
		if errors.As(err, &ue) && ue.Kind == cluster.KindOverflow {
			att.End(cluster.OutcomeCancelled) // not the endpoint's fault
			return nil, xds.ReasonOverflow
		}
		att.End(cluster.OutcomeLocalFailure)
		p.log.Warn("udpproxy: cannot open an upstream socket", "listener", st.name, "endpoint", ep.Address, "error", err)
		return nil, xds.ReasonConnectFailure
	}
	s := &session{p: p, from: from, down: down, up: up, ep: ep, att: att}
	s.last.Store(now)
	return s, ""
}

// Shutdown implements listener.PacketHandler: it ends every session (the
// listener's socket is closed, so answers could not be delivered anyway)
// and waits for their goroutines until ctx is done.
func (p *Proxy) Shutdown(ctx context.Context) {
	p.mu.Lock()
	p.closed = true
	all := make([]*session, 0, len(p.sessions))
	for _, s := range p.sessions {
		all = append(all, s)
	}
	p.mu.Unlock()
	for _, s := range all {
		s.end(ReasonShutdown)
	}
	done := make(chan struct{})
	go func() {
		p.wg.Wait()
		close(done)
	}()
	select {
	case <-done:
	case <-ctx.Done():
		p.log.Warn("udpproxy: sessions still ending at the drain deadline", "listener", p.st.Load().name)
	}
}

// session is the datagrams of one downstream address.
type session struct {
	p    *Proxy
	from netip.AddrPort
	down *net.UDPConn // the listener's socket, to answer from
	up   *cluster.UDPConn
	ep   *cluster.Endpoint
	att  *cluster.Attempt
	// last is when a datagram last went either way (UnixNano).
	last atomic.Int64
	once sync.Once
}

// run forwards the upstream's datagrams to the downstream address until
// the session ends: idle for the idle timeout, refused, or closed.
func (s *session) run() {
	defer s.p.wg.Done()
	rc, err := s.up.SyscallConn()
	if err != nil {
		s.end(ReasonUpstreamError)
		return
	}
	// The read deadline is moved only when it fires (or the timeout
	// changes), not per datagram: then the session is idle, or it is set
	// again from the last datagram.
	idle, arm := time.Duration(-1), true
	for {
		st := s.p.st.Load()
		if st.cfg.IdleTimeout != idle {
			idle, arm = st.cfg.IdleTimeout, true
		}
		if arm {
			var deadline time.Time
			if idle > 0 {
				deadline = time.Unix(0, s.last.Load()).Add(idle)
			}
			if err := s.up.SetReadDeadline(deadline); err != nil {
				s.end(ReasonUpstreamError)
				return
			}
			arm = false
		}
		bp, n, err := readPooled(rc, st.cfg.MaxUpstreamDatagram)
		switch {
		case err == nil:
		case errors.Is(err, os.ErrDeadlineExceeded):
			if s.p.expire(s, idle) {
				return
			}
			arm = true
			continue
		case errors.Is(err, syscall.ECONNREFUSED):
			s.end(ReasonUpstreamRefused)
			return
		case errors.Is(err, net.ErrClosed):
			return // ended elsewhere
		default:
			s.p.log.Warn("udpproxy: upstream read failed; session ended", "listener", st.name, "endpoint", s.ep.Address, "error", err)
			s.end(ReasonUpstreamError)
			return
		}
		if n > st.cfg.MaxUpstreamDatagram {
			bufPool.Put(bp)
			st.meter.Dropped(xds.ReasonTooLarge)
			continue
		}
		s.last.Store(time.Now().UnixNano())
		_, err = s.down.WriteToUDPAddrPort((*bp)[:n], s.from)
		bufPool.Put(bp)
		if err != nil {
			st.meter.Dropped(xds.ReasonDownstreamSendError)
			if errors.Is(err, net.ErrClosed) {
				return // the listener is gone; Shutdown ends the session
			}
			continue
		}
		st.meter.Datagram(false, n)
	}
}

// expire ends s if it has been idle for idle (no datagram since, checked
// under p.mu against Serve marking it active), and reports whether it did.
func (p *Proxy) expire(s *session, idle time.Duration) bool {
	if idle <= 0 {
		return false // the timeout was turned off meanwhile
	}
	p.mu.Lock()
	if time.Since(time.Unix(0, s.last.Load())) < idle {
		p.mu.Unlock()
		return false
	}
	if p.sessions[s.from] == s {
		delete(p.sessions, s.from)
	}
	p.mu.Unlock()
	s.end(string(xds.ReasonIdleTimeout))
	return true
}

// end ends the session once: out of the session table, upstream socket
// closed (its goroutine returns), attempt ended, counted by reason.
func (s *session) end(reason string) {
	s.once.Do(func() {
		s.p.mu.Lock()
		if s.p.sessions[s.from] == s {
			delete(s.p.sessions, s.from)
		}
		s.p.mu.Unlock()
		outcome := cluster.OutcomeSuccess
		if reason == ReasonUpstreamRefused || reason == ReasonUpstreamError {
			outcome = cluster.OutcomeLocalFailure
		}
		s.release(outcome)
		st := s.p.st.Load()
		st.meter.SessionClosed(reason)
		s.p.log.Debug("udpproxy: session ended", "listener", st.name, "downstream", s.from.String(), "endpoint", s.ep.Address, "reason", reason)
	})
}

// release closes the upstream socket (freeing its connection slot) and
// ends the endpoint attempt with outcome.
func (s *session) release(o cluster.Outcome) {
	s.up.Close()
	s.att.End(o)
}

// readPooled waits until the connected UDP socket behind rc has a datagram
// (or an error, or its read deadline passes) holding no buffer, then reads
// it into a pooled buffer, returned with the datagram's full length n
// (above the buffer's when truncated). The caller puts the buffer back.
func readPooled(rc syscall.RawConn, limit int) (*[]byte, int, error) {
	var (
		bp   *[]byte
		n    int
		serr error
	)
	err := rc.Read(func(fd uintptr) bool {
		b := bufPool.Get().(*[]byte)
		for {
			// recv(MSG_TRUNC) reports the datagram's real length; a
			// connected socket needs no source address (no allocation).
			r, _, e := syscall.Syscall6(syscall.SYS_RECVFROM, fd, uintptr(unsafe.Pointer(&(*b)[0])), uintptr(min(limit, len(*b))),
				syscall.MSG_TRUNC|syscall.MSG_DONTWAIT, 0, 0)
			switch e {
			case syscall.EINTR:
				continue
			case syscall.EAGAIN:
				bufPool.Put(b)
				return false
			case 0:
				bp, n = b, int(r)
			default:
				bufPool.Put(b)
				serr = os.NewSyscallError("recvfrom", e)
			}
			return true
		}
	})
	if err != nil {
		return nil, 0, err
	}
	if serr != nil {
		return nil, 0, serr
	}
	return bp, n, nil
}

type nopMeter struct{}

func (nopMeter) SessionOpened()            {}
func (nopMeter) SessionClosed(string)      {}
func (nopMeter) Datagram(bool, int)        {}
func (nopMeter) Dropped(xds.FailureReason) {}
