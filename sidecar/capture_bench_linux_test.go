package sidecar

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"strconv"
	"testing"
	"time"

	"github.com/envoyproxy/go-control-plane/pkg/cache/types"

	"github.com/meshlet/meshlet/controlplane/xdsbuild"
	"github.com/meshlet/meshlet/internal/netnstest"
	"github.com/meshlet/meshlet/internal/testutil"
	"github.com/meshlet/meshlet/sidecar/intercept"
	"github.com/meshlet/meshlet/xds"
	"github.com/meshlet/meshlet/xds/xdstest"
)

// BenchmarkInterception measures what transparent interception costs: the
// REDIRECT of the pod's rules (intercept.Install, as the init container
// installs them), the sidecar's SO_ORIGINAL_DST lookup and the outbound
// capture listener's filter-chain selection, against the same traffic
// sent to an explicit upstream listener (127.0.0.1:benchExplicitPort).
// Both paths end in the same HTTP connection manager (one listener's
// filters, reused as the capture chain's) routing to the same STATIC
// cluster and upstream server, so interception is the only difference.
//
// The world is TestCaptureInNetns's (startCaptureSidecar): the sidecar
// binary runs as captureUID in a network namespace of the benchmark's own,
// fed by an xDS server inside it. The namespace has a veth interface
// carrying the default route, as a pod's eth0 does, so the virtual
// address 10.96.0.12:80 leaves through it and is redirected (the rules
// never redirect "-o lo").
//
//   - explicit/conn, capture/conn: per op, a new TCP connection to
//     127.0.0.1:benchExplicitPort or to 10.96.0.12:80 (redirected to
//     15001), one GET (Connection: close), then close;
//   - explicit/request, capture/request: per op, one GET on a keep-alive
//     connection opened before the timer starts.
//
// ns/op and allocs/op are the client's (and the in-process upstream's);
// the sidecar is another process, so its cost is reported from its own
// metrics around the timed loop: sidecar-cpu-ns/op (process CPU time, at
// the kernel's 10ms tick resolution: use a few thousand ops) and
// sidecar-allocs/op (go_memstats_mallocs_total, less one /metrics scrape's
// own allocations; the runtime counts it per span and without tiny
// allocations, so it is approximate). Compare capture to explicit as
// ratios. It needs root, ip and iptables; it is skipped otherwise and
// with -short.
func BenchmarkInterception(b *testing.B) {
	requireInterceptionBench(b)
	ns := netnstest.New(b)
	for _, args := range [][]string{
		{"link", "add", "bench0", "type", "veth", "peer", "name", "bench1"},
		{"addr", "add", "10.77.0.2/24", "dev", "bench0"},
		{"link", "set", "bench0", "up"},
		{"link", "set", "bench1", "up"},
		{"route", "add", "default", "dev", "bench0"},
	} {
		ns.Run(b, "ip", args...)
	}
	// Thousands of short connections: every ephemeral port, and reuse of
	// those in TIME_WAIT (namespace-local settings).
	if err := ns.Do(func() error {
		for f, v := range map[string]string{"ip_local_port_range": "1024 65000", "tcp_tw_reuse": "1"} {
			if err := os.WriteFile("/proc/sys/net/ipv4/"+f, []byte(v), 0o644); err != nil {
				return err
			}
		}
		return nil
	}); err != nil {
		b.Fatal(err)
	}
	installInterception(b, ns)

	api := startNSHTTP(b, ns, "127.0.0.1:0")
	apiHost, apiPort := hostPort(b, api.addr)
	explicit := xdsbuild.NewHTTPListener(benchChain, "127.0.0.1", benchExplicitPort, xdsbuild.HTTPListenerOptions{RouteConfigName: "api"})
	hcm := explicit.FilterChains[0].Filters // the capture chain's too
	capture := xdsbuild.NewCaptureListener(xds.OutboundCaptureListener, "127.0.0.1", xds.OutboundCapturePort, xdsbuild.CaptureOptions{
		Passthrough: true, // as a pod's default (allow any)
		Chains: []xdsbuild.CaptureChain{
			{Name: benchChain, Port: 80, Prefixes: []netip.Prefix{netip.MustParsePrefix("10.96.0.12/32")}, Filters: hcm},
			// Another service, so selecting is not trivial.
			{Name: "upstream:other", Port: 80, Prefixes: []netip.Prefix{netip.MustParsePrefix("10.96.0.13/32")},
				Filters: xdsbuild.NewHTTPListener("upstream:other", "127.0.0.1", 1, xdsbuild.HTTPListenerOptions{RouteConfigName: "api"}).FilterChains[0].Filters},
			{Name: "upstream:redis", Port: 6379, Filters: xdsbuild.NewTCPProxyListener("upstream:redis", "127.0.0.1", 1, "api", xdsbuild.TCPProxyOptions{}).FilterChains[0].Filters},
		},
	})
	res := xdstest.Resources{
		Listeners: []types.Resource{explicit, capture},
		Routes:    []types.Resource{xdsbuild.NewRouteConfig("api", "api", xdsbuild.RouteOptions{})},
		Clusters: []types.Resource{xdsbuild.NewStaticCluster("api", apiHost, apiPort, xdsbuild.ClusterOptions{Protocol: xds.ProtocolHTTP}),
			xdsbuild.NewPassthroughCluster()},
	}
	_, sc := startCaptureSidecar(b, ns, "interception-bench", res)

	targets := map[string]string{"explicit": net.JoinHostPort("127.0.0.1", strconv.Itoa(benchExplicitPort)), "capture": "10.96.0.12:80"}
	served := map[string]string{"explicit": benchChain, "capture": xds.OutboundCaptureListener}
	counted := func(path string) float64 {
		return sc.metric(b, fmt.Sprintf(`meshlet_sidecar_requests_total{cluster="api",code="200",listener=%q,reason="",route="default"}`, served[path]))
	}
	// Each path answers, through the listener it is meant to.
	for _, path := range []string{"explicit", "capture"} {
		if err := ns.Do(func() error { return benchConn(targets[path]) }); err != nil {
			b.Fatalf("%s (%s): %v", path, targets[path], err)
		}
		testutil.Until(b, 5*time.Second, path+" request counted on "+served[path], func() bool { return counted(path) == 1 })
	}

	// Warm up the sidecar (heap, goroutine stacks, upstream pool) and the
	// namespace on both paths: without it the first sub-benchmark is the
	// slowest, whichever it is.
	for _, path := range []string{"explicit", "capture"} {
		if err := ns.Do(func() error {
			for range benchWarmup {
				if err := benchConn(targets[path]); err != nil {
					return err
				}
			}
			return nil
		}); err != nil {
			b.Fatalf("%s warm-up: %v", path, err)
		}
	}

	for _, mode := range []string{"conn", "request"} {
		for _, path := range []string{"explicit", "capture"} {
			b.Run(path+"/"+mode, func(b *testing.B) {
				b.StopTimer()
				before := counted(path)
				// A scrape's own allocations, taken out of the loop's.
				scrape := -sc.metric(b, "go_memstats_mallocs_total")
				allocs0 := sc.metric(b, "go_memstats_mallocs_total")
				scrape += allocs0
				cpu0 := sc.metric(b, "process_cpu_seconds_total")
				b.ReportAllocs()
				b.ResetTimer() // the timed part is in benchConns and benchRequests
				if mode == "conn" {
					benchConns(b, ns, targets[path])
				} else {
					benchRequests(b, ns, targets[path])
				}
				cpu, allocs := sc.metric(b, "process_cpu_seconds_total")-cpu0, sc.metric(b, "go_memstats_mallocs_total")-allocs0-scrape
				b.ReportMetric(cpu*1e9/float64(b.N), "sidecar-cpu-ns/op")
				b.ReportMetric(allocs/float64(b.N), "sidecar-allocs/op")
				want := b.N
				if mode == "request" {
					want++ // the connection's untimed first request
				}
				testutil.Until(b, 5*time.Second, fmt.Sprintf("%d requests counted on %s", want, served[path]), func() bool {
					return counted(path)-before == float64(want)
				})
			})
		}
	}
	if n := sc.logCount("level=WARN"); n > 0 {
		b.Errorf("the sidecar logged %d warnings", n)
	}
}

