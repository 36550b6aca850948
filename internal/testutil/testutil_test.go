package testutil

import (
	"errors"
	"net"
	"syscall"
	"testing"
)

// TestRefusedAddr: connecting is refused, and the port cannot be bound by
// another listener while the test runs.
func TestRefusedAddr(t *testing.T) {
	addr := RefusedAddr(t)
	if _, err := net.Dial("tcp", addr); !errors.Is(err, syscall.ECONNREFUSED) {
		t.Errorf("dial %s: %v, want connection refused", addr, err)
	}
	if ln, err := net.Listen("tcp", addr); err == nil {
		ln.Close()
		t.Errorf("listen %s succeeded: the port is not held", addr)
	}
	if p := RefusedPort(t); p <= 0 || p > 65535 {
		t.Errorf("RefusedPort = %d", p)
	}
}
