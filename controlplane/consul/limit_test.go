package consul

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/meshlet/meshlet/internal/devconsul"
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
	l := runWatcher(t, agent.HTTPAddr, logs)
	deadline := time.Now().Add(10 * time.Second)
	for !strings.Contains(logs.String(), "limits.http_max_conns_per_client") {
		if time.Now().After(deadline) {
			t.Fatalf("no connection-limit log line; logs:\n%s", logs.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
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
