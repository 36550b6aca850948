package listener

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/meshlet/meshlet/sidecar/config"
	"github.com/meshlet/meshlet/sidecar/intercept"
	"github.com/meshlet/meshlet/xds"
)

// Why a capture listener refused a connection: the "reason" label of
// meshlet_sidecar_capture_refused_total and the log field.
const (
	// ReasonNoFilterChain: no filter chain matched the connection's
	// original destination and the listener has no default chain, so there
	// is no pass-through (MeshDefaults outbound: registry-only).
	ReasonNoFilterChain = "no_filter_chain"
	// ReasonNotRedirected: the connection has no original destination, or
	// it is the listener's own address: it was dialled to the capture port
	// directly instead of being redirected by iptables. Serving it would
	// send it to itself.
	ReasonNotRedirected = "not_redirected"
	// ReasonCaptureLoop: the original destination is a capture listener of
	// this sidecar (its address, or its port when it listens on every
	// address): serving it would come back here.
	ReasonCaptureLoop = "capture_loop"
)

// CaptureRecorder receives what capture listeners do, for metrics.
// Implementations must be safe for concurrent use.
type CaptureRecorder interface {
	// CaptureRefused counts a connection a capture listener closed without
	// serving it, by reason (ReasonNoFilterChain, ReasonNotRedirected,
	// ReasonCaptureLoop).
	CaptureRefused(listener, reason string)
	// CapturePassthrough counts a connection no filter chain matched,
	// given the listener's default chain (the pass-through to its original
	// destination).
	CapturePassthrough(listener string)
}

// CaptureOptions configure NewCapture. The zero value is usable.
type CaptureOptions struct {
	// Log defaults to slog.Default().
	Log *slog.Logger
	// Recorder receives the counts; nil records nothing.
	Recorder CaptureRecorder
	// DrainTimeout bounds the drain of the handlers of chains an update
	// removes or replaces; DefaultDrainTimeout when 0.
	DrainTimeout time.Duration
}

// CaptureLogEvery is how often a capture listener logs refusals of one
// destination (for one reason); the refusals in between are counted in the
// next line's "suppressed".
const CaptureLogEvery = time.Minute

// Capture is the Handler of a capture listener (config.Listener with
// OriginalDst). For each connection it reads the original destination
// (intercept.OriginalDst: SO_ORIGINAL_DST, IP6T_SO_ORIGINAL_DST), refuses
// connections that were not redirected or would loop, selects the chains
// by the destination (config.Capture.Select: port, then longest prefix)
// and hands the connection, with its destination, to the handler of those
// chains: the handler the Factory makes for any listener (TLS detection,
// HTTP connection manager, TCP proxy), one per target. A connection no
// chain matches gets the default chain, or is refused when there is none.
type Capture struct {
	name  string
	build Factory
	log   *slog.Logger
	rec   CaptureRecorder
	drain time.Duration
	state atomic.Pointer[captureState]
	logs  logLimiter

	// mu serialises Update and Shutdown and guards closed.
	mu     sync.Mutex
	closed bool
	// draining counts handlers of removed targets being shut down; their
	// contexts derive from drainCtx, which Shutdown ends with its own.
	draining    sync.WaitGroup
	drainCtx    context.Context
	drainCancel context.CancelFunc
}

var _ Handler = (*Capture)(nil)

// captureState is one version of a capture listener: its chain selection,
// a handler per target, and the addresses of the snapshot's capture
// listeners (the loop guard).
type captureState struct {
	sel      *config.Capture
	handlers []Handler
	self     []netip.AddrPort
}

