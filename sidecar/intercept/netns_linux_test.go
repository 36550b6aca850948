//go:build linux

package intercept

import (
	"bufio"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/meshlet/meshlet/internal/testutil"
)

// The tests of this file's package that touch the kernel build a small
// world of two network namespaces joined by a veth pair: "pod" (where the
// rules go, 10.77.0.2 and fd00:77::2, default routes through the peer) and
// "peer" (10.77.0.1 and fd00:77::1, plus extraIP4 and extraIP6 outside the
// pod's subnets). Every test makes its own pair, so the same addresses
// serve all of them.
const (
	podIP4   = "10.77.0.2"
	peerIP4  = "10.77.0.1"
	podIP6   = "fd00:77::2"
	peerIP6  = "fd00:77::1"
	extraIP4 = "198.18.0.1" // RFC 2544 benchmarking space
	extraIP6 = "fd00:b::1"
)

// clientEnv, when set, turns the test binary into the test client
// (clientMain): an ordinary program that knows nothing of the mesh.
const clientEnv = "MESHLET_INTERCEPT_TEST_CLIENT"

func TestMain(m *testing.M) {
	if addr := os.Getenv(clientEnv); addr != "" {
		os.Exit(clientMain(addr))
	}
	code := m.Run()
	for _, d := range []string{clientBin.dir, sidecarBin.dir} {
		if d != "" {
			os.RemoveAll(d)
		}
	}
	os.Exit(code)
}

// clientMain connects to addr, prints the one line the server answers and
// returns 0; on failure it prints "error: ..." and returns 1.
func clientMain(addr string) int {
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		fmt.Println("error:", err)
		return 1
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		fmt.Println("error: read:", err)
		return 1
	}
	fmt.Print(line)
	return 0
}

// requireNetns fails the test (skips it with -short) unless it runs as
// root with the tools the namespace tests use, naming the Debian package
// of a missing one.
func requireNetns(t *testing.T) {
	t.Helper()
	if testing.Short() {
		t.Skip("network namespace test: skipped with -short")
	}
	if os.Geteuid() != 0 {
		t.Fatal("needs root (ip netns, iptables in network namespaces): run as root, or with -short")
	}
	for _, tool := range []struct{ bin, pkg string }{
		{"ip", "iproute2"},
		{"iptables-nft-restore", "iptables"}, {"iptables-nft-save", "iptables"},
		{"iptables-legacy", "iptables"}, {"iptables-legacy-restore", "iptables"}, {"iptables-legacy-save", "iptables"},
		{"ip6tables-nft-restore", "iptables"}, {"ip6tables-nft-save", "iptables"},
		{"ip6tables-legacy-save", "iptables"},
		{"setpriv", "util-linux"},
	} {
		if _, err := lookSbin(tool.bin); err != nil {
			t.Fatalf("%s not found in PATH, /usr/sbin or /sbin: install the Debian package %s", tool.bin, tool.pkg)
		}
	}
}

func lookSbin(name string) (string, error) {
	if p, err := exec.LookPath(name); err == nil {
		return p, nil
	}
	for _, d := range []string{"/usr/sbin", "/sbin"} {
		if _, err := os.Stat(filepath.Join(d, name)); err == nil {
			return filepath.Join(d, name), nil
		}
	}
	return "", exec.ErrNotFound
}

// topo is a pod namespace and its peer.
type topo struct {
	pod, peer string
}

