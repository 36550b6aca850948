package tcpproxy

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"io"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/meshlet/meshlet/internal/testutil"
	"github.com/meshlet/meshlet/sidecar/cluster"
	"github.com/meshlet/meshlet/sidecar/config"
)

// idlePiped is one connection through PipeIdle: a's and b's far ends, as
// the downstream client and the upstream see them.
type idlePiped struct {
	a, b     net.Conn
	bNear    net.Conn // the proxy's end facing b
	done     chan struct{}
	timedOut atomic.Bool
	took     time.Duration // from the start of PipeIdle to its return
}

// newIdlePiped pipes two loopback connections with PipeIdle(idle); with
// tlsSide the b side is TLS (the peer sidecar), else both are plain TCP
// (spliced).
func newIdlePiped(t *testing.T, idle time.Duration, tlsSide bool) *idlePiped {
	t.Helper()
	return newIdlePipedMSS(t, idle, tlsSide, 0)
}

// newIdlePipedMSS is newIdlePiped whose connections carry segments of at
// most mss bytes (TCP_MAXSEG), as on Ethernet (1448) rather than loopback
// (64 KiB), with 32 KiB socket buffers (the far ends' receive buffers, the
// proxy's send buffers) set before they connect, when mss is not 0.
func newIdlePipedMSS(t *testing.T, idle time.Duration, tlsSide bool, mss int) *idlePiped {
	t.Helper()
	ln, cfg := tlsSetup(t)
	dial := net.Dial
	if mss > 0 {
		setopts := func(opts ...[2]int) func(_, _ string, rc syscall.RawConn) error {
			return func(_, _ string, rc syscall.RawConn) error {
				var serr error
				if err := rc.Control(func(fd uintptr) {
					for _, o := range opts {
						level := syscall.SOL_SOCKET
						if o[0] == syscall.TCP_MAXSEG {
							level = syscall.IPPROTO_TCP
						}
						if err := syscall.SetsockoptInt(int(fd), level, o[0], o[1]); err != nil && serr == nil {
							serr = err
						}
					}
				}); err != nil {
					return err
				}
				return serr
			}
		}
		lc := net.ListenConfig{Control: setopts([2]int{syscall.TCP_MAXSEG, mss}, [2]int{syscall.SO_SNDBUF, 32 << 10})}
		d := net.Dialer{Control: setopts([2]int{syscall.TCP_MAXSEG, mss}, [2]int{syscall.SO_RCVBUF, 8 << 10})}
		dial = d.Dial
		var err error
		if ln, err = lc.Listen(context.Background(), "tcp", "127.0.0.1:0"); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { ln.Close() })
	}
	pair := func() (far, near net.Conn) {
		far, err := dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		near, err = ln.Accept()
		if err != nil {
			t.Fatal(err)
		}
		return far, near
	}
	aFar, aNear := pair()
	bFar, bNear := pair()
	if tlsSide {
		peer := tls.Server(bFar, cfg)
		proxy := tls.Client(bNear, &tls.Config{InsecureSkipVerify: true, MinVersion: tls.VersionTLS13})
		errc := make(chan error, 1)
		go func() { errc <- peer.Handshake() }()
		if err := proxy.Handshake(); err != nil {
			t.Fatal(err)
		}
		if err := <-errc; err != nil {
			t.Fatal(err)
		}
		bFar, bNear = peer, proxy
	}
	p := &idlePiped{a: aFar, b: bFar, bNear: bNear, done: make(chan struct{})}
	start := time.Now()
	go func() {
		defer close(p.done)
		p.timedOut.Store(PipeIdle(aNear, bNear, idle))
		p.took = time.Since(start)
		aNear.Close()
		bNear.Close()
	}()
	t.Cleanup(func() {
		aFar.Close()
		bFar.Close()
		<-p.done
	})
	return p
}

// closedWithin waits for c's peer to close c (EOF or reset), up to d.
func closedWithin(c net.Conn, d time.Duration) error {
	_ = c.SetReadDeadline(time.Now().Add(d))
	_, err := io.Copy(io.Discard, c)
	if errors.Is(err, net.ErrClosed) || err == nil {
		return nil
	}
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return err
	}
	return nil // a reset is a close too
}

