package e2e

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/peer"
	_ "google.golang.org/grpc/xds" // registers the xds:/// resolver and balancers
)

// grpcClientEnv makes the test binary act as the proxyless gRPC client:
// grpc-go reads its xDS bootstrap at process start, so the client runs in a
// process of its own with GRPC_XDS_BOOTSTRAP_CONFIG set.
const grpcClientEnv = "MESHLET_E2E_GRPC_CLIENT"

func TestMain(m *testing.M) {
	if target := os.Getenv(grpcClientEnv); target != "" {
		os.Exit(runGRPCClient(target))
	}
	if addr := os.Getenv(interopClientEnv); addr != "" {
		os.Exit(runInteropClient(addr))
	}
	os.Exit(m.Run())
}

// runGRPCClient calls the health service of target 10 times through xDS and
// prints one line per call: "ok <server address>".
func runGRPCClient(target string) int {
	conn, err := grpc.NewClient(target, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		fmt.Println("error", err)
		return 1
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	hc := healthpb.NewHealthClient(conn)
	for range 10 {
		var p peer.Peer
		resp, err := hc.Check(ctx, &healthpb.HealthCheckRequest{}, grpc.WaitForReady(true), grpc.Peer(&p))
		if err != nil {
			fmt.Println("error", err)
			return 1
		}
		fmt.Println("ok", p.Addr, resp.GetStatus())
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

func TestProxylessGRPCClientResolvesThroughControlPlane(t *testing.T) {
	m := newMesh(t)
	m.startControlPlane("", "")
	ports := map[string]int{"greeter-1": startGRPCServer(t), "greeter-2": startGRPCServer(t)}
	for id, port := range ports {
		err := m.consul.Client.Agent().ServiceRegister(&api.AgentServiceRegistration{
			ID: id, Name: "greeter", Address: "127.0.0.1", Port: port, Meta: map[string]string{"protocol": "grpc"},
			Check: &api.AgentServiceCheck{TTL: "10m", Status: api.HealthPassing},
		})
		if err != nil {
			t.Fatal(err)
		}
	}

	bootstrap := fmt.Sprintf(`{
  "xds_servers": [{"server_uri": %q, "channel_creds": [{"type": "insecure"}], "server_features": ["xds_v3"]}],
  "node": {"id": "grpc-e2e-client"}
}`, m.xdsAddr)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), grpcClientEnv+"=xds:///greeter", "GRPC_XDS_BOOTSTRAP_CONFIG="+bootstrap)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("grpc-go xDS client failed: %v\n%s", err, out)
	}
	seen := map[string]int{}
	for line := range strings.Lines(string(out)) {
		f := strings.Fields(line)
		if len(f) == 3 && f[0] == "ok" {
			if f[2] != "SERVING" {
				t.Errorf("health status %s, want SERVING", f[2])
			}
			seen[f[1]]++
		}
	}
	total := 0
	for id, port := range ports {
		n := seen[hostPort(port)]
		total += n
		if n == 0 {
			t.Errorf("%s (%s) got no calls; calls went to %v", id, hostPort(port), seen)
		}
	}
	if total != 10 {
		t.Errorf("%d calls answered, want 10:\n%s", total, out)
	}
	m.cpLog.WaitFor(t, time.Second, "userAgent=\"gRPC Go\"")
	if m.cpLog.Count("xds: NACK") != 0 {
		t.Errorf("grpc-go NACKed our resources:\n%s", strings.Join(m.cpLog.Lines("NACK"), "\n"))
	}
}
