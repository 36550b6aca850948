package intercept

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// Backend is one of the two kernel interfaces behind the iptables
// commands: nf_tables ("nft", iptables-nft, Debian's default since 10) or
// the x_tables "legacy" one (iptables-legacy). A pod's rules must be in the
// backend the node uses, else they can be present and never hit (the
// mismatch Linkerd's and Istio's init containers run into); see Detect.
type Backend string

const (
	// BackendAuto asks Install to Detect the backend.
	BackendAuto Backend = "auto"
	// BackendNFT is iptables-nft (xtables-nft-multi).
	BackendNFT Backend = "nft"
	// BackendLegacy is iptables-legacy (xtables-legacy-multi).
	BackendLegacy Backend = "legacy"
)

// ParseBackend parses "auto" (or ""), "nft" or "legacy".
func ParseBackend(s string) (Backend, error) {
	switch b := Backend(s); b {
	case "", BackendAuto:
		return BackendAuto, nil
	case BackendNFT, BackendLegacy:
		return b, nil
	}
	return "", fmt.Errorf("intercept: backend %q: want auto, nft or legacy", s)
}

// other is the backend that is not b.
func (b Backend) other() Backend {
	if b == BackendLegacy {
		return BackendNFT
	}
	return BackendLegacy
}

// Runner runs one backend's iptables-save and iptables-restore (Debian's
// names: iptables-nft-restore, ip6tables-legacy-save, ...; all links to
// xtables-nft-multi or xtables-legacy-multi) in the calling process's
// network namespace.
type Runner struct {
	// Backend is BackendNFT or BackendLegacy.
	Backend Backend
	// Dir is where the binaries are; empty looks them up in PATH, then
	// in /usr/sbin and /sbin.
	Dir string
}

// Binary returns the path of the backend's tool for family f; tool is
// "save" or "restore" (e.g. ip6tables-nft-restore). The error names the
// binary and the Debian package that has it.
func (r Runner) Binary(f Family, tool string) (string, error) {
	prefix := "iptables"
	if f == IPv6 {
		prefix = "ip6tables"
	}
	name := prefix + "-" + string(r.Backend) + "-" + tool
	if r.Dir != "" {
		p := filepath.Join(r.Dir, name)
		if _, err := os.Stat(p); err != nil {
			return "", fmt.Errorf("intercept: %s: %w (Debian package iptables)", name, err)
		}
		return p, nil
	}
	if p, err := exec.LookPath(name); err == nil {
		return p, nil
	}
	// Images' and non-root users' PATHs often lack the sbin directories
	// where Debian installs iptables.
	for _, d := range []string{"/usr/sbin", "/sbin"} {
		p := filepath.Join(d, name)
		if _, err := os.Stat(p); err == nil {
			return p, nil
		}
	}
	return "", fmt.Errorf("intercept: %s not found in PATH, /usr/sbin or /sbin (Debian package iptables)", name)
}

// Save returns the output of iptables-save (ip6tables-save for IPv6) of
// the backend: of one table when table is not empty (for the legacy
// backend this creates the table in the namespace if it was not there),
// of every existing table otherwise; with packet and byte counters
// ("[pkts:bytes] -A ...") when counters is set. Errors carry the command's
// stderr.
func (r Runner) Save(ctx context.Context, f Family, table string, counters bool) (string, error) {
	bin, err := r.Binary(f, "save")
	if err != nil {
		return "", err
	}
	var args []string
	if table != "" {
		args = append(args, "-t", table)
	}
	if counters {
		args = append(args, "-c")
	}
	return run(ctx, bin, args, nil)
}

// Restore applies rules (iptables-restore format) with `iptables-restore
// --noflush`: atomically, leaving every chain the text does not declare
// as it is; a declared chain that exists is emptied first. It waits up to
// 10 seconds for the xtables lock (legacy backend). Errors carry the
// command's stderr, which names the failing line.
func (r Runner) Restore(ctx context.Context, f Family, rules string) error {
	bin, err := r.Binary(f, "restore")
	if err != nil {
		return err
	}
	_, err = run(ctx, bin, []string{"--noflush", "-w", "10"}, strings.NewReader(rules))
	return err
}