func sides(t *testing.T, test func(t *testing.T, tlsSide bool)) {
	for _, tc := range []struct {
		name    string
		tlsSide bool
	}{{"plain to plain (spliced)", false}, {"plain to TLS", true}} {
		t.Run(tc.name, func(t *testing.T) { test(t, tc.tlsSide) })
	}
}

// TestPipeIdleClosesAnIdleConnection: nothing either way for the idle
// timeout closes both sides, between the timeout and the timeout plus one
// slice (an eighth) after the last byte.
func TestPipeIdleClosesAnIdleConnection(t *testing.T) {
	sides(t, func(t *testing.T, tlsSide bool) {
		const idle = 400 * time.Millisecond
		p := newIdlePiped(t, idle, tlsSide)
		// One exchange, then silence.
		if _, err := p.a.Write([]byte("ping")); err != nil {
			t.Fatal(err)
		}
		b := make([]byte, 4)
		_ = p.b.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := io.ReadFull(p.b, b); err != nil {
			t.Fatal(err)
		}
		last := time.Now()
		if err := closedWithin(p.a, 5*time.Second); err != nil {
			t.Fatalf("downstream not closed: %v", err)
		}
		after := time.Since(last)
		if err := closedWithin(p.b, 5*time.Second); err != nil {
			t.Fatalf("upstream not closed: %v", err)
		}
		<-p.done
		if !p.timedOut.Load() {
			t.Error("PipeIdle did not report its idle timeout")
		}
		if after < idle-20*time.Millisecond || after > idle+idleSlice(idle)+300*time.Millisecond {
			t.Errorf("closed %v after the last byte; want between %v and %v (+ scheduling slack)", after, idle, idle+idleSlice(idle))
		}
		t.Logf("closed %v after the last byte (idle %v)", after.Round(time.Millisecond), idle)
	})
}

// TestPipeIdleKeepsActiveConnections: a connection that moves bytes more
// often than the timeout lives on for many timeouts, whichever direction
// moves them (the other one silent, or half-closed), and every byte
// arrives; once silent it is closed.
func TestPipeIdleKeepsActiveConnections(t *testing.T) {
	const idle = 250 * time.Millisecond
	for _, tc := range []struct {
		name      string
		halfClose bool // a half-closes first; b keeps sending
		fromB     bool
	}{
		{name: "downstream sends, upstream silent"},
		{name: "upstream sends, downstream silent", fromB: true},
		{name: "downstream half-closed, upstream sends", fromB: true, halfClose: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			sides(t, func(t *testing.T, tlsSide bool) {
				p := newIdlePiped(t, idle, tlsSide)
				src, dst := p.a, p.b
				if tc.fromB {
					src, dst = p.b, p.a
				}
				if tc.halfClose {
					if err := p.a.(*net.TCPConn).CloseWrite(); err != nil {
						t.Fatal(err)
					}
					_ = p.b.SetReadDeadline(time.Now().Add(5 * time.Second))
					if _, err := io.Copy(io.Discard, p.b); err != nil {
						t.Fatalf("upstream did not see the half-close: %v", err)
					}
				}
				var sent bytes.Buffer
				got := make(chan []byte, 1)
				go func() {
					_ = dst.SetReadDeadline(time.Now().Add(20 * time.Second))
					var b bytes.Buffer
					_, _ = io.Copy(&b, dst)
					got <- b.Bytes()
				}()
				// 5 × the timeout, a chunk every fifth of it.
				start := time.Now()
				for time.Since(start) < 5*idle {
					chunk := randomData(t, 1+len(sent.Bytes())%3000)
					if _, err := src.Write(chunk); err != nil {
						t.Fatalf("write after %v: %v (closed while active)", time.Since(start), err)
					}
					sent.Write(chunk)
					time.Sleep(idle / 5)
				}
				select {
				case <-p.done:
					t.Fatalf("PipeIdle returned while the connection was active (timed out: %v)", p.timedOut.Load())
				default:
				}
				// Now silent: closed within the timeout and a slice, with
				// everything sent delivered.
				silent := time.Now()
				select {
				case <-p.done:
				case <-time.After(5 * time.Second):
					t.Fatal("not closed 5s after going silent")
				}
				if d := time.Since(silent); d > idle+idleSlice(idle)+300*time.Millisecond {
					t.Errorf("closed %v after going silent; want at most %v + slack", d, idle+idleSlice(idle))
				}
				if !p.timedOut.Load() {
					t.Error("PipeIdle did not report its idle timeout")
				}
				if b := <-got; !bytes.Equal(b, sent.Bytes()) {
					t.Errorf("received %d bytes, sent %d (equal: false)", len(b), sent.Len())
				}
			})
		})
	}
}

