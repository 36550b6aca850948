package xdsauth_test

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/meshlet/meshlet/controlplane/xdsauth"
	"github.com/meshlet/meshlet/internal/testutil"
)

// TestConsulReviewsBoundTheirConnections: a storm of token reviews opens
// at most xdsauth.ConsulConnections connections to the agent at once (the
// rest wait), so it cannot take the agent's per-client connection limit
// from the control plane's blocking queries.
func TestConsulReviewsBoundTheirConnections(t *testing.T) {
	var active, most atomic.Int64
	release := make(chan struct{})
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		n := active.Add(1)
		defer active.Add(-1)
		for m := most.Load(); n > m && !most.CompareAndSwap(m, n); m = most.Load() {
		}
		<-release
		fmt.Fprintf(w, `{"AccessorID": "acc-%s", "SecretID": %q}`, r.Header.Get("X-Consul-Token"), r.Header.Get("X-Consul-Token"))
	}))
	defer srv.Close()
	cfg := api.DefaultConfig()
	cfg.Address = srv.URL
	a, err := xdsauth.NewConsulAuthenticator(*cfg)
	if err != nil {
		t.Fatal(err)
	}
	const storm = 100
	var wg sync.WaitGroup
	errs := make(chan error, storm)
	for i := range storm {
		wg.Add(1)
		go func() {
			defer wg.Done()
			id, err := a.Authenticate(context.Background(), fmt.Sprintf("token-%d", i))
			if err == nil && id.AccessorID != fmt.Sprintf("acc-token-%d", i) {
				err = fmt.Errorf("token-%d: accessor %s", i, id.AccessorID)
			}
			errs <- err
		}()
	}
	testutil.Until(t, 10*time.Second, "the connection bound reached", func() bool { return active.Load() >= xdsauth.ConsulConnections })
	close(release)
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	if m := most.Load(); m > xdsauth.ConsulConnections {
		t.Fatalf("%d reviews at once against the agent, want at most %d", m, xdsauth.ConsulConnections)
	}
}
