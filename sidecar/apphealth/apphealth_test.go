package apphealth

import (
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"

	"go.uber.org/goleak"
	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/meshlet/meshlet/internal/testutil"
	"github.com/meshlet/meshlet/xds"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func port(t *testing.T, addr net.Addr) int {
	t.Helper()
	return addr.(*net.TCPAddr).Port
}

func TestProbes(t *testing.T) {
	var appHealthy atomic.Bool
	appHealthy.Store(true)
	var sawHost atomic.Value
	app := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("X-Probe") == "1" {
			sawHost.Store(r.Host)
		}
		switch {
		case r.URL.Path == "/redirect":
			http.Redirect(w, r, "/healthz", http.StatusFound)
		case !appHealthy.Load():
			http.Error(w, "sick", http.StatusInternalServerError)
		}
	}))
	defer app.Close()
	appPort := port(t, app.Listener.Addr())

	tcpLn, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() {
		for {
			c, err := tcpLn.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	closedPort := testutil.RefusedPort(t)

	gln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	gs := grpc.NewServer()
	hs := health.NewServer()
	healthpb.RegisterHealthServer(gs, hs)
	hs.SetServingStatus("greeter", healthpb.HealthCheckResponse_NOT_SERVING)
	go gs.Serve(gln)
	defer func() { gs.Stop(); tcpLn.Close() }()

	probes := xds.AppProbes{
		xds.AppHealthPath("app", "readyz"):   {HTTPGet: &xds.HTTPGetProbe{Port: appPort, Path: "/healthz", Host: "app.local", Headers: []xds.HTTPHeader{{Name: "X-Probe", Value: "1"}}}},
		xds.AppHealthPath("app", "livez"):    {HTTPGet: &xds.HTTPGetProbe{Port: appPort, Path: "redirect"}},
		xds.AppHealthPath("app", "startupz"): {TCPSocket: &xds.PortProbe{Port: port(t, tcpLn.Addr())}},
		xds.AppHealthPath("db", "livez"):     {TCPSocket: &xds.PortProbe{Port: closedPort}},
		xds.AppHealthPath("grpc", "livez"):   {GRPC: &xds.GRPCProbe{Port: port(t, gln.Addr())}},
		xds.AppHealthPath("grpc", "readyz"):  {GRPC: &xds.GRPCProbe{Port: port(t, gln.Addr()), Service: "greeter"}},
	}
	var ready atomic.Bool
	srv := httptest.NewServer(Handler(ready.Load, probes))
	defer srv.Close()
	get := func(path string) int {
		t.Helper()
		resp, err := http.Get(srv.URL + path)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}

	for _, tc := range []struct {
		name, path string
		want       int
	}{
		{"sidecar not ready yet", xds.ReadyPath, 503},
		{"http probe passes, with its host and headers", xds.AppHealthPath("app", "readyz"), 200},
		{"http probe follows a redirect", xds.AppHealthPath("app", "livez"), 200},
		{"tcp probe passes", xds.AppHealthPath("app", "startupz"), 200},
		{"tcp probe to a closed port fails", xds.AppHealthPath("db", "livez"), 503},
		{"grpc probe of the server passes", xds.AppHealthPath("grpc", "livez"), 200},
		{"grpc probe of a NOT_SERVING service fails", xds.AppHealthPath("grpc", "readyz"), 503},
		{"unknown path", xds.AppHealthPath("nope", "livez"), 404},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := get(tc.path); got != tc.want {
				t.Errorf("GET %s = %d, want %d", tc.path, got, tc.want)
			}
		})
	}
	if h, _ := sawHost.Load().(string); h != "app.local" {
		t.Errorf("http probe Host = %q, want the probe's host app.local", h)
	}
	ready.Store(true)
	if got := get(xds.ReadyPath); got != 200 {
		t.Errorf("ready: %d, want 200", got)
	}
	appHealthy.Store(false)
	if got := get(xds.AppHealthPath("app", "readyz")); got != 500 {
		t.Errorf("failing app: %d, want its own 500", got)
	}
}

func TestParseAppProbes(t *testing.T) {
	for _, tc := range []struct {
		name, in, err string
	}{
		{"empty", "", ""},
		{"valid", `{"/app-health/app/readyz":{"httpGet":{"port":8080,"path":"/ready"}}}`, ""},
		{"bad path", `{"/x":{"tcpSocket":{"port":1}}}`, "does not start with"},
		{"two handlers", `{"/app-health/a/livez":{"tcpSocket":{"port":1},"grpc":{"port":1}}}`, "exactly one"},
		{"bad port", `{"/app-health/a/livez":{"tcpSocket":{"port":0}}}`, "out of range"},
		{"not json", `{`, "MESHLET_APP_PROBES"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := xds.ParseAppProbes(tc.in)
			if (err == nil) != (tc.err == "") || err != nil && !strings.Contains(err.Error(), tc.err) {
				t.Errorf("err = %v, want %q", err, tc.err)
			}
		})
	}
}
