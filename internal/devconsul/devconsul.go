// Package devconsul starts and stops a real Consul agent in dev mode on free
// loopback ports, for tests and the demo. The binary is the one `make consul`
// builds into bin/ (Consul v1.19.2 from deploy/tools/consul).
//
// The agent runs with ACLs on and default deny, as production Consul does:
// its initial management token (Agent.ManagementToken, also its agent
// token) is in Agent.Client; ControlPlaneToken and ServiceToken make the
// least-privilege tokens of the control plane and of a service's sidecars.
// Options.DisableACL opts out. Options.TLS serves the HTTP API over HTTPS
// only, with a CA made for the agent (Agent.CAFile).
package devconsul

import (
	"cmp"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/meshlet/meshlet/controlplane/consul"
	"github.com/meshlet/meshlet/internal/devproc"
	"github.com/meshlet/meshlet/internal/freeport"
	"github.com/meshlet/meshlet/internal/testca"
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
	// HTTPPort fixes the HTTP API port (the HTTPS port with TLS; 0 picks a
	// free one), for tests that point a client at an agent before it
	// exists.
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
	// DisableACL starts the agent without ACLs: every request is allowed,
	// with or without a token. By default ACLs are on with default_policy
	// "deny" (see ACLConfig).
	DisableACL bool
	// ManagementToken is the secret ID (a UUID) of the agent's initial
	// management token, which is also its agent token; a random one when
	// empty. Set it to give a client the token before the agent exists.
	ManagementToken string
	// TLS serves the HTTP API over HTTPS only (the HTTPS port is the one
	// HTTPPort picks; the plain HTTP port is off), with a server
	// certificate for BindAddress, 127.0.0.1 and localhost signed by a CA
	// made for this agent (Agent.CAFile). gRPC, Serf and server RPC stay
	// as they are.
	TLS bool
	// Dir holds the files the agent is given: its ACL configuration (with
	// the management token; mode 0600) and, with TLS, the CA certificate
	// and the server's certificate and key. When empty, a new temporary
	// directory that Stop and Kill remove (Release leaves it); none
	// without ACLs and TLS.
	Dir string
}

// ACLConfig is the agent's ACL configuration (HCL) for the management
// token: ACLs on, default deny, tokens set through the API not persisted,
// and the management token as the agent's own token too, which the agent
// uses to register its node and keep its services and checks in sync
// (anti-entropy) in a default-deny datacenter.
func ACLConfig(managementToken string) string {
	return fmt.Sprintf(`acl {
  enabled                  = true
  default_policy           = "deny"
  enable_token_persistence = false
  tokens {
    initial_management = %q
    agent              = %q
  }
}
`, managementToken, managementToken)
}

// Names of the ACL policies ControlPlaneToken creates.
const (
	ControlPlanePolicy     = "meshlet-controlplane"
	KubeControlPlanePolicy = "meshlet-controlplane-kube"
)

