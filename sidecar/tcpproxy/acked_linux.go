//go:build linux

package tcpproxy

import (
	"crypto/tls"
	"net"
	"syscall"

	"golang.org/x/sys/unix"
)

// tcpBytes returns, over the connection's life, how many bytes c's peer
// has acknowledged (TCP_INFO tcpi_bytes_acked, Linux 4.1+: it grows while
// bytes are delivered, however full the send buffer stays) plus how many c
// has received (tcpi_bytes_received: it grows as bytes arrive, whether or
// not the proxy has read them yet). false when c is not a TCP socket
// (directly, through crypto/tls or an Unwrap chain) or the kernel does not
// say.
func tcpBytes(c net.Conn) (uint64, bool) {
	for {
		switch x := c.(type) {
		case *tls.Conn:
			c = x.NetConn()
			continue
		case interface{ Unwrap() net.Conn }:
			c = x.Unwrap()
			continue
		}
		break
	}
	sc, ok := c.(syscall.Conn)
	if !ok {
		return 0, false
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return 0, false
	}
	var info *unix.TCPInfo
	var ierr error
	if err := rc.Control(func(fd uintptr) { info, ierr = unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO) }); err != nil || ierr != nil {
		return 0, false
	}
	return info.Bytes_acked + info.Bytes_received, true
}
