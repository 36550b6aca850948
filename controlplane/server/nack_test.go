package server

import (
	"slices"
	"testing"

	"google.golang.org/genproto/googleapis/rpc/status"

	"github.com/meshlet/meshlet/xds"
)

// TestNACKResources: NACKs without meshlet's details (proxyless gRPC
// clients, Envoy, older sidecars) are read from their prose.
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
			got, named := NACKResources(tc.typeURL, &status.Status{Code: 3, Message: tc.detail}, tc.names)
			if !slices.Equal(got, tc.want) || named != tc.named {
				t.Errorf("NACKResources = %q, %v; want %q, %v", got, named, tc.want, tc.named)
			}
		})
	}
}

// TestNACKResourcesFromDetails: a NACK with meshlet's details is read from
// them alone; its message is not parsed.
func TestNACKResourcesFromDetails(t *testing.T) {
	clusters := []string{"api", "local_app", "store"}
	// misleading quotes a cluster the details do not blame.
	const misleading = `cluster "local_app": bad`
	tests := []struct {
		name    string
		typeURL string
		msg     string
		details []xds.NACKDetail
		want    []string
		named   bool
	}{
		{
			name: "one resource", typeURL: xds.ClusterType, msg: misleading,
			details: []xds.NACKDetail{{TypeURL: xds.ClusterType, Name: "store", Field: "type"}},
			want:    []string{"store"}, named: true,
		},
		{
			name: "several, in the order of names", typeURL: xds.ClusterType, msg: misleading,
			details: []xds.NACKDetail{{TypeURL: xds.ClusterType, Name: "store"}, {TypeURL: xds.ClusterType, Name: "api"}, {TypeURL: xds.ClusterType, Name: "api"}},
			want:    []string{"api", "store"}, named: true,
		},
		{
			name: "details of another type are not this type's", typeURL: xds.ClusterType, msg: misleading,
			details: []xds.NACKDetail{{TypeURL: xds.RouteType, Name: "api"}, {TypeURL: xds.ClusterType, Name: "store"}},
			want:    []string{"store"}, named: true,
		},
		{
			name: "a name not in the snapshot blames every resource, not the prose", typeURL: xds.ClusterType, msg: misleading,
			details: []xds.NACKDetail{{TypeURL: xds.ClusterType, Name: "payments"}},
			want:    clusters, named: false,
		},
		{
			name: "a resource without a name blames every resource", typeURL: xds.ClusterType, msg: misleading,
			details: []xds.NACKDetail{{TypeURL: xds.ClusterType}},
			want:    clusters, named: false,
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, named := NACKResources(tc.typeURL, xds.NewNACKStatus(tc.msg, tc.details...), clusters)
			if !slices.Equal(got, tc.want) || named != tc.named {
				t.Errorf("NACKResources = %q, %v; want %q, %v", got, named, tc.want, tc.named)
			}
		})
	}
}
