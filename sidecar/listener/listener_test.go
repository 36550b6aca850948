package listener

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/meshlet/meshlet/internal/testlog"
	"github.com/meshlet/meshlet/sidecar/config"
)

// Every test closes its Manager: no accept loop, Serve or drain goroutine
// may outlive it.
func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// fakeHandler answers each connection with its id and closes it.
type fakeHandler struct {
	id       string
	inPlace  atomic.Bool // what Update answers
	updates  atomic.Int32
	shutOnce sync.Once
	shut     chan struct{} // closed by Shutdown
}

func (h *fakeHandler) Handle(c net.Conn) {
	fmt.Fprint(c, h.id)
	c.Close()
}

func (h *fakeHandler) Update(*config.Listener, *config.Snapshot) bool {
	h.updates.Add(1)
	return h.inPlace.Load()
}

func (h *fakeHandler) Shutdown(context.Context) { h.shutOnce.Do(func() { close(h.shut) }) }

// fakePacketHandler echoes each datagram prefixed with its id.
type fakePacketHandler struct {
	id       string
	served   chan struct{} // closed when Serve returns
	shutOnce sync.Once
	shut     chan struct{}
}

func (h *fakePacketHandler) Serve(pc net.PacketConn) {
	defer close(h.served)
	buf := make([]byte, 1500)
	for {
		n, from, err := pc.ReadFrom(buf)
		if err != nil {
			return
		}
		pc.WriteTo(append([]byte(h.id+":"), buf[:n]...), from)
	}
}

func (h *fakePacketHandler) Update(*config.Listener, *config.Snapshot) {}

func (h *fakePacketHandler) Shutdown(context.Context) { h.shutOnce.Do(func() { close(h.shut) }) }

// factory makes fake handlers named <listener>#<n> and remembers them.
type factory struct {
	mu      sync.Mutex
	n       map[string]int
	made    map[string]*fakeHandler
	packets map[string]*fakePacketHandler
	fail    string // a listener name the factory refuses
}

func newFactory() *factory {
	return &factory{n: map[string]int{}, made: map[string]*fakeHandler{}, packets: map[string]*fakePacketHandler{}}
}

func (f *factory) handler(l *config.Listener, _ *config.Snapshot) (Handler, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if l.Name == f.fail {
		return nil, errors.New("refused by the test")
	}
	f.n[l.Name]++
	h := &fakeHandler{id: fmt.Sprintf("%s#%d", l.Name, f.n[l.Name]), shut: make(chan struct{})}
	f.made[h.id] = h
	return h, nil
}

func (f *factory) packet(l *config.Listener, _ *config.Snapshot) (PacketHandler, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.n[l.Name]++
	h := &fakePacketHandler{id: fmt.Sprintf("%s#%d", l.Name, f.n[l.Name]), served: make(chan struct{}), shut: make(chan struct{})}
	f.packets[h.id] = h
	return h, nil
}

func (f *factory) get(id string) *fakeHandler {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.made[id]
}

func snapshot(ls ...*config.Listener) *config.Snapshot {
	s := &config.Snapshot{Listeners: map[string]*config.Listener{}}
	for _, l := range ls {
		s.Listeners[l.Name] = l
	}
	return s
}

func tcp(name, addr string) *config.Listener { return &config.Listener{Name: name, Address: addr} }

func udp(name, addr string) *config.Listener {
	return &config.Listener{Name: name, Address: addr, UDP: &config.UDPProxy{}}
}

// ask connects to addr and returns what the handler answered.
func ask(t *testing.T, addr string) string {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 2*time.Second)
	if err != nil {
		t.Fatalf("dial %s: %v", addr, err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(2 * time.Second))
	b, err := io.ReadAll(c)
	if err != nil {
		t.Fatalf("read from %s: %v", addr, err)
	}
	return string(b)
}

// refused checks that nothing listens on addr any more.
func refused(t *testing.T, addr string) {
	t.Helper()
	if c, err := net.DialTimeout("tcp", addr, 2*time.Second); err == nil {
		c.Close()
		t.Errorf("%s still accepts connections", addr)
	}
}

func shutDown(t *testing.T, what string, ch <-chan struct{}) {
	t.Helper()
	select {
	case <-ch:
	case <-time.After(5 * time.Second):
		t.Fatalf("%s was not shut down", what)
	}
}

func apply(t *testing.T, m *Manager, snap *config.Snapshot) {
	t.Helper()
	if err := m.Bind(snap.Listeners); err != nil {
		t.Fatalf("Bind: %v", err)
	}
	if err := m.Apply(snap); err != nil {
		t.Fatalf("Apply: %v", err)
	}
}

