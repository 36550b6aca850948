package e2e

import (
	"bufio"
	"io"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/meshlet/meshlet/internal/testutil"
)

// TestTCPIdleTimeoutThroughSidecars: a TimeoutPolicy's idle for a tcp
// service is TcpProxy.idle_timeout at both sidecars. Through the pair (mTLS
// between the sidecars, Redis behind up's), a real client that stays silent
// (nc -d: connects, sends nothing) is disconnected about a second after it
// connected, while a real client that sends a PING every 300 ms keeps its
// connection for many times the timeout and gets every PONG; both sidecars
// count the idle closes.
func TestTCPIdleTimeoutThroughSidecars(t *testing.T) {
	nc := debTool(t, "nc.openbsd", "netcat-openbsd")
	port := startRedis(t)
	const idle = time.Second
	p := startPair(t, pairOptions{Protocol: "tcp", AppPort: port, Policies: []string{
		"apiVersion: meshlet.io/v1alpha1\nkind: TimeoutPolicy\nmetadata: {name: up-idle}\nspec:\n  service: up\n  idle: 1s\n",
	}})
	host, bindPort := "127.0.0.1", strconv.Itoa(portOf(t, p.Addr))

	// The active client: nc with a pipe as stdin, a PING every 300 ms.
	active := exec.Command(nc, "-N", host, bindPort)
	active.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	stdin, err := active.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := active.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := active.Start(); err != nil {
		t.Fatal(err)
	}
	activeDone := make(chan error, 1)
	pongs := make(chan string, 100)
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			pongs <- strings.TrimSpace(sc.Text())
		}
		close(pongs)
	}()
	go func() { activeDone <- active.Wait() }()
	t.Cleanup(func() {
		_ = active.Process.Kill()
		<-activeDone
	})

	// The idle client: nc -d reads nothing from stdin and exits when the
	// connection is closed.
	idleStart := time.Now()
	idleClient := exec.Command(nc, "-d", host, bindPort)
	idleClient.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	var idleOut procOutput
	idleClient.Stdout, idleClient.Stderr = &idleOut, &idleOut
	if err := idleClient.Start(); err != nil {
		t.Fatal(err)
	}
	idleDone := make(chan error, 1)
	go func() { idleDone <- idleClient.Wait() }()
	t.Cleanup(func() {
		_ = idleClient.Process.Kill()
	})

	sent := 0
	ticker := time.NewTicker(300 * time.Millisecond)
	defer ticker.Stop()
	var idleLived time.Duration
	for time.Since(idleStart) < 5*idle {
		select {
		case err := <-idleDone:
			if idleLived != 0 {
				t.Fatal("idle client exited twice")
			}
			idleLived = time.Since(idleStart)
			if err != nil {
				t.Errorf("idle nc -d: %v: %s", err, idleOut.String())
			}
			idleDone = nil
		case err := <-activeDone:
			t.Fatalf("the active client's connection ended after %v (%d PINGs sent): %v", time.Since(idleStart), sent, err)
		case <-ticker.C:
			if _, err := io.WriteString(stdin, "PING\r\n"); err != nil {
				t.Fatalf("PING %d: %v", sent+1, err)
			}
			sent++
			select {
			case got := <-pongs:
				if got != "+PONG" {
					t.Fatalf("PING %d answered %q", sent, got)
				}
			case <-time.After(2 * time.Second):
				t.Fatalf("PING %d not answered within 2s", sent)
			}
		}
	}
	if idleLived == 0 {
		t.Fatalf("the silent client was still connected after %v (idle timeout %v)", time.Since(idleStart), idle)
	}
	// Closed between the timeout and the timeout plus a slice (an eighth),
	// with slack for starting nc and the connection setup.
	if idleLived < idle || idleLived > idle+idle/8+700*time.Millisecond {
		t.Errorf("the silent client was disconnected after %v; want about %v", idleLived, idle)
	}
	t.Logf("silent nc -d disconnected after %v (idle timeout %v); active nc: %d PINGs over %v, all answered, still connected",
		idleLived.Round(time.Millisecond), idle, sent, time.Since(idleStart).Round(time.Millisecond))

	// Both sidecars counted the idle close; the active connection is not
	// among them.
	testutil.Until(t, 5*time.Second, "idle timeouts counted at both sidecars", func() bool {
		return p.Down.metric(t, "meshlet_sidecar_tcp_idle_timeouts_total", `listener="upstream:up"`) >= 1 ||
			p.Up.metric(t, "meshlet_sidecar_tcp_idle_timeouts_total", `listener="public_listener"`) >= 1
	})
	down := p.Down.metric(t, "meshlet_sidecar_tcp_idle_timeouts_total", `listener="upstream:up"`)
	up := p.Up.metric(t, "meshlet_sidecar_tcp_idle_timeouts_total", `listener="public_listener"`)
	if down+up < 1 || down > 1 || up > 1 {
		t.Errorf("idle timeouts counted: down's sidecar %v, up's %v; want the silent connection only (one each at most)", down, up)
	}
	if n := p.Down.metric(t, "meshlet_sidecar_downstream_connections_active", `listener="upstream:up"`); n != 1 {
		t.Errorf("down's sidecar has %v open connections, want 1 (the active client)", n)
	}

	// The active client ends cleanly: its half-close reaches Redis, which
	// closes, and nc exits.
	stdin.Close()
	select {
	case err := <-activeDone:
		if err != nil {
			t.Errorf("active nc -N: %v", err)
		}
		activeDone <- nil // for the cleanup
	case <-time.After(5 * time.Second):
		t.Error("the active client did not exit 5s after closing its input")
	}
}
