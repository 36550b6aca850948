package xdsstate

import (
	"errors"
	"io"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	"go.uber.org/goleak"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/meshlet/meshlet/controlplane/xdsbuild"
	"github.com/meshlet/meshlet/internal/testutil"
	"github.com/meshlet/meshlet/sidecar/config"
	"github.com/meshlet/meshlet/sidecar/xdsclient"
	"github.com/meshlet/meshlet/xds"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// recorder is an Applier that records applied snapshots and refuses to
// bind listeners while bindErr is set.
type recorder struct {
	mu      sync.Mutex
	bindErr error
	applied []*Snapshot
}

func (r *recorder) Bind(map[string]*config.Listener) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.bindErr
}

func (r *recorder) Apply(snap *Snapshot) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.applied = append(r.applied, snap)
}

func (r *recorder) last() (*Snapshot, int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.applied) == 0 {
		return nil, 0
	}
	return r.applied[len(r.applied)-1], len(r.applied)
}

func newState(t *testing.T, r *recorder, dir string, warm time.Duration) *State {
	t.Helper()
	s, err := New(Config{
		Server: "127.0.0.1:1", Node: &core.Node{Id: "n1"}, Applier: r, Credentials: xdsclient.Credentials{Insecure: true},
		WarmTimeout: warm, StateDir: dir, Logger: slog.New(slog.NewTextHandler(io.Discard, nil)),
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Close)
	return s
}

func anys(t *testing.T, ms ...proto.Message) []*anypb.Any {
	t.Helper()
	out := make([]*anypb.Any, 0, len(ms))
	for _, m := range ms {
		out = append(out, xds.MustAny(m))
	}
	return out
}

func update(t *testing.T, s *State, typeURL, version string, res []*anypb.Any) map[string][]string {
	t.Helper()
	deps, err := s.Update(typeURL, version, res)
	if err != nil {
		t.Fatalf("Update(%s, %s): %v", typeURL, version, err)
	}
	return deps
}

// feed sends one HTTP listener → RDS "web" → EDS cluster "web" at version.
func feed(t *testing.T, s *State, version string) {
	t.Helper()
	if deps := update(t, s, xds.ClusterType, version, anys(t, xdsbuild.NewEDSCluster("web", xdsbuild.ClusterOptions{Protocol: xds.ProtocolHTTP}))); !slices.Equal(deps[xds.EndpointType], []string{"web"}) {
		t.Errorf("CDS deps = %v, want EDS [web]", deps)
	}
	update(t, s, xds.EndpointType, version, anys(t, xdsbuild.NewLoadAssignment("web", []xdsbuild.Endpoint{{Host: "127.0.0.1", Port: 8080}})))
	if deps := update(t, s, xds.ListenerType, version, anys(t, xdsbuild.NewHTTPListener("upstream:web", "127.0.0.1", 9000, xdsbuild.HTTPListenerOptions{RouteConfigName: "web"}))); !slices.Equal(deps[xds.RouteType], []string{"web"}) {
		t.Errorf("LDS deps = %v, want RDS [web]", deps)
	}
	update(t, s, xds.RouteType, version, anys(t, xdsbuild.NewRouteConfig("web", "web", xdsbuild.RouteOptions{})))
}

func TestWarmsUntilCompleteThenApplies(t *testing.T) {
	r := &recorder{}
	s := newState(t, r, "", time.Hour)
	if got := s.Accepted().Missing; !slices.Equal(got, []string{"clusters (CDS)", "listeners (LDS)"}) {
		t.Errorf("missing before any update = %q", got)
	}
	update(t, s, xds.ClusterType, "v1", anys(t, xdsbuild.NewEDSCluster("web", xdsbuild.ClusterOptions{})))
	update(t, s, xds.ListenerType, "v1", anys(t, xdsbuild.NewHTTPListener("upstream:web", "127.0.0.1", 9000, xdsbuild.HTTPListenerOptions{RouteConfigName: "web"})))
	if _, n := r.last(); n != 0 {
		t.Fatalf("applied %d snapshots while warming, want 0", n)
	}
	want := []string{`route configuration "web" (RDS)`, `load assignment "web" (EDS)`}
	if got := s.Accepted().Missing; !slices.Equal(got, want) {
		t.Errorf("missing = %q, want %q", got, want)
	}
	update(t, s, xds.RouteType, "v1", anys(t, xdsbuild.NewRouteConfig("web", "web", xdsbuild.RouteOptions{})))
	update(t, s, xds.EndpointType, "v1", anys(t, xdsbuild.NewLoadAssignment("web", nil)))
	snap, n := r.last()
	if n != 1 || !snap.Complete() || snap != s.Accepted() {
		t.Fatalf("applied %d snapshots (last complete: %v), want 1, the accepted one", n, snap != nil && snap.Complete())
	}
	for _, typ := range []string{xds.ListenerType, xds.RouteType, xds.ClusterType, xds.EndpointType} {
		if v := snap.Version(typ); v != "v1" {
			t.Errorf("version of %s = %q, want v1", typ, v)
		}
	}
	if snap.Config.Listeners["upstream:web"] == nil || snap.Config.Routes["web"] == nil || snap.Config.Clusters["web"] == nil || snap.Config.Endpoints["web"] == nil {
		t.Errorf("snapshot config lacks a resource: %+v", snap.Config)
	}
}

func TestWarmTimeoutAppliesWhatThereIs(t *testing.T) {
	r := &recorder{}
	s := newState(t, r, "", 20*time.Millisecond)
	update(t, s, xds.ClusterType, "v1", anys(t, xdsbuild.NewEDSCluster("web", xdsbuild.ClusterOptions{})))
	update(t, s, xds.ListenerType, "v1", nil)
	testutil.Until(t, 5*time.Second, "the warm timeout to apply the config", func() bool { snap, _ := r.last(); return snap != nil })
	if snap, _ := r.last(); !slices.Equal(snap.Missing, []string{`load assignment "web" (EDS)`}) {
		t.Errorf("missing = %q", snap.Missing)
	}
}

func TestRejectedUpdateKeepsLastGood(t *testing.T) {
	r := &recorder{}
	s := newState(t, r, "", time.Hour)
	feed(t, s, "v1")
	good := s.Accepted()

	tests := []struct {
		name    string
		typeURL string
		res     []*anypb.Any
		bindErr error
		detail  string
		details []xds.NACKDetail // want xds.NACKDetailsOf(err)
	}{
		{name: "listener on a host name", typeURL: xds.ListenerType,
			res:     anys(t, xdsbuild.NewHTTPListener("upstream:web", "localhost", 9000, xdsbuild.HTTPListenerOptions{RouteConfigName: "web"})),
			detail:  `is not an IP address`,
			details: []xds.NACKDetail{{TypeURL: xds.ListenerType, Name: "upstream:web", Field: "address", Reason: xds.NACKInvalidResource}}},
		{name: "bind fails", typeURL: xds.ListenerType, bindErr: errors.New("cannot bind"),
			res:    anys(t, xdsbuild.NewHTTPListener("upstream:web", "127.0.0.1", 9001, xdsbuild.HTTPListenerOptions{RouteConfigName: "web"})),
			detail: `cannot bind`},
		{name: "duplicate cluster", typeURL: xds.ClusterType,
			res:     anys(t, xdsbuild.NewEDSCluster("web", xdsbuild.ClusterOptions{}), xdsbuild.NewEDSCluster("web", xdsbuild.ClusterOptions{})),
			detail:  `cluster "web": duplicate resource name`,
			details: []xds.NACKDetail{{TypeURL: xds.ClusterType, Name: "web", Reason: xds.NACKDuplicateName}}},
		{name: "two listeners on one address", typeURL: xds.ListenerType,
			res: anys(t, xdsbuild.NewHTTPListener("upstream:b", "127.0.0.1", 9002, xdsbuild.HTTPListenerOptions{RouteConfigName: "web"}),
				xdsbuild.NewHTTPListener("upstream:a", "127.0.0.1", 9002, xdsbuild.HTTPListenerOptions{RouteConfigName: "web"})),
			detail: `listeners "upstream:a" and "upstream:b" both listen on 127.0.0.1:9002/tcp`,
			details: []xds.NACKDetail{{TypeURL: xds.ListenerType, Name: "upstream:a", Field: "address", Reason: xds.NACKAddressConflict},
				{TypeURL: xds.ListenerType, Name: "upstream:b", Field: "address", Reason: xds.NACKAddressConflict}}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r.mu.Lock()
			r.bindErr = tc.bindErr
			r.mu.Unlock()
			_, err := s.Update(tc.typeURL, "v2", tc.res)
			if err == nil || !strings.Contains(err.Error(), tc.detail) {
				t.Fatalf("Update error = %v, want one containing %q", err, tc.detail)
			}
			if got := xds.NACKDetailsOf(err); tc.details != nil && !slices.Equal(got, tc.details) {
				t.Errorf("NACKDetailsOf(%v) = %+v, want %+v", err, got, tc.details)
			}
			if s.Accepted() != good {
				t.Error("the accepted snapshot changed after a rejected update")
			}
			if rej := s.Rejected()[tc.typeURL]; rej.Version != "v2" || rej.Error != err.Error() {
				t.Errorf("rejected[%s] = %+v", tc.typeURL, rej)
			}
		})
	}
	r.mu.Lock()
	r.bindErr = nil
	r.mu.Unlock()
	feed(t, s, "v3")
	if len(s.Rejected()) != 0 {
		t.Errorf("rejections after accepted updates of every type: %v", s.Rejected())
	}
}

func TestRestoreAppliesPersistedConfig(t *testing.T) {
	dir := t.TempDir()
	s1 := newState(t, &recorder{}, dir, time.Hour)
	feed(t, s1, "v7")

	r := &recorder{}
	s2 := newState(t, r, dir, time.Hour)
	if err := s2.Restore(); err != nil {
		t.Fatal(err)
	}
	snap, n := r.last()
	if n == 0 || !snap.Complete() {
		t.Fatalf("restore applied %d snapshots, want a complete one", n)
	}
	for _, typ := range []string{xds.ListenerType, xds.RouteType, xds.ClusterType, xds.EndpointType} {
		if v := snap.Version(typ); v != "v7" {
			t.Errorf("restored version of %s = %q, want v7", typ, v)
		}
	}
}
