// Package listener owns the sidecar's listening sockets: it binds the
// addresses a new listener config needs (so a bind failure can be NACKed
// before anything changes), runs one accept loop per listener that hands
// connections to the listener's current Handler, updates handlers in place
// when it can, and drains what is removed or replaced. UDP listeners
// (config.Listener.UDP) get a bound UDP socket served by a PacketHandler,
// which reads it itself.
package listener

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/meshlet/meshlet/sidecar/config"
	"github.com/meshlet/meshlet/xds"
)

// Handler serves the connections of one listener.
type Handler interface {
	// Handle takes ownership of an accepted connection and returns promptly.
	Handle(conn net.Conn)
	// Update applies a new config of the same listener in place, for
	// connections already open as well as new ones. It returns false when
	// the change needs a new Handler (another filter, another codec).
	Update(l *config.Listener, snap *config.Snapshot) bool
	// Shutdown stops taking connections and waits for the open ones to
	// finish until ctx is done, then closes them.
	Shutdown(ctx context.Context)
}

// OriginalDstHandler is a Handler that also takes connections redirected
// to a capture listener together with their original destination
// (SO_ORIGINAL_DST): a TCP proxy whose cluster is ORIGINAL_DST connects to
// it, and the TLS detection in front of chains passes it on.
type OriginalDstHandler interface {
	Handler
	// HandleOriginalDst is Handle for a connection whose original
	// destination was dst.
	HandleOriginalDst(conn net.Conn, dst netip.AddrPort)
}

// HandleRedirected hands conn to h, with its original destination when h
// takes one (OriginalDstHandler) and dst is valid.
func HandleRedirected(h Handler, conn net.Conn, dst netip.AddrPort) {
	if od, ok := h.(OriginalDstHandler); ok && dst.IsValid() {
		od.HandleOriginalDst(conn, dst)
		return
	}
	h.Handle(conn)
}

// Factory makes the Handler for a listener config.
type Factory func(l *config.Listener, snap *config.Snapshot) (Handler, error)

// PacketHandler serves a UDP listener: it reads the listener's socket
// itself (there is nothing to accept).
type PacketHandler interface {
	// Serve reads and answers datagrams on pc until pc is closed, then
	// returns. The Manager calls it once, in a goroutine of its own.
	Serve(pc net.PacketConn)
	// Update applies a new config of the same UDP listener (or of one
	// renamed at the same address) in place; every UDP proxy setting can
	// change on a running socket.
	Update(l *config.Listener, snap *config.Snapshot)
	// Shutdown ends the handler's sessions, waiting for them until ctx is
	// done. Its socket has been closed already.
	Shutdown(ctx context.Context)
}

// PacketFactory makes the PacketHandler for a UDP listener config.
type PacketFactory func(l *config.Listener, snap *config.Snapshot) (PacketHandler, error)

// Option configures a Manager.
type Option func(*Manager)

// AcceptRecorder counts failed accepts (telemetry.Metrics).
type AcceptRecorder interface {
	// AcceptError records a failed accept of listener, reason
	// AcceptFDExhausted or AcceptOther.
	AcceptError(listener, reason string)
}

// Reasons of AcceptRecorder.AcceptError.
const (
	// AcceptFDExhausted is an accept failing with EMFILE or ENFILE: no
	// file descriptor is left for the connection, which waits in the
	// listen backlog until one is.
	AcceptFDExhausted = "fd_exhausted"
	// AcceptOther is any other accept failure.
	AcceptOther = "other"
)

// WithAcceptRecorder counts the Manager's failed accepts in r.
func WithAcceptRecorder(r AcceptRecorder) Option {
	return func(m *Manager) { m.acceptRec = r }
}

// WithPacketFactory lets the Manager run UDP listeners with handlers made by
// f. Without it, binding a UDP listener fails (and is NACKed).
func WithPacketFactory(f PacketFactory) Option {
	return func(m *Manager) { m.packetFactory = f }
}

// DefaultDrainTimeout bounds how long removed or replaced listeners wait for
// open connections (Envoy's --drain-time-s plays this role).
const DefaultDrainTimeout = 60 * time.Second

