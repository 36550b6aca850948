package httpproxy

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/meshlet/meshlet/sidecar/config"
	"github.com/meshlet/meshlet/xds"
)

// Tests of early answers: the upstream answers before the request body is
// all sent (401 before an upload, 413 to a large POST, with or without
// Expect: 100-continue) and the client must get that answer, on both
// wires, the connection ending with a FIN after it (lingering close,
// linger.go), not a reset that destroys the answer.

// refuser is an upstream that reads a request head, answers code with
// Connection: close without reading the body, and closes at once: its
// kernel resets the connection over the unread body, the harshest early
// answer a proxy meets. heads counts the requests it saw.
type refuser struct {
	*rawUpstream
	heads atomic.Int32
}

func newRefuser(t *testing.T, code int) *refuser {
	t.Helper()
	r := &refuser{}
	// A small receive buffer and an Ethernet MSS: the proxy cannot park a
	// whole body in the kernel before the reset, as it could on a loopback
	// (64 KiB MSS, megabytes of autotuned buffers).
	r.rawUpstream = newRawUpstreamWith(t, 16<<10, 1448, func(c net.Conn, br *bufio.Reader) {
		if _, err := http.ReadRequest(br); err != nil {
			return
		}
		r.heads.Add(1)
		msg := http.StatusText(code) + "\n"
		fmt.Fprintf(c, "HTTP/1.1 %d %s\r\nContent-Type: text/plain\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s",
			code, http.StatusText(code), len(msg), msg)
	})
	return r
}

// uploader sends a request body on a connection from its own goroutine,
// 64 KiB per write, until size bytes are sent or stop is called, as curl
// does: it stops sending when the answer arrives during the upload.
type uploader struct {
	stopped atomic.Bool
	done    chan struct{}
	sent    int64 // read after done
	err     error // the first write error, read after done
}

func upload(c net.Conn, size int64) *uploader {
	u := &uploader{done: make(chan struct{})}
	go func() {
		defer close(u.done)
		chunk := bytes.Repeat([]byte("u"), 64<<10)
		for u.sent < size && !u.stopped.Load() {
			m, err := c.Write(chunk[:min(int64(len(chunk)), size-u.sent)])
			u.sent += int64(m)
			if err != nil {
				u.err = err
				return
			}
		}
	}()
	return u
}

// stop ends the upload after the write in progress and returns the bytes
// sent and the first write error.
func (u *uploader) stop() (int64, error) {
	u.stopped.Store(true)
	<-u.done
	return u.sent, u.err
}

// dialSmall is dialProxy with the client's SO_SNDBUF set to size: with
// the proxy's rcvBuf, what the network can hold of a body the proxy does
// not read is small, as between hosts.
func dialSmall(t *testing.T, addr string, size int) (net.Conn, *bufio.Reader) {
	t.Helper()
	d := net.Dialer{Control: func(_, _ string, rc syscall.RawConn) error {
		var serr error
		if err := rc.Control(func(fd uintptr) {
			serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_SNDBUF, size)
		}); err != nil {
			return err
		}
		return serr
	}}
	c, err := d.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	t.Cleanup(func() { c.Close() })
	return c, bufio.NewReader(c)
}

// expectFIN asserts that the connection ends cleanly after the answer: the
// next read is io.EOF (the proxy's FIN), not a reset and not a timeout.
func expectFIN(t *testing.T, br *bufio.Reader) {
	t.Helper()
	b, err := br.ReadByte()
	if err == nil {
		rest, _ := br.Peek(br.Buffered())
		t.Fatalf("connection not closed after the answer: read %q", append([]byte{b}, rest...))
	}
	if !errors.Is(err, io.EOF) {
		t.Fatalf("connection ended with %v after the answer, want a FIN (EOF)", err)
	}
}

// postHead is the head of a request with a Content-Length body, for Host
// api.internal.
func postHead(method string, size int64, extra string) string {
	return fmt.Sprintf("%s /upload HTTP/1.1\r\nHost: api.internal\r\nContent-Length: %d\r\n%s\r\n", method, size, extra)
}

