package httpproxy

import (
	"bytes"
	"strings"
)

// HTTP/1.1 message heads for the fast path (h1fast.go): parsed in place in
// the connection's buffer, strictly. Anything the fast path does not handle
// the way net/http would (obs-fold, bare LF, absolute-form or encoded
// targets, HTTP/1.0, duplicated framing headers, Upgrade, Expect,
// Transfer-Encoding on requests, too many fields) makes parseRequest say
// so, and the connection goes to net/http, which answers it (including its
// 400s and 431s).

// maxFastFields bounds the header fields of a request the fast path takes.
const maxFastFields = 128

// field is one header field of a head, as it is on the wire (name case
// kept), its value without surrounding whitespace.
type field struct {
	name, value []byte
	drop        bool // not forwarded: hop-by-hop, or replaced by the proxy
}

// reqHead is a parsed request head. Its slices point into the buffer it
// was parsed from and are valid while that buffer is not reused.
type reqHead struct {
	method, target []byte
	path           []byte // target without the query
	fields         []field
	host           []byte
	// contentLength is the body length, 0 when the request has none.
	contentLength  int64
	closeConn      bool // Connection: close
	teTrailers     bool // TE: trailers (kept end to end, for gRPC-style apps)
	xfp            bool // X-Forwarded-Proto present (kept)
	idempotencyKey bool // an Idempotency-Key field with a value
	// contentType and grpcTimeout are the values of those fields (nil:
	// absent), for a gRPC request's failure answers.
	contentType, grpcTimeout []byte
	// size is the length of the head, blank line included.
	size int
}

// parseResult says what parseRequest made of a buffer.
type parseResult int

const (
	parseNeedMore parseResult = iota // no blank line yet: read more
	parseOK
	parseFallback // not for the fast path: hand the connection to net/http
)

// tchar reports RFC 9110 token characters.
var tchar = func() (t [256]bool) {
	for c := '0'; c <= '9'; c++ {
		t[c] = true
	}
	for c := 'a'; c <= 'z'; c++ {
		t[c] = true
		t[c-'a'+'A'] = true
	}
	for _, c := range "!#$%&'*+-.^_`|~" {
		t[c] = true
	}
	return t
}()

// lastTokenIs reports whether the last item of the comma-separated list v
// is token (lower case), ignoring case and whitespace.
func lastTokenIs(v []byte, token string) bool {
	if i := bytes.LastIndexByte(v, ','); i >= 0 {
		v = v[i+1:]
	}
	return eqLower(bytes.TrimSpace(v), token)
}

// bothFramings reports whether the request head at the start of b (whole
// or not) has both a Content-Length and a Transfer-Encoding field.
func bothFramings(b []byte) bool {
	i := bytes.IndexByte(b, '\n')
	if i < 0 {
		return false
	}
	b = b[i+1:]
	cl, te := false, false
	for {
		name, _, n, res := nextField(b)
		if res != parseOK || name == nil {
			return false
		}
		b = b[n:]
		cl = cl || eqLower(name, "content-length")
		te = te || eqLower(name, "transfer-encoding")
		if cl && te {
			return true
		}
	}
}

// parseLength parses a Content-Length value: 1DIGIT (RFC 9110 §8.6), no
// sign, at most 18 digits.
func parseLength(v []byte) (int64, bool) {
	if len(v) == 0 || len(v) > 18 {
		return 0, false
	}
	var n int64
	for _, c := range v {
		if c < '0' || c > '9' {
			return 0, false
		}
		n = n*10 + int64(c-'0')
	}
	return n, true
}

// trimOWS trims spaces and tabs.
func trimOWS(b []byte) []byte {
	for len(b) > 0 && (b[0] == ' ' || b[0] == '\t') {
		b = b[1:]
	}
	for len(b) > 0 && (b[len(b)-1] == ' ' || b[len(b)-1] == '\t') {
		b = b[:len(b)-1]
	}
	return b
}

// validValue reports field-value bytes net/http accepts without question:
// visible characters, spaces and tabs, obs-text.
func validValue(v []byte) bool {
	for _, c := range v {
		if (c < 0x20 && c != '\t') || c == 0x7f {
			return false
		}
	}
	return true
}

// nextField reads the header field line at the start of b: its name and
// value (trimmed) and the length of the line with its CRLF. At the blank
// line that ends a head, name is nil. parseNeedMore when the line is not
// whole yet; parseFallback for a bare LF, an obs-fold, a line without a
// colon, a name that is not a token or a value with control characters.
func nextField(b []byte) (name, value []byte, n int, res parseResult) {
	i := bytes.IndexByte(b, '\n')
	if i < 0 {
		return nil, nil, 0, parseNeedMore
	}
	if i == 0 || b[i-1] != '\r' {
		return nil, nil, 0, parseFallback // bare LF
	}
	line := b[:i-1]
	if len(line) == 0 {
		return nil, nil, i + 1, parseOK
	}
	if line[0] == ' ' || line[0] == '\t' {
		return nil, nil, 0, parseFallback // obs-fold
	}
	colon := bytes.IndexByte(line, ':')
	if colon <= 0 {
		return nil, nil, 0, parseFallback
	}
	name = line[:colon]
	for _, c := range name {
		if !tchar[c] {
			return nil, nil, 0, parseFallback
		}
	}
	value = trimOWS(line[colon+1:])
	if !validValue(value) {
		return nil, nil, 0, parseFallback
	}
	return name, value, i + 1, parseOK
}

