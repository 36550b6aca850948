package policy

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// FuzzParse: a policy file of any content is parsed without panicking,
// and an error names the file (the errors point at file, line and field).
// Seeds: the example and translator test policies, and
// testdata/fuzz/FuzzParse.
func FuzzParse(f *testing.F) {
	for _, dir := range []string{"../translate/testdata/policies", "../../examples/kubernetes/policies"} {
		files, _ := filepath.Glob(filepath.Join(dir, "*.yaml"))
		for _, p := range files {
			if b, err := os.ReadFile(p); err == nil {
				f.Add(b)
			}
		}
	}
	f.Add([]byte("apiVersion: meshlet.io/v1alpha1\nkind: MeshDefaults\nmetadata: {name: mesh}\nspec: {mtls: {mode: strict}}\n"))
	f.Add([]byte("apiVersion: meshlet.io/v1alpha1\nkind: ServiceDefaults\nmetadata: {name: a}\nspec: {service: a, protocol: http}\n---\nkind: x\n"))
	f.Add([]byte("{{{"))
	f.Fuzz(func(t *testing.T, b []byte) {
		_, err := Parse(map[string][]byte{"fuzz.yaml": b})
		if err != nil && !strings.Contains(err.Error(), "fuzz.yaml") {
			t.Fatalf("the error does not name the file: %v", err)
		}
	})
}
