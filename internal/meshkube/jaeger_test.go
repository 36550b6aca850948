package meshkube

import (
	"bufio"
	"net"
	"testing"
	"time"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// TestForwarderRelaysAndCloses: bytes go both ways through the relay, a
// connection the target closes is closed to the client, and Close ends
// the relays of connections still open (no goroutine left behind).
func TestForwarderRelaysAndCloses(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() { // an echo server: one line back, then the connection stays open
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				r := bufio.NewReader(c)
				for {
					line, err := r.ReadString('\n')
					if err != nil {
						return
					}
					if _, err := c.Write([]byte("echo " + line)); err != nil {
						return
					}
				}
			}()
		}
	}()
	var d net.Dialer
	f, err := forward(ln.Addr().String(), d.DialContext)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name, send string
	}{
		{name: "first connection", send: "hello\n"},
		{name: "second connection", send: "again\n"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := net.Dial("tcp", f.Addr)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			_ = c.SetDeadline(time.Now().Add(5 * time.Second))
			if _, err := c.Write([]byte(tc.send)); err != nil {
				t.Fatal(err)
			}
			got, err := bufio.NewReader(c).ReadString('\n')
			if err != nil || got != "echo "+tc.send {
				t.Fatalf("got %q, %v; want %q", got, err, "echo "+tc.send)
			}
		})
	}
	// A connection left open: Close must end its relay.
	c, err := net.Dial("tcp", f.Addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Write([]byte("x\n")); err != nil {
		t.Fatal(err)
	}
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := bufio.NewReader(c).ReadString('\n'); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	if _, err := c.Read(make([]byte, 1)); err == nil {
		t.Error("the client's connection is still open after Close")
	}
	if _, err := net.DialTimeout("tcp", f.Addr, time.Second); err == nil {
		t.Error("still listening after Close")
	}
	ln.Close()
}
