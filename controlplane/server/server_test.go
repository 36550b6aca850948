package server

import (
	"fmt"
	"io"
	"log/slog"
	"strings"
	"testing"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	"go.uber.org/goleak"
	"google.golang.org/protobuf/types/known/structpb"

	"github.com/meshlet/meshlet/controlplane/model"
	"github.com/meshlet/meshlet/internal/testlog"
	"github.com/meshlet/meshlet/internal/testutil"
	"github.com/meshlet/meshlet/xds"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func catalog(apiHealthy bool) *model.Catalog {
	cat := model.NewCatalog(
		map[string]*model.Service{"api": {Name: "api", Instances: []model.Instance{{ID: "api-1", Address: "127.0.0.1", Port: 9001, Healthy: apiHealthy}}}},
		map[string]*model.Proxy{
			"web-1-sidecar-proxy": {ID: "web-1-sidecar-proxy", Service: "web", Address: "127.0.0.1", Port: 21000, LocalAppAddress: "127.0.0.1", LocalAppPort: 9000,
				Upstreams: []model.Upstream{{Service: "api", BindAddress: "127.0.0.1", BindPort: 9191}}, Healthy: true},
			"api-1-sidecar-proxy": {ID: "api-1-sidecar-proxy", Service: "api", ServiceID: "api-1", Address: "127.0.0.1", Port: 21001,
				LocalAppAddress: "127.0.0.1", LocalAppPort: 9001, Healthy: apiHealthy},
		})
	cat.CA = &model.CA{TrustDomain: "td.consul", Roots: []model.Root{{ID: "r", CertPEM: "ROOT", Active: true}}}
	for _, s := range []string{"web", "api"} {
		cat.Leaves[s] = &model.Leaf{Service: s, CertPEM: "CERT-" + s, KeyPEM: "KEY-" + s, SPIFFEID: "spiffe://td.consul/ns/default/dc/dc1/svc/" + s}
	}
	return cat
}

func versions(t *testing.T, s *Server, node string) map[string]string {
	t.Helper()
	snap, err := s.Cache().GetSnapshot(node)
	if err != nil {
		return nil
	}
	out := map[string]string{}
	for _, typ := range []string{xds.ListenerType, xds.RouteType, xds.ClusterType, xds.EndpointType} {
		out[typ] = snap.GetVersion(typ)
	}
	return out
}

func waitVersions(t *testing.T, s *Server, node string, cond func(map[string]string) bool) map[string]string {
	t.Helper()
	return testutil.Poll(t, 5*time.Second, "the versions of "+node+"'s snapshot", func() (map[string]string, error) {
		v := versions(t, s, node)
		if v != nil && cond(v) {
			return v, nil
		}
		return nil, fmt.Errorf("versions %v do not satisfy the condition", v)
	})
}

func TestOnlyChangedTypesGetNewVersions(t *testing.T) {
	s := New(Config{Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	defer s.Close()
	s.SetCatalog(catalog(true))
	const web = "web-1-sidecar-proxy"
	v1 := waitVersions(t, s, web, func(map[string]string) bool { return true })

	// api-1 fails: only web's endpoints change.
	s.SetCatalog(catalog(false))
	v2 := waitVersions(t, s, web, func(v map[string]string) bool { return v[xds.EndpointType] != v1[xds.EndpointType] })
	for _, typ := range []string{xds.ListenerType, xds.RouteType, xds.ClusterType} {
		if v2[typ] != v1[typ] {
			t.Errorf("%s version changed (%s → %s) though its resources did not", typ, v1[typ], v2[typ])
		}
	}
	// Back to healthy: the content, hence the version, is the first one again.
	s.SetCatalog(catalog(true))
	waitVersions(t, s, web, func(v map[string]string) bool { return v[xds.EndpointType] == v1[xds.EndpointType] })
}

func TestSnapshotHeldBackUntilTheLeafArrives(t *testing.T) {
	var logs testlog.Buffer
	s := New(Config{Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	defer s.Close()
	cat := catalog(true)
	delete(cat.Leaves, "web")
	s.SetCatalog(cat)
	waitVersions(t, s, "api-1-sidecar-proxy", func(map[string]string) bool { return true })
	if v := versions(t, s, "web-1-sidecar-proxy"); v != nil {
		t.Fatalf("web got a snapshot without its leaf certificate: %v", v)
	}
	if !strings.Contains(logs.String(), `waiting for the leaf certificate of service \"web\"`) {
		t.Errorf("no held-back log line:\n%s", logs.String())
	}
	s.SetCatalog(catalog(true))
	waitVersions(t, s, "web-1-sidecar-proxy", func(map[string]string) bool { return true })
}

func TestNodeHash(t *testing.T) {
	meta, _ := structpb.NewStruct(map[string]any{"GENERATOR": "grpc"})
	tests := []struct {
		name string
		node *core.Node
		want string
	}{
		{"sidecar", &core.Node{Id: "web-1-sidecar-proxy", UserAgentName: xds.UserAgentName}, "web-1-sidecar-proxy"},
		{"envoy", &core.Node{Id: "web-1-sidecar-proxy", UserAgentName: "envoy"}, "web-1-sidecar-proxy"},
		{"grpc-go", &core.Node{Id: "c1", UserAgentName: "gRPC Go"}, ProxylessGroup},
		{"grpc-java", &core.Node{Id: "c2", UserAgentName: "gRPC Java"}, ProxylessGroup},
		{"Istio generator metadata", &core.Node{Id: "c3", Metadata: meta}, ProxylessGroup},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := (nodeHash{}).ID(tc.node); got != tc.want {
				t.Errorf("ID = %q, want %q", got, tc.want)
			}
		})
	}
}
