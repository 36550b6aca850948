package intercept

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"

	"github.com/meshlet/meshlet/xds"
)

// AdminPort is the port of the sidecar's admin endpoint
// (sidecar.DefaultAdminAddress, 127.0.0.1:19000). It listens on loopback,
// which is never redirected; it is listed among the sidecar's ports so the
// rules stay right if it is ever opened on the pod's address.
const AdminPort = 19000

// InboundMode selects which inbound TCP connections are redirected to the
// inbound capture port, as Istio's traffic.sidecar.istio.io/includeInboundPorts
// does with "*" and "".
type InboundMode string

const (
	// InboundAll redirects every inbound TCP port except the sidecar's
	// ports and Config.ExcludeInboundPorts (Istio's "*"). The default.
	InboundAll InboundMode = "all"
	// InboundNone redirects no inbound connection: only outbound traffic
	// is intercepted (Istio's "").
	InboundNone InboundMode = "none"
)

// Config is what the interception rules redirect and what they leave
// alone. The zero value is usable: every field has a default (see
// WithDefaults), applied by Rules and Install. The exclusions come from the
// pod's annotations, passed by the injection webhook as flags of `sidecar
// intercept` (see the README, "Transparent proxy"):
// meshlet.io/exclude-outbound-ports, -outbound-cidrs, -inbound-ports and
// -uids.
type Config struct {
	// ProxyUID is the sidecar's user ID: its own connections are never
	// redirected (they would loop). 0 means xds.SidecarUID (1337); the
	// sidecar never runs as root.
	ProxyUID uint32
	// OutboundPort is where outbound connections are redirected (the
	// sidecar's outbound capture listener); 0 means xds.OutboundCapturePort
	// (15001).
	OutboundPort int
	// InboundPort is where inbound connections are redirected (the
	// sidecar's inbound capture listener); 0 means xds.InboundCapturePort
	// (15006).
	InboundPort int
	// SidecarPorts are the sidecar's own ports, never redirected in either
	// direction (OutboundPort and InboundPort are not redirected inbound
	// either). nil means DefaultSidecarPorts(): the health port 15020 (the
	// kubelet's probes), the admin port 19000 and the public mTLS port
	// 20000 (other sidecars connect to it). An empty non-nil slice means
	// none.
	SidecarPorts []int
	// Inbound is InboundAll (the default, when empty) or InboundNone.
	Inbound InboundMode
	// ExcludeOutboundPorts are destination ports whose outbound
	// connections are not redirected (e.g. a database the sidecar must
	// not see; annotation meshlet.io/exclude-outbound-ports).
	ExcludeOutboundPorts []PortRange
	// ExcludeOutboundCIDRs are destinations, IPv4 and IPv6 alike, whose
	// outbound connections are not redirected (annotation
	// meshlet.io/exclude-outbound-cidrs). Each family's rules take the
	// prefixes of that family.
	ExcludeOutboundCIDRs []netip.Prefix
	// ExcludeInboundPorts are local ports whose inbound connections are
	// not redirected (annotation meshlet.io/exclude-inbound-ports).
	ExcludeInboundPorts []PortRange
	// ExcludeUIDs are user IDs whose outbound connections are not
	// redirected, besides ProxyUID (annotation meshlet.io/exclude-uids).
	ExcludeUIDs []uint32
	// KubeAPIServers are the Kubernetes API server's addresses (the
	// ClusterIP and port of the default/kubernetes Service, which the
	// kubelet gives every container as KUBERNETES_SERVICE_HOST and
	// KUBERNETES_SERVICE_PORT): outbound connections to them are not
	// redirected, so injected pods reach the API server whatever the
	// sidecar knows. Empty excludes none.
	KubeAPIServers []netip.AddrPort
}

// DefaultSidecarPorts returns the default Config.SidecarPorts:
// xds.PodHealthPort (15020), AdminPort (19000) and xds.PodPublicPort
// (20000), a new slice on each call.
func DefaultSidecarPorts() []int {
	return []int{xds.PodHealthPort, AdminPort, xds.PodPublicPort}
}

