package httpproxy

import (
	"bufio"
	"bytes"
	"net/http"
	"strconv"
	"strings"
	"testing"
)

// The HTTP/1.1 head parsers of the fast path, fuzzed with net/http as the
// oracle: a head the fast path takes (parseOK) must be one net/http reads
// the same way — method, target, Host, body length, Connection: close —
// so that no request is framed differently on the two wires (request
// smuggling needs exactly such a disagreement). Anything else the fast
// path must leave to net/http (parseFallback) or wait for (parseNeedMore);
// it must never panic. `go test` runs the seeds below and those in
// testdata/fuzz; `make fuzz` explores for a bounded time.

var requestSeeds = []string{
	"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
	"POST /x?q=1 HTTP/1.1\r\nHost: api.internal\r\nContent-Length: 5\r\n\r\nhello",
	"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
	"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
	"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
	"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\n\r\n",
	"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
	"GET / HTTP/1.1\r\nHost : a\r\n\r\n",
	"GET / HTTP/1.1\nHost: a\n\n",
	"GET / HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n",
	"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n",
	"GET http://evil/ HTTP/1.1\r\nHost: a\r\n\r\n",
	"GET /\r\n\r\n",
	"GET / HTTP/1.0\r\n\r\n",
	"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, identity\r\n\r\n",
	"GET / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\nx",
}

func FuzzParseRequest(f *testing.F) {
	for _, s := range requestSeeds {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		var h reqHead
		res := h.parseRequest(b)
		if res != parseOK {
			return
		}
		if h.size <= 0 || h.size > len(b) {
			t.Fatalf("head size %d of %d bytes", h.size, len(b))
		}
		req, err := http.ReadRequest(bufio.NewReader(bytes.NewReader(b[:h.size])))
		if err != nil {
			t.Fatalf("the fast path took a head net/http refuses (%v): %q", err, b[:h.size])
		}
		if req.Method != string(h.method) || req.RequestURI != string(h.target) || req.Host != string(h.host) {
			t.Fatalf("fast path %q %q host %q; net/http %q %q host %q", h.method, h.target, h.host, req.Method, req.RequestURI, req.Host)
		}
		if want := max(req.ContentLength, 0); want != h.contentLength || len(req.TransferEncoding) > 0 {
			t.Fatalf("fast path body length %d; net/http %d (transfer-encoding %v)", h.contentLength, req.ContentLength, req.TransferEncoding)
		}
		if req.Close != h.closeConn {
			t.Fatalf("fast path Connection: close %v; net/http %v", h.closeConn, req.Close)
		}
	})
}

var responseSeeds = []string{
	"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
	"HTTP/1.1 204 No Content\r\n\r\n",
	"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
	"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n",
	"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nbody until close",
	"HTTP/1.0 200 OK\r\n\r\n",
	"HTTP/1.1 999 Odd\r\n\r\n",
	"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n",
	"HTTP/1.1 503 Service Unavailable\r\nX-Meshlet-Reason: overflow\r\nContent-Length: 0\r\n\r\n",
}

func FuzzParseResponse(f *testing.F) {
	for _, s := range responseSeeds {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		var h respHead
		if h.parseResponse(b) != parseOK {
			return
		}
		if h.size <= 0 || h.size > len(b) {
			t.Fatalf("head size %d of %d bytes", h.size, len(b))
		}
		resp, err := http.ReadResponse(bufio.NewReader(bytes.NewReader(b[:h.size])), &http.Request{Method: http.MethodGet})
		if err != nil && strings.Contains(err.Error(), "unsupported transfer encoding") && !h.chunked && h.closeConn {
			// A coding list not ending in chunked: the body runs until the
			// upstream closes (RFC 9112 §6.3), which net/http does not
			// implement for responses and the fast path does.
			return
		}
		if err != nil {
			t.Fatalf("the fast path took a response head net/http refuses (%v): %q", err, b[:h.size])
		}
		if resp.StatusCode != h.code {
			t.Fatalf("fast path status %d; net/http %d", h.code, resp.StatusCode)
		}
		chunked := len(resp.TransferEncoding) > 0 && resp.TransferEncoding[0] == "chunked"
		if chunked != h.chunked {
			t.Fatalf("fast path chunked %v; net/http transfer-encoding %v", h.chunked, resp.TransferEncoding)
		}
		if !h.chunked && resp.ContentLength != h.contentLength && bodyAllowed(h.code) {
			t.Fatalf("fast path content length %d; net/http %s", h.contentLength, strconv.FormatInt(resp.ContentLength, 10))
		}
	})
}

// bodyAllowed reports a status whose response may carry a body (RFC 9110:
// not 1xx, 204, 304).
func bodyAllowed(code int) bool { return code >= 200 && code != 204 && code != 304 }
