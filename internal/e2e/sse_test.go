package e2e

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/meshlet/meshlet/internal/testutil"
)

// pushApp serves Server-Sent Events and long polls, and records when each
// request's context ended (the client left, through both sidecars):
//
//	/events  ?n=N: N events, one every 300 ms, each flushed
//	/poll    answers after 2 s (a long poll), or when the client leaves;
//	         also as /short/poll, under a 500 ms request timeout
type pushApp struct {
	port int
	mu   sync.Mutex
	gone map[string]time.Time // request id → when its context ended
}

func startPushApp(t *testing.T) *pushApp {
	t.Helper()
	a := &pushApp{gone: map[string]time.Time{}}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	a.port = l.Addr().(*net.TCPAddr).Port
	track := func(r *http.Request) {
		<-r.Context().Done()
		a.mu.Lock()
		a.gone[r.URL.Query().Get("id")] = time.Now()
		a.mu.Unlock()
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/events", func(w http.ResponseWriter, r *http.Request) {
		go track(r) // the context ends when the client leaves, or when the handler returns
		w.Header().Set("Content-Type", "text/event-stream")
		w.Header().Set("Cache-Control", "no-cache")
		n := 5
		fmt.Sscan(r.URL.Query().Get("n"), &n)
		tick := time.NewTicker(300 * time.Millisecond)
		defer tick.Stop()
		for i := 1; i <= n; i++ {
			fmt.Fprintf(w, "id: %d\nevent: tick\ndata: event %d at %d\n\n", i, i, time.Now().UnixMilli())
			w.(http.Flusher).Flush()
			select {
			case <-tick.C:
			case <-r.Context().Done():
				return
			}
		}
	})
	poll := func(w http.ResponseWriter, r *http.Request) {
		go track(r) // the context ends when the client leaves, or when the handler returns
		select {
		case <-time.After(2 * time.Second):
			fmt.Fprintln(w, `{"update": "new data"}`)
		case <-r.Context().Done():
		}
	}
	mux.HandleFunc("/poll", poll)
	mux.HandleFunc("/short/poll", poll)
	srv := &http.Server{Handler: mux}
	done := make(chan struct{})
	go func() { defer close(done); _ = srv.Serve(l) }()
	t.Cleanup(func() { _ = srv.Close(); <-done })
	return a
}

func (a *pushApp) goneAt(id string) (time.Time, bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	at, ok := a.gone[id]
	return at, ok
}

// TestSSEAndLongPollingThroughSidecars: curl through two sidecars with mTLS
// receives Server-Sent Events one by one as the app flushes them (not
// buffered until the end), past the route's request timeout; a 2 s long
// poll is not cut by any default timeout, and a configured request timeout
// does cut it (504 upstream_timeout); a client that leaves an event stream
// or a long poll is noticed by the app promptly.
func TestSSEAndLongPollingThroughSidecars(t *testing.T) {
	app := startPushApp(t)
	p := startPair(t, pairOptions{Protocol: "http", AppPort: app.port, Policies: []string{
		"apiVersion: meshlet.io/v1alpha1\nkind: TimeoutPolicy\nmetadata: {name: short}\nspec: {service: up, match: {pathPrefix: /short/}, request: 500ms}\n",
		"apiVersion: meshlet.io/v1alpha1\nkind: TimeoutPolicy\nmetadata: {name: events}\nspec: {service: up, match: {pathPrefix: /events}, request: 500ms}\n",
	}})
	if _, err := exec.LookPath("curl"); err != nil {
		t.Fatal("curl not found: install the Debian package curl (.ci/run does)")
	}
	base := "http://" + p.Addr

	t.Run("events arrive one by one", func(t *testing.T) {
		cmd := exec.Command("curl", "-sS", "-N", "--max-time", "20", base+"/events?n=6&id=sse")
		out, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		start := time.Now()
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		var arrivals []time.Duration
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			if strings.HasPrefix(sc.Text(), "data: event ") {
				arrivals = append(arrivals, time.Since(start))
			}
		}
		if err := cmd.Wait(); err != nil {
			t.Fatalf("curl: %v", err)
		}
		if len(arrivals) != 6 {
			t.Fatalf("got %d events, want 6", len(arrivals))
		}
		// Six events 300 ms apart: flushed one by one, the first arrives
		// about 1.5 s before the last, and the stream outlives the route's
		// 500 ms request timeout.
		if spread := arrivals[5] - arrivals[0]; spread < time.Second {
			t.Errorf("events arrived within %v of each other (%v): buffered, not streamed", spread, arrivals)
		}
		t.Logf("event arrivals: %v", arrivals)
	})

	t.Run("long poll without a timeout", func(t *testing.T) {
		var out strings.Builder
		start := time.Now()
		curl(t, nil, &out, base+"/poll?id=poll")
		if took := time.Since(start); !strings.Contains(out.String(), "new data") || took < 2*time.Second {
			t.Errorf("long poll answered %q after %v, want the app's update after 2 s", out.String(), took)
		}
	})

	t.Run("long poll with a configured timeout", func(t *testing.T) {
		resp, err := http.Get(base + "/short/poll?id=short")
		if err != nil {
			t.Fatal(err)
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusGatewayTimeout || resp.Header.Get("X-Meshlet-Reason") != "upstream_timeout" {
			t.Errorf("long poll under a 500 ms request timeout: %d %q, want 504 upstream_timeout", resp.StatusCode, resp.Header.Get("X-Meshlet-Reason"))
		}
	})

	t.Run("client disconnect reaches the app", func(t *testing.T) {
		for _, path := range []string{"/poll?id=leave-poll", "/events?n=100&id=leave-sse"} {
			cmd := exec.Command("curl", "-sS", "-N", "-o", "/dev/null", "--max-time", "0.8", base+path)
			_ = cmd.Run() // curl gives up after 0.8 s (exit 28)
			left := time.Now()
			id := path[strings.Index(path, "id=")+3:]
			testutil.Until(t, 3*time.Second, "the app seeing "+id+"'s client leave", func() bool {
				_, ok := app.goneAt(id)
				return ok
			})
			at, _ := app.goneAt(id)
			t.Logf("%s: the app saw the client leave %v after curl exited", id, at.Sub(left).Round(time.Millisecond))
			if d := at.Sub(left); d > time.Second {
				t.Errorf("%s: the app noticed the client leaving %v later", id, d)
			}
		}
	})
}
