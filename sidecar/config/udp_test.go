package config

import (
	"strings"
	"testing"
	"time"

	matcher "github.com/cncf/xds/go/xds/type/matcher/v3"
	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listener "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	udpproxy "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/udp/udp_proxy/v3"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/meshlet/meshlet/controlplane/model"
	"github.com/meshlet/meshlet/controlplane/policy"
	"github.com/meshlet/meshlet/controlplane/translate"
	"github.com/meshlet/meshlet/controlplane/xdsbuild"
	"github.com/meshlet/meshlet/internal/testca"
	"github.com/meshlet/meshlet/xds"
)

// udpListener returns the translator's UDP listener after mut changed its
// UdpProxyConfig and the listener.
func udpListener(mut func(*listener.Listener, *udpproxy.UdpProxyConfig)) *listener.Listener {
	l := xdsbuild.NewUDPListener("upstream:dns", "127.0.0.1", 8053, "dns", xdsbuild.UDPProxyOptions{})
	var m udpproxy.UdpProxyConfig
	_ = l.ListenerFilters[0].GetTypedConfig().UnmarshalTo(&m)
	mut(l, &m)
	if len(l.ListenerFilters) > 0 && l.ListenerFilters[0].GetTypedConfig().MessageIs(&udpproxy.UdpProxyConfig{}) {
		l.ListenerFilters[0].ConfigType = &listener.ListenerFilter_TypedConfig{TypedConfig: xds.MustAny(&m)}
	}
	return l
}

