package sidecar

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptrace"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/envoyproxy/go-control-plane/pkg/cache/types"

	"github.com/meshlet/meshlet/controlplane/xdsbuild"
	"github.com/meshlet/meshlet/internal/netnstest"
	"github.com/meshlet/meshlet/internal/testca"
	"github.com/meshlet/meshlet/internal/testutil"
	"github.com/meshlet/meshlet/xds"
	"github.com/meshlet/meshlet/xds/xdstest"
)

// captureUID is the uid the sidecar process runs as in TestCaptureInNetns:
// the REDIRECT rules skip its connections (-m owner ! --uid-owner), as the
// pod's rules skip the proxy's, so its own upstream connections (the
// pass-through's above all) are not redirected back to it.
const captureUID = 1337

// TestCaptureInNetns runs the sidecar binary, as uid captureUID, in a
// network namespace of the test's own whose iptables nat OUTPUT rules
// REDIRECT TCP to 10.96.0.0/16 and fd00:96::/64 (the "service" ranges) to
// port 15001, as a pod's interception does. The control plane is a real
// go-control-plane server listening inside the namespace. Unmodified
// clients in the namespace then reach, through the sidecar's capture
// listeners:
//   - http://10.96.0.12 (and [fd00:96::12]): the HTTP chain upstream:api,
//     whatever the Host header (routes via RDS "api");
//   - any address on port 6379: the TCP chain upstream:redis;
//   - 10.96.0.99:8000 (and [fd00:96::99]:8000), which no chain matches: a
//     server listening there, through the pass-through (ORIGINAL_DST);
//     once the control plane drops the default chain (registry-only), the
//     connection is refused with reason no_filter_chain, counted, and
//     logged once for the destination;
//   - 10.96.2.7:7000, an instance of a headless service (chain
//     direct:cache): over mTLS from the sidecar's ORIGINAL_DST cluster
//     passthrough~cache to that very address, the server seeing the
//     sidecar's SPIFFE ID and the cluster's SNI; 10.96.2.8:7000, which
//     presents another identity than cache's, is refused;
//
// connections to 10.96.1.10 (the pod's address: inbound) on the app's port
// 9080 get the public listener's mTLS chain (plaintext refused, as in
// strict mode), other ports pass through; and connections dialled to the
// capture ports directly (not redirected), or whose original destination
// is a capture listener, are refused.
//
// The sidecar runs as a process because its listeners must be bound inside
// the namespace (it binds from whatever thread handles the xDS update) and
// because the rules tell its connections from the clients' by uid.
func TestCaptureInNetns(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the sidecar and runs it in a network namespace with iptables rules (root); not in -short")
	}
	netnstest.Require(t, "ip", "iproute2", "iptables", "iptables", "ip6tables", "iptables")
	ns := netnstest.New(t)
	ns.Run(t, "ip", "addr", "add", "10.96.0.1/16", "dev", "lo") // on lo: all of 10.96.0.0/16 is local
	ns.Run(t, "ip", "-6", "addr", "add", "fd00:96::1/64", "dev", "lo")
	ns.Run(t, "ip", "-6", "addr", "add", "fd00:96::99/128", "dev", "lo")
	uid := strconv.Itoa(captureUID)
	ns.Run(t, "iptables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", "10.96.0.0/16", "-m", "owner", "!", "--uid-owner", uid,
		"-j", "REDIRECT", "--to-ports", strconv.Itoa(xds.OutboundCapturePort))
	ns.Run(t, "ip6tables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", "fd00:96::/64", "-m", "owner", "!", "--uid-owner", uid,
		"-j", "REDIRECT", "--to-ports", strconv.Itoa(xds.OutboundCapturePort))
	// 10.96.1.0/24 stands for the pod's own address: connections to it go
	// to the inbound capture listener (a pod's PREROUTING rule; OUTPUT
	// here, the clients being in the same namespace).
	ns.Run(t, "iptables", "-t", "nat", "-I", "OUTPUT", "1", "-p", "tcp", "-d", "10.96.1.0/24", "-m", "owner", "!", "--uid-owner", uid,
		"-j", "REDIRECT", "--to-ports", strconv.Itoa(xds.InboundCapturePort))

	api := startNSHTTP(t, ns, "127.0.0.1:0")
	redis := startLineServer(t, ns, "127.0.0.1:0", "redis")
	app := startLineServer(t, ns, "127.0.0.1:0", "app")
	direct := startLineServer(t, ns, "10.96.0.99:8000", "direct")
	direct6 := startLineServer(t, ns, "[fd00:96::99]:8000", "direct6")
	podPort := startLineServer(t, ns, "10.96.1.10:7000", "pod-port") // a port of the pod without a chain
	bypass := startLineServer(t, ns, "10.96.1.10:9080", "bypass")    // the app's port, reached without the sidecar
	ca, err := testca.New("test.consul")
	if err != nil {
		t.Fatal(err)
	}
	dbLeaf, webLeaf := ca.MustIssue("dc1", "db"), ca.MustIssue("dc1", "web")
	// cache is a headless service: its pods 10.96.2.7 and 10.96.2.8 serve
	// mTLS on port 7000 as their sidecars' inbound capture would; the
	// second presents web's certificate instead of cache's.
	cacheLeaf := ca.MustIssue("dc1", "cache")
	cache := startMTLSLineServer(t, ns, "10.96.2.7:7000", "cache-0", cacheLeaf, ca.CertPEM)
	impostor := startMTLSLineServer(t, ns, "10.96.2.8:7000", "cache-1", webLeaf, ca.CertPEM)
	webCert, err := tls.X509KeyPair([]byte(webLeaf.CertPEM), []byte(webLeaf.KeyPEM))
	if err != nil {
		t.Fatal(err)
	}

	const nodeID = "capture-test"
	res := func(passthrough bool) xdstest.Resources {
		r := captureNetnsResources(t, api.addr, redis.addr(), app.addr(), cacheLeaf.SPIFFEID, passthrough)
		r.Secrets = []types.Resource{xdsbuild.NewCertSecret(dbLeaf.CertPEM, dbLeaf.KeyPEM), xdsbuild.NewRootsSecret([]string{ca.CertPEM})}
		return r
	}
	srv, sc := startCaptureSidecar(t, ns, nodeID, res(true))
	client := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DialContext: ns.DialContext, DisableKeepAlives: true}}

	t.Run("HTTP chain, any Host", func(t *testing.T) {
		for _, target := range []struct{ url, listener string }{
			{"http://10.96.0.12/hello", xds.OutboundCaptureListener},
			{"http://[fd00:96::12]:80/hello", xds.OutboundCaptureListener + "_v6"},
		} {
			req, _ := http.NewRequest(http.MethodGet, target.url, nil)
			req.Host = "api.shop.svc" // what an application calling http://api.shop.svc sends
			resp, err := client.Do(req)
			if err != nil {
				t.Fatalf("GET %s: %v", target.url, err)
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != 200 || string(body) != "api /hello" {
				t.Fatalf("GET %s = %d %q, want 200 from the api server", target.url, resp.StatusCode, body)
			}
			if via := resp.Header.Get("Via"); !strings.Contains(via, "meshlet-capture") {
				t.Errorf("response Via = %q: not through the HTTP chain", via)
			}
			got := api.last.Load().(http.Header)
			if host := got.Get("X-Seen-Host"); host != "api.shop.svc" || !strings.Contains(got.Get("Via"), "meshlet-capture") {
				t.Errorf("upstream saw Host %q, Via %q", host, got.Get("Via"))
			}
			// Counted once the exchange is over, after the client has the answer.
			want := fmt.Sprintf(`meshlet_sidecar_requests_total{cluster="api",code="200",listener=%q,reason="",route="default"}`, target.listener)
			testutil.Until(t, 5*time.Second, want+" 1", func() bool { return sc.metric(t, want) == 1 })
		}
	})

	t.Run("TCP chain by port", func(t *testing.T) {
		if got := lineThrough(t, ns, "10.96.0.200:6379", "ping"); got != "redis: ping" {
			t.Errorf("10.96.0.200:6379 answered %q, want the redis echo", got)
		}
		if got := lineThrough(t, ns, "[fd00:96::5]:6379", "ping6"); got != "redis: ping6" {
			t.Errorf("[fd00:96::5]:6379 answered %q, want the redis echo", got)
		}
	})

	t.Run("pass-through to the original destination", func(t *testing.T) {
		if got := lineThrough(t, ns, "10.96.0.99:8000", "hello"); got != "direct: hello" {
			t.Errorf("10.96.0.99:8000 answered %q", got)
		}
		if got := lineThrough(t, ns, "[fd00:96::99]:8000", "hello"); got != "direct6: hello" {
			t.Errorf("[fd00:96::99]:8000 answered %q", got)
		}
		if n, n6 := direct.conns.Load(), direct6.conns.Load(); n != 1 || n6 != 1 {
			t.Errorf("pass-through servers accepted %d and %d connections, want 1 each (no loop)", n, n6)
		}
		for _, l := range []string{xds.OutboundCaptureListener, xds.OutboundCaptureListener + "_v6"} {
			want := fmt.Sprintf(`meshlet_sidecar_capture_passthrough_total{listener=%q}`, l)
			if v := sc.metric(t, want); v != 1 {
				t.Errorf("%s = %v, want 1", want, v)
			}
		}
		testutil.Until(t, 5*time.Second, "pass-through logged with its destination", func() bool {
			return sc.logCount("default chain", "destination=10.96.0.99:8000") == 1
		})
	})

	t.Run("headless service: ORIGINAL_DST cluster with mTLS to the dialled instance", func(t *testing.T) {
		if got := lineThrough(t, ns, "10.96.2.7:7000", "direct"); got != "cache-0: direct from "+dbLeaf.SPIFFEID {
			t.Errorf("10.96.2.7:7000 answered %q, want cache-0's answer to the sidecar's identity %s", got, dbLeaf.SPIFFEID)
		}
		if n := cache.conns.Load(); n != 1 {
			t.Errorf("cache-0 completed %d mTLS handshakes, want 1", n)
		}
		if sni := cache.sni.Load(); sni == nil || *sni != "cache.default.dc1.internal.test.consul" {
			t.Errorf("cache-0 saw SNI %v, want the cluster's", sni)
		}
		// An instance presenting another identity than the service's
		// SPIFFE ID fails the handshake: the connection is closed.
		refused(t, ns, "10.96.2.8:7000")
		want := `meshlet_sidecar_tls_handshakes_total{name="` + xds.DirectCluster("cache") + `",result="`
		testutil.Until(t, 5*time.Second, "the impostor's handshake counted as failed", func() bool {
			_, m := sc.get("/metrics")
			for line := range strings.Lines(m) {
				if strings.HasPrefix(line, want) && !strings.Contains(line, `result="ok"`) && !strings.HasSuffix(strings.TrimSpace(line), " 0") {
					return true
				}
			}
			return false
		})
		if n := impostor.lines.Load(); n != 0 {
			t.Errorf("the impostor received %d lines", n)
		}
	})

	t.Run("inbound: the public listener's mTLS chain on the app port, pass-through on others", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		raw, err := ns.DialContext(ctx, "tcp", "10.96.1.10:9080")
		if err != nil {
			t.Fatal(err)
		}
		c := tls.Client(raw, &tls.Config{Certificates: []tls.Certificate{webCert}, InsecureSkipVerify: true, MinVersion: tls.VersionTLS12}) // the server is checked below by its SPIFFE ID
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := fmt.Fprintf(c, "over mtls\n"); err != nil {
			t.Fatal(err)
		}
		if got, err := bufio.NewReader(c).ReadString('\n'); err != nil || got != "app: over mtls\n" {
			t.Fatalf("mTLS to 10.96.1.10:9080: %q, %v; want the app's answer", got, err)
		}
		if peer := c.ConnectionState().PeerCertificates; len(peer) == 0 || peer[0].URIs[0].String() != dbLeaf.SPIFFEID {
			t.Errorf("inbound capture presented %v, want the sidecar's certificate %s", peer, dbLeaf.SPIFFEID)
		}
		// Plaintext to the app port is refused as on the public listener in
		// strict mode, not passed through by the default chain.
		refused(t, ns, "10.96.1.10:9080")
		want := `meshlet_sidecar_tls_handshakes_total{name="inbound_listener",result="not_tls",side="inbound"}`
		testutil.Until(t, 5*time.Second, want+" 1", func() bool { return sc.metric(t, want) == 1 })
		if n := bypass.conns.Load(); n != 0 {
			t.Errorf("the app port was reached around the sidecar %d times", n)
		}
		if got := lineThrough(t, ns, "10.96.1.10:7000", "other port"); got != "pod-port: other port" {
			t.Errorf("10.96.1.10:7000 answered %q, want the pass-through to the pod's port", got)
		}
		if v := sc.metric(t, `meshlet_sidecar_capture_passthrough_total{listener="inbound_listener"}`); v != 1 {
			t.Errorf("inbound pass-through counted %v times, want 1", v)
		}
		if n := podPort.conns.Load(); n != 1 {
			t.Errorf("the pod's port accepted %d connections, want 1", n)
		}
	})

	t.Run("loop guard", func(t *testing.T) {
		for _, c := range []struct{ addr, listener, reason string }{
			{"127.0.0.1:15001", xds.OutboundCaptureListener, "not_redirected"}, // dialled directly
			{"[::1]:15001", xds.OutboundCaptureListener + "_v6", "not_redirected"},
			{"127.0.0.1:15006", xds.InboundCaptureListener, "not_redirected"},
			{"10.96.0.5:15006", xds.OutboundCaptureListener, "capture_loop"}, // redirected, to the inbound capture port
		} {
			refused(t, ns, c.addr)
			want := fmt.Sprintf(`meshlet_sidecar_capture_refused_total{listener=%q,reason=%q}`, c.listener, c.reason)
			testutil.Until(t, 5*time.Second, want, func() bool { return sc.metric(t, want) == 1 })
		}
	})

	t.Run("registry-only refuses unknown destinations", func(t *testing.T) {
		keep := &http.Transport{DialContext: ns.DialContext, MaxIdleConnsPerHost: 1}
		defer keep.CloseIdleConnections()
		kc := &http.Client{Timeout: 5 * time.Second, Transport: keep}
		var lastReused atomic.Bool
		getAPI := func() {
			t.Helper()
			trace := &httptrace.ClientTrace{GotConn: func(i httptrace.GotConnInfo) { lastReused.Store(i.Reused) }}
			req, _ := http.NewRequestWithContext(httptrace.WithClientTrace(context.Background(), trace), http.MethodGet, "http://10.96.0.12/again", nil)
			resp, err := kc.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != 200 || string(body) != "api /again" {
				t.Fatalf("GET http://10.96.0.12/again = %d %q", resp.StatusCode, body)
			}
		}
		getAPI()

		srv.Set(t, nodeID, "v2", res(false))
		testutil.Until(t, 10*time.Second, "v2 accepted", func() bool { return sc.version(t, xds.ListenerType) == "v2" })
		for range 3 {
			refused(t, ns, "10.96.0.99:8000")
		}
		want := `meshlet_sidecar_capture_refused_total{listener="outbound_listener",reason="no_filter_chain"}`
		testutil.Until(t, 5*time.Second, want+" 3", func() bool { return sc.metric(t, want) == 3 })
		if n := direct.conns.Load(); n != 1 {
			t.Errorf("the pass-through server accepted %d connections in all, want 1 (the one before registry-only)", n)
		}
		if n := sc.logCount("connection refused", "reason=no_filter_chain", "destination=10.96.0.99:8000"); n != 1 {
			t.Errorf("%d log lines for the refused destination, want 1 (once per destination per minute)", n)
		}
		// The chains that stayed kept their handlers: the keep-alive
		// connection opened before the update still serves.
		getAPI()
		if !lastReused.Load() {
			t.Errorf("the HTTP chain's keep-alive connection did not survive an update that kept the chain")
		}
		if got := lineThrough(t, ns, "10.96.0.200:6379", "still"); got != "redis: still" {
			t.Errorf("TCP chain after the update answered %q", got)
		}
	})
	if t.Failed() {
		_, m := sc.get("/metrics")
		t.Logf("metrics:\n%s", grepLines(m, "meshlet_sidecar_capture", "meshlet_sidecar_requests_total"))
	}
}

