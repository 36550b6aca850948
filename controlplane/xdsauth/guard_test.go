package xdsauth_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"go.uber.org/goleak"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/meshlet/meshlet/controlplane/inject"
	"github.com/meshlet/meshlet/controlplane/model"
	"github.com/meshlet/meshlet/controlplane/server"
	"github.com/meshlet/meshlet/controlplane/servingcert"
	"github.com/meshlet/meshlet/controlplane/xdsauth"
	"github.com/meshlet/meshlet/xds"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// Nodes of the test catalog.
const (
	webNode = "web-abc-web-sidecar-proxy" // pod shop/web-abc, service web
	apiNode = "api-xyz-api-sidecar-proxy" // pod shop/api-xyz, service api
	vmNode  = "api-vm-1-sidecar-proxy"    // service api outside Kubernetes
)

func testCatalog(webPodUID string) *model.Catalog {
	proxy := func(id, svc string, port int, pod model.PodRef) *model.Proxy {
		return &model.Proxy{ID: id, Service: svc, Address: "127.0.0.1", Port: port, LocalAppAddress: "127.0.0.1", LocalAppPort: port + 1000,
			Healthy: true, Pod: pod}
	}
	cat := model.NewCatalog(map[string]*model.Service{}, map[string]*model.Proxy{
		webNode: proxy(webNode, "web", 21000, model.PodRef{Namespace: "shop", Name: "web-abc", UID: webPodUID}),
		apiNode: proxy(apiNode, "api", 21001, model.PodRef{Namespace: "shop", Name: "api-xyz", UID: "uid-api"}),
		vmNode:  proxy(vmNode, "api", 21002, model.PodRef{}),
	})
	cat.CA = &model.CA{TrustDomain: "td.consul", Roots: []model.Root{{ID: "r", CertPEM: "ROOT", Active: true}}}
	for _, s := range []string{"web", "api"} {
		cat.Leaves[s] = &model.Leaf{Service: s, CertPEM: "CERT-" + s, KeyPEM: "KEY-" + s, SPIFFEID: "spiffe://td.consul/ns/default/dc/dc1/svc/" + s}
	}
	return cat
}

// fakeAuthority vouches for the identities it was given, refuses other
// tokens, and is unavailable for the token "down".
type fakeAuthority map[string]*xdsauth.Identity

func (f fakeAuthority) Authenticate(_ context.Context, token string) (*xdsauth.Identity, error) {
	if token == "down" {
		return nil, fmt.Errorf("%w: the authority is down", xdsauth.ErrUnavailable)
	}
	if id, ok := f[token]; ok {
		return id, nil
	}
	return nil, fmt.Errorf("%w: unknown token", xdsauth.ErrInvalidToken)
}

// fakeWriter says which services each Consul accessor may write.
type fakeWriter map[string][]string

func (f fakeWriter) MayActAs(_ context.Context, id *xdsauth.Identity, service string) (bool, error) {
	for _, s := range f[id.AccessorID] {
		if s == service {
			return true, nil
		}
	}
	return false, nil
}

var identities = fakeAuthority{
	"tok-web":       {Kind: xdsauth.KindKubernetes, Namespace: "shop", ServiceAccount: "web", PodName: "web-abc", PodUID: "uid-web"},
	"tok-web-nopod": {Kind: xdsauth.KindKubernetes, Namespace: "shop", ServiceAccount: "web"},
	"tok-web-new":   {Kind: xdsauth.KindKubernetes, Namespace: "shop", ServiceAccount: "web", PodName: "web-abc", PodUID: "uid-new"},
	"tok-web-old":   {Kind: xdsauth.KindKubernetes, Namespace: "shop", ServiceAccount: "web", PodName: "web-abc", PodUID: "uid-old"},
	"tok-web-other": {Kind: xdsauth.KindKubernetes, Namespace: "other", ServiceAccount: "web", PodName: "web-abc", PodUID: "uid-web"},
	"tok-legacy":    {Kind: xdsauth.KindKubernetes, Namespace: "shop", ServiceAccount: "legacy", PodName: "web-abc", PodUID: "uid-web"},
	"tok-consul":    {Kind: xdsauth.KindConsul, AccessorID: "acc-api"},
}

// rig is a control plane server behind a Guard, over TLS.
type rig struct {
	guard  *xdsauth.Guard
	srv    *server.Server
	addr   string
	caFile string
}

func newRig(t *testing.T, mayActAs func(ns, sa, svc string) bool) *rig {
	t.Helper()
	r := newRigWithoutCatalog(t, mayActAs)
	r.setCatalog(testCatalog("uid-web"))
	return r
}

