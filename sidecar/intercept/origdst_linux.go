//go:build linux

package intercept

import (
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// OriginalDst returns where a connection accepted from a REDIRECTed port was
// going (getsockopt SO_ORIGINAL_DST for IPv4, IP6T_SO_ORIGINAL_DST for
// IPv6, read inside the socket's RawConn: no file descriptor is
// duplicated). For a connection that was not redirected the kernel answers
// its local address; callers compare with LocalAddr to tell. Errors wrap
// ErrNoOriginalDst.
func OriginalDst(c *net.TCPConn) (netip.AddrPort, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("%w: %v", ErrNoOriginalDst, err)
	}
	local, _ := c.LocalAddr().(*net.TCPAddr)
	v6 := local != nil && local.IP.To4() == nil
	var out netip.AddrPort
	var serr error
	if err := rc.Control(func(fd uintptr) {
		if v6 {
			var sa unix.RawSockaddrInet6
			size := uint32(unsafe.Sizeof(sa))
			if _, _, e := syscall.Syscall6(syscall.SYS_GETSOCKOPT, fd, unix.SOL_IPV6, ip6tSoOriginalDst,
				uintptr(unsafe.Pointer(&sa)), uintptr(unsafe.Pointer(&size)), 0); e != 0 {
				serr = e
				return
			}
			port := binary.BigEndian.Uint16((*[2]byte)(unsafe.Pointer(&sa.Port))[:])
			out = netip.AddrPortFrom(netip.AddrFrom16(sa.Addr).Unmap(), port)
			return
		}
		var sa unix.RawSockaddrInet4
		size := uint32(unsafe.Sizeof(sa))
		if _, _, e := syscall.Syscall6(syscall.SYS_GETSOCKOPT, fd, unix.SOL_IP, unix.SO_ORIGINAL_DST,
			uintptr(unsafe.Pointer(&sa)), uintptr(unsafe.Pointer(&size)), 0); e != 0 {
			serr = e
			return
		}
		port := binary.BigEndian.Uint16((*[2]byte)(unsafe.Pointer(&sa.Port))[:])
		out = netip.AddrPortFrom(netip.AddrFrom4(sa.Addr), port)
	}); err != nil {
		return netip.AddrPort{}, fmt.Errorf("%w: %v", ErrNoOriginalDst, err)
	}
	if serr != nil {
		return netip.AddrPort{}, fmt.Errorf("%w: getsockopt: %v", ErrNoOriginalDst, serr)
	}
	return out, nil
}

// ip6tSoOriginalDst is IP6T_SO_ORIGINAL_DST (linux/netfilter_ipv6/ip6_tables.h),
// which golang.org/x/sys/unix does not define: 80 at level SOL_IPV6.
const ip6tSoOriginalDst = 80