// captureNetnsResources are TestCaptureInNetns's resources: the outbound
// capture listeners on 127.0.0.1:15001 and [::1]:15001 with the chains
// upstream:api (10.96.0.12, fd00:96::12 port 80; HTTP, RDS "api") and
// upstream:redis (port 6379; TCP), direct:cache (10.96.2.7, 10.96.2.8 port 7000; TCP to the ORIGINAL_DST
// cluster passthrough~cache, mTLS requiring cacheID) and the pass-through
// when passthrough; the inbound capture listener on 0.0.0.0:15006 (port 9080: the strict
// public listener's mTLS chain to local_app; other ports: pass-through);
// STATIC clusters api, redis and local_app, and the ORIGINAL_DST clusters
// original-destination (plaintext) and passthrough~cache (mTLS).
func captureNetnsResources(t testing.TB, api, redis, app, cacheID string, passthrough bool) xdstest.Resources {
	t.Helper()
	direct := xdsbuild.NewTCPProxyListener(xds.DirectChain("cache"), "127.0.0.1", 1, xds.DirectCluster("cache"), xdsbuild.TCPProxyOptions{}).FilterChains[0].Filters
	chains := []xdsbuild.CaptureChain{
		{Name: xds.DirectChain("cache"), Port: 7000, Prefixes: []netip.Prefix{netip.MustParsePrefix("10.96.2.7/32"), netip.MustParsePrefix("10.96.2.8/32")}, Filters: direct},
		{Name: "upstream:api", Port: 80, Prefixes: []netip.Prefix{netip.MustParsePrefix("10.96.0.12/32"), netip.MustParsePrefix("fd00:96::12/128")},
			Filters: xdsbuild.NewHTTPListener("upstream:api", "127.0.0.1", 1, xdsbuild.HTTPListenerOptions{RouteConfigName: "api", Via: "meshlet-capture"}).FilterChains[0].Filters},
		{Name: "upstream:redis", Port: 6379, Filters: xdsbuild.NewTCPProxyListener("upstream:redis", "127.0.0.1", 1, "redis", xdsbuild.TCPProxyOptions{}).FilterChains[0].Filters},
	}
	out := xdsbuild.CaptureOptions{Chains: chains, Passthrough: passthrough}
	pub := xdsbuild.NewInboundListener(xds.PublicListener, "0.0.0.0", 1, xdsbuild.InboundOptions{TLS: xdsbuild.DownstreamTLS("", nil)})
	in := xdsbuild.CaptureOptions{Passthrough: true, Chains: []xdsbuild.CaptureChain{
		{Name: "inbound:app", Port: 9080, Filters: pub.FilterChains[0].Filters, TransportSocket: pub.FilterChains[0].TransportSocket},
	}}
	static := func(name, addr string, p xds.Protocol) types.Resource {
		h, port := hostPort(t, addr)
		return xdsbuild.NewStaticCluster(name, h, port, xdsbuild.ClusterOptions{Protocol: p})
	}
	return xdstest.Resources{
		Listeners: []types.Resource{
			xdsbuild.NewCaptureListener(xds.OutboundCaptureListener, "127.0.0.1", xds.OutboundCapturePort, out),
			xdsbuild.NewCaptureListener(xds.OutboundCaptureListener+"_v6", "::1", xds.OutboundCapturePort, out),
			xdsbuild.NewCaptureListener(xds.InboundCaptureListener, "0.0.0.0", xds.InboundCapturePort, in),
		},
		Routes: []types.Resource{xdsbuild.NewRouteConfig("api", "api", xdsbuild.RouteOptions{})},
		Clusters: []types.Resource{static("api", api, xds.ProtocolHTTP), static("redis", redis, xds.ProtocolTCP),
			static(xds.LocalAppCluster, app, xds.ProtocolTCP), xdsbuild.NewPassthroughCluster(),
			xdsbuild.NewDirectCluster(xds.DirectCluster("cache"), xdsbuild.ClusterOptions{TLS: xdsbuild.UpstreamTLS("", "cache.default.dc1.internal.test.consul", cacheID, nil)})},
	}
}