// TestManagerLifecycle: listeners start, update in place, get a new handler
// (the old one drains), are renamed on their running socket, are removed
// (socket closed, handler drained), and Close ends everything.
func TestManagerLifecycle(t *testing.T) {
	log, _ := testlog.New(t, "listener")
	f := newFactory()
	m := NewManager(f.handler, time.Second, log)
	defer m.Close(context.Background())

	// Two listeners on port 0 need two addresses: sockets are keyed by the
	// configured address.
	apply(t, m, snapshot(tcp("a", "127.0.0.1:0"), tcp("b", "127.0.0.2:0")))
	addrs := m.Addresses()
	if len(addrs) != 2 {
		t.Fatalf("Addresses() = %v, want a and b", addrs)
	}
	aAddr, bAddr := addrs["a"], addrs["b"]
	if got := ask(t, aAddr); got != "a#1" {
		t.Errorf("a answered %q, want a#1", got)
	}
	if got := ask(t, bAddr); got != "b#1" {
		t.Errorf("b answered %q, want b#1", got)
	}

	// The same listeners again, updatable in place: same handlers.
	f.get("a#1").inPlace.Store(true)
	f.get("b#1").inPlace.Store(true)
	apply(t, m, snapshot(tcp("a", "127.0.0.1:0"), tcp("b", "127.0.0.2:0")))
	if got := ask(t, aAddr); got != "a#1" {
		t.Errorf("after an in-place update a answered %q, want a#1", got)
	}
	if n := f.get("a#1").updates.Load(); n != 1 {
		t.Errorf("a#1 updated %d times, want 1", n)
	}

	// b cannot update in place now: a new handler on the same socket, the
	// old one drained.
	f.get("b#1").inPlace.Store(false)
	apply(t, m, snapshot(tcp("a", "127.0.0.1:0"), tcp("b", "127.0.0.2:0")))
	if got := ask(t, bAddr); got != "b#2" {
		t.Errorf("after a replacing update b answered %q, want b#2", got)
	}
	if m.Addresses()["b"] != bAddr {
		t.Errorf("b moved from %s to %s", bAddr, m.Addresses()["b"])
	}
	shutDown(t, "b#1", f.get("b#1").shut)

	// b removed: its socket closes and its handler drains; a renamed to c
	// at the same address keeps the running socket and handler.
	apply(t, m, snapshot(tcp("c", "127.0.0.1:0")))
	shutDown(t, "b#2", f.get("b#2").shut)
	refused(t, bAddr)
	if got := m.Addresses(); len(got) != 1 || got["c"] != aAddr {
		t.Errorf("Addresses() = %v, want only c at %s", got, aAddr)
	}
	if got := ask(t, aAddr); got != "a#1" {
		t.Errorf("after the rename c answered %q, want a#1 (kept in place)", got)
	}

	m.Close(context.Background())
	shutDown(t, "a#1", f.get("a#1").shut)
	refused(t, aAddr)
	m.Close(context.Background()) // idempotent
	if err := m.Bind(snapshot(tcp("d", "127.0.0.1:0")).Listeners); err == nil {
		t.Error("Bind after Close succeeded")
	}
	if err := m.Apply(snapshot()); err == nil {
		t.Error("Apply after Close succeeded")
	}
}

// TestManagerErrors: a bind failure names the listener and address and
// leaves nothing bound; Apply names unbound addresses and handler errors
// while applying the rest.
func TestManagerErrors(t *testing.T) {
	log, _ := testlog.New(t, "listener")
	f := newFactory()
	m := NewManager(f.handler, time.Second, log)
	defer m.Close(context.Background())

	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	err = m.Bind(snapshot(tcp("taken", busy.Addr().String()), tcp("free", "127.0.0.3:0")).Listeners)
	if err == nil || !strings.Contains(err.Error(), `listener "taken"`) || !strings.Contains(err.Error(), busy.Addr().String()) {
		t.Errorf("Bind on a busy address: %v; want an error naming the listener and address", err)
	}
	m.mu.Lock()
	bound := len(m.sockets)
	m.mu.Unlock()
	if bound != 0 {
		t.Errorf("%d sockets bound after a failed Bind, want 0", bound)
	}

	if err := m.Bind(snapshot(udp("dns", "127.0.0.1:0")).Listeners); err == nil || !strings.Contains(err.Error(), "UDP") {
		t.Errorf("Bind of a UDP listener without a PacketFactory: %v; want an error", err)
	}

	if err := m.Apply(snapshot(tcp("unbound", "127.0.0.1:0"))); err == nil || !strings.Contains(err.Error(), "not bound") {
		t.Errorf("Apply of an unbound address: %v; want an error", err)
	}

	f.fail = "bad"
	snap := snapshot(tcp("bad", "127.0.0.1:0"), tcp("good", "127.0.0.2:0"))
	if err := m.Bind(snap.Listeners); err != nil {
		t.Fatal(err)
	}
	if err := m.Apply(snap); err == nil || !strings.Contains(err.Error(), `listener "bad"`) {
		t.Errorf("Apply with a refusing factory: %v; want an error naming the listener", err)
	}
	if got := ask(t, m.Addresses()["good"]); got != "good#1" {
		t.Errorf("good answered %q, want good#1 (applied despite bad)", got)
	}
}

