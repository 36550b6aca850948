package intercept

import (
	"fmt"
	"strconv"
	"strings"

	"github.com/meshlet/meshlet/xds"
)

// The nat chains meshlet owns. Install flushes and refills them on every
// run and never touches another chain except to add, once, the jump to
// them from the built-in chain.
const (
	// ChainInbound holds the inbound rules; PREROUTING jumps to it for
	// TCP.
	ChainInbound = "MESHLET_INBOUND"
	// ChainOutbound holds the outbound rules; OUTPUT jumps to it for TCP.
	ChainOutbound = "MESHLET_OUTBOUND"
)

// CommentPrefix starts the comment (-m comment) of every rule meshlet
// writes, so `iptables-save | grep meshlet:` shows them all.
const CommentPrefix = "meshlet: "

// Family is an IP family: IPv4 rules go through iptables, IPv6 ones
// through ip6tables.
type Family int

const (
	IPv4 Family = 4
	IPv6 Family = 6
)

// String returns "IPv4" or "IPv6".
func (f Family) String() string {
	if f == IPv6 {
		return "IPv6"
	}
	return "IPv4"
}

// outboundRedirectComment and inboundRedirectComment mark the two REDIRECT
// rules; the self-check finds the outbound one by it to read its counter.
func outboundRedirectComment(port int) string {
	return CommentPrefix + "redirect outbound TCP to the outbound capture port " + strconv.Itoa(port)
}

func inboundRedirectComment(port int) string {
	return CommentPrefix + "redirect inbound TCP to the inbound capture port " + strconv.Itoa(port)
}

// Rules returns the ruleset of cfg (after defaults) for family f in
// iptables-restore format: the nat table only, the chains ChainInbound and
// ChainOutbound declared (which, under `iptables-restore --noflush`, empties
// them first), the jumps from PREROUTING and OUTPUT, then the chains' rules,
// each with a "meshlet: ..." comment, ending in COMMIT. Every rule line is
// written the way iptables-save prints it back. It is what `sidecar
// intercept -dry-run` prints; Install applies the same text but leaves out
// a jump that is already there. Errors are cfg's Validate errors.
func Rules(cfg Config, f Family) (string, error) {
	if err := cfg.Validate(); err != nil {
		return "", err
	}
	return ruleset(cfg.WithDefaults(), f, true, true), nil
}

// jumpRules returns the two jump rules, PREROUTING's then OUTPUT's.
func jumpRules() (inbound, outbound string) {
	return "-A PREROUTING -p tcp -m comment --comment \"" + CommentPrefix + "inbound TCP goes through " + ChainInbound + "\" -j " + ChainInbound,
		"-A OUTPUT -p tcp -m comment --comment \"" + CommentPrefix + "outbound TCP goes through " + ChainOutbound + "\" -j " + ChainOutbound
}

// ruleset renders c (with defaults, valid) for f, with the jump rules the
// caller asks for.
func ruleset(c Config, f Family, jumpIn, jumpOut bool) string {
	var b strings.Builder
	b.WriteString("*nat\n")
	fmt.Fprintf(&b, ":%s - [0:0]\n:%s - [0:0]\n", ChainInbound, ChainOutbound)
	in, out := jumpRules()
	if jumpIn {
		b.WriteString(in + "\n")
	}
	if jumpOut {
		b.WriteString(out + "\n")
	}
	rule := func(chain, match, comment, target string) {
		b.WriteString("-A " + chain + " ")
		if match != "" {
			b.WriteString(match + " ")
		}
		b.WriteString("-m comment --comment \"" + CommentPrefix + comment + "\" -j " + target + "\n")
	}
	dport := func(r string) string { return "-p tcp -m tcp --dport " + r }

	// Inbound: the sidecar's ports, the user's exclusions, then REDIRECT.
	if c.Inbound == InboundNone {
		rule(ChainInbound, "", "inbound redirection is off", "RETURN")
	} else {
		for _, p := range c.sidecarPorts() {
			rule(ChainInbound, dport(strconv.Itoa(p)), portName(c, p)+" is not redirected", "RETURN")
		}
		for _, r := range c.ExcludeInboundPorts {
			rule(ChainInbound, dport(r.dport()), "excluded inbound port "+r.String(), "RETURN")
		}
		b.WriteString("-A " + ChainInbound + " -p tcp -m comment --comment \"" + inboundRedirectComment(c.InboundPort) +
			"\" -j REDIRECT --to-ports " + strconv.Itoa(c.InboundPort) + "\n")
	}

	// Outbound: loopback, the sidecar's UID and the excluded ones, the
	// sidecar's ports, the API server, the user's CIDRs and ports, then
	// REDIRECT.
	rule(ChainOutbound, "-o lo", "loopback (127.0.0.0/8, ::1, the pod addresses) is not redirected", "RETURN")
	rule(ChainOutbound, "-m owner --uid-owner "+strconv.FormatUint(uint64(c.ProxyUID), 10),
		"the sidecar (uid "+strconv.FormatUint(uint64(c.ProxyUID), 10)+") is not redirected", "RETURN")
	for _, u := range c.ExcludeUIDs {
		s := strconv.FormatUint(uint64(u), 10)
		rule(ChainOutbound, "-m owner --uid-owner "+s, "excluded uid "+s, "RETURN")
	}
	for _, p := range c.SidecarPorts {
		rule(ChainOutbound, dport(strconv.Itoa(p)), portName(c, p)+" is not redirected", "RETURN")
	}
	for _, a := range c.KubeAPIServers {
		if familyOf(a.Addr().Is4()) != f {
			continue
		}
		rule(ChainOutbound, "-d "+hostPrefix(a.Addr().String(), f)+" "+dport(strconv.Itoa(int(a.Port()))),
			"the Kubernetes API server "+a.String()+" is not redirected", "RETURN")
	}
	for _, p := range c.ExcludeOutboundCIDRs {
		if familyOf(p.Addr().Is4()) != f {
			continue
		}
		rule(ChainOutbound, "-d "+p.String(), "excluded outbound CIDR "+p.String(), "RETURN")
	}
	for _, r := range c.ExcludeOutboundPorts {
		rule(ChainOutbound, dport(r.dport()), "excluded outbound port "+r.String(), "RETURN")
	}
	b.WriteString("-A " + ChainOutbound + " -p tcp -m comment --comment \"" + outboundRedirectComment(c.OutboundPort) +
		"\" -j REDIRECT --to-ports " + strconv.Itoa(c.OutboundPort) + "\n")
	b.WriteString("COMMIT\n")
	return b.String()
}

func familyOf(is4 bool) Family {
	if is4 {
		return IPv4
	}
	return IPv6
}

// hostPrefix is a single address as iptables-save prints it.
func hostPrefix(addr string, f Family) string {
	if f == IPv6 {
		return addr + "/128"
	}
	return addr + "/32"
}

// portName names one of the sidecar's ports for a rule's comment.
func portName(c Config, p int) string {
	switch p {
	case c.OutboundPort:
		return "the outbound capture port " + strconv.Itoa(p)
	case c.InboundPort:
		return "the inbound capture port " + strconv.Itoa(p)
	case xds.PodHealthPort:
		return "the sidecar health port " + strconv.Itoa(p)
	case AdminPort:
		return "the sidecar admin port " + strconv.Itoa(p)
	case xds.PodPublicPort:
		return "the sidecar public (mTLS) port " + strconv.Itoa(p)
	}
	return "the sidecar port " + strconv.Itoa(p)
}
