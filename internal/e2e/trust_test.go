package e2e

import (
	"context"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/meshlet/meshlet/controlplane"
	"github.com/meshlet/meshlet/controlplane/servingcert"
	"github.com/meshlet/meshlet/internal/testutil"
	"github.com/meshlet/meshlet/sidecar/xdsclient"
	"github.com/meshlet/meshlet/xds"
)

// probe asks the mesh's control plane, as node, for its secrets with
// creds (xdsclient.Probe, what `sidecar xds-check` runs).
func (m *mesh) probe(node string, creds xdsclient.Credentials) (*xdsclient.ProbeResult, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	return xdsclient.Probe(ctx, m.xdsAddr, creds, &core.Node{Id: node})
}

// TestADSTrust: against a control plane on a real Consul with ACLs on
// (default deny), a process with no credential, with an unknown token, or
// with another service's token gets no configuration and no key of api's
// sidecar; api's own token gets api's certificate and key. A token
// deleted in Consul stops working once its cached review expires. A
// client given another CA refuses the control plane, and one dialling in
// plaintext is not served. Every refusal is counted by reason.
func TestADSTrust(t *testing.T) {
	m := newMesh(t)
	ports := freePorts(t, 4)
	web, api := startApp(t, "web-1"), startApp(t, "api-1")
	m.register(svc{id: "web-1", name: "web", appPort: web.port, sidecarPort: ports[0], upstreams: map[string]int{"api": ports[2]}})
	m.register(svc{id: "api-1", name: "api", appPort: api.port, sidecarPort: ports[1]})
	m.cpConfig = func(c *controlplane.Config) { c.AuthCache.TTL = time.Second }
	admin := m.runControlPlane(controlplane.Config{XDSAddress: "127.0.0.1:0", AdminAddress: "127.0.0.1:0"}, "")
	const apiNode = "api-1-sidecar-proxy"

	// api's own sidecar: served its certificate and key (once Consul's
	// catalog has it: poll).
	var own *xdsclient.ProbeResult
	testutil.Until(t, 15*time.Second, "api's sidecar served", func() bool {
		var err error
		own, err = m.probe(apiNode, m.credentials(apiNode))
		return err == nil
	})
	if !own.PrivateKey || !strings.HasSuffix(own.SPIFFEID, "/svc/api") {
		t.Fatalf("api's own token: %+v, want api's certificate and key", own)
	}

	unknown := filepath.Join(t.TempDir(), "unknown")
	if err := os.WriteFile(unknown, []byte("6a0f6d3e-5a3e-4a57-9a43-8d2b0c0e1f00"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name  string
		creds xdsclient.Credentials
		code  codes.Code
		want  xds.AuthDenial
	}{
		{name: "no credential", creds: xdsclient.Credentials{CAFile: m.caFile}, code: codes.Unauthenticated, want: xds.DenyNoCredential},
		{name: "a token Consul does not know", creds: xdsclient.Credentials{CAFile: m.caFile, TokenFile: unknown},
			code: codes.Unauthenticated, want: xds.DenyInvalidToken},
		{name: "web's token", creds: m.credentials("web-1-sidecar-proxy"), code: codes.PermissionDenied, want: xds.DenyWrongNode},
	} {
		t.Run(tc.name, func(t *testing.T) {
			res, err := m.probe(apiNode, tc.creds)
			if status.Code(err) != tc.code || !strings.Contains(err.Error(), "("+string(tc.want)+")") || res != nil {
				t.Fatalf("got %+v, %v; want %s (%s) and nothing served", res, err, tc.code, tc.want)
			}
		})
	}

	t.Run("another CA", func(t *testing.T) {
		other, err := servingcert.OpenDir(servingcert.DirConfig{Dir: t.TempDir(), Names: servingcert.LocalNames("127.0.0.1:0")})
		if err != nil {
			t.Fatal(err)
		}
		creds := m.credentials(apiNode)
		creds.CAFile = other.CAFile()
		if res, err := m.probe(apiNode, creds); err == nil || !strings.Contains(err.Error(), "does not verify") {
			t.Fatalf("got %+v, %v; want the control plane's certificate refused", res, err)
		}
	})
	t.Run("plaintext", func(t *testing.T) {
		if res, err := m.probe(apiNode, xdsclient.Credentials{Insecure: true}); err == nil {
			t.Fatalf("a plaintext client was served %+v", res)
		}
	})
	t.Run("token deleted in Consul", func(t *testing.T) {
		creds := m.credentials(apiNode)
		tok, err := os.ReadFile(creds.TokenFile)
		if err != nil {
			t.Fatal(err)
		}
		acl := m.consul.Client.ACL()
		list, _, err := acl.TokenList(nil)
		if err != nil {
			t.Fatal(err)
		}
		for _, e := range list {
			if e.SecretID == string(tok) {
				if _, err := acl.TokenDelete(e.AccessorID, nil); err != nil {
					t.Fatal(err)
				}
			}
		}
		testutil.Until(t, 15*time.Second, "the deleted token refused once its review expires (AuthCache.TTL 1s)", func() bool {
			_, err := m.probe(apiNode, creds)
			return status.Code(err) == codes.Unauthenticated && strings.Contains(err.Error(), string(xds.DenyInvalidToken))
		})
	})

	resp, err := http.Get("http://" + admin + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	metrics := string(b)
	for _, r := range []xds.AuthDenial{xds.DenyNoCredential, xds.DenyInvalidToken, xds.DenyWrongNode} {
		if !strings.Contains(metrics, `meshlet_controlplane_xds_auth_denied_total{reason="`+string(r)+`"}`) ||
			strings.Contains(metrics, `meshlet_controlplane_xds_auth_denied_total{reason="`+string(r)+`"} 0`) {
			t.Errorf("%s not counted:\n%s", r, metrics)
		}
	}
	if n := len(m.cpLog.Lines("xds: stream refused")); n == 0 {
		t.Error("no refusal logged")
	}
}

// TestInsecureADSIsAnOptIn: with -xds-insecure on both sides the mesh
// works in plaintext without tokens, and both say so at start.
func TestInsecureADSIsAnOptIn(t *testing.T) {
	m := newMesh(t)
	ports := freePorts(t, 3)
	web, api := startApp(t, "web-1"), startApp(t, "api-1")
	m.register(svc{id: "web-1", name: "web", appPort: web.port, sidecarPort: ports[0], upstreams: map[string]int{"api": ports[2]}})
	m.register(svc{id: "api-1", name: "api", appPort: api.port, sidecarPort: ports[1]})
	m.allow("web", "api")
	m.cpConfig = func(c *controlplane.Config) { c.XDSInsecure = true }
	m.startControlPlane("", "")
	m.insecure = true
	w, a := m.startSidecar("web-1-sidecar-proxy", ""), m.startSidecar("api-1-sidecar-proxy", "")
	w.waitReady(t)
	a.waitReady(t)
	testutil.Until(t, 15*time.Second, "web → api answered", func() bool { return call("http://"+hostPort(ports[2])+"/").err == nil })
	if len(m.cpLog.Lines("WITHOUT authentication")) == 0 {
		t.Error("the control plane did not warn that ADS is unauthenticated")
	}
	if len(w.log.Lines("-xds-insecure")) == 0 {
		t.Error("the sidecar did not warn that it dials ADS in plaintext")
	}
}
