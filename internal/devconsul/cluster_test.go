package devconsul

import (
	"context"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
)

// TestClusterElectsANewLeader: a three-server cluster keeps answering
// through its client agent after its leader is killed (a new one is
// elected), and the old leader rejoins with its state when restarted.
func TestClusterElectsANewLeader(t *testing.T) {
	t0 := time.Now()
	c := StartClusterForTest(t, ClusterOptions{})
	t.Logf("cluster up in %v", time.Since(t0))
	reg := &api.AgentServiceRegistration{ID: "api-1", Name: "api", Port: 8080}
	if err := c.Client.Client.Agent().ServiceRegister(reg); err != nil {
		t.Fatal(err)
	}
	leader, err := c.Leader()
	if err != nil {
		t.Fatal(err)
	}
	c.Servers[leader].Kill()
	t0 = time.Now()
	deadline := time.Now().Add(30 * time.Second)
	for {
		l, err := c.Leader()
		if err == nil && l != leader {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no new leader 30 s after server-%d was killed: %v", leader+1, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Logf("a new leader %v after the kill", time.Since(t0))
	t0 = time.Now()
	if err := c.Servers[leader].Restart(context.Background(), 30*time.Second); err != nil {
		t.Fatal(err)
	}
	t.Logf("restarted in %v", time.Since(t0))
	// The restarted server catches up with the leader's log by itself:
	// its own (stale) reads have api-1 once it has.
	deadline = time.Now().Add(30 * time.Second)
	for {
		ss, _, err := c.Servers[leader].Client.Catalog().Service("api", "", &api.QueryOptions{AllowStale: true})
		if err == nil && len(ss) == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the restarted server's catalog 30 s after its restart: %v, %v; want api-1", ss, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
