package intercept

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// ErrNotIntercepted is wrapped by Check's and Install's error when the
// rules are installed but a test connection did not go through them: the
// nft/legacy mismatch, or other nat rules taking the connection first.
var ErrNotIntercepted = errors.New("intercept: rules installed but not hit")

// Apply installs cfg's rules (after defaults) for family f with r, in the
// calling process's network namespace: one `iptables-restore --noflush`
// (atomic) that empties and refills ChainInbound and ChainOutbound, and
// adds the jumps from PREROUTING and OUTPUT only when iptables-save does
// not show them already. Running it again with the same cfg leaves the
// same iptables-save output; with another cfg, the chains hold the new
// rules. Errors are cfg's Validate errors and those of the iptables
// commands (with their stderr).
func Apply(ctx context.Context, r Runner, f Family, cfg Config) error {
	if err := cfg.Validate(); err != nil {
		return err
	}
	c := cfg.WithDefaults()
	current, err := r.Save(ctx, f, "nat", false)
	if err != nil {
		return err
	}
	rules := ruleset(c, f, !hasJump(current, "PREROUTING", ChainInbound), !hasJump(current, "OUTPUT", ChainOutbound))
	if err := r.Restore(ctx, f, rules); err != nil {
		return fmt.Errorf("intercept: apply %s rules: %w", f, err)
	}
	return nil
}

// CheckResult is what Check did.
type CheckResult struct {
	// Skipped, when not empty, says why no test connection was made (no
	// route for the family, every probe address excluded, this process's
	// UID excluded); the check then proves nothing.
	Skipped string
	// Probe is the address the test connection went to.
	Probe netip.AddrPort
	// Hits is how many packets the outbound REDIRECT rule counted during
	// the test (at least 1 when the rules work).
	Hits uint64
	// OriginalDst is the original destination the test listener read from
	// the redirected connection; invalid when Check could not listen on
	// the outbound capture port (the sidecar already has it) and relied
	// on Hits alone.
	OriginalDst netip.AddrPort
}

// Check verifies that the installed rules of family f (cfg as given to
// Apply, r its Runner) really redirect: from this process (the init
// container runs as root, a UID that is redirected) it connects to an
// address outside the pod that cfg does not exclude (192.0.2.1, TEST-NET-1
// of RFC 5737, or 2001:db8::1 of RFC 3849; another when excluded) on port 9
// (or the next port not excluded), while listening on the outbound capture
// port on loopback, where OUTPUT's REDIRECT sends it. It passes when the
// outbound REDIRECT rule's packet counter (iptables-save -c) moved and, if
// it could listen, the listener accepted the connection with the probe as
// its original destination (OriginalDst). When the capture port is taken
// (the sidecar runs already) the counter alone decides. Inbound rules
// cannot be tested from inside the pod (a local connection never crosses
// PREROUTING); they are in the same table of the same backend.
//
// It fails with an error wrapping ErrNotIntercepted, which names the
// likely cause, when the rules are there but the connection did not hit
// them, and with other errors when the rule is missing or iptables-save
// fails. A family without a route to the probe is skipped (Skipped says
// so), as is a probe that cfg excludes entirely.
func Check(ctx context.Context, r Runner, f Family, cfg Config) (CheckResult, error) {
	c := cfg.WithDefaults()
	var res CheckResult
	uid := uint32(os.Geteuid())
	if uid == c.ProxyUID || slices.Contains(c.ExcludeUIDs, uid) {
		res.Skipped = fmt.Sprintf("this process's uid %d is excluded from redirection", uid)
		return res, nil
	}
	probe, ok := pickProbe(c, f)
	if !ok {
		res.Skipped = "every probe address (RFC 5737/3849 documentation addresses) is excluded"
		return res, nil
	}
	res.Probe = probe
	prefix := fmt.Sprintf("intercept: self-check %s (%s backend)", f, r.Backend)
	failed := fmt.Sprintf("self-check %s (%s backend)", f, r.Backend) // follows ErrNotIntercepted
	counter := func() (uint64, error) {
		out, err := r.Save(ctx, f, "nat", true)
		if err != nil {
			return 0, fmt.Errorf("%s: %w", prefix, err)
		}
		n, err := ruleCounter(out, ChainOutbound, outboundRedirectComment(c.OutboundPort))
		if err != nil {
			return 0, fmt.Errorf("%s: the outbound REDIRECT rule: %w (rules not installed?)", prefix, err)
		}
		return n, nil
	}
	before, err := counter()
	if err != nil {
		return res, err
	}

	loopback := "127.0.0.1"
	if f == IPv6 {
		loopback = "::1"
	}
	capture := net.JoinHostPort(loopback, strconv.Itoa(c.OutboundPort))
	ln, lerr := net.Listen("tcp", capture)
	if ln != nil {
		defer ln.Close()
	}
	outcome := probeOnce(ctx, probe, ln, &res)
	after, err := counter()
	if err != nil {
		return res, err
	}
	res.Hits = after - before
	if outcome.noRoute && res.Hits == 0 {
		res.Skipped = fmt.Sprintf("no %s route to %s (%v): the pod has no %s connectivity to intercept", f, probe, outcome.err, f)
		return res, nil
	}
	redirected := res.OriginalDst == probe
	switch {
	case res.Hits > 0 && (ln == nil || redirected):
		return res, nil
	case res.Hits > 0:
		return res, fmt.Errorf("%w: %s: the outbound REDIRECT rule counted a test connection to %s but it did not reach %s (%s)",
			ErrNotIntercepted, failed, probe, capture, outcome.describe())
	}
	// Not hit: say what else is in this namespace.
	hint := mismatchHint(ctx, r, f)
	if redirected {
		return res, fmt.Errorf("%w: %s: a test connection to %s was redirected to %s, but not by meshlet's rules (their counter did not move): other nat rules took it first. %s",
			ErrNotIntercepted, failed, probe, capture, hint)
	}
	listening := ""
	if lerr != nil {
		listening = fmt.Sprintf("; could not listen on %s: %v", capture, lerr)
	}
	return res, fmt.Errorf("%w: %s: meshlet's rules are installed but a test connection (uid %d) to %s did not hit them (%s%s). %s",
		ErrNotIntercepted, failed, uid, probe, outcome.describe(), listening, hint)
}

