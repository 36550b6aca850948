package config

import (
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/meshlet/meshlet/controlplane/xdsbuild"
	"github.com/meshlet/meshlet/xds"
)

// TestDecodeListenerFiltersTimeout: tls_inspector's wait for the first byte
// comes from listener_filters_timeout (Envoy's 15 s when unset) and the
// fallback to the plaintext chain from continue_on_listener_filters_timeout,
// both as the control plane sets them for a permissive listener.
func TestDecodeListenerFiltersTimeout(t *testing.T) {
	tlsSocket := xdsbuild.DownstreamTLS("", nil)
	tests := []struct {
		name         string
		permissive   bool
		timeout      *durationpb.Duration // replaces the translator's when set
		wantTimeout  time.Duration
		wantContinue bool
		wantErr      string
	}{
		{name: "permissive, as translated", permissive: true, wantTimeout: xdsbuild.PermissiveDetectTimeout, wantContinue: true},
		{name: "strict: no inspector, Envoy's default", wantTimeout: DefaultListenerFiltersTimeout},
		{name: "zero: no limit", permissive: true, timeout: durationpb.New(0), wantTimeout: 0, wantContinue: true},
		{name: "negative", permissive: true, timeout: durationpb.New(-time.Second), wantErr: `listener "public_listener": listener_filters_timeout: must be a valid duration of 0 or more`},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			l := xdsbuild.NewInboundListener(xds.PublicListener, "127.0.0.1", 20000, xdsbuild.InboundOptions{TLS: tlsSocket, Permissive: tc.permissive})
			if tc.timeout != nil {
				l.ListenerFiltersTimeout = tc.timeout
			}
			got, err := DecodeListener(xds.MustAny(l))
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("error = %v, want %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got.TLSInspector != tc.permissive || got.FiltersTimeout != tc.wantTimeout || got.ContinueOnFiltersTimeout != tc.wantContinue {
				t.Errorf("TLSInspector %v, FiltersTimeout %v, ContinueOnFiltersTimeout %v; want %v, %v, %v",
					got.TLSInspector, got.FiltersTimeout, got.ContinueOnFiltersTimeout, tc.permissive, tc.wantTimeout, tc.wantContinue)
			}
		})
	}
}
