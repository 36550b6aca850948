// Package devconsul starts and stops a real Consul agent in dev mode on free
// loopback ports, for tests and the demo. The binary is the one `make consul`
// builds into bin/ (Consul v1.19.2 from deploy/tools/consul).
package devconsul

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/meshlet/meshlet/internal/devproc"
	"github.com/meshlet/meshlet/internal/freeport"
)

// BinaryEnv names the environment variable that may point at the consul
// binary.
const BinaryEnv = "MESHLET_CONSUL_BIN"

// FindBinary returns the consul binary: $MESHLET_CONSUL_BIN, else bin/consul
// at the module root (found from the working directory upwards), else consul
// on PATH. The error says how to build it.
func FindBinary() (string, error) {
	if p := os.Getenv(BinaryEnv); p != "" {
		if _, err := os.Stat(p); err != nil {
			return "", fmt.Errorf("devconsul: %s=%s: %w", BinaryEnv, p, err)
		}
		return p, nil
	}
	if dir, err := os.Getwd(); err == nil {
		for d := dir; ; d = filepath.Dir(d) {
			if _, err := os.Stat(filepath.Join(d, "go.mod")); err == nil {
				p := filepath.Join(d, "bin", "consul")
				if _, err := os.Stat(p); err == nil {
					return p, nil
				}
				break
			}
			if filepath.Dir(d) == d {
				break
			}
		}
	}
	if p, err := exec.LookPath("consul"); err == nil {
		return p, nil
	}
	return "", errors.New("devconsul: consul binary not found: run `make consul` (builds Consul v1.19.2 into bin/) or set " + BinaryEnv)
}

// Options configure Start.
type Options struct {
	// Binary is the consul executable; FindBinary() when empty.
	Binary string
	// NodeName defaults to "meshlet-dev".
	NodeName string
	// Log receives the agent's output; discarded when nil.
	Log io.Writer
	// ReadyTimeout bounds the wait for a leader; 60 s when 0.
	ReadyTimeout time.Duration
	// HTTPPort fixes the HTTP API port (0 picks a free one), for tests that
	// point a client at an agent before it exists.
	HTTPPort int
	// Detached leaves the agent running when this process exits (no
	// PR_SET_PDEATHSIG), for `make demo KEEP=1`.
	Detached bool
	// Args are appended to the agent's command line, e.g.
	// {"-hcl", "limits { http_max_conns_per_client = 4096 }"}.
	Args []string
	// Netns, when set, runs the agent in that network namespace (a path
	// such as /run/netns/<name>, entered with nsenter), e.g. beside a
	// devkube cluster; Dial must then reach into it.
	Netns string
	// BindAddress is the agent's -bind and -client address; 127.0.0.1 when
	// empty (in a cluster's namespace, its node address, so pods reach it).
	BindAddress string
	// Dial, when set, is how the Agent's Client connects (a dialer inside
	// Netns).
	Dial func(ctx context.Context, network, addr string) (net.Conn, error)
}

// Agent is a running dev agent.
type Agent struct {
	// HTTPAddr is the agent's HTTP API address, "127.0.0.1:port" (or
	// Options.BindAddress).
	HTTPAddr string
	// Client talks to the agent.
	Client *api.Client

	proc *devproc.Process
}

// Start runs `consul agent -dev` bound to 127.0.0.1 with free HTTP, gRPC,
// Serf and server ports (DNS and gRPC-TLS off) and waits until it has
// elected itself leader. The agent runs in its own process group and dies
// with the parent process (PR_SET_PDEATHSIG). Stop it with Stop.
func Start(ctx context.Context, o Options) (*Agent, error) {
	if o.Binary == "" {
		b, err := FindBinary()
		if err != nil {
			return nil, err
		}
		o.Binary = b
	}
	if o.NodeName == "" {
		o.NodeName = "meshlet-dev"
	}
	if o.ReadyTimeout == 0 {
		o.ReadyTimeout = 60 * time.Second
	}
	var lastErr error
	for attempt := 0; attempt < 3; attempt++ { // a free port can be taken between probe and bind
		a, err := start(ctx, o)
		if err == nil {
			return a, nil
		}
		lastErr = err
		if ctx.Err() != nil {
			break
		}
	}
	return nil, lastErr
}