// parseRequest parses the request head at the start of b into h.
func (h *reqHead) parseRequest(b []byte) parseResult {
	*h = reqHead{fields: h.fields[:0], contentLength: 0}
	// Request line.
	i := bytes.IndexByte(b, '\n')
	if i < 0 {
		if len(b) > 0 && !tchar[b[0]] {
			return parseFallback // not a request line: net/http answers
		}
		return parseNeedMore
	}
	if i == 0 || b[i-1] != '\r' {
		return parseFallback
	}
	line := b[:i-1]
	rest := b[i+1:]
	off := i + 1
	sp := bytes.IndexByte(line, ' ')
	if sp <= 0 {
		return parseFallback
	}
	h.method = line[:sp]
	for _, c := range h.method {
		if !tchar[c] {
			return parseFallback
		}
	}
	line = line[sp+1:]
	sp = bytes.IndexByte(line, ' ')
	if sp <= 0 || string(line[sp+1:]) != "HTTP/1.1" {
		return parseFallback // HTTP/1.0, HTTP/2 preface, malformed
	}
	h.target = line[:sp]
	if h.target[0] != '/' {
		return parseFallback // absolute-form, asterisk-form
	}
	for _, c := range h.target {
		if c <= ' ' || c == 0x7f || c == '%' || c == '#' {
			// '%': net/http routes on the decoded path; keep one behaviour.
			return parseFallback
		}
	}
	h.path = h.target
	if q := bytes.IndexByte(h.target, '?'); q >= 0 {
		h.path = h.target[:q]
	}

	// Fields, up to the blank line.
	hosts, lengths := 0, 0
	var connection [4][]byte
	nconn := 0
	for {
		name, value, n, res := nextField(rest)
		if res != parseOK {
			return res
		}
		rest = rest[n:]
		off += n
		if name == nil {
			break // the blank line
		}
		if len(h.fields) == maxFastFields {
			return parseFallback
		}
		f := field{name: name, value: value, drop: hopByHop(name)}
		switch len(name) {
		case 2:
			if eqLower(name, "te") {
				h.teTrailers = h.teTrailers || hasToken(value, "trailers")
			}
		case 4:
			if eqLower(name, "host") {
				hosts++
				h.host = value
			}
		case 6:
			if eqLower(name, "expect") {
				return parseFallback
			}
		case 7:
			if eqLower(name, "upgrade") {
				return parseFallback // an upgrade (WebSocket) or h2c
			}
		case 10:
			if eqLower(name, "connection") {
				if nconn == len(connection) {
					return parseFallback
				}
				connection[nconn] = value
				nconn++
			}
		case 12:
			switch {
			case eqLower(name, "content-type"):
				if h.contentType == nil {
					h.contentType = value
				}
			case eqLower(name, "grpc-timeout"):
				h.grpcTimeout = value
			}
		case 14:
			if eqLower(name, "content-length") {
				lengths++
				n, ok := parseLength(value)
				if !ok {
					return parseFallback
				}
				h.contentLength = n
			}
		case 15:
			if eqLower(name, "idempotency-key") {
				h.idempotencyKey = h.idempotencyKey || len(value) > 0
			}
		case 17:
			if eqLower(name, "transfer-encoding") {
				return parseFallback // chunked request bodies go to net/http
			} else if eqLower(name, "x-forwarded-proto") {
				h.xfp = true
			}
		case 23:
			if eqLower(name, "x-forwarded-client-cert") {
				f.drop = true // never trust the downstream's (SANITIZE, SANITIZE_SET)
			}
		}
		h.fields = append(h.fields, f)
	}
	if hosts != 1 || lengths > 1 {
		return parseFallback // net/http answers 400
	}
	if nconn > 0 {
		lists := connection[:nconn]
		h.closeConn, _ = connectionOptions(lists, h.fields)
		for _, v := range lists {
			if hasToken(v, "te") {
				h.teTrailers = false // TE named in Connection goes entirely
			}
		}
		if h.xfp { // it stays only if Connection did not name it
			h.xfp = false
			for k := range h.fields {
				if f := &h.fields[k]; !f.drop && eqLower(f.name, "x-forwarded-proto") {
					h.xfp = true
				}
			}
		}
	}
	h.size = off
	return parseOK
}

// lookup implements headerLookup (routes' header matches, hash policy).
func (h *reqHead) lookup(name string) (string, bool) {
	for i := range h.fields {
		if f := &h.fields[i]; bytes.EqualFold(f.name, []byte(name)) {
			return string(f.value), true
		}
	}
	return "", false
}