// newTopo creates the two namespaces and the veth pair; they are deleted
// at cleanup (after the listeners opened in them are closed).
func newTopo(t *testing.T) *topo {
	t.Helper()
	requireNetns(t)
	suffix := strings.ToLower(rand.Text()[:8])
	tp := &topo{pod: "mi-" + suffix + "-pod", peer: "mi-" + suffix + "-peer"}
	for _, ns := range []string{tp.pod, tp.peer} {
		mustRun(t, "ip", "netns", "add", ns)
		t.Cleanup(func() {
			if out, err := exec.Command("ip", "netns", "del", ns).CombinedOutput(); err != nil {
				t.Errorf("ip netns del %s: %v: %s", ns, err, out)
			}
		})
	}
	pod, peer := tp.pod, tp.peer
	for _, s := range [][]string{
		{"-n", pod, "link", "set", "lo", "up"},
		{"-n", peer, "link", "set", "lo", "up"},
		{"-n", pod, "link", "add", "eth0", "type", "veth", "peer", "name", "peer0", "netns", peer},
		{"-n", pod, "addr", "add", podIP4 + "/24", "dev", "eth0"},
		{"-n", pod, "addr", "add", podIP6 + "/64", "dev", "eth0", "nodad"},
		{"-n", peer, "addr", "add", peerIP4 + "/24", "dev", "peer0"},
		{"-n", peer, "addr", "add", peerIP6 + "/64", "dev", "peer0", "nodad"},
		{"-n", peer, "addr", "add", extraIP4 + "/32", "dev", "peer0"},
		{"-n", peer, "addr", "add", extraIP6 + "/128", "dev", "peer0", "nodad"},
		{"-n", pod, "link", "set", "eth0", "up"},
		{"-n", peer, "link", "set", "peer0", "up"},
		{"-n", pod, "route", "add", "default", "via", peerIP4},
		{"-n", pod, "-6", "route", "add", "default", "via", peerIP6},
	} {
		mustRun(t, "ip", s...)
	}
	return tp
}

func mustRun(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v: %s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// intercept runs the real `sidecar intercept args...` in the pod
// namespace, without the KUBERNETES_* variables of the test's environment,
// and returns its stdout, stderr and exit code.
func (tp *topo) intercept(t *testing.T, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	cmd := exec.Command("ip", append([]string{"netns", "exec", tp.pod, sidecarBinary(t), "intercept"}, args...)...)
	for _, e := range os.Environ() {
		if !strings.HasPrefix(e, "KUBERNETES_") && !strings.HasPrefix(e, "MESHLET_") {
			cmd.Env = append(cmd.Env, e)
		}
	}
	var o, e strings.Builder
	cmd.Stdout, cmd.Stderr = &o, &e
	err := cmd.Run()
	var ee *exec.ExitError
	switch {
	case err == nil:
	case errors.As(err, &ee):
		code = ee.ExitCode()
	default:
		t.Fatalf("sidecar intercept: %v", err)
	}
	return o.String(), e.String(), code
}

// mustIntercept runs intercept and fails the test unless it exits 0.
func (tp *topo) mustIntercept(t *testing.T, args ...string) (stdout, stderr string) {
	t.Helper()
	o, e, code := tp.intercept(t, args...)
	if code != 0 {
		t.Fatalf("sidecar intercept %s: exit %d\nstdout:\n%s\nstderr:\n%s", strings.Join(args, " "), code, o, e)
	}
	return o, e
}

// save returns `iptables-save` of backend b and family f in namespace ns
// (one table, or all when table is empty) without its "#" lines and with
// the chains' counters zeroed (the legacy backend prints them; traffic,
// the self-check's included, moves them).
func save(t *testing.T, ns string, f Family, b Backend, table string) string {
	t.Helper()
	bin := "iptables-" + string(b) + "-save"
	if f == IPv6 {
		bin = "ip6tables-" + string(b) + "-save"
	}
	args := []string{"netns", "exec", ns, bin}
	if table != "" {
		args = append(args, "-t", table)
	}
	return regexp.MustCompile(`\[\d+:\d+\]`).ReplaceAllString(withoutComments(mustRun(t, "ip", args...)), "[0:0]")
}

// inNetns runs fn on an OS thread switched into namespace ns (the
// technique of github.com/vishvananda/netns): sockets fn opens stay in ns
// whichever thread uses them later. The thread is never handed back to the
// runtime: it ends with its goroutine.
func inNetns(t *testing.T, ns string, fn func() error) {
	t.Helper()
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // no Unlock: the thread exits with the goroutine
		f, err := os.Open("/run/netns/" + ns)
		if err != nil {
			errc <- err
			return
		}
		defer f.Close()
		if err := unix.Setns(int(f.Fd()), unix.CLONE_NEWNET); err != nil {
			errc <- fmt.Errorf("setns %s: %w", ns, err)
			return
		}
		errc <- fn()
	}()
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
}

// served records the lines a serve listener answered.
type served struct {
	mu    sync.Mutex
	lines []string // guarded by mu
}