// startCaptureSidecar starts a go-control-plane server listening inside
// ns that serves res to nodeID as version "v1", then the sidecar inside
// ns as captureUID (startNSSidecar), and waits until the sidecar is ready
// (its listeners bound). TestCaptureInNetns and BenchmarkInterception
// share it; both stop when t ends.
func startCaptureSidecar(t testing.TB, ns *netnstest.NS, nodeID string, res xdstest.Resources) (*xdstest.Server, *nsSidecar) {
	t.Helper()
	xdsLn, err := ns.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := xdstest.StartOn(t, xdsLn)
	srv.Set(t, nodeID, "v1", res)
	sc := startNSSidecar(t, ns, nodeID, srv.Addr)
	testutil.Until(t, 20*time.Second, "sidecar ready", func() bool {
		code, _ := sc.get("/ready")
		return code == http.StatusOK
	})
	return srv, sc
}

// nsSidecar is the sidecar process of TestCaptureInNetns and
// BenchmarkInterception.
type nsSidecar struct {
	ns     *netnstest.NS
	admin  string
	log    string // path of its log
	client *http.Client
}

// captureSidecarBinary returns $MESHLET_SIDECAR_BIN, else the sidecar
// built into the test's temporary directory, made readable by captureUID.
func captureSidecarBinary(t testing.TB) string {
	t.Helper()
	if p := os.Getenv("MESHLET_SIDECAR_BIN"); p != "" {
		return p
	}
	dir := t.TempDir()
	for _, d := range []string{filepath.Dir(dir), dir} { // both 0700 as made
		if err := os.Chmod(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	bin := filepath.Join(dir, "sidecar")
	if out, err := exec.Command("go", "build", "-o", bin, "github.com/meshlet/meshlet/sidecar/cmd/sidecar").CombinedOutput(); err != nil {
		t.Fatalf("go build sidecar: %v\n%s", err, out)
	}
	return bin
}

// startNSSidecar runs the sidecar inside ns as captureUID, stopped (SIGTERM,
// then SIGKILL) when t ends; its log is shown when t fails.
func startNSSidecar(t testing.TB, ns *netnstest.NS, nodeID, xdsAddr string) *nsSidecar {
	t.Helper()
	bin := captureSidecarBinary(t)
	logf, err := os.Create(filepath.Join(t.TempDir(), "sidecar.log"))
	if err != nil {
		t.Fatal(err)
	}
	const admin = "127.0.0.1:19000" // the namespace is the test's own: any port is free
	// The xDS server is the test's own plaintext xdstest server.
	cmd := exec.Command(bin, "-node-id", nodeID, "-xds-addr", xdsAddr, "-xds-insecure", "-admin-addr", admin, "-drain-timeout", "1s",
		"-log-level", "debug", "-reclaim-startup-memory=false")
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Credential: &syscall.Credential{Uid: captureUID, Gid: captureUID}}
	if err := ns.Start(cmd); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { _ = cmd.Wait(); close(exited) }()
	sc := &nsSidecar{ns: ns, admin: "http://" + admin, log: logf.Name(),
		client: &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DialContext: ns.DialContext, DisableKeepAlives: true}}}
	t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(10 * time.Second):
			_ = cmd.Process.Kill()
			<-exited
		}
		logf.Close()
		if t.Failed() {
			b, _ := os.ReadFile(logf.Name())
			t.Logf("--- sidecar log:\n%s", b)
		}
	})
	return sc
}

