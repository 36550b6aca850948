package config

import (
	"strings"
	"testing"
	"time"

	listener "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	hcm "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/meshlet/meshlet/controlplane/xdsbuild"
	"github.com/meshlet/meshlet/xds"
)

// TestDecodeDelayedCloseTimeout: HttpConnectionManager.delayed_close_timeout
// is Envoy's (1 s when unset, 0s disables the delayed close, negative is
// refused with the field named), on outbound and inbound listeners as the
// control plane builds them.
func TestDecodeDelayedCloseTimeout(t *testing.T) {
	withHCM := func(mut func(*hcm.HttpConnectionManager)) *listener.Listener {
		l := xdsbuild.NewHTTPListener("upstream:api", "127.0.0.1", 9191, xdsbuild.HTTPListenerOptions{RouteConfigName: "api"})
		var m hcm.HttpConnectionManager
		_ = l.FilterChains[0].Filters[0].GetTypedConfig().UnmarshalTo(&m)
		mut(&m)
		l.FilterChains[0].Filters[0].ConfigType = &listener.Filter_TypedConfig{TypedConfig: xds.MustAny(&m)}
		return l
	}
	tests := []struct {
		name    string
		l       *listener.Listener
		want    time.Duration
		wantErr string
	}{
		{name: "unset: Envoy's 1 s", l: withHCM(func(*hcm.HttpConnectionManager) {}), want: time.Second},
		{name: "inbound, unset", l: xdsbuild.NewInboundListener(xds.PublicListener, "127.0.0.1", 20000, xdsbuild.InboundOptions{
			HTTP: true, TLS: xdsbuild.DownstreamTLS("", nil), Permissive: true}), want: time.Second},
		{name: "set", l: withHCM(func(m *hcm.HttpConnectionManager) { m.DelayedCloseTimeout = durationpb.New(250 * time.Millisecond) }),
			want: 250 * time.Millisecond},
		{name: "0s disables it", l: withHCM(func(m *hcm.HttpConnectionManager) { m.DelayedCloseTimeout = durationpb.New(0) }), want: 0},
		{name: "negative", l: withHCM(func(m *hcm.HttpConnectionManager) { m.DelayedCloseTimeout = durationpb.New(-time.Second) }),
			wantErr: `listener "upstream:api": filter_chains[0].filters[0].typed_config.delayed_close_timeout: must be a valid duration of 0 (no delayed close) or more`},
		{name: "out of range", l: withHCM(func(m *hcm.HttpConnectionManager) {
			m.DelayedCloseTimeout = &durationpb.Duration{Seconds: 1, Nanos: -1}
		}), wantErr: `typed_config.delayed_close_timeout: must be a valid duration`},
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
				if c.HTTP == nil || c.HTTP.DelayedCloseTimeout != tc.want {
					t.Errorf("chain %q: HTTP %+v, want delayed close timeout %v", c.TransportProtocol, c.HTTP, tc.want)
				}
			}
		})
	}
}
