// Package e2e tests the whole path on real parts: a Consul agent (dev mode),
// the control plane, sidecars and apps on loopback, and grpc-go's proxyless
// xDS client.
package e2e

import (
	"fmt"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/meshlet/meshlet/internal/devconsul"
	"github.com/meshlet/meshlet/internal/testutil"
	"github.com/meshlet/meshlet/xds"
)

// twoServices registers service a (no app: the test is a's app) with an
// upstream to b, and b-1 with its app, and starts both sidecars.
func twoServices(t *testing.T, m *mesh) (aProxy, bProxy *proxy, bApp *app, bindPort int, bSvc svc) {
	t.Helper()
	ports := freePorts(t, 4)
	bindPort = ports[0]
	aSvc := svc{id: "a-1", name: "a", appPort: ports[1], sidecarPort: ports[2], upstreams: map[string]int{"b": bindPort}}
	bApp = startApp(t, "b-1")
	bSvc = svc{id: "b-1", name: "b", appPort: bApp.port, sidecarPort: ports[3]}
	m.register(aSvc)
	m.register(bSvc)
	m.allow("a", "b")
	aProxy = m.startSidecar(aSvc.proxyID(), "")
	bProxy = m.startSidecar(bSvc.proxyID(), "")
	aProxy.waitReady(t)
	bProxy.waitReady(t)
	return aProxy, bProxy, bApp, bindPort, bSvc
}

func TestRequestTraversesBothSidecars(t *testing.T) {
	m := newMesh(t)
	m.writePolicy("b.yaml", serviceDefaults("b", "http"))
	m.startControlPlane("", "")
	aProxy, _, bApp, bindPort, bSvc := twoServices(t, m)

	// a's sidecar sends b's traffic to b's sidecar, not to b's app.
	testutil.Until(t, 5*time.Second, "b's sidecar as the endpoint of b", func() bool {
		eps := aProxy.endpoints("b")
		return len(eps) == 1 && eps[0] == hostPort(bSvc.sidecarPort)
	})
	// The intention a → b may reach b's sidecar just after it is ready: a
	// request denied meanwhile never reaches b's app.
	var got answer
	testutil.Until(t, 5*time.Second, "a request through the mesh", func() bool {
		got = call(fmt.Sprintf("http://127.0.0.1:%d/hello", bindPort))
		return got.err == nil
	})
	want := "1.1 a-1-sidecar-proxy, 1.1 b-1-sidecar-proxy"
	if got.instance != "b-1" || got.via != want {
		t.Errorf("b's app saw instance %q via %q, want b-1 via %q (both sidecars, in order)", got.instance, got.via, want)
	}
	if n := bApp.hits.Load(); n != 1 {
		t.Errorf("b's app got %d requests, want 1", n)
	}
}

// TestConsulOverHTTPS: the control plane reaches Consul's HTTPS API
// (https:// address, CA file, least-privilege token) as it does on
// Kubernetes; the mesh works the same.
func TestConsulOverHTTPS(t *testing.T) {
	m := newMeshWith(t, devconsul.Options{TLS: true})
	m.writePolicy("b.yaml", serviceDefaults("b", "http"))
	m.startControlPlane("", "")
	_, _, _, bindPort, _ := twoServices(t, m)
	testutil.Until(t, 5*time.Second, "a request through the mesh", func() bool {
		return call(fmt.Sprintf("http://127.0.0.1:%d/hello", bindPort)).err == nil
	})
	if got := m.cpLog.Lines("consul: connected"); len(got) != 1 || !strings.Contains(got[0], "https://") {
		t.Errorf("connected lines %q, want one naming the https:// address", got)
	}
}

