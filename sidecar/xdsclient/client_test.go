package xdsclient

import (
	"context"
	"errors"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listener "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	route "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	"go.uber.org/goleak"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/meshlet/meshlet/internal/testutil"
	"github.com/meshlet/meshlet/xds"
	"github.com/meshlet/meshlet/xds/xdstest"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// recorder is a Handler that records updates, rejects listener versions in
// reject, and asks for the route names listed in listener names
// ("l:<route>").
type recorder struct {
	mu      sync.Mutex
	reject  map[string]bool
	updates map[string][]string // type → versions accepted, in order
	names   map[string][]string // type → resource names of the last accepted update
}

func (r *recorder) Update(typeURL, version string, resources []*anypb.Any) (map[string][]string, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if typeURL == xds.ListenerType && r.reject[version] {
		return nil, errors.New("listener \"l\": rejected on purpose")
	}
	var names, routes []string
	for _, a := range resources {
		switch typeURL {
		case xds.ListenerType:
			var l listener.Listener
			_ = a.UnmarshalTo(&l)
			names = append(names, l.GetName())
			if rt, ok := strings.CutPrefix(l.GetName(), "l:"); ok {
				routes = append(routes, rt)
			}
		case xds.RouteType:
			var rc route.RouteConfiguration
			_ = a.UnmarshalTo(&rc)
			names = append(names, rc.GetName())
		}
	}
	slices.Sort(names)
	r.updates[typeURL] = append(r.updates[typeURL], version)
	r.names[typeURL] = names
	if typeURL == xds.ListenerType {
		return map[string][]string{xds.RouteType: routes}, nil
	}
	return nil, nil
}

func (r *recorder) get(typeURL string) (versions, names []string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.updates[typeURL]), slices.Clone(r.names[typeURL])
}

func newRecorder(reject ...string) *recorder {
	r := &recorder{reject: map[string]bool{}, updates: map[string][]string{}, names: map[string][]string{}}
	for _, v := range reject {
		r.reject[v] = true
	}
	return r
}

func run(t *testing.T, server string, h Handler) *Client {
	t.Helper()
	c, err := New(Config{
		Server: server, Node: &core.Node{Id: "n1"}, Handler: h, Credentials: Credentials{Insecure: true},
		Logger:     slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug})),
		MinBackoff: 50 * time.Millisecond, MaxBackoff: 400 * time.Millisecond,
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = c.Run(ctx)
	}()
	t.Cleanup(func() {
		cancel()
		<-done
	})
	return c
}

func lis(name string) types.Resource { return &listener.Listener{Name: name} }
func rc(name string) types.Resource  { return &route.RouteConfiguration{Name: name} }

func TestFollowsDependentSubscriptions(t *testing.T) {
	srv := xdstest.Start(t)
	srv.Set(t, "n1", "v1", xdstest.Resources{
		Listeners: []types.Resource{lis("l:r1"), lis("l:r2")},
		Routes:    []types.Resource{rc("r1"), rc("r2")},
	})
	h := newRecorder()
	run(t, srv.Addr, h)
	testutil.Until(t, 5*time.Second, "routes r1 and r2", func() bool {
		_, names := h.get(xds.RouteType)
		return slices.Equal(names, []string{"r1", "r2"})
	})
	// The RDS request named exactly what the listeners reference.
	req := srv.WaitRequest(t, time.Second, "RDS subscription", func(r *discovery.DiscoveryRequest) bool {
		return r.GetTypeUrl() == xds.RouteType
	})
	if !slices.Equal(req.GetResourceNames(), []string{"r1", "r2"}) {
		t.Errorf("RDS resource_names = %v, want [r1 r2]", req.GetResourceNames())
	}
	// Dropping a listener narrows the subscription. (In ADS mode the
	// snapshot cache answers only requests naming every route it holds.)
	srv.Set(t, "n1", "v2", xdstest.Resources{
		Listeners: []types.Resource{lis("l:r2")},
		Routes:    []types.Resource{rc("r2")},
	})
	srv.WaitRequest(t, 5*time.Second, "narrowed RDS subscription", func(r *discovery.DiscoveryRequest) bool {
		return r.GetTypeUrl() == xds.RouteType && slices.Equal(r.GetResourceNames(), []string{"r2"})
	})
}

