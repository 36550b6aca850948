// Package testutil holds helpers shared by meshlet's tests.
package testutil

import (
	"net/netip"
	"syscall"
	"testing"
)

// RefusedAddr returns a loopback TCP address ("127.0.0.1:port") that
// refuses connections (the peer answers RST: ECONNREFUSED) for the rest of
// the test: a socket bound to it without listening, closed at cleanup.
// Unlike a port taken from a listener and closed again, no other test
// process can be given that port meanwhile (go test runs packages in
// parallel), so the connection is refused, not answered by a stranger.
func RefusedAddr(tb testing.TB) string {
	tb.Helper()
	fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { syscall.Close(fd) })
	if err := syscall.Bind(fd, &syscall.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		tb.Fatal(err)
	}
	sa, err := syscall.Getsockname(fd)
	if err != nil {
		tb.Fatal(err)
	}
	in4, ok := sa.(*syscall.SockaddrInet4)
	if !ok {
		tb.Fatalf("getsockname: %T", sa)
	}
	return netip.AddrPortFrom(netip.AddrFrom4(in4.Addr), uint16(in4.Port)).String()
}

// RefusedPort is RefusedAddr's port.
func RefusedPort(tb testing.TB) int {
	tb.Helper()
	return int(netip.MustParseAddrPort(RefusedAddr(tb)).Port())
}
