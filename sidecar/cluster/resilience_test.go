package cluster

import (
	"fmt"
	"io"
	"log/slog"
	"testing"
	"time"

	"github.com/meshlet/meshlet/sidecar/config"
	"github.com/meshlet/meshlet/xds"
)

func TestRetryBudget(t *testing.T) {
	now := time.Unix(1000, 0)
	b := NewRetryBudget(&xds.RetryBudget{Ratio: 0.2, MinRetriesPerSecond: 1, TTL: xds.Duration(10 * time.Second)})
	b.now = func() time.Time { return now }
	// Reserve: 1/s × 10s = 10 tokens, plus 20% of 50 requests = 10 more.
	for range 50 {
		b.Deposit()
	}
	granted := 0
	for range 100 {
		if b.TryWithdraw() {
			granted++
		}
	}
	if granted != 20 {
		t.Errorf("granted %d retries, want 20 (10 reserve + 20%% of 50)", granted)
	}
	// After the window the deposits and withdrawals expire: only the reserve is left.
	now = now.Add(11 * time.Second)
	granted = 0
	for range 100 {
		if b.TryWithdraw() {
			granted++
		}
	}
	if granted != 10 {
		t.Errorf("after the TTL granted %d, want the reserve of 10", granted)
	}
}

func testCluster(t *testing.T, cfg *config.Cluster, n int) (*Cluster, []*Endpoint) {
	t.Helper()
	m := NewManager(slog.New(slog.NewTextHandler(io.Discard, nil)), nil, nil)
	t.Cleanup(m.Close)
	var eps []config.Endpoint
	for i := range n {
		eps = append(eps, config.Endpoint{Address: fmt.Sprintf("10.0.0.%d:80", i+1), Weight: 1})
	}
	cfg.Name, cfg.Type, cfg.Static = "c", config.ClusterStatic, &config.LoadAssignment{Endpoints: eps}
	m.Update(map[string]*config.Cluster{"c": cfg}, nil)
	c := m.Get("c")
	return c, c.Endpoints()
}

func TestOutlierEjectionCapAndMultiplier(t *testing.T) {
	c, eps := testCluster(t, &config.Cluster{Outlier: &config.OutlierDetection{
		Consecutive5xx: 2, Interval: time.Hour, BaseEjectionTime: time.Second, MaxEjectionTime: 10 * time.Second, MaxEjectionPercent: 10,
	}}, 5)
	fail := func(e *Endpoint, n int) {
		for range n {
			c.outlier.record(e, Outcome5xx, len(eps))
		}
	}
	fail(eps[0], 2)
	if !eps[0].Ejected() {
		t.Fatal("not ejected after 2 consecutive 5xx")
	}
	// 10% of 5 hosts rounds down to 0, but one ejection is always allowed, and only one.
	fail(eps[1], 5)
	if eps[1].Ejected() {
		t.Error("a second host was ejected beyond max_ejection_percent")
	}
	// A success resets the count: 1 + 1 failures in a row do not eject.
	c.outlier.record(eps[2], Outcome5xx, 5)
	c.outlier.record(eps[2], OutcomeSuccess, 5)
	c.outlier.record(eps[2], Outcome5xx, 5)
	if eps[2].outlier.consecutive5xx.Load() != 1 {
		t.Errorf("consecutive 5xx = %d after a success in between, want 1", eps[2].outlier.consecutive5xx.Load())
	}
	// The second ejection of the same host lasts base × 2.
	until := eps[0].outlier.ejectedUntil.Load()
	c.outlier.available(eps[0], until) // re-admitted at the end of the first ejection
	start := time.Now()
	fail(eps[0], 2)
	if d := time.Duration(eps[0].outlier.ejectedUntil.Load() - start.UnixNano()); d < 1900*time.Millisecond || d > 2100*time.Millisecond {
		t.Errorf("second ejection lasts %v, want 2 × base (2s)", d)
	}
}

func TestSmoothWeightedRoundRobin(t *testing.T) {
	got := smoothWRR([]int{5, 1, 1})
	want := []int{0, 0, 1, 0, 2, 0, 0}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("smoothWRR(5,1,1) = %v, want nginx's %v", got, want)
	}
}

func TestRingHashIsStableAcrossMembershipChanges(t *testing.T) {
	cfg := &config.Cluster{LB: config.LBRingHash, RingSize: 1024}
	c, _ := testCluster(t, cfg, 4)
	pick := func(key string) string {
		a, _ := c.Pick(HashKey(key), true, nil)
		defer a.End(OutcomeSuccess)
		return a.Endpoint().Address
	}
	before := map[string]string{}
	for i := range 1000 {
		k := fmt.Sprint("user-", i)
		before[k] = pick(k)
	}
	// Remove one endpoint: only its keys move (consistent hashing).
	c.setEndpoints([]config.Endpoint{{Address: "10.0.0.1:80", Weight: 1}, {Address: "10.0.0.2:80", Weight: 1}, {Address: "10.0.0.3:80", Weight: 1}})
	moved := 0
	for k, was := range before {
		if now := pick(k); now != was {
			if was != "10.0.0.4:80" {
				moved++
			}
		}
	}
	if moved != 0 {
		t.Errorf("%d keys of surviving endpoints moved", moved)
	}
}

func TestEndpointBreakerFailureRatio(t *testing.T) {
	c, eps := testCluster(t, &config.Cluster{EndpointBreaker: &xds.EndpointBreaker{
		FailureRatio: 0.5, MinRequests: 4, Interval: xds.Duration(time.Minute), OpenInterval: xds.Duration(time.Minute), HalfOpenRequests: 1,
	}}, 1)
	e := eps[0]
	for _, o := range []Outcome{OutcomeSuccess, Outcome5xx, OutcomeSuccess} {
		a, ok := e.Begin()
		if !ok {
			t.Fatal("refused while closed")
		}
		a.End(o)
	}
	if e.BreakerState() != "closed" {
		t.Fatalf("state %s before min requests", e.BreakerState())
	}
	a, _ := e.Begin()
	a.End(OutcomeLocalFailure) // 2 of 4 failed: ratio 0.5 reached
	if e.BreakerState() != "open" {
		t.Errorf("state %s after 2/4 failures, want open", e.BreakerState())
	}
	if _, picked := c.Pick(0, false, nil); picked != CircuitOpen {
		t.Errorf("Pick with the only breaker open = %v, want CircuitOpen", picked)
	}
	// Cancelled attempts do not count either way.
	c2, eps2 := testCluster(t, &config.Cluster{EndpointBreaker: &xds.EndpointBreaker{
		ConsecutiveFailures: 1, Interval: xds.Duration(time.Minute), OpenInterval: xds.Duration(time.Minute), HalfOpenRequests: 1,
	}}, 1)
	_ = c2
	a, _ = eps2[0].Begin()
	a.End(OutcomeCancelled)
	if eps2[0].BreakerState() != "closed" {
		t.Error("a client cancellation opened the breaker")
	}
}
