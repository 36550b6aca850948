package sidecar

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	cluster "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	"go.uber.org/goleak"

	"github.com/meshlet/meshlet/controlplane/xdsbuild"
	"github.com/meshlet/meshlet/internal/testutil"
	"github.com/meshlet/meshlet/sidecar/xdsclient"
	"github.com/meshlet/meshlet/xds"
	"github.com/meshlet/meshlet/xds/xdstest"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

const node = "web-1-sidecar-proxy"

func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

func hostPort(t testing.TB, addr string) (string, int) {
	t.Helper()
	h, p, err := net.SplitHostPort(addr)
	if err != nil {
		t.Fatal(err)
	}
	n, _ := strconv.Atoi(p)
	return h, n
}

// upstream is an HTTP server that answers with its name.
func upstream(t *testing.T, name string) *httptest.Server {
	t.Helper()
	s := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("X-Upstream", name)
		fmt.Fprint(w, name)
	}))
	t.Cleanup(s.Close)
	return s
}

// httpResources serves one HTTP listener on port → RDS "web" → EDS cluster
// "web" with the given endpoints.
func httpResources(port int, endpoints ...string) xdstest.Resources {
	var eps []xdsbuild.Endpoint
	for _, e := range endpoints {
		h, p, _ := net.SplitHostPort(e)
		n, _ := strconv.Atoi(p)
		eps = append(eps, xdsbuild.Endpoint{Host: h, Port: n})
	}
	return xdstest.Resources{
		Listeners: []types.Resource{xdsbuild.NewHTTPListener("upstream:web", "127.0.0.1", port, xdsbuild.HTTPListenerOptions{RouteConfigName: "web", Via: node})},
		Routes:    []types.Resource{xdsbuild.NewRouteConfig("web", "web", xdsbuild.RouteOptions{})},
		Clusters:  []types.Resource{xdsbuild.NewEDSCluster("web", xdsbuild.ClusterOptions{Protocol: xds.ProtocolHTTP})},
		Endpoints: []types.Resource{xdsbuild.NewLoadAssignment("web", eps)},
	}
}

func startSidecar(t *testing.T, server string) *Sidecar {
	t.Helper()
	s, err := New(Config{
		NodeID: node, XDSAddress: server, AdminAddress: "127.0.0.1:0", XDSCredentials: xdsclient.Credentials{Insecure: true},
		DrainTimeout: time.Second, XDSMinBackoff: 20 * time.Millisecond, XDSMaxBackoff: 200 * time.Millisecond,
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil)),
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	})
	return s
}

func get(t *testing.T, url string) (int, string, http.Header) {
	t.Helper()
	c := &http.Client{Timeout: 5 * time.Second}
	resp, err := c.Get(url)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), resp.Header
}