// TestEarlyAnswerReachesClient: an upstream that answers (401, 413) after
// reading the request head and resets its connection: the client gets
// that answer, whole, on both wires, whether it sends its body after a
// 100 Continue, in one go before reading, or pauses in the middle; the
// proxy does not fail the request (503) or retry it, the answer carries
// Connection: close when the body was not all read, the connection then
// ends with a FIN (the client's writes never meet a reset), and no
// goroutine is left behind.
func TestEarlyAnswerReachesClient(t *testing.T) {
	const big = 8 << 20
	tests := []struct {
		name       string
		code       int
		bodyBuffer int                 // the route's BodyBufferBytes; 0: the default
		retry      *config.RetryPolicy // would retry a reset
		// mayKeep: the proxy may keep the connection (it read the whole
		// body before forwarding, as the fast path does).
		mayKeep bool
		// smallBuffers: the client's send and the proxy's receive buffers
		// are 64 KiB, so a body the proxy stops reading fills them at once.
		smallBuffers bool
		// send sends the request and reads the answer's head; sendErr is the
		// first error writing the body.
		send func(t *testing.T, c net.Conn, br *bufio.Reader) (resp *http.Response, sendErr error)
	}{
		{name: "413 refusing an Expect: 100-continue upload", code: http.StatusRequestEntityTooLarge,
			send: func(t *testing.T, c net.Conn, br *bufio.Reader) (*http.Response, error) {
				write(t, c, postHead("POST", big, "Expect: 100-continue\r\n"))
				resp, err := http.ReadResponse(br, &http.Request{Method: http.MethodPost})
				if err != nil {
					t.Fatalf("reading the first answer: %v", err)
				}
				if resp.StatusCode != http.StatusContinue {
					return resp, nil // refused before the body: nothing to send
				}
				u := upload(c, big)
				resp, err = http.ReadResponse(br, &http.Request{Method: http.MethodPost})
				_, sendErr := u.stop()
				if err != nil {
					t.Fatalf("reading the answer during the upload: %v (upload: %v)", err, sendErr)
				}
				return resp, sendErr
			}},
		{name: "401 before a plain large POST sent in one go", code: http.StatusUnauthorized, smallBuffers: true,
			send: func(t *testing.T, c net.Conn, br *bufio.Reader) (*http.Response, error) {
				// A client that writes its whole request before reading (as many
				// do): it is blocked in this write when the answer comes.
				msg := append([]byte(postHead("POST", big, "")), bytes.Repeat([]byte("p"), big)...)
				_, sendErr := c.Write(msg)
				resp, err := http.ReadResponse(br, &http.Request{Method: http.MethodPost})
				if err != nil {
					t.Fatalf("reading the answer: %v (sending: %v)", err, sendErr)
				}
				return resp, sendErr
			}},
		{name: "413 while the client pauses in the middle of its body", code: http.StatusRequestEntityTooLarge,
			send: func(t *testing.T, c net.Conn, br *bufio.Reader) (*http.Response, error) {
				// 16 KiB of a 1 MiB body, then the client waits for an answer:
				// it must come now, not when the client sends more.
				msg := append([]byte(postHead("POST", 1<<20, "")), bytes.Repeat([]byte("s"), 16<<10)...)
				_, sendErr := c.Write(msg)
				resp, err := http.ReadResponse(br, &http.Request{Method: http.MethodPost})
				if err != nil {
					t.Fatalf("reading the answer while the body is paused: %v", err)
				}
				return resp, sendErr
			}},
		{name: "413 to a body the proxy buffers whole, the upstream resetting while it is written", code: http.StatusRequestEntityTooLarge,
			bodyBuffer: 1 << 20, mayKeep: true,
			// PUT is idempotent and the body replayable: only the answer being
			// taken for what it is keeps a reset from being retried.
			retry: &config.RetryPolicy{On: config.RetryReset | config.Retry5xx, NumRetries: 2},
			send: func(t *testing.T, c net.Conn, br *bufio.Reader) (*http.Response, error) {
				msg := append([]byte(postHead("PUT", 1<<20, "")), bytes.Repeat([]byte("b"), 1<<20)...)
				_, sendErr := c.Write(msg)
				resp, err := http.ReadResponse(br, &http.Request{Method: http.MethodPut})
				if err != nil {
					t.Fatalf("reading the answer: %v (sending: %v)", err, sendErr)
				}
				return resp, sendErr
			}},
	}
	for _, p := range paths {
		t.Run(p.name, func(t *testing.T) {
			for _, tc := range tests {
				t.Run(tc.name, func(t *testing.T) {
					leaks := goleak.IgnoreCurrent()
					t.Cleanup(func() { goleak.VerifyNone(t, leaks) }) // runs last
					up := newRefuser(t, tc.code)
					rec := &testRecorder{}
					o := proxyOpts{endpoints: []string{up.addr()}, rec: rec, netHTTPOnly: p.netHTTPOnly, bodyBuffer: tc.bodyBuffer, retry: tc.retry}
					if tc.smallBuffers {
						o.rcvBuf = 64 << 10
					}
					addr, _ := startProxy(t, o)
					c, br := dialProxy(t, addr)
					if tc.smallBuffers {
						c, br = dialSmall(t, addr, 64<<10)
					}

					resp, sendErr := tc.send(t, c, br)
					body, err := io.ReadAll(resp.Body)
					if err != nil {
						t.Fatalf("reading the answer's body: %v", err)
					}
					if want := http.StatusText(tc.code) + "\n"; resp.StatusCode != tc.code || string(body) != want {
						t.Fatalf("got %d %q (%s %q), want the upstream's %d %q", resp.StatusCode, body,
							ReasonHeader, resp.Header.Get(ReasonHeader), tc.code, want)
					}
					if sendErr != nil {
						t.Errorf("sending the body failed: %v (the proxy reset the connection)", sendErr)
					}
					if n := up.heads.Load(); n != 1 {
						t.Errorf("the upstream saw %d requests, want 1", n)
					}
					if retries, _ := rec.counts(); retries != 0 {
						t.Errorf("%d retries, want none: the upstream answered", retries)
					}
					waitFor(t, "the request's record", func() bool { return len(rec.requests()) == 1 })
					if r := rec.requests()[0]; r.Code != tc.code || r.Reason != "" {
						t.Errorf("recorded %d %q, want %d (the upstream's answer, relayed)", r.Code, r.Reason, tc.code)
					}
					if !resp.Close && !tc.mayKeep {
						t.Errorf("answer without Connection: close although the body was not all read")
					}
					if resp.Close {
						expectFIN(t, br)
					}
				})
			}
		})
	}
}

