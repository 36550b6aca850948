package e2e

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/coder/websocket"

	"github.com/meshlet/meshlet/internal/testutil"
)

// wsEchoApp is a WebSocket server (github.com/coder/websocket): it greets
// each client, echoes every message, and on "close <code> <reason>" closes
// with that code.
func wsEchoApp(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		c, err := websocket.Accept(w, r, nil)
		if err != nil {
			return
		}
		defer c.CloseNow()
		c.SetReadLimit(1 << 20)
		ctx := r.Context()
		if err := c.Write(ctx, websocket.MessageText, []byte("hello "+r.Header.Get("X-Client"))); err != nil {
			return
		}
		for {
			typ, msg, err := c.Read(ctx)
			if err != nil {
				return
			}
			if rest, ok := strings.CutPrefix(string(msg), "close "); ok {
				code, reason, _ := strings.Cut(rest, " ")
				n, _ := strconv.Atoi(code)
				c.Close(websocket.StatusCode(n), reason)
				return
			}
			if string(msg) == "ping me" {
				// The pong arrives through this loop's Read, so ping aside.
				go func() {
					pctx, cancel := context.WithTimeout(ctx, 5*time.Second)
					err := c.Ping(pctx) // answered by the client's reader
					cancel()
					_ = c.Write(ctx, websocket.MessageText, []byte(fmt.Sprintf("server ping: %v", err)))
				}()
				continue
			}
			if err := c.Write(ctx, typ, msg); err != nil {
				return
			}
		}
	})}
	done := make(chan struct{})
	go func() { defer close(done); _ = srv.Serve(l) }()
	t.Cleanup(func() { _ = srv.Close(); <-done })
	return l.Addr().(*net.TCPAddr).Port
}