func TestInvalidUpdateIsNACKedAndLastGoodConfigKeepsServing(t *testing.T) {
	up1, up2 := upstream(t, "one"), upstream(t, "two")
	srv := xdstest.Start(t)
	port := freePort(t)
	good := httpResources(port, up1.Listener.Addr().String())
	srv.Set(t, node, "v1", good)
	s := startSidecar(t, srv.Addr)
	testutil.Until(t, 5*time.Second, "sidecar ready", s.IsReady)
	url := fmt.Sprintf("http://127.0.0.1:%d/", port)
	if code, body, h := get(t, url); code != 200 || body != "one" || h.Get("Via") != "1.1 "+node {
		t.Fatalf("before: got %d %q via %q, want 200 \"one\" via %q", code, body, h.Get("Via"), "1.1 "+node)
	}

	tests := []struct {
		name    string
		version string
		mutate  func(r *xdstest.Resources)
		typeURL string
		detail  string
		// blamed are the NACK's structured details (xds.ParseNACKDetails).
		blamed []xds.NACKDetail
	}{
		{
			name: "unsupported cluster discovery type", version: "v2", typeURL: xds.ClusterType,
			mutate: func(r *xdstest.Resources) {
				c := xdsbuild.NewEDSCluster("web", xdsbuild.ClusterOptions{})
				c.ClusterDiscoveryType = &cluster.Cluster_Type{Type: cluster.Cluster_STRICT_DNS}
				r.Clusters = []types.Resource{c}
			},
			detail: `cluster "web": type: unsupported discovery type STRICT_DNS (supported: STATIC, EDS, ORIGINAL_DST)`,
			blamed: []xds.NACKDetail{{TypeURL: xds.ClusterType, Name: "web", Field: "type", Reason: xds.NACKInvalidResource}},
		},
		{
			name: "listener address is not an IP", version: "v3", typeURL: xds.ListenerType,
			mutate: func(r *xdstest.Resources) {
				r.Listeners = []types.Resource{xdsbuild.NewHTTPListener("upstream:web", "localhost", port, xdsbuild.HTTPListenerOptions{RouteConfigName: "web"})}
			},
			detail: `listener "upstream:web": address: listener address "localhost" is not an IP address`,
			blamed: []xds.NACKDetail{{TypeURL: xds.ListenerType, Name: "upstream:web", Field: "address", Reason: xds.NACKInvalidResource}},
		},
		{
			name: "listener port already in use", version: "v4", typeURL: xds.ListenerType,
			mutate: func(r *xdstest.Resources) {
				busy, err := net.Listen("tcp", "127.0.0.1:0")
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { busy.Close() })
				_, bp := hostPort(t, busy.Addr().String())
				r.Listeners = append(r.Listeners, xdsbuild.NewTCPProxyListener("upstream:busy", "127.0.0.1", bp, "web", xdsbuild.TCPProxyOptions{}))
			},
			detail: `listener "upstream:busy": address: cannot bind 127.0.0.1:`,
			blamed: []xds.NACKDetail{{TypeURL: xds.ListenerType, Name: "upstream:busy", Field: "address", Reason: xds.NACKBindFailed}},
		},
		{
			name: "two listeners on one address", version: "v5", typeURL: xds.ListenerType,
			mutate: func(r *xdstest.Resources) {
				r.Listeners = append(r.Listeners, xdsbuild.NewTCPProxyListener("upstream:other", "127.0.0.1", port, "web", xdsbuild.TCPProxyOptions{}))
			},
			detail: `both listen on 127.0.0.1:`,
			blamed: []xds.NACKDetail{{TypeURL: xds.ListenerType, Name: "upstream:other", Field: "address", Reason: xds.NACKAddressConflict},
				{TypeURL: xds.ListenerType, Name: "upstream:web", Field: "address", Reason: xds.NACKAddressConflict}},
		},
		{
			name: "two UDP listeners on one address", version: "v6", typeURL: xds.ListenerType,
			mutate: func(r *xdstest.Resources) {
				r.Listeners = append(r.Listeners, xdsbuild.NewUDPListener("upstream:dns1", "127.0.0.1", port+1, "web", xdsbuild.UDPProxyOptions{}),
					xdsbuild.NewUDPListener("upstream:dns2", "127.0.0.1", port+1, "web", xdsbuild.UDPProxyOptions{}))
			},
			detail: `listeners "upstream:dns1" and "upstream:dns2" both listen on 127.0.0.1:` + strconv.Itoa(port+1) + `/udp`,
			blamed: []xds.NACKDetail{{TypeURL: xds.ListenerType, Name: "upstream:dns1", Field: "address", Reason: xds.NACKAddressConflict},
				{TypeURL: xds.ListenerType, Name: "upstream:dns2", Field: "address", Reason: xds.NACKAddressConflict}},
		},
	}
	prev := "v1"
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			// Each version reaches every type: the last accepted version of
			// tc.typeURL is known once the sidecar has answered all of prev.
			waitAnswered(t, s, prev)
			prev = tc.version
			before := s.ConfigDump().XDS.Versions[tc.typeURL]
			bad := httpResources(port, up1.Listener.Addr().String())
			tc.mutate(&bad)
			srv.Set(t, node, tc.version, bad)
			nack := srv.WaitRequest(t, 5*time.Second, "NACK of "+tc.version, func(r *discovery.DiscoveryRequest) bool {
				return r.GetTypeUrl() == tc.typeURL && strings.Contains(r.GetErrorDetail().GetMessage(), tc.detail)
			})
			if got := xds.ParseNACKDetails(nack.GetErrorDetail()); !slices.Equal(got, tc.blamed) {
				t.Errorf("NACK details = %+v, want %+v", got, tc.blamed)
			}
			// A NACK carries the last accepted version, not the rejected one.
			if nack.GetVersionInfo() != before {
				t.Errorf("NACK version_info = %q, want the last accepted %q", nack.GetVersionInfo(), before)
			}
			// The last accepted config stays in force.
			if code, body, _ := get(t, url); code != 200 || body != "one" {
				t.Errorf("after NACK: got %d %q, want 200 \"one\"", code, body)
			}
			dump := s.ConfigDump()
			if got := dump.XDS.Versions[tc.typeURL]; got != before {
				t.Errorf("accepted %s version = %q, want %q (unchanged)", tc.typeURL, got, before)
			}
			if rej := dump.XDS.Rejected[tc.typeURL]; rej.Version != tc.version || !strings.Contains(rej.Error, tc.detail) {
				t.Errorf("config_dump rejected[%s] = %+v, want version %s with %q", tc.typeURL, rej, tc.version, tc.detail)
			}
		})
	}

	// A valid update after the rejections is accepted and applied.
	srv.Set(t, node, "v9", httpResources(port, up2.Listener.Addr().String()))
	testutil.Until(t, 5*time.Second, "v9 applied", func() bool {
		_, body, _ := get(t, url)
		return body == "two"
	})
	// The new endpoint can be in force before the listener's ACK.
	waitAnswered(t, s, "v9")
	if v := s.ConfigDump().XDS.Versions[xds.ListenerType]; v != "v9" {
		t.Errorf("listener version = %q, want v9", v)
	}
}

