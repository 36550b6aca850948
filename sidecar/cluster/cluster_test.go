package cluster

import (
	"testing"
	"time"

	"github.com/meshlet/meshlet/sidecar/config"
	"github.com/meshlet/meshlet/xds"
)

func eds(name string, proto xds.Protocol) *config.Cluster {
	return &config.Cluster{Name: name, Type: config.ClusterEDS, EDSServiceName: name, ConnectTimeout: time.Second, Protocol: proto}
}

func la(addrs ...string) *config.LoadAssignment {
	out := &config.LoadAssignment{}
	for _, a := range addrs {
		out.Endpoints = append(out.Endpoints, config.Endpoint{Address: a, Weight: 1})
	}
	return out
}

func TestRoundRobin(t *testing.T) {
	m := NewManager(nil, nil, nil)
	defer m.Close()
	m.Update(map[string]*config.Cluster{"c": eds("c", xds.ProtocolHTTP)}, map[string]*config.LoadAssignment{"c": la("a:1", "b:1", "c:1")})
	counts := map[string]int{}
	for range 300 {
		a, _ := m.Get("c").Pick(0, false, nil)
		counts[a.Endpoint().Address]++
		a.End(OutcomeSuccess)
	}
	for _, a := range []string{"a:1", "b:1", "c:1"} {
		if counts[a] != 100 {
			t.Errorf("%s picked %d times of 300, want 100 (%v)", a, counts[a], counts)
		}
	}
	if m.Get("missing") != nil {
		t.Error("Get of an unknown cluster is not nil")
	}
}

func TestUpdateKeepsEndpointsThatStay(t *testing.T) {
	m := NewManager(nil, nil, nil)
	defer m.Close()
	clusters := map[string]*config.Cluster{"c": eds("c", xds.ProtocolHTTP)}
	m.Update(clusters, map[string]*config.LoadAssignment{"c": la("a:1", "b:1")})
	c1 := m.Get("c")
	var a1, b1 *Endpoint
	for _, e := range c1.Endpoints() {
		switch e.Address {
		case "a:1":
			a1 = e
		case "b:1":
			b1 = e
		}
	}

	m.Update(clusters, map[string]*config.LoadAssignment{"c": la("a:1", "d:1")})
	if m.Get("c") != c1 {
		t.Error("unchanged cluster settings replaced the cluster")
	}
	eps := m.Get("c").Endpoints()
	if len(eps) != 2 || eps[0] != a1 || eps[1].Address != "d:1" {
		t.Errorf("endpoints = %v, want a:1 (same value, same pool) then d:1", eps)
	}
	if a1.Retired() || !b1.Retired() {
		t.Errorf("retired: a=%v b=%v, want only b", a1.Retired(), b1.Retired())
	}

	// Missing EDS keeps the current endpoints.
	m.Update(clusters, nil)
	if got := len(m.Get("c").Endpoints()); got != 2 {
		t.Errorf("endpoints after an update without EDS = %d, want 2 kept", got)
	}

	// A settings change (protocol) gives a new cluster and retires the old endpoints.
	m.Update(map[string]*config.Cluster{"c": eds("c", xds.ProtocolHTTP2)}, map[string]*config.LoadAssignment{"c": la("a:1")})
	if m.Get("c") == c1 || !a1.Retired() {
		t.Error("protocol change kept the old cluster or endpoint")
	}
	// Removing the cluster retires it.
	last := m.Get("c").Endpoints()[0]
	m.Update(nil, nil)
	if m.Get("c") != nil || !last.Retired() {
		t.Error("removed cluster still present or its endpoints not retired")
	}
}