// newRigWithoutCatalog is a rig whose control plane has not read Consul
// yet.
func newRigWithoutCatalog(t *testing.T, mayActAs func(ns, sa, svc string) bool, opts ...func(*xdsauth.GuardConfig)) *rig {
	t.Helper()
	dir, err := servingcert.OpenDir(servingcert.DirConfig{Dir: t.TempDir(), Names: servingcert.LocalNames("127.0.0.1:0"),
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	gc := xdsauth.GuardConfig{Authenticator: identities, Consul: fakeWriter{"acc-api": {"api"}}, ServiceAccountMayActAs: mayActAs, Logger: log}
	for _, o := range opts {
		o(&gc)
	}
	g := xdsauth.NewGuard(gc)
	serverOpts := append([]grpc.ServerOption{grpc.Creds(credentials.NewTLS(&tls.Config{GetCertificate: dir.GetCertificate}))}, g.ServerOptions()...)
	srv := server.New(server.Config{Logger: log, GRPCOptions: serverOpts, StreamIdentity: xdsauth.StreamIdentity, AuthDenials: g.Denials})
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan struct{})
	go func() {
		defer close(served)
		_ = srv.Serve(lis)
	}()
	t.Cleanup(func() {
		srv.Close()
		<-served
	})
	return &rig{guard: g, srv: srv, addr: lis.Addr().String(), caFile: dir.CAFile()}
}

func (r *rig) setCatalog(cat *model.Catalog) {
	r.guard.SetCatalog(cat)
	r.srv.SetCatalog(cat)
}

// stream is one ADS stream asking for secrets.
type stream struct {
	t      *testing.T
	conn   *grpc.ClientConn
	ads    discovery.AggregatedDiscoveryService_StreamAggregatedResourcesClient
	cancel context.CancelFunc
}

func (r *rig) dial(t *testing.T, token string) *stream {
	t.Helper()
	pem, err := os.ReadFile(r.caFile)
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(pem)
	conn, err := grpc.NewClient(r.addr, grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{RootCAs: roots})))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	if token != "" {
		ctx = metadata.AppendToOutgoingContext(ctx, xds.AuthorizationMetadataKey, xds.BearerPrefix+token)
	}
	ads, err := discovery.NewAggregatedDiscoveryServiceClient(conn).StreamAggregatedResources(ctx)
	if err != nil {
		cancel()
		conn.Close()
		t.Fatal(err)
	}
	s := &stream{t: t, conn: conn, ads: ads, cancel: cancel}
	t.Cleanup(func() {
		cancel()
		conn.Close()
	})
	return s
}

// ask requests the secrets of node (a gRPC client's user agent when
// proxyless), acknowledging version/nonce.
func (s *stream) ask(node string, proxyless bool, version, nonce string) error {
	n := &core.Node{Id: node, UserAgentName: xds.UserAgentName}
	typeURL := xds.SecretType
	if proxyless {
		n.UserAgentName, typeURL = "gRPC Go", xds.ClusterType
	}
	return s.ads.Send(&discovery.DiscoveryRequest{Node: n, TypeUrl: typeURL, VersionInfo: version, ResponseNonce: nonce})
}

// leafOf returns the certificate of the "default" secret of resp.
func leafOf(t *testing.T, resp *discovery.DiscoveryResponse) string {
	t.Helper()
	for _, a := range resp.GetResources() {
		var sec tlsv3.Secret
		if err := a.UnmarshalTo(&sec); err != nil {
			t.Fatal(err)
		}
		if sec.GetName() == xds.SecretCert {
			return sec.GetTlsCertificate().GetCertificateChain().GetInlineString()
		}
	}
	return ""
}

