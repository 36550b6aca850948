// Package testlog captures slog output in tests: safe for concurrent
// writers, searchable, and printed when the test fails.
package testlog

import (
	"bytes"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/meshlet/meshlet/internal/testutil"
)

// Buffer is a concurrency-safe log sink.
type Buffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

// Write implements io.Writer.
func (b *Buffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

// String returns everything written so far.
func (b *Buffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}

// Count returns how many lines contain substr.
func (b *Buffer) Count(substr string) int {
	n := 0
	for line := range strings.Lines(b.String()) {
		if strings.Contains(line, substr) {
			n++
		}
	}
	return n
}

// Lines returns the lines containing substr.
func (b *Buffer) Lines(substr string) []string {
	var out []string
	for line := range strings.Lines(b.String()) {
		if strings.Contains(line, substr) {
			out = append(out, strings.TrimSpace(line))
		}
	}
	return out
}

// WaitFor polls (testutil.Poll) until a line contains substr and returns
// the first such line, trimmed; it fails t after timeout, with the log.
func (b *Buffer) WaitFor(t testing.TB, timeout time.Duration, substr string) string {
	t.Helper()
	return testutil.Poll(t, timeout, fmt.Sprintf("a log line containing %q", substr), func() (string, error) {
		if l := b.Lines(substr); len(l) > 0 {
			return l[0], nil
		}
		return "", fmt.Errorf("log:\n%s", b.String())
	})
}

// New returns a logger writing text lines (level debug when verbose) into a
// new Buffer, whose content is logged through t if the test fails.
func New(t testing.TB, name string) (*slog.Logger, *Buffer) {
	b := &Buffer{}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("--- %s log:\n%s", name, b.String())
		}
	})
	return slog.New(slog.NewTextHandler(b, &slog.HandlerOptions{Level: slog.LevelDebug})), b
}
