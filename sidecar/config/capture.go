package config

import (
	"cmp"
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"

	"github.com/meshlet/meshlet/xds"
)

// ChainMatch is the destination part of a capture listener chain's
// FilterChainMatch, matched against a connection's original destination.
type ChainMatch struct {
	// Prefixes are prefix_ranges, masked (10.96.0.12/32, fd00::/64); empty
	// matches every address of both families.
	Prefixes []netip.Prefix
	// Port is destination_port (1-65535); 0 (the field unset) matches every
	// port.
	Port int
}

// Capture selects the filter chain of each connection of a capture
// listener by its original destination, as Envoy's filter chain manager
// does for the criteria meshlet supports:
//
//  1. destination_port: when some chain names the destination's port, only
//     the chains naming it are candidates (even if none of them matches the
//     address); otherwise only the chains without a destination_port are.
//  2. prefix_ranges: among the candidates, the longest prefix containing
//     the destination's address wins (a chain without prefix_ranges has
//     0.0.0.0/0 and ::/0).
//  3. transport_protocol: the chains left (one, or a "tls" and a
//     "raw_buffer" one behind tls_inspector) form a Target, whose handler
//     tells TLS from plaintext by the first byte, as an ordinary listener's
//     does.
//
// When no chain matches, the connection gets the default chain, or is
// refused when the listener has none. Unlike Envoy, a transport protocol
// the selected target has no chain for does not fall back to the default
// chain: a plaintext connection to a target with only an mTLS chain is
// refused, as on the public listener in strict mode, so the default
// pass-through cannot carry plaintext around mTLS to the application's
// port. A Capture is immutable.
type Capture struct {
	// Targets are the distinct sets of chains a connection can be given,
	// the default chain's last when there is one.
	Targets []CaptureTarget
	// Default is the index in Targets of the default chain, -1 without.
	Default int
	// ports holds a prefix table by destination_port; 0 holds the chains
	// without one.
	ports map[uint16]*prefixTable
}

// CaptureTarget is one set of chains of a capture listener.
type CaptureTarget struct {
	// Key identifies the target across versions of the listener, for
	// reusing its handler: the names of its chains (their index where
	// unnamed).
	Key string
	// Listener is an ordinary listener holding just the target's chains
	// (one, or a "tls" and a "raw_buffer" one) with the capture listener's
	// name, address and listener filter settings: what serves the target
	// is what serves any listener.
	Listener *Listener
}

// Select returns the index in Targets of the chains for a connection whose
// original destination is dst, or Default (-1 when the listener has no
// default chain) when no chain matches. It does not allocate.
func (c *Capture) Select(dst netip.AddrPort) int {
	t := c.ports[dst.Port()]
	if t == nil {
		if t = c.ports[0]; t == nil {
			return c.Default
		}
	}
	if i, ok := t.lookup(dst.Addr().Unmap()); ok {
		return i
	}
	return c.Default
}

// prefixTable finds the longest prefix containing an address: prefixes
// grouped by family and length, longest first, each group a map from the
// masked prefix to a target index.
type prefixTable struct {
	v4, v6 []prefixBucket
}

type prefixBucket struct {
	bits    int
	targets map[netip.Prefix]int
}

func (t *prefixTable) add(p netip.Prefix, target int) {
	buckets := &t.v6
	if p.Addr().Is4() {
		buckets = &t.v4
	}
	i := slices.IndexFunc(*buckets, func(b prefixBucket) bool { return b.bits == p.Bits() })
	if i < 0 {
		*buckets = append(*buckets, prefixBucket{bits: p.Bits(), targets: map[netip.Prefix]int{}})
		slices.SortFunc(*buckets, func(a, b prefixBucket) int { return cmp.Compare(b.bits, a.bits) })
		i = slices.IndexFunc(*buckets, func(b prefixBucket) bool { return b.bits == p.Bits() })
	}
	(*buckets)[i].targets[p] = target
}

func (t *prefixTable) lookup(a netip.Addr) (int, bool) {
	buckets := t.v6
	if a.Is4() {
		buckets = t.v4
	}
	for _, b := range buckets {
		p, err := a.Prefix(b.bits)
		if err != nil {
			continue
		}
		if i, ok := b.targets[p]; ok {
			return i, true
		}
	}
	return 0, false
}