// waitAnswered waits until s has accepted or rejected version of every
// type the tests serve (listeners, routes, clusters, endpoints): the
// control plane sends each type of a new snapshot separately, so a test
// reading one type's state right after another type's NACK or a change
// in traffic could see the type still on the version before.
func waitAnswered(t *testing.T, s *Sidecar, version string) {
	t.Helper()
	testutil.Until(t, 5*time.Second, "every type answered at "+version, func() bool {
		x := s.ConfigDump().XDS
		for _, typ := range []string{xds.ListenerType, xds.RouteType, xds.ClusterType, xds.EndpointType} {
			if x.Versions[typ] != version && x.Rejected[typ].Version != version {
				return false
			}
		}
		return true
	})
}

// echo runs a TCP server that prefixes each line with its name and
// returns its address.
func echo(t *testing.T, name string) string {
	t.Helper()
	return testutil.ServeTCP(t, func(c net.Conn) {
		sc := bufio.NewScanner(c)
		for sc.Scan() {
			fmt.Fprintf(c, "%s %s\n", name, sc.Text())
		}
	})
}

func TestEndpointChangeKeepsLiveConnections(t *testing.T) {
	a, b := echo(t, "a"), echo(t, "b")
	srv := xdstest.Start(t)
	port := freePort(t)
	resources := func(ep string) xdstest.Resources {
		h, p := hostPort(t, ep)
		return xdstest.Resources{
			Listeners: []types.Resource{xdsbuild.NewTCPProxyListener("upstream:store", "127.0.0.1", port, "store", xdsbuild.TCPProxyOptions{})},
			Clusters:  []types.Resource{xdsbuild.NewEDSCluster("store", xdsbuild.ClusterOptions{})},
			Endpoints: []types.Resource{xdsbuild.NewLoadAssignment("store", []xdsbuild.Endpoint{{Host: h, Port: p}})},
		}
	}
	srv.Set(t, node, "v1", resources(a))
	s := startSidecar(t, srv.Addr)
	testutil.Until(t, 5*time.Second, "sidecar ready", s.IsReady)

	conn, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", port))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	rd := bufio.NewReader(conn)
	say := func(c net.Conn, r *bufio.Reader, msg string) string {
		t.Helper()
		c.SetDeadline(time.Now().Add(5 * time.Second))
		fmt.Fprintln(c, msg)
		line, err := r.ReadString('\n')
		if err != nil {
			t.Fatalf("read: %v", err)
		}
		return strings.TrimSpace(line)
	}
	if got := say(conn, rd, "hello"); got != "a hello" {
		t.Fatalf("got %q, want %q", got, "a hello")
	}

	srv.Set(t, node, "v2", resources(b))
	testutil.Until(t, 5*time.Second, "endpoint b applied", func() bool {
		eps := s.Clusters()
		return len(eps) == 1 && len(eps[0].Endpoints) == 1 && eps[0].Endpoints[0].Address == b
	})
	if got := say(conn, rd, "still there"); got != "a still there" {
		t.Errorf("live connection after endpoint change: got %q, want %q", got, "a still there")
	}
	conn2, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", port))
	if err != nil {
		t.Fatal(err)
	}
	defer conn2.Close()
	if got := say(conn2, bufio.NewReader(conn2), "new"); got != "b new" {
		t.Errorf("new connection: got %q, want %q", got, "b new")
	}
}