// TestPipeIdleBulkTransferIntact: a large transfer that spans many
// deadline slices (the reads are interrupted and resumed, spliced or
// through crypto/tls) arrives intact both ways.
func TestPipeIdleBulkTransferIntact(t *testing.T) {
	sides(t, func(t *testing.T, tlsSide bool) {
		// Slices of 25 ms: the transfer, paced over about half a second,
		// has its reads cut by deadlines a few dozen times each way.
		// The data first: making 16 MiB (slow under -race) after the pipe
		// started would idle it out before the first byte.
		up, down := randomData(t, 8<<20), randomData(t, 8<<20)
		p := newIdlePiped(t, 200*time.Millisecond, tlsSide)
		var wg sync.WaitGroup
		var gotA, gotB []byte
		var errA, errB error
		wg.Add(4)
		go func() { defer wg.Done(); writeSlowly(p.a, up) }()
		go func() { defer wg.Done(); writeSlowly(p.b, down) }()
		go func() { defer wg.Done(); gotB, errB = readN(p.b, len(up)) }()
		go func() { defer wg.Done(); gotA, errA = readN(p.a, len(down)) }()
		wg.Wait()
		if errB != nil || !bytes.Equal(gotB, up) {
			t.Errorf("upstream got %d bytes (%v), want the %d sent intact (timed out %v)", len(gotB), errB, len(up), p.timedOut.Load())
		}
		if errA != nil || !bytes.Equal(gotA, down) {
			t.Errorf("downstream got %d bytes (%v), want the %d sent intact", len(gotA), errA, len(down))
		}
	})
}

// writeSlowly writes b in 64 KiB chunks with a short pause between them.
func writeSlowly(c net.Conn, b []byte) {
	for len(b) > 0 {
		n := min(len(b), 64<<10)
		if _, err := c.Write(b[:n]); err != nil {
			return
		}
		b = b[n:]
		time.Sleep(3 * time.Millisecond)
	}
}

// readN reads n bytes from c, or fewer and the error.
func readN(c net.Conn, n int) ([]byte, error) {
	_ = c.SetReadDeadline(time.Now().Add(30 * time.Second))
	b := make([]byte, n)
	k, err := io.ReadFull(c, b)
	return b[:k], err
}

func TestIdleSlice(t *testing.T) {
	for _, tc := range []struct{ idle, want time.Duration }{
		{time.Hour, maxIdleSlice},
		{40 * time.Second, 5 * time.Second},
		{400 * time.Millisecond, 50 * time.Millisecond},
		{time.Millisecond, time.Millisecond},
	} {
		if got := idleSlice(tc.idle); got != tc.want {
			t.Errorf("idleSlice(%v) = %v, want %v", tc.idle, got, tc.want)
		}
	}
}

type countingRecorder struct{ idle, conns atomic.Int64 }

func (r *countingRecorder) AuthzDenied(string, string)      {}
func (r *countingRecorder) Connections(_ string, delta int) { r.conns.Add(int64(delta)) }
func (r *countingRecorder) IdleTimeout(string)              { r.idle.Add(1) }
func (r *countingRecorder) wait(t *testing.T, f func() bool) {
	t.Helper()
	testutil.Until(t, 5*time.Second, "the recorder's counts", f)
}

