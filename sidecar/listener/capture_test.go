package listener

import (
	"net/netip"
	"testing"
	"time"
)

// TestLogLimiter: one line per destination and reason per CaptureLogEvery,
// the next line saying how many were suppressed, and a bounded memory of
// destinations.
func TestLogLimiter(t *testing.T) {
	l := logLimiter{last: map[limitKey]*limitEntry{}}
	now := time.Unix(1000, 0)
	a := limitKey{reason: ReasonNoFilterChain, dst: netip.MustParseAddrPort("10.96.0.99:8000")}
	b := limitKey{reason: ReasonNoFilterChain, dst: netip.MustParseAddrPort("10.96.0.98:8000")}
	steps := []struct {
		name           string
		key            limitKey
		at             time.Duration
		want           bool
		wantSuppressed int
	}{
		{"first refusal of a", a, 0, true, 0},
		{"again within the minute", a, time.Second, false, 0},
		{"and again", a, 30 * time.Second, false, 0},
		{"another destination", b, 31 * time.Second, true, 0},
		{"same destination, another reason", limitKey{reason: ReasonCaptureLoop, dst: a.dst}, 32 * time.Second, true, 0},
		{"a minute after a's line", a, CaptureLogEvery, true, 2},
		{"then quiet again", a, CaptureLogEvery + time.Second, false, 0},
	}
	for _, s := range steps {
		ok, n := l.allow(s.key, now.Add(s.at))
		if ok != s.want || n != s.wantSuppressed {
			t.Errorf("%s: allow = %v, suppressed %d; want %v, %d", s.name, ok, n, s.want, s.wantSuppressed)
		}
	}
	for i := range 2 * maxLimitKeys {
		k := limitKey{reason: ReasonNoFilterChain, dst: netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 97, byte(i >> 8), byte(i)}), 80)}
		if ok, _ := l.allow(k, now.Add(2*CaptureLogEvery)); !ok {
			t.Fatalf("first refusal of %v not logged", k.dst)
		}
	}
	if n := len(l.last); n > maxLimitKeys {
		t.Errorf("remembers %d destinations, more than %d", n, maxLimitKeys)
	}
}