const (
	// benchChain names the explicit listener and the capture chain: the
	// HTTP connection manager's stat prefix, the same on both paths.
	benchChain = "upstream:api"
	// benchExplicitPort is the explicit listener's port on 127.0.0.1
	// (the namespace is the benchmark's own).
	benchExplicitPort = 10080
	// benchWarmup is how many untimed connections each path gets first.
	benchWarmup = 1000
)

// requireInterceptionBench skips b unless it can build its world: root,
// ip, and an iptables backend's save and restore tools.
func requireInterceptionBench(b *testing.B) {
	b.Helper()
	if testing.Short() {
		b.Skip("builds the sidecar and runs it in a network namespace with iptables rules (root); not in -short")
	}
	if os.Geteuid() != 0 {
		b.Skip("needs root: a network namespace, iptables rules and the sidecar run as uid " + strconv.Itoa(captureUID))
	}
	if _, err := exec.LookPath("ip"); err != nil {
		b.Skip("needs the ip command (Debian package iproute2): ", err)
	}
	var missing []error
	for _, be := range []intercept.Backend{intercept.BackendNFT, intercept.BackendLegacy} {
		r := intercept.Runner{Backend: be}
		_, errSave := r.Binary(intercept.IPv4, "save")
		_, errRestore := r.Binary(intercept.IPv4, "restore")
		if errSave == nil && errRestore == nil {
			return
		}
		missing = append(missing, errSave, errRestore)
	}
	b.Skip("needs iptables (Debian package iptables): ", missing)
}

