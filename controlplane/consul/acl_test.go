package consul_test

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/meshlet/meshlet/controlplane/consul"
	"github.com/meshlet/meshlet/controlplane/model"
	"github.com/meshlet/meshlet/internal/devconsul"
)

// registerThroughCatalog registers web → api as the Kubernetes registrar
// does, through the catalog on node n1: an instance and a sidecar proxy
// each, with passing checks, and the intention web → api. The agent then
// holds no leaf certificate of them (it does for sidecars registered with
// it, and Consul 1.19's agent serves those to any token, which would hide
// a missing service:write).
func registerThroughCatalog(t *testing.T, c *api.Client) {
	t.Helper()
	for _, s := range []struct {
		name string
		port int
		up   string
	}{{"api", 9001, ""}, {"web", 9000, "api"}} {
		id := s.name + "-1"
		px := &api.AgentService{Kind: api.ServiceKindConnectProxy, ID: id + "-sidecar-proxy", Service: s.name + "-sidecar-proxy", Port: s.port + 12000,
			Proxy: &api.AgentServiceConnectProxyConfig{DestinationServiceName: s.name, DestinationServiceID: id, LocalServicePort: s.port}}
		if s.up != "" {
			px.Proxy.Upstreams = []api.Upstream{{DestinationName: s.up, LocalBindPort: 9191}}
		}
		for _, svc := range []*api.AgentService{{ID: id, Service: s.name, Port: s.port}, px} {
			if _, err := c.Catalog().Register(&api.CatalogRegistration{Node: "n1", Address: "127.0.0.1", Service: svc,
				Check: &api.AgentCheck{Node: "n1", CheckID: svc.ID + "-check", Name: "ok", Status: api.HealthPassing, ServiceID: svc.ID}}, nil); err != nil {
				t.Fatal(err)
			}
		}
	}
	if _, _, err := c.ConfigEntries().Set(&api.ServiceIntentionsConfigEntry{Kind: api.ServiceIntentions, Name: "api",
		Sources: []*api.SourceIntention{{Name: "web", Action: api.IntentionActionAllow}}}, nil); err != nil {
		t.Fatal(err)
	}
}