// Agent is a running dev agent.
type Agent struct {
	// HTTPAddr is the agent's HTTP API address, "127.0.0.1:port" (or
	// Options.BindAddress); HTTPS with Options.TLS (see URL).
	HTTPAddr string
	// Client talks to the agent with ManagementToken (and, with TLS,
	// trusts CAFile).
	Client *api.Client
	// ManagementToken is the secret of the initial management token (every
	// permission), empty with Options.DisableACL.
	ManagementToken string
	// CAFile is the PEM file of the CA that signed the agent's HTTPS
	// certificate, empty without Options.TLS.
	CAFile string

	tls  bool
	dial func(ctx context.Context, network, addr string) (net.Conn, error)
	proc *devproc.Process
	// spec is how a Cluster's agent was started, for Restart; empty for
	// a -dev agent.
	spec devproc.Spec

	mu sync.Mutex // guards the token caches below
	// serviceTokens are ServiceToken's by service, controlPlaneTokens
	// ControlPlaneToken's by its kube argument.
	serviceTokens      map[string]string
	controlPlaneTokens map[bool]string
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

func start(ctx context.Context, o Options) (_ *Agent, err error) {
	ports, err := FreePorts(5)
	if err != nil {
		return nil, err
	}
	if o.HTTPPort != 0 {
		ports[0] = o.HTTPPort
	}
	p := func(i int) string { return strconv.Itoa(ports[i]) }
	bind := cmp.Or(o.BindAddress, "127.0.0.1")
	dir, removeDir := o.Dir, ""
	if dir == "" && (!o.DisableACL || o.TLS) {
		if dir, err = os.MkdirTemp("", "devconsul-"); err != nil {
			return nil, fmt.Errorf("devconsul: %w", err)
		}
		removeDir = dir
	}
	defer func() {
		if err != nil && removeDir != "" {
			os.RemoveAll(removeDir)
		}
	}()
	if dir != "" {
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return nil, fmt.Errorf("devconsul: %w", err)
		}
	}
	a := &Agent{HTTPAddr: net.JoinHostPort(bind, p(0)), tls: o.TLS, dial: o.Dial,
		serviceTokens: map[string]string{}, controlPlaneTokens: map[bool]string{}}
	args := []string{"agent", "-dev",
		"-bind", bind, "-client", bind, "-node", o.NodeName,
		"-grpc-port", p(1), "-grpc-tls-port", "-1",
		"-serf-lan-port", p(2), "-serf-wan-port", p(3), "-server-port", p(4),
		"-dns-port", "-1", "-log-level", "warn"}
	if o.TLS {
		args = append(args, "-http-port", "-1", "-https-port", p(0))
		cfg, err := writeTLS(dir, bind)
		if err != nil {
			return nil, err
		}
		a.CAFile = filepath.Join(dir, "consul-ca.pem")
		args = append(args, "-config-file", cfg)
	} else {
		args = append(args, "-http-port", p(0))
	}
	if !o.DisableACL {
		a.ManagementToken = o.ManagementToken
		if a.ManagementToken == "" {
			a.ManagementToken = NewUUID()
		}
		cfg := filepath.Join(dir, "consul-acl.hcl")
		if err := os.WriteFile(cfg, []byte(ACLConfig(a.ManagementToken)), 0o600); err != nil {
			return nil, fmt.Errorf("devconsul: %w", err)
		}
		args = append(args, "-config-file", cfg)
	}
	spec := devproc.Spec{Name: "devconsul", Path: o.Binary, Log: o.Log, Detached: o.Detached, DataDir: removeDir,
		Args: append(args, o.Args...)}
	if o.Netns != "" {
		spec.Path, spec.Args = "nsenter", append([]string{"--net=" + o.Netns, "--", o.Binary}, spec.Args...)
	}
	a.proc, err = devproc.Start(spec)
	if err != nil {
		return nil, err
	}
	removeDir = "" // the process's Stop removes it now
	a.Client, err = a.NewClient(a.ManagementToken)
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

// writeTLS writes into dir a CA (consul-ca.pem), a server certificate for
// bind, 127.0.0.1 and localhost signed by it (consul-server.pem,
// consul-server-key.pem) and the agent's configuration serving HTTPS with
// them (consul-tls.hcl), whose path it returns.
func writeTLS(dir, bind string) (string, error) {
	ca, err := testca.New("devconsul")
	if err != nil {
		return "", fmt.Errorf("devconsul: TLS CA: %w", err)
	}
	hosts := []string{"127.0.0.1", "localhost"}
	if bind != "127.0.0.1" && bind != "localhost" {
		hosts = append([]string{bind}, hosts...)
	}
	srv, err := ca.IssueServer(hosts...)
	if err != nil {
		return "", fmt.Errorf("devconsul: TLS server certificate: %w", err)
	}
	caFile, certFile, keyFile := filepath.Join(dir, "consul-ca.pem"), filepath.Join(dir, "consul-server.pem"), filepath.Join(dir, "consul-server-key.pem")
	cfg := filepath.Join(dir, "consul-tls.hcl")
	for _, f := range []struct {
		path, content string
	}{
		{caFile, ca.CertPEM}, {certFile, srv.CertPEM}, {keyFile, srv.KeyPEM},
		{cfg, fmt.Sprintf("tls {\n  https {\n    ca_file   = %q\n    cert_file = %q\n    key_file  = %q\n  }\n}\n", caFile, certFile, keyFile)},
	} {
		if err := os.WriteFile(f.path, []byte(f.content), 0o600); err != nil {
			return "", fmt.Errorf("devconsul: %w", err)
		}
	}
	return cfg, nil
}

// Scheme is "https" with Options.TLS, else "http".
func (a *Agent) Scheme() string {
	if a.tls {
		return "https"
	}
	return "http"
}

// URL is the HTTP API's URL, Scheme()://HTTPAddr (what
// controlplane.Config.ConsulAddress and CONSUL_HTTP_ADDR take).
func (a *Agent) URL() string { return a.Scheme() + "://" + a.HTTPAddr }

// ACLEnabled reports whether the agent runs with ACLs (not
// Options.DisableACL).
func (a *Agent) ACLEnabled() bool { return a.ManagementToken != "" }

// Config returns a Consul API client configuration for the agent with
// token (anonymous when empty): its address and scheme, CAFile with TLS,
// the Options.Dial dialer, no connection pooling shared with other
// clients.
func (a *Agent) Config(token string) *api.Config {
	cc := api.DefaultNonPooledConfig()
	cc.Address, cc.Scheme, cc.Token = a.HTTPAddr, a.Scheme(), token
	cc.TLSConfig = api.TLSConfig{CAFile: a.CAFile}
	if a.dial != nil {
		cc.Transport.DialContext = a.dial
	}
	return cc
}

// NewClient returns a client of the agent with token (anonymous when
// empty), e.g. one of ControlPlaneToken's to see what the control plane
// sees.
func (a *Agent) NewClient(token string) (*api.Client, error) {
	c, err := api.NewClient(a.Config(token))
	if err != nil {
		return nil, fmt.Errorf("devconsul: client of %s: %w", a.URL(), err)
	}
	return c, nil
}

// waitReady waits until the agent has a leader and, with ACLs, knows the
// management token (the leader creates it just after its election),
// polled every 100 ms, at most timeout.
func (a *Agent) waitReady(ctx context.Context, timeout time.Duration) error {
	return a.proc.WaitReady(ctx, timeout, 100*time.Millisecond, func(context.Context) error {
		leader, err := a.Client.Status().Leader()
		if err != nil {
			return fmt.Errorf("agent at %s: %w", a.URL(), err)
		}
		if leader == "" {
			return fmt.Errorf("agent at %s: no leader yet", a.URL())
		}
		if a.ACLEnabled() {
			if _, _, err := a.Client.ACL().TokenReadSelf(nil); err != nil {
				return fmt.Errorf("agent at %s: management token not usable yet: %w", a.URL(), err)
			}
		}
		return nil
	})
}

// ServiceToken returns a token for the sidecars of service: its
// ServiceIdentities name service, which grants what consul-dataplane's
// sidecars get (service:write on service and its sidecar proxy, read on
// every service and node). The token is created once per service and
// cached. With Options.DisableACL it returns "" (no token is needed).
func (a *Agent) ServiceToken(ctx context.Context, service string) (string, error) {
	if !a.ACLEnabled() {
		return "", nil
	}
	a.mu.Lock()
	secret, ok := a.serviceTokens[service]
	a.mu.Unlock()
	if ok {
		return secret, nil
	}
	tok, _, err := a.Client.ACL().TokenCreate(&api.ACLToken{
		Description:       "meshlet sidecars of " + service + " (devconsul)",
		ServiceIdentities: []*api.ACLServiceIdentity{{ServiceName: service}},
	}, (&api.WriteOptions{}).WithContext(ctx))
	if err != nil {
		return "", fmt.Errorf("devconsul: create the token of service %s: %w", service, err)
	}
	return keep(ctx, a, a.serviceTokens, service, tok), nil
}

// ControlPlaneToken returns a token for the control plane: its policy
// (ControlPlanePolicy) has the rules of consul.ControlPlaneACLRules, or
// with kube (the Kubernetes registrar too; KubeControlPlanePolicy) those
// of consul.KubeControlPlaneACLRules, and nothing else, so a control plane
// running with it proves those rules enough. Created once per kind and
// cached. With Options.DisableACL it returns "".
func (a *Agent) ControlPlaneToken(ctx context.Context, kube bool) (string, error) {
	if !a.ACLEnabled() {
		return "", nil
	}
	a.mu.Lock()
	secret, ok := a.controlPlaneTokens[kube]
	a.mu.Unlock()
	if ok {
		return secret, nil
	}
	tok, err := a.createControlPlaneToken(ctx, kube, "")
	if err != nil {
		return "", err
	}
	return keep(ctx, a, a.controlPlaneTokens, kube, tok), nil
}

// CreateControlPlaneToken creates a token of ControlPlaneToken's policy
// whose secret is secretID (a UUID, see NewUUID), for a control plane
// given its token before the agent existed. It is not cached.
func (a *Agent) CreateControlPlaneToken(ctx context.Context, kube bool, secretID string) error {
	if !a.ACLEnabled() {
		return errors.New("devconsul: CreateControlPlaneToken: the agent runs without ACLs")
	}
	_, err := a.createControlPlaneToken(ctx, kube, secretID)
	return err
}

func (a *Agent) createControlPlaneToken(ctx context.Context, kube bool, secretID string) (*api.ACLToken, error) {
	name, rules := ControlPlanePolicy, consul.ControlPlaneACLRules
	if kube {
		name, rules = KubeControlPlanePolicy, consul.KubeControlPlaneACLRules
	}
	if err := a.ensurePolicy(ctx, name, rules); err != nil {
		return nil, err
	}
	tok, _, err := a.Client.ACL().TokenCreate(&api.ACLToken{
		SecretID: secretID, Description: "meshlet control plane (devconsul)",
		Policies: []*api.ACLTokenPolicyLink{{Name: name}},
	}, (&api.WriteOptions{}).WithContext(ctx))
	if err != nil {
		return nil, fmt.Errorf("devconsul: create the control plane's token: %w", err)
	}
	return tok, nil
}

// ensurePolicy creates the policy name with rules unless it exists.
func (a *Agent) ensurePolicy(ctx context.Context, name, rules string) error {
	acl := a.Client.ACL()
	p, _, err := acl.PolicyReadByName(name, (&api.QueryOptions{}).WithContext(ctx))
	if err == nil && p != nil {
		return nil
	}
	_, _, err = acl.PolicyCreate(&api.ACLPolicy{Name: name, Rules: rules,
		Description: "meshlet control plane, least privilege (controlplane/consul)"}, (&api.WriteOptions{}).WithContext(ctx))
	if err != nil && strings.Contains(err.Error(), "already exists") {
		return nil // created meanwhile by another caller
	}
	if err != nil {
		return fmt.Errorf("devconsul: create the ACL policy %s: %w", name, err)
	}
	return nil
}

// keep caches tok's secret in m under key and returns the cached secret:
// tok's, or that of a token another caller created meanwhile (tok is then
// deleted).
func keep[K comparable](ctx context.Context, a *Agent, m map[K]string, key K, tok *api.ACLToken) string {
	a.mu.Lock()
	prev, ok := m[key]
	if !ok {
		m[key] = tok.SecretID
	}
	a.mu.Unlock()
	if ok {
		_, _ = a.Client.ACL().TokenDelete(tok.AccessorID, (&api.WriteOptions{}).WithContext(ctx))
		return prev
	}
	return tok.SecretID
}

// NewUUID returns a random UUID (version 4), the form of Consul's token
// secrets.
func NewUUID() string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:16])
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

// StartForTestWith is StartForTest with options. The agent's log goes to
// the test's log file, and to Log too when set; Dir defaults to a
// t.TempDir().
func StartForTestWith(t testing.TB, o Options) *Agent {
	t.Helper()
	if testing.Short() {
		t.Skip("-short: starts a real Consul agent (make test runs it)")
	}
	if f := devproc.TestLog(t, "consul.log"); o.Log != nil {
		o.Log = io.MultiWriter(f, o.Log)
	} else {
		o.Log = f
	}
	if o.Dir == "" {
		o.Dir = t.TempDir()
	}
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