// mismatchHint names the likely cause of rules that are not hit, from what
// the other backend shows in this namespace.
func mismatchHint(ctx context.Context, r Runner, f Family) string {
	other := Runner{Backend: r.Backend.other(), Dir: r.Dir}
	out, err := other.Save(ctx, f, "", false)
	if err == nil {
		if n := countRules(out, "nat"); n > 0 {
			return fmt.Sprintf("Likely cause: the nft/legacy mismatch: the %s backend has %d nat rules in this network namespace, which the kernel runs first; "+
				"the node likely uses %s: run `sidecar intercept -backend %s`, and make sure nothing else writes %s rules in the pod",
				other.Backend, n, other.Backend, other.Backend, f)
		}
	}
	return fmt.Sprintf("Likely cause: the nft/legacy mismatch (rules written through iptables-%s that the kernel does not run): try `sidecar intercept -backend %s`",
		r.Backend, other.Backend)
}

// probeResult is how a test connection went.
type probeResult struct {
	err       error // the dial's error, nil when it connected
	noRoute   bool  // the dial failed before a packet left (ENETUNREACH)
	accepted  bool  // the listener accepted it
	acceptErr error
}

func (p probeResult) describe() string {
	switch {
	case p.err != nil && errors.Is(p.err, syscall.ECONNREFUSED):
		return "connection refused: something other than meshlet's REDIRECT answered"
	case p.err != nil:
		return "connect: " + p.err.Error()
	case p.accepted:
		return "the test listener accepted it"
	case p.acceptErr != nil:
		return "connected, but not to the test listener: " + p.acceptErr.Error()
	}
	return "connected (no test listener)"
}

// probeOnce connects to probe; with ln set, it accepts the redirected
// connection and records its original destination in res.
func probeOnce(ctx context.Context, probe netip.AddrPort, ln net.Listener, res *CheckResult) probeResult {
	var out probeResult
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	var d net.Dialer
	conn, err := d.DialContext(ctx, "tcp", probe.String())
	if err != nil {
		out.err = err
		out.noRoute = errors.Is(err, syscall.ENETUNREACH)
		return out
	}
	if ln == nil {
		conn.Close()
		return out
	}
	// The client closes first, so the TIME_WAIT is on its ephemeral
	// port, not on the capture port the sidecar binds next.
	tl := ln.(*net.TCPListener)
	_ = tl.SetDeadline(time.Now().Add(2 * time.Second))
	s, err := tl.AcceptTCP()
	conn.Close()
	if err != nil {
		out.acceptErr = err
		return out
	}
	defer s.Close()
	out.accepted = true
	if dst, err := OriginalDst(s); err == nil {
		res.OriginalDst = dst
	} else {
		out.acceptErr = err
	}
	return out
}

// pickProbe returns a test destination of family f that c does not
// exclude: a documentation address (never a real host) and a port not
// excluded, else false.
func pickProbe(c Config, f Family) (netip.AddrPort, bool) {
	addrs := []string{"192.0.2.1", "198.51.100.1", "203.0.113.1"} // RFC 5737
	if f == IPv6 {
		addrs = []string{"2001:db8::1", "3fff::1"} // RFC 3849, RFC 9637
	}
	for _, s := range addrs {
		a := netip.MustParseAddr(s)
		if slices.ContainsFunc(c.ExcludeOutboundCIDRs, func(p netip.Prefix) bool { return p.Contains(a) }) {
			continue
		}
		for port := 9; port <= 65535; port++ {
			if portExcluded(c, port) {
				continue
			}
			return netip.AddrPortFrom(a, uint16(port)), true
		}
	}
	return netip.AddrPort{}, false
}

func portExcluded(c Config, port int) bool {
	if slices.Contains(c.SidecarPorts, port) {
		return true
	}
	return slices.ContainsFunc(c.ExcludeOutboundPorts, func(r PortRange) bool { return r.First <= port && port <= r.Last })
}

