//go:build linux

package intercept

import (
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/meshlet/meshlet/internal/golden"
)

// TestGoldenSave runs the real `sidecar intercept` for each option set in
// a new pod namespace, with each backend, and compares `iptables-save -t
// nat` of both families with testdata/save-<set>.<family>.golden (the same
// files for both backends: they print the same rules). It also checks
// that the self-check passed for both families, that the other backend was
// left alone, and that a second run changes nothing.
func TestGoldenSave(t *testing.T) {
	for _, set := range optionSets() {
		for _, b := range []Backend{BackendNFT, BackendLegacy} {
			t.Run(set.name+"/"+string(b), func(t *testing.T) {
				tp := newTopo(t)
				args := append([]string{"-backend", string(b)}, set.args...)
				_, stderr := tp.mustIntercept(t, args...)
				for _, f := range []Family{IPv4, IPv6} {
					golden.Check(t, set.golden(f), []byte(save(t, tp.pod, f, b, "nat")))
					if !strings.Contains(stderr, `msg="intercept: self-check passed" family=`+f.String()) {
						t.Errorf("%s: no passed self-check in the log:\n%s", f, stderr)
					}
					if other := save(t, tp.pod, f, b.other(), ""); strings.Contains(other, "MESHLET") {
						t.Errorf("%s: the %s backend has meshlet rules too:\n%s", f, b.other(), other)
					}
				}
				before := snapshot(t, tp.pod)
				tp.mustIntercept(t, args...)
				if after := snapshot(t, tp.pod); after != before {
					t.Errorf("a second run changed the tables\n--- before\n%s\n--- after\n%s", before, after)
				}
			})
		}
	}
}

// snapshot is every table of both backends and both families, counters
// zeroed.
func snapshot(t *testing.T, ns string) string {
	t.Helper()
	var b strings.Builder
	for _, be := range []Backend{BackendNFT, BackendLegacy} {
		for _, f := range []Family{IPv4, IPv6} {
			fmt.Fprintf(&b, "## %s %s\n%s", be, f, save(t, ns, f, be, ""))
		}
	}
	return b.String()
}

// TestDryRunChangesNothing: -dry-run prints the rules of both families and
// leaves the namespace's tables empty.
func TestDryRunChangesNothing(t *testing.T) {
	tp := newTopo(t)
	before := snapshot(t, tp.pod)
	out, _ := tp.mustIntercept(t, "-dry-run")
	want := []string{"# meshlet: IPv4 rules, for iptables-restore --noflush\n", "# meshlet: IPv6 rules, for ip6tables-restore --noflush\n"}
	for _, w := range want {
		if !strings.Contains(out, w) {
			t.Errorf("dry-run output lacks %q:\n%s", w, out)
		}
	}
	if strings.Count(out, "-j REDIRECT --to-ports 15001") != 2 {
		t.Errorf("dry-run output should have one outbound REDIRECT per family:\n%s", out)
	}
	if after := snapshot(t, tp.pod); after != before {
		t.Errorf("-dry-run changed the tables:\n%s", after)
	}
}