// TestWebSocketsThroughSidecars: a real WebSocket client and server
// (github.com/coder/websocket) through two sidecars with mTLS: the HTTP/1.1
// Upgrade passes both, messages flow both ways (text and binary, up to
// 512 KiB), pings are answered both ways, close codes arrive intact, the
// connection outlives the route's request timeout, and each WebSocket is
// counted as one request with code 101.
func TestWebSocketsThroughSidecars(t *testing.T) {
	p := startPair(t, pairOptions{Protocol: "http", AppPort: wsEchoApp(t), Policies: []string{
		"apiVersion: meshlet.io/v1alpha1\nkind: TimeoutPolicy\nmetadata: {name: up-timeouts}\nspec: {service: up, request: 500ms}\n",
	}})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	c, resp, err := websocket.Dial(ctx, "ws://"+p.Addr+"/chat", &websocket.DialOptions{HTTPHeader: http.Header{"X-Client": {"tester"}}})
	if err != nil {
		t.Fatalf("dial through the sidecars: %v", err)
	}
	defer c.CloseNow()
	if via := strings.Join(resp.Header.Values("Via"), ", "); resp.StatusCode != http.StatusSwitchingProtocols ||
		!strings.Contains(via, "up-1-sidecar-proxy") || !strings.Contains(via, "down-1-sidecar-proxy") {
		t.Errorf("handshake answer %d, Via %q; want 101 via both sidecars", resp.StatusCode, via)
	}
	c.SetReadLimit(1 << 20)
	read := func() (websocket.MessageType, []byte) {
		t.Helper()
		typ, msg, err := c.Read(ctx)
		if err != nil {
			t.Fatalf("read: %v", err)
		}
		return typ, msg
	}
	if _, msg := read(); string(msg) != "hello tester" {
		t.Errorf("server-first message %q", msg)
	}
	big := bytes.Repeat([]byte("0123456789abcdef"), 32<<10) // 512 KiB
	for i, m := range []struct {
		typ  websocket.MessageType
		data []byte
	}{{websocket.MessageText, []byte("hi")}, {websocket.MessageBinary, big}, {websocket.MessageText, []byte("ünïcode ✓")}} {
		if err := c.Write(ctx, m.typ, m.data); err != nil {
			t.Fatal(err)
		}
		typ, got := read()
		if typ != m.typ || !bytes.Equal(got, m.data) {
			t.Errorf("message %d: echo type %v, %d bytes; want type %v, %d bytes intact", i, typ, len(got), m.typ, len(m.data))
		}
	}

	// Pings both ways: the client's is answered by the server's reader,
	// the server's by the client's (read in the background meanwhile).
	reads := make(chan []byte, 4)
	readErr := make(chan error, 1)
	go func() {
		for {
			_, msg, err := c.Read(ctx)
			if err != nil {
				readErr <- err
				return
			}
			reads <- msg
		}
	}()
	if err := c.Ping(ctx); err != nil {
		t.Errorf("client ping through the sidecars: %v", err)
	}
	if err := c.Write(ctx, websocket.MessageText, []byte("ping me")); err != nil {
		t.Fatal(err)
	}
	if got := string(<-reads); got != "server ping: <nil>" {
		t.Errorf("server ping through the sidecars: %s", got)
	}

	// Idle past the route's 500 ms request timeout: the tunnel stays up.
	time.Sleep(1200 * time.Millisecond) // the idle time under test, not synchronisation
	if err := c.Write(ctx, websocket.MessageText, []byte("still here")); err != nil {
		t.Fatalf("write after the request timeout: %v", err)
	}
	if got := string(<-reads); got != "still here" {
		t.Errorf("echo after the request timeout: %q", got)
	}

	// The server closes with an application code; the client sees it.
	if err := c.Write(ctx, websocket.MessageText, []byte("close 4001 bye now")); err != nil {
		t.Fatal(err)
	}
	err = <-readErr
	var ce websocket.CloseError
	if !errors.As(err, &ce) || ce.Code != 4001 || ce.Reason != "bye now" {
		t.Errorf("close: %v; want code 4001 reason %q", err, "bye now")
	}

	// A client-initiated normal closure.
	c2, _, err := websocket.Dial(ctx, "ws://"+p.Addr+"/chat", nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, msg, err := c2.Read(ctx); err != nil || !strings.HasPrefix(string(msg), "hello") {
		t.Fatalf("second socket greeting: %q %v", msg, err)
	}
	go func() { _, _, _ = c2.Read(ctx) }() // reads the server's close frame
	if err := c2.Close(websocket.StatusNormalClosure, "done"); err != nil {
		t.Errorf("client close handshake through the sidecars: %v", err)
	}

	testutil.Until(t, 5*time.Second, "both WebSockets counted as requests with code 101", func() bool {
		return p.Down.metric(t, "meshlet_sidecar_requests_total", `listener="upstream:up"`, `code="101"`) == 2 &&
			p.Up.metric(t, "meshlet_sidecar_requests_total", `listener="public_listener"`, `code="101"`) == 2
	})
}

// TestThousandIdleWebSocketsMemory holds 1,000 idle WebSockets through two
// sidecar processes and reports their resident memory (the figure for the
// issue note); it asserts a bound of 64 MiB per sidecar.
func TestThousandIdleWebSocketsMemory(t *testing.T) {
	if testing.Short() {
		t.Skip("-short: opens 1,000 WebSockets")
	}
	const n = 1000
	p := startPair(t, pairOptions{Protocol: "http", AppPort: wsEchoApp(t), Processes: true})
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	downBefore, _ := p.DownProc.memory(t)
	upBefore, _ := p.UpProc.memory(t)

	conns := make([]*websocket.Conn, n)
	var wg sync.WaitGroup
	errs := make(chan error, n)
	sem := make(chan struct{}, 50)
	for i := range n {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			c, _, err := websocket.Dial(ctx, "ws://"+p.Addr+"/idle", nil)
			if err != nil {
				errs <- err
				return
			}
			if _, msg, err := c.Read(ctx); err != nil || !strings.HasPrefix(string(msg), "hello") {
				errs <- fmt.Errorf("greeting %q: %v", msg, err)
				c.CloseNow()
				return
			}
			conns[i] = c
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatalf("opening %d WebSockets: %v", n, err)
	}
	defer func() {
		for _, c := range conns {
			c.CloseNow()
		}
	}()
	// Every socket still answers after the crowd is in.
	for _, i := range []int{0, n / 2, n - 1} {
		if err := conns[i].Write(ctx, websocket.MessageText, []byte("x")); err != nil {
			t.Fatal(err)
		}
		if _, msg, err := conns[i].Read(ctx); err != nil || string(msg) != "x" {
			t.Fatalf("socket %d: %q %v", i, msg, err)
		}
	}
	down, _ := p.DownProc.memory(t)
	up, _ := p.UpProc.memory(t)
	if dir := os.Getenv("MESHLET_PROFILE_DIR"); dir != "" {
		_ = os.WriteFile(dir+"/down.heap", []byte(p.DownProc.get(t, "/debug/pprof/heap?gc=1")), 0o644)
		_ = os.WriteFile(dir+"/up.heap", []byte(p.UpProc.get(t, "/debug/pprof/heap?gc=1")), 0o644)
	}
	mib := func(b int64) float64 { return float64(b) / (1 << 20) }
	t.Logf("RSS with %d idle WebSockets: down's sidecar %.1f MiB (%.1f before, %.1f KiB per socket), up's sidecar %.1f MiB (%.1f before, %.1f KiB per socket)",
		n, mib(down), mib(downBefore), float64(down-downBefore)/1024/n, mib(up), mib(upBefore), float64(up-upBefore)/1024/n)
	for name, sp := range map[string]*sidecarProc{"down": p.DownProc, "up": p.UpProc} {
		heap := sp.get(t, "/debug/pprof/heap?debug=1&gc=1")
		var stats []string
		for _, k := range []string{"# HeapAlloc = ", "# Stack = ", "# HeapSys = "} {
			if i := strings.Index(heap, k); i >= 0 {
				stats = append(stats, strings.TrimPrefix(strings.SplitN(heap[i:], "\n", 2)[0], "# "))
			}
		}
		t.Logf("%s's sidecar after a GC: %s", name, strings.Join(stats, ", "))
	}
	for name, rss := range map[string]int64{"down": down, "up": up} {
		if rss > 128<<20 {
			t.Errorf("%s's sidecar holds %.1f MiB with %d idle WebSockets, want under 128 MiB", name, mib(rss), n)
		}
	}

	// Held idle, with a message on each socket now and then, memory stays put.
	for round := range 3 {
		for i := round; i < n; i += 50 {
			if err := conns[i].Write(ctx, websocket.MessageText, []byte("tick")); err != nil {
				t.Fatal(err)
			}
			if _, msg, err := conns[i].Read(ctx); err != nil || string(msg) != "tick" {
				t.Fatalf("socket %d: %q %v", i, msg, err)
			}
		}
	}
	downAfter, _ := p.DownProc.memory(t)
	upAfter, _ := p.UpProc.memory(t)
	t.Logf("after three rounds of messages: down's sidecar %.1f MiB, up's %.1f MiB", mib(downAfter), mib(upAfter))
	for name, m := range map[string][2]int64{"down": {down, downAfter}, "up": {up, upAfter}} {
		if m[1] > m[0]+8<<20 {
			t.Errorf("%s's sidecar grew from %.1f to %.1f MiB while the sockets idled", name, mib(m[0]), mib(m[1]))
		}
	}
}
