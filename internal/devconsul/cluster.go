package devconsul

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/meshlet/meshlet/internal/devproc"
)

// ClusterOptions configure StartCluster.
type ClusterOptions struct {
	// Binary is the consul executable; FindBinary() when empty.
	Binary string
	// Servers is the number of server agents (Raft voters); 3 when 0.
	Servers int
	// Dir holds each agent's data directory and configuration; a new
	// temporary directory when empty (removed by Stop).
	Dir string
	// Log returns where the agent named name ("server-1".., "client")
	// writes its output; discarded when nil.
	Log func(name string) io.Writer
	// ReadyTimeout bounds the wait for a leader and the ACL bootstrap;
	// 60 s when 0.
	ReadyTimeout time.Duration
}

// Cluster is a production-shaped Consul datacenter on 127.0.0.1: Servers
// server agents (not -dev: Raft over their server ports, state in their
// data directories, so a restarted server comes back with it) and one
// client agent, which is what applications and the control plane talk to,
// as on every Consul node. ACLs are on (default deny) with
// ManagementToken on every agent; Connect is enabled. Raft's timing is
// performance.raft_multiplier 1 (Consul's production recommendation), so
// a new leader is elected within a few seconds of the old one's loss.
type Cluster struct {
	// Servers are the server agents, Client the client agent. Each Agent's
	// Client talks to it with the management token.
	Servers []*Agent
	Client  *Agent
	// ManagementToken is the datacenter's initial management token.
	ManagementToken string

	dir string
}

// StartCluster starts the servers and the client agent and waits until
// the client knows a leader and accepts the management token.
func StartCluster(ctx context.Context, o ClusterOptions) (_ *Cluster, err error) {
	if o.Binary == "" {
		if o.Binary, err = FindBinary(); err != nil {
			return nil, err
		}
	}
	if o.Servers == 0 {
		o.Servers = 3
	}
	if o.ReadyTimeout == 0 {
		o.ReadyTimeout = 60 * time.Second
	}
	c := &Cluster{ManagementToken: NewUUID(), dir: o.Dir}
	if c.dir == "" {
		if c.dir, err = os.MkdirTemp("", "devconsul-cluster-"); err != nil {
			return nil, fmt.Errorf("devconsul: %w", err)
		}
	}
	defer func() {
		if err != nil {
			c.Stop()
		}
	}()
	ports, err := FreePorts(4*o.Servers + 2)
	if err != nil {
		return nil, err
	}
	acl := filepath.Join(c.dir, "consul-acl.hcl")
	if err := os.MkdirAll(c.dir, 0o700); err != nil {
		return nil, fmt.Errorf("devconsul: %w", err)
	}
	if err := os.WriteFile(acl, []byte(ACLConfig(c.ManagementToken)+
		"performance { raft_multiplier = 1 }\nconnect { enabled = true }\ndisable_update_check = true\n"), 0o600); err != nil {
		return nil, fmt.Errorf("devconsul: %w", err)
	}
	// Agents join each other as they come up: retry every second, not
	// Consul's default 30 s, which the first server would wait for the
	// others.
	joins := []string{"-retry-interval", "1s"}
	for i := range o.Servers {
		joins = append(joins, "-retry-join", "127.0.0.1:"+strconv.Itoa(ports[4*i+1]))
	}
	logOf := func(name string) io.Writer {
		if o.Log == nil {
			return nil
		}
		return o.Log(name)
	}
	start := func(name string, http int, args ...string) (*Agent, error) {
		data := filepath.Join(c.dir, name)
		if err := os.MkdirAll(data, 0o700); err != nil {
			return nil, fmt.Errorf("devconsul: %w", err)
		}
		a := &Agent{HTTPAddr: "127.0.0.1:" + strconv.Itoa(http), ManagementToken: c.ManagementToken,
			serviceTokens: map[string]string{}, controlPlaneTokens: map[bool]string{}}
		a.spec = devproc.Spec{Name: "devconsul " + name, Path: o.Binary, Log: logOf(name), Args: append([]string{"agent",
			"-node", name, "-data-dir", data, "-bind", "127.0.0.1", "-client", "127.0.0.1", "-http-port", strconv.Itoa(http),
			"-grpc-port", "-1", "-grpc-tls-port", "-1", "-dns-port", "-1", "-config-file", acl, "-log-level", "warn"}, args...)}
		if a.proc, err = devproc.Start(a.spec); err != nil {
			return nil, err
		}
		if a.Client, err = a.NewClient(c.ManagementToken); err != nil {
			a.Kill()
			return nil, err
		}
		return a, nil
	}
	for i := range o.Servers {
		p := ports[4*i:]
		a, err := start(fmt.Sprintf("server-%d", i+1), p[0], append([]string{"-server", "-bootstrap-expect", strconv.Itoa(o.Servers),
			"-serf-lan-port", strconv.Itoa(p[1]), "-serf-wan-port", strconv.Itoa(p[2]), "-server-port", strconv.Itoa(p[3])}, joins...)...)
		if err != nil {
			return nil, err
		}
		c.Servers = append(c.Servers, a)
	}
	p := ports[4*o.Servers:]
	if c.Client, err = start("client", p[0], append([]string{"-serf-lan-port", strconv.Itoa(p[1])}, joins...)...); err != nil {
		return nil, err
	}
	for _, a := range append([]*Agent{c.Client}, c.Servers...) {
		if err := a.waitReady(ctx, o.ReadyTimeout); err != nil {
			return nil, err
		}
	}
	return c, nil
}