func TestEndpointsFollowConsulWithin2s(t *testing.T) {
	m := newMesh(t)
	m.writePolicy("b.yaml", serviceDefaults("b", "http"))
	m.startControlPlane("", "")
	aProxy, _, _, bindPort, b1 := twoServices(t, m)
	url := fmt.Sprintf("http://127.0.0.1:%d/", bindPort)
	load := startLoad(url)

	// b-2 comes up: registered with a failing sidecar check, started, then
	// marked passing, as a readiness probe would.
	b2App := startApp(t, "b-2")
	b2 := svc{id: "b-2", name: "b", appPort: b2App.port, sidecarPort: freePorts(t, 1)[0], sidecarCritical: true}
	m.register(b2)
	b2Proxy := m.startSidecar(b2.proxyID(), "")
	b2Proxy.waitReady(t)

	step := func(name string, change func(), cond func(map[string]int) bool) time.Time {
		t.Helper()
		at := time.Now()
		change()
		testutil.Eventually(t, 2*time.Second, name+": traffic to follow", func() error {
			// Requests started 100ms after the change... until now.
			if seen := since(load.snapshot(), time.Now().Add(-150*time.Millisecond)); len(seen) == 0 || !cond(seen) {
				return fmt.Errorf("recent answers by %v", seen)
			}
			return nil
		})
		t.Logf("%s: traffic followed after %v", name, time.Since(at).Round(time.Millisecond))
		return at
	}
	both := func(s map[string]int) bool { return s["b-1"] > 0 && s["b-2"] > 0 }
	only := func(id string) func(map[string]int) bool {
		return func(s map[string]int) bool { return len(s) == 1 && s[id] > 0 }
	}

	step("instance added", func() { m.setCheck(b2.id+":sidecar", api.HealthPassing) }, both)
	step("instance failing its health check", func() { m.setCheck(b1.id+":app", api.HealthCritical) }, only("b-2"))
	step("instance passing again", func() { m.setCheck(b1.id+":app", api.HealthPassing) }, both)

	// Graceful removal: deregister, wait until a's sidecar has dropped the
	// endpoint, then stop the instance. No request may fail.
	removedAt := step("instance removed gracefully", func() {
		if err := m.consul.Client.Agent().ServiceDeregister(b2.id); err != nil {
			t.Fatal(err)
		}
	}, only("b-1"))
	testutil.Until(t, 2*time.Second, "b-2 gone from a's endpoints", func() bool {
		return len(aProxy.endpoints("b")) == 1
	})
	b2Proxy.stop()
	b2App.stop()
	time.Sleep(200 * time.Millisecond) // let requests run after the stop
	answers := load.finish()

	failed := 0
	for _, a := range answers {
		if a.err != nil {
			failed++
			t.Errorf("request at %v failed: %v", a.start.Format("15:04:05.000"), a.err)
		}
	}
	if late := since(answers, removedAt.Add(2*time.Second))["b-2"]; late > 0 {
		t.Errorf("%d requests reached b-2 more than 2s after it was deregistered", late)
	}
	t.Logf("%d requests, %d failed", len(answers), failed)
}

func TestControlPlaneLogsNACKAndSidecarKeepsServing(t *testing.T) {
	m := newMesh(t)
	m.writePolicy("b.yaml", serviceDefaults("b", "http"))
	m.startControlPlane("", "")
	aProxy, _, _, bindPort, _ := twoServices(t, m)
	url := fmt.Sprintf("http://127.0.0.1:%d/", bindPort)
	if a := call(url); a.err != nil {
		t.Fatal(a.err)
	}

	// A port another process holds: the new outbound listener cannot bind.
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	busyPort := busy.Addr().(*net.TCPAddr).Port
	ports := freePorts(t, 2)
	m.register(svc{id: "a-1", name: "a", appPort: ports[0], sidecarPort: ports[1],
		upstreams: map[string]int{"b": bindPort, "c": busyPort}})

	line := m.cpLog.WaitFor(t, 5*time.Second, "xds: NACK")
	for _, want := range []string{"node=a-1-sidecar-proxy", "type=" + xds.ListenerType, "cannot bind 127.0.0.1:" + fmt.Sprint(busyPort), "address already in use"} {
		if !strings.Contains(line, want) {
			t.Errorf("NACK log line lacks %q:\n%s", want, line)
		}
	}
	aProxy.log.WaitFor(t, time.Second, "rejected update (NACK)")
	if a := call(url); a.err != nil {
		t.Errorf("after the NACK the previous config should still serve: %v", a.err)
	}
	// One NACK, not a storm: the control plane holds the rejected version.
	time.Sleep(300 * time.Millisecond)
	if n := m.cpLog.Count("xds: NACK"); n != 1 {
		t.Errorf("control plane logged %d NACKs, want 1 (the rejected version must not be resent)", n)
	}
}