// TestGuard opens a stream per case and checks what comes back: the
// node's own leaf, or the refusal with its code and reason, and that the
// refusal is counted in the Guard's denials.
func TestGuard(t *testing.T) {
	for _, tc := range []struct {
		name      string
		token     string
		node      string
		proxyless bool
		mayActAs  func(ns, sa, svc string) bool
		wantLeaf  string // the served leaf, "" when refused
		wantCode  codes.Code
		want      xds.AuthDenial
	}{
		{name: "no credential", node: webNode, wantCode: codes.Unauthenticated, want: xds.DenyNoCredential},
		{name: "token refused by its authority", token: "forged", node: webNode, wantCode: codes.Unauthenticated, want: xds.DenyInvalidToken},
		{name: "authority unavailable", token: "down", node: webNode, wantCode: codes.Unavailable, want: xds.DenyUnavailable},
		{name: "own pod's node", token: "tok-web", node: webNode, wantLeaf: "CERT-web"},
		{name: "another pod's node", token: "tok-web", node: apiNode, wantCode: codes.PermissionDenied, want: xds.DenyWrongNode},
		{name: "a VM's node", token: "tok-web", node: vmNode, wantCode: codes.PermissionDenied, want: xds.DenyWrongNode},
		{name: "unregistered node", token: "tok-web", node: "nobody-sidecar-proxy", wantCode: codes.PermissionDenied, want: xds.DenyUnregisteredNode},
		{name: "token bound to no pod", token: "tok-web-nopod", node: webNode, wantCode: codes.PermissionDenied, want: xds.DenyWrongNode},
		{name: "token of an earlier pod of the same name", token: "tok-web-old", node: webNode, wantCode: codes.PermissionDenied, want: xds.DenyWrongNode},
		{name: "same pod name in another namespace", token: "tok-web-other", node: webNode, wantCode: codes.PermissionDenied, want: xds.DenyWrongNode},
		{name: "ServiceAccount not the service", token: "tok-legacy", node: webNode, wantCode: codes.PermissionDenied, want: xds.DenyWrongNode},
		{name: "ServiceAccount bound to the service", token: "tok-legacy", node: webNode, wantLeaf: "CERT-web",
			mayActAs: func(ns, sa, svc string) bool { return sa == svc || ns == "shop" && sa == "legacy" && svc == "web" }},
		{name: "Consul token with service:write", token: "tok-consul", node: vmNode, wantLeaf: "CERT-api"},
		{name: "Consul token without service:write", token: "tok-consul", node: webNode, wantCode: codes.PermissionDenied, want: xds.DenyWrongNode},
		{name: "proxyless client, any identity", token: "tok-web", node: "my-grpc-client", proxyless: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := newRig(t, tc.mayActAs)
			s := r.dial(t, tc.token)
			if err := s.ask(tc.node, tc.proxyless, "", ""); err != nil && !errors.Is(err, io.EOF) {
				t.Fatal(err)
			}
			resp, err := s.ads.Recv()
			if tc.wantCode != codes.OK {
				if status.Code(err) != tc.wantCode || !strings.Contains(status.Convert(err).Message(), "("+string(tc.want)+")") {
					t.Fatalf("got %v (response %v), want %s (%s)", err, resp, tc.wantCode, tc.want)
				}
				if resp != nil {
					t.Fatalf("a refused stream got a response: %v", resp)
				}
				d := r.guard.Denials()
				if len(d) != 1 || d[0].Reason != tc.want || d[0].Count != 1 || d[0].Peer != "127.0.0.1" {
					t.Fatalf("denials %+v, want one %s", d, tc.want)
				}
				if st := r.srv.Status(); len(st.Denials) != 1 {
					t.Fatalf("status shows denials %+v", st.Denials)
				}
				return
			}
			if err != nil {
				t.Fatalf("refused: %v", err)
			}
			if got := leafOf(t, resp); got != tc.wantLeaf {
				t.Fatalf("leaf %q, want %q", got, tc.wantLeaf)
			}
			if d := r.guard.Denials(); len(d) != 0 {
				t.Fatalf("denials %+v", d)
			}
		})
	}
}

// TestStreamMayNotChangeItsNode: a stream admitted for its own node that
// names another node in a later request is refused, and gets nothing of
// the other node.
func TestStreamMayNotChangeItsNode(t *testing.T) {
	r := newRig(t, nil)
	s := r.dial(t, "tok-web")
	if err := s.ask(webNode, false, "", ""); err != nil {
		t.Fatal(err)
	}
	resp, err := s.ads.Recv()
	if err != nil || leafOf(t, resp) != "CERT-web" {
		t.Fatalf("own node: %v %v", resp, err)
	}
	if err := s.ask(apiNode, false, resp.GetVersionInfo(), resp.GetNonce()); err != nil {
		t.Fatal(err)
	}
	resp, err = s.ads.Recv()
	if status.Code(err) != codes.PermissionDenied || !strings.Contains(err.Error(), string(xds.DenyNodeChanged)) {
		t.Fatalf("got %v %v, want PermissionDenied %s", resp, err, xds.DenyNodeChanged)
	}
}

// TestRevokedWhenTheNodeChangesHands: once the catalog says the node is
// another pod's (a StatefulSet pod recreated with a new UID), the open
// stream of the old pod gets nothing more: the push built for the new
// owner is refused.
func TestRevokedWhenTheNodeChangesHands(t *testing.T) {
	r := newRig(t, nil)
	s := r.dial(t, "tok-web")
	if err := s.ask(webNode, false, "", ""); err != nil {
		t.Fatal(err)
	}
	resp, err := s.ads.Recv()
	if err != nil || leafOf(t, resp) != "CERT-web" {
		t.Fatalf("own node: %v %v", resp, err)
	}
	if err := s.ask(webNode, false, resp.GetVersionInfo(), resp.GetNonce()); err != nil {
		t.Fatal(err)
	}
	cat := testCatalog("uid-new")
	cat.Leaves["web"] = &model.Leaf{Service: "web", CertPEM: "CERT-web-2", KeyPEM: "KEY-web-2", SPIFFEID: "spiffe://td.consul/ns/default/dc/dc1/svc/web"}
	r.setCatalog(cat)
	resp, err = s.ads.Recv()
	if status.Code(err) != codes.PermissionDenied || !strings.Contains(err.Error(), string(xds.DenyRevoked)) {
		t.Fatalf("got %v %v, want PermissionDenied %s", resp, err, xds.DenyRevoked)
	}
	// The new pod's sidecar is served the new leaf.
	fresh := r.dial(t, "tok-web-new")
	if err := fresh.ask(webNode, false, "", ""); err != nil {
		t.Fatal(err)
	}
	if resp, err := fresh.ads.Recv(); err != nil || leafOf(t, resp) != "CERT-web-2" {
		t.Fatalf("the new pod: %v %v", resp, err)
	}
}

