package httpproxy

import "net/http"

// Hop-by-hop header fields, for both wires: the fast path marks them
// dropped as it parses a head (h1head.go: hopByHop, connectionOptions),
// net/http's wire deletes them from an http.Header (removeHopByHop); both
// ask the same questions here. The fields are the connection-specific
// ones of RFC 9110 §7.6.1 (Connection, Proxy-Connection, Keep-Alive, TE,
// Transfer-Encoding, Upgrade) plus Trailer and the proxy authentication
// fields (Proxy-Authenticate, Proxy-Authorization), and those a
// Connection field names, except the framing and authority fields
// (framingField), whose loss would unframe the message. Exceptions kept
// end to end: "TE: trailers" on requests (gRPC needs it), and on the fast
// path a response's chunked Transfer-Encoding and its Trailer field,
// relayed with the chunks as they are.

// hopByHop reports whether a field name (any case) is hop-by-hop.
func hopByHop[S ~string | ~[]byte](name S) bool {
	switch len(name) {
	case 2:
		return eqLower(name, "te")
	case 7:
		return eqLower(name, "upgrade") || eqLower(name, "trailer")
	case 10:
		return eqLower(name, "connection") || eqLower(name, "keep-alive")
	case 16:
		return eqLower(name, "proxy-connection")
	case 17:
		return eqLower(name, "transfer-encoding")
	case 18:
		return eqLower(name, "proxy-authenticate")
	case 19:
		return eqLower(name, "proxy-authorization")
	}
	return false
}

// framingField reports the fields a Connection option may not remove:
// Content-Length, Transfer-Encoding and Host (any case).
func framingField[S ~string | ~[]byte](name S) bool {
	return eqLower(name, "content-length") || eqLower(name, "transfer-encoding") || eqLower(name, "host")
}

// connectionOptions applies a head's Connection field lists (RFC 9110
// §7.6.1): every field they name is dropped but the framing ones, and the
// close and keep-alive options are reported.
func connectionOptions(lists [][]byte, fields []field) (closeConn, keepAlive bool) {
	for _, v := range lists {
		for len(v) > 0 {
			var tok []byte
			tok, v = nextToken(v)
			switch {
			case len(tok) == 0, framingField(tok):
			case eqLower(tok, "close"):
				closeConn = true
			case eqLower(tok, "keep-alive"):
				keepAlive = true
			default:
				for k := range fields {
					if eqFold(fields[k].name, tok) {
						fields[k].drop = true
					}
				}
			}
		}
	}
	return closeConn, keepAlive
}

// removeHopByHop deletes h's hop-by-hop fields and those its Connection
// fields name (but the framing ones). On requests, "TE: trailers" is kept.
func removeHopByHop(h http.Header, request bool) {
	for _, c := range h["Connection"] {
		for v := c; len(v) > 0; {
			var tok string
			tok, v = nextToken(v)
			if len(tok) > 0 && !framingField(tok) {
				h.Del(tok)
			}
		}
	}
	trailers := false
	if request {
		for _, v := range h["Te"] {
			trailers = trailers || hasToken(v, "trailers")
		}
	}
	for k := range h {
		if hopByHop(k) {
			delete(h, k)
		}
	}
	if trailers {
		h["Te"] = []string{"trailers"}
	}
}

// eqLower reports whether b equals the lower-case ASCII s, ignoring case.
func eqLower[S ~string | ~[]byte](b S, s string) bool {
	if len(b) != len(s) {
		return false
	}
	for i := 0; i < len(b); i++ {
		c := b[i]
		if 'A' <= c && c <= 'Z' {
			c += 'a' - 'A'
		}
		if c != s[i] {
			return false
		}
	}
	return true
}

// eqFold reports whether a and b are equal, ignoring ASCII case.
func eqFold(a, b []byte) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		x, y := a[i], b[i]
		if 'A' <= x && x <= 'Z' {
			x += 'a' - 'A'
		}
		if 'A' <= y && y <= 'Z' {
			y += 'a' - 'A'
		}
		if x != y {
			return false
		}
	}
	return true
}

// nextToken splits the first item off the comma-separated list v,
// trimmed of spaces and tabs (possibly empty), and returns the rest.
func nextToken[S ~string | ~[]byte](v S) (tok, rest S) {
	for i := 0; i < len(v); i++ {
		if v[i] == ',' {
			return trimSpace(v[:i]), v[i+1:]
		}
	}
	return trimSpace(v), v[len(v):]
}

// hasToken reports whether the comma-separated list v holds token (lower
// case), ignoring case and whitespace.
func hasToken[S ~string | ~[]byte](v S, token string) bool {
	for len(v) > 0 {
		var item S
		item, v = nextToken(v)
		if eqLower(item, token) {
			return true
		}
	}
	return false
}

// trimSpace trims ASCII whitespace.
func trimSpace[S ~string | ~[]byte](b S) S {
	for len(b) > 0 && isSpace(b[0]) {
		b = b[1:]
	}
	for len(b) > 0 && isSpace(b[len(b)-1]) {
		b = b[:len(b)-1]
	}
	return b
}

func isSpace(c byte) bool {
	return c == ' ' || c == '\t' || c == '\r' || c == '\n' || c == '\v' || c == '\f'
}