// tokenWithRules creates a token whose only policy has rules.
func tokenWithRules(t *testing.T, agent *devconsul.Agent, name, rules string) string {
	t.Helper()
	acl := agent.Client.ACL()
	p, _, err := acl.PolicyCreate(&api.ACLPolicy{Name: name, Rules: rules}, nil)
	if err != nil {
		t.Fatal(err)
	}
	tok, _, err := acl.TokenCreate(&api.ACLToken{Policies: []*api.ACLTokenPolicyLink{{ID: p.ID}}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	return tok.SecretID
}

func (l *latest) current() *model.Catalog {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.cat
}

// complete reports what a catalog of registerThroughCatalog's mesh lacks
// ("" when nothing).
func complete(c *model.Catalog) string {
	var missing []string
	for _, s := range []string{"api", "web"} {
		if svc := c.Services[s]; svc == nil || len(svc.Instances) != 1 || !svc.Instances[0].Healthy {
			missing = append(missing, "healthy "+s+" instance")
		}
		if p := c.ProxiesFor(s); len(p) != 1 || !p[0].Healthy {
			missing = append(missing, "healthy "+s+" proxy")
		}
		if c.Leaves[s] == nil {
			missing = append(missing, s+"'s leaf certificate")
		}
	}
	if c.CA == nil || len(c.CA.Roots) == 0 {
		missing = append(missing, "CA roots")
	}
	if in := c.Intentions["api"]; in == nil || len(in.Sources) != 1 || in.Sources[0].Name != "web" {
		missing = append(missing, "intention web → api")
	}
	return strings.Join(missing, ", ")
}

// TestWatcherWithControlPlaneACLRules: against an agent with ACLs on
// (default deny), a token with consul.ControlPlaneACLRules and nothing
// else gives the whole catalog: instances, proxies, health, CA roots, leaf
// certificates, intentions; and a token lacking any one of those rules
// gets a log line naming the permission missing (found by taking each rule
// out: each is needed).
//
// Each case has an agent of its own: Consul 1.19's agent keeps the leaf
// certificates it fetched and serves them to any token after, so a leaf
// fetched with one token would hide the next one's missing service:write.
func TestWatcherWithControlPlaneACLRules(t *testing.T) {
	for _, tls := range []bool{false, true} {
		name := "ControlPlaneACLRules"
		if tls {
			name += " over HTTPS"
		}
		t.Run(name, func(t *testing.T) {
			agent := devconsul.StartForTestWith(t, devconsul.Options{TLS: tls})
			registerThroughCatalog(t, agent.Client)
			logs := &safeBuffer{}
			l := runControlPlaneWatcher(t, agent, logs)
			l.wait(t, 10*time.Second, "the whole catalog", func(c *model.Catalog) bool { return complete(c) == "" })
			time.Sleep(200 * time.Millisecond) // any late ACL complaint
			for _, bad := range []string{"ACL", "level=ERROR", "level=WARN"} {
				for _, line := range logs.Lines(bad) {
					// The agent's cached leaves answered without a token
					// is Consul's doing, warned about on every dev agent
					// (TestLeafExposureWarned).
					if !strings.Contains(line, "hands cached leaf certificates") {
						t.Errorf("log has %q: %s\n%s", bad, line, logs.String())
					}
				}
			}
		})
	}

	for _, tc := range []struct {
		name  string
		rules string // the token's only policy; none when "" (see token)
		token string // when rules is "": the token given
		anon  bool   // no token
		// want is the log line's start; lacks what the catalog then
		// misses (a word of complete's answer).
		want, lacks string
	}{
		{name: "no service:write: no leaf certificates",
			rules: `service_prefix "" { policy = "read"  intentions = "read" }  node_prefix "" { policy = "read" }`,
			want:  `consul: ACL token lacks service:write on api (needed for the leaf certificate of api)`, lacks: "leaf"},
		{name: "no intentions:read: no intentions",
			rules: `service_prefix "" { policy = "write"  intentions = "deny" }  node_prefix "" { policy = "read" }`,
			want:  "consul: ACL token lacks intentions:read on every service: Consul left part of the service intentions out", lacks: "intention"},
		{name: "no node:read: no instances",
			rules: `service_prefix "" { policy = "write"  intentions = "read" }`,
			want:  "consul: ACL token lacks service:read on api and node:read on every node: Consul left part of the instances of api out", lacks: "instance"},
		{name: "no service:read: no services",
			rules: `node_prefix "" { policy = "read" }`,
			want:  "consul: ACL token lacks service:read on every service: Consul left part of the service list out", lacks: "instance"},
		{name: "unknown token", token: devconsul.NewUUID(),
			want: "consul: ACL token not found (Consul does not know it"},
		{name: "no token", anon: true,
			want: "consul: the agent's ACLs default to deny and the control plane gives no ACL token", lacks: "instance"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			agent := devconsul.StartForTest(t)
			registerThroughCatalog(t, agent.Client)
			token := tc.token
			if tc.rules != "" {
				token = tokenWithRules(t, agent, "weak", tc.rules)
			}
			client, err := agent.NewClient(token)
			if err != nil {
				t.Fatal(err)
			}
			logs := &safeBuffer{}
			l := runWatcherWith(t, consul.Config{Client: client, Address: agent.HTTPAddr, Anonymous: tc.anon}, logs)
			line := logs.WaitFor(t, 10*time.Second, tc.want)
			t.Logf("logged: %s", line)
			if n := logs.Count(tc.want); n != 1 {
				t.Errorf("logged %d times, want once:\n%s", n, logs.String())
			}
			if tc.lacks == "" {
				return
			}
			l.wait(t, 10*time.Second, "a catalog", func(*model.Catalog) bool { return true })
			if miss := complete(l.current()); !strings.Contains(miss, tc.lacks) {
				t.Errorf("the catalog lacks %q, want it to lack %q", miss, tc.lacks)
			}
		})
	}
}

func TestACLError(t *testing.T) {
	for _, tc := range []struct {
		name, body, want string
		notFound         bool
	}{
		{"named permission", `Permission denied: token with AccessorID 'b1f3' lacks permission 'service:write' on "api"`,
			`consul: ACL token lacks service:write on api (needed for the leaf certificate of api)`, false},
		{"anonymous", `Permission denied: anonymous token lacks permission 'service:write' on "api". The anonymous token is used implicitly when a request does not specify a token.`,
			`consul: no ACL token given, and the anonymous token lacks service:write on api (needed for the leaf certificate of api)`, false},
		{"unknown token", "ACL not found",
			"consul: ACL token not found (Consul does not know it: a wrong secret, or a deleted or expired token)", true},
		{"unnamed", "Permission denied",
			"consul: ACL permission denied (Permission denied) (needed for the leaf certificate of api)", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := consul.ACLErrorOf(api.StatusError{Code: 403, Body: tc.body}, "the leaf certificate of api")
			var ae *consul.ACLError
			if !errors.As(err, &ae) || !errors.Is(err, consul.ErrACLDenied) {
				t.Fatalf("%v is no ACLError", err)
			}
			if err.Error() != tc.want || ae.TokenNotFound != tc.notFound {
				t.Errorf("got  %s (not found %v)\nwant %s", err, ae.TokenNotFound, tc.want)
			}
		})
	}
	if err := consul.ACLErrorOf(api.StatusError{Code: 500, Body: "boom"}, "x"); err != nil {
		t.Errorf("a 500 became %v", err)
	}
	if err := consul.ACLErrorOf(context.Canceled, "x"); err != nil {
		t.Errorf("a non-HTTP error became %v", err)
	}
}
