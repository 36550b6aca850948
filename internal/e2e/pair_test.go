package e2e

import (
	"strings"
	"testing"
	"time"
)

// sidecarPair is the mesh path of one call: a downstream service "down"
// whose sidecar has an outbound listener for "up", and "up"'s sidecar in
// front of the app under test, with mTLS between the two sidecars, all
// configured from a real Consul agent by the control plane.
type sidecarPair struct {
	m *mesh
	// Addr is where a client of "up" connects: down's sidecar's outbound
	// listener for up (plaintext, loopback), as an app in the mesh would.
	Addr string
	// Down and Up are the two sidecars; UpPublic is up's sidecar's public
	// listener (mTLS only).
	Down, Up *proxy
	UpPublic string
}

// pairOptions shape startPair.
type pairOptions struct {
	// Protocol of "up": tcp, http, http2 or grpc (ServiceDefaults).
	Protocol string
	// AppPort is the port of the app under test on 127.0.0.1.
	AppPort int
	// Policies are extra policy documents (YAML, without "---").
	Policies []string
}

// startPair starts Consul, the control plane and both sidecars, and waits
// until down's sidecar has up's sidecar as its only endpoint.
func startPair(t *testing.T, o pairOptions) *sidecarPair {
	t.Helper()
	m := newMesh(t)
	ports := freePorts(t, 4)
	downSidecar, upSidecar, bind, downApp := ports[0], ports[1], ports[2], ports[3]
	docs := append([]string{serviceDefaults("up", o.Protocol), serviceDefaults("down", "http")}, o.Policies...)
	m.writePolicy("pair.yaml", strings.Join(docs, "---\n"))
	m.startControlPlane("", "")
	// down's app is the test itself: nothing listens on its registered
	// port, and nothing dials it.
	m.register(svc{id: "down-1", name: "down", appPort: downApp, sidecarPort: downSidecar, upstreams: map[string]int{"up": bind}})
	m.register(svc{id: "up-1", name: "up", appPort: o.AppPort, sidecarPort: upSidecar})
	m.allow("down", "up")
	p := &sidecarPair{m: m, Addr: hostPort(bind), UpPublic: hostPort(upSidecar)}
	p.Down = m.startSidecar("down-1-sidecar-proxy", "")
	p.Up = m.startSidecar("up-1-sidecar-proxy", "")
	p.Down.waitReady(t)
	p.Up.waitReady(t)
	waitUntil(t, 10*time.Second, "down's sidecar reaching up's", func() bool {
		eps := p.Down.endpoints("up")
		return len(eps) == 1 && eps[0] == p.UpPublic
	})
	return p
}
