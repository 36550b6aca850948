package main

import (
	"reflect"
	"testing"
)

func TestAuthLookups(t *testing.T) {
	before := map[string]float64{
		`meshlet_controlplane_xds_auth_lookups_total{authority="consul",result="ok"}`:     1000,
		`meshlet_controlplane_xds_auth_lookups_total{authority="consul",result="cached"}`: 5,
	}
	tests := []struct {
		name   string
		before map[string]float64
		after  map[string]float64
		want   lookupCount
	}{
		{
			name: "from the start",
			after: map[string]float64{
				`meshlet_controlplane_xds_auth_lookups_total{authority="consul",result="ok"}`:          998,
				`meshlet_controlplane_xds_auth_lookups_total{authority="consul",result="unavailable"}`: 2,
				`meshlet_controlplane_xds_auth_denied_total{reason="unavailable"}`:                     2,
				`go_goroutines`: 40,
			},
			want: lookupCount{Consul: 1000, ByResult: map[string]int{"ok": 998, "unavailable": 2}},
		},
		{
			name:   "a storm answered from the cache",
			before: before,
			after: map[string]float64{
				`meshlet_controlplane_xds_auth_lookups_total{authority="consul",result="ok"}`:     1000,
				`meshlet_controlplane_xds_auth_lookups_total{authority="consul",result="cached"}`: 1005,
			},
			want: lookupCount{Cached: 1000, ByResult: map[string]int{"cached": 1000}},
		},
		{
			name:   "a storm asking Consul again, two authorities",
			before: before,
			after: map[string]float64{
				`meshlet_controlplane_xds_auth_lookups_total{authority="consul",result="ok"}`:         1700,
				`meshlet_controlplane_xds_auth_lookups_total{authority="consul",result="invalid"}`:    3,
				`meshlet_controlplane_xds_auth_lookups_total{authority="consul",result="cached"}`:     305,
				`meshlet_controlplane_xds_auth_lookups_total{authority="kubernetes",result="ok"}`:     1,
				`meshlet_controlplane_xds_auth_lookups_total{authority="kubernetes",result="cached"}`: 0,
			},
			want: lookupCount{Consul: 704, Cached: 300, ByResult: map[string]int{"ok": 701, "invalid": 3, "cached": 300}},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := authLookups(tt.before, tt.after); !reflect.DeepEqual(got, tt.want) {
				t.Errorf("authLookups = %+v, want %+v", got, tt.want)
			}
		})
	}
}

func TestAuthDenied(t *testing.T) {
	before := map[string]float64{`meshlet_controlplane_xds_auth_denied_total{reason="invalid_token"}`: 1}
	after := map[string]float64{
		`meshlet_controlplane_xds_auth_denied_total{reason="invalid_token"}`: 1,
		`meshlet_controlplane_xds_auth_denied_total{reason="unavailable"}`:   4,
		`meshlet_controlplane_xds_auth_denied_total{reason="wrong_node"}`:    0,
	}
	if got, want := authDenied(before, after), map[string]int{"unavailable": 4}; !reflect.DeepEqual(got, want) {
		t.Errorf("authDenied = %v, want %v", got, want)
	}
}
