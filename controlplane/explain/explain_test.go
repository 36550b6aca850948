package explain

import (
	"bytes"
	"errors"
	"net/netip"
	"testing"

	"github.com/meshlet/meshlet/controlplane/model"
	"github.com/meshlet/meshlet/controlplane/policy"
	"github.com/meshlet/meshlet/internal/fixtures"
	"github.com/meshlet/meshlet/internal/golden"
)

// TestWhyGolden: the decisions for connections of web's transparent proxy
// (fixtures.TransparentCatalog): allowed (api, redis by a wildcard), denied
// (admin), an excluded port and CIDR, the Kubernetes API server, loopback,
// pass-through and registry-only refusal, an explicit upstream of a proxy
// in direct mode; instances of headless services: db's ready one (mTLS to
// it), its not-ready one and ledger's, which web may not reach (no chain);
// media's second Service port by its virtual address and, dialled directly,
// by its pod's address.
func TestWhyGolden(t *testing.T) {
	registryOnly, err := policy.Parse(map[string][]byte{"mesh.yaml": []byte("apiVersion: meshlet.io/v1alpha1\nkind: MeshDefaults\nmetadata: {name: mesh}\nspec: {outbound: registry-only}\n")})
	if err != nil {
		t.Fatal(err)
	}
	kube := netip.MustParseAddrPort("10.96.0.1:443")
	for _, tc := range []struct {
		name, proxy, dst string
		pol              *policy.Set
		direct           bool
		outcome          string
	}{
		{"allowed-http", "web-1", "10.96.0.20:80", nil, false, OutcomeMesh},
		{"allowed-tcp-wildcard", "web-1-web-sidecar-proxy", "10.96.0.30:6379", nil, false, OutcomeMesh},
		{"denied", "web-1", "10.96.0.40:80", nil, false, OutcomeDenied},
		{"excluded-port", "web-1", "10.1.2.3:5432", nil, false, OutcomeBypass},
		{"excluded-cidr", "web-1", "169.254.169.254:80", nil, false, OutcomeBypass},
		{"kube-api", "web-1", "10.96.0.1:443", nil, false, OutcomeBypass},
		{"loopback", "web-1", "127.0.0.1:8080", nil, false, OutcomeBypass},
		{"passthrough", "web-1", "10.1.2.3:443", nil, false, OutcomePassthrough},
		{"registry-only", "web-1", "10.1.2.3:443", registryOnly, false, OutcomeRefused},
		{"direct-explicit-upstream-denied", "web-1", "127.0.0.1:9192", nil, true, OutcomeDenied},
		{"direct-other", "web-1", "10.96.0.20:80", nil, true, OutcomeBypass},
		{"headless", "web-1", "10.244.0.13:7000", nil, false, OutcomeMesh},
		{"headless-not-ready", "web-1", "10.244.0.14:7000", nil, false, OutcomePassthrough},
		{"headless-denied", "web-1", "10.244.0.15:8080", nil, false, OutcomePassthrough},
		{"headless-denied-registry-only", "web-1", "10.244.0.15:8080", registryOnly, false, OutcomeRefused},
		{"service-other-port", "web-1", "10.96.0.60:9090", nil, false, OutcomeMesh},
		{"dialed-directly-other-port", "web-1", "10.244.0.16:9090", nil, false, OutcomeMesh},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cat := fixtures.TransparentCatalog()
			web := cat.Proxies["web-1-web-sidecar-proxy"]
			web.Exclusions = model.Exclusions{OutboundPorts: []int{5432}, OutboundCIDRs: []netip.Prefix{netip.MustParsePrefix("169.254.169.254/32")}, UIDs: []int{1000}}
			if tc.direct {
				web.Mode = model.ModeDirect
			}
			p, err := Find(cat, tc.proxy)
			if err != nil {
				t.Fatal(err)
			}
			r, err := Why(cat, tc.pol, p, netip.MustParseAddrPort(tc.dst), Options{KubeAPIServer: kube})
			if err != nil {
				t.Fatal(err)
			}
			if r.Outcome != tc.outcome {
				t.Errorf("outcome %s, want %s", r.Outcome, tc.outcome)
			}
			var b bytes.Buffer
			if err := r.WriteText(&b); err != nil {
				t.Fatal(err)
			}
			golden.Check(t, "why-"+tc.name+".txt", b.Bytes())
		})
	}
}

func TestFind(t *testing.T) {
	cat := fixtures.TransparentCatalog()
	if _, err := Find(cat, "nope"); !errors.Is(err, ErrUnknownProxy) {
		t.Errorf("unknown: %v", err)
	}
	if p, err := Find(cat, "api-2"); err != nil || p.ID != "api-2-api-sidecar-proxy" {
		t.Errorf("by pod: %v %v", p, err)
	}
}