// TestLocalAnswerBeforeBody: a request the proxy fails itself (no route)
// before reading its large body: the client, blocked sending that body,
// gets the 404 and a FIN, not a reset, on both wires.
func TestLocalAnswerBeforeBody(t *testing.T) {
	const big = 8 << 20
	for _, p := range paths {
		t.Run(p.name, func(t *testing.T) {
			leaks := goleak.IgnoreCurrent()
			t.Cleanup(func() { goleak.VerifyNone(t, leaks) })
			addr, _ := startProxy(t, proxyOpts{netHTTPOnly: p.netHTTPOnly, rcvBuf: 64 << 10})
			c, br := dialSmall(t, addr, 64<<10)
			head := fmt.Sprintf("POST /upload HTTP/1.1\r\nHost: no-routes.internal\r\nContent-Length: %d\r\n\r\n", big)
			_, sendErr := c.Write(append([]byte(head), bytes.Repeat([]byte("n"), big)...))
			resp, body := readResp(t, br, http.MethodPost)
			if resp.StatusCode != http.StatusNotFound || resp.Header.Get(ReasonHeader) != string(xds.ReasonNoRoute) || body != string(xds.ReasonNoRoute)+"\n" {
				t.Fatalf("got %d %s=%q %q, want 404 %s", resp.StatusCode, ReasonHeader, resp.Header.Get(ReasonHeader), body, xds.ReasonNoRoute)
			}
			if sendErr != nil {
				t.Errorf("sending the body failed: %v (the proxy reset the connection)", sendErr)
			}
			if !resp.Close {
				t.Errorf("answer without Connection: close although the body was not read")
			}
			expectFIN(t, br)
		})
	}
}

