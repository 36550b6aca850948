package e2e

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
	_ "google.golang.org/grpc/xds" // registers the xds:/// resolver and balancers

	"github.com/meshlet/meshlet/internal/testutil"
	"github.com/meshlet/meshlet/xds"
)

// grpcClientEnv makes the test binary act as a proxyless gRPC client of
// the comma-separated xds:/// targets it holds: grpc-go reads its xDS
// bootstrap at process start, so each client runs in a process of its own
// with GRPC_XDS_BOOTSTRAP_CONFIG set. grpcInstancesEnv is how many
// instances each target has; 0 expects the target not to resolve.
const (
	grpcClientEnv    = "MESHLET_E2E_GRPC_CLIENT"
	grpcInstancesEnv = "MESHLET_E2E_GRPC_INSTANCES"
)

func TestMain(m *testing.M) {
	if targets := os.Getenv(grpcClientEnv); targets != "" {
		os.Exit(runGRPCClient(strings.Split(targets, ","), os.Getenv(grpcInstancesEnv)))
	}
	if addr := os.Getenv(interopClientEnv); addr != "" {
		os.Exit(runInteropClient(addr))
	}
	os.Exit(m.Run())
}

// grpcCalls is how many calls runGRPCClient makes to each target once
// every instance has answered.
const grpcCalls = 10

// runGRPCClient calls the health service of each target through xDS, in
// turn: first until all its instances (a count, as a string) have answered
// (printing "warm <target> <calls>"), then grpcCalls times, printing one
// line per call: "ok <target> <server address> <status>". With instances
// "0" it makes one call that must fail (the target does not exist),
// without waiting for the channel to be ready, and prints "failed <target>
// <code> after <duration> <message>". It gives up after 45 s, printing "error ...", and
// returns 1 on any error.
func runGRPCClient(targets []string, instances string) int {
	want, err := strconv.Atoi(instances)
	if err != nil {
		fmt.Println("error", grpcInstancesEnv, err)
		return 1
	}
	ctx, cancel := context.WithTimeout(context.Background(), 45*time.Second)
	defer cancel()
	for _, target := range targets {
		conn, err := grpc.NewClient(target, grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			fmt.Println("error", err)
			return 1
		}
		defer conn.Close()
		hc := healthpb.NewHealthClient(conn)
		if want == 0 {
			start := time.Now()
			_, err := hc.Check(ctx, &healthpb.HealthCheckRequest{})
			if err == nil {
				fmt.Println("error", target, "answered")
				return 1
			}
			fmt.Println("failed", target, status.Code(err), "after", time.Since(start).Round(time.Second), status.Convert(err).Message())
			continue
		}
		seen := map[string]bool{}
		for calls := 1; len(seen) < want; calls++ {
			var p peer.Peer
			if _, err := hc.Check(ctx, &healthpb.HealthCheckRequest{}, grpc.WaitForReady(true), grpc.Peer(&p)); err != nil {
				fmt.Println("error", target, err, "instances answering:", len(seen))
				return 1
			}
			seen[p.Addr.String()] = true
			if len(seen) == want {
				fmt.Println("warm", target, calls)
			}
		}
		for range grpcCalls {
			var p peer.Peer
			resp, err := hc.Check(ctx, &healthpb.HealthCheckRequest{}, grpc.WaitForReady(true), grpc.Peer(&p))
			if err != nil {
				fmt.Println("error", target, err)
				return 1
			}
			fmt.Println("ok", target, p.Addr, resp.GetStatus())
		}
	}
	return 0
}

func startGRPCServer(t *testing.T) (port int) {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := grpc.NewServer()
	healthpb.RegisterHealthServer(s, health.NewServer())
	go func() { _ = s.Serve(l) }()
	t.Cleanup(s.Stop)
	return l.Addr().(*net.TCPAddr).Port
}

// grpcClient is a proxyless gRPC client process (runGRPCClient).
type grpcClient struct {
	node    string
	targets []string
	cmd     *exec.Cmd
	out     bytes.Buffer
}

// startGRPCClient starts a grpc-go xDS client process with node ID node,
// calling targets whose services have instances instances each (0: the
// targets must not resolve). Its bootstrap (xds.GRPCBootstrap, as
// `controlplane grpc-bootstrap` writes it) verifies the control plane with
// TLS channel credentials (gRFC A65) and sends tokenFile's JWT with the
// JWT call credentials (gRFC A97).
func (m *mesh) startGRPCClient(ctx context.Context, node, tokenFile string, instances int, targets ...string) *grpcClient {
	m.t.Helper()
	bootstrap, err := xds.GRPCBootstrap{Server: m.xdsAddr, NodeID: node, CAFile: m.caFile, TokenFile: tokenFile}.JSON()
	if err != nil {
		m.t.Fatal(err)
	}
	c := &grpcClient{node: node, targets: targets}
	c.cmd = exec.CommandContext(ctx, os.Args[0], "-test.run=^$")
	c.cmd.Env = append(os.Environ(), grpcClientEnv+"="+strings.Join(targets, ","), grpcInstancesEnv+"="+strconv.Itoa(instances),
		"GRPC_XDS_BOOTSTRAP_CONFIG="+string(bootstrap), xds.EnvGRPCCallCreds+"=true")
	c.cmd.Stdout, c.cmd.Stderr = &c.out, &c.out
	if err := c.cmd.Start(); err != nil {
		m.t.Fatal(err)
	}
	return c
}

// wait waits for the client to exit and returns its output; it fails the
// test when the client failed.
func (c *grpcClient) wait(t *testing.T) string {
	t.Helper()
	if err := c.cmd.Wait(); err != nil {
		t.Errorf("grpc-go xDS client %s (%v) failed: %v\n%s", c.node, c.targets, err, c.out.String())
	} else {
		t.Logf("grpc-go xDS client %s (%v):\n%s", c.node, c.targets, c.out.String())
	}
	return c.out.String()
}