// NewCapture returns the handler of the capture listener l, building the
// handler of each of its targets (config.Capture.Targets) with build.
func NewCapture(l *config.Listener, snap *config.Snapshot, build Factory, o CaptureOptions) (*Capture, error) {
	if l.Capture == nil {
		return nil, fmt.Errorf("listener %q: not a capture listener (no %s listener filter)", l.Name, xds.OriginalDstFilter)
	}
	if o.Log == nil {
		o.Log = slog.Default()
	}
	if o.DrainTimeout == 0 {
		o.DrainTimeout = DefaultDrainTimeout
	}
	c := &Capture{name: l.Name, build: build, log: o.Log, rec: o.Recorder, drain: o.DrainTimeout, logs: logLimiter{last: map[limitKey]*limitEntry{}}}
	c.drainCtx, c.drainCancel = context.WithCancel(context.Background())
	handlers := make([]Handler, len(l.Capture.Targets))
	for i, t := range l.Capture.Targets {
		h, err := build(t.Listener, snap)
		if err != nil {
			shutdownNow(handlers[:i])
			c.drainCancel()
			return nil, err
		}
		handlers[i] = h
	}
	c.state.Store(&captureState{sel: l.Capture, handlers: handlers, self: captureAddresses(snap)})
	return c, nil
}

// shutdownNow shuts down handlers that never served a connection.
func shutdownNow(handlers []Handler) {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	for _, h := range handlers {
		h.Shutdown(ctx)
	}
}

// captureAddresses returns the addresses of snap's capture listeners.
func captureAddresses(snap *config.Snapshot) []netip.AddrPort {
	var out []netip.AddrPort
	if snap == nil {
		return nil
	}
	for _, l := range snap.Listeners {
		if !l.OriginalDst {
			continue
		}
		if ap, err := netip.ParseAddrPort(l.Address); err == nil {
			out = append(out, netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()))
		}
	}
	return out
}

// Handle implements Handler: it reads conn's original destination, then
// refuses conn or hands it to the handler of its chains. It does not block.
func (c *Capture) Handle(conn net.Conn) {
	st := c.state.Load()
	var local netip.AddrPort
	if a, ok := conn.LocalAddr().(*net.TCPAddr); ok {
		local = a.AddrPort()
		local = netip.AddrPortFrom(local.Addr().Unmap(), local.Port())
	}
	tc, ok := conn.(*net.TCPConn)
	if !ok {
		c.refuse(conn, ReasonNotRedirected, local, intercept.ErrNoOriginalDst)
		return
	}
	dst, err := intercept.OriginalDst(tc)
	if err != nil || dst == local {
		c.refuse(conn, ReasonNotRedirected, local, err)
		return
	}
	if st.loops(dst) {
		c.refuse(conn, ReasonCaptureLoop, dst, nil)
		return
	}
	i := st.sel.Select(dst)
	if i < 0 {
		c.refuse(conn, ReasonNoFilterChain, dst, nil)
		return
	}
	if i == st.sel.Default {
		if c.rec != nil {
			c.rec.CapturePassthrough(c.name)
		}
		if c.log.Enabled(context.Background(), slog.LevelDebug) {
			c.log.Debug("capture: no filter chain matched; default chain", "listener", c.name, "destination", dst.String(),
				"remote", conn.RemoteAddr().String(), "chain", st.sel.Targets[i].Key)
		}
	}
	HandleRedirected(st.handlers[i], conn, dst)
}

// loops reports whether dst is one of the sidecar's capture listeners.
func (st *captureState) loops(dst netip.AddrPort) bool {
	for _, a := range st.self {
		if a.Port() == dst.Port() && (a.Addr() == dst.Addr() || a.Addr().IsUnspecified()) {
			return true
		}
	}
	return false
}

// refuse closes conn, counts it and logs it at most once per CaptureLogEvery
// for dst and reason.
func (c *Capture) refuse(conn net.Conn, reason string, dst netip.AddrPort, err error) {
	conn.Close()
	if c.rec != nil {
		c.rec.CaptureRefused(c.name, reason)
	}
	if ok, suppressed := c.logs.allow(limitKey{reason: reason, dst: dst}, time.Now()); ok {
		attrs := []any{"listener", c.name, "reason", reason, "destination", dst.String(), "remote", conn.RemoteAddr().String()}
		if suppressed > 0 {
			attrs = append(attrs, "suppressed", suppressed)
		}
		if err != nil {
			attrs = append(attrs, "error", err)
		}
		c.log.Warn("capture: connection refused", attrs...)
	}
}

