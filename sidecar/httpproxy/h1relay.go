package httpproxy

import (
	"bufio"
	"errors"
	"io"
	"time"

	"github.com/meshlet/meshlet/sidecar/cluster"
)

// Relaying a response on the fast path: the head rewritten, the body
// (Content-Length, chunked or until close) copied as it comes.

// relay writes the response whose head is in fc.resp to the downstream and
// copies its body; it reports whether the downstream connection may carry
// another request.
func (fc *fastConn) relay(x *exchange, att *cluster.Attempt) bool {
	uc, routeDeadline := fc.uc, fc.routeDeadline
	fc.uc = cluster.H1Conn{}
	var perTry time.Duration
	if p := x.rt.Retry; p != nil {
		perTry = p.PerTry
	}
	reason := x.relayReason()
	rh := &fc.resp
	h := &fc.head
	x.code = rh.code
	if x.span != nil && len(rh.grpcStatus) > 0 {
		x.grpcStatus = string(rh.grpcStatus)
	}
	outcome := cluster.OutcomeForStatus(rh.code)
	bodyless := rh.bodyless(h.method)
	untilClose := !bodyless && rh.contentLength < 0 && !rh.chunked
	keep := !h.closeConn && !untilClose && !fc.s.closing()

	op := outPool.Get().(*[]byte)
	defer outPool.Put(op)
	out := append((*op)[:0], "HTTP/1.1 "...)
	out = append(out, rh.rest...)
	out = append(out, "\r\n"...)
	for i := range rh.fields {
		if f := &rh.fields[i]; !f.drop && (reason == "" || !eqLower(f.name, "x-meshlet-reason")) {
			out = append(out, f.name...)
			out = append(out, ": "...)
			out = append(out, f.value...)
			out = append(out, "\r\n"...)
		}
	}
	if via := x.t.via; via != "" {
		if rh.minor == 1 {
			out = append(out, "Via: 1.1 "...)
		} else {
			out = append(out, "Via: 1.0 "...)
		}
		out = append(out, via...)
		out = append(out, "\r\n"...)
	}
	out = appendField(out, ReasonHeader, string(reason))
	if !keep {
		out = append(out, "Connection: close\r\n"...)
	}
	out = append(out, "\r\n"...)
	br := uc.Reader()
	_, _ = br.Discard(rh.size)

	// The route timeout covers the body unless the response streams; the
	// per-try timeout ends at the headers.
	streaming := rh.contentLength < 0 || rh.eventStream
	switch {
	case !routeDeadline.IsZero() && !streaming:
		if perTry > 0 {
			_ = uc.SetDeadline(routeDeadline)
		}
	case !routeDeadline.IsZero() || perTry > 0:
		_ = uc.SetDeadline(time.Time{})
	}

	bc := bodyCopier{dst: fc.rw, br: br, out: out}
	var err error
	switch {
	case bodyless:
	case rh.chunked:
		err = bc.chunked()
	case rh.contentLength >= 0:
		err = bc.exactly(rh.contentLength)
	default:
		err = bc.untilEOF()
	}
	live := fc.setUp(nil) // false: the watcher poisoned the connection's deadline
	if err != nil {
		*op = bc.out[:0]
		switch {
		case fc.isCancelled():
			outcome = cluster.OutcomeCancelled
		case !errors.Is(err, errDownstreamWrite):
			outcome = cluster.OutcomeLocalFailure
			fc.s.log.Debug("httpproxy: response body aborted", "listener", fc.s.name, "cluster", x.cluster, "error", err)
		}
		x.aborted = true
		uc.Release(false)
		att.End(outcome)
		return false // the response is cut short: close the downstream
	}
	if !routeDeadline.IsZero() && !streaming {
		_ = uc.SetDeadline(time.Time{})
	}
	uc.Release(live && !rh.closeConn && !untilClose)
	att.End(outcome)
	// Accounting first, then the last bytes of the response.
	fc.settle()
	err = bc.flush()
	*op = bc.out[:0]
	fc.answered = err == nil
	return keep && err == nil
}

// bodyCopier relays a response body from br to dst through out, writing
// what it holds before any read that would block.
type bodyCopier struct {
	dst io.Writer
	br  *bufio.Reader
	out []byte
}

func (b *bodyCopier) flush() error {
	if len(b.out) == 0 {
		return nil
	}
	_, err := b.dst.Write(b.out)
	b.out = b.out[:0]
	if err != nil {
		return errDownstreamWrite
	}
	return nil
}

