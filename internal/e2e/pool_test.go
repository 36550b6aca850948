package e2e

import (
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// TestPooledConnectionTheAppClosedIsNotReused: an app that closes idle
// keep-alive connections after 200 ms (as gunicorn (2 s), Node.js (5 s) or
// nginx do): a POST sent after its idle timeout must reach it exactly once,
// not die as a reset on the connection the app closed (found by the
// GraphQL/SOAP tests' author; the pool now peeks at an idle connection's
// socket before reusing it).
func TestPooledConnectionTheAppClosedIsNotReused(t *testing.T) {
	var hits atomic.Int64
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{IdleTimeout: 200 * time.Millisecond, Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hits.Add(1)
		_, _ = io.Copy(io.Discard, r.Body)
		fmt.Fprint(w, "ok")
	})}
	go func() { _ = srv.Serve(l) }()
	t.Cleanup(func() { srv.Close() })
	p := startPair(t, pairOptions{Protocol: "http", AppPort: l.Addr().(*net.TCPAddr).Port})
	post := func() (int, string) {
		resp, err := http.Post("http://"+p.Addr+"/orders", "application/json", strings.NewReader(`{"item": 1}`))
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		_, _ = io.Copy(io.Discard, resp.Body)
		return resp.StatusCode, resp.Header.Get("X-Meshlet-Reason")
	}
	if code, reason := post(); code != 200 {
		t.Fatalf("first POST: %d %s", code, reason)
	}
	time.Sleep(500 * time.Millisecond) // the idle time under test: the app closes up's sidecar's connection
	code, reason := post()
	if code != 200 || hits.Load() != 2 {
		t.Errorf("second POST: %d x-meshlet-reason %q, app hits %d; want 200 and 2 hits", code, reason, hits.Load())
	}
}
