package intercept

import (
	"errors"
	"net"
	"testing"
)

// TestOriginalDstOfAConnectionNotRedirected: without a REDIRECT rule the
// kernel knows no original destination (no conntrack NAT entry) or answers
// the local address; either way no other address comes back. The
// redirected case is tested in network namespaces with real iptables rules
// (intercept's rule tests).
func TestOriginalDstOfAConnectionNotRedirected(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	s, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	dst, err := OriginalDst(s.(*net.TCPConn))
	if err != nil {
		if !errors.Is(err, ErrNoOriginalDst) {
			t.Fatalf("error %v does not wrap ErrNoOriginalDst", err)
		}
		return
	}
	if dst.String() != ln.Addr().String() {
		t.Errorf("original destination %v of a connection to %v that was not redirected", dst, ln.Addr())
	}
}