// anyAddress is what a chain without prefix_ranges matches.
var anyAddress = []netip.Prefix{netip.PrefixFrom(netip.IPv4Unspecified(), 0), netip.PrefixFrom(netip.IPv6Unspecified(), 0)}

// chainSlot is the chains one (destination_port, prefix) leads to, by
// transport protocol: indexes in Listener.Chains plus one, 0 for none.
type chainSlot struct {
	any, tls, raw int
}

// newCapture builds the chain selection of the capture listener l from its
// decoded Chains and Default, or returns the error of the first chain
// Envoy would not accept or meshlet would not serve as Envoy does: two
// chains with the same matching rules ("multiple filter chains with
// overlapping matching rules"), a chain without transport_protocol and one
// with it for the same destination, a raw_buffer chain without a tls one.
func newCapture(l *Listener) (*Capture, error) {
	kind, name := xds.KindListener, l.Name
	type leafKey struct {
		port   int
		prefix netip.Prefix
	}
	slots := map[leafKey]*chainSlot{}
	var order []leafKey
	for i, c := range l.Chains {
		field := fmt.Sprintf("filter_chains[%d].filter_chain_match", i)
		prefixes := c.Match.Prefixes
		if len(prefixes) == 0 {
			prefixes = anyAddress
		}
		for _, p := range prefixes {
			k := leafKey{c.Match.Port, p}
			s := slots[k]
			if s == nil {
				s = &chainSlot{}
				slots[k] = s
				order = append(order, k)
			}
			slot := &s.any
			switch c.TransportProtocol {
			case "tls":
				slot = &s.tls
			case "raw_buffer":
				slot = &s.raw
			}
			if *slot != 0 && *slot != i+1 {
				return nil, fieldErr(kind, name, field, "filter_chains[%d] has the same matching rules (destination_port %d, prefix %s, transport_protocol %q): multiple filter chains with overlapping matching rules",
					*slot-1, c.Match.Port, p, c.TransportProtocol)
			}
			*slot = i + 1
			if s.any != 0 && (s.tls != 0 || s.raw != 0) {
				return nil, fieldErr(kind, name, field+".transport_protocol", "chains with and without transport_protocol for the same destination (destination_port %d, prefix %s) are not supported", c.Match.Port, p)
			}
		}
	}
	for _, k := range order {
		if s := slots[k]; s.raw != 0 && s.tls == 0 {
			return nil, fieldErr(kind, name, fmt.Sprintf("filter_chains[%d].filter_chain_match.transport_protocol", s.raw-1),
				"a raw_buffer chain needs a tls chain for the same destination (destination_port %d, prefix %s): meshlet selects by destination, then tells TLS from plaintext within the chains selected", k.port, k.prefix)
		}
	}
	c := &Capture{Default: -1, ports: map[uint16]*prefixTable{}}
	chainKey := func(i int) string {
		if n := l.Chains[i].Name; n != "" {
			return "name:" + n
		}
		return "index:" + strconv.Itoa(i)
	}
	targets := map[chainSlot]int{}
	for _, k := range order {
		s := *slots[k]
		ti, ok := targets[s]
		if !ok {
			var chains []*FilterChain
			var keys []string
			for _, idx := range []int{s.any, s.tls, s.raw} {
				if idx != 0 {
					chains = append(chains, l.Chains[idx-1])
					keys = append(keys, chainKey(idx-1))
				}
			}
			ti = len(c.Targets)
			targets[s] = ti
			c.Targets = append(c.Targets, CaptureTarget{Key: strings.Join(keys, "+"), Listener: l.target(chains)})
		}
		t := c.ports[uint16(k.port)]
		if t == nil {
			t = &prefixTable{}
			c.ports[uint16(k.port)] = t
		}
		t.add(k.prefix, ti)
	}
	if l.Default != nil {
		key := "default"
		if l.Default.Name != "" {
			key = "name:" + l.Default.Name
		}
		c.Default = len(c.Targets)
		c.Targets = append(c.Targets, CaptureTarget{Key: key, Listener: l.target([]*FilterChain{l.Default})})
	}
	return c, nil
}

// target returns an ordinary listener like l holding chains.
func (l *Listener) target(chains []*FilterChain) *Listener {
	return &Listener{Name: l.Name, Address: l.Address, TLSInspector: l.TLSInspector, FiltersTimeout: l.FiltersTimeout,
		ContinueOnFiltersTimeout: l.ContinueOnFiltersTimeout, Chains: chains}
}
