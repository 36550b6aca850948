package httpproxy

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"sync/atomic"
	"testing"
	"time"
)

// TestSheddingClosesKeepAliveConnections: once Options.Shedding is set,
// each HTTP/1.1 response says Connection: close and its connection ends,
// on both wires, while new connections are still served; before, the
// connection is kept.
func TestSheddingClosesKeepAliveConnections(t *testing.T) {
	for _, netHTTP := range []bool{false, true} {
		t.Run(fmt.Sprintf("netHTTPOnly=%v", netHTTP), func(t *testing.T) {
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { _, _ = io.WriteString(w, "ok") }))
			t.Cleanup(srv.Close)
			up := srv.Listener.Addr().String()
			var shed atomic.Bool
			addr, _ := startProxy(t, proxyOpts{endpoints: []string{up}, netHTTPOnly: netHTTP, shedding: &shed})
			c, err := net.Dial("tcp", addr)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			br := bufio.NewReader(c)
			get := func() *http.Response {
				t.Helper()
				if _, err := fmt.Fprint(c, "GET / HTTP/1.1\r\nHost: api.internal\r\n\r\n"); err != nil {
					t.Fatal(err)
				}
				resp, err := http.ReadResponse(br, nil)
				if err != nil {
					t.Fatal(err)
				}
				if b, err := io.ReadAll(resp.Body); err != nil || string(b) != "ok" {
					t.Fatalf("body %q: %v", b, err)
				}
				return resp
			}
			if resp := get(); resp.StatusCode != 200 || resp.Close {
				t.Fatalf("before shedding: %d, close %v; want 200 on a kept connection", resp.StatusCode, resp.Close)
			}
			shed.Store(true)
			if resp := get(); resp.StatusCode != 200 || !resp.Close {
				t.Fatalf("shedding: %d, close %v; want 200 with Connection: close", resp.StatusCode, resp.Close)
			}
			_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
			if b, err := br.ReadByte(); err == nil {
				rest, _ := br.Peek(br.Buffered())
				t.Fatalf("the shed connection stayed open: read %q%q", b, rest)
			}
			resp, err := http.Get("http://" + addr + "/")
			if err != nil || resp.StatusCode != 200 {
				t.Fatalf("a new connection while shedding: %v %v", resp, err)
			}
			resp.Body.Close()
		})
	}
}
