package consul_test

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/meshlet/meshlet/controlplane/model"
	"github.com/meshlet/meshlet/internal/devconsul"
	"github.com/meshlet/meshlet/internal/testutil"
)

// TestWatcherNamesTheConnectionLimit: with more services than the agent
// lets one address hold connections (limits.http_max_conns_per_client),
// the watcher says so, once, with what to raise, instead of reporting the
// agent unreachable and reachable again for every refused query; raising
// the limit is then enough.
func TestWatcherNamesTheConnectionLimit(t *testing.T) {
	agent := devconsul.StartForTestWith(t, devconsul.Options{Args: []string{"-hcl", "limits { http_max_conns_per_client = 12 }"}})
	for i := range 20 {
		name := fmt.Sprintf("svc-%02d", i)
		if _, err := agent.Client.Catalog().Register(&api.CatalogRegistration{
			Node: "n1", Address: "10.0.0.1", Service: &api.AgentService{ID: name, Service: name, Port: 8000 + i},
		}, nil); err != nil {
			t.Fatal(err)
		}
	}
	logs := &safeBuffer{}
	l := runControlPlaneWatcher(t, agent, logs)
	testutil.Eventually(t, 10*time.Second, "a connection-limit log line", func() error {
		if out := logs.String(); !strings.Contains(out, "limits.http_max_conns_per_client") {
			return fmt.Errorf("logs:\n%s", out)
		}
		return nil
	})
	time.Sleep(2 * time.Second) // more refusals: still one line, no unreachable/reachable flapping
	out := logs.String()
	if n := strings.Count(out, "limits.http_max_conns_per_client"); n != 1 {
		t.Errorf("connection limit logged %d times, want once:\n%s", n, out)
	}
	if strings.Contains(out, "agent unreachable") || strings.Contains(out, "reachable again") {
		t.Errorf("refused connections reported as an unreachable agent:\n%s", out)
	}
	l.mu.Lock()
	n := l.n
	l.mu.Unlock()
	if n != 0 {
		t.Errorf("%d catalogs published without every service's answer", n)
	}
}

// TestWatcherNamesTheCSRRateLimit: the Connect CA answers 429 too when
// leaf certificates are asked for faster than its csr_max_per_second
// ("Rate limit reached"); the watcher says that, once, not that the
// connection limit is reached, and every leaf comes as the CA allows.
func TestWatcherNamesTheCSRRateLimit(t *testing.T) {
	agent := devconsul.StartForTestWith(t, devconsul.Options{Args: []string{"-hcl", "connect { ca_config { csr_max_per_second = 2 } }"}})
	const n = 8
	for i := range n {
		name := fmt.Sprintf("svc-%02d", i)
		if err := agent.Client.Agent().ServiceRegister(&api.AgentServiceRegistration{
			ID: name, Name: name, Address: "127.0.0.1", Port: 8000 + i,
			Connect: &api.AgentServiceConnect{SidecarService: &api.AgentServiceRegistration{Port: 21000 + i}},
		}); err != nil {
			t.Fatal(err)
		}
	}
	logs := &safeBuffer{}
	l := runControlPlaneWatcher(t, agent, logs)
	l.wait(t, 30*time.Second, "a leaf for every proxied service", func(c *model.Catalog) bool { return len(c.Leaves) == n })
	out := logs.String()
	if n := strings.Count(out, "rate-limits leaf certificate signing"); n != 1 {
		t.Errorf("CSR rate limit logged %d times, want once:\n%s", n, out)
	}
	if strings.Contains(out, "limits.http_max_conns_per_client") || strings.Contains(out, "agent unreachable") {
		t.Errorf("the CSR rate limit reported as a connection limit or an outage:\n%s", out)
	}
}