// Manager runs the listeners of the active config.
type Manager struct {
	factory       Factory
	packetFactory PacketFactory // nil: no UDP listeners
	drain         time.Duration
	log           *slog.Logger

	mu sync.Mutex // guards the fields below; never held while draining
	// sockets are bound listening sockets by address, both those of active
	// listeners and those bound ahead of the next Apply.
	sockets map[string]net.Listener
	active  map[string]*runningListener
	// packets and udp are the same for UDP listeners: bound UDP sockets by
	// address (a UDP and a TCP listener may share an address), active UDP
	// listeners by name.
	packets map[string]net.PacketConn
	udp     map[string]*runningPacket
	closed  bool
	// draining counts handlers being drained in the background.
	draining sync.WaitGroup
	// lastAccept is when a TCP listener last accepted a connection (unix
	// nanoseconds), for AwaitQuiet.
	lastAccept atomic.Int64
	// acceptRec counts failed accepts (nil: none); acceptLogged is when
	// one was last logged (unix nanoseconds), acceptFailed how many
	// failed since.
	acceptRec    AcceptRecorder
	acceptLogged atomic.Int64
	acceptFailed atomic.Int64
}

// NewManager returns a Manager that builds handlers with factory and drains
// for up to drain (DefaultDrainTimeout when 0).
func NewManager(factory Factory, drain time.Duration, log *slog.Logger, opts ...Option) *Manager {
	if drain == 0 {
		drain = DefaultDrainTimeout
	}
	if log == nil {
		log = slog.Default()
	}
	m := &Manager{factory: factory, drain: drain, log: log, sockets: map[string]net.Listener{}, active: map[string]*runningListener{},
		packets: map[string]net.PacketConn{}, udp: map[string]*runningPacket{}}
	for _, o := range opts {
		o(m)
	}
	return m
}

// runningPacket is an active UDP listener.
type runningPacket struct {
	name, addr string
	pc         net.PacketConn
	h          PacketHandler
	done       chan struct{} // closed when Serve returns
}

type runningListener struct {
	name, addr string
	sock       net.Listener
	handler    atomic.Pointer[handlerBox]
	done       chan struct{} // closed when the accept loop exits
}

type handlerBox struct{ h Handler }

// Bind binds every address in listeners that is not bound yet. On failure it
// closes the sockets it bound in this call and returns an error naming the
// listener (an *xds.ResourceError: kind, name, field "address", reason
// xds.NACKBindFailed), so the update can be NACKed with nothing changed.
func (m *Manager) Bind(listeners map[string]*config.Listener) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return errors.New("listener: manager closed")
	}
	var fresh, freshUDP []string
	undo := func() {
		for _, a := range fresh {
			m.sockets[a].Close()
			delete(m.sockets, a)
		}
		for _, a := range freshUDP {
			m.packets[a].Close()
			delete(m.packets, a)
		}
	}
	for _, l := range listeners {
		if l.UDP != nil {
			if _, ok := m.packets[l.Address]; ok {
				continue
			}
			if m.packetFactory == nil {
				undo()
				return &xds.ResourceError{Kind: xds.KindListener, Name: l.Name, Field: "address",
					Err: errors.New("UDP listeners are not supported here")}
			}
			pc, err := net.ListenPacket("udp", l.Address)
			if err != nil {
				undo()
				return &xds.ResourceError{Kind: xds.KindListener, Name: l.Name, Field: "address", Reason: xds.NACKBindFailed,
					Err: fmt.Errorf("cannot bind UDP %s: %w", l.Address, err)}
			}
			m.packets[l.Address] = pc
			freshUDP = append(freshUDP, l.Address)
			continue
		}
		if _, ok := m.sockets[l.Address]; ok {
			continue
		}
		sock, err := net.Listen("tcp", l.Address)
		if err != nil {
			undo()
			return &xds.ResourceError{Kind: xds.KindListener, Name: l.Name, Field: "address", Reason: xds.NACKBindFailed,
				Err: fmt.Errorf("cannot bind %s: %w", l.Address, err)}
		}
		m.sockets[l.Address] = sock
		fresh = append(fresh, l.Address)
	}
	return nil
}

