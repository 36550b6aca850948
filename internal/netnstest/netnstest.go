// Package netnstest gives tests a network namespace of their own (`ip netns
// add`): a private loopback, addresses, routes and iptables rules that
// leave the host and parallel tests untouched. Sockets are opened inside it
// from an OS thread switched into the namespace (setns), the technique of
// github.com/vishvananda/netns: a socket stays in the namespace it was
// created in whichever thread uses it later, so listeners and connections
// made here work from any goroutine. Processes are started from such a
// thread and inherit the namespace.
//
// It needs root (CAP_SYS_ADMIN, CAP_NET_ADMIN) and the ip command
// (Debian package iproute2).
package netnstest

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
	"sync/atomic"
	"testing"

	"golang.org/x/sys/unix"
)

// Require fails t, naming the Debian package to install, when a command is
// not on PATH. pairs are command, package, command, package...
func Require(t testing.TB, pairs ...string) {
	t.Helper()
	for i := 0; i+1 < len(pairs); i += 2 {
		if _, err := exec.LookPath(pairs[i]); err != nil {
			t.Fatalf("netnstest: %s not found: install the Debian package %s", pairs[i], pairs[i+1])
		}
	}
}

// NS is a network namespace created for one test.
type NS struct {
	// Name is the namespace's name (ip netns; /run/netns/<Name>).
	Name string
	// Path is /run/netns/<Name>.
	Path string
}

var seq atomic.Int64

// New creates a namespace with lo up and deletes it when t ends. It fails
// t when not root or when ip (iproute2) is missing.
func New(t testing.TB) *NS {
	t.Helper()
	Require(t, "ip", "iproute2")
	if os.Geteuid() != 0 {
		t.Fatal("netnstest: network namespaces need root")
	}
	n := &NS{Name: fmt.Sprintf("meshlet-test-%d-%d", os.Getpid(), seq.Add(1))}
	n.Path = filepath.Join("/run/netns", n.Name)
	if out, err := exec.Command("ip", "netns", "add", n.Name).CombinedOutput(); err != nil {
		t.Fatalf("netnstest: ip netns add %s: %v: %s", n.Name, err, strings.TrimSpace(string(out)))
	}
	t.Cleanup(func() {
		if out, err := exec.Command("ip", "netns", "del", n.Name).CombinedOutput(); err != nil {
			t.Errorf("netnstest: ip netns del %s: %v: %s", n.Name, err, strings.TrimSpace(string(out)))
		}
	})
	n.Run(t, "ip", "link", "set", "lo", "up")
	return n
}

// Do runs fn on an OS thread switched into the namespace and returns its
// error. The thread is switched back before it is released; if that fails
// it stays locked and the Go runtime ends it with its goroutine.
func (n *NS) Do(fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := os.Open("/proc/thread-self/ns/net")
		if err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("netnstest: %w", err)
			return
		}
		defer orig.Close()
		target, err := os.Open(n.Path)
		if err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("netnstest: %w", err)
			return
		}
		defer target.Close()
		if err := unix.Setns(int(target.Fd()), unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("netnstest: setns %s: %w", n.Path, err)
			return
		}
		ferr := fn()
		if err := unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET); err != nil {
			errc <- errors.Join(ferr, fmt.Errorf("netnstest: setns back from %s: %w", n.Path, err))
			return // the thread stays locked and ends with this goroutine
		}
		runtime.UnlockOSThread()
		errc <- ferr
	}()
	return <-errc
}

// Run runs a command inside the namespace (ip, iptables...) and fails t,
// with its output, when it fails.
func (n *NS) Run(t testing.TB, name string, args ...string) {
	t.Helper()
	var out []byte
	err := n.Do(func() error {
		var err error
		out, err = exec.Command(name, args...).CombinedOutput()
		return err
	})
	if err != nil {
		t.Fatalf("netnstest: %s %s in %s: %v: %s", name, strings.Join(args, " "), n.Name, err, strings.TrimSpace(string(out)))
	}
}

// Start starts cmd inside the namespace: it is forked from a thread in the
// namespace. A cmd.SysProcAttr.Pdeathsig is tied to that thread, which
// lives as long as the process unless a goroutine exits while locked to it.
func (n *NS) Start(cmd *exec.Cmd) error {
	return n.Do(cmd.Start)
}

// Listen opens a listener inside the namespace.
func (n *NS) Listen(network, addr string) (net.Listener, error) {
	var l net.Listener
	err := n.Do(func() error {
		var err error
		l, err = net.Listen(network, addr)
		return err
	})
	return l, err
}

// DialContext connects to addr from inside the namespace: the connection
// goes through the namespace's routes and iptables OUTPUT rules.
func (n *NS) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	var c net.Conn
	err := n.Do(func() error {
		var d net.Dialer
		var err error
		c, err = d.DialContext(ctx, network, addr)
		return err
	})
	return c, err
}
