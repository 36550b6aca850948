package httpproxy

import (
	"bytes"
	"io"
	"testing"
	"testing/iotest"
)

// TestReplayBodyStreamsPastItsLimit reads a body of unknown length (a gRPC
// or chunked upload) in small reads, as an HTTP/2 transport does under the
// peer's frame size: once the recording overflows its limit, the attempt
// reading it goes on with the rest of the body, which only stops being
// replayable.
func TestReplayBodyStreamsPastItsLimit(t *testing.T) {
	tests := []struct {
		name        string
		size, limit int
		chunk       int // bytes per read
		replayable  bool
	}{
		{name: "fits", size: 1000, limit: 4096, chunk: 100, replayable: true},
		{name: "exactly the limit", size: 4096, limit: 4096, chunk: 1024, replayable: true},
		{name: "overflows after recording some", size: 10000, limit: 4096, chunk: 1000, replayable: false},
		{name: "first read overflows", size: 10000, limit: 4096, chunk: 8192, replayable: false},
		{name: "no buffer", size: 3000, limit: 0, chunk: 100, replayable: false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			want := bytes.Repeat([]byte("0123456789abcdef"), tc.size/16+1)[:tc.size]
			src := io.NopCloser(&chunked{r: bytes.NewReader(want), n: tc.chunk})
			b := newReplayBody(src, tc.limit, -1)
			got, err := io.ReadAll(b.attempt())
			if err != nil {
				t.Fatalf("first attempt: read %d of %d bytes: %v", len(got), tc.size, err)
			}
			if !bytes.Equal(got, want) {
				t.Fatalf("first attempt read %d bytes, not the body's %d", len(got), tc.size)
			}
			if b.replayable() != tc.replayable {
				t.Fatalf("replayable() = %v, want %v", b.replayable(), tc.replayable)
			}
			if tc.replayable {
				if err := iotest.TestReader(b.attempt(), want); err != nil {
					t.Errorf("replay: %v", err)
				}
			}
		})
	}
}

// chunked returns at most n bytes per Read.
type chunked struct {
	r io.Reader
	n int
}

func (c *chunked) Read(p []byte) (int, error) { return c.r.Read(p[:min(len(p), c.n)]) }