// Update implements Handler: the chains of the new version whose key (the
// chain names) is unchanged keep their handler, updated in place when it
// can be; others get a new handler, and the handlers of chains that went
// are drained. It returns false when l is no longer a capture listener or a
// handler cannot be built.
func (c *Capture) Update(l *config.Listener, snap *config.Snapshot) bool {
	if l.Capture == nil {
		return false
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return false
	}
	old := c.state.Load()
	oldByKey := make(map[string]int, len(old.handlers))
	for i, t := range old.sel.Targets {
		oldByKey[t.Key] = i
	}
	reused := make([]bool, len(old.handlers))
	handlers := make([]Handler, len(l.Capture.Targets))
	var built []Handler
	for i, t := range l.Capture.Targets {
		if j, ok := oldByKey[t.Key]; ok && !reused[j] && old.handlers[j].Update(t.Listener, snap) {
			reused[j] = true
			handlers[i] = old.handlers[j]
			continue
		}
		h, err := c.build(t.Listener, snap)
		if err != nil {
			c.log.Error("capture: cannot build the handler of a chain", "listener", c.name, "chain", t.Key, "error", err)
			shutdownNow(built)
			return false
		}
		built = append(built, h)
		handlers[i] = h
	}
	c.state.Store(&captureState{sel: l.Capture, handlers: handlers, self: captureAddresses(snap)})
	for j, h := range old.handlers {
		if !reused[j] {
			c.draining.Add(1)
			go func() {
				defer c.draining.Done()
				ctx, cancel := context.WithTimeout(c.drainCtx, c.drain)
				defer cancel()
				h.Shutdown(ctx)
			}()
		}
	}
	return true
}

// Shutdown implements Handler: every chain's handler stops taking
// connections and drains until ctx is done, as do those of chains removed
// earlier.
func (c *Capture) Shutdown(ctx context.Context) {
	c.mu.Lock()
	c.closed = true
	st := c.state.Load()
	c.mu.Unlock()
	stop := context.AfterFunc(ctx, c.drainCancel)
	defer stop()
	var wg sync.WaitGroup
	for _, h := range st.handlers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			h.Shutdown(ctx)
		}()
	}
	wg.Wait()
	c.draining.Wait()
	c.drainCancel()
}

// limitKey is what refusals are logged once per CaptureLogEvery for.
type limitKey struct {
	reason string
	dst    netip.AddrPort
}

type limitEntry struct {
	last       time.Time
	suppressed int
}

// logLimiter lets one log line per key through each CaptureLogEvery,
// remembering at most maxLimitKeys keys.
type logLimiter struct {
	mu   sync.Mutex // guards last
	last map[limitKey]*limitEntry
}

// maxLimitKeys bounds the destinations a logLimiter remembers: a scan of
// many addresses costs memory only up to it (then the oldest are
// forgotten, and logged again).
const maxLimitKeys = 4096

// allow reports whether a line for k may be logged at now, and how many
// were suppressed since the last one.
func (l *logLimiter) allow(k limitKey, now time.Time) (bool, int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if e, ok := l.last[k]; ok {
		if now.Sub(e.last) < CaptureLogEvery {
			e.suppressed++
			return false, 0
		}
		n := e.suppressed
		e.last, e.suppressed = now, 0
		return true, n
	}
	if len(l.last) >= maxLimitKeys {
		for key, e := range l.last {
			if now.Sub(e.last) >= CaptureLogEvery {
				delete(l.last, key)
			}
		}
		if len(l.last) >= maxLimitKeys {
			clear(l.last)
		}
	}
	l.last[k] = &limitEntry{last: now}
	return true, 0
}
