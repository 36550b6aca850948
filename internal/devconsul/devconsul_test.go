package devconsul

import (
	"context"
	"crypto/tls"
	"errors"
	"net"
	"net/http"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/meshlet/meshlet/internal/testlog"
)

func TestStartRegisterStop(t *testing.T) {
	a := StartForTest(t)
	reg := &api.AgentServiceRegistration{Name: "probe", ID: "probe-1", Port: 1234, Address: "127.0.0.1"}
	if err := a.Client.Agent().ServiceRegister(reg); err != nil {
		t.Fatal(err)
	}
	entries, _, err := a.Client.Health().Service("probe", "", false, nil)
	if err != nil {
		t.Fatal(err)
	}
	if len(entries) != 1 || entries[0].Service.ID != "probe-1" {
		t.Fatalf("entries = %+v, want probe-1", entries)
	}
	pid := a.Pid()
	if err := a.Stop(); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Kill(pid, 0); err == nil {
		t.Fatalf("consul pid %d still running after Stop", pid)
	}
}

// sidecarRegistration is a service with a Connect sidecar and a TTL check,
// what tests and the demo register.
func sidecarRegistration(name string) *api.AgentServiceRegistration {
	return &api.AgentServiceRegistration{Name: name, ID: name + "-1", Port: 1234, Address: "127.0.0.1",
		Check:   &api.AgentServiceCheck{CheckID: name + "-ttl", TTL: "30s", Status: api.HealthPassing},
		Connect: &api.AgentServiceConnect{SidecarService: &api.AgentServiceRegistration{Port: 21234}}}
}

func isForbidden(err error) bool {
	var se api.StatusError
	return errors.As(err, &se) && se.Code == http.StatusForbidden
}

// TestACLsDefaultDeny: the agent runs with ACLs on and default deny: no
// token may do nothing, the management token everything, a service's token
// what its sidecars need; the agent's own anti-entropy is not blocked.
func TestACLsDefaultDeny(t *testing.T) {
	logs := &testlog.Buffer{}
	a := StartForTestWith(t, Options{Log: logs})
	if !a.ACLEnabled() || a.ManagementToken == "" || a.Client == nil {
		t.Fatalf("ACLEnabled() = %v, management token %q", a.ACLEnabled(), a.ManagementToken)
	}
	ctx := context.Background()

	anon, err := a.NewClient("")
	if err != nil {
		t.Fatal(err)
	}
	if err := anon.Agent().ServiceRegister(sidecarRegistration("api")); !isForbidden(err) {
		t.Errorf("anonymous register: %v, want 403", err)
	}
	if err := a.Client.Agent().ServiceRegister(sidecarRegistration("api")); err != nil {
		t.Fatalf("management register: %v", err)
	}
	if services, _, err := anon.Catalog().Services(nil); err != nil || len(services) != 0 {
		t.Errorf("anonymous catalog: %v, %v; want nothing", services, err)
	}
	// A service registered through the catalog (the agent holds no leaf
	// of it: Consul 1.19's agent serves a leaf it holds for a local
	// sidecar to any token, see controlplane/consul.ControlPlaneACLRules).
	if _, err := a.Client.Catalog().Register(&api.CatalogRegistration{Node: "n1", Address: "10.0.0.1",
		Service: &api.AgentService{ID: "store-1", Service: "store", Port: 9000}}, nil); err != nil {
		t.Fatal(err)
	}

	// A service's token: its own service and sidecar, nothing else.
	tok, err := a.ServiceToken(ctx, "web")
	if err != nil || tok == "" {
		t.Fatalf("ServiceToken: %q, %v", tok, err)
	}
	if again, _ := a.ServiceToken(ctx, "web"); again != tok {
		t.Errorf("ServiceToken not cached: %s then %s", tok, again)
	}
	web, err := a.NewClient(tok)
	if err != nil {
		t.Fatal(err)
	}
	if err := web.Agent().ServiceRegister(sidecarRegistration("web")); err != nil {
		t.Errorf("web's token registering web and its sidecar: %v", err)
	}
	if _, _, err := web.Agent().ConnectCALeaf("web", nil); err != nil {
		t.Errorf("web's token asking web's leaf: %v", err)
	}
	if _, _, err := web.Agent().ConnectCALeaf("store", nil); !isForbidden(err) {
		t.Errorf("web's token asking store's leaf: %v, want 403", err)
	}
	if err := web.Agent().ServiceRegister(sidecarRegistration("other")); !isForbidden(err) {
		t.Errorf("web's token registering another service: %v, want 403", err)
	}

	// The control plane's token is cached per kind.
	cp, err := a.ControlPlaneToken(ctx, false)
	if err != nil || cp == "" {
		t.Fatalf("ControlPlaneToken: %q, %v", cp, err)
	}
	kube, err := a.ControlPlaneToken(ctx, true)
	if err != nil || kube == "" || kube == cp {
		t.Fatalf("ControlPlaneToken(kube): %q, %v (plain: %q)", kube, err, cp)
	}
	if again, _ := a.ControlPlaneToken(ctx, false); again != cp {
		t.Errorf("ControlPlaneToken not cached")
	}
	secret := NewUUID()
	if err := a.CreateControlPlaneToken(ctx, false, secret); err != nil {
		t.Fatal(err)
	}
	if tok, _, err := a.Client.ACL().TokenReadSelf(&api.QueryOptions{Token: secret}); err != nil || tok.Policies[0].Name != ControlPlanePolicy {
		t.Errorf("token of the chosen secret: %+v, %v", tok, err)
	}

	// The agent's own node and its registrations sync: anti-entropy has
	// the agent token.
	time.Sleep(time.Second)
	nodes, _, err := a.Client.Catalog().Nodes(nil)
	if err != nil || len(nodes) != 2 {
		t.Errorf("nodes = %v, %v; want the agent's own and n1", nodes, err)
	}
	for _, bad := range []string{"blocked by ACLs"} { // anti-entropy: node, service, check, coordinate updates
		if strings.Contains(logs.String(), bad) {
			t.Errorf("agent log has %q:\n%s", bad, logs.String())
		}
	}
}

