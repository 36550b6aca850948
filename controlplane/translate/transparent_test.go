package translate

import (
	"testing"

	"github.com/meshlet/meshlet/controlplane/policy"
	"github.com/meshlet/meshlet/internal/fixtures"
	"github.com/meshlet/meshlet/internal/golden"
)

// TestTransparentGolden: a transparent proxy's capture listeners, chains
// and clusters, built from its scope (as the server builds it), with the
// pass-through default (allow-any) and with registry-only.
func TestTransparentGolden(t *testing.T) {
	for _, tc := range []struct {
		name string
		pol  string
	}{
		{"transparent-web-sidecar", ""},
		{"transparent-web-sidecar-registry-only", "apiVersion: meshlet.io/v1alpha1\nkind: MeshDefaults\nmetadata: {name: mesh}\nspec: {outbound: registry-only}\n"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var pol *policy.Set
			if tc.pol != "" {
				var err error
				if pol, err = policy.Parse(map[string][]byte{"mesh.yaml": []byte(tc.pol)}); err != nil {
					t.Fatal(err)
				}
			}
			cat := fixtures.TransparentCatalog()
			p := cat.Proxies["web-1-web-sidecar-proxy"]
			if p == nil || !p.Transparent() {
				t.Fatalf("web's proxy %+v is not transparent", p)
			}
			r, err := Proxy(cat.Scope(p), pol, p)
			if err != nil {
				t.Fatal(err)
			}
			full, err := Proxy(cat, pol, p)
			if err != nil {
				t.Fatal(err)
			}
			if got, want := render(t, r), render(t, full); string(got) != string(want) {
				t.Error("built from its scope, the proxy's resources differ from those built from the whole catalog")
			}
			golden.Check(t, tc.name+".golden.json", render(t, r))
		})
	}
}

func TestReachable(t *testing.T) {
	cat := fixtures.TransparentCatalog()
	deny := "apiVersion: meshlet.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: redis}\nspec:\n  service: redis\n  sources: [{name: web, action: deny}]\n"
	pol, err := policy.Parse(map[string][]byte{"authz.yaml": []byte(deny)})
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		pol       *policy.Set
		src, dest string
		want      bool
	}{
		{nil, "web", "api", true},    // intention web => api
		{nil, "web", "redis", true},  // intention * => redis
		{nil, "web", "admin", false}, // only ops
		{nil, "web", "store", false}, // no intention: default deny
		{pol, "web", "redis", false}, // a policy file denies web by name, before *
		{pol, "api", "redis", true},
	} {
		if got := Reachable(cat, tc.pol, tc.src, tc.dest); got != tc.want {
			t.Errorf("Reachable(%s → %s) = %v, want %v", tc.src, tc.dest, got, tc.want)
		}
	}
}