// fill makes br hold at least one byte, flushing out first.
func (b *bodyCopier) fill() error {
	if b.br.Buffered() > 0 {
		return nil
	}
	if err := b.flush(); err != nil {
		return err
	}
	_, err := b.br.Peek(1)
	return err
}

// take moves up to n buffered bytes of br to the output.
func (b *bodyCopier) take(n int64) (int, error) {
	if err := b.fill(); err != nil {
		return 0, err
	}
	avail := b.br.Buffered()
	if int64(avail) > n {
		avail = int(n)
	}
	p, _ := b.br.Peek(avail)
	if len(b.out)+len(p) > cap(b.out) {
		if err := b.flush(); err != nil {
			return 0, err
		}
		if len(p) > cap(b.out)/2 {
			// Straight from the reader's buffer.
			if _, err := b.dst.Write(p); err != nil {
				return 0, errDownstreamWrite
			}
			_, _ = b.br.Discard(len(p))
			return len(p), nil
		}
	}
	b.out = append(b.out, p...)
	_, _ = b.br.Discard(len(p))
	return len(p), nil
}

// exactly relays n bytes; the last of them may stay in out (the caller
// flushes).
func (b *bodyCopier) exactly(n int64) error {
	for n > 0 {
		m, err := b.take(n)
		if err != nil {
			if err == io.EOF {
				return io.ErrUnexpectedEOF
			}
			return err
		}
		n -= int64(m)
	}
	return nil
}

// untilEOF relays everything until the upstream closes.
func (b *bodyCopier) untilEOF() error {
	for {
		if _, err := b.take(1 << 30); err != nil {
			if err == io.EOF {
				return nil
			}
			return err
		}
	}
}

// line relays one line (through '\n') and returns it; the slice is valid
// until the next read.
func (b *bodyCopier) line() ([]byte, error) {
	for {
		if err := b.fill(); err != nil {
			if err == io.EOF {
				return nil, io.ErrUnexpectedEOF
			}
			return nil, err
		}
		p, _ := b.br.Peek(b.br.Buffered())
		for i, c := range p {
			if c == '\n' {
				line := p[:i+1]
				if len(b.out)+len(line) > cap(b.out) {
					if err := b.flush(); err != nil {
						return nil, err
					}
				}
				b.out = append(b.out, line...)
				start := len(b.out) - len(line)
				_, _ = b.br.Discard(len(line))
				return b.out[start:], nil
			}
		}
		if len(p) >= 4096 {
			return nil, errResponseHead // a chunk-size or trailer line that long is not HTTP
		}
		if err := b.flush(); err != nil {
			return nil, err
		}
		if _, err := b.br.Peek(len(p) + 1); err != nil {
			if err == io.EOF {
				return nil, io.ErrUnexpectedEOF
			}
			return nil, err
		}
	}
}

var errChunk = errors.New("httpproxy: malformed chunked response body")

// chunked relays a chunked body (RFC 9112 §7.1) as it is: each chunk,
// the last chunk and the trailer section.
func (b *bodyCopier) chunked() error {
	for {
		line, err := b.line()
		if err != nil {
			return err
		}
		size, ok := chunkSize(line)
		if !ok {
			return errChunk
		}
		if size == 0 {
			break
		}
		if err := b.exactly(size); err != nil {
			return err
		}
		crlf, err := b.line()
		if err != nil {
			return err
		}
		if len(crlf) != 2 || crlf[0] != '\r' {
			return errChunk
		}
	}
	// Trailer fields, up to the blank line.
	for {
		line, err := b.line()
		if err != nil {
			return err
		}
		if len(line) <= 2 && (len(line) == 1 || line[0] == '\r') {
			return nil
		}
	}
}

// chunkSize parses a chunk-size line ("1a;ext=v\r\n").
func chunkSize(line []byte) (int64, bool) {
	var n int64
	digits := 0
	for _, c := range line {
		var d byte
		switch {
		case '0' <= c && c <= '9':
			d = c - '0'
		case 'a' <= c && c <= 'f':
			d = c - 'a' + 10
		case 'A' <= c && c <= 'F':
			d = c - 'A' + 10
		default:
			if digits == 0 || (c != ';' && c != '\r' && c != ' ' && c != '\t') {
				return 0, false
			}
			return n, true
		}
		if digits == 15 {
			return 0, false
		}
		n = n<<4 | int64(d)
		digits++
	}
	return 0, false
}
