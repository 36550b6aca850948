package testutil

import (
	"errors"
	"testing"
	"time"
)

// Poll intervals: the first retry comes after firstInterval, each next one
// after twice the last, up to timeout/100 bounded to [minCap, maxCap]: a
// condition that holds soon is seen within a millisecond or two, and a long
// wait (a cluster, a real agent) does not ask more than four times a second.
const (
	firstInterval = time.Millisecond
	minCap        = 2 * time.Millisecond
	maxCap        = 250 * time.Millisecond
)

// errFalse is Until's error while its condition is false.
var errFalse = errors.New("condition false")

// Poll calls f until it returns a nil error and returns f's value then. It
// calls f at once, then after 1 ms and at doubling intervals up to
// timeout/100 (at least 2 ms, at most 250 ms), and a last time at the
// deadline. When timeout has passed and f still fails, Poll fails tb
// (Fatalf, from the calling goroutine) with "timed out after <timeout>
// waiting for <what>: <f's last error>"; say in f's error what was seen
// instead. f may itself fail tb.
func Poll[T any](tb testing.TB, timeout time.Duration, what string, f func() (T, error)) T {
	tb.Helper()
	deadline := time.Now().Add(timeout)
	maxInterval := min(max(timeout/100, minCap), maxCap)
	interval := firstInterval
	for {
		v, err := f()
		if err == nil {
			return v
		}
		left := time.Until(deadline)
		if left < 0 {
			tb.Fatalf("timed out after %v waiting for %s: %v", timeout, what, err)
			return v
		}
		time.Sleep(min(interval, left))
		interval = min(2*interval, maxInterval)
	}
}

// Eventually is Poll for a condition without a value: it waits, at most
// timeout, until cond returns nil, and fails tb with what and cond's last
// error otherwise.
func Eventually(tb testing.TB, timeout time.Duration, what string, cond func() error) {
	tb.Helper()
	Poll(tb, timeout, what, func() (struct{}, error) { return struct{}{}, cond() })
}

// Until is Poll for a boolean condition: it waits, at most timeout, until
// cond returns true, and fails tb with "timed out after <timeout> waiting
// for <what>: condition false" otherwise.
func Until(tb testing.TB, timeout time.Duration, what string, cond func() bool) {
	tb.Helper()
	Poll(tb, timeout, what, func() (struct{}, error) {
		if cond() {
			return struct{}{}, nil
		}
		return struct{}{}, errFalse
	})
}