// run runs bin with args and stdin, returning its stdout; the error
// includes stderr.
func run(ctx context.Context, bin string, args []string, stdin *strings.Reader) (string, error) {
	cmd := exec.CommandContext(ctx, bin, args...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if stdin != nil {
		cmd.Stdin = stdin
	}
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("intercept: %s %s: %w: %s", filepath.Base(bin), strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return stdout.String(), nil
}

// Detection is what Detect found.
type Detection struct {
	// Backend is the chosen backend.
	Backend Backend
	// Reason says why, for the log.
	Reason string
	// Rules counts the rules ("-A" lines of iptables-save and
	// ip6tables-save, every table) of each usable backend in this network
	// namespace.
	Rules map[Backend]int
	// Unusable holds, per backend whose iptables-save failed (kernel
	// without nf_tables or without ip_tables, binary missing), the error.
	Unusable map[Backend]error
}

// Detect picks the backend for the rules of the calling process's network
// namespace, the way Istio's istio-iptables and Kubernetes's
// iptables-wrappers do: run iptables-legacy-save and iptables-nft-save
// (and the ip6tables ones; every table, so nothing is created), count the
// rules each shows, and
//   - use the only backend that works (the other's save fails: kernel
//     without it);
//   - else the backend that has rules when only one has (the node's
//     components, or an earlier run of meshlet, use it);
//   - else, both having rules, the one with more (iptables-wrappers); a
//     tie picks nft;
//   - else (a new pod's namespace is empty in both) nft, the default of
//     current distributions and of iptables itself since 1.8.
//
// dir is Runner.Dir. The error, when no backend works, holds both
// backends' errors.
func Detect(ctx context.Context, dir string) (Detection, error) {
	d := Detection{Rules: map[Backend]int{}, Unusable: map[Backend]error{}}
	for _, b := range []Backend{BackendNFT, BackendLegacy} {
		r := Runner{Backend: b, Dir: dir}
		out, err := r.Save(ctx, IPv4, "", false)
		if err != nil {
			d.Unusable[b] = err
			continue
		}
		n := countRules(out, "")
		if out6, err := r.Save(ctx, IPv6, "", false); err == nil {
			n += countRules(out6, "")
		}
		d.Rules[b] = n
	}
	err := d.choose()
	return d, err
}

// choose sets Backend and Reason from Rules and Unusable (see Detect).
func (d *Detection) choose() error {
	nft, nftOK := d.Rules[BackendNFT]
	legacy, legacyOK := d.Rules[BackendLegacy]
	switch {
	case !nftOK && !legacyOK:
		return fmt.Errorf("intercept: no iptables backend works here: nft: %w; legacy: %w", d.Unusable[BackendNFT], d.Unusable[BackendLegacy])
	case !legacyOK:
		d.Backend, d.Reason = BackendNFT, "the legacy backend does not work here"
	case !nftOK:
		d.Backend, d.Reason = BackendLegacy, "the nft backend does not work here"
	case nft == 0 && legacy == 0:
		d.Backend, d.Reason = BackendNFT, "no rules in either backend: nft, the default"
	case legacy == 0:
		d.Backend, d.Reason = BackendNFT, fmt.Sprintf("only nft has rules (%d)", nft)
	case nft == 0:
		d.Backend, d.Reason = BackendLegacy, fmt.Sprintf("only legacy has rules (%d)", legacy)
	case legacy > nft:
		d.Backend, d.Reason = BackendLegacy, fmt.Sprintf("legacy has more rules (%d) than nft (%d)", legacy, nft)
	default:
		d.Backend, d.Reason = BackendNFT, fmt.Sprintf("nft has at least as many rules (%d) as legacy (%d)", nft, legacy)
	}
	return nil
}

// countRules counts the "-A" lines of iptables-save output (with or
// without counters), of one table when table is not empty.
func countRules(save, table string) int {
	n := 0
	cur := ""
	for _, line := range strings.Split(save, "\n") {
		if strings.HasPrefix(line, "*") {
			cur = line[1:]
			continue
		}
		if table != "" && cur != table {
			continue
		}
		if strings.HasPrefix(stripCounters(line), "-A ") {
			n++
		}
	}
	return n
}

// stripCounters drops a leading "[pkts:bytes] " of iptables-save -c.
func stripCounters(line string) string {
	if strings.HasPrefix(line, "[") {
		if i := strings.Index(line, "] "); i > 0 {
			return line[i+2:]
		}
	}
	return line
}

// errNoRule reports a rule missing from iptables-save's output.
var errNoRule = errors.New("rule not found")

// ruleCounter returns the packet counter of the rule of chain whose
// comment is comment in iptables-save -c output.
func ruleCounter(save, chain, comment string) (uint64, error) {
	want := "--comment \"" + comment + "\""
	for _, line := range strings.Split(save, "\n") {
		rest := stripCounters(line)
		if rest == line || !strings.HasPrefix(rest, "-A "+chain+" ") || !strings.Contains(rest, want) {
			continue
		}
		var pkts, bytes uint64
		if _, err := fmt.Sscanf(line, "[%d:%d]", &pkts, &bytes); err != nil {
			return 0, fmt.Errorf("counters of %q: %w", line, err)
		}
		return pkts, nil
	}
	return 0, errNoRule
}

// hasJump reports whether iptables-save output has a rule of builtin that
// jumps to chain.
func hasJump(save, builtin, chain string) bool {
	for _, line := range strings.Split(save, "\n") {
		line = stripCounters(line)
		if strings.HasPrefix(line, "-A "+builtin+" ") && strings.HasSuffix(strings.TrimSpace(line), " -j "+chain) {
			return true
		}
	}
	return false
}