// TestRedirect: with the rules of the real command in the pod namespace,
// an unmodified client's connections land where they should: redirected
// ones on the capture listeners, which read the original destination with
// OriginalDst; the others at their destination. The controls (the same
// connection without the exclusion) show each bypass is the exclusion's
// doing.
func TestRedirect(t *testing.T) {
	out4 := func(dst string) string { return "outbound local=127.0.0.1:15001 orig=" + dst }
	out6 := func(dst string) string { return "outbound local=[::1]:15001 orig=" + dst }
	in := func(local, dst string) string { return "inbound local=" + local + " orig=" + dst }
	peer := func(dst string) string { return "peer local=" + dst }
	app := func(label, dst string) string { return label + " local=" + dst }
	const root = -1
	type dialCase struct {
		name string
		from string // "pod" or "peer"
		uid  int
		addr string
		want string
	}
	common := []dialCase{
		{"outbound IPv4 redirected", "pod", root, peerIP4 + ":80", out4(peerIP4 + ":80")},
		{"outbound IPv6 redirected", "pod", root, "[" + peerIP6 + "]:80", out6("[" + peerIP6 + "]:80")},
		{"outbound as a non-root uid redirected", "pod", 1000, peerIP4 + ":80", out4(peerIP4 + ":80")},
		{"sidecar uid 1337 not looped, IPv4", "pod", 1337, peerIP4 + ":80", peer(peerIP4 + ":80")},
		{"sidecar uid 1337 not looped, IPv6", "pod", 1337, "[" + peerIP6 + "]:80", peer("[" + peerIP6 + "]:80")},
		{"loopback IPv4 not redirected", "pod", root, "127.0.0.1:8080", app("app", "127.0.0.1:8080")},
		{"loopback IPv6 not redirected", "pod", root, "[::1]:8080", app("app", "[::1]:8080")},
		{"the pod's own address not redirected", "pod", root, podIP4 + ":8080", app("app", podIP4+":8080")},
		{"sidecar health port not redirected inbound", "peer", root, podIP4 + ":15020", app("health", podIP4+":15020")},
	}
	inbound := []dialCase{
		{"inbound IPv4 redirected", "peer", root, podIP4 + ":8080", in(podIP4+":15006", podIP4+":8080")},
		{"inbound IPv6 redirected", "peer", root, "[" + podIP6 + "]:8080", in("["+podIP6+"]:15006", "["+podIP6+"]:8080")},
	}
	tests := []struct {
		name  string
		args  []string
		cases []dialCase
	}{
		{"defaults", nil, concat(common, inbound, []dialCase{
			{"control: uid 2000 redirected", "pod", 2000, peerIP4 + ":80", out4(peerIP4 + ":80")},
			{"control: port 5432 redirected", "pod", root, peerIP4 + ":5432", out4(peerIP4 + ":5432")},
			{"control: port 7005 redirected", "pod", root, peerIP4 + ":7005", out4(peerIP4 + ":7005")},
			{"control: 198.18.0.1 redirected", "pod", root, extraIP4 + ":80", out4(extraIP4 + ":80")},
			{"control: fd00:b::1 redirected", "pod", root, "[" + extraIP6 + "]:80", out6("[" + extraIP6 + "]:80")},
			{"control: port 443 redirected", "pod", root, peerIP4 + ":443", out4(peerIP4 + ":443")},
			{"control: inbound 9090 redirected", "peer", root, podIP4 + ":9090", in(podIP4+":15006", podIP4+":9090")},
		})},
		{"exclusions", optionSets()[1].args, concat(common, inbound, []dialCase{
			{"excluded uid 2000", "pod", 2000, peerIP4 + ":80", peer(peerIP4 + ":80")},
			{"excluded port 5432", "pod", root, peerIP4 + ":5432", peer(peerIP4 + ":5432")},
			{"excluded port range 7000-7010", "pod", root, peerIP4 + ":7005", peer(peerIP4 + ":7005")},
			{"excluded port, IPv6", "pod", root, "[" + peerIP6 + "]:5432", peer("[" + peerIP6 + "]:5432")},
			{"excluded CIDR 198.18.0.0/15", "pod", root, extraIP4 + ":80", peer(extraIP4 + ":80")},
			{"excluded CIDR fd00:b::/64", "pod", root, "[" + extraIP6 + "]:80", peer("[" + extraIP6 + "]:80")},
			{"Kubernetes API server IPv4", "pod", root, peerIP4 + ":443", peer(peerIP4 + ":443")},
			{"Kubernetes API server IPv6", "pod", root, "[" + peerIP6 + "]:443", peer("[" + peerIP6 + "]:443")},
			{"other port of the API server's address redirected", "pod", root, peerIP4 + ":80", out4(peerIP4 + ":80")},
			{"excluded inbound port 9090", "peer", root, podIP4 + ":9090", app("app9090", podIP4+":9090")},
			{"excluded inbound port 9090, IPv6", "peer", root, "[" + podIP6 + "]:9090", app("app9090", "["+podIP6+"]:9090")},
		})},
		{"inbound-none", []string{"-inbound", "none"}, concat(common, []dialCase{
			{"inbound IPv4 not redirected", "peer", root, podIP4 + ":8080", app("app", podIP4+":8080")},
			{"inbound IPv6 not redirected", "peer", root, "[" + podIP6 + "]:8080", app("app", "["+podIP6+"]:8080")},
		})},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tp := newTopo(t)
			tp.mustIntercept(t, tt.args...) // before the listeners: the self-check opens 15001 itself
			serve(t, tp.pod, "outbound", "tcp4", "127.0.0.1:15001", true)
			serve(t, tp.pod, "outbound", "tcp6", "[::1]:15001", true)
			serve(t, tp.pod, "inbound", "tcp4", ":15006", true)
			serve(t, tp.pod, "inbound", "tcp6", ":15006", true)
			for port, label := range map[string]string{"8080": "app", "9090": "app9090", "15020": "health"} {
				serve(t, tp.pod, label, "tcp4", ":"+port, false)
				serve(t, tp.pod, label, "tcp6", ":"+port, false)
			}
			for _, port := range []string{"80", "443", "5432", "7005"} {
				serve(t, tp.peer, "peer", "tcp4", ":"+port, false)
				serve(t, tp.peer, "peer", "tcp6", ":"+port, false)
			}
			for _, c := range tt.cases {
				ns := tp.pod
				if c.from == "peer" {
					ns = tp.peer
				}
				if got := dial(t, ns, c.uid, c.addr); got != c.want {
					t.Errorf("%s: %s (uid %d) -> %s answered %q, want %q", c.name, c.from, c.uid, c.addr, got, c.want)
				}
			}
		})
	}
}