// Values implements config.HeaderValues (RBAC header permissions). The
// downstream's x-forwarded-client-cert is never seen: it is not trusted
// (the net/http path deletes it before RBAC too).
func (h *reqHead) Values(name string) []string {
	if strings.EqualFold(name, "x-forwarded-client-cert") {
		return nil
	}
	var vs []string
	for i := range h.fields {
		if f := &h.fields[i]; bytes.EqualFold(f.name, []byte(name)) {
			vs = append(vs, string(f.value))
		}
	}
	return vs
}

// respHead is a parsed response head (status line and the fields that
// matter to the proxy).
type respHead struct {
	code  int
	minor int    // HTTP/1.minor
	rest  []byte // status line after the version: "200 OK"
	// Framing: contentLength >= 0, or chunked, or neither (read until the
	// upstream closes).
	contentLength int64
	chunked       bool
	closeConn     bool // the upstream will close the connection after it
	reason        []byte
	grpcStatus    []byte
	eventStream   bool // Content-Type: text/event-stream
	fields        []field
	size          int
}

// parseResponse parses the response head at the start of b into h.
func (h *respHead) parseResponse(b []byte) parseResult {
	*h = respHead{fields: h.fields[:0], contentLength: -1}
	i := bytes.IndexByte(b, '\n')
	if i < 0 {
		return parseNeedMore
	}
	if i < 13 || b[i-1] != '\r' {
		return parseFallback
	}
	line := b[:i-1]
	rest := b[i+1:]
	off := i + 1
	switch string(line[:9]) {
	case "HTTP/1.1 ":
		h.minor = 1
	case "HTTP/1.0 ":
	default:
		return parseFallback
	}
	h.rest = line[9:]
	c := h.rest
	if len(c) < 3 || (len(c) > 3 && c[3] != ' ') {
		return parseFallback
	}
	for _, d := range c[:3] {
		if d < '0' || d > '9' {
			return parseFallback
		}
	}
	h.code = int(c[0]-'0')*100 + int(c[1]-'0')*10 + int(c[2]-'0')
	if h.code < 100 {
		return parseFallback // not a status code (RFC 9110 §15: 100-599, 3 digits)
	}
	lengths := 0
	var connection [4][]byte
	nconn := 0
	trailer := false
	for {
		name, value, n, res := nextField(rest)
		if res != parseOK {
			return res
		}
		rest = rest[n:]
		off += n
		if name == nil {
			break // the blank line
		}
		if len(h.fields) == maxFastFields {
			return parseFallback
		}
		f := field{name: name, value: value, drop: hopByHop(name)}
		switch len(name) {
		case 7:
			if eqLower(name, "trailer") {
				trailer = true
			}
		case 10:
			if eqLower(name, "connection") {
				if nconn == len(connection) {
					return parseFallback
				}
				connection[nconn] = value
				nconn++
			}
		case 11:
			if eqLower(name, "grpc-status") {
				h.grpcStatus = value
			}
		case 12:
			if eqLower(name, "content-type") {
				h.eventStream = len(value) >= 17 && eqLower(value[:17], "text/event-stream")
			}
		case 14:
			if eqLower(name, "content-length") {
				n, ok := parseLength(value)
				if !ok || (lengths > 0 && n != h.contentLength) {
					return parseFallback
				}
				if lengths > 0 {
					f.drop = true // an identical duplicate
				}
				lengths++
				h.contentLength = n
			}
		case 16:
			if eqLower(name, "x-meshlet-reason") {
				h.reason = value
			}
		case 17:
			if eqLower(name, "transfer-encoding") {
				if len(value) == 0 {
					return parseFallback // an empty coding list frames nothing (RFC 9112 §6.1)
				}
				// A coding list ending in chunked is passed through as is
				// (chunk framing relayed, the field kept); without a final
				// chunked the body runs until the upstream closes (RFC 9112
				// §6.3).
				if h.minor == 1 && lastTokenIs(value, "chunked") {
					h.chunked = true
					f.drop = false // the chunk framing is relayed as is
				} else {
					h.closeConn = true
				}
			}
		}
		h.fields = append(h.fields, f)
	}
	if trailer && h.chunked {
		// The trailer section is relayed with the chunks: its announcement
		// stays (net/http announces the trailers it relays too).
		for k := range h.fields {
			if eqLower(h.fields[k].name, "trailer") {
				h.fields[k].drop = false
			}
		}
	}
	closeOpt, keepAlive := connectionOptions(connection[:nconn], h.fields)
	h.closeConn = h.closeConn || closeOpt
	if h.chunked && lengths > 0 {
		// RFC 9112 §6.3: Transfer-Encoding wins; Content-Length goes.
		h.contentLength = -1
		for k := range h.fields {
			if eqLower(h.fields[k].name, "content-length") {
				h.fields[k].drop = true
			}
		}
	}
	if h.minor == 0 && !keepAlive {
		h.closeConn = true
	}
	h.size = off
	return parseOK
}

// bodyless reports a response that has no body whatever its fields say
// (RFC 9112 §6.3): to HEAD, 1xx, 204, 304.
func (h *respHead) bodyless(method []byte) bool {
	return string(method) == "HEAD" || h.code < 200 || h.code == 204 || h.code == 304
}
