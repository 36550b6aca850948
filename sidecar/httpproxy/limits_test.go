package httpproxy

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/meshlet/meshlet/sidecar/config"
	"github.com/meshlet/meshlet/xds"
)

// countingUpstream answers every request 200 "ok", counting them.
func countingUpstream(t *testing.T) (*rawUpstream, *atomic.Int64) {
	var n atomic.Int64
	up := newRawUpstream(t, func(c net.Conn, br *bufio.Reader) {
		for {
			if _, _, err := readReq(br); err != nil {
				return
			}
			n.Add(1)
			io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
		}
	})
	return up, &n
}

// TestRequestHeadLimits: on both HTTP/1.1 wires, a head over the
// connection manager's max_request_headers_kb (60 KiB by default) or with
// more fields than max_headers_count (100) is answered 431 and never
// reaches the upstream — a 200 KiB field, 10,000 fields, 101 fields — while
// heads within both limits are forwarded (99 fields, Host included; a
// 50 KiB field).
func TestRequestHeadLimits(t *testing.T) {
	fields := func(n int) string { // n fields besides Host
		var b strings.Builder
		for i := range n {
			fmt.Fprintf(&b, "X-F%d: v\r\n", i)
		}
		return b.String()
	}
	tests := []struct {
		name   string
		fields string
		want   int
	}{
		{"a 200 KiB field", "X-Big: " + strings.Repeat("a", 200<<10) + "\r\n", http.StatusRequestHeaderFieldsTooLarge},
		{"10,000 fields", fields(10000), http.StatusRequestHeaderFieldsTooLarge},
		{"101 fields", fields(100), http.StatusRequestHeaderFieldsTooLarge},
		{"100 fields", fields(99), http.StatusOK},
		{"a 50 KiB field", "X-Big: " + strings.Repeat("a", 50<<10) + "\r\n", http.StatusOK},
	}
	for _, p := range paths {
		t.Run(p.name, func(t *testing.T) {
			up, reached := countingUpstream(t)
			addr, _ := startProxy(t, proxyOpts{endpoints: []string{up.addr()}, netHTTPOnly: p.netHTTPOnly})
			for _, tc := range tests {
				t.Run(tc.name, func(t *testing.T) {
					before := reached.Load()
					c, br := dialProxy(t, addr)
					done := make(chan error, 1)
					go func() { // the head may be larger than the socket buffers
						_, err := io.WriteString(c, "GET /x HTTP/1.1\r\nHost: api.internal\r\n"+tc.fields+"\r\n")
						done <- err
					}()
					resp, _ := readResp(t, br, http.MethodGet)
					<-done
					if resp.StatusCode != tc.want {
						t.Fatalf("answered %d, want %d", resp.StatusCode, tc.want)
					}
					if got := reached.Load() - before; (tc.want == http.StatusOK) != (got == 1) {
						t.Errorf("the upstream got %d requests", got)
					}
					if tc.want == http.StatusRequestHeaderFieldsTooLarge && strings.HasPrefix(tc.name, "101") {
						if r := resp.Header.Get(xds.ReasonHeader); r != string(xds.ReasonRequestHeadersTooLarge) {
							t.Errorf("reason %q, want %q", r, xds.ReasonRequestHeadersTooLarge)
						}
					}
				})
			}
		})
	}
}

// TestMalformedChunkedBodyIs400: on both wires, a request whose chunked
// body has a chunk size that overflows is answered 400
// downstream_protocol_error as soon as the body breaks off (the upstream
// attempt aborted), not 504 at the route timeout, and is not retried.
func TestMalformedChunkedBodyIs400(t *testing.T) {
	for _, p := range paths {
		t.Run(p.name, func(t *testing.T) {
			var heads atomic.Int64
			up := newRawUpstream(t, func(c net.Conn, br *bufio.Reader) {
				if _, err := http.ReadRequest(br); err != nil {
					return
				}
				heads.Add(1)
				io.Copy(io.Discard, br) // waits for a body that never comes whole
			})
			rec := &testRecorder{}
			addr, _ := startProxy(t, proxyOpts{endpoints: []string{up.addr()}, netHTTPOnly: p.netHTTPOnly, rec: rec,
				routeTimeout: 30 * time.Second, retry: &config.RetryPolicy{On: config.RetryOn(config.RetryReset | config.Retry5xx), NumRetries: 2}})
			c, br := dialProxy(t, addr)
			write(t, c, "POST /upload HTTP/1.1\r\nHost: api.internal\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nfffffffffffffffffffff\r\nx")
			resp, _ := readResp(t, br, http.MethodPost)
			if resp.StatusCode != http.StatusBadRequest || resp.Header.Get(xds.ReasonHeader) != string(xds.ReasonDownstreamProtocolError) {
				t.Fatalf("answered %d %q, want 400 %s", resp.StatusCode, resp.Header.Get(xds.ReasonHeader), xds.ReasonDownstreamProtocolError)
			}
			if n, _ := rec.counts(); n != 0 {
				t.Errorf("retried %d times", n)
			}
		})
	}
}