func concat[T any](s ...[]T) []T {
	var out []T
	for _, x := range s {
		out = append(out, x...)
	}
	return out
}

// TestOriginalDstOfRedirectedConnections: a connection redirected by the
// command's rules, accepted in-process, gives its original destination,
// IPv4 and IPv6, outbound and inbound, and on a dual-stack listener.
func TestOriginalDstOfRedirectedConnections(t *testing.T) {
	tp := newTopo(t)
	tp.mustIntercept(t, "-check=false")
	tests := []struct {
		name, network, listen string
		dialFrom, dst         string
	}{
		{"outbound IPv4", "tcp4", "127.0.0.1:15001", tp.pod, peerIP4 + ":80"},
		{"outbound IPv6", "tcp6", "[::1]:15001", tp.pod, "[" + peerIP6 + "]:80"},
		{"outbound IPv4 on a dual-stack listener", "tcp", "[::]:15001", tp.pod, peerIP4 + ":3306"},
		{"inbound IPv4", "tcp4", ":15006", tp.peer, podIP4 + ":8080"},
		{"inbound IPv6", "tcp6", ":15006", tp.peer, "[" + podIP6 + "]:8080"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var ln net.Listener
			inNetns(t, tp.pod, func() error {
				var err error
				ln, err = net.Listen(tt.network, tt.listen)
				return err
			})
			defer ln.Close()
			var c net.Conn
			inNetns(t, tt.dialFrom, func() error {
				var err error
				c, err = net.DialTimeout("tcp", tt.dst, 5*time.Second)
				return err
			})
			defer c.Close()
			_ = ln.(*net.TCPListener).SetDeadline(time.Now().Add(5 * time.Second))
			s, err := ln.Accept()
			if err != nil {
				t.Fatal(err)
			}
			defer s.Close()
			got, err := OriginalDst(s.(*net.TCPConn))
			if err != nil {
				t.Fatal(err)
			}
			if got != netip.MustParseAddrPort(tt.dst) {
				t.Errorf("OriginalDst = %v, want %v (local address %v)", got, tt.dst, s.LocalAddr())
			}
			_, lport, _ := net.SplitHostPort(tt.listen)
			if _, p, _ := net.SplitHostPort(s.LocalAddr().String()); p != lport {
				t.Errorf("accepted on %v, not on the capture port %s", s.LocalAddr(), lport)
			}
		})
	}
}

