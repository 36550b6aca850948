package config

import (
	"strings"
	"testing"
	"time"

	listener "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	tcpproxy "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/tcp_proxy/v3"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/meshlet/meshlet/controlplane/xdsbuild"
	"github.com/meshlet/meshlet/xds"
)

// TestDecodeTCPProxy: TcpProxy.idle_timeout is Envoy's (1 h when unset, 0s
// disables it, negative is refused) on outbound and inbound listeners as
// the control plane builds them, and any TcpProxy field the sidecar does
// not implement is NACKed by name rather than ignored.
func TestDecodeTCPProxy(t *testing.T) {
	withProxy := func(mut func(*tcpproxy.TcpProxy)) *listener.Listener {
		l := xdsbuild.NewTCPProxyListener("upstream:store", "127.0.0.1", 9192, "store", xdsbuild.TCPProxyOptions{})
		var m tcpproxy.TcpProxy
		_ = l.FilterChains[0].Filters[0].GetTypedConfig().UnmarshalTo(&m)
		mut(&m)
		l.FilterChains[0].Filters[0].ConfigType = &listener.Filter_TypedConfig{TypedConfig: xds.MustAny(&m)}
		return l
	}
	tests := []struct {
		name     string
		l        *listener.Listener
		wantIdle time.Duration
		wantErr  string
	}{
		{name: "unset: Envoy's 1 h", l: xdsbuild.NewTCPProxyListener("upstream:store", "127.0.0.1", 9192, "store", xdsbuild.TCPProxyOptions{}), wantIdle: time.Hour},
		{name: "from the translator's options", l: xdsbuild.NewTCPProxyListener("upstream:store", "127.0.0.1", 9192, "store",
			xdsbuild.TCPProxyOptions{MaxConnectAttempts: 3, IdleTimeout: 90 * time.Second}), wantIdle: 90 * time.Second},
		{name: "inbound", l: xdsbuild.NewInboundListener(xds.PublicListener, "127.0.0.1", 20000, xdsbuild.InboundOptions{
			TLS: xdsbuild.DownstreamTLS("", nil), Permissive: true, TCP: xdsbuild.TCPProxyOptions{IdleTimeout: time.Minute}}), wantIdle: time.Minute},
		{name: "0s disables it", l: withProxy(func(m *tcpproxy.TcpProxy) { m.IdleTimeout = durationpb.New(0) }), wantIdle: 0},
		{name: "negative", l: withProxy(func(m *tcpproxy.TcpProxy) { m.IdleTimeout = durationpb.New(-time.Second) }),
			wantErr: `listener "upstream:store": filter_chains[0].filters[0].typed_config.idle_timeout: must be a valid duration of 0 (no idle timeout) or more`},
		{name: "unsupported field named", l: withProxy(func(m *tcpproxy.TcpProxy) {
			m.MaxDownstreamConnectionDuration = durationpb.New(time.Minute)
		}), wantErr: `filter_chains[0].filters[0].typed_config.max_downstream_connection_duration: not supported`},
		{name: "lowest unsupported field first", l: withProxy(func(m *tcpproxy.TcpProxy) {
			m.MaxDownstreamConnectionDuration = durationpb.New(time.Minute) // field 13
			m.DownstreamIdleTimeout = durationpb.New(time.Minute)           // field 3
			m.MaxConnectAttempts = wrapperspb.UInt32(2)                     // supported
		}), wantErr: `typed_config.downstream_idle_timeout: not supported`},
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
			for _, c := range got.Chains {
				if c.TCP == nil || c.TCP.IdleTimeout != tc.wantIdle {
					t.Errorf("chain %q: TCP %+v, want idle timeout %v", c.TransportProtocol, c.TCP, tc.wantIdle)
				}
			}
		})
	}
}
