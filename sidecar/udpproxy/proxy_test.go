package udpproxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/meshlet/meshlet/internal/testutil"
	"github.com/meshlet/meshlet/sidecar/cluster"
	"github.com/meshlet/meshlet/sidecar/config"
	"github.com/meshlet/meshlet/xds"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// recorder counts what the proxy reports, by name.
type recorder struct {
	mu     sync.Mutex // guards counts
	counts map[string]int
}

func (r *recorder) UDPMeter(string) Meter { return r }
func (r *recorder) add(k string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.counts == nil {
		r.counts = map[string]int{}
	}
	r.counts[k]++
}
func (r *recorder) get(k string) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.counts[k]
}
func (r *recorder) SessionOpened()           { r.add("opened") }
func (r *recorder) SessionClosed(why string) { r.add("closed:" + why) }
func (r *recorder) Datagram(up bool, _ int) {
	if up {
		r.add("up")
	} else {
		r.add("down")
	}
}
func (r *recorder) Dropped(why xds.FailureReason) { r.add("dropped:" + string(why)) }

// echoServer answers each datagram with "<its source port>:<payload>", so
// a client can tell which upstream socket (session) carried it.
func echoServer(t *testing.T) *net.UDPConn {
	t.Helper()
	pc, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pc.Close() })
	go func() {
		buf := make([]byte, 65535)
		for {
			n, from, err := pc.ReadFromUDP(buf)
			if err != nil {
				return
			}
			_, _ = pc.WriteToUDP(fmt.Appendf(nil, "%d:%s", from.Port, buf[:n]), from)
		}
	}()
	return pc
}

type rig struct {
	p        *Proxy
	addr     *net.UDPAddr
	clusters *cluster.Manager
	rec      *recorder
}

// setCluster points cluster "u" at endpoints, with max_connections.
func (r *rig) setCluster(maxConns int, endpoints ...string) {
	eps := make([]config.Endpoint, len(endpoints))
	for i, e := range endpoints {
		eps[i] = config.Endpoint{Address: e, Weight: 1}
	}
	th := config.DefaultThresholds
	if maxConns > 0 {
		th.MaxConnections = maxConns
	}
	r.clusters.Update(map[string]*config.Cluster{"u": {Name: "u", Type: config.ClusterStatic, ConnectTimeout: time.Second,
		Thresholds: th, Static: &config.LoadAssignment{Endpoints: eps}}}, nil)
}

// startProxy runs a UDP proxy on a loopback socket for cluster "u".
func startProxy(t *testing.T, cfg config.UDPProxy, maxConns int, endpoints ...string) *rig {
	t.Helper()
	r := &rig{clusters: cluster.NewManager(nil, nil, nil), rec: &recorder{}}
	r.setCluster(maxConns, endpoints...)
	cfg.Cluster = "u"
	if cfg.MaxDownstreamDatagram == 0 {
		cfg.MaxDownstreamDatagram = config.MaxDatagramSize
	}
	if cfg.MaxUpstreamDatagram == 0 {
		cfg.MaxUpstreamDatagram = config.MaxDatagramSize
	}
	r.p = New(&config.Listener{Name: "l", UDP: &cfg}, r.clusters, slog.New(slog.NewTextHandler(io.Discard, nil)), r.rec)
	pc, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	r.addr = pc.LocalAddr().(*net.UDPAddr)
	served := make(chan struct{})
	go func() {
		defer close(served)
		r.p.Serve(pc)
	}()
	t.Cleanup(func() {
		pc.Close()
		<-served
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		r.p.Shutdown(ctx)
		r.clusters.Close()
	})
	return r
}

