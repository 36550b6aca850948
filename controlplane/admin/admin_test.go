package admin

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/meshlet/meshlet/controlplane/explain"
	"github.com/meshlet/meshlet/controlplane/server"
	"github.com/meshlet/meshlet/controlplane/translate"
	"github.com/meshlet/meshlet/controlplane/xdsauth"
	"github.com/meshlet/meshlet/internal/fixtures"
	"github.com/meshlet/meshlet/internal/golden"
	"github.com/meshlet/meshlet/xds"
)

// fakeSource serves a fixed status.
type fakeSource struct {
	ready bool
	st    *server.Status
}

func (f *fakeSource) Ready() (bool, string) {
	if !f.ready {
		return false, "waiting for the first Consul catalog"
	}
	return true, ""
}

func (f *fakeSource) Status() *server.Status { return f.st }

// Why explains on the transparent fixture catalog.
func (f *fakeSource) Why(proxy string, dst netip.AddrPort, o explain.Options) (*explain.Report, error) {
	cat := fixtures.TransparentCatalog()
	p, err := explain.Find(cat, proxy)
	if err != nil {
		return nil, err
	}
	return explain.Why(cat, nil, p, dst, o)
}

var _ Source = (*fakeSource)(nil)

// sampleStatus has three sidecars (one rejecting its routes, one not
// connected, one held back; the connected ones authenticated), a
// proxyless client (not authenticated), and a rejection whose error names
// no resource.
func sampleStatus() *server.Status {
	at := time.Date(2025, 3, 1, 12, 0, 5, 0, time.UTC)
	since := at.Add(-time.Minute)
	all := func(v string) map[string]string {
		return map[string]string{xds.ListenerType: v, xds.RouteType: v, xds.ClusterType: v, xds.EndpointType: v, xds.SecretType: v}
	}
	web := all("1111111111111111")
	web[xds.RouteType] = "2222222222222222"
	webACKed := all("1111111111111111")
	webACKed[xds.RouteType] = "0000000000000000"
	return &server.Status{
		Time: at, Ready: true,
		Proxies: []server.ProxyStatus{
			{Node: "api-1-sidecar-proxy", Kind: server.KindSidecar, Service: "api", Registered: true, Connected: true, Streams: 1,
				ConnectedSince: &since, Identity: "consul-token:6a1253d2-1785-24fd-91c2-f8e78c745511", Snapshot: all("aaaaaaaaaaaaaaaa"), Sent: all("aaaaaaaaaaaaaaaa"), ACKed: all("aaaaaaaaaaaaaaaa")},
			{Node: "grpc-client-1", Kind: server.KindProxyless, Connected: true, Streams: 1, ConnectedSince: &since,
				Snapshot: all("cccccccccccccccc"), Sent: all("cccccccccccccccc"), ACKed: all("bbbbbbbbbbbbbbbb")},
			{Node: "store-1-sidecar-proxy", Kind: server.KindSidecar, Service: "store", Registered: true,
				HeldBack: `not ready: waiting for the leaf certificate of service "store"`},
			{Node: "web-1-sidecar-proxy", Kind: server.KindSidecar, Service: "web", Registered: true, Connected: true, Streams: 2,
				ConnectedSince: &since, Identity: "kubernetes:default/web pod web-7d9c/uid-3f1c", Snapshot: web, Sent: web, ACKed: webACKed},
		},
		Rejections: []server.Rejection{
			{Node: "grpc-client-1", TypeURL: xds.ClusterType, Version: "cccccccccccccccc", AcceptedVersion: "bbbbbbbbbbbbbbbb",
				Error: "unsupported load balancing policy\nand another problem", Time: at, FirstTime: at, Count: 1, Named: false,
				Resources: []server.RejectedResource{
					{Name: "api", Sources: []translate.Source{{Origin: translate.OriginConsul, Kind: translate.ConsulService, Name: "api", Detail: "catalog"}}},
					{Name: "store"},
				}},
			{Node: "web-1-sidecar-proxy", TypeURL: xds.RouteType, Version: "2222222222222222", AcceptedVersion: "0000000000000000",
				Error: `resources[0]: route configuration "api": virtual_hosts[0].routes[0]: route.retry_policy: retry_on: unsupported condition "envoy-ratelimited"`,
				Time:  at, FirstTime: at.Add(-3 * time.Second), Count: 2, Named: true,
				Resources: []server.RejectedResource{{Name: "api", Sources: []translate.Source{
					{Origin: translate.OriginPolicy, Kind: "RetryPolicy", Name: "api-retries", File: "policies/retry.yaml", Line: 1},
					{Origin: translate.OriginPolicy, Kind: "ServiceDefaults", Name: "api", File: "policies/services.yaml", Line: 7},
					{Origin: translate.OriginConsul, Kind: translate.ConsulConnectProxy, Name: "web-1-sidecar-proxy", Detail: "upstream api"},
				}}}},
		},
		Denials: []xdsauth.Denial{
			{Reason: xds.DenyNoCredential, Peer: "10.244.0.9", Detail: "no bearer token in the authorization metadata", Count: 3, First: since, Last: at},
			{Reason: xds.DenyWrongNode, Peer: "10.244.0.12", Identity: "kubernetes:shop/web pod web-7d9c", Node: "api-1-sidecar-proxy",
				Detail: `node "api-1-sidecar-proxy" is the proxy of pod shop/api-5c4f, not of the token's pod shop/web-7d9c`, Count: 1, First: at, Last: at},
		},
	}
}