// TestDecodeUDPListener: a UDP listener as the control plane builds it (the
// matcher form) and in the older cluster form decodes to its cluster, idle
// timeout (Envoy's 1 min when unset, 0 none) and datagram limits; every
// field the sidecar does not implement is NACKed by name.
func TestDecodeUDPListener(t *testing.T) {
	tests := []struct {
		name    string
		l       *listener.Listener
		want    UDPProxy
		wantErr string
	}{
		{name: "as translated, defaults", l: xdsbuild.NewUDPListener("upstream:dns", "127.0.0.1", 8053, "dns", xdsbuild.UDPProxyOptions{}),
			want: UDPProxy{StatPrefix: "upstream:dns", Cluster: "dns", IdleTimeout: time.Minute, MaxDownstreamDatagram: MaxDatagramSize, MaxUpstreamDatagram: MaxDatagramSize}},
		{name: "idle timeout from the translator", l: xdsbuild.NewUDPListener("public_listener_udp", "10.0.0.1", 21000, "local_app", xdsbuild.UDPProxyOptions{IdleTimeout: 5 * time.Second}),
			want: UDPProxy{StatPrefix: "public_listener_udp", Cluster: "local_app", IdleTimeout: 5 * time.Second, MaxDownstreamDatagram: MaxDatagramSize, MaxUpstreamDatagram: MaxDatagramSize}},
		{name: "deprecated cluster field, 0s idle, datagram sizes", l: udpListener(func(l *listener.Listener, m *udpproxy.UdpProxyConfig) {
			//lint:ignore SA1019 Envoy still accepts it; the test sends what control planes may send
			m.RouteSpecifier = &udpproxy.UdpProxyConfig_Cluster{Cluster: "other"}
			m.IdleTimeout = durationpb.New(0)
			m.UpstreamSocketConfig = &core.UdpSocketConfig{MaxRxDatagramSize: wrapperspb.UInt64(4096)}
			l.UdpListenerConfig = &listener.UdpListenerConfig{DownstreamSocketConfig: &core.UdpSocketConfig{MaxRxDatagramSize: wrapperspb.UInt64(1500)}}
		}), want: UDPProxy{StatPrefix: "upstream:dns", Cluster: "other", IdleTimeout: 0, MaxDownstreamDatagram: 1500, MaxUpstreamDatagram: 4096}},

		{name: "filter chains", l: udpListener(func(l *listener.Listener, _ *udpproxy.UdpProxyConfig) {
			l.FilterChains = xdsbuild.NewTCPProxyListener("x", "127.0.0.1", 1, "c", xdsbuild.TCPProxyOptions{}).FilterChains
		}), wantErr: `listener "upstream:dns": filter_chains: a UDP listener has no filter chains`},
		{name: "no udp_proxy", l: udpListener(func(l *listener.Listener, _ *udpproxy.UdpProxyConfig) { l.ListenerFilters = nil }),
			wantErr: `listener_filters: a UDP listener needs exactly one listener filter, envoy.filters.udp_listener.udp_proxy (got 0)`},
		{name: "another listener filter", l: udpListener(func(l *listener.Listener, _ *udpproxy.UdpProxyConfig) {
			l.ListenerFilters[0] = &listener.ListenerFilter{Name: "envoy.filters.udp_listener.dns_filter",
				ConfigType: &listener.ListenerFilter_TypedConfig{TypedConfig: xds.MustAny(&core.UdpSocketConfig{})}}
		}), wantErr: `listener_filters[0]: unsupported UDP listener filter "envoy.filters.udp_listener.dns_filter"`},
		{name: "original source IP", l: udpListener(func(_ *listener.Listener, m *udpproxy.UdpProxyConfig) { m.UseOriginalSrcIp = true }),
			wantErr: `listener_filters[0].typed_config.use_original_src_ip: not supported`},
		{name: "per-packet load balancing", l: udpListener(func(_ *listener.Listener, m *udpproxy.UdpProxyConfig) { m.UsePerPacketLoadBalancing = true }),
			wantErr: `listener_filters[0].typed_config.use_per_packet_load_balancing: not supported`},
		{name: "session filters", l: udpListener(func(_ *listener.Listener, m *udpproxy.UdpProxyConfig) {
			m.SessionFilters = []*udpproxy.UdpProxyConfig_SessionFilter{{Name: "f"}}
		}), wantErr: `typed_config.session_filters: not supported`},
		{name: "matcher tree", l: udpListener(func(_ *listener.Listener, m *udpproxy.UdpProxyConfig) {
			mt := m.GetMatcher()
			mt.MatcherType = &matcher.Matcher_MatcherList_{MatcherList: &matcher.Matcher_MatcherList{}}
			m.RouteSpecifier = &udpproxy.UdpProxyConfig_Matcher{Matcher: mt}
		}), wantErr: `listener_filters[0].typed_config: invalid UdpProxyConfig.Matcher: embedded message failed validation | caused by: invalid Matcher.MatcherList`},
		{name: "matcher without on_no_match", l: udpListener(func(_ *listener.Listener, m *udpproxy.UdpProxyConfig) {
			m.RouteSpecifier = &udpproxy.UdpProxyConfig_Matcher{Matcher: &matcher.Matcher{}}
		}), wantErr: `typed_config.matcher.on_no_match: required`},
		{name: "negative idle", l: udpListener(func(_ *listener.Listener, m *udpproxy.UdpProxyConfig) { m.IdleTimeout = durationpb.New(-time.Second) }),
			wantErr: `typed_config.idle_timeout: must be a valid duration of 0 (no idle timeout) or more`},
		{name: "datagram size too large", l: udpListener(func(_ *listener.Listener, m *udpproxy.UdpProxyConfig) {
			m.UpstreamSocketConfig = &core.UdpSocketConfig{MaxRxDatagramSize: wrapperspb.UInt64(70000)}
		}), wantErr: `invalid UdpSocketConfig.MaxRxDatagramSize: value must be inside range (0, 65536)`},
		{name: "GRO", l: udpListener(func(l *listener.Listener, _ *udpproxy.UdpProxyConfig) {
			l.UdpListenerConfig = &listener.UdpListenerConfig{DownstreamSocketConfig: &core.UdpSocketConfig{PreferGro: wrapperspb.Bool(true)}}
		}), wantErr: `udp_listener_config.downstream_socket_config.prefer_gro: not supported`},
		{name: "QUIC", l: udpListener(func(l *listener.Listener, _ *udpproxy.UdpProxyConfig) {
			l.UdpListenerConfig = &listener.UdpListenerConfig{QuicOptions: &listener.QuicProtocolOptions{}}
		}), wantErr: `udp_listener_config.quic_options: not supported`},
		{name: "udp_listener_config on a TCP listener", l: func() *listener.Listener {
			l := xdsbuild.NewTCPProxyListener("t", "127.0.0.1", 1, "c", xdsbuild.TCPProxyOptions{})
			l.UdpListenerConfig = &listener.UdpListenerConfig{}
			return l
		}(), wantErr: `listener "t": udp_listener_config: only for a listener whose address protocol is UDP`},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := DecodeListener(xds.MustAny(tc.l))
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("error = %v, want %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got.UDP == nil || *got.UDP != tc.want || len(got.Chains) != 0 {
				t.Errorf("UDP = %+v (chains %d), want %+v", got.UDP, len(got.Chains), tc.want)
			}
		})
	}
}