// get fetches an admin path; code 0 when the sidecar does not answer.
func (sc *nsSidecar) get(path string) (int, string) {
	resp, err := sc.client.Get(sc.admin + path)
	if err != nil {
		return 0, err.Error()
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// metric returns the value of the exposition line starting with series
// (name and labels), 0 when absent.
func (sc *nsSidecar) metric(t testing.TB, series string) float64 {
	t.Helper()
	code, body := sc.get("/metrics")
	if code != http.StatusOK {
		t.Fatalf("/metrics: %d %s", code, body)
	}
	for line := range strings.Lines(body) {
		if rest, ok := strings.CutPrefix(line, series+" "); ok {
			v, err := strconv.ParseFloat(strings.TrimSpace(rest), 64)
			if err != nil {
				t.Fatalf("%s: %v", line, err)
			}
			return v
		}
	}
	return 0
}

// version returns the accepted version of an xDS type (config_dump).
func (sc *nsSidecar) version(t *testing.T, typeURL string) string {
	t.Helper()
	_, body := sc.get("/config_dump")
	var d struct {
		XDS struct {
			Versions map[string]string `json:"versions"`
		} `json:"xds"`
	}
	if err := json.Unmarshal([]byte(body), &d); err != nil {
		t.Fatalf("/config_dump: %v", err)
	}
	return d.XDS.Versions[typeURL]
}

// logCount returns how many lines of the sidecar's log contain all of subs.
func (sc *nsSidecar) logCount(subs ...string) int {
	b, _ := os.ReadFile(sc.log)
	n := 0
	for line := range strings.Lines(string(b)) {
		all := true
		for _, s := range subs {
			all = all && strings.Contains(line, s)
		}
		if all {
			n++
		}
	}
	return n
}

func grepLines(text string, subs ...string) string {
	var b strings.Builder
	for line := range strings.Lines(text) {
		for _, s := range subs {
			if strings.Contains(line, s) && !strings.HasPrefix(line, "#") {
				b.WriteString(line)
				break
			}
		}
	}
	return b.String()
}

// nsHTTP is an HTTP server in the namespace answering "api <path>" and
// recording the last request's headers (and Host as X-Seen-Host).
type nsHTTP struct {
	addr string
	last atomic.Value // http.Header
}

func startNSHTTP(t testing.TB, ns *netnstest.NS, addr string) *nsHTTP {
	t.Helper()
	l, err := ns.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	s := &nsHTTP{addr: l.Addr().String()}
	s.last.Store(http.Header{})
	hs := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h := r.Header.Clone()
		h.Set("X-Seen-Host", r.Host)
		s.last.Store(h)
		fmt.Fprintf(w, "api %s", r.URL.Path)
	}), ReadHeaderTimeout: 5 * time.Second}
	done := make(chan struct{})
	go func() { defer close(done); _ = hs.Serve(l) }()
	t.Cleanup(func() { hs.Close(); <-done })
	return s
}

