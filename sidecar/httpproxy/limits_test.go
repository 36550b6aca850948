package httpproxy

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"strings"
	"sync"
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

// TestHostileRequests: on both wires, request heads and framings that
// proxies are known to disagree on are refused (400, 414, 431, 501) or
// closed, or forwarded in one unambiguous reading (net/http re-frames what
// it forwards). Content-Length with Transfer-Encoding is refused with 400
// on the fast path (Envoy's default), so the bytes after it never reach
// the upstream as a request (/smuggled); net/http's server, the other
// wire, reads such a request by its chunks (RFC 9112 §6.1 allows it) and
// the bytes after as the client's next request.
func TestHostileRequests(t *testing.T) {
	smuggled := "GET /smuggled HTTP/1.1\r\nHost: api.internal\r\n\r\n"
	tests := []struct {
		name    string
		raw     string
		allowed []int // statuses allowed; 0: the connection closed unanswered
	}{
		{"CL.TE", "POST /a HTTP/1.1\r\nHost: api.internal\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + smuggled, []int{400}},
		{"TE.CL", "POST /a HTTP/1.1\r\nHost: api.internal\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n8\r\nSMUGGLED\r\n0\r\n\r\n", []int{400}},
		{"two Content-Lengths", "POST /a HTTP/1.1\r\nHost: api.internal\r\nContent-Length: 5\r\nContent-Length: 52\r\n\r\nhello" + smuggled, []int{400}},
		{"Content-Length with a sign", "POST /a HTTP/1.1\r\nHost: api.internal\r\nContent-Length: +5\r\n\r\nhello", []int{400}},
		{"obfuscated Transfer-Encoding", "POST /a HTTP/1.1\r\nHost: api.internal\r\nTransfer-Encoding: xchunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", []int{400, 501}},
		{"Transfer-Encoding listed twice", "POST /a HTTP/1.1\r\nHost: api.internal\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n0\r\n\r\n", []int{200, 400, 501}},
		{"space before the colon", "POST /a HTTP/1.1\r\nHost: api.internal\r\nTransfer-Encoding : chunked\r\nContent-Length: 5\r\n\r\nhello", []int{400}},
		{"NUL in a field", "GET /a HTTP/1.1\r\nHost: api.internal\r\nX-A: a\x00b\r\n\r\n", []int{400}},
		{"control character in a field", "GET /a HTTP/1.1\r\nHost: api.internal\r\nX-A: a\x01b\r\n\r\n", []int{200, 400}},
		{"obs-fold", "GET /a HTTP/1.1\r\nHost: api.internal\r\nX-A: a\r\n b\r\n\r\n", []int{200, 400}},
		{"bare LF", "GET /a HTTP/1.1\nHost: api.internal\n\n", []int{200, 400}},
		{"request line of 100 KiB", "GET /" + strings.Repeat("a", 100<<10) + " HTTP/1.1\r\nHost: api.internal\r\n\r\n", []int{414, 431}},
		{"HTTP/0.9", "GET /a\r\n\r\n", []int{0, 400, 505}},
		{"two Hosts", "GET /a HTTP/1.1\r\nHost: api.internal\r\nHost: evil.internal\r\n\r\n", []int{400}},
		{"chunk size with junk", "POST /a HTTP/1.1\r\nHost: api.internal\r\nTransfer-Encoding: chunked\r\n\r\n5;\x00\r\nhello\r\n0\r\n\r\n", []int{200, 400}},
	}
	for _, p := range paths {
		t.Run(p.name, func(t *testing.T) {
			var mu sync.Mutex
			var seen []string
			up := newRawUpstream(t, func(c net.Conn, br *bufio.Reader) {
				for {
					req, _, err := readReq(br)
					if err != nil {
						return
					}
					mu.Lock()
					seen = append(seen, req.URL.Path)
					mu.Unlock()
					io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
				}
			})
			addr, _ := startProxy(t, proxyOpts{endpoints: []string{up.addr()}, netHTTPOnly: p.netHTTPOnly})
			for _, tc := range tests {
				t.Run(tc.name, func(t *testing.T) {
					allowed := tc.allowed
					if p.netHTTPOnly && (tc.name == "CL.TE" || tc.name == "TE.CL") {
						allowed = []int{200} // read by the chunks
					}
					c, br := dialProxy(t, addr)
					go io.WriteString(c, tc.raw)
					status := 0
					for { // every answer on the connection, until it closes
						resp, err := http.ReadResponse(br, &http.Request{Method: http.MethodPost})
						if err != nil {
							break
						}
						io.Copy(io.Discard, resp.Body)
						if status == 0 {
							status = resp.StatusCode
						}
						if !slices.Contains(allowed, resp.StatusCode) {
							t.Errorf("answered %d, want one of %v", resp.StatusCode, allowed)
						}
						_ = c.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
					}
					if status == 0 && !slices.Contains(allowed, 0) {
						t.Errorf("closed unanswered, want one of %v", allowed)
					}
				})
			}
			mu.Lock()
			defer mu.Unlock()
			if !p.netHTTPOnly && slices.Contains(seen, "/smuggled") {
				t.Errorf("a smuggled request reached the upstream: %q", seen)
			}
		})
	}
}

// TestConnectionSpecificFieldsOverHTTP2: the fields RFC 9113 §8.2.2 makes
// an HTTP/2 request malformed with are found (the request is refused with
// 400 by ServeHTTP); TE: trailers, which gRPC sends, is not one.
func TestConnectionSpecificFieldsOverHTTP2(t *testing.T) {
	for _, tc := range []struct {
		h    http.Header
		want bool
	}{
		{http.Header{"Connection": {"keep-alive"}}, true},
		{http.Header{"Keep-Alive": {"timeout=5"}}, true},
		{http.Header{"Proxy-Connection": {"close"}}, true},
		{http.Header{"Transfer-Encoding": {"chunked"}}, true},
		{http.Header{"Upgrade": {"websocket"}}, true},
		{http.Header{"Te": {"gzip"}}, true},
		{http.Header{"Te": {"trailers"}}, false},
		{http.Header{"Te": {"Trailers "}}, false},
		{http.Header{"Content-Type": {"application/grpc"}}, false},
	} {
		if got := connectionSpecific(tc.h); got != tc.want {
			t.Errorf("connectionSpecific(%v) = %v, want %v", tc.h, got, tc.want)
		}
	}
}
