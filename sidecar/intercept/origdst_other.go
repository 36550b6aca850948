//go:build !linux

package intercept

import (
	"net"
	"net/netip"
)

// OriginalDst is Linux-only (netfilter); elsewhere it returns
// ErrNoOriginalDst.
func OriginalDst(*net.TCPConn) (netip.AddrPort, error) { return netip.AddrPort{}, ErrNoOriginalDst }
