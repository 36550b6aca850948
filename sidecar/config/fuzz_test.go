package config

import (
	"testing"

	cluster "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	endpoint "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listener "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	route "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/meshlet/meshlet/controlplane/translate"
	"github.com/meshlet/meshlet/internal/fixtures"
	"github.com/meshlet/meshlet/xds"
)

// FuzzDecode: the sidecar's xDS decoders take any well-typed resource —
// bytes that unmarshal as a Listener, Cluster, RouteConfiguration,
// ClusterLoadAssignment or Secret (kind picks which) — and either accept
// it or NACK it with an error naming something; they never panic. Seeds:
// every resource the translator builds for the transparent fixture's
// proxies, and testdata/fuzz/FuzzDecode.
func FuzzDecode(f *testing.F) {
	cat := fixtures.TransparentCatalog()
	for _, p := range cat.Proxies {
		r, err := translate.Proxy(cat, nil, p)
		if err != nil {
			continue
		}
		add := func(kind byte, m proto.Message) {
			if b, err := proto.Marshal(m); err == nil {
				f.Add(kind, b)
			}
		}
		for _, m := range r.Listeners {
			add(0, m)
		}
		for _, m := range r.Clusters {
			add(1, m)
		}
		for _, m := range r.Routes {
			add(2, m)
		}
		for _, m := range r.Endpoints {
			add(3, m)
		}
		for _, m := range r.Secrets {
			add(4, m)
		}
	}
	f.Fuzz(func(t *testing.T, kind byte, b []byte) {
		var m proto.Message
		var decode func(*anypb.Any) error
		switch kind % 5 {
		case 0:
			m, decode = &listener.Listener{}, func(a *anypb.Any) error { _, err := DecodeListener(a); return err }
		case 1:
			m, decode = &cluster.Cluster{}, func(a *anypb.Any) error { _, err := DecodeCluster(a); return err }
		case 2:
			m, decode = &route.RouteConfiguration{}, func(a *anypb.Any) error { _, err := DecodeRouteConfig(a); return err }
		case 3:
			m, decode = &endpoint.ClusterLoadAssignment{}, func(a *anypb.Any) error { _, err := DecodeLoadAssignment(a); return err }
		default:
			m, decode = &tlsv3.Secret{}, func(a *anypb.Any) error { _, err := DecodeSecret(a); return err }
		}
		if proto.Unmarshal(b, m) != nil {
			return
		}
		if err := decode(xds.MustAny(m)); err != nil && err.Error() == "" {
			t.Fatal("a NACK without detail")
		}
	})
}
