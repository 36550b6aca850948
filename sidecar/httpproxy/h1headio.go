package httpproxy

import (
	"bufio"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"strings"

	"github.com/meshlet/meshlet/sidecar/tracing"
)

// Reading response heads off an upstream connection for the fast path,
// and the parsed request head as a trace carrier and span description.

// describe gives the request's head to its span when it is sampled.
func (fc *fastConn) describe() tracing.Head {
	h := &fc.head
	hd := tracing.Head{Method: methodName(h.method), Path: string(h.path), Host: string(h.host), Proto: "1.1",
		RemoteAddr: fc.conn.RemoteAddr().String()}
	hd.UserAgent, _ = h.lookup("User-Agent")
	hd.ContentType, _ = h.lookup("Content-Type")
	return hd
}

// methodName returns the method as a string, without allocating for the
// common ones.
func methodName(m []byte) string {
	switch string(m) {
	case http.MethodGet:
		return http.MethodGet
	case http.MethodPost:
		return http.MethodPost
	case http.MethodPut:
		return http.MethodPut
	case http.MethodDelete:
		return http.MethodDelete
	case http.MethodHead:
		return http.MethodHead
	case http.MethodPatch:
		return http.MethodPatch
	case http.MethodOptions:
		return http.MethodOptions
	}
	return string(m)
}

// isField reports whether name is one of names (lower case), ignoring case.
func isField(name []byte, names []string) bool {
	for _, n := range names {
		if eqLower(name, n) {
			return true
		}
	}
	return false
}

// reqCarrier reads a parsed request head's fields for trace propagation.
type reqCarrier struct{ h *reqHead }

func (c reqCarrier) Get(key string) string {
	v, _ := c.h.lookup(key)
	return v
}

func (c reqCarrier) Set(string, string) {}

func (c reqCarrier) Keys() []string {
	keys := make([]string, 0, len(c.h.fields))
	for i := range c.h.fields {
		keys = append(keys, string(c.h.fields[i].name))
	}
	return keys
}

// outCarrier appends the fields a propagator sets to a request head.
type outCarrier struct{ b *[]byte }

func (c outCarrier) Get(string) string { return "" }

func (c outCarrier) Set(key, value string) {
	b := append(*c.b, key...)
	b = append(b, ": "...)
	b = append(b, value...)
	*c.b = append(b, "\r\n"...)
}

func (c outCarrier) Keys() []string { return nil }

var errResponseHead = errors.New("httpproxy: malformed or oversized response head")

// readResponseHead reads the final response head from br into rh,
// skipping interim 1xx responses; rh's slices point into br's buffer until
// the next read. rh.size is 0 when nothing of a response arrived.
func readResponseHead(br *bufio.Reader, rh *respHead) error {
	rh.size = 0
	skipped := 0
	for {
		n := br.Buffered()
		if n == 0 {
			if _, err := br.Peek(1); err != nil {
				if skipped > 0 {
					rh.size = skipped
				}
				return err
			}
			continue
		}
		b, _ := br.Peek(n)
		switch rh.parseResponse(b) {
		case parseOK:
			if rh.code >= 100 && rh.code < 200 {
				if rh.code == http.StatusSwitchingProtocols {
					return errResponseHead // no upgrade was asked for
				}
				skipped += rh.size
				_, _ = br.Discard(rh.size)
				continue
			}
			return nil
		case parseFallback:
			// More fields than the in-place parser takes, or an irregular
			// head: net/http's reader decides, as on the other path.
			rh.size = 1
			return readResponseHeadStd(br, rh)
		}
		if n == br.Size() {
			rh.size = 1
			return readResponseHeadStd(br, rh) // a head larger than the buffer
		}
		if _, err := br.Peek(n + 1); err != nil {
			rh.size = 1 // part of a head arrived: not a stale connection
			return err
		}
	}
}

// readResponseHeadStd reads the final response head with net/http's
// reader (http.ReadResponse: lines of any length, up to its limits) for
// the heads the in-place parser does not take, and describes it in rh
// with fields of their own (rh.size 0: the head is consumed already), the
// framing fields written anew; br is left at the start of the body, which
// is relayed raw as for any other response.
func readResponseHeadStd(br *bufio.Reader, rh *respHead) error {
	for {
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			return fmt.Errorf("%w: %w", errResponseHead, err)
		}
		if resp.StatusCode == http.StatusSwitchingProtocols {
			return errResponseHead
		}
		if resp.StatusCode < 200 {
			continue
		}
		*rh = respHead{code: resp.StatusCode, minor: resp.ProtoMinor, contentLength: resp.ContentLength, closeConn: resp.Close,
			fields: rh.fields[:0]}
		rh.rest = fmt.Appendf(nil, "%03d %s", resp.StatusCode, strings.TrimPrefix(resp.Status, strconv.Itoa(resp.StatusCode)+" "))
		rh.chunked = len(resp.TransferEncoding) > 0 && resp.TransferEncoding[len(resp.TransferEncoding)-1] == "chunked"
		if len(resp.TransferEncoding) > 0 && !rh.chunked {
			rh.closeConn = true
		}
		h := resp.Header
		removeHopByHop(h, false)
		delete(h, "Content-Length")
		if rh.chunked {
			h["Transfer-Encoding"] = []string{"chunked"}
		} else if rh.contentLength >= 0 {
			h["Content-Length"] = []string{strconv.FormatInt(rh.contentLength, 10)}
		}
		if rh.chunked && len(resp.Trailer) > 0 {
			names := make([]string, 0, len(resp.Trailer))
			for k := range resp.Trailer {
				names = append(names, k)
			}
			h["Trailer"] = []string{strings.Join(names, ", ")}
		}
		rh.reason = []byte(h.Get(ReasonHeader))
		rh.grpcStatus = []byte(h.Get("Grpc-Status"))
		rh.eventStream = strings.HasPrefix(h.Get("Content-Type"), "text/event-stream")
		for k, vs := range h {
			for _, v := range vs {
				rh.fields = append(rh.fields, field{name: []byte(k), value: []byte(v)})
			}
		}
		return nil
	}
}