// lineServer answers each line with "<name>: <line>", counting connections.
type lineServer struct {
	l     net.Listener
	conns atomic.Int64
}

func (s *lineServer) addr() string { return s.l.Addr().String() }

func startLineServer(t *testing.T, ns *netnstest.NS, addr, name string) *lineServer {
	t.Helper()
	l, err := ns.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	s := &lineServer{l: l}
	var wg sync.WaitGroup
	var mu sync.Mutex
	open := map[net.Conn]bool{}
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			s.conns.Add(1)
			mu.Lock()
			open[c] = true
			mu.Unlock()
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer func() { mu.Lock(); delete(open, c); mu.Unlock(); c.Close() }()
				sc := bufio.NewScanner(c)
				for sc.Scan() {
					if _, err := fmt.Fprintf(c, "%s: %s\n", name, sc.Text()); err != nil {
						return
					}
				}
			}()
		}
	}()
	t.Cleanup(func() {
		l.Close()
		mu.Lock()
		for c := range open {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	return s
}

// mtlsLineServer is a lineServer behind mTLS, as a headless service's pod
// is behind its sidecar's inbound capture listener: it presents leaf,
// requires a client certificate of the CA and answers each line with
// "<name>: <line> from <client SPIFFE ID>".
type mtlsLineServer struct {
	conns atomic.Int64           // completed handshakes
	lines atomic.Int64           // lines answered
	sni   atomic.Pointer[string] // the last handshake's server name
}

func startMTLSLineServer(t *testing.T, ns *netnstest.NS, addr, name string, leaf *testca.Leaf, caPEM string) *mtlsLineServer {
	t.Helper()
	cert, err := tls.X509KeyPair([]byte(leaf.CertPEM), []byte(leaf.KeyPEM))
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM([]byte(caPEM))
	l, err := ns.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	s := &mtlsLineServer{}
	cfg := &tls.Config{Certificates: []tls.Certificate{cert}, ClientAuth: tls.RequireAndVerifyClientCert, ClientCAs: pool, MinVersion: tls.VersionTLS12}
	var wg sync.WaitGroup
	var mu sync.Mutex
	open := map[net.Conn]bool{}
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			raw, err := l.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			open[raw] = true
			mu.Unlock()
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer func() { mu.Lock(); delete(open, raw); mu.Unlock(); raw.Close() }()
				c := tls.Server(raw, cfg)
				_ = c.SetDeadline(time.Now().Add(10 * time.Second))
				if err := c.Handshake(); err != nil {
					return
				}
				s.conns.Add(1)
				st := c.ConnectionState()
				sni := st.ServerName
				s.sni.Store(&sni)
				peer := ""
				if len(st.PeerCertificates) > 0 && len(st.PeerCertificates[0].URIs) > 0 {
					peer = st.PeerCertificates[0].URIs[0].String()
				}
				sc := bufio.NewScanner(c)
				for sc.Scan() {
					s.lines.Add(1)
					if _, err := fmt.Fprintf(c, "%s: %s from %s\n", name, sc.Text(), peer); err != nil {
						return
					}
				}
			}()
		}
	}()
	t.Cleanup(func() {
		l.Close()
		mu.Lock()
		for c := range open {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	return s
}

// lineThrough dials addr from the namespace, sends line and returns the
// answer line.
func lineThrough(t *testing.T, ns *netnstest.NS, addr, line string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := ns.DialContext(ctx, "tcp", addr)
	if err != nil {
		t.Fatalf("dial %s: %v", addr, err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := fmt.Fprintf(c, "%s\n", line); err != nil {
		t.Fatalf("%s: %v", addr, err)
	}
	got, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		t.Fatalf("%s: read: %v (got %q)", addr, err, got)
	}
	return strings.TrimSuffix(got, "\n")
}

// refused dials addr from the namespace and checks the sidecar closes the
// connection without a byte.
func refused(t *testing.T, ns *netnstest.NS, addr string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := ns.DialContext(ctx, "tcp", addr)
	if err != nil {
		t.Fatalf("dial %s: %v", addr, err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	_, _ = c.Write([]byte("hello\n"))
	if n, err := c.Read(make([]byte, 64)); err == nil || n > 0 || isTimeout(err) {
		t.Fatalf("%s: read %d bytes, %v; want the connection closed", addr, n, err)
	}
}
