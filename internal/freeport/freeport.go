// Package freeport picks free loopback ports for tests, the demo and
// benchmarks, outside the kernel's ephemeral range, so that a port picked
// now and bound later cannot be taken meanwhile by a socket the kernel
// numbers itself (a client connection, or a server bound to port 0).
package freeport

import (
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
)

// Range bounds used when /proc/sys/net/ipv4/ip_local_port_range cannot be
// read: Linux's default ephemeral range starts at 32768.
const (
	defaultEphemeralLow = 32768
	// span is how many ports below the ephemeral range are used.
	span = 12000
)

var (
	mu     sync.Mutex       // guards picked
	picked = map[int]bool{} // ports handed out by this process
)

// Ports returns n distinct ports on 127.0.0.1 that are free for both TCP
// and UDP at the time of the call, drawn at random from the span just below
// the ephemeral port range (20768–32767 with Linux's defaults) and never
// handed out twice by one process. It returns an error when it cannot find
// enough after many attempts.
func Ports(n int) ([]int, error) {
	low := ephemeralLow() - span
	if low < 1024 {
		low = 1024
	}
	mu.Lock()
	defer mu.Unlock()
	out := make([]int, 0, n)
	for tries := 0; len(out) < n; tries++ {
		if tries > 200*n {
			return nil, fmt.Errorf("freeport: found %d of %d free ports in %d-%d", len(out), n, low, low+span-1)
		}
		p := low + rand.IntN(span)
		if picked[p] || !free(p) {
			continue
		}
		picked[p] = true
		out = append(out, p)
	}
	return out, nil
}

// free reports whether p can be bound on 127.0.0.1 for TCP and for UDP.
func free(p int) bool {
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(p))
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return false
	}
	l.Close()
	u, err := net.ListenPacket("udp", addr)
	if err != nil {
		return false
	}
	u.Close()
	return true
}

// ephemeralLow returns the first port of the kernel's ephemeral range.
func ephemeralLow() int {
	b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range")
	if err != nil {
		return defaultEphemeralLow
	}
	f := strings.Fields(string(b))
	if len(f) < 1 {
		return defaultEphemeralLow
	}
	n, err := strconv.Atoi(f[0])
	if err != nil || n <= 1024 {
		return defaultEphemeralLow
	}
	return n
}
