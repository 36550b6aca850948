package config

import (
	"net/netip"
	"testing"

	"github.com/meshlet/meshlet/controlplane/model"
	"github.com/meshlet/meshlet/controlplane/policy"
	"github.com/meshlet/meshlet/controlplane/translate"
	"github.com/meshlet/meshlet/internal/testca"
	"github.com/meshlet/meshlet/xds"
)

// TestTranslatorServicePortsDecode: the sidecar accepts what the
// translator builds for a Service's other target port — the callee's
// inbound capture chains on that port (strict: mTLS only; permissive: a
// plaintext chain beside it) and the caller's chain to the port's cluster
// dialled in mTLS — and selects them by original destination.
func TestTranslatorServicePortsDecode(t *testing.T) {
	ca, err := testca.New("test.consul")
	if err != nil {
		t.Fatal(err)
	}
	transparent := func(id, svc, ip string) *model.Proxy {
		return &model.Proxy{ID: id, Service: svc, ServiceID: svc + "-1", Node: "n", Address: ip, Port: xds.PodPublicPort,
			LocalAppAddress: "127.0.0.1", LocalAppPort: 8080, Mode: model.ModeTransparent, Healthy: true, Weight: 1}
	}
	virtual := netip.MustParseAddrPort("10.96.0.20:80")
	cat := model.NewCatalog(map[string]*model.Service{
		"api": {Name: "api", Instances: []model.Instance{{ID: "api-1", Node: "n", Address: "10.244.0.6", Port: 8080, Healthy: true, Weight: 1,
			Virtual: virtual, Ports: []model.ServicePort{{Port: 80, TargetPort: 8080}, {Port: 9090, TargetPort: 9090}}}}},
		"web": {Name: "web", Instances: []model.Instance{{ID: "web-1", Node: "n", Address: "10.244.0.5", Port: 8080, Healthy: true, Weight: 1}}},
	}, map[string]*model.Proxy{"api": transparent("api", "api", "10.244.0.6"), "web": transparent("web", "web", "10.244.0.5")})
	cat.CA = &model.CA{TrustDomain: ca.TrustDomain, Roots: []model.Root{{ID: "r", CertPEM: ca.CertPEM, Active: true}}}
	for _, svc := range []string{"web", "api"} {
		l := ca.MustIssue("dc1", svc)
		cat.Leaves[svc] = &model.Leaf{Service: svc, CertPEM: l.CertPEM, KeyPEM: l.KeyPEM, SPIFFEID: l.SPIFFEID}
	}
	cat.Intentions["api"] = &model.Intentions{Destination: "api", Sources: []model.IntentionSource{{Name: "web", Action: "allow", Origin: "consul intention web => api"}}}

	listeners := func(p string, pol *policy.Set) map[string]*Listener {
		t.Helper()
		res, err := translate.Proxy(cat, pol, cat.Proxies[p])
		if err != nil {
			t.Fatal(err)
		}
		out := map[string]*Listener{}
		for _, l := range res.Listeners {
			dl, err := DecodeListener(xds.MustAny(l))
			if err != nil {
				t.Fatalf("%s: listener: %v", p, err)
			}
			out[dl.Name] = dl
		}
		for _, c := range res.Clusters {
			if _, err := DecodeCluster(xds.MustAny(c)); err != nil {
				t.Fatalf("%s: cluster: %v", p, err)
			}
		}
		return out
	}
	out := listeners("web", nil)[xds.OutboundCaptureListener]
	i := out.Capture.Select(netip.MustParseAddrPort("10.96.0.20:9090"))
	if i < 0 || i == out.Capture.Default {
		t.Fatalf("web's outbound capture gives 10.96.0.20:9090 target %d (default %d), want api's port chain", i, out.Capture.Default)
	}
	if c := out.Capture.Targets[i].Listener.Chains[0]; c.TCP == nil || c.TCP.Cluster != xds.ServicePortCluster("api", 9090) {
		t.Errorf("10.96.0.20:9090 goes to chain %s %+v, want a TCP proxy to %s", c.Name, c.TCP, xds.ServicePortCluster("api", 9090))
	}
	for _, mode := range []string{policy.MTLSStrict, policy.MTLSPermissive} {
		pol, err := policy.Parse(map[string][]byte{"mesh.yaml": []byte("apiVersion: meshlet.io/v1alpha1\nkind: MeshDefaults\nmetadata: {name: mesh}\nspec:\n  mtls: {mode: " + mode + "}\n")})
		if err != nil {
			t.Fatal(err)
		}
		in := listeners("api", pol)[xds.InboundCaptureListener]
		i := in.Capture.Select(netip.MustParseAddrPort("10.244.0.6:9090"))
		if i < 0 || i == in.Capture.Default {
			t.Fatalf("%s: api's inbound capture gives port 9090 target %d (default %d), want its mTLS chain", mode, i, in.Capture.Default)
		}
		target := in.Capture.Targets[i].Listener
		secure, plain := target.Chain(true), target.Chain(false)
		if secure == nil || secure.TLS == nil || !secure.TLS.RequireClientCert || secure.RBAC == nil || secure.TCP == nil || secure.TCP.Cluster != xds.LocalAppPortCluster(9090) {
			t.Errorf("%s: port 9090's mTLS chain = %+v", mode, secure)
		}
		if got, want := plain != nil && plain != secure, mode == policy.MTLSPermissive; got != want {
			t.Errorf("%s: port 9090 has a plaintext chain = %v, want %v", mode, got, want)
		}
	}
}
