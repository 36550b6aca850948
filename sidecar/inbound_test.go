package sidecar

import (
	"context"
	"crypto/tls"
	"io"
	"log/slog"
	"net"
	"testing"
	"time"

	"github.com/meshlet/meshlet/internal/testca"
	"github.com/meshlet/meshlet/sidecar/config"
	"github.com/meshlet/meshlet/sidecar/telemetry"
)

// chainRecorder is a filter chain's handler that hands its connections to
// the test.
type chainRecorder struct{ conns chan net.Conn }

func newChainRecorder() *chainRecorder { return &chainRecorder{conns: make(chan net.Conn, 4)} }

func (r *chainRecorder) Handle(c net.Conn)                              { r.conns <- c }
func (r *chainRecorder) Update(*config.Listener, *config.Snapshot) bool { return true }
func (r *chainRecorder) Shutdown(context.Context)                       {}

// none fails if the chain gets a connection within the given time.
func (r *chainRecorder) none(t *testing.T, within time.Duration, what string) {
	t.Helper()
	select {
	case c := <-r.conns:
		c.Close()
		t.Fatalf("%s chain got the connection", what)
	case <-time.After(within):
	}
}

func (r *chainRecorder) next(t *testing.T, within time.Duration, what string) net.Conn {
	t.Helper()
	select {
	case c := <-r.conns:
		t.Cleanup(func() { c.Close() })
		return c
	case <-time.After(within):
		t.Fatalf("%s chain got no connection within %v", what, within)
		return nil
	}
}

// startInbound serves the inbound handler of l (an mTLS chain with a
// server certificate, and a plaintext chain when l has one) on a loopback
// port.
func startInbound(t *testing.T, l *config.Listener) (addr string, secure, plain *chainRecorder) {
	t.Helper()
	ca, err := testca.New("test.consul")
	if err != nil {
		t.Fatal(err)
	}
	leaf := ca.MustIssue("dc1", "db")
	cert, err := tls.X509KeyPair([]byte(leaf.CertPEM), []byte(leaf.KeyPEM))
	if err != nil {
		t.Fatal(err)
	}
	in := &inbound{name: l.Name, log: slog.New(slog.DiscardHandler), metrics: telemetry.New(), shape: chainShape(l)}
	in.ctx, in.stop = context.WithCancel(context.Background())
	in.setDetect(l)
	secure = newChainRecorder()
	in.secure = secure
	in.tlsConfig.Store(&tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS13})
	if l.Chain(false) != nil {
		plain = newChainRecorder()
		in.plain = plain
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			in.Handle(c)
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		<-done
		in.Shutdown(context.Background())
	})
	return ln.Addr().String(), secure, plain
}

func inboundListener(permissive, continueOnTimeout bool, timeout time.Duration) *config.Listener {
	l := &config.Listener{Name: "public_listener", Address: "127.0.0.1:0"}
	if !permissive {
		l.FiltersTimeout = config.DefaultListenerFiltersTimeout
		l.Chains = []*config.FilterChain{{TLS: &config.DownstreamTLS{}, TCP: &config.TCPProxy{Cluster: "local_app"}}}
		return l
	}
	l.TLSInspector, l.FiltersTimeout, l.ContinueOnFiltersTimeout = true, timeout, continueOnTimeout
	l.Chains = []*config.FilterChain{
		{TransportProtocol: "tls", TLS: &config.DownstreamTLS{}, TCP: &config.TCPProxy{Cluster: "local_app"}},
		{TransportProtocol: "raw_buffer", TCP: &config.TCPProxy{Cluster: "local_app"}},
	}
	return l
}

func dialInbound(t *testing.T, addr string) net.Conn {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	return c
}