func TestWriteTextGolden(t *testing.T) {
	var b bytes.Buffer
	if err := WriteText(&b, "127.0.0.1:19100", sampleStatus()); err != nil {
		t.Fatal(err)
	}
	golden.Check(t, "status.golden.txt", b.Bytes())

	b.Reset()
	if err := WriteText(&b, "127.0.0.1:19100", &server.Status{Waiting: "waiting for the first Consul catalog"}); err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(b.String(), "control plane 127.0.0.1:19100: not ready (waiting for the first Consul catalog); 0 proxies, 0 connected; 0 rejections") {
		t.Errorf("empty status:\n%s", b.String())
	}
}

func get(t *testing.T, url string) (int, string) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, string(b)
}

func TestHandler(t *testing.T) {
	src := &fakeSource{st: sampleStatus()}
	reg := prometheus.NewRegistry()
	c := prometheus.NewCounter(prometheus.CounterOpts{Name: "meshlet_controlplane_test_total", Help: "A test counter."})
	c.Add(3)
	reg.MustRegister(c)
	tests := []struct {
		name  string
		pprof bool
		path  string
		ready bool
		code  int
		body  string
	}{
		{name: "not ready", path: "/ready", code: 503, body: "initializing: waiting for the first Consul catalog\n"},
		{name: "ready", path: "/ready", ready: true, code: 200, body: "ready\n"},
		{name: "metrics", path: "/metrics", code: 200, body: "meshlet_controlplane_test_total 3"},
		{name: "status", path: "/status", code: 200, body: `"node": "web-1-sidecar-proxy"`},
		{name: "status shows identities", path: "/status", code: 200, body: `"identity": "kubernetes:default/web pod web-7d9c/uid-3f1c"`},
		{name: "no pprof by default", path: "/debug/pprof/", code: 404},
		{name: "pprof when asked", pprof: true, path: "/debug/pprof/", code: 200, body: "goroutine"},
		{name: "status is read-only", path: "/status?x", code: 200},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			src.ready = tc.ready
			srv := httptest.NewServer(Handler(src, reg, Options{Pprof: tc.pprof}))
			defer srv.Close()
			code, body := get(t, srv.URL+tc.path)
			if code != tc.code || !strings.Contains(body, tc.body) {
				t.Errorf("GET %s = %d %q, want %d with %q", tc.path, code, body, tc.code, tc.body)
			}
		})
	}
	srv := httptest.NewServer(Handler(src, reg, Options{}))
	defer srv.Close()
	resp, err := http.Post(srv.URL+"/status", "text/plain", nil)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusMethodNotAllowed {
		t.Errorf("POST /status = %d, want 405", resp.StatusCode)
	}
}

// closedAddr returns a loopback address nothing listens on.
func closedAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	return addr
}

