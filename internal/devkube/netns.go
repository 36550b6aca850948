package devkube

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"

	"golang.org/x/sys/unix"
)

// netnsDir is where `ip netns add` bind-mounts named network namespaces.
const netnsDir = "/run/netns"

// netnsPath returns /run/netns/<name>.
func netnsPath(name string) string { return filepath.Join(netnsDir, name) }

// createNetns makes the namespace <name> (ip netns add), brings up lo,
// creates BridgeName with NodeIP/24 (the node IP and the pods' gateway) and
// a route of ServiceCIDR through it, and
// enables IPv4 forwarding and bridge netfilter inside it (both per
// namespace; the host's settings are untouched).
func createNetns(ctx context.Context, name string) error {
	steps := [][]string{
		{"ip", "netns", "add", name},
		{"ip", "-n", name, "link", "set", "lo", "up"},
		{"ip", "-n", name, "link", "add", BridgeName, "type", "bridge"},
		{"ip", "-n", name, "addr", "add", NodeIP + "/24", "dev", BridgeName},
		{"ip", "-n", name, "link", "set", BridgeName, "up"},
		// A route to the ClusterIPs, so a connect() from the node (the
		// namespace) to one gets past routing to kube-proxy's OUTPUT DNAT
		// instead of failing with ENETUNREACH (the namespace has no
		// default route).
		{"ip", "-n", name, "route", "add", ServiceCIDR, "dev", BridgeName},
	}
	for _, s := range steps {
		if out, err := exec.CommandContext(ctx, s[0], s[1:]...).CombinedOutput(); err != nil {
			return fmt.Errorf("devkube: %s: %w: %s", strings.Join(s, " "), err, strings.TrimSpace(string(out)))
		}
	}
	return inNetns(netnsPath(name), func() error {
		for _, s := range []string{"net/ipv4/ip_forward", "net/bridge/bridge-nf-call-iptables"} {
			if err := os.WriteFile("/proc/sys/"+s, []byte("1"), 0o644); err != nil {
				return fmt.Errorf("devkube: sysctl %s in %s: %w", s, name, err)
			}
		}
		return nil
	})
}

// deleteNetns removes the namespace <name> if it exists (ip netns del).
func deleteNetns(name string) error {
	if _, err := os.Stat(netnsPath(name)); errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if out, err := exec.Command("ip", "netns", "del", name).CombinedOutput(); err != nil {
		return fmt.Errorf("devkube: ip netns del %s: %w: %s", name, err, strings.TrimSpace(string(out)))
	}
	return nil
}

// inNetns runs fn on an OS thread switched into the network namespace at
// path, the technique of github.com/vishvananda/netns: sockets fn creates
// belong to that namespace for their whole life, whichever thread later
// uses them. The thread is switched back before it is released; if that
// fails it stays locked and the Go runtime ends it with the goroutine.
func inNetns(path string, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := os.Open("/proc/thread-self/ns/net")
		if err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("devkube: netns: %w", err)
			return
		}
		defer orig.Close()
		target, err := os.Open(path)
		if err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("devkube: netns: %w", err)
			return
		}
		defer target.Close()
		if err := unix.Setns(int(target.Fd()), unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("devkube: setns %s: %w", path, err)
			return
		}
		ferr := fn()
		if err := unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET); err != nil {
			// Leave the thread locked: it is destroyed when this goroutine ends.
			errc <- errors.Join(ferr, fmt.Errorf("devkube: setns back from %s: %w", path, err))
			return
		}
		runtime.UnlockOSThread()
		errc <- ferr
	}()
	return <-errc
}

// DialContext connects to addr from inside the cluster's network namespace:
// 127.0.0.1 is the namespace's loopback (kube-apiserver on
// 127.0.0.1:16443, etcd, the kubelet), and ClusterIPs and pod IPs are
// reachable as from the node (kube-proxy's OUTPUT rules apply). The
// connection works from any goroutine. Errors are those of net.Dialer.
func (c *Cluster) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	var conn net.Conn
	err := inNetns(c.netns, func() error {
		var d net.Dialer
		var err error
		conn, err = d.DialContext(ctx, network, addr)
		return err
	})
	return conn, err
}

// Listen opens a listener inside the cluster's network namespace (e.g.
// "tcp", "10.244.0.1:0" for a server pods can reach at the node IP, or
// "127.0.0.1:0" for one the apiserver can call).
func (c *Cluster) Listen(network, addr string) (net.Listener, error) {
	var l net.Listener
	err := inNetns(c.netns, func() error {
		var err error
		l, err = net.Listen(network, addr)
		return err
	})
	return l, err
}

// DialInNetns connects to addr from inside the network namespace at path
// (e.g. /proc/<pid>/ns/net of a container's process, to reach what a pod
// serves on its loopback). Errors are those of opening the namespace and
// of net.Dialer.
func DialInNetns(ctx context.Context, path, network, addr string) (net.Conn, error) {
	var conn net.Conn
	err := inNetns(path, func() error {
		var d net.Dialer
		var err error
		conn, err = d.DialContext(ctx, network, addr)
		return err
	})
	return conn, err
}