// Apply makes the listeners of snap active. Addresses must have been bound
// by Bind. Unchanged listeners keep serving; changed ones are updated in
// place or get a new handler (the old one drains); removed ones stop
// accepting and drain; sockets no longer needed are closed. It returns the
// first handler construction error after applying everything else.
func (m *Manager) Apply(snap *config.Snapshot) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return errors.New("listener: manager closed")
	}
	var firstErr error
	keepAddr, keepUDP := map[string]bool{}, map[string]bool{}
	byAddr := make(map[string]string, len(m.active))
	for name, rl := range m.active {
		byAddr[rl.addr] = name
	}
	for name, l := range snap.Listeners {
		if l.UDP != nil {
			if err := m.applyPacketLocked(name, l, snap, keepUDP); err != nil {
				firstErr = cmpErr(firstErr, fmt.Errorf("listener %q: %w", name, err))
			}
			continue
		}
		rl := m.active[name]
		if rl == nil {
			// A listener renamed at the same address takes over the running
			// socket of the one it replaces.
			if prev, ok := byAddr[l.Address]; ok {
				if _, stays := snap.Listeners[prev]; !stays {
					rl = m.active[prev]
					delete(m.active, prev)
					m.active[name] = rl
				}
			}
		}
		if rl != nil && rl.addr != l.Address {
			m.stopLocked(rl)
			rl = nil
		}
		if rl != nil {
			box := rl.handler.Load()
			if box.h.Update(l, snap) {
				keepAddr[l.Address] = true
				continue
			}
			h, err := m.factory(l, snap)
			if err != nil {
				firstErr = cmpErr(firstErr, fmt.Errorf("listener %q: %w", name, err))
				keepAddr[l.Address] = true
				continue
			}
			rl.handler.Store(&handlerBox{h: h})
			m.drainInBackground(name, box.h)
			keepAddr[l.Address] = true
			continue
		}
		sock, ok := m.sockets[l.Address]
		if !ok {
			firstErr = cmpErr(firstErr, fmt.Errorf("listener %q: address %s was not bound", name, l.Address))
			continue
		}
		h, err := m.factory(l, snap)
		if err != nil {
			firstErr = cmpErr(firstErr, fmt.Errorf("listener %q: %w", name, err))
			continue
		}
		rl = &runningListener{name: name, addr: l.Address, sock: sock, done: make(chan struct{})}
		rl.handler.Store(&handlerBox{h: h})
		m.active[name] = rl
		keepAddr[l.Address] = true
		go m.acceptLoop(rl)
		m.log.Info("listener: started", "listener", name, "address", l.Address)
	}
	for name, rl := range m.active {
		if l, ok := snap.Listeners[name]; !ok || l.UDP != nil {
			m.stopLocked(rl)
		}
	}
	for name, rp := range m.udp {
		if l, ok := snap.Listeners[name]; !ok || l.UDP == nil {
			m.stopPacketLocked(rp)
		}
	}
	for addr, sock := range m.sockets {
		if !keepAddr[addr] {
			sock.Close()
			delete(m.sockets, addr)
		}
	}
	for addr, pc := range m.packets {
		if !keepUDP[addr] {
			pc.Close()
			delete(m.packets, addr)
		}
	}
	return firstErr
}

// applyPacketLocked makes the UDP listener l active under name: updated in
// place when it runs (or when it is the rename of one at the same address
// that goes), else served on the socket Bind made. It records the address
// in keep. m.mu must be held.
func (m *Manager) applyPacketLocked(name string, l *config.Listener, snap *config.Snapshot, keep map[string]bool) error {
	rp := m.udp[name]
	if rp == nil {
		for prev, p := range m.udp {
			if next, stays := snap.Listeners[prev]; p.addr == l.Address && (!stays || next.UDP == nil || next.Address != l.Address) {
				rp = p
				delete(m.udp, prev)
				rp.name = name
				m.udp[name] = rp
				break
			}
		}
	}
	if rp != nil && rp.addr != l.Address {
		m.stopPacketLocked(rp)
		rp = nil
	}
	if rp != nil {
		rp.h.Update(l, snap)
		keep[l.Address] = true
		return nil
	}
	pc, ok := m.packets[l.Address]
	if !ok {
		return fmt.Errorf("UDP address %s was not bound", l.Address)
	}
	h, err := m.packetFactory(l, snap)
	if err != nil {
		return err
	}
	rp = &runningPacket{name: name, addr: l.Address, pc: pc, h: h, done: make(chan struct{})}
	m.udp[name] = rp
	keep[l.Address] = true
	go func() {
		defer close(rp.done)
		h.Serve(pc)
	}()
	m.log.Info("listener: started", "listener", name, "address", l.Address, "protocol", "udp")
	return nil
}

// stopPacketLocked closes rp's socket (ending its Serve) and shuts its
// handler down in the background. m.mu must be held.
func (m *Manager) stopPacketLocked(rp *runningPacket) {
	delete(m.udp, rp.name)
	delete(m.packets, rp.addr)
	rp.pc.Close()
	m.drainInBackground(rp.name, rp.h)
	m.log.Info("listener: removed", "listener", rp.name, "address", rp.addr, "protocol", "udp")
}

func cmpErr(first, err error) error {
	if first != nil {
		return first
	}
	return err
}

// stopLocked closes rl's socket (ending its accept loop) and drains its
// handler in the background. m.mu must be held.
func (m *Manager) stopLocked(rl *runningListener) {
	delete(m.active, rl.name)
	delete(m.sockets, rl.addr)
	rl.sock.Close()
	m.drainInBackground(rl.name, rl.handler.Load().h)
	m.log.Info("listener: removed; draining", "listener", rl.name, "address", rl.addr, "drain", m.drain)
}

