package e2e

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/meshlet/meshlet/internal/testutil"
)

// startDNSMasq runs dnsmasq (Debian dnsmasq-base) as an authoritative DNS
// server on a free 127.0.0.1 port: A records api.mesh.test → 10.0.0.7 and
// *.wild.mesh.test → 10.0.0.9, and a TXT record big.mesh.test of about
// 2.5 KB (answers up to 4,096 bytes over UDP). It logs every query.
func startDNSMasq(t *testing.T) (port int, d *serverProc) {
	t.Helper()
	bin := debTool(t, "dnsmasq", "dnsmasq-base")
	port = freePorts(t, 1)[0]
	chunks := make([]string, 12)
	for i := range chunks {
		chunks[i] = fmt.Sprintf("t%02d%s", i, strings.Repeat("x", 200))
	}
	args := []string{"--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
		"--listen-address=127.0.0.1", "--bind-interfaces", "--port=" + strconv.Itoa(port), "--edns-packet-max=4096",
		"--host-record=api.mesh.test,10.0.0.7", "--address=/wild.mesh.test/10.0.0.9",
		"--txt-record=big.mesh.test," + strings.Join(chunks, ","),
		"--log-queries", "--log-facility=-", "--pid-file=", "--user=nobody", "--group=nogroup"}
	d = startServerProc(t, "dnsmasq", bin, args, serverProcOptions{Dir: t.TempDir()})
	waitServing(t, d, hostPort(port), nil)
	return port, d
}

// digArgs are dig's options for one UDP query to addr: no TCP fallback, one
// try of 2 s, no search list.
func digArgs(addr string, extra ...string) []string {
	host, port, _ := strings.Cut(addr, ":")
	return append([]string{"@" + host, "-p", port, "+notcp", "+ignore", "+tries=1", "+time=2", "+nosearch"}, extra...)
}