// TestSlowHeadCut: on both wires, a client trickling a request head a
// byte at a time is closed (net/http answers 400 first) once the chain's
// request_headers_timeout has passed since the head's first byte (bytes
// arriving do not move it), while a connection that idles between
// requests longer than that timeout is not cut, and another client is
// served throughout.
func TestSlowHeadCut(t *testing.T) {
	const timeout = 300 * time.Millisecond
	for _, p := range paths {
		t.Run(p.name, func(t *testing.T) {
			up, _ := countingUpstream(t)
			addr, _ := startProxy(t, proxyOpts{endpoints: []string{up.addr()}, netHTTPOnly: p.netHTTPOnly, headersTimeout: timeout})

			// Idle longer than the timeout between two requests: served.
			c, br := dialProxy(t, addr)
			write(t, c, "GET /a HTTP/1.1\r\nHost: api.internal\r\n\r\n")
			if resp, _ := readResp(t, br, http.MethodGet); resp.StatusCode != http.StatusOK {
				t.Fatalf("first request: %d", resp.StatusCode)
			}
			time.Sleep(2 * timeout) // the behaviour under test: idle, not reading a head
			write(t, c, "GET /b HTTP/1.1\r\nHost: api.internal\r\n\r\n")
			if resp, _ := readResp(t, br, http.MethodGet); resp.StatusCode != http.StatusOK {
				t.Fatalf("request after idling: %d", resp.StatusCode)
			}

			// Slowloris: a byte every 20 ms, for at most 20 s.
			slow, err := net.Dial("tcp", addr)
			if err != nil {
				t.Fatal(err)
			}
			defer slow.Close()
			closed := make(chan error, 1)
			go func() {
				// The connection ends: closed by the fast path, or by
				// net/http after its 400 (its answer to a head timeout).
				b, err := io.ReadAll(slow)
				if err == nil {
					err = io.EOF
				}
				if len(b) > 0 && !strings.HasPrefix(string(b), "HTTP/1.1 400 ") {
					err = fmt.Errorf("answered %q", b)
				}
				closed <- err
			}()
			head := "GET /slow HTTP/1.1\r\nHost: api.internal\r\nX-Pad: " + strings.Repeat("a", 2000)
			start := time.Now()
			var cut error
		trickle:
			for i := 0; i < len(head) && time.Since(start) < 20*time.Second; i++ {
				if _, err := slow.Write([]byte{head[i]}); err != nil {
					break
				}
				select {
				case cut = <-closed:
					break trickle
				case <-time.After(20 * time.Millisecond):
				}
			}
			if cut == nil {
				select {
				case cut = <-closed:
				case <-time.After(5 * time.Second):
				}
			}
			if cut == nil || !(errors.Is(cut, io.EOF) || strings.Contains(cut.Error(), "reset")) {
				t.Fatalf("a head trickled for %v was not cut (read: %v)", time.Since(start).Round(time.Millisecond), cut)
			}
			// Another client meanwhile: served.
			c2, br2 := dialProxy(t, addr)
			write(t, c2, "GET /c HTTP/1.1\r\nHost: api.internal\r\n\r\n")
			if resp, _ := readResp(t, br2, http.MethodGet); resp.StatusCode != http.StatusOK {
				t.Fatalf("another client: %d", resp.StatusCode)
			}
		})
	}
}