// TestTranslatorUDPOutputDecodes: everything the control plane sends the
// caller and the callee of a udp service decodes; the caller's cluster is
// plaintext (no TLS for UDP) and its breaker bounds the sessions.
func TestTranslatorUDPOutputDecodes(t *testing.T) {
	ca, err := testca.New("test.consul")
	if err != nil {
		t.Fatal(err)
	}
	cat := model.NewCatalog(map[string]*model.Service{"dns": {Name: "dns", Protocol: "udp", Instances: []model.Instance{{ID: "dns-1", Address: "127.0.0.1", Port: 53, Weight: 1, Healthy: true}}}},
		map[string]*model.Proxy{
			"c": {ID: "c", Service: "c", Address: "127.0.0.1", Port: 21000, LocalAppAddress: "127.0.0.1", LocalAppPort: 9000,
				Upstreams: []model.Upstream{{Service: "dns", BindAddress: "127.0.0.1", BindPort: 8053}}},
			"d": {ID: "d", Service: "dns", Address: "127.0.0.1", Port: 21053, LocalAppAddress: "127.0.0.1", LocalAppPort: 53, Healthy: true, Weight: 1},
		})
	cat.CA = &model.CA{TrustDomain: ca.TrustDomain, Roots: []model.Root{{ID: "r", CertPEM: ca.CertPEM, Active: true}}}
	for _, svc := range []string{"c", "dns"} {
		l := ca.MustIssue("dc1", svc)
		cat.Leaves[svc] = &model.Leaf{Service: svc, CertPEM: l.CertPEM, KeyPEM: l.KeyPEM, SPIFFEID: l.SPIFFEID}
	}
	pol, err := policy.Parse(map[string][]byte{"p.yaml": []byte("apiVersion: meshlet.io/v1alpha1\nkind: CircuitBreakerPolicy\nmetadata: {name: dns}\nspec: {service: dns, maxConnections: 7}\n")})
	if err != nil {
		t.Fatal(err)
	}
	for id, wantUDP := range map[string]string{"c": "upstream:dns", "d": xds.PublicUDPListener} {
		res, err := translate.Proxy(cat, pol, cat.Proxies[id])
		if err != nil {
			t.Fatal(err)
		}
		var udp []string
		for _, l := range res.Listeners {
			dl, err := DecodeListener(xds.MustAny(l))
			if err != nil {
				t.Fatalf("%s: listener: %v", id, err)
			}
			if dl.UDP != nil {
				udp = append(udp, dl.Name)
			}
		}
		if len(udp) != 1 || udp[0] != wantUDP {
			t.Errorf("%s: UDP listeners %v, want [%s]", id, udp, wantUDP)
		}
		for _, c := range res.Clusters {
			dc, err := DecodeCluster(xds.MustAny(c))
			if err != nil {
				t.Fatalf("%s: cluster: %v", id, err)
			}
			if dc.Name == "dns" && (dc.TLS != nil || dc.Thresholds.MaxConnections != 7) {
				t.Errorf("dns cluster: TLS %+v, max connections %d; want plaintext, 7", dc.TLS, dc.Thresholds.MaxConnections)
			}
		}
	}
}