// Options configure Install.
type Options struct {
	// Backend is BackendNFT, BackendLegacy, or BackendAuto (the default,
	// when empty): Detect.
	Backend Backend
	// Dir is where the iptables binaries are (Runner.Dir); empty searches
	// PATH, /usr/sbin and /sbin.
	Dir string
	// SkipCheck leaves out the self-check (Check) after applying.
	SkipCheck bool
	// Logger receives one line per step; slog.Default() when nil.
	Logger *slog.Logger
}

// Report is what Install did.
type Report struct {
	// Detection is Detect's result; with a Backend given, only Backend
	// and Reason are set.
	Detection Detection
	// Families has one entry per family, IPv4 first.
	Families []FamilyReport
}

// FamilyReport is what Install did for one family.
type FamilyReport struct {
	Family Family
	// Skipped, when not empty, says why no rules were installed for the
	// family (no IPv6 in the kernel or in this namespace, no ip6tables
	// nat table).
	Skipped string
	// Rules is the nat table after applying, as iptables-save prints it
	// without its "#" comment lines.
	Rules string
	// Check is the self-check's result (zero with Options.SkipCheck).
	Check CheckResult
}

// Install is what `sidecar intercept` does in a pod's init container:
// validate cfg, pick the backend (Options.Backend or Detect), Apply the
// IPv4 rules and the IPv6 ones (skipped, and said so in the report and the
// log, when the kernel or the namespace has no IPv6 or ip6tables has no
// nat table), and Check each family unless Options.SkipCheck. It stops at
// the first error: cfg's Validate error, a backend or iptables failure, or
// a self-check failure wrapping ErrNotIntercepted.
func Install(ctx context.Context, cfg Config, opts Options) (Report, error) {
	log := opts.Logger
	if log == nil {
		log = slog.Default()
	}
	var rep Report
	if err := cfg.Validate(); err != nil {
		return rep, err
	}
	switch opts.Backend {
	case "", BackendAuto:
		d, err := Detect(ctx, opts.Dir)
		rep.Detection = d
		if err != nil {
			return rep, err
		}
	case BackendNFT, BackendLegacy:
		rep.Detection = Detection{Backend: opts.Backend, Reason: "chosen by the caller"}
	default:
		return rep, fmt.Errorf("intercept: backend %q: want auto, nft or legacy", opts.Backend)
	}
	r := Runner{Backend: rep.Detection.Backend, Dir: opts.Dir}
	log.Info("intercept: backend", "backend", r.Backend, "reason", rep.Detection.Reason)
	for _, f := range []Family{IPv4, IPv6} {
		fr := FamilyReport{Family: f}
		if f == IPv6 {
			fr.Skipped = ipv6Missing(ctx, r)
		}
		if fr.Skipped != "" {
			log.Warn("intercept: skipped", "family", f, "reason", fr.Skipped)
			rep.Families = append(rep.Families, fr)
			continue
		}
		if err := Apply(ctx, r, f, cfg); err != nil {
			return rep, err
		}
		saved, err := r.Save(ctx, f, "nat", false)
		if err != nil {
			return rep, err
		}
		fr.Rules = withoutComments(saved)
		log.Info("intercept: rules applied", "family", f, "rules", countRules(saved, "nat"))
		if !opts.SkipCheck {
			res, err := Check(ctx, r, f, cfg)
			fr.Check = res
			if err != nil {
				rep.Families = append(rep.Families, fr)
				return rep, err
			}
			if res.Skipped != "" {
				log.Warn("intercept: self-check skipped", "family", f, "reason", res.Skipped)
			} else if res.OriginalDst.IsValid() {
				log.Info("intercept: self-check passed", "family", f, "probe", res.Probe, "hits", res.Hits, "original_dst", res.OriginalDst)
			} else {
				log.Info("intercept: self-check passed", "family", f, "probe", res.Probe, "hits", res.Hits,
					"note", "the capture port is taken (the sidecar runs already?): checked by the rule's counter alone")
			}
		}
		rep.Families = append(rep.Families, fr)
	}
	return rep, nil
}

// ipv6Missing returns why IPv6 rules cannot be installed, or "".
func ipv6Missing(ctx context.Context, r Runner) string {
	if _, err := os.Stat("/proc/net/if_inet6"); err != nil {
		return "the kernel has no IPv6 (/proc/net/if_inet6: " + err.Error() + ")"
	}
	if b, err := os.ReadFile("/proc/sys/net/ipv6/conf/all/disable_ipv6"); err == nil && strings.TrimSpace(string(b)) == "1" {
		return "IPv6 is disabled in this network namespace (net.ipv6.conf.all.disable_ipv6=1)"
	}
	if _, err := r.Save(ctx, IPv6, "nat", false); err != nil {
		return "no ip6tables nat table: " + err.Error()
	}
	return ""
}

// withoutComments drops the "#" lines (generator, date) of iptables-save
// output.
func withoutComments(save string) string {
	var b strings.Builder
	for _, line := range strings.SplitAfter(save, "\n") {
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		b.WriteString(line)
	}
	return b.String()
}