// WithDefaults returns c with every unset field at its default (see the
// fields' documentation). It does not validate.
func (c Config) WithDefaults() Config {
	if c.ProxyUID == 0 {
		c.ProxyUID = xds.SidecarUID
	}
	if c.OutboundPort == 0 {
		c.OutboundPort = xds.OutboundCapturePort
	}
	if c.InboundPort == 0 {
		c.InboundPort = xds.InboundCapturePort
	}
	if c.SidecarPorts == nil {
		c.SidecarPorts = DefaultSidecarPorts()
	}
	if c.Inbound == "" {
		c.Inbound = InboundAll
	}
	return c
}

// Validate reports the first problem of c after defaults: a port outside
// 1-65535, the two capture ports equal, an unknown Inbound mode, an
// invalid port range, CIDR or API server address. Errors start with
// "intercept: config:" and name the field.
func (c Config) Validate() error {
	c = c.WithDefaults()
	for _, p := range []struct {
		name string
		port int
	}{{"OutboundPort", c.OutboundPort}, {"InboundPort", c.InboundPort}} {
		if p.port < 1 || p.port > 65535 {
			return fmt.Errorf("intercept: config: %s %d is not a port (1-65535)", p.name, p.port)
		}
	}
	if c.OutboundPort == c.InboundPort {
		return fmt.Errorf("intercept: config: OutboundPort and InboundPort are both %d", c.OutboundPort)
	}
	for _, p := range c.SidecarPorts {
		if p < 1 || p > 65535 {
			return fmt.Errorf("intercept: config: SidecarPorts: %d is not a port (1-65535)", p)
		}
	}
	switch c.Inbound {
	case InboundAll, InboundNone:
	default:
		return fmt.Errorf("intercept: config: Inbound %q: want %q or %q", c.Inbound, InboundAll, InboundNone)
	}
	for _, f := range []struct {
		name   string
		ranges []PortRange
	}{{"ExcludeOutboundPorts", c.ExcludeOutboundPorts}, {"ExcludeInboundPorts", c.ExcludeInboundPorts}} {
		for _, r := range f.ranges {
			if err := r.validate(); err != nil {
				return fmt.Errorf("intercept: config: %s: %w", f.name, err)
			}
		}
	}
	for _, p := range c.ExcludeOutboundCIDRs {
		if !p.IsValid() {
			return errors.New("intercept: config: ExcludeOutboundCIDRs: an invalid prefix")
		}
	}
	for _, a := range c.KubeAPIServers {
		if !a.IsValid() || a.Port() == 0 {
			return fmt.Errorf("intercept: config: KubeAPIServers: %q is not an address with a port", a)
		}
	}
	return nil
}

// PortRange is an inclusive range of TCP ports, 1 <= First <= Last <=
// 65535; a single port has First == Last. It is written "5432" or
// "7000-7010" (Linkerd's port range syntax) and becomes iptables's
// "--dport 5432" or "--dport 7000:7010".
type PortRange struct {
	First, Last int
}

// String returns "5432" or "7000-7010".
func (r PortRange) String() string {
	if r.First == r.Last {
		return strconv.Itoa(r.First)
	}
	return fmt.Sprintf("%d-%d", r.First, r.Last)
}

// dport is the range as iptables's --dport value.
func (r PortRange) dport() string {
	if r.First == r.Last {
		return strconv.Itoa(r.First)
	}
	return fmt.Sprintf("%d:%d", r.First, r.Last)
}

func (r PortRange) validate() error {
	if r.First < 1 || r.Last > 65535 || r.First > r.Last {
		return fmt.Errorf("port range %d-%d: want 1 <= first <= last <= 65535", r.First, r.Last)
	}
	return nil
}