// TestManagerUDP: a UDP listener is served by its PacketHandler on the
// socket Bind made; removing it closes the socket, ends Serve and shuts the
// handler down.
func TestManagerUDP(t *testing.T) {
	log, _ := testlog.New(t, "listener")
	f := newFactory()
	m := NewManager(f.handler, time.Second, log, WithPacketFactory(f.packet))
	defer m.Close(context.Background())

	// A UDP and a TCP listener may share an address.
	apply(t, m, snapshot(udp("dns", "127.0.0.1:0"), tcp("web", "127.0.0.1:0")))
	addr := m.Addresses()["dns"]
	c, err := net.Dial("udp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(2 * time.Second))
	if _, err := c.Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 64)
	n, err := c.Read(buf)
	if err != nil || string(buf[:n]) != "dns#1:ping" {
		t.Errorf("UDP answer %q, %v; want dns#1:ping", buf[:n], err)
	}
	if got := ask(t, m.Addresses()["web"]); got != "web#1" {
		t.Errorf("web answered %q, want web#1", got)
	}

	apply(t, m, snapshot(tcp("web", "127.0.0.1:0")))
	h := f.packets["dns#1"]
	shutDown(t, "dns#1", h.shut)
	select {
	case <-h.served:
	case <-time.After(5 * time.Second):
		t.Fatal("Serve did not return after its listener was removed")
	}
	if _, ok := m.Addresses()["dns"]; ok {
		t.Error("dns still listed after its removal")
	}
}

// TestCloseWaitsForDrain: Close returns once the handlers' Shutdown returned,
// and Shutdown's context ends at the drain timeout.
func TestCloseWaitsForDrain(t *testing.T) {
	log, _ := testlog.New(t, "listener")
	var h *blockingHandler
	m := NewManager(func(*config.Listener, *config.Snapshot) (Handler, error) {
		h = &blockingHandler{}
		return h, nil
	}, 200*time.Millisecond, log)
	apply(t, m, snapshot(tcp("a", "127.0.0.1:0")))
	start := time.Now()
	m.Close(context.Background())
	if took := time.Since(start); took < 150*time.Millisecond || took > 5*time.Second {
		t.Errorf("Close took %v; want about the 200ms drain timeout", took)
	}
	if !h.done.Load() {
		t.Error("Close returned before the handler's Shutdown")
	}
}

// blockingHandler's Shutdown waits for its context, like a handler whose
// connections never finish.
type blockingHandler struct{ done atomic.Bool }

func (h *blockingHandler) Handle(c net.Conn)                              { c.Close() }
func (h *blockingHandler) Update(*config.Listener, *config.Snapshot) bool { return false }
func (h *blockingHandler) Shutdown(ctx context.Context) {
	<-ctx.Done()
	h.done.Store(true)
}

// TestAwaitQuiet: AwaitQuiet returns once no connection arrived for the
// quiet period, later while connections keep arriving, and at its bound
// when they never stop; listeners keep accepting meanwhile.
func TestAwaitQuiet(t *testing.T) {
	log, _ := testlog.New(t, "listener")
	f := newFactory()
	m := NewManager(f.handler, time.Second, log)
	defer m.Close(context.Background())
	apply(t, m, snapshot(tcp("a", "127.0.0.1:0")))
	addr := m.Addresses()["a"]

	if waited, quiet := m.AwaitQuiet(200*time.Millisecond, 5*time.Second); !quiet || waited > 2*time.Second {
		t.Errorf("no traffic: waited %v, quiet %v; want quiet after about 200ms", waited, quiet)
	}
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() { // a connection every 50 ms for 600 ms, then none
		defer close(done)
		for end := time.Now().Add(600 * time.Millisecond); time.Now().Before(end); {
			ask(t, addr)
			select {
			case <-stop:
				return
			case <-time.After(50 * time.Millisecond):
			}
		}
	}()
	waited, quiet := m.AwaitQuiet(200*time.Millisecond, 5*time.Second)
	<-done
	if !quiet || waited < 600*time.Millisecond {
		t.Errorf("traffic for 600ms: waited %v, quiet %v; want quiet only after the traffic stopped", waited, quiet)
	}
	go func() { // never quiet
		defer close(stop)
		for end := time.Now().Add(time.Second); time.Now().Before(end); {
			ask(t, addr)
			time.Sleep(20 * time.Millisecond)
		}
	}()
	if waited, quiet := m.AwaitQuiet(300*time.Millisecond, 500*time.Millisecond); quiet || waited < 500*time.Millisecond {
		t.Errorf("steady traffic: waited %v, quiet %v; want the 500ms bound", waited, quiet)
	}
	<-stop
}
