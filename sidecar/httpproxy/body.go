package httpproxy

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
)

// replayBody lets a request body be sent more than once: what is read from
// the downstream is recorded up to limit bytes, and each attempt reads the
// recording first, then continues from the downstream. Once more than limit
// bytes have been read the body can no longer be replayed, unless nothing
// was read yet (a connect failure before the body moved).
type replayBody struct {
	mu       sync.Mutex // guards the fields below; attempts may overlap briefly
	src      io.ReadCloser
	buf      []byte
	limit    int
	overflow bool  // more than limit bytes read: the recording is incomplete
	eof      bool  // src is exhausted
	read     bool  // any byte was read from src
	srcErr   error // the first error other than io.EOF reading src
	// srcDone is eof, readable without mu (which an attempt holds while
	// it waits for the downstream).
	srcDone atomic.Bool
}

func newReplayBody(src io.ReadCloser, limit int, contentLength int64) *replayBody {
	b := &replayBody{src: src, limit: limit}
	if contentLength > int64(limit) {
		b.overflow = true // it cannot fit: do not record at all
	}
	return b
}

// replayable reports whether a new attempt can send the whole body.
func (b *replayBody) replayable() bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	return !b.read || !b.overflow
}

// complete reports whether the downstream body was read to its end. It
// does not wait for an attempt blocked reading the downstream.
func (b *replayBody) complete() bool { return b.srcDone.Load() }

// attempt returns the body reader for one attempt.
func (b *replayBody) attempt() *attemptBody { return &attemptBody{b: b} }

type attemptBody struct {
	b      *replayBody
	pos    int
	closed bool
}

var errAttemptOver = errors.New("httpproxy: body of a finished attempt")

func (a *attemptBody) Read(p []byte) (int, error) {
	b := a.b
	b.mu.Lock()
	defer b.mu.Unlock()
	if a.closed {
		return 0, errAttemptOver
	}
	if a.pos < len(b.buf) {
		n := copy(p, b.buf[a.pos:])
		a.pos += n
		return n, nil
	}
	if b.eof {
		return 0, io.EOF
	}
	if b.overflow && b.read && a.pos != len(b.buf) {
		return 0, errAttemptOver // cannot happen: replayable() guards new attempts
	}
	n, err := b.src.Read(p)
	if n > 0 {
		b.read = true
		if !b.overflow {
			if len(b.buf)+n <= b.limit {
				b.buf = append(b.buf, p[:n]...)
			} else {
				// The recording is dropped; this attempt reads on from src,
				// its position now that of the empty recording.
				b.overflow, b.buf, a.pos = true, nil, 0
			}
		}
		if !b.overflow {
			a.pos = len(b.buf)
		}
	}
	if errors.Is(err, io.EOF) {
		b.eof = true
		b.srcDone.Store(true)
	} else if err != nil && b.srcErr == nil {
		b.srcErr = err
	}
	return n, err
}

// malformed reports whether reading the downstream body failed on its
// content (net/http's chunked reader: a chunk size that is not hex, or
// overflows), not on its transport (the client left, a deadline, a
// truncated body): the request is bad, not gone.
func (b *replayBody) malformed() bool {
	b.mu.Lock()
	err := b.srcErr
	b.mu.Unlock()
	if err == nil {
		return false
	}
	var ne net.Error
	return !errors.Is(err, io.ErrUnexpectedEOF) && !errors.Is(err, net.ErrClosed) && !errors.As(err, &ne) &&
		!errors.Is(err, http.ErrBodyReadAfterClose) && !errors.Is(err, context.Canceled) && !errors.Is(err, errAttemptOver)
}

// Close ends this attempt's use of the body; the downstream body stays open
// for a retry (net/http closes it when the handler returns).
func (a *attemptBody) Close() error {
	a.b.mu.Lock()
	a.closed = true
	a.b.mu.Unlock()
	return nil
}