func TestReconnectsAfterControlPlaneRestart(t *testing.T) {
	up1, up2 := upstream(t, "one"), upstream(t, "two")
	srv := xdstest.Start(t)
	port := freePort(t)
	srv.Set(t, node, "v1", httpResources(port, up1.Listener.Addr().String()))
	s := startSidecar(t, srv.Addr)
	testutil.Until(t, 5*time.Second, "sidecar ready", s.IsReady)
	url := fmt.Sprintf("http://127.0.0.1:%d/", port)

	srv.Stop()
	testutil.Until(t, 5*time.Second, "disconnect noticed", func() bool { return !s.ConfigDump().XDS.Connected })
	if code, body, _ := get(t, url); code != 200 || body != "one" {
		t.Fatalf("while the control plane is down: got %d %q, want 200 \"one\"", code, body)
	}

	srv2 := srv.Restart(t)
	srv2.Set(t, node, "v2", httpResources(port, up2.Listener.Addr().String()))
	testutil.Until(t, 10*time.Second, "reconnected and v2 applied", func() bool {
		_, body, _ := get(t, url)
		return body == "two"
	})
	// The new stream resumed from the last accepted version.
	first := srv2.WaitRequest(t, time.Second, "first request after restart", func(r *discovery.DiscoveryRequest) bool {
		return r.GetTypeUrl() == xds.ListenerType
	})
	if first.GetVersionInfo() != "v1" {
		t.Errorf("first LDS request after reconnect carries version %q, want v1", first.GetVersionInfo())
	}
}

