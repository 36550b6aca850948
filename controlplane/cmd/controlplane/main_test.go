package main

import (
	"bytes"
	"net"
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

func TestStatusUnreachable(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	var out, errb bytes.Buffer
	if code := run([]string{"status", "-admin-addr", addr}, &out, &errb); code != 2 || !strings.Contains(errb.String(), "unreachable at "+addr) {
		t.Errorf("status with nothing at %s: exit %d, stderr %q; want 2 naming the address", addr, code, errb.String())
	}
}