// drainInBackground shuts h (a Handler or PacketHandler) down within the
// drain timeout, without holding m.mu.
func (m *Manager) drainInBackground(name string, h interface{ Shutdown(context.Context) }) {
	m.draining.Add(1)
	go func() {
		defer m.draining.Done()
		ctx, cancel := context.WithTimeout(context.Background(), m.drain)
		defer cancel()
		h.Shutdown(ctx)
	}()
}

func (m *Manager) acceptLoop(rl *runningListener) {
	defer close(rl.done)
	var delay time.Duration
	for {
		conn, err := rl.sock.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			// Temporary failures (EMFILE...): back off like net/http does.
			delay = min(max(delay*2, 5*time.Millisecond), time.Second)
			m.acceptFailure(rl.name, err, delay)
			time.Sleep(delay)
			continue
		}
		delay = 0
		m.lastAccept.Store(time.Now().UnixNano())
		rl.handler.Load().h.Handle(conn)
	}
}

// acceptFailure counts a failed accept and logs it, at most once a
// minute for the Manager with the number of failures since: out of file
// descriptors, every accept fails until one is free, and a line each
// would flood the log.
func (m *Manager) acceptFailure(listener string, err error, delay time.Duration) {
	reason := AcceptOther
	if errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE) {
		reason = AcceptFDExhausted
	}
	if m.acceptRec != nil {
		m.acceptRec.AcceptError(listener, reason)
	}
	n := m.acceptFailed.Add(1)
	now := time.Now().UnixNano()
	last := m.acceptLogged.Load()
	if now-last < int64(time.Minute) || !m.acceptLogged.CompareAndSwap(last, now) {
		return
	}
	m.acceptFailed.Add(-n)
	msg := "listener: accept failed; retrying with backoff"
	if reason == AcceptFDExhausted {
		msg = "listener: out of file descriptors: new connections wait in the listen backlog until one is free " +
			"(raise the process's open-files limit, RLIMIT_NOFILE, or find what holds them); retrying with backoff"
	}
	m.log.Error(msg, "listener", listener, "reason", reason, "error", err, "failuresSinceLastLog", n, "delay", delay)
}

// AwaitQuiet waits until no TCP listener has accepted a connection for
// quiet, at most atMost (polling every 50 ms), and returns how long it
// waited and whether quiet was reached. A stopping sidecar calls it
// before Close, so connections keep being taken until callers stopped
// opening them.
func (m *Manager) AwaitQuiet(quiet, atMost time.Duration) (time.Duration, bool) {
	start := time.Now()
	for {
		now := time.Now()
		if now.Sub(time.Unix(0, max(m.lastAccept.Load(), start.UnixNano()))) >= quiet {
			return now.Sub(start), true
		}
		if now.Sub(start) >= atMost {
			return now.Sub(start), false
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Addresses returns the bound address of each active listener by name
// (useful when a config asks for port 0 in tests).
func (m *Manager) Addresses() map[string]string {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := make(map[string]string, len(m.active)+len(m.udp))
	for name, rl := range m.active {
		out[name] = rl.sock.Addr().String()
	}
	for name, rp := range m.udp {
		out[name] = rp.pc.LocalAddr().String()
	}
	return out
}

// Close stops every listener and drains them for up to ctx's deadline (or
// the drain timeout, whichever is sooner), then returns. It is idempotent.
func (m *Manager) Close(ctx context.Context) {
	m.mu.Lock()
	if m.closed {
		m.mu.Unlock()
		m.draining.Wait()
		return
	}
	m.closed = true
	var loops []chan struct{}
	var handlers []interface{ Shutdown(context.Context) }
	for _, rl := range m.active {
		rl.sock.Close()
		loops = append(loops, rl.done)
		handlers = append(handlers, rl.handler.Load().h)
	}
	for _, rp := range m.udp {
		rp.pc.Close()
		loops = append(loops, rp.done)
		handlers = append(handlers, rp.h)
	}
	for _, sock := range m.sockets {
		sock.Close()
	}
	for _, pc := range m.packets {
		pc.Close()
	}
	m.active = map[string]*runningListener{}
	m.sockets = map[string]net.Listener{}
	m.udp = map[string]*runningPacket{}
	m.packets = map[string]net.PacketConn{}
	m.mu.Unlock()

	for _, d := range loops {
		<-d
	}
	ctx, cancel := context.WithTimeout(ctx, m.drain)
	defer cancel()
	var wg sync.WaitGroup
	for _, h := range handlers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			h.Shutdown(ctx)
		}()
	}
	wg.Wait()
	m.draining.Wait()
}
