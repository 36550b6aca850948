package rawsock

import (
	"bytes"
	"crypto/rand"
	"errors"
	"io"
	"net"
	"os"
	"runtime"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/meshlet/meshlet/internal/testutil"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// pair returns a raw client connection and the server's end of it.
func pair(t *testing.T) (*Conn, net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			close(accepted)
			return
		}
		accepted <- c
	}()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	srv := <-accepted
	if srv == nil {
		t.Fatal("accept failed")
	}
	rc, ok := Wrap(c).(*Conn)
	if !ok {
		t.Fatal("Wrap of a *net.TCPConn is not a *Conn")
	}
	t.Cleanup(func() { rc.Close(); srv.Close() })
	return rc, srv
}

func TestWrapKeepsOtherConns(t *testing.T) {
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	if Wrap(a) != a {
		t.Error("Wrap of a pipe changed it")
	}
}

// TestReadWriteBothWays: 8 MiB each way through a reader slower than the
// writer (partial writes, EAGAIN, waiting for writability), intact; EOF
// after the peer closes.
func TestReadWriteBothWays(t *testing.T) {
	c, srv := pair(t)
	data := make([]byte, 8<<20)
	if _, err := rand.Read(data); err != nil {
		t.Fatal(err)
	}
	got := make(chan []byte, 1)
	go func() {
		var buf bytes.Buffer
		p := make([]byte, 1500) // small reads: the writer meets a full buffer
		for buf.Len() < len(data) {
			n, err := srv.Read(p)
			buf.Write(p[:n])
			if err != nil {
				break
			}
		}
		got <- buf.Bytes()
	}()
	if n, err := c.Write(data); err != nil || n != len(data) {
		t.Fatalf("Write = %d, %v", n, err)
	}
	if b := <-got; !bytes.Equal(b, data) {
		t.Fatalf("server got %d bytes, not the ones written", len(b))
	}
	go func() {
		_, _ = srv.Write(data)
		srv.Close()
	}()
	back, err := io.ReadAll(c)
	if err != nil || !bytes.Equal(back, data) {
		t.Fatalf("ReadAll = %d bytes, %v", len(back), err)
	}
	if n, err := c.Read(make([]byte, 10)); n != 0 || err != io.EOF {
		t.Errorf("Read after EOF = %d, %v; want 0, io.EOF", n, err)
	}
}

// TestDeadlinesAndClose: a read past its deadline fails with
// os.ErrDeadlineExceeded (a net.Error timeout) and the connection still
// works after the deadline is cleared; a read blocked when the connection
// is closed returns net.ErrClosed.
func TestDeadlinesAndClose(t *testing.T) {
	c, srv := pair(t)
	_ = c.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
	_, err := c.Read(make([]byte, 10))
	var ne net.Error
	if !errors.Is(err, os.ErrDeadlineExceeded) || !errors.As(err, &ne) || !ne.Timeout() {
		t.Fatalf("Read past its deadline: %v", err)
	}
	_ = c.SetReadDeadline(time.Time{})
	if _, err := srv.Write([]byte("hi")); err != nil {
		t.Fatal(err)
	}
	b := make([]byte, 2)
	if _, err := io.ReadFull(c, b); err != nil || string(b) != "hi" {
		t.Fatalf("after the deadline: %q, %v", b, err)
	}
	done := make(chan error, 1)
	go func() {
		_, err := c.Read(make([]byte, 10))
		done <- err
	}()
	testutil.Until(t, 5*time.Second, "the read to wait for data", readParked) // Close must end a read that waits
	c.Close()
	select {
	case err := <-done:
		if !errors.Is(err, net.ErrClosed) {
			t.Errorf("Read during Close: %v, want net.ErrClosed", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Close did not end a blocked Read")
	}
	if _, err := c.Write([]byte("x")); !errors.Is(err, net.ErrClosed) {
		t.Errorf("Write after Close: %v, want net.ErrClosed", err)
	}
}

// TestWriteToAResetPeer: writing to a peer that reset the connection
// fails with the socket's error (ECONNRESET or EPIPE), not silently.
func TestWriteToAResetPeer(t *testing.T) {
	c, srv := pair(t)
	_ = srv.(*net.TCPConn).SetLinger(0)
	srv.Close() // RST
	testutil.Eventually(t, 5*time.Second, "a write to the reset peer to fail", func() error {
		if _, err := c.Write(make([]byte, 64<<10)); err == nil {
			return errors.New("writes to a reset peer kept succeeding")
		}
		return nil
	})
}

// TestNoAllocationPerCall: Read and Write allocate nothing per call.
func TestNoAllocationPerCall(t *testing.T) {
	c, srv := pair(t)
	buf := make([]byte, 64)
	go func() { _, _ = io.Copy(srv, srv) }() // echo
	allocs := testing.AllocsPerRun(200, func() {
		if _, err := c.Write(buf); err != nil {
			t.Fatal(err)
		}
		if _, err := io.ReadFull(c, buf); err != nil {
			t.Fatal(err)
		}
	})
	if allocs != 0 {
		t.Errorf("%v allocations per write and read, want 0", allocs)
	}
}

// readParked reports whether a goroutine waits in (*Conn).Read for its
// socket to become readable (parked in the network poller).
func readParked() bool {
	buf := make([]byte, 1<<20)
	buf = buf[:runtime.Stack(buf, true)]
	for _, g := range strings.Split(string(buf), "\n\n") {
		if strings.Contains(g, "[IO wait") && strings.Contains(g, "rawsock.(*Conn).Read(") {
			return true
		}
	}
	return false
}