func TestDisableACL(t *testing.T) {
	a := StartForTestWith(t, Options{DisableACL: true})
	if a.ACLEnabled() || a.ManagementToken != "" {
		t.Fatalf("ACLEnabled() = %v, token %q; want none", a.ACLEnabled(), a.ManagementToken)
	}
	anon, err := a.NewClient("")
	if err != nil {
		t.Fatal(err)
	}
	if err := anon.Agent().ServiceRegister(sidecarRegistration("api")); err != nil {
		t.Errorf("anonymous register without ACLs: %v", err)
	}
	if tok, err := a.ServiceToken(context.Background(), "api"); tok != "" || err != nil {
		t.Errorf("ServiceToken without ACLs = %q, %v; want \"\", nil", tok, err)
	}
	if tok, err := a.ControlPlaneToken(context.Background(), false); tok != "" || err != nil {
		t.Errorf("ControlPlaneToken without ACLs = %q, %v; want \"\", nil", tok, err)
	}
}

// TestTLS: with Options.TLS the API is served over HTTPS only, with a
// certificate CAFile verifies for 127.0.0.1 and localhost.
func TestTLS(t *testing.T) {
	a := StartForTestWith(t, Options{TLS: true})
	if a.Scheme() != "https" || !strings.HasPrefix(a.URL(), "https://127.0.0.1:") || a.CAFile == "" {
		t.Fatalf("Scheme %s, URL %s, CAFile %q", a.Scheme(), a.URL(), a.CAFile)
	}
	if err := a.Client.Agent().ServiceRegister(sidecarRegistration("api")); err != nil {
		t.Fatalf("register over HTTPS: %v", err)
	}
	if _, _, err := a.Client.Agent().ConnectCALeaf("api", nil); err != nil {
		t.Fatalf("leaf over HTTPS: %v", err)
	}
	_, port, _ := net.SplitHostPort(a.HTTPAddr)
	cc := a.Config(a.ManagementToken)
	cc.Address = "localhost:" + port
	byName, err := api.NewClient(cc)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := byName.Status().Leader(); err != nil {
		t.Errorf("https://localhost:%s: %v", port, err)
	}

	// Plain HTTP on that port is refused; an unverified peer fails.
	resp, err := http.Get("http://" + a.HTTPAddr + "/v1/status/leader")
	if err == nil {
		if resp.StatusCode == http.StatusOK {
			t.Errorf("plain HTTP answered %s", resp.Status)
		}
		resp.Body.Close()
	}
	if _, err := tls.Dial("tcp", a.HTTPAddr, &tls.Config{ServerName: "127.0.0.1"}); err == nil {
		t.Error("the agent's certificate verified against the system roots")
	}
	if b, err := os.ReadFile(a.CAFile); err != nil || !strings.Contains(string(b), "BEGIN CERTIFICATE") {
		t.Errorf("CAFile: %v", err)
	}
}