// waitFor polls until line was answered, failing the test after 5 s.
func (s *served) waitFor(t *testing.T, line string) {
	t.Helper()
	testutil.Eventually(t, 5*time.Second, fmt.Sprintf("a connection answered %q", line), func() error {
		s.mu.Lock()
		defer s.mu.Unlock()
		if slices.Contains(s.lines, line) {
			return nil
		}
		return fmt.Errorf("answered: %q", s.lines)
	})
}

// serve listens on addr (network "tcp", "tcp4" or "tcp6") in namespace ns
// and answers every connection with one line, "<label> local=<local
// address>", plus " orig=<OriginalDst>" when orig is set, then closes it.
// The listener is closed, and its goroutine waited for, at cleanup.
func serve(t *testing.T, ns, label, network, addr string, orig bool) *served {
	t.Helper()
	rec := &served{}
	var ln net.Listener
	inNetns(t, ns, func() error {
		var err error
		ln, err = net.Listen(network, addr)
		return err
	})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			line := label + " local=" + c.LocalAddr().String()
			if orig {
				if dst, err := OriginalDst(c.(*net.TCPConn)); err != nil {
					line += " orig-error=" + err.Error()
				} else {
					line += " orig=" + dst.String()
				}
			}
			_, _ = io.WriteString(c, line+"\n")
			c.Close()
			rec.mu.Lock()
			rec.lines = append(rec.lines, line)
			rec.mu.Unlock()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		wg.Wait()
	})
	return rec
}

// dial connects to addr from namespace ns with the test client process,
// as uid when uid >= 0 (setpriv), else as root, and returns what it
// printed: the server's line, or "error: ...".
func dial(t *testing.T, ns string, uid int, addr string) string {
	t.Helper()
	args := []string{"netns", "exec", ns}
	if uid >= 0 {
		args = append(args, "setpriv", fmt.Sprintf("--reuid=%d", uid), fmt.Sprintf("--regid=%d", uid), "--clear-groups")
	}
	args = append(args, clientBinary(t))
	cmd := exec.Command("ip", args...)
	cmd.Env = append(os.Environ(), clientEnv+"="+addr)
	out, _ := cmd.CombinedOutput() // the output says what went wrong
	return strings.TrimSpace(string(out))
}

// clientBin is a copy of the test binary that any uid can run (go test's
// own is in a directory only root can read).
var clientBin struct {
	once sync.Once
	dir  string
	path string
	err  error
}

func clientBinary(t *testing.T) string {
	t.Helper()
	clientBin.once.Do(func() {
		exe, err := os.Executable()
		if err != nil {
			clientBin.err = err
			return
		}
		if clientBin.dir, err = os.MkdirTemp("", "meshlet-intercept-client-"); err != nil {
			clientBin.err = err
			return
		}
		if err = os.Chmod(clientBin.dir, 0o755); err != nil {
			clientBin.err = err
			return
		}
		b, err := os.ReadFile(exe)
		if err != nil {
			clientBin.err = err
			return
		}
		clientBin.path = filepath.Join(clientBin.dir, "client")
		clientBin.err = os.WriteFile(clientBin.path, b, 0o755)
	})
	if clientBin.err != nil {
		t.Fatal(clientBin.err)
	}
	return clientBin.path
}

// sidecarBin is the real sidecar command: $MESHLET_SIDECAR_BIN (make test
// sets it), else built once per test binary run.
var sidecarBin struct {
	once sync.Once
	dir  string
	path string
	err  error
}

func sidecarBinary(t *testing.T) string {
	t.Helper()
	if p := os.Getenv("MESHLET_SIDECAR_BIN"); p != "" {
		return p
	}
	sidecarBin.once.Do(func() {
		if sidecarBin.dir, sidecarBin.err = os.MkdirTemp("", "meshlet-intercept-sidecar-"); sidecarBin.err != nil {
			return
		}
		sidecarBin.path = filepath.Join(sidecarBin.dir, "sidecar")
		out, err := exec.Command("go", "build", "-o", sidecarBin.path, "github.com/meshlet/meshlet/sidecar/cmd/sidecar").CombinedOutput()
		if err != nil {
			sidecarBin.err = fmt.Errorf("go build sidecar: %v\n%s", err, out)
		}
	})
	if sidecarBin.err != nil {
		t.Fatal(sidecarBin.err)
	}
	return sidecarBin.path
}
