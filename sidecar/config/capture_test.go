package config

import (
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	xdsmatcher "github.com/cncf/xds/go/xds/type/matcher/v3"
	cluster "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listener "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	httpinspector "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/listener/http_inspector/v3"
	originaldst "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/listener/original_dst/v3"
	tlsinspector "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/listener/tls_inspector/v3"
	metadatav3 "github.com/envoyproxy/go-control-plane/envoy/type/metadata/v3"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/meshlet/meshlet/controlplane/xdsbuild"
	"github.com/meshlet/meshlet/xds"
)

// httpFilters and tcpFilters are the filters of an explicit upstream
// listener, which a capture listener's chain for the same upstream carries.
func httpFilters(service string) []*listener.Filter {
	return xdsbuild.NewHTTPListener("upstream:"+service, "127.0.0.1", 1, xdsbuild.HTTPListenerOptions{RouteConfigName: service, Via: "meshlet"}).FilterChains[0].Filters
}

func tcpFilters(service string) []*listener.Filter {
	return xdsbuild.NewTCPProxyListener("upstream:"+service, "127.0.0.1", 1, service, xdsbuild.TCPProxyOptions{IdleTimeout: time.Minute}).FilterChains[0].Filters
}

func prefixes(s ...string) []netip.Prefix {
	var out []netip.Prefix
	for _, p := range s {
		out = append(out, netip.MustParsePrefix(p))
	}
	return out
}

// outboundCapture is the outbound capture listener the control plane sends
// a transparent proxy whose upstreams are api (HTTP, 10.96.0.12:80) and
// redis (TCP, any address on 6379).
func outboundCapture(passthrough bool) *listener.Listener {
	return xdsbuild.NewCaptureListener(xds.OutboundCaptureListener, "127.0.0.1", xds.OutboundCapturePort, xdsbuild.CaptureOptions{
		Chains: []xdsbuild.CaptureChain{
			{Name: "upstream:api", Prefixes: prefixes("10.96.0.12/32"), Port: 80, Filters: httpFilters("api")},
			{Name: "upstream:redis", Port: 6379, Filters: tcpFilters("redis")},
		},
		Passthrough: passthrough,
	})
}

// inboundCapture is the inbound capture listener: the public listener's
// chains matched on the application's port 8080 (behind tls_inspector when
// permissive), and the pass-through for the pod's other ports.
func inboundCapture(permissive bool) *listener.Listener {
	pub := xdsbuild.NewInboundListener(xds.PublicListener, "0.0.0.0", 20000, xdsbuild.InboundOptions{HTTP: true, TLS: xdsbuild.DownstreamTLS("", nil), Permissive: permissive})
	l := xdsbuild.NewCaptureListener(xds.InboundCaptureListener, "0.0.0.0", xds.InboundCapturePort, xdsbuild.CaptureOptions{
		Passthrough: true, ListenerFilters: pub.ListenerFilters,
	})
	l.ListenerFiltersTimeout, l.ContinueOnListenerFiltersTimeout = pub.ListenerFiltersTimeout, pub.ContinueOnListenerFiltersTimeout
	for _, fc := range pub.FilterChains {
		m := &listener.FilterChainMatch{DestinationPort: wrapperspb.UInt32(8080)}
		if fc.FilterChainMatch != nil {
			m.TransportProtocol = fc.FilterChainMatch.TransportProtocol
		}
		l.FilterChains = append(l.FilterChains, &listener.FilterChain{Name: "inbound:" + m.TransportProtocol, FilterChainMatch: m, Filters: fc.Filters, TransportSocket: fc.TransportSocket})
	}
	return l
}