// TestConcurrentStreamsOneLookup: a reconnect storm of one token costs its
// authority one lookup; the rest come from the cache.
func TestConcurrentStreamsOneLookup(t *testing.T) {
	var mu sync.Mutex
	results := map[string]int{}
	c := xdsauth.Cached(identities, xdsauth.CacheOptions{Observe: func(r string) {
		mu.Lock()
		results[r]++
		mu.Unlock()
	}})
	var wg sync.WaitGroup
	for range 50 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, err := c.Authenticate(context.Background(), "tok-web"); err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	if _, err := c.Authenticate(context.Background(), "tok-web"); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	defer mu.Unlock()
	if results[xdsauth.LookupOK] != 1 || results[xdsauth.LookupCached] < 1 {
		t.Fatalf("lookups %v, want exactly one asked of the authority", results)
	}
}

// TestFirstRequestWaitsForTheCatalog: a sidecar connecting while the
// control plane has not read Consul yet is not refused: its request waits
// for the first catalog, then is authorized and served.
func TestFirstRequestWaitsForTheCatalog(t *testing.T) {
	r := newRigWithoutCatalog(t, nil)
	s := r.dial(t, "tok-web")
	if err := s.ask(webNode, false, "", ""); err != nil {
		t.Fatal(err)
	}
	got := make(chan error, 1)
	go func() {
		resp, err := s.ads.Recv()
		if err == nil && leafOf(t, resp) != "CERT-web" {
			err = fmt.Errorf("served %v", resp)
		}
		got <- err
	}()
	select {
	case err := <-got:
		t.Fatalf("answered before the control plane had a catalog: %v", err)
	case <-time.After(50 * time.Millisecond): // nothing may come meanwhile: there is no catalog to authorize against
	}
	r.setCatalog(testCatalog("uid-web"))
	if err := <-got; err != nil {
		t.Fatal(err)
	}
}

// TestGuardNamespacedNames: with Kubernetes Services named
// <service>.<namespace> in Consul, a ServiceAccount acts as its own
// namespace's service of its name, not another namespace's.
func TestGuardNamespacedNames(t *testing.T) {
	r := newRigWithoutCatalog(t, nil, func(c *xdsauth.GuardConfig) { c.KubernetesService = inject.NamespacedNames.Kubernetes })
	pod := model.PodRef{Namespace: "shop", Name: "web-abc", UID: "uid-web"}
	cat := model.NewCatalog(map[string]*model.Service{}, map[string]*model.Proxy{
		"own":   {ID: "own", Service: "web.shop", Address: "127.0.0.1", Port: 21000, LocalAppAddress: "127.0.0.1", LocalAppPort: 9000, Healthy: true, Pod: pod},
		"other": {ID: "other", Service: "web.prod", Address: "127.0.0.1", Port: 21001, LocalAppAddress: "127.0.0.1", LocalAppPort: 9001, Healthy: true, Pod: pod},
	})
	cat.CA = &model.CA{TrustDomain: "td.consul", Roots: []model.Root{{ID: "r", CertPEM: "ROOT", Active: true}}}
	for _, svc := range []string{"web.shop", "web.prod"} {
		cat.Leaves[svc] = &model.Leaf{Service: svc, CertPEM: "CERT-" + svc, KeyPEM: "KEY", SPIFFEID: "spiffe://td.consul/ns/default/dc/dc1/svc/" + svc}
	}
	r.setCatalog(cat)
	s := r.dial(t, "tok-web")
	if err := s.ask("own", false, "", ""); err != nil {
		t.Fatal(err)
	}
	if resp, err := s.ads.Recv(); err != nil || leafOf(t, resp) != "CERT-web.shop" {
		t.Fatalf("web.shop for shop's web: %v %v", resp, err)
	}
	s = r.dial(t, "tok-web")
	_ = s.ask("other", false, "", "")
	if _, err := s.ads.Recv(); status.Code(err) != codes.PermissionDenied || !strings.Contains(err.Error(), "a service of another namespace") {
		t.Fatalf("web.prod for shop's web: %v, want PermissionDenied (another namespace)", err)
	}
}
