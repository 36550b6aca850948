package xdsclient

import (
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/envoyproxy/go-control-plane/pkg/cache/types"

	"github.com/meshlet/meshlet/internal/testutil"
	"github.com/meshlet/meshlet/xds"
	"github.com/meshlet/meshlet/xds/xdstest"
)

// TestSeveralServersFailOver: with two replicas' addresses the client is
// served by one, keeps serving from the other when that one stops, and
// comes back to the first when the second stops in turn.
func TestSeveralServersFailOver(t *testing.T) {
	a, b := xdstest.Start(t), xdstest.Start(t)
	a.Set(t, "n1", "a1", xdstest.Resources{Listeners: []types.Resource{lis("from-a")}})
	b.Set(t, "n1", "b1", xdstest.Resources{Listeners: []types.Resource{lis("from-b")}})
	h := newRecorder()
	c := run(t, a.Addr+","+b.Addr, h)
	testutil.Until(t, 5*time.Second, "a first version from either replica", func() bool {
		v, _ := h.get(xds.ListenerType)
		return len(v) > 0
	})
	v, _ := h.get(xds.ListenerType)
	first, other := a, b
	want := "b1"
	if v[0] == "b1" {
		first, other, want = b, a, "a1"
	}
	first.Stop()
	testutil.Until(t, 5*time.Second, "the other replica's version after the first stopped", func() bool {
		v, _ := h.get(xds.ListenerType)
		return slices.Contains(v, want)
	})
	first.Restart(t)
	other.Stop()
	testutil.Until(t, 5*time.Second, "served by the first replica again after the other stopped", func() bool {
		v, _ := h.get(xds.ListenerType)
		return c.Status().Connected && v[len(v)-1] == v[0]
	})
}

func TestServerTargetErrors(t *testing.T) {
	for _, bad := range []string{"127.0.0.1:1,", "127.0.0.1:1,nohost", ",127.0.0.1:2", "127.0.0.1:1, :2"} {
		_, _, err := serverTarget(bad)
		if err == nil || !strings.Contains(err.Error(), "want host:port") {
			t.Errorf("serverTarget(%q) = %v, want an error naming host:port", bad, err)
		}
	}
	target, opts, err := serverTarget("127.0.0.1:1, 127.0.0.1:2")
	if err != nil || !strings.HasPrefix(target, serversScheme+":///") || len(opts) != 2 {
		t.Errorf("serverTarget of two addresses = %q, %d options, %v", target, len(opts), err)
	}
	if target, opts, _ := serverTarget("meshlet-controlplane.meshlet-system.svc:18000"); target != "meshlet-controlplane.meshlet-system.svc:18000" || opts != nil {
		t.Errorf("one address is dialled as given, got %q", target)
	}
}