func TestDecodeCaptureListeners(t *testing.T) {
	t.Run("outbound", func(t *testing.T) {
		l, err := DecodeListener(xds.MustAny(outboundCapture(true)))
		if err != nil {
			t.Fatal(err)
		}
		if !l.OriginalDst || l.TLSInspector || l.Address != "127.0.0.1:15001" || len(l.Chains) != 2 || l.Default == nil {
			t.Fatalf("listener = %+v", l)
		}
		api, redis := l.Chains[0], l.Chains[1]
		if api.Name != "upstream:api" || !slices.Equal(api.Match.Prefixes, prefixes("10.96.0.12/32")) || api.Match.Port != 80 ||
			api.HTTP == nil || api.HTTP.RouteConfigName != "api" || api.HTTP.Via != "meshlet" {
			t.Errorf("api chain = %+v", api)
		}
		if redis.Name != "upstream:redis" || len(redis.Match.Prefixes) != 0 || redis.Match.Port != 6379 || redis.TCP == nil ||
			redis.TCP.Cluster != "redis" || redis.TCP.IdleTimeout != time.Minute {
			t.Errorf("redis chain = %+v", redis)
		}
		if d := l.Default; d.Name != xds.PassthroughChain || d.TCP == nil || d.TCP.Cluster != xds.PassthroughCluster {
			t.Errorf("default chain = %+v", d)
		}
		var keys []string
		for _, tg := range l.Capture.Targets {
			keys = append(keys, tg.Key)
			if tg.Listener.Name != l.Name || tg.Listener.Address != l.Address || tg.Listener.OriginalDst || len(tg.Listener.Chains) != 1 {
				t.Errorf("target %s: listener %+v", tg.Key, tg.Listener)
			}
		}
		if want := []string{"name:upstream:api", "name:upstream:redis", "name:passthrough"}; !slices.Equal(keys, want) || l.Capture.Default != 2 {
			t.Errorf("targets %q, default %d; want %q, 2", keys, l.Capture.Default, want)
		}
		if got := RouteNames(map[string]*Listener{l.Name: l}); !slices.Equal(got, []string{"api"}) {
			t.Errorf("RouteNames = %q", got)
		}
	})
	t.Run("outbound registry-only", func(t *testing.T) {
		l, err := DecodeListener(xds.MustAny(outboundCapture(false)))
		if err != nil {
			t.Fatal(err)
		}
		if l.Default != nil || l.Capture.Default != -1 || len(l.Capture.Targets) != 2 {
			t.Errorf("default %+v, capture %+v", l.Default, l.Capture)
		}
		if got := l.Capture.Select(netip.MustParseAddrPort("10.96.0.99:8000")); got != -1 {
			t.Errorf("unknown destination selects %d, want -1 (refused)", got)
		}
	})
	for _, permissive := range []bool{false, true} {
		name := map[bool]string{false: "inbound strict", true: "inbound permissive"}[permissive]
		t.Run(name, func(t *testing.T) {
			l, err := DecodeListener(xds.MustAny(inboundCapture(permissive)))
			if err != nil {
				t.Fatal(err)
			}
			if !l.OriginalDst || l.TLSInspector != permissive || l.Address != "0.0.0.0:15006" {
				t.Fatalf("listener = %+v", l)
			}
			app := l.Capture.Select(netip.MustParseAddrPort("10.244.0.7:8080"))
			other := l.Capture.Select(netip.MustParseAddrPort("10.244.0.7:9090"))
			if app < 0 || other != l.Capture.Default {
				t.Fatalf("app port selects %d, other port %d (default %d)", app, other, l.Capture.Default)
			}
			tl := l.Capture.Targets[app].Listener
			secure, plain := tl.Chain(true), tl.Chain(false)
			if secure == nil || secure.TLS == nil || !secure.TLS.RequireClientCert || secure.HTTP == nil || secure.HTTP.ForwardClientCert != XFCCSanitizeSet {
				t.Errorf("mTLS chain of the app port = %+v", secure)
			}
			if permissive {
				if plain == nil || plain.TLS != nil || plain.HTTP == nil || tl.FiltersTimeout != xdsbuild.PermissiveDetectTimeout || !tl.ContinueOnFiltersTimeout {
					t.Errorf("plaintext chain %+v, detection %v/%v", plain, tl.FiltersTimeout, tl.ContinueOnFiltersTimeout)
				}
			} else if plain != secure { // one chain: Chain(false) finds it, and its TLS makes the listener strict
				t.Errorf("strict: Chain(false) = %+v", plain)
			}
			if got := SecretNames(map[string]*Listener{l.Name: l}, nil); !slices.Equal(got, []string{xds.SecretRoots, xds.SecretCert}) {
				t.Errorf("SecretNames = %q", got)
			}
		})
	}
	t.Run("passthrough cluster", func(t *testing.T) {
		c, err := DecodeCluster(xds.MustAny(xdsbuild.NewPassthroughCluster()))
		if err != nil {
			t.Fatal(err)
		}
		if c.Type != ClusterOriginalDst || c.LB != LBClusterProvided || c.Static != nil || c.ConnectTimeout != xds.DefaultConnectTimeout || c.PortOverride != 0 {
			t.Errorf("cluster = %+v", c)
		}
		if names := EndpointNames(map[string]*Cluster{c.Name: c}); len(names) != 0 {
			t.Errorf("EndpointNames = %q: an ORIGINAL_DST cluster waits for no EDS", names)
		}
		pc := xdsbuild.NewPassthroughCluster()
		pc.LbConfig = &cluster.Cluster_OriginalDstLbConfig_{OriginalDstLbConfig: &cluster.Cluster_OriginalDstLbConfig{UpstreamPortOverride: wrapperspb.UInt32(8443)}}
		pc.CleanupInterval = durationpb.New(time.Second)
		if c, err := DecodeCluster(xds.MustAny(pc)); err != nil || c.PortOverride != 8443 {
			t.Errorf("upstream_port_override: %+v, %v", c, err)
		}
	})
	t.Run("direct cluster of a headless service: ORIGINAL_DST with mTLS", func(t *testing.T) {
		const id = "spiffe://td.consul/ns/default/dc/dc1/svc/db"
		dc := xdsbuild.NewDirectCluster(xds.DirectCluster("db"), xdsbuild.ClusterOptions{
			TLS: xdsbuild.UpstreamTLS("", "db.default.dc1.internal.td.consul", id, nil), Thresholds: &xdsbuild.Thresholds{MaxConnections: 7, MaxPendingRequests: 1, MaxRequests: 1, MaxRetries: 1},
		})
		c, err := DecodeCluster(xds.MustAny(dc))
		if err != nil {
			t.Fatal(err)
		}
		if c.Type != ClusterOriginalDst || c.LB != LBClusterProvided || c.Thresholds.MaxConnections != 7 {
			t.Errorf("cluster = %+v", c)
		}
		if c.TLS == nil || c.TLS.SNI != "db.default.dc1.internal.td.consul" || !slices.Equal(c.TLS.SANs, []string{id}) ||
			c.TLS.CertSecret != xds.SecretCert || c.TLS.RootsSecret != xds.SecretRoots {
			t.Errorf("TLS = %+v, want the UpstreamTlsContext's SNI, SAN and SDS secrets", c.TLS)
		}
	})
}