func TestNACKCarriesDetailAndLastAcceptedVersion(t *testing.T) {
	srv := xdstest.Start(t)
	srv.Set(t, "n1", "v1", xdstest.Resources{Listeners: []types.Resource{lis("a")}})
	h := newRecorder("v2")
	c := run(t, srv.Addr, h)
	testutil.Until(t, 5*time.Second, "v1 accepted", func() bool { v, _ := h.get(xds.ListenerType); return slices.Contains(v, "v1") })

	srv.Set(t, "n1", "v2", xdstest.Resources{Listeners: []types.Resource{lis("b")}})
	nack := srv.WaitRequest(t, 5*time.Second, "NACK", func(r *discovery.DiscoveryRequest) bool {
		return r.GetTypeUrl() == xds.ListenerType && r.GetErrorDetail() != nil
	})
	if nack.GetVersionInfo() != "v1" {
		t.Errorf("NACK version_info = %q, want last accepted v1", nack.GetVersionInfo())
	}
	if got := nack.GetErrorDetail().GetMessage(); got != `listener "l": rejected on purpose` {
		t.Errorf("NACK error_detail = %q", got)
	}
	st := c.Status()
	if st.NACKs != 1 || st.Versions[xds.ListenerType] != "v1" || !strings.Contains(st.LastNACK, "v2") {
		t.Errorf("status = %+v, want 1 NACK of v2 and v1 accepted", st)
	}
	// The guarded server parks the watch: the next version is delivered.
	srv.Set(t, "n1", "v3", xdstest.Resources{Listeners: []types.Resource{lis("c")}})
	testutil.Until(t, 5*time.Second, "v3 accepted", func() bool { v, _ := h.get(xds.ListenerType); return slices.Contains(v, "v3") })
	if v, _ := h.get(xds.ListenerType); slices.Contains(v, "v2") {
		t.Errorf("accepted versions %v include the rejected v2", v)
	}
}

func TestRepeatedNACKsArePacedWithBackoff(t *testing.T) {
	srv := xdstest.StartUnguarded(t) // resends the rejected version at once, forever
	srv.Set(t, "n1", "bad", xdstest.Resources{Listeners: []types.Resource{lis("a")}})
	run(t, srv.Addr, newRecorder("bad"))
	isNACK := func(r *discovery.DiscoveryRequest) bool {
		return r.GetTypeUrl() == xds.ListenerType && r.GetErrorDetail() != nil
	}
	var times []time.Time
	testutil.Until(t, 5*time.Second, "4 NACKs", func() bool {
		times = times[:0]
		reqs, at := srv.Requests(), srv.RequestTimes()
		for i, r := range reqs {
			if isNACK(r) {
				times = append(times, at[i])
			}
		}
		return len(times) >= 4
	})
	// MinBackoff is 50ms: pauses of ≥50ms, ≥100ms, then ≥200ms between NACKs.
	for i, want := range []time.Duration{50 * time.Millisecond, 100 * time.Millisecond} {
		if gap := times[i+2].Sub(times[i+1]); gap < want {
			t.Errorf("gap between NACK %d and %d = %v, want ≥ %v", i+2, i+3, gap, want)
		}
	}
}

func TestReconnectsWithBackoffUntilServerAppears(t *testing.T) {
	srv := xdstest.Start(t)
	srv.Set(t, "n1", "v1", xdstest.Resources{Listeners: []types.Resource{lis("a")}})
	srv.Stop()
	h := newRecorder()
	c := run(t, srv.Addr, h)
	testutil.Until(t, 5*time.Second, "a failed attempt", func() bool { return !c.Status().Connected })
	srv2 := srv.Restart(t)
	_ = srv2
	testutil.Until(t, 5*time.Second, "v1 accepted after the server appeared", func() bool {
		v, _ := h.get(xds.ListenerType)
		return slices.Contains(v, "v1")
	})
	if !c.Status().Connected {
		t.Error("status not connected")
	}
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimSpace(string(p)))
	return len(p), nil
}

// TestStreamEndedByTheServerIsNoOutage: a working stream the server ends
// (a restart, a connection's maximum age) is logged as ended and
// reconnected at once, not as an outage; a reconnection that fails is.
func TestStreamEndedByTheServerIsNoOutage(t *testing.T) {
	srv := xdstest.Start(t)
	srv.Set(t, "n1", "v1", xdstest.Resources{Listeners: []types.Resource{lis("a")}})
	var logs syncBuffer
	h := newRecorder()
	c, err := New(Config{Server: srv.Addr, Node: &core.Node{Id: "n1"}, Handler: h, Credentials: Credentials{Insecure: true},
		Logger: slog.New(slog.NewTextHandler(&logs, nil)), MinBackoff: 10 * time.Millisecond, MaxBackoff: 50 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); _ = c.Run(ctx) }()
	defer func() { cancel(); <-done }()
	testutil.Until(t, 5*time.Second, "v1 accepted", func() bool { v, _ := h.get(xds.ListenerType); return slices.Contains(v, "v1") })
	srv.Stop()
	testutil.Until(t, 5*time.Second, "the drop logged, then the failed reconnection", func() bool {
		l := logs.String()
		i, j := strings.Index(l, "stream to the control plane ended; reconnecting"), strings.Index(l, "control plane unreachable")
		return i >= 0 && j > i
	})
	if strings.Count(logs.String(), "level=ERROR") != 1 {
		t.Fatalf("want one error (the failed reconnection), got:\n%s", logs.String())
	}
}