// Leader returns the index in Servers of the current Raft leader, as the
// client agent sees it (/v1/status/leader).
func (c *Cluster) Leader() (int, error) {
	addr, err := c.Client.Client.Status().Leader()
	if err != nil {
		return -1, fmt.Errorf("devconsul: leader: %w", err)
	}
	for i, s := range c.Servers {
		if port := s.serverPort(); port != "" && strings.HasSuffix(addr, ":"+port) {
			return i, nil
		}
	}
	return -1, fmt.Errorf("devconsul: no leader (the client agent says %q)", addr)
}

// Stop stops every agent and removes the cluster's directory when
// StartCluster made it.
func (c *Cluster) Stop() {
	for _, a := range append([]*Agent{c.Client}, c.Servers...) {
		if a != nil {
			a.Stop()
		}
	}
	if c.dir != "" && strings.Contains(filepath.Base(c.dir), "devconsul-cluster-") {
		_ = os.RemoveAll(c.dir)
	}
}

// StartClusterForTest starts a cluster for t (each agent's log in a file
// printed when t fails) and stops it at cleanup; under -short the test is
// skipped first.
func StartClusterForTest(t testing.TB, o ClusterOptions) *Cluster {
	t.Helper()
	if testing.Short() {
		t.Skip("-short: starts a real Consul cluster (make test runs it)")
	}
	logs := map[string]io.Writer{}
	for _, n := range []string{"client", "server-1", "server-2", "server-3", "server-4", "server-5"} {
		logs[n] = devproc.TestLog(t, "consul-"+n+".log")
	}
	o.Log = func(name string) io.Writer { return logs[name] }
	if o.Dir == "" {
		o.Dir = t.TempDir()
	}
	c, err := StartCluster(context.Background(), o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Stop)
	return c
}

// serverPort is the agent's -server-port, "" for a client agent.
func (a *Agent) serverPort() string {
	for i, arg := range a.spec.Args {
		if arg == "-server-port" && i+1 < len(a.spec.Args) {
			return a.spec.Args[i+1]
		}
	}
	return ""
}

// Restart kills the agent (SIGKILL, as a crash) and starts it again with
// the same command line (ports, data directory), waiting until it knows a
// leader and the management token, at most timeout. Only agents of a
// Cluster can restart: a -dev agent keeps its state in memory.
func (a *Agent) Restart(ctx context.Context, timeout time.Duration) error {
	if a.spec.Path == "" {
		return errors.New("devconsul: only a Cluster's agents restart (a -dev agent's state is in memory)")
	}
	a.proc.Kill()
	p, err := devproc.Start(a.spec)
	if err != nil {
		return err
	}
	a.proc = p
	return a.waitReady(ctx, timeout)
}

// Freeze stops the agent's processes (SIGSTOP): its sockets stay open and
// nothing answers, as under a long GC pause or a hung host. Thaw resumes
// them (SIGCONT).
func (a *Agent) Freeze() error { return syscall.Kill(-a.proc.PID(), syscall.SIGSTOP) }

// Thaw resumes an agent stopped by Freeze.
func (a *Agent) Thaw() error { return syscall.Kill(-a.proc.PID(), syscall.SIGCONT) }