// TestCaptureSelect checks chain selection against Envoy's rules: the
// destination port first (chains naming it exclude those without one, even
// when none of them matches the address), then the longest prefix, for
// IPv4 and IPv6.
func TestCaptureSelect(t *testing.T) {
	chain := func(name string, port int, p ...string) xdsbuild.CaptureChain {
		return xdsbuild.CaptureChain{Name: name, Prefixes: prefixes(p...), Port: port, Filters: tcpFilters(name)}
	}
	l, err := DecodeListener(xds.MustAny(xdsbuild.NewCaptureListener("capture", "::1", 15001, xdsbuild.CaptureOptions{
		Chains: []xdsbuild.CaptureChain{
			chain("api", 80, "10.96.0.12/32"),
			chain("svc-net-80", 80, "10.96.0.0/16"),
			chain("redis", 6379),
			chain("svc-net", 0, "10.96.0.0/16"),
			chain("other-net", 0, "10.98.0.0/16"),
			chain("v6-net-80", 80, "fd00:96::/64"),
			chain("v6-host", 0, "fd00:96::12/128"),
			chain("two", 9000, "10.96.0.7/32", "fd00:96::7/128"),
		},
		Passthrough: true,
	})))
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name, dst, want string
	}{
		{"exact address and port", "10.96.0.12:80", "api"},
		{"longest prefix on the port", "10.96.0.13:80", "svc-net-80"},
		{"port beats a longer prefix", "10.96.0.12:6379", "redis"},
		{"port-only chain, any address", "192.0.2.1:6379", "redis"},
		{"no chain names the port: prefix", "10.96.0.12:443", "svc-net"},
		{"no chain names the port, no prefix matches", "10.97.0.1:443", "passthrough"},
		{"chains name the port but none matches: no fallback to port-less chains", "10.98.0.1:80", "passthrough"},
		{"v6 on the port", "[fd00:96::12]:80", "v6-net-80"},
		{"v6 host without port", "[fd00:96::12]:8080", "v6-host"},
		{"v6 outside every prefix", "[fd00:97::1]:8080", "passthrough"},
		{"v4-mapped destination matches its IPv4 prefix", "[::ffff:10.96.0.12]:80", "api"},
		{"one chain, both families (v4)", "10.96.0.7:9000", "two"},
		{"one chain, both families (v6)", "[fd00:96::7]:9000", "two"},
		{"IPv4 prefix does not match IPv6", "[fd00:96::8]:9000", "passthrough"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			i := l.Capture.Select(netip.MustParseAddrPort(tc.dst))
			if i < 0 {
				t.Fatalf("%s: refused, want %s", tc.dst, tc.want)
			}
			if got := l.Capture.Targets[i].Listener.Chains[0].Name; got != tc.want {
				t.Errorf("%s selects %q, want %q", tc.dst, got, tc.want)
			}
		})
	}
	if n := testing.AllocsPerRun(100, func() { l.Capture.Select(netip.MustParseAddrPort("10.96.0.13:80")) }); n != 0 {
		t.Errorf("Select allocates %v times per call", n)
	}
}