// TestInboundPermissiveSilentClientGetsPlaintextChain: the plaintext
// client of a server-first protocol sends nothing; after
// listener_filters_timeout it is handed to the plaintext chain (not closed,
// not kept waiting for HandshakeTimeout), and the server speaks first.
func TestInboundPermissiveSilentClientGetsPlaintextChain(t *testing.T) {
	const timeout = 50 * time.Millisecond
	addr, secure, plain := startInbound(t, inboundListener(true, true, timeout))
	start := time.Now()
	c := dialInbound(t, addr)
	up := plain.next(t, 2*time.Second, "plaintext")
	if waited := time.Since(start); waited < timeout || waited > timeout+time.Second {
		t.Errorf("handed to the plaintext chain after %v; want just over %v", waited, timeout)
	}
	// The server's greeting, then the client's answer, both ways intact.
	if _, err := io.WriteString(up, "220 greeting\r\n"); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 14)
	if _, err := io.ReadFull(c, buf); err != nil || string(buf) != "220 greeting\r\n" {
		t.Fatalf("client read %q, %v", buf, err)
	}
	if _, err := io.WriteString(c, "HELO"); err != nil {
		t.Fatal(err)
	}
	_ = up.SetReadDeadline(time.Now().Add(5 * time.Second))
	buf = buf[:4]
	if _, err := io.ReadFull(up, buf); err != nil || string(buf) != "HELO" {
		t.Fatalf("plaintext chain read %q, %v", buf, err)
	}
	secure.none(t, 0, "mTLS")
}

// TestInboundPermissiveClientFirstIsNotDelayed: plaintext and TLS clients
// that speak first are told apart by their first byte at once, whatever
// the timeout.
func TestInboundPermissiveClientFirstIsNotDelayed(t *testing.T) {
	const timeout = 5 * time.Second
	addr, secure, plain := startInbound(t, inboundListener(true, true, timeout))

	start := time.Now()
	c := dialInbound(t, addr)
	if _, err := io.WriteString(c, "PING\r\n"); err != nil {
		t.Fatal(err)
	}
	up := plain.next(t, time.Second, "plaintext")
	buf := make([]byte, 6)
	_ = up.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadFull(up, buf); err != nil || string(buf) != "PING\r\n" {
		t.Fatalf("plaintext chain read %q, %v (the first byte must be replayed)", buf, err)
	}
	if waited := time.Since(start); waited >= timeout/2 {
		t.Errorf("client-first plaintext waited %v", waited)
	}

	start = time.Now()
	raw := dialInbound(t, addr)
	tc := tls.Client(raw, &tls.Config{InsecureSkipVerify: true, MinVersion: tls.VersionTLS13})
	errc := make(chan error, 1)
	go func() { errc <- tc.Handshake() }()
	sc := secure.next(t, time.Second, "mTLS")
	if _, ok := sc.(*tls.Conn); !ok {
		t.Fatalf("mTLS chain got a %T", sc)
	}
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	if waited := time.Since(start); waited >= timeout/2 {
		t.Errorf("TLS client waited %v", waited)
	}
	plain.none(t, 0, "plaintext")
}

// TestInboundNoFallbackWithoutContinue: a silent client is never handed to
// the plaintext chain in strict mode (no plaintext chain), nor in
// permissive mode without continue_on_listener_filters_timeout, where it
// is closed at the timeout as Envoy does.
func TestInboundNoFallbackWithoutContinue(t *testing.T) {
	t.Run("strict", func(t *testing.T) {
		addr, secure, _ := startInbound(t, inboundListener(false, false, 0))
		c := dialInbound(t, addr)
		secure.none(t, 300*time.Millisecond, "mTLS")
		_ = c.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
		if n, err := c.Read(make([]byte, 1)); n != 0 || !isTimeout(err) {
			t.Fatalf("strict: silent client read %d, %v; want it still waiting (closed at HandshakeTimeout)", n, err)
		}
	})
	t.Run("permissive without continue", func(t *testing.T) {
		const timeout = 50 * time.Millisecond
		addr, secure, plain := startInbound(t, inboundListener(true, false, timeout))
		c := dialInbound(t, addr)
		start := time.Now()
		if n, err := c.Read(make([]byte, 1)); n != 0 || err == nil || isTimeout(err) {
			t.Fatalf("silent client read %d, %v; want the connection closed", n, err)
		}
		if waited := time.Since(start); waited > timeout+time.Second {
			t.Errorf("closed after %v; want about %v", waited, timeout)
		}
		secure.none(t, 0, "mTLS")
		plain.none(t, 0, "plaintext")
	})
}

func isTimeout(err error) bool {
	ne, ok := err.(net.Error)
	return ok && ne.Timeout()
}