// TestSelfCheck: the command's self-check passes when the capture port is
// already taken (the counter decides) and fails, naming the nft/legacy
// mismatch, when rules in the other backend take the connection first.
func TestSelfCheck(t *testing.T) {
	t.Run("capture port already taken", func(t *testing.T) {
		tp := newTopo(t)
		sidecar4 := serve(t, tp.pod, "sidecar", "tcp4", "127.0.0.1:15001", true)
		sidecar6 := serve(t, tp.pod, "sidecar", "tcp6", "[::1]:15001", true)
		_, stderr := tp.mustIntercept(t)
		for _, f := range []string{"IPv4", "IPv6"} {
			if !strings.Contains(stderr, `msg="intercept: self-check passed" family=`+f) ||
				!strings.Contains(stderr, "checked by the rule's counter alone") {
				t.Errorf("%s: no self-check passed on the counter in the log:\n%s", f, stderr)
			}
		}
		// The probes were redirected, to the listener that was there.
		sidecar4.waitFor(t, "sidecar local=127.0.0.1:15001 orig=192.0.2.1:9")
		sidecar6.waitFor(t, "sidecar local=[::1]:15001 orig=[2001:db8::1]:9")
	})

	t.Run("meshlet rules in legacy too, detection picks nft", func(t *testing.T) {
		tp := newTopo(t)
		_, stderr := tp.mustIntercept(t) // a fresh namespace: nft
		if !strings.Contains(stderr, "backend=nft") {
			t.Fatalf("the first run did not pick nft:\n%s", stderr)
		}
		// Something writes the same IPv4 rules through iptables-legacy
		// (the node's backend): its nat table now comes first.
		dry, _ := tp.mustIntercept(t, "-dry-run")
		v4, _, _ := strings.Cut(dry, "# meshlet: IPv6")
		restore(t, tp.pod, "iptables-legacy-restore", v4)
		_, stderr, code := tp.intercept(t)
		if code != 1 {
			t.Fatalf("exit %d, want 1\n%s", code, stderr)
		}
		for _, want := range []string{
			`backend=nft reason="nft has at least as many rules (28) as legacy (14)"`, // auto detection still picks nft
			"intercept: rules installed but not hit: self-check IPv4 (nft backend): a test connection to 192.0.2.1:9",
			"was redirected to 127.0.0.1:15001, but not by meshlet's rules",
			"the nft/legacy mismatch: the legacy backend has 14 nat rules",
			"sidecar intercept -backend legacy",
		} {
			if !strings.Contains(stderr, want) {
				t.Errorf("stderr lacks %q:\n%s", want, stderr)
			}
		}
		// Following the advice works.
		_, stderr = tp.mustIntercept(t, "-backend", "legacy")
		if !strings.Contains(stderr, `msg="intercept: self-check passed" family=IPv4`) {
			t.Errorf("with -backend legacy: no passed self-check:\n%s", stderr)
		}
	})

	t.Run("legacy rules redirect elsewhere, nft rules never hit", func(t *testing.T) {
		tp := newTopo(t)
		tp.mustIntercept(t)
		restore(t, tp.pod, "iptables-legacy-restore", "*nat\n-A OUTPUT -p tcp -j REDIRECT --to-ports 15999\nCOMMIT\n")
		_, stderr, code := tp.intercept(t)
		if code != 1 {
			t.Fatalf("exit %d, want 1\n%s", code, stderr)
		}
		for _, want := range []string{
			"meshlet's rules are installed but a test connection (uid 0) to 192.0.2.1:9 did not hit them (connection refused",
			"the nft/legacy mismatch: the legacy backend has 1 nat rules",
		} {
			if !strings.Contains(stderr, want) {
				t.Errorf("stderr lacks %q:\n%s", want, stderr)
			}
		}
	})

	t.Run("no IPv6 in the namespace", func(t *testing.T) {
		tp := newTopo(t)
		inNetns(t, tp.pod, func() error {
			return os.WriteFile("/proc/sys/net/ipv6/conf/all/disable_ipv6", []byte("1"), 0o644)
		})
		_, stderr := tp.mustIntercept(t)
		want := `msg="intercept: skipped" family=IPv6 reason="IPv6 is disabled in this network namespace (net.ipv6.conf.all.disable_ipv6=1)"`
		if !strings.Contains(stderr, want) {
			t.Errorf("stderr lacks %q:\n%s", want, stderr)
		}
		if !strings.Contains(stderr, `msg="intercept: self-check passed" family=IPv4`) {
			t.Errorf("no IPv4 self-check:\n%s", stderr)
		}
		if s := save(t, tp.pod, IPv6, BackendNFT, ""); strings.Contains(s, "MESHLET") {
			t.Errorf("IPv6 rules installed anyway:\n%s", s)
		}
	})
}

// restore feeds rules to bin (an iptables-restore) --noflush in ns.
func restore(t *testing.T, ns, bin, rules string) {
	t.Helper()
	cmd := exec.Command("ip", "netns", "exec", ns, bin, "--noflush", "-w", "10")
	cmd.Stdin = strings.NewReader(rules)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("%s: %v: %s", bin, err, out)
	}
}

// TestDetect: in a namespace where only the legacy backend has rules, the
// command detects legacy and puts its rules there.
func TestDetect(t *testing.T) {
	tp := newTopo(t)
	mustRun(t, "ip", "netns", "exec", tp.pod, "iptables-legacy", "-t", "filter", "-A", "INPUT", "-m", "comment", "--comment", "the node's rule", "-j", "ACCEPT")
	_, stderr := tp.mustIntercept(t)
	if want := `backend=legacy reason="only legacy has rules (1)"`; !strings.Contains(stderr, want) {
		t.Errorf("stderr lacks %q:\n%s", want, stderr)
	}
	if s := save(t, tp.pod, IPv4, BackendLegacy, "nat"); !strings.Contains(s, "-j "+ChainOutbound) {
		t.Errorf("no meshlet rules in legacy:\n%s", s)
	}
	if s := save(t, tp.pod, IPv4, BackendNFT, ""); strings.Contains(s, "MESHLET") {
		t.Errorf("meshlet rules in nft:\n%s", s)
	}
	if !strings.Contains(stderr, `msg="intercept: self-check passed" family=IPv4`) {
		t.Errorf("no passed self-check:\n%s", stderr)
	}
}