// client is a UDP socket talking to the proxy.
func (r *rig) client(t *testing.T) *net.UDPConn {
	t.Helper()
	c, err := net.DialUDP("udp", nil, r.addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// ask sends msg and returns the answer, or "" after timeout.
func ask(t *testing.T, c *net.UDPConn, msg string, timeout time.Duration) string {
	t.Helper()
	if _, err := c.Write([]byte(msg)); err != nil {
		t.Fatal(err)
	}
	_ = c.SetReadDeadline(time.Now().Add(timeout))
	buf := make([]byte, 65535)
	n, err := c.Read(buf)
	if err != nil {
		return ""
	}
	return string(buf[:n])
}

// askRetry sends msg until an answer comes (UDP may lose the first
// datagrams while a config is taking effect), for at most 5 s.
func askRetry(t *testing.T, c *net.UDPConn, msg string) string {
	t.Helper()
	return testutil.Poll(t, 5*time.Second, fmt.Sprintf("an answer to %q", msg), func() (string, error) {
		if a := ask(t, c, msg, 200*time.Millisecond); a != "" {
			return a, nil
		}
		return "", errors.New("no answer")
	})
}

func sessionPort(answer string) string { p, _, _ := strings.Cut(answer, ":"); return p }

// TestSessionsPerDownstreamAddress: each client address is one session
// with its own upstream socket; its datagrams keep that socket, and each
// answer returns to the client that asked.
func TestSessionsPerDownstreamAddress(t *testing.T) {
	up := echoServer(t)
	r := startProxy(t, config.UDPProxy{IdleTimeout: time.Minute}, 0, up.LocalAddr().String())
	a, b := r.client(t), r.client(t)
	a1 := ask(t, a, "a1", 2*time.Second)
	b1 := ask(t, b, "b1", 2*time.Second)
	a2 := ask(t, a, "a2", 2*time.Second)
	if !strings.HasSuffix(a1, ":a1") || !strings.HasSuffix(b1, ":b1") || !strings.HasSuffix(a2, ":a2") {
		t.Fatalf("answers %q %q %q", a1, b1, a2)
	}
	if sessionPort(a1) != sessionPort(a2) {
		t.Errorf("one client's datagrams used two upstream sockets: %q, %q", a1, a2)
	}
	if sessionPort(a1) == sessionPort(b1) {
		t.Errorf("two clients shared one upstream socket: %q, %q", a1, b1)
	}
	if n := r.p.Sessions(); n != 2 {
		t.Errorf("%d sessions, want 2", n)
	}
	// A datagram is counted after it is relayed: the client may read the
	// answer first.
	testutil.Until(t, 5*time.Second, "2 sessions, 3 datagrams each way counted", func() bool {
		return r.rec.get("opened") == 2 && r.rec.get("up") == 3 && r.rec.get("down") == 3
	})
	// A 60,000-byte datagram passes whole (no 1500-byte default cap).
	big := strings.Repeat("x", 60000)
	if got := ask(t, a, big, 2*time.Second); got != sessionPort(a1)+":"+big {
		t.Errorf("60,000-byte datagram came back as %d bytes", len(got))
	}
}

// TestIdleTimeoutEndsTheSession: a session without a datagram for its
// idle timeout ends (counted); the client's next datagram opens another.
// With idle 0 a session stays.
func TestIdleTimeoutEndsTheSession(t *testing.T) {
	up := echoServer(t)
	r := startProxy(t, config.UDPProxy{IdleTimeout: 150 * time.Millisecond}, 0, up.LocalAddr().String())
	c := r.client(t)
	first := ask(t, c, "one", 2*time.Second)
	if first == "" {
		t.Fatal("no answer")
	}
	// Activity within the timeout keeps the session.
	for range 4 {
		time.Sleep(50 * time.Millisecond)
		if got := ask(t, c, "keep", 2*time.Second); sessionPort(got) != sessionPort(first) {
			t.Fatalf("active session replaced: %q then %q", first, got)
		}
	}
	testutil.Until(t, 5*time.Second, "the idle session to end", func() bool { return r.p.Sessions() == 0 })
	if n := r.rec.get("closed:" + string(xds.ReasonIdleTimeout)); n != 1 {
		t.Errorf("idle_timeout closes = %d, want 1", n)
	}
	second := ask(t, c, "two", 2*time.Second)
	if second == "" || sessionPort(second) == sessionPort(first) {
		t.Errorf("after the idle timeout: %q (first %q), want a new upstream socket", second, first)
	}

	r0 := startProxy(t, config.UDPProxy{IdleTimeout: 0}, 0, up.LocalAddr().String())
	c0 := r0.client(t)
	if ask(t, c0, "x", 2*time.Second) == "" {
		t.Fatal("no answer")
	}
	// Polled for 400 ms (more than twice the other proxy's timeout): the
	// session must still be there at every look.
	for end := time.Now().Add(400 * time.Millisecond); time.Now().Before(end); time.Sleep(20 * time.Millisecond) {
		if r0.p.Sessions() != 1 {
			t.Fatal("idle_timeout 0 ended a session")
		}
	}
}

// TestMaxConnectionsBoundsSessions: the cluster's max_connections is the
// session limit (as in Envoy's udp_proxy); a session beyond it is dropped
// as overflow, and a slot freed by an ended session is reused.
func TestMaxConnectionsBoundsSessions(t *testing.T) {
	up := echoServer(t)
	r := startProxy(t, config.UDPProxy{IdleTimeout: 200 * time.Millisecond}, 1, up.LocalAddr().String())
	a, b := r.client(t), r.client(t)
	if ask(t, a, "a", 2*time.Second) == "" {
		t.Fatal("first session: no answer")
	}
	if got := ask(t, b, "b", 300*time.Millisecond); got != "" {
		t.Fatalf("second session over max_connections 1 answered %q", got)
	}
	if n := r.rec.get("dropped:" + string(xds.ReasonOverflow)); n != 1 {
		t.Errorf("overflow drops = %d, want 1", n)
	}
	testutil.Until(t, 5*time.Second, "a's session to idle out", func() bool { return r.p.Sessions() == 0 })
	if got := ask(t, b, "b", 2*time.Second); !strings.HasSuffix(got, ":b") {
		t.Errorf("after a's session ended, b got %q", got)
	}
}

// TestUpstreamRefusedEndsTheSession: ICMP port unreachable from the
// upstream ends the session (upstream_refused); nothing is left open.
func TestUpstreamRefusedEndsTheSession(t *testing.T) {
	gone, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	addr := gone.LocalAddr().String()
	gone.Close() // nothing listens there now: the kernel answers port unreachable
	r := startProxy(t, config.UDPProxy{IdleTimeout: time.Minute}, 0, addr)
	c := r.client(t)
	for range 3 {
		_, _ = c.Write([]byte("hello?"))
		time.Sleep(20 * time.Millisecond)
	}
	testutil.Until(t, 5*time.Second, "an upstream_refused close", func() bool { return r.rec.get("closed:"+ReasonUpstreamRefused) >= 1 })
	testutil.Until(t, 5*time.Second, "no session left", func() bool { return r.p.Sessions() == 0 })
}

// TestEndpointGoneMovesTheSession: when a session's endpoint leaves the
// cluster, the client's next datagram opens a session on the new one.
func TestEndpointGoneMovesTheSession(t *testing.T) {
	up1, up2 := echoServer(t), echoServer(t)
	r := startProxy(t, config.UDPProxy{IdleTimeout: time.Minute}, 0, up1.LocalAddr().String())
	c := r.client(t)
	if ask(t, c, "x", 2*time.Second) == "" {
		t.Fatal("no answer")
	}
	// Which upstream answered: up2 never saw this client yet, so stop up1
	// answering and see the answer still comes (from up2).
	r.setCluster(0, up2.LocalAddr().String())
	up1.Close()
	if got := askRetry(t, c, "y"); !strings.HasSuffix(got, ":y") {
		t.Fatalf("after the endpoint change: %q", got)
	}
	if n := r.rec.get("closed:" + ReasonEndpointGone); n != 1 {
		t.Errorf("endpoint_gone closes = %d, want 1", n)
	}
}

// TestDatagramLimits: datagrams over max_rx_datagram_size are dropped
// (too_large) both ways; smaller ones pass.
func TestDatagramLimits(t *testing.T) {
	up := echoServer(t)
	r := startProxy(t, config.UDPProxy{IdleTimeout: time.Minute, MaxDownstreamDatagram: 100, MaxUpstreamDatagram: 100}, 0, up.LocalAddr().String())
	c := r.client(t)
	if got := ask(t, c, strings.Repeat("a", 101), 300*time.Millisecond); got != "" {
		t.Errorf("a 101-byte datagram over a 100-byte limit passed: %q", got)
	}
	if n := r.rec.get("dropped:" + string(xds.ReasonTooLarge)); n != 1 {
		t.Errorf("too_large drops = %d, want 1 (downstream)", n)
	}
	// 98 bytes up are fine; the answer ("<5-digit ephemeral port>:" + 98) is over 100: dropped.
	if got := ask(t, c, strings.Repeat("b", 98), 300*time.Millisecond); got != "" {
		t.Errorf("an answer over the upstream limit passed: %d bytes", len(got))
	}
	testutil.Until(t, 5*time.Second, "the upstream too_large drop", func() bool { return r.rec.get("dropped:"+string(xds.ReasonTooLarge)) == 2 })
	if got := ask(t, c, "ok", 2*time.Second); !strings.HasSuffix(got, ":ok") {
		t.Errorf("small datagram: %q", got)
	}
}

// TestNoClusterDrops: a listener whose cluster is unknown drops each
// datagram as no_cluster and opens nothing.
func TestNoClusterDrops(t *testing.T) {
	r := startProxy(t, config.UDPProxy{IdleTimeout: time.Minute}, 0)
	r.clusters.Update(map[string]*config.Cluster{}, nil)
	c := r.client(t)
	_, _ = c.Write([]byte("x"))
	testutil.Until(t, 5*time.Second, "a no_cluster drop", func() bool { return r.rec.get("dropped:"+string(xds.ReasonNoCluster)) == 1 })
	if r.p.Sessions() != 0 {
		t.Error("a session without a cluster")
	}
}

// TestShutdownEndsSessions: Shutdown ends every session (counted) and
// returns with no goroutine left (goleak in TestMain).
func TestShutdownEndsSessions(t *testing.T) {
	up := echoServer(t)
	r := startProxy(t, config.UDPProxy{IdleTimeout: 0}, 0, up.LocalAddr().String())
	for range 5 {
		if ask(t, r.client(t), "x", 2*time.Second) == "" {
			t.Fatal("no answer")
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	r.p.Shutdown(ctx)
	if n := r.rec.get("closed:" + ReasonShutdown); n != 5 {
		t.Errorf("shutdown closes = %d, want 5", n)
	}
	if r.p.Sessions() != 0 {
		t.Error("sessions left after Shutdown")
	}
}