// TestUDPDNSThroughSidecars: a udp service (ServiceDefaults protocol udp)
// behind two sidecars, with the real DNS server dnsmasq behind up's sidecar
// and the real DNS client dig at down's outbound UDP listener. Every query
// is answered through the mesh, a 2.5 KB answer arrives whole (no 1,500-byte
// cap, no truncation flag), a client that keeps its source port keeps its
// session, and the sessions end on the TimeoutPolicy's idle (1 s) at both
// sidecars, as counted in their metrics. Datagrams pass in plaintext
// between the sidecars (UDP has no mTLS; README caveat).
func TestUDPDNSThroughSidecars(t *testing.T) {
	dig := debTool(t, "dig", "bind9-dnsutils")
	dnsPort, dnsmasq := startDNSMasq(t)
	if got := strings.TrimSpace(runProg(t, 10*time.Second, nil, dig, digArgs(hostPort(dnsPort), "api.mesh.test", "+short")...)); got != "10.0.0.7" {
		t.Fatalf("dig directly at dnsmasq: %q", got)
	}
	p := startPair(t, pairOptions{Protocol: "udp", AppPort: dnsPort, Policies: []string{
		"apiVersion: meshlet.io/v1alpha1\nkind: TimeoutPolicy\nmetadata: {name: up-idle}\nspec:\n  service: up\n  idle: 1s\n",
	}})

	// The outbound UDP listener is bound once the sidecar is ready: the
	// first query through the mesh must be answered.
	if got := strings.TrimSpace(runProg(t, 10*time.Second, nil, dig, digArgs(p.Addr, "api.mesh.test", "+short")...)); got != "10.0.0.7" {
		t.Fatalf("dig through the mesh: %q\ndnsmasq log:\n%s", got, lastLines(dnsmasq.log.String(), 20))
	}

	// 200 queries of distinct names in one dig batch (-f): every one answered.
	const n = 200
	var batch strings.Builder
	for i := range n {
		fmt.Fprintf(&batch, "q%03d.wild.mesh.test A +short\n", i)
	}
	file := filepath.Join(t.TempDir(), "batch")
	if err := os.WriteFile(file, []byte(batch.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	out := runProg(t, 60*time.Second, nil, dig, digArgs(p.Addr, "-f", file)...)
	if got := strings.Count(out, "10.0.0.9\n"); got != n {
		t.Fatalf("%d of %d batch queries answered through the mesh:\n%s", got, n, lastLines(out, 10))
	}
	for i := range n {
		if !strings.Contains(dnsmasq.log.String(), fmt.Sprintf("query[A] q%03d.wild.mesh.test from 127.0.0.1", i)) {
			t.Fatalf("dnsmasq never saw q%03d.wild.mesh.test", i)
		}
	}

	// A 2.5 KB answer: whole, not truncated.
	big := runProg(t, 10*time.Second, nil, dig, digArgs(p.Addr, "big.mesh.test", "TXT", "+bufsize=4096")...)
	flags := ""
	for line := range strings.Lines(big) {
		if strings.HasPrefix(line, ";; flags:") {
			flags = line
		}
	}
	if flags == "" || strings.Contains(strings.SplitN(flags, ";", 4)[2], " tc") || !strings.Contains(big, "t11"+strings.Repeat("x", 200)) {
		t.Fatalf("big TXT answer through the mesh truncated or incomplete:\n%s", lastLines(big, 8))
	}
	size := 0
	if i := strings.Index(big, "MSG SIZE  rcvd: "); i >= 0 {
		size, _ = strconv.Atoi(strings.TrimSpace(strings.SplitN(big[i+len("MSG SIZE  rcvd: "):], "\n", 2)[0]))
	}
	if size < 2000 {
		t.Errorf("big answer %d bytes, want > 2,000 (over Envoy's 1,500-byte default)", size)
	}

	// A client that keeps its source port keeps its session: three
	// queries from one port open one session at down's sidecar.
	const down, up = `listener="upstream:up"`, `listener="public_listener_udp"`
	before := p.Down.metric(t, "meshlet_sidecar_udp_sessions_total", down)
	src := freePorts(t, 1)[0]
	for range 3 {
		if got := strings.TrimSpace(runProg(t, 10*time.Second, nil, dig, digArgs(p.Addr, "-b", "127.0.0.1#"+strconv.Itoa(src), "api.mesh.test", "+short")...)); got != "10.0.0.7" {
			t.Fatalf("dig from a fixed source port: %q", got)
		}
	}
	if got := p.Down.metric(t, "meshlet_sidecar_udp_sessions_total", down) - before; got != 1 {
		t.Errorf("three queries from one source port opened %v sessions, want 1", got)
	}

	// Counted both ways at both sidecars; every session ends on the idle
	// timeout.
	queries := float64(n + 5)
	for _, c := range []struct {
		name, listener string
		s              *proxy
	}{{"down", down, p.Down}, {"up", up, p.Up}} {
		for _, dir := range []string{"to_upstream", "to_downstream"} {
			if got := c.s.metric(t, "meshlet_sidecar_udp_datagrams_total", c.listener, `direction="`+dir+`"`); got < queries {
				t.Errorf("%s's sidecar: %v datagrams %s, want at least %v", c.name, got, dir, queries)
			}
		}
		testutil.Until(t, 10*time.Second, c.name+"'s UDP sessions to end on the 1 s idle timeout", func() bool {
			return c.s.metric(t, "meshlet_sidecar_udp_sessions_active", c.listener) == 0
		})
		opened := c.s.metric(t, "meshlet_sidecar_udp_sessions_total", c.listener)
		idled := c.s.metric(t, "meshlet_sidecar_udp_sessions_closed_total", c.listener, `reason="idle_timeout"`)
		if opened < float64(n) || idled != opened {
			t.Errorf("%s's sidecar: %v sessions opened, %v ended idle; want ≥ %d, all idle", c.name, opened, idled, n)
		}
		if d := c.s.metric(t, "meshlet_sidecar_udp_datagrams_dropped_total", c.listener); d != 0 {
			t.Errorf("%s's sidecar dropped %v datagrams", c.name, d)
		}
	}
	// After the sessions ended, a new query is answered again.
	if got := strings.TrimSpace(runProg(t, 10*time.Second, nil, dig, digArgs(p.Addr, "api.mesh.test", "+short")...)); got != "10.0.0.7" {
		t.Fatalf("dig after the idle timeout: %q", got)
	}
}
