package server

import (
	"slices"
	"testing"

	"github.com/meshlet/meshlet/xds"
)

func TestNACKResources(t *testing.T) {
	routes := []string{"api", "sessions", "store"}
	clusters := []string{"api", "local_app", "store"}
	tests := []struct {
		name, typeURL, detail string
		names                 []string
		want                  []string
		named                 bool
	}{
		{
			name: "sidecar route error", typeURL: xds.RouteType, names: routes,
			detail: `resources[0]: route configuration "api": virtual_hosts[0].routes[0]: route.retry_policy: retry_on: unsupported condition "envoy-ratelimited"`,
			want:   []string{"api"}, named: true,
		},
		{
			name: "cluster error mentioning a secret by name", typeURL: xds.ClusterType, names: clusters,
			detail: `resources[2]: cluster "store": transport_socket: secret "default": not found`,
			want:   []string{"store"}, named: true,
		},
		{
			name: "several errors joined", typeURL: xds.ClusterType, names: clusters,
			detail: "cluster \"store\": type: unsupported discovery type STRICT_DNS\ncluster \"api\": lb_policy: unsupported",
			want:   []string{"api", "store"}, named: true,
		},
		{
			name: "same name twice", typeURL: xds.ClusterType, names: clusters,
			detail: `cluster "api": a; cluster "api": b`,
			want:   []string{"api"}, named: true,
		},
		{
			name: "kind of another type is not this type's", typeURL: xds.ClusterType, names: clusters,
			detail: `route configuration "api": route.cluster: "store" is unknown`,
			want:   []string{"api", "store"}, named: true, // no kinded match: quoted names of clusters
		},
		{
			name: "load assignment is not a cluster", typeURL: xds.EndpointType, names: []string{"api", "store"},
			detail: `resources[1]: cluster load assignment "store": endpoints[0].lb_endpoints[0]: port 0`,
			want:   []string{"store"}, named: true,
		},
		{
			name: "upstream listener name with a colon", typeURL: xds.ListenerType, names: []string{"public_listener", "upstream:api"},
			detail: `resources[1]: listener "upstream:api": address: listen tcp 127.0.0.1:9191: bind: address already in use`,
			want:   []string{"upstream:api"}, named: true,
		},
		{
			name: "escaped quotes in the message", typeURL: xds.RouteType, names: routes,
			detail: `route configuration "sessions": match.headers[0]: bad value "a\"b"`,
			want:   []string{"sessions"}, named: true,
		},
		{
			name: "a word ending in the kind is not the kind", typeURL: xds.ClusterType, names: clusters,
			detail: `subcluster "api": something`,
			want:   []string{"api"}, named: true, // still a quoted name of this type (rule 2)
		},
		{
			name: "unknown name falls back to every resource", typeURL: xds.RouteType, names: routes,
			detail: `route configuration "payments": bad`,
			want:   routes, named: false,
		},
		{
			name: "Envoy's unquoted form falls back to every resource", typeURL: xds.ListenerType, names: []string{"public_listener", "upstream:api"},
			detail: "Error adding/updating listener(s) upstream:api: unknown field",
			want:   []string{"public_listener", "upstream:api"}, named: false,
		},
		{
			name: "empty snapshot", typeURL: xds.SecretType, names: nil,
			detail: `secret "default": bad`,
			want:   []string{}, named: false,
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, named := NACKResources(tc.typeURL, tc.detail, tc.names)
			if !slices.Equal(got, tc.want) || named != tc.named {
				t.Errorf("NACKResources = %q, %v; want %q, %v", got, named, tc.want, tc.named)
			}
		})
	}
}
