package tcpproxy

import (
	"bytes"
	"crypto/rand"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"runtime"
	"testing"
	"time"

	"github.com/meshlet/meshlet/internal/testca"
	"github.com/meshlet/meshlet/internal/testutil"
)

// tlsPiped is one connection through Pipe as a sidecar runs it: a plain
// TCP side (the app or the local client) and a TLS side (the peer sidecar).
type tlsPiped struct {
	plain net.Conn  // the app's end of the plain side
	peer  *tls.Conn // the peer's end of the TLS side
	done  chan struct{}
}

func newTLSPiped(t *testing.T, ln net.Listener, serverCfg *tls.Config) *tlsPiped {
	t.Helper()
	// plain side: app ↔ proxy
	app, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	proxyPlain, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	// TLS side: proxy (client) ↔ peer (server)
	peerRaw, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	proxyRaw, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	peer := tls.Server(peerRaw, serverCfg)
	proxyTLS := tls.Client(proxyRaw, &tls.Config{InsecureSkipVerify: true, MinVersion: tls.VersionTLS13})
	errc := make(chan error, 1)
	go func() { errc <- peer.Handshake() }()
	if err := proxyTLS.Handshake(); err != nil {
		t.Fatal(err)
	}
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	p := &tlsPiped{plain: app, peer: peer, done: make(chan struct{})}
	go func() {
		defer close(p.done)
		Pipe(proxyPlain, proxyTLS)
		proxyPlain.Close()
		proxyTLS.Close()
	}()
	t.Cleanup(func() {
		app.Close()
		peer.Close()
		<-p.done
	})
	return p
}

func tlsSetup(t *testing.T) (net.Listener, *tls.Config) {
	t.Helper()
	ca, err := testca.New("test.consul")
	if err != nil {
		t.Fatal(err)
	}
	leaf := ca.MustIssue("dc1", "peer")
	cert, err := tls.X509KeyPair([]byte(leaf.CertPEM), []byte(leaf.KeyPEM))
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	return ln, &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS13}
}

func randomData(t *testing.T, n int) []byte {
	t.Helper()
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return b
}

// TestPipeTLSHalfCloseBothWays: between a plain socket and TLS, a
// half-close crosses in either direction (FIN one side, close_notify the
// other) with all bytes before it, and the other direction stays open.
func TestPipeTLSHalfCloseBothWays(t *testing.T) {
	ln, cfg := tlsSetup(t)
	t.Run("plain side first", func(t *testing.T) {
		p := newTLSPiped(t, ln, cfg)
		_ = p.plain.SetDeadline(time.Now().Add(10 * time.Second))
		_ = p.peer.SetDeadline(time.Now().Add(10 * time.Second))
		req := randomData(t, 1<<20)
		go func() {
			_, _ = p.plain.Write(req)
			_ = p.plain.(*net.TCPConn).CloseWrite()
		}()
		got, err := io.ReadAll(p.peer)
		if err != nil || !bytes.Equal(got, req) {
			t.Fatalf("TLS peer read %d bytes, %v; want %d then EOF", len(got), err, len(req))
		}
		resp := randomData(t, 512<<10)
		go func() {
			_, _ = p.peer.Write(resp)
			_ = p.peer.CloseWrite()
		}()
		got, err = io.ReadAll(p.plain)
		if err != nil || !bytes.Equal(got, resp) {
			t.Fatalf("plain side read %d bytes after its half-close, %v; want %d then EOF", len(got), err, len(resp))
		}
		<-p.done
	})
	t.Run("TLS side first", func(t *testing.T) {
		p := newTLSPiped(t, ln, cfg)
		_ = p.plain.SetDeadline(time.Now().Add(10 * time.Second))
		_ = p.peer.SetDeadline(time.Now().Add(10 * time.Second))
		greeting := randomData(t, 1<<20)
		go func() {
			_, _ = p.peer.Write(greeting)
			_ = p.peer.CloseWrite()
		}()
		got, err := io.ReadAll(p.plain)
		if err != nil || !bytes.Equal(got, greeting) {
			t.Fatalf("plain side read %d bytes, %v; want %d then EOF", len(got), err, len(greeting))
		}
		reply := randomData(t, 512<<10)
		go func() {
			_, _ = p.plain.Write(reply)
			_ = p.plain.(*net.TCPConn).CloseWrite()
		}()
		got, err = io.ReadAll(p.peer)
		if err != nil || !bytes.Equal(got, reply) {
			t.Fatalf("TLS peer read %d bytes after its half-close, %v; want %d then EOF", len(got), err, len(reply))
		}
		<-p.done
	})
}

// TestPipeIdleConnectionsHoldLittleMemory: an idle connection between a
// plain socket and TLS holds no copy buffer on its plain side and one
// TLS-record buffer on its TLS side (it held two 32 KiB buffers before).
func TestPipeIdleConnectionsHoldLittleMemory(t *testing.T) {
	ln, cfg := tlsSetup(t)
	heap := func() uint64 {
		runtime.GC()
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		return ms.HeapInuse
	}
	const n = 200
	before := heap()
	for range n {
		p := newTLSPiped(t, ln, cfg)
		// One exchange each way, then idle.
		_ = p.plain.SetDeadline(time.Now().Add(10 * time.Second))
		_ = p.peer.SetDeadline(time.Now().Add(10 * time.Second))
		b := make([]byte, 4)
		if _, err := p.plain.Write([]byte("ping")); err != nil {
			t.Fatal(err)
		}
		if _, err := io.ReadFull(p.peer, b); err != nil {
			t.Fatal(err)
		}
		if _, err := p.peer.Write([]byte("pong")); err != nil {
			t.Fatal(err)
		}
		if _, err := io.ReadFull(p.plain, b); err != nil {
			t.Fatal(err)
		}
	}
	// The pipes go idle once their goroutines are back waiting to read
	// (returning what they borrowed for the exchange).
	per := testutil.Poll(t, 5*time.Second, "the piped connections to go idle holding under 48 KiB of heap each", func() (int64, error) {
		per := (int64(heap()) - int64(before)) / n
		if per > 48<<10 {
			return per, fmt.Errorf("an idle piped connection holds %d KiB of heap", per>>10)
		}
		return per, nil
	})
	// Both TLS ends and four sockets live in this process too.
	t.Logf("heap per idle piped connection (both TLS ends included): %d KiB", per>>10)
}