// installInterception installs the pod's interception rules (default
// Config: uid captureUID's connections and loopback are not redirected,
// other outbound TCP goes to 15001) in ns, and fails b unless the
// install's IPv4 self-check saw a connection redirected.
func installInterception(b *testing.B, ns *netnstest.NS) {
	b.Helper()
	if captureUID != xds.SidecarUID {
		b.Fatalf("captureUID %d is not the rules' default ProxyUID %d", captureUID, xds.SidecarUID)
	}
	var rep intercept.Report
	err := ns.Do(func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		var err error
		rep, err = intercept.Install(ctx, intercept.Config{}, intercept.Options{Logger: slog.New(slog.DiscardHandler)})
		return err
	})
	if err != nil {
		b.Fatalf("intercept.Install: %v", err)
	}
	if len(rep.Families) == 0 || rep.Families[0].Check.Hits == 0 || !rep.Families[0].Check.OriginalDst.IsValid() {
		b.Fatalf("intercept.Install: the IPv4 self-check did not see a redirected connection: %+v", rep.Families)
	}
}

var (
	benchReqClose     = []byte("GET /bench HTTP/1.1\r\nHost: api.shop.svc\r\nConnection: close\r\n\r\n")
	benchReqKeepAlive = []byte("GET /bench HTTP/1.1\r\nHost: api.shop.svc\r\n\r\n")
)

// benchConns times b.N connections (benchConn each) to addr. The loop runs
// on a thread inside ns, so each dial is an ordinary one from the
// namespace, without netnstest's per-call thread switch.
func benchConns(b *testing.B, ns *netnstest.NS, addr string) {
	b.Helper()
	b.StopTimer()
	err := ns.Do(func() error {
		b.StartTimer()
		defer b.StopTimer()
		for i := range b.N {
			if err := benchConn(addr); err != nil {
				return fmt.Errorf("connection %d: %w", i, err)
			}
		}
		return nil
	})
	if err != nil {
		b.Fatalf("%s: %v", addr, err)
	}
}

// benchConn connects to addr from the calling thread's namespace, sends a
// GET with Connection: close, reads the answer and closes.
func benchConn(addr string) error {
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	return benchExchange(c, bufio.NewReader(c), benchReqClose)
}

// benchRequests times b.N requests on one keep-alive connection to addr
// from ns.
func benchRequests(b *testing.B, ns *netnstest.NS, addr string) {
	b.Helper()
	b.StopTimer()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := ns.DialContext(ctx, "tcp", addr)
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	br := bufio.NewReader(c)
	if err := benchExchange(c, br, benchReqKeepAlive); err != nil { // not timed: the connection's set-up
		b.Fatalf("%s: %v", addr, err)
	}
	b.StartTimer()
	for i := range b.N {
		_ = c.SetDeadline(time.Now().Add(5 * time.Second))
		if err := benchExchange(c, br, benchReqKeepAlive); err != nil {
			b.Fatalf("%s: request %d: %v", addr, i, err)
		}
	}
	b.StopTimer()
}

// benchExchange writes req on c and reads the answer from br: 200 "api
// /bench" from the upstream.
func benchExchange(c net.Conn, br *bufio.Reader, req []byte) error {
	if _, err := c.Write(req); err != nil {
		return err
	}
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		return err
	}
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil {
		return err
	}
	if resp.StatusCode != http.StatusOK || string(body) != "api /bench" {
		return fmt.Errorf("answer %d %q, want 200 %q", resp.StatusCode, body, "api /bench")
	}
	return nil
}
