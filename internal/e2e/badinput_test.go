package e2e

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/meshlet/meshlet/internal/devconsul"
	"github.com/meshlet/meshlet/internal/testutil"
)

// outboundIsHTTP reports whether a request through bindPort comes back with
// the sidecar's Via header (an HTTP listener) rather than raw bytes.
func outboundIsHTTP(bindPort int) bool {
	a := call(fmt.Sprintf("http://127.0.0.1:%d/", bindPort))
	return a.err == nil && strings.Contains(a.via, "a-1-sidecar-proxy")
}

func TestMalformedPolicyIsReportedAndLastGoodSetKept(t *testing.T) {
	m := newMesh(t)
	m.startControlPlane("", "") // no policies: b is tcp
	_, _, _, bindPort, _ := twoServices(t, m)
	if outboundIsHTTP(bindPort) {
		t.Fatal("b should start as tcp (no policy)")
	}

	m.writePolicy("b.yaml", serviceDefaults("b", "htp"))
	line := m.cpLog.WaitFor(t, 5*time.Second, "policy: invalid policy files")
	if !strings.Contains(line, `b.yaml:7: spec.protocol: unsupported protocol \"htp\" (want tcp, http, http2, grpc or udp)`) ||
		!strings.Contains(line, "keeping the last good policy set") {
		t.Errorf("log line lacks file:line: field: error:\n%s", line)
	}
	if n := m.cpLog.Count("policy: invalid policy files"); n != 1 {
		t.Errorf("%d log lines for one bad edit, want 1", n)
	}
	if outboundIsHTTP(bindPort) {
		t.Error("the broken policy changed the config")
	}

	m.writePolicy("b.yaml", serviceDefaults("b", "http"))
	testutil.Until(t, 5*time.Second, "the fixed policy to make b HTTP", func() bool { return outboundIsHTTP(bindPort) })
}

func TestConsulDownAtControlPlaneStart(t *testing.T) {
	port := freePorts(t, 1)[0]
	// The control plane's token is chosen now, created once the agent is
	// up (a few failed queries in between: "ACL token not found").
	m := meshWithoutConsul(t)
	m.cpToken = devconsul.NewUUID()
	m.writePolicy("b.yaml", serviceDefaults("b", "http"))
	m.startControlPlane(hostPort(port), "") // no agent there yet
	m.cpLog.WaitFor(t, 5*time.Second, "consul: agent unreachable")

	m.consul = devconsul.StartForTestWith(t, devconsul.Options{HTTPPort: port})
	if err := m.consul.CreateControlPlaneToken(context.Background(), false, m.cpToken); err != nil {
		t.Fatal(err)
	}
	_, _, _, bindPort, _ := twoServices(t, m)
	// The intention a → b reaches b's sidecar by its own watch, maybe just
	// after both sidecars are ready.
	testutil.Until(t, 5*time.Second, "the mesh working after Consul came up", func() bool { return outboundIsHTTP(bindPort) })
	if n := m.cpLog.Count("consul: agent unreachable"); n != 1 {
		t.Errorf("'agent unreachable' logged %d times, want once:\n%s", n, strings.Join(m.cpLog.Lines("consul:"), "\n"))
	}
	m.cpLog.WaitFor(t, time.Second, "consul: agent reachable again")
}

func TestControlPlaneDownAtSidecarStart(t *testing.T) {
	m := newMesh(t)
	m.writePolicy("b.yaml", serviceDefaults("b", "http"))
	ports := freePorts(t, 5) // distinct, none bound yet
	xdsAddr := hostPort(ports[4])
	bApp := startApp(t, "b-1")
	aSvc := svc{id: "a-1", name: "a", appPort: ports[0], sidecarPort: ports[1], upstreams: map[string]int{"b": ports[2]}}
	bSvc := svc{id: "b-1", name: "b", appPort: bApp.port, sidecarPort: ports[3]}
	m.register(aSvc)
	m.register(bSvc)
	m.allow("a", "b")
	aProxy := m.startSidecar(aSvc.proxyID(), xdsAddr) // nothing serves xDS yet
	bProxy := m.startSidecar(bSvc.proxyID(), xdsAddr)
	aProxy.log.WaitFor(t, 5*time.Second, "xds: control plane unreachable")
	if aProxy.s.IsReady() {
		t.Fatal("ready without a control plane")
	}

	m.startControlPlane("", xdsAddr)
	aProxy.waitReady(t)
	bProxy.waitReady(t)
	testutil.Until(t, 5*time.Second, "traffic through the mesh", func() bool { return outboundIsHTTP(ports[2]) })
	if n := aProxy.log.Count("xds: control plane unreachable"); n != 1 {
		t.Errorf("'control plane unreachable' logged %d times, want once", n)
	}
	aProxy.log.WaitFor(t, time.Second, "xds: connected to control plane")
}
