package testutil

import (
	"errors"
	"fmt"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// TestPoll: the value of the first success is returned; retries come soon.
func TestPoll(t *testing.T) {
	var n atomic.Int32
	start := time.Now()
	got := Poll(t, 5*time.Second, "the third call", func() (int, error) {
		if c := n.Add(1); c < 3 {
			return 0, fmt.Errorf("call %d", c)
		}
		return 42, nil
	})
	if got != 42 || n.Load() != 3 {
		t.Errorf("Poll = %d after %d calls, want 42 after 3", got, n.Load())
	}
	if d := time.Since(start); d > time.Second {
		t.Errorf("three calls took %v", d)
	}
	Until(t, time.Second, "true", func() bool { return true })
	Eventually(t, time.Second, "nil", func() error { return nil })
}

// fakeTB records Fatalf instead of stopping the test.
type fakeTB struct {
	testing.TB
	msg string
}

func (f *fakeTB) Helper() {}
func (f *fakeTB) Fatalf(format string, args ...any) {
	f.msg = fmt.Sprintf(format, args...)
}

// TestPollTimeout: on timeout the failure names what was awaited and the
// last error, after about timeout and a last call at the deadline.
func TestPollTimeout(t *testing.T) {
	tb := &fakeTB{TB: t}
	start := time.Now()
	var last time.Time
	Eventually(tb, 50*time.Millisecond, "the moon", func() error {
		last = time.Now()
		return errors.New("still the sun")
	})
	if d := time.Since(start); d < 50*time.Millisecond || d > time.Second {
		t.Errorf("gave up after %v, want about 50ms", d)
	}
	if last.Sub(start) < 50*time.Millisecond {
		t.Errorf("last call %v after the start, want one at the deadline", last.Sub(start))
	}
	if want := "timed out after 50ms waiting for the moon: still the sun"; tb.msg != want {
		t.Errorf("failure %q, want %q", tb.msg, want)
	}
	tb.msg = ""
	Until(tb, 10*time.Millisecond, "false", func() bool { return false })
	if !strings.Contains(tb.msg, "waiting for false: condition false") {
		t.Errorf("Until failure %q", tb.msg)
	}
}