// TestDecodeRejectsCaptureFields: what a sidecar cannot honour on a capture
// listener or a pass-through cluster is NACKed with the field named.
func TestDecodeRejectsCaptureFields(t *testing.T) {
	capture := func(mut func(*listener.Listener)) func() error {
		return func() error {
			l := outboundCapture(true)
			mut(l)
			_, err := DecodeListener(xds.MustAny(l))
			return err
		}
	}
	plain := func(mut func(*listener.Listener)) func() error {
		return func() error {
			l := xdsbuild.NewTCPProxyListener("l", "127.0.0.1", 80, "c", xdsbuild.TCPProxyOptions{})
			mut(l)
			_, err := DecodeListener(xds.MustAny(l))
			return err
		}
	}
	passthrough := func(mut func(*cluster.Cluster)) func() error {
		return func() error {
			c := xdsbuild.NewPassthroughCluster()
			mut(c)
			_, err := DecodeCluster(xds.MustAny(c))
			return err
		}
	}
	match := func(l *listener.Listener, i int) *listener.FilterChainMatch {
		return l.FilterChains[i].FilterChainMatch
	}
	tlsInspector := &listener.ListenerFilter{Name: xds.TLSInspectorFilter, ConfigType: &listener.ListenerFilter_TypedConfig{TypedConfig: xds.MustAny(&tlsinspector.TlsInspector{})}}
	tests := []struct {
		name   string
		decode func() error
		want   string
	}{
		{"unsupported listener filter", capture(func(l *listener.Listener) {
			l.ListenerFilters = append(l.ListenerFilters, &listener.ListenerFilter{Name: "envoy.filters.listener.http_inspector",
				ConfigType: &listener.ListenerFilter_TypedConfig{TypedConfig: xds.MustAny(&httpinspector.HttpInspector{})}})
		}), `listener "outbound_listener": listener_filters[1]: unsupported listener filter "envoy.filters.listener.http_inspector" (supported: envoy.filters.listener.tls_inspector, envoy.filters.listener.original_dst)`},
		{"original_dst twice", capture(func(l *listener.Listener) {
			l.ListenerFilters = append(l.ListenerFilters, l.ListenerFilters[0])
		}), `listener_filters[1]: listener filter "envoy.filters.listener.original_dst" appears twice`},
		{"listener filter disabled by a predicate", capture(func(l *listener.Listener) {
			l.ListenerFilters[0].FilterDisabled = &listener.ListenerFilterChainMatchPredicate{Rule: &listener.ListenerFilterChainMatchPredicate_AnyMatch{AnyMatch: true}}
		}), `listener_filters[0].filter_disabled: not supported`},
		{"server_names", capture(func(l *listener.Listener) { match(l, 0).ServerNames = []string{"api.shop.svc"} }),
			`filter_chains[0].filter_chain_match.server_names: not supported (supported: transport_protocol, destination_port, prefix_ranges)`},
		{"source_prefix_ranges", capture(func(l *listener.Listener) {
			match(l, 1).SourcePrefixRanges = []*core.CidrRange{{AddressPrefix: "10.0.0.0", PrefixLen: wrapperspb.UInt32(8)}}
		}), `filter_chains[1].filter_chain_match.source_prefix_ranges: not supported`},
		{"source_ports", capture(func(l *listener.Listener) { match(l, 0).SourcePorts = []uint32{1234} }),
			`filter_chains[0].filter_chain_match.source_ports: not supported`},
		{"direct_source_prefix_ranges", capture(func(l *listener.Listener) {
			match(l, 0).DirectSourcePrefixRanges = []*core.CidrRange{{AddressPrefix: "10.0.0.0", PrefixLen: wrapperspb.UInt32(8)}}
		}), `filter_chains[0].filter_chain_match.direct_source_prefix_ranges: not supported`},
		{"source_type", capture(func(l *listener.Listener) { match(l, 0).SourceType = listener.FilterChainMatch_SAME_IP_OR_LOOPBACK }),
			`filter_chains[0].filter_chain_match.source_type: not supported`},
		{"application_protocols", capture(func(l *listener.Listener) { match(l, 0).ApplicationProtocols = []string{"h2"} }),
			`filter_chains[0].filter_chain_match.application_protocols: not supported`},
		{"address_suffix", capture(func(l *listener.Listener) { match(l, 0).AddressSuffix = "::1" }),
			`filter_chains[0].filter_chain_match.address_suffix: not supported`},
		{"destination_port without original_dst", plain(func(l *listener.Listener) {
			l.FilterChains[0].FilterChainMatch = &listener.FilterChainMatch{DestinationPort: wrapperspb.UInt32(80)}
		}), `listener "l": filter_chains[0].filter_chain_match.destination_port: needs the envoy.filters.listener.original_dst listener filter`},
		{"prefix_ranges without original_dst", plain(func(l *listener.Listener) {
			l.FilterChains[0].FilterChainMatch = &listener.FilterChainMatch{PrefixRanges: []*core.CidrRange{{AddressPrefix: "10.96.0.12", PrefixLen: wrapperspb.UInt32(32)}}}
		}), `filter_chains[0].filter_chain_match.prefix_ranges: needs the envoy.filters.listener.original_dst listener filter`},
		{"default chain beside chains without original_dst", plain(func(l *listener.Listener) {
			l.DefaultFilterChain = l.FilterChains[0]
		}), `listener "l": default_filter_chain: alongside filter_chains only on a listener with the envoy.filters.listener.original_dst listener filter`},
		{"two chains with the same match", capture(func(l *listener.Listener) {
			l.FilterChains = append(l.FilterChains, &listener.FilterChain{Name: "upstream:api2", FilterChainMatch: match(l, 0), Filters: tcpFilters("api2")})
		}), `listener "outbound_listener": filter_chains[2].filter_chain_match: filter_chains[0] has the same matching rules (destination_port 80, prefix 10.96.0.12/32, transport_protocol ""): multiple filter chains with overlapping matching rules`},
		{"one prefix in two chains' lists", capture(func(l *listener.Listener) {
			m := &listener.FilterChainMatch{DestinationPort: wrapperspb.UInt32(80), PrefixRanges: []*core.CidrRange{
				{AddressPrefix: "10.96.0.13", PrefixLen: wrapperspb.UInt32(32)}, {AddressPrefix: "10.96.0.12", PrefixLen: wrapperspb.UInt32(32)}}}
			l.FilterChains = append(l.FilterChains, &listener.FilterChain{Name: "upstream:api2", FilterChainMatch: m, Filters: tcpFilters("api2")})
		}), `filter_chains[2].filter_chain_match: filter_chains[0] has the same matching rules (destination_port 80, prefix 10.96.0.12/32`},
		{"two port-only chains on one port", capture(func(l *listener.Listener) {
			l.FilterChains = append(l.FilterChains, &listener.FilterChain{FilterChainMatch: &listener.FilterChainMatch{DestinationPort: wrapperspb.UInt32(6379)}, Filters: tcpFilters("x")})
		}), `filter_chains[2].filter_chain_match: filter_chains[1] has the same matching rules (destination_port 6379, prefix 0.0.0.0/0`},
		{"transport_protocol without tls_inspector", capture(func(l *listener.Listener) {
			match(l, 1).TransportProtocol = "raw_buffer"
		}), `filter_chains[1].filter_chain_match.transport_protocol: needs the envoy.filters.listener.tls_inspector listener filter`},
		{"raw_buffer chain without a tls one", capture(func(l *listener.Listener) {
			l.ListenerFilters = append(l.ListenerFilters, tlsInspector)
			match(l, 1).TransportProtocol = "raw_buffer"
		}), `filter_chains[1].filter_chain_match.transport_protocol: a raw_buffer chain needs a tls chain for the same destination (destination_port 6379, prefix 0.0.0.0/0)`},
		{"chains with and without transport_protocol for one destination", func() error {
			l := inboundCapture(true)
			l.FilterChains = append(l.FilterChains, &listener.FilterChain{FilterChainMatch: &listener.FilterChainMatch{DestinationPort: wrapperspb.UInt32(8080)}, Filters: tcpFilters("x")})
			_, err := DecodeListener(xds.MustAny(l))
			return err
		}, `filter_chains[2].filter_chain_match.transport_protocol: chains with and without transport_protocol for the same destination (destination_port 8080, prefix 0.0.0.0/0) are not supported`},
		{"prefix not an address", capture(func(l *listener.Listener) { match(l, 0).PrefixRanges[0].AddressPrefix = "api.shop.svc" }),
			`filter_chains[0].filter_chain_match.prefix_ranges[0].address_prefix: "api.shop.svc" is not an IP address`},
		{"IPv4 prefix longer than 32", capture(func(l *listener.Listener) { match(l, 0).PrefixRanges[0].PrefixLen = wrapperspb.UInt32(33) }),
			`filter_chains[0].filter_chain_match.prefix_ranges[0].prefix_len: 33 is longer than an IPv4 address`},
		{"IPv4-mapped prefix", capture(func(l *listener.Listener) { match(l, 0).PrefixRanges[0].AddressPrefix = "::ffff:10.96.0.12" }),
			`filter_chains[0].filter_chain_match.prefix_ranges[0].address_prefix: "::ffff:10.96.0.12" is IPv4-mapped`},
		{"destination_port 0 (proto rule)", capture(func(l *listener.Listener) { match(l, 0).DestinationPort = wrapperspb.UInt32(0) }),
			`invalid FilterChainMatch.DestinationPort`},
		{"duplicate chain name", capture(func(l *listener.Listener) { l.FilterChains[1].Name = "upstream:api" }),
			`filter_chains[1].name: "upstream:api" also names filter_chains[0]`},
		{"default chain named like a chain", capture(func(l *listener.Listener) { l.DefaultFilterChain.Name = "upstream:redis" }),
			`default_filter_chain.name: "upstream:redis" also names filter_chains[1]`},
		{"default chain with a match", capture(func(l *listener.Listener) {
			l.DefaultFilterChain.FilterChainMatch = &listener.FilterChainMatch{DestinationPort: wrapperspb.UInt32(80)}
		}), `default_filter_chain.filter_chain_match: must be empty`},
		{"no chain at all", capture(func(l *listener.Listener) { l.FilterChains, l.DefaultFilterChain = nil, nil }),
			`listener "outbound_listener": filter_chains: a filter chain or a default_filter_chain is required`},
		{"chain filter unsupported (named under the chain)", capture(func(l *listener.Listener) {
			l.DefaultFilterChain.Filters[0] = &listener.Filter{Name: "x", ConfigType: &listener.Filter_TypedConfig{TypedConfig: xds.MustAny(&originaldst.OriginalDst{})}}
		}), `default_filter_chain.filters[0]: unsupported network filter "x"`},
		{"use_original_dst", capture(func(l *listener.Listener) { l.UseOriginalDst = wrapperspb.Bool(true) }),
			`listener "outbound_listener": use_original_dst: hand-off to the listener of the original destination is not supported`},
		{"filter_chain_matcher", capture(func(l *listener.Listener) { l.FilterChainMatcher = &xdsmatcher.Matcher{} }),
			`listener "outbound_listener": filter_chain_matcher: not supported`},
		{"transparent (TPROXY)", capture(func(l *listener.Listener) { l.Transparent = wrapperspb.Bool(true) }),
			`listener "outbound_listener": transparent: not supported (TPROXY)`},
		{"bind_to_port false", capture(func(l *listener.Listener) { l.BindToPort = wrapperspb.Bool(false) }),
			`listener "outbound_listener": bind_to_port: false is not supported`},
		{"ORIGINAL_DST with round robin", passthrough(func(c *cluster.Cluster) { c.LbPolicy = cluster.Cluster_ROUND_ROBIN }),
			`cluster "original-destination": lb_policy: an ORIGINAL_DST cluster needs CLUSTER_PROVIDED (got ROUND_ROBIN)`},
		{"CLUSTER_PROVIDED on a STATIC cluster", func() error {
			c := xdsbuild.NewStaticCluster("c", "127.0.0.1", 80, xdsbuild.ClusterOptions{})
			c.LbPolicy = cluster.Cluster_CLUSTER_PROVIDED
			_, err := DecodeCluster(xds.MustAny(c))
			return err
		}, `cluster "c": lb_policy: CLUSTER_PROVIDED is only for type ORIGINAL_DST (this cluster is STATIC)`},
		{"original_dst_lb_config on EDS", func() error {
			c := xdsbuild.NewEDSCluster("c", xdsbuild.ClusterOptions{})
			c.LbConfig = &cluster.Cluster_OriginalDstLbConfig_{OriginalDstLbConfig: &cluster.Cluster_OriginalDstLbConfig{}}
			_, err := DecodeCluster(xds.MustAny(c))
			return err
		}, `cluster "c": original_dst_lb_config: only for type ORIGINAL_DST`},
		{"use_http_header", passthrough(func(c *cluster.Cluster) {
			c.LbConfig = &cluster.Cluster_OriginalDstLbConfig_{OriginalDstLbConfig: &cluster.Cluster_OriginalDstLbConfig{UseHttpHeader: true}}
		}), `cluster "original-destination": original_dst_lb_config.use_http_header: not supported (supported: upstream_port_override)`},
		{"http_header_name", passthrough(func(c *cluster.Cluster) {
			c.LbConfig = &cluster.Cluster_OriginalDstLbConfig_{OriginalDstLbConfig: &cluster.Cluster_OriginalDstLbConfig{HttpHeaderName: "x-dst"}}
		}), `original_dst_lb_config.http_header_name: not supported`},
		{"metadata_key", passthrough(func(c *cluster.Cluster) {
			c.LbConfig = &cluster.Cluster_OriginalDstLbConfig_{OriginalDstLbConfig: &cluster.Cluster_OriginalDstLbConfig{
				MetadataKey: &metadatav3.MetadataKey{Key: "k", Path: []*metadatav3.MetadataKey_PathSegment{{Segment: &metadatav3.MetadataKey_PathSegment_Key{Key: "a"}}}}}}
		}), `original_dst_lb_config.metadata_key: not supported`},
		{"another lb config", passthrough(func(c *cluster.Cluster) {
			c.LbConfig = &cluster.Cluster_RingHashLbConfig_{RingHashLbConfig: &cluster.Cluster_RingHashLbConfig{}}
		}), `cluster "original-destination": lb_config: only original_dst_lb_config goes with ORIGINAL_DST`},
		{"endpoints on ORIGINAL_DST", passthrough(func(c *cluster.Cluster) {
			c.LoadAssignment = xdsbuild.NewLoadAssignment(c.Name, []xdsbuild.Endpoint{{Host: "10.0.0.1", Port: 80}})
		}), `cluster "original-destination": load_assignment: an ORIGINAL_DST cluster has no endpoints`},
		{"outlier detection on ORIGINAL_DST", passthrough(func(c *cluster.Cluster) { c.OutlierDetection = &cluster.OutlierDetection{} }),
			`cluster "original-destination": outlier_detection: not supported on ORIGINAL_DST`},
		{"endpoint breaker on ORIGINAL_DST", passthrough(func(c *cluster.Cluster) {
			c.Metadata = xdsbuild.NewEDSCluster("x", xdsbuild.ClusterOptions{Extras: &xds.ClusterExtras{EndpointBreaker: &xds.EndpointBreaker{ConsecutiveFailures: 3, OpenInterval: xds.Duration(time.Second)}}}).Metadata
		}), `metadata.filter_metadata["meshlet"].endpointBreaker: not supported on ORIGINAL_DST`},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.decode()
			if err == nil {
				t.Fatalf("accepted; want an error containing %q", tc.want)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error = %q\nwant it to contain %q", err, tc.want)
			}
		})
	}
}