func TestAdminEndpoints(t *testing.T) {
	up := upstream(t, "one")
	srv := xdstest.Start(t)
	port := freePort(t)
	s := startSidecar(t, srv.Addr)
	admin := "http://" + s.AdminAddr().String()
	code, body, _ := get(t, admin+"/ready")
	if code != http.StatusServiceUnavailable || !strings.Contains(body, "waiting for") {
		t.Errorf("/ready before config = %d %q, want 503 naming what it waits for", code, body)
	}
	srv.Set(t, node, "v1", httpResources(port, up.Listener.Addr().String()))
	testutil.Until(t, 5*time.Second, "sidecar ready", s.IsReady)
	if code, body, _ := get(t, admin+"/ready"); code != 200 || body != "ready\n" {
		t.Errorf("/ready = %d %q, want 200 ready", code, body)
	}
	_, body, _ = get(t, admin+"/config_dump")
	var dump struct {
		Configs []map[string]any `json:"configs"`
		XDS     struct {
			Connected bool              `json:"connected"`
			Versions  map[string]string `json:"versions"`
		} `json:"xds"`
	}
	if err := json.Unmarshal([]byte(body), &dump); err != nil {
		t.Fatalf("config_dump is not JSON: %v\n%s", err, body)
	}
	if len(dump.Configs) != 5 || !dump.XDS.Connected || dump.XDS.Versions[xds.ListenerType] != "v1" {
		t.Errorf("config_dump: %d configs, connected=%v, versions=%v", len(dump.Configs), dump.XDS.Connected, dump.XDS.Versions)
	}
	if !strings.Contains(body, `"name": "upstream:web"`) {
		t.Errorf("config_dump does not show listener upstream:web:\n%s", body)
	}
	if _, body, _ := get(t, admin+"/listeners"); body != fmt.Sprintf("upstream:web::127.0.0.1:%d\n", port) {
		t.Errorf("/listeners = %q", body)
	}
	ep := "web::" + up.Listener.Addr().String()
	wantClusters := "web::upstream_rq_active::0\nweb::upstream_rq_pending_active::0\nweb::upstream_cx_active::0\n" +
		ep + "::weight::1\n" + ep + "::rq_active::0\n" + ep + "::health_flags::healthy\n"
	if _, body, _ := get(t, admin+"/clusters"); body != wantClusters {
		t.Errorf("/clusters = %q", body)
	}
}

func TestRestartDuringControlPlaneOutageServesPersistedConfig(t *testing.T) {
	up := upstream(t, "one")
	srv := xdstest.Start(t)
	port := freePort(t)
	srv.Set(t, node, "v1", httpResources(port, up.Listener.Addr().String()))
	dir := t.TempDir()
	start := func() (*Sidecar, func()) {
		s, err := New(Config{NodeID: node, XDSAddress: srv.Addr, AdminAddress: "127.0.0.1:0", StateDir: dir, XDSCredentials: xdsclient.Credentials{Insecure: true}, DrainTimeout: time.Second,
			XDSMinBackoff: 20 * time.Millisecond, XDSMaxBackoff: 100 * time.Millisecond, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan struct{})
		go func() {
			defer close(done)
			_ = s.Run(ctx)
		}()
		return s, func() { cancel(); <-done }
	}
	s1, stop1 := start()
	testutil.Until(t, 5*time.Second, "first sidecar ready", s1.IsReady)
	stop1()
	srv.Stop() // the control plane goes away, then the sidecar restarts

	s2, stop2 := start()
	defer stop2()
	testutil.Until(t, 5*time.Second, "restarted sidecar ready from its state directory", s2.IsReady)
	if code, body, _ := get(t, fmt.Sprintf("http://127.0.0.1:%d/", port)); code != 200 || body != "one" {
		t.Errorf("restarted sidecar: got %d %q, want 200 \"one\"", code, body)
	}
	if s2.ConfigDump().XDS.Connected {
		t.Error("connected to a control plane that is down")
	}
}

func TestRemovedListenerDrainsInFlightRequests(t *testing.T) {
	release := make(chan struct{})
	started := make(chan struct{}, 1)
	slow := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		started <- struct{}{}
		<-release
		fmt.Fprint(w, "finished")
	}))
	defer slow.Close()
	srv := xdstest.Start(t)
	port := freePort(t)
	srv.Set(t, node, "v1", httpResources(port, slow.Listener.Addr().String()))
	s := startSidecar(t, srv.Addr)
	testutil.Until(t, 5*time.Second, "sidecar ready", s.IsReady)

	result := make(chan string, 1)
	go func() {
		resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/slow", port))
		if err != nil {
			result <- "error: " + err.Error()
			return
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		result <- string(b)
	}()
	<-started
	srv.Set(t, node, "v2", xdstest.Resources{}) // the listener is removed
	testutil.Until(t, 5*time.Second, "listener removed", func() bool { return len(s.Listeners()) == 0 })
	if c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", port), time.Second); err == nil {
		c.Close()
		t.Error("a removed listener still accepts connections")
	}
	close(release)
	if got := <-result; got != "finished" {
		t.Errorf("in-flight request on the removed listener: %q, want it to finish", got)
	}
}