// ParsePorts parses a comma-separated list of ports and inclusive ranges,
// "5432,6379,7000-7010" (the value of meshlet.io/exclude-outbound-ports and
// -inbound-ports). Blanks around items are ignored; "" is no ports. Errors
// name the item at fault.
func ParsePorts(s string) ([]PortRange, error) {
	var out []PortRange
	for _, item := range splitList(s) {
		first, last, isRange := strings.Cut(item, "-")
		a, err := parsePort(first)
		if err != nil {
			return nil, fmt.Errorf("intercept: ports %q: %w", item, err)
		}
		b := a
		if isRange {
			if b, err = parsePort(last); err != nil {
				return nil, fmt.Errorf("intercept: ports %q: %w", item, err)
			}
		}
		r := PortRange{First: a, Last: b}
		if err := r.validate(); err != nil {
			return nil, fmt.Errorf("intercept: ports %q: %w", item, err)
		}
		out = append(out, r)
	}
	return out, nil
}

func parsePort(s string) (int, error) {
	n, err := strconv.Atoi(strings.TrimSpace(s))
	if err != nil || n < 1 || n > 65535 {
		return 0, fmt.Errorf("%q is not a port (1-65535)", s)
	}
	return n, nil
}

// ParseCIDRs parses a comma-separated list of IPv4 and IPv6 prefixes,
// "10.0.0.0/8,fd00::/8" (the value of meshlet.io/exclude-outbound-cidrs); a
// bare address is a single host (/32 or /128). Prefixes are masked
// ("10.1.2.3/8" is 10.0.0.0/8, as iptables stores it). "" is none. Errors
// name the item at fault.
func ParseCIDRs(s string) ([]netip.Prefix, error) {
	var out []netip.Prefix
	for _, item := range splitList(s) {
		if !strings.Contains(item, "/") {
			a, err := netip.ParseAddr(item)
			if err != nil {
				return nil, fmt.Errorf("intercept: CIDR %q: %w", item, err)
			}
			a = a.Unmap()
			out = append(out, netip.PrefixFrom(a, a.BitLen()))
			continue
		}
		p, err := netip.ParsePrefix(item)
		if err != nil {
			return nil, fmt.Errorf("intercept: CIDR %q: %w", item, err)
		}
		out = append(out, p.Masked())
	}
	return out, nil
}

// ParseUIDs parses a comma-separated list of numeric user IDs, "1000,1001"
// (the value of meshlet.io/exclude-uids). "" is none. Errors name the item
// at fault.
func ParseUIDs(s string) ([]uint32, error) {
	var out []uint32
	for _, item := range splitList(s) {
		n, err := strconv.ParseUint(item, 10, 32)
		if err != nil {
			return nil, fmt.Errorf("intercept: uid %q is not a number (0-4294967295)", item)
		}
		out = append(out, uint32(n))
	}
	return out, nil
}

// ParseAddrPorts parses a comma-separated list of "ip:port" addresses
// ("[v6]:port" for IPv6), e.g. the Kubernetes API server's
// "10.96.0.1:443". "" is none. Errors name the item at fault.
func ParseAddrPorts(s string) ([]netip.AddrPort, error) {
	var out []netip.AddrPort
	for _, item := range splitList(s) {
		a, err := netip.ParseAddrPort(item)
		if err != nil || a.Port() == 0 {
			return nil, fmt.Errorf("intercept: address %q: want ip:port or [ipv6]:port", item)
		}
		out = append(out, netip.AddrPortFrom(a.Addr().Unmap(), a.Port()))
	}
	return out, nil
}

// splitList splits s at commas, trimming blanks and dropping empty items.
func splitList(s string) []string {
	var out []string
	for _, item := range strings.Split(s, ",") {
		if item = strings.TrimSpace(item); item != "" {
			out = append(out, item)
		}
	}
	return out
}

// sidecarPorts returns the ports never redirected inbound, in order: the
// two capture ports, then c.SidecarPorts, without duplicates. c has
// defaults.
func (c Config) sidecarPorts() []int {
	out := []int{c.OutboundPort, c.InboundPort}
	for _, p := range c.SidecarPorts {
		if !slices.Contains(out, p) {
			out = append(out, p)
		}
	}
	return out
}