// TestProxyIdleTimeout: the proxy applies its chain's idle timeout, counts
// the close, and leaves a connection without one alone (idle_timeout 0).
func TestProxyIdleTimeout(t *testing.T) {
	up := listen(t, func(c net.Conn) { _, _ = io.Copy(c, c) }) // echo
	run := func(idle time.Duration) (string, *countingRecorder) {
		clusters := cluster.NewManager(nil, nil, nil)
		t.Cleanup(clusters.Close)
		clusters.Update(map[string]*config.Cluster{"u": {Name: "u", Type: config.ClusterStatic, ConnectTimeout: time.Second,
			Static: &config.LoadAssignment{Endpoints: []config.Endpoint{{Address: up, Weight: 1}}}}}, nil)
		rec := &countingRecorder{}
		p := New(&config.Listener{Name: "l", Chains: []*config.FilterChain{{TCP: &config.TCPProxy{Cluster: "u", MaxConnectAttempts: 1, IdleTimeout: idle}}}},
			false, clusters, slog.New(slog.NewTextHandler(io.Discard, nil)), rec)
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				p.Handle(c)
			}
		}()
		t.Cleanup(func() {
			ln.Close()
			ctx, cancel := context.WithTimeout(context.Background(), time.Second)
			defer cancel()
			p.Shutdown(ctx)
		})
		return ln.Addr().String(), rec
	}
	echo := func(t *testing.T, c net.Conn) {
		t.Helper()
		_ = c.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := c.Write([]byte("hi")); err != nil {
			t.Fatal(err)
		}
		b := make([]byte, 2)
		if _, err := io.ReadFull(c, b); err != nil || string(b) != "hi" {
			t.Fatalf("echo: %q, %v", b, err)
		}
	}

	t.Run("idle timeout closes and counts", func(t *testing.T) {
		addr, rec := run(200 * time.Millisecond)
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		echo(t, c)
		if err := closedWithin(c, 3*time.Second); err != nil {
			t.Fatalf("not closed after the idle timeout: %v", err)
		}
		rec.wait(t, func() bool { return rec.idle.Load() == 1 && rec.conns.Load() == 0 })
	})
	t.Run("zero disables it", func(t *testing.T) {
		addr, rec := run(0)
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		echo(t, c)
		time.Sleep(300 * time.Millisecond)
		echo(t, c) // still open
		if rec.idle.Load() != 0 {
			t.Errorf("%d idle timeouts counted, want 0", rec.idle.Load())
		}
	})
}

// TestPipeIdleSlowReaderIsNotIdle: bytes draining to a slow reader count as
// activity (Envoy's idle timeout counts bytes sent), even while the
// direction feeding it waits in one write for longer than the idle timeout
// and the other direction is silent; a reader that stops reading
// altogether idles out.
func TestPipeIdleSlowReaderIsNotIdle(t *testing.T) {
	sides(t, func(t *testing.T, tlsSide bool) {
		const idle = 300 * time.Millisecond
		// Ethernet-sized segments, a 32 KiB send buffer and an 8 KiB
		// receive buffer: the proxy's writes (16 KiB through TLS, all the
		// reader has sent when spliced) wait on the reader, whose window
		// reopens as it reads, as on a real network (a loopback's 64 KiB
		// segments make TCP wait for half the buffer to be free). The
		// receive buffer is small because the sender sees progress only
		// when the receiver advertises a reopened window, not as the
		// reader drains its buffer: with 32 KiB, the acknowledged count
		// stood still for 300 ms at a time on a loaded host while the
		// reader read steadily, and the timeout was right to fire.
		p := newIdlePipedMSS(t, idle, tlsSide, 1448)
		data := randomData(t, 256<<10)
		go func() { _, _ = p.a.Write(data) }()
		// The reader takes 8 KiB every 40 ms (200 KiB/s): bytes move all
		// the time, but one write of the proxy takes longer than the
		// timeout to drain.
		got := make([]byte, 0, len(data))
		buf := make([]byte, 8<<10)
		_ = p.b.SetReadDeadline(time.Now().Add(30 * time.Second))
		for len(got) < len(data) {
			time.Sleep(40 * time.Millisecond)
			n, err := p.b.Read(buf)
			got = append(got, buf[:n]...)
			if err != nil {
				t.Fatalf("after %d of %d bytes: %v (idle timeout fired: %v)", len(got), len(data), err, p.timedOut.Load())
			}
		}
		if !bytes.Equal(got, data) {
			t.Fatal("data differs")
		}
		// A reader that stops: nothing is delivered any more, the
		// connection idles out.
		go func() { _, _ = p.a.Write(randomData(t, 4<<20)) }()
		select {
		case <-p.done:
		case <-time.After(10 * time.Second):
			t.Fatal("a stalled reader kept the connection open")
		}
		if !p.timedOut.Load() {
			t.Error("not reported as an idle timeout")
		}
	})
}