func start(ctx context.Context, o Options) (*Agent, error) {
	ports, err := FreePorts(5)
	if err != nil {
		return nil, err
	}
	if o.HTTPPort != 0 {
		ports[0] = o.HTTPPort
	}
	p := func(i int) string { return strconv.Itoa(ports[i]) }
	bind := cmp.Or(o.BindAddress, "127.0.0.1")
	spec := devproc.Spec{Name: "devconsul", Path: o.Binary, Log: o.Log, Detached: o.Detached, Args: append([]string{"agent", "-dev",
		"-bind", bind, "-client", bind, "-node", o.NodeName,
		"-http-port", p(0), "-grpc-port", p(1), "-grpc-tls-port", "-1",
		"-serf-lan-port", p(2), "-serf-wan-port", p(3), "-server-port", p(4),
		"-dns-port", "-1", "-log-level", "warn"}, o.Args...)}
	if o.Netns != "" {
		spec.Path, spec.Args = "nsenter", append([]string{"--net=" + o.Netns, "--", o.Binary}, spec.Args...)
	}
	proc, err := devproc.Start(spec)
	if err != nil {
		return nil, err
	}
	a := &Agent{HTTPAddr: net.JoinHostPort(bind, p(0)), proc: proc}
	cc := api.DefaultNonPooledConfig()
	cc.Address = a.HTTPAddr
	if o.Dial != nil {
		cc.Transport.DialContext = o.Dial
	}
	a.Client, err = api.NewClient(cc)
	if err != nil {
		a.Stop()
		return nil, err
	}
	if err := a.waitReady(ctx, o.ReadyTimeout); err != nil {
		a.Stop()
		return nil, err
	}
	return a, nil
}

// waitReady waits until the agent has a leader (polled every 100 ms), at
// most timeout.
func (a *Agent) waitReady(ctx context.Context, timeout time.Duration) error {
	return a.proc.WaitReady(ctx, timeout, 100*time.Millisecond, func(context.Context) error {
		leader, err := a.Client.Status().Leader()
		if err != nil {
			return fmt.Errorf("agent at %s: %w", a.HTTPAddr, err)
		}
		if leader == "" {
			return fmt.Errorf("agent at %s: no leader yet", a.HTTPAddr)
		}
		return nil
	})
}

// PID is the agent's process ID (its process group's too).
func (a *Agent) PID() int { return a.proc.PID() }

// Stop terminates the agent (SIGTERM, then SIGKILL to the process group
// after 10 s) and waits for it. It is idempotent; after Kill or Release it
// does nothing. The error is always nil.
func (a *Agent) Stop() error {
	a.proc.Stop()
	return nil
}

// Kill stops the agent at once (SIGKILL), as a crash would.
func (a *Agent) Kill() { a.proc.Kill() }

// Release forgets the agent without stopping it (after Start with
// Detached): it keeps running when this process exits.
func (a *Agent) Release() { a.proc.Release() }

// Pid returns the agent's process ID (PID's older name).
func (a *Agent) Pid() int { return a.proc.PID() }

// StartForTest starts an agent for t and stops it in t.Cleanup. A missing
// binary or a failed start fails the test (it is not skipped); under -short
// (make test-short) the test is skipped before anything starts. The agent's
// log is written to a file in t.TempDir() and printed when t fails.
func StartForTest(t testing.TB) *Agent {
	t.Helper()
	return StartForTestWith(t, Options{})
}

// StartForTestWith is StartForTest with options (Log is set by it).
func StartForTestWith(t testing.TB, o Options) *Agent {
	t.Helper()
	if testing.Short() {
		t.Skip("-short: starts a real Consul agent (make test runs it)")
	}
	o.Log = devproc.TestLog(t, "consul.log")
	a, err := Start(context.Background(), o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { a.Stop() })
	return a
}

// FreePorts returns n distinct ports free on 127.0.0.1 at the time of the
// call, outside the kernel's ephemeral range (see internal/freeport), so no
// socket bound to port 0 can take one before it is used.
func FreePorts(n int) ([]int, error) {
	p, err := freeport.Ports(n)
	if err != nil {
		return nil, fmt.Errorf("devconsul: %w", err)
	}
	return p, nil
}