// TestLingerBounds: a lingering close ends: after the chain's
// DelayedCloseTimeout for a client that keeps sending slowly after the
// answer, after lingerMaxBytes for one that floods (the timeout set far
// off), and not at all when DelayedCloseTimeout is 0, on both wires.
func TestLingerBounds(t *testing.T) {
	tests := []struct {
		name         string
		delayedClose time.Duration // proxyOpts.delayedClose (negative: 0)
		expect       bool          // Expect: 100-continue (net/http closes without its own wait)
		flood        bool          // 64 KiB writes back to back, else 1 KiB every 10 ms
		// check gets the times the request was sent, the answer read and the
		// client's first failing write, and the bytes sent after the answer.
		check func(t *testing.T, sent, answered, failed time.Time, after int64)
	}{
		{name: "DelayedCloseTimeout ends a slow sender's linger", delayedClose: 300 * time.Millisecond,
			check: func(t *testing.T, sent, answered, failed time.Time, _ int64) {
				// The proxy half-closed after the request arrived and read for
				// 300 ms: no write of the client can fail sooner.
				if held := failed.Sub(sent); held < 300*time.Millisecond {
					t.Errorf("the connection was reset %v after the request, before the 300 ms linger ended", held)
				}
				// Then it closes: 300 ms, plus net/http's own 500 ms wait,
				// plus a scheduling margin.
				if d := failed.Sub(answered); d > 3*time.Second {
					t.Errorf("the connection was still read %v after the answer, want it closed after ~300 ms", d)
				}
			}},
		{name: "lingerMaxBytes ends a flood", delayedClose: time.Minute, expect: true, flood: true,
			check: func(t *testing.T, _, answered, failed time.Time, after int64) {
				if after < lingerMaxBytes {
					t.Errorf("the client sent %d bytes after the answer before its connection failed, want the %d the proxy reads first",
						after, lingerMaxBytes)
				}
				if d := failed.Sub(answered); d > 10*time.Second {
					t.Errorf("the connection was still read %v after the answer: lingerMaxBytes did not end the linger", d)
				}
			}},
		{name: "0 closes at once", delayedClose: -1, expect: true,
			check: func(t *testing.T, _, answered, failed time.Time, _ int64) {
				// A linger of the default 1 s would hold it open that long.
				if d := failed.Sub(answered); d >= config.DefaultDelayedCloseTimeout {
					t.Errorf("the connection was still open %v after the answer, want it closed at once", d)
				}
			}},
	}
	for _, p := range paths {
		t.Run(p.name, func(t *testing.T) {
			for _, tc := range tests {
				t.Run(tc.name, func(t *testing.T) {
					leaks := goleak.IgnoreCurrent()
					t.Cleanup(func() { goleak.VerifyNone(t, leaks) })
					up := newRefuser(t, http.StatusRequestEntityTooLarge)
					addr, _ := startProxy(t, proxyOpts{endpoints: []string{up.addr()}, netHTTPOnly: p.netHTTPOnly, delayedClose: tc.delayedClose})
					c, br := dialProxy(t, addr)
					_ = c.SetDeadline(time.Now().Add(20 * time.Second))
					extra := ""
					if tc.expect {
						extra = "Expect: 100-continue\r\n"
					}
					sent := time.Now()
					write(t, c, postHead("POST", 1<<40, extra))
					resp, err := http.ReadResponse(br, &http.Request{Method: http.MethodPost})
					if err == nil && resp.StatusCode == http.StatusContinue {
						resp, err = http.ReadResponse(br, &http.Request{Method: http.MethodPost})
					}
					if err != nil {
						t.Fatalf("reading the answer: %v", err)
					}
					if _, err := io.ReadAll(resp.Body); err != nil || resp.StatusCode != http.StatusRequestEntityTooLarge {
						t.Fatalf("got %d (%v), want 413", resp.StatusCode, err)
					}
					answered := time.Now()
					// A client that ignores the answer and goes on sending, until
					// the proxy's close makes a write fail.
					chunk := make([]byte, 1<<10)
					if tc.flood {
						chunk = make([]byte, 64<<10)
					}
					var after int64
					for {
						n, err := c.Write(chunk)
						after += int64(n)
						if err != nil {
							var ne net.Error
							if errors.As(err, &ne) && ne.Timeout() {
								t.Fatalf("the proxy still read after %v (%d bytes)", time.Since(answered), after)
							}
							break
						}
						if !tc.flood {
							time.Sleep(10 * time.Millisecond) // the scenario: a slow sender
						}
					}
					tc.check(t, sent, answered, time.Now(), after)
				})
			}
		})
	}
}

// TestFastPathLingersOverPipelinedBytes: on the fast path, a response
// framed by the upstream's close (the connection must close after it)
// while the client already sent its next request: the proxy closes
// lingering, so the response arrives whole and ends with a FIN, not a
// reset over the unread request that would throw its tail away.
func TestFastPathLingersOverPipelinedBytes(t *testing.T) {
	leaks := goleak.IgnoreCurrent()
	t.Cleanup(func() { goleak.VerifyNone(t, leaks) })
	const size = 1 << 20
	payload := bytes.Repeat([]byte("c"), size)
	arrived := make(chan struct{}, 1)
	up := newRawUpstream(t, func(c net.Conn, br *bufio.Reader) {
		if _, err := http.ReadRequest(br); err != nil {
			return
		}
		arrived <- struct{}{}
		io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n") // no length: until close
		c.Write(payload)
	})
	rec := &testRecorder{}
	addr, _ := startProxy(t, proxyOpts{endpoints: []string{up.addr()}, rec: rec, delayedClose: 300 * time.Millisecond})
	c, br := dialProxy(t, addr)
	write(t, c, "GET /until-close HTTP/1.1\r\nHost: api.internal\r\n\r\n")
	awaitUpstream(t, arrived)
	// The next request, which the proxy will not read: it answers the first
	// with Connection: close.
	write(t, c, "GET /next HTTP/1.1\r\nHost: api.internal\r\n\r\n")
	// The client reads only once the proxy has closed the connection.
	waitFor(t, "the proxy to close the connection", func() bool {
		open, opened := rec.conns()
		return opened == 1 && open == 0
	})
	resp, err := http.ReadResponse(br, &http.Request{Method: http.MethodGet})
	if err != nil {
		t.Fatalf("reading the response: %v", err)
	}
	body, err := io.ReadAll(resp.Body)
	if err != nil || len(body) != size || !resp.Close {
		t.Fatalf("read %d of %d bytes (Connection: close %v), then %v; want all of them and a FIN", len(body), size, resp.Close, err)
	}
}