// registerGRPC registers an instance of a gRPC service (Meta protocol
// grpc) with a passing TTL check.
func (m *mesh) registerGRPC(id, name string, port int) {
	m.t.Helper()
	err := m.consul.Client.Agent().ServiceRegister(&api.AgentServiceRegistration{
		ID: id, Name: name, Address: "127.0.0.1", Port: port, Meta: map[string]string{"protocol": "grpc"},
		Check: &api.AgentServiceCheck{TTL: "10m", Status: api.HealthPassing},
	})
	if err != nil {
		m.t.Fatal(err)
	}
}

// TestProxylessGRPCClientResolvesThroughControlPlane: Consul holds the
// demo's plain HTTP services web, api and store and two gRPC services,
// greeter and echo, each with two instances. grpc-go xDS clients, each in
// a process of its own, ask the control plane for what they call: one for
// greeter, another for greeter and echo. Each target resolves to its own
// instances, and calls are round-robined over them. A third client, asking
// for a service that does not exist, fails its call with UNAVAILABLE once
// grpc-go's resource timer gives up, instead of hanging. Before the control
// plane answered by resource name, a client got nothing as soon as Consul
// held more than one service.
func TestProxylessGRPCClientResolvesThroughControlPlane(t *testing.T) {
	m := newMesh(t)
	ports := map[string]int{}
	instances := map[string][]string{}
	for _, svc := range []string{"greeter", "echo"} {
		for i := 1; i <= 2; i++ {
			id := fmt.Sprintf("%s-%d", svc, i)
			ports[id] = startGRPCServer(t)
			m.registerGRPC(id, svc, ports[id])
			instances[svc] = append(instances[svc], hostPort(ports[id]))
		}
	}
	for _, svc := range []string{"web", "api", "store"} {
		a := startApp(t, svc+"-1")
		err := m.consul.Client.Agent().ServiceRegister(&api.AgentServiceRegistration{
			ID: svc + "-1", Name: svc, Address: "127.0.0.1", Port: a.port, Meta: map[string]string{"protocol": "http"},
			Check: &api.AgentServiceCheck{TTL: "10m", Status: api.HealthPassing},
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	// The control plane starts on the whole catalog, so each client's first
	// endpoints hold every instance.
	for svc, want := range map[string]int{"greeter": 2, "echo": 2, "web": 1, "api": 1, "store": 1} {
		testutil.Until(t, 10*time.Second, svc+" passing in Consul's catalog", func() bool {
			entries, _, err := m.consul.Client.Health().Service(svc, "", true, nil)
			return err == nil && len(entries) == want
		})
	}
	jwts := m.trustJWTs()
	m.startControlPlane("", "")

	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	token := jwts.tokenFile(m, "grpc-client")
	one := m.startGRPCClient(ctx, "grpc-e2e-greeter", token, 2, "xds:///greeter")
	two := m.startGRPCClient(ctx, "grpc-e2e-greeter-echo", token, 2, "xds:///greeter", "xds:///echo")
	missing := m.startGRPCClient(ctx, "grpc-e2e-missing", token, 0, "xds:///nope")

	for _, c := range []*grpcClient{one, two} {
		out := c.wait(t)
		calls := map[string][]string{} // target → server addresses, in order
		for line := range strings.Lines(out) {
			f := strings.Fields(line)
			if len(f) == 4 && f[0] == "ok" {
				if f[3] != "SERVING" {
					t.Errorf("%s: health status %s, want SERVING", c.node, f[3])
				}
				calls[f[1]] = append(calls[f[1]], f[2])
			}
		}
		for _, target := range c.targets {
			got := calls[target]
			svc := strings.TrimPrefix(target, "xds:///")
			if len(got) != grpcCalls {
				t.Errorf("%s: %d calls to %s answered, want %d:\n%s", c.node, len(got), target, grpcCalls, out)
				continue
			}
			// Round robin: the calls alternate between the two instances.
			for i, addr := range got {
				if !slices.Contains(instances[svc], addr) {
					t.Errorf("%s: call %d to %s answered by %s, not one of %s's instances %v", c.node, i, target, addr, svc, instances[svc])
				} else if i > 0 && addr == got[i-1] {
					t.Errorf("%s: calls %d and %d to %s both went to %s, want round robin over %v: %v", c.node, i-1, i, target, addr, instances[svc], got)
					break
				}
			}
		}
	}

	// The control plane answers the request for listener "nope" with no
	// resources; grpc-go takes the absence of a listener it never received
	// as unknown, and reports it as not existing when its watch timer
	// (15 s) expires. The call, not waiting for readiness, then fails with
	// UNAVAILABLE: grpc-go says either `xds: resource "nope" of type
	// "ListenerResource" has been removed` or "produced zero addresses",
	// depending on which of its resolver's two updates the channel sees
	// first.
	out := missing.wait(t)
	if !strings.Contains(out, "failed xds:///nope Unavailable after") {
		t.Errorf("the client of a service that does not exist: want its call failed with Unavailable:\n%s", out)
	}

	m.cpLog.WaitFor(t, time.Second, "userAgent=\"gRPC Go\"")
	if m.cpLog.Count("xds: NACK") != 0 {
		t.Errorf("grpc-go NACKed our resources:\n%s", strings.Join(m.cpLog.Lines("NACK"), "\n"))
	}
	for _, node := range []string{one.node, two.node, missing.node} {
		if m.cpLog.Count(`node=`+node) == 0 {
			t.Errorf("the control plane logged no stream of %s", node)
		}
	}
}
