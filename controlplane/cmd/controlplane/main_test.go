package main

import (
	"bytes"
	"strings"
	"testing"
)

func TestValidate(t *testing.T) {
	tests := []struct {
		name, dir string
		code      int
		out, err  string
	}{
		{"valid directory", "../../policy/testdata/valid", 0, "OK (4 file(s): 3 ServiceDefaults, 2 RetryPolicy, 2 TimeoutPolicy, 1 CircuitBreakerPolicy, 1 OutlierDetectionPolicy, 1 LoadBalancerPolicy, 1 AuthorizationPolicy, 1 MeshDefaults)", ""},
		{"invalid files", "../../policy/testdata/invalid", 1, "", "testdata/invalid/bad-protocol.yaml:7: spec.protocol: unsupported protocol \"htp\""},
		{"not a directory", "main.go", 1, "", "main.go: not a directory"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var out, errb bytes.Buffer
			code := run([]string{"validate", tc.dir}, &out, &errb)
			if code != tc.code || !strings.Contains(out.String(), tc.out) || !strings.Contains(errb.String(), tc.err) {
				t.Errorf("exit %d, stdout %q, stderr %q; want exit %d, stdout with %q, stderr with %q",
					code, out.String(), errb.String(), tc.code, tc.out, tc.err)
			}
		})
	}
	var out, errb bytes.Buffer
	if code := run([]string{"validate"}, &out, &errb); code != 2 || !strings.Contains(errb.String(), "usage") {
		t.Errorf("no directory: exit %d, stderr %q; want 2 with usage", code, errb.String())
	}
}
