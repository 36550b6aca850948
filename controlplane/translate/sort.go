package translate

import (
	"slices"
	"strings"

	endpoint "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
)

type named interface{ GetName() string }

func byName[T named](a, b T) int { return strings.Compare(a.GetName(), b.GetName()) }

func sortResources(r *Resources) {
	slices.SortFunc(r.Listeners, byName)
	slices.SortFunc(r.Routes, byName)
	slices.SortFunc(r.Clusters, byName)
	slices.SortFunc(r.Secrets, byName)
	slices.SortFunc(r.Endpoints, func(a, b *endpoint.ClusterLoadAssignment) int {
		return strings.Compare(a.GetClusterName(), b.GetClusterName())
	})
}