func TestStatusCommand(t *testing.T) {
	clean := sampleStatus()
	clean.Rejections = nil
	down := closedAddr(t)
	tests := []struct {
		name     string
		st       *server.Status
		args     []string // the admin address is appended when st is set
		code     int
		out, err []string
	}{
		{name: "rejections", st: sampleStatus(), code: ExitRejections,
			out: []string{"web-1-sidecar-proxy", xds.RouteType, `retry_on: unsupported condition "envoy-ratelimited"`, "policies/retry.yaml:1 (RetryPolicy api-retries)"}},
		{name: "no rejections", st: clean, code: ExitOK, out: []string{"0 rejections", "api-1-sidecar-proxy"}},
		{name: "json", st: sampleStatus(), args: []string{"-json"}, code: ExitRejections, out: []string{`"typeUrl": "` + xds.RouteType + `"`}},
		{name: "unreachable", args: []string{"-admin-addr", down}, code: ExitUnreachable,
			err: []string{"control plane admin API unreachable at " + down, "is the control plane running with -admin-addr " + down}},
		{name: "bad flag", args: []string{"-nope"}, code: ExitUnreachable, err: []string{"flag provided but not defined"}},
		{name: "extra argument", args: []string{"web"}, code: ExitUnreachable, err: []string{"usage: controlplane status"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			args := tc.args
			if tc.st != nil {
				srv := httptest.NewServer(Handler(&fakeSource{ready: true, st: tc.st}, prometheus.NewRegistry(), Options{}))
				defer srv.Close()
				args = append(args, "-admin-addr", srv.Listener.Addr().String())
			}
			var out, errb bytes.Buffer
			code := StatusCommand(context.Background(), args, &out, &errb)
			if code != tc.code {
				t.Errorf("exit %d, want %d; stderr %q", code, tc.code, errb.String())
			}
			for _, w := range tc.out {
				if !strings.Contains(out.String(), w) {
					t.Errorf("stdout lacks %q:\n%s", w, out.String())
				}
			}
			for _, w := range tc.err {
				if !strings.Contains(errb.String(), w) {
					t.Errorf("stderr lacks %q:\n%s", w, errb.String())
				}
			}
			if tc.name == "json" {
				var st server.Status
				if err := json.Unmarshal(out.Bytes(), &st); err != nil || len(st.Rejections) != 2 {
					t.Errorf("-json output does not decode to the status: %v", err)
				}
			}
		})
	}
}

func TestFetchErrors(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/status" && r.URL.RawQuery == "" {
			http.Error(w, "boom", http.StatusInternalServerError)
		}
	}))
	defer srv.Close()
	if _, _, err := Fetch(context.Background(), nil, srv.URL); err == nil || !strings.Contains(err.Error(), "500") {
		t.Errorf("Fetch from a failing server: %v", err)
	}
	notStatus := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { io.WriteString(w, "<html>") }))
	defer notStatus.Close()
	if _, _, err := Fetch(context.Background(), nil, notStatus.URL); err == nil || !strings.Contains(err.Error(), "not a control plane status") {
		t.Errorf("Fetch of HTML: %v", err)
	}
}

func TestURL(t *testing.T) {
	for in, want := range map[string]string{
		"127.0.0.1:19100":         "http://127.0.0.1:19100",
		"http://127.0.0.1:19100/": "http://127.0.0.1:19100",
		"https://cp.example:443":  "https://cp.example:443",
	} {
		if got := URL(in); got != want {
			t.Errorf("URL(%q) = %q, want %q", in, got, want)
		}
	}
}

// TestWhyCommand: `controlplane why` against the admin API: a report in
// text and JSON, exit 1 for an unknown proxy, 2 for a bad address or an
// unreachable API.
func TestWhyCommand(t *testing.T) {
	srv := httptest.NewServer(Handler(&fakeSource{ready: true}, prometheus.NewRegistry(), Options{}))
	defer srv.Close()
	run := func(args ...string) (int, string, string) {
		var out, errb bytes.Buffer
		code := WhyCommand(context.Background(), args, &out, &errb)
		return code, out.String(), errb.String()
	}
	code, out, _ := run("-admin-addr", srv.URL, "web-1", "10.96.0.20:80")
	if code != 0 || !strings.Contains(out, "web-1-web-sidecar-proxy (web) → 10.96.0.20:80") || !strings.Contains(out, "outcome: mesh") {
		t.Errorf("exit %d, output:\n%s", code, out)
	}
	code, out, _ = run("-admin-addr", srv.URL, "-json", "web-1", "10.96.0.40:80")
	var rep explain.Report
	if code != 0 || json.Unmarshal([]byte(out), &rep) != nil || rep.Outcome != explain.OutcomeDenied {
		t.Errorf("json: exit %d, %s", code, out)
	}
	if code, _, errs := run("-admin-addr", srv.URL, "nope", "10.96.0.20:80"); code != 1 || !strings.Contains(errs, "neither a proxy service ID nor a pod") {
		t.Errorf("unknown proxy: exit %d, %s", code, errs)
	}
	if code, _, errs := run("-admin-addr", srv.URL, "web-1", "api:80"); code != 2 || !strings.Contains(errs, "want ip:port") {
		t.Errorf("bad address: exit %d, %s", code, errs)
	}
	if code, _, _ := run("-admin-addr", "127.0.0.1:1", "web-1", "10.96.0.20:80"); code != 2 {
		t.Errorf("unreachable: exit %d", code)
	}
}
