//go:build faults

package e2e

import (
	"bufio"
	"fmt"
	"io"
	"net/http"
	"os"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
)

// soakEnv sets TestSoak's length (a Go duration); make soak's default is
// 10m.
const soakEnv = "MESHLET_SOAK_DURATION"

// TestSoak (make soak; not run by CI): a steady 300 req/s through web's
// sidecar to two api instances over mTLS, plus a streamed response (2 s)
// every second, for MESHLET_SOAK_DURATION (10 minutes by default). Each
// minute it prints web's and api-1's sidecar processes' resident memory,
// goroutines and open file descriptors, and the minute's p99. It passes
// when no request failed and memory, goroutines and descriptors are flat:
// the last minute's within 25 % (memory), +10 goroutines and +10
// descriptors of the first minute after warm-up.
func TestSoak(t *testing.T) {
	d := 10 * time.Minute
	if v := os.Getenv(soakEnv); v != "" {
		var err error
		if d, err = time.ParseDuration(v); err != nil || d < 2*time.Minute {
			t.Fatalf("%s=%q: want a duration of at least 2m", soakEnv, v)
		}
	}
	fm := newFaultMesh(t, 1, 2)
	base := "http://" + hostPort(fm.webBind)
	const rate = 300
	v := startVegeta(t, base+"/", rate, d+time.Minute)
	streams, streamFails := 0, 0
	stop := make(chan struct{})
	streamDone := make(chan struct{})
	go func() {
		defer close(streamDone)
		c := &http.Client{Timeout: 10 * time.Second}
		for {
			select {
			case <-stop:
				return
			case <-time.After(time.Second):
			}
			streams++
			resp, err := c.Get(base + "/stream?n=20")
			if err != nil {
				streamFails++
				continue
			}
			b, err := io.ReadAll(resp.Body)
			resp.Body.Close()
			if err != nil || resp.StatusCode != 200 || strings.Count(string(b), "chunk ") != 20 {
				streamFails++
			}
		}
	}()

	type sample struct {
		rss, goroutines, fds [2]float64 // web, api-1
	}
	procs := []*sidecarProcess{fm.web, fm.apis["api-1"].sidecar}
	var samples []sample
	start := time.Now()
	for minute := 1; time.Since(start) < d; minute++ {
		time.Sleep(time.Until(start.Add(time.Duration(minute) * time.Minute)))
		var s sample
		for i, p := range procs {
			s.rss[i] = float64(processRSS(t, p.p.PID())) / (1 << 20)
			s.goroutines[i] = metricAt(t, p.admin, "go_goroutines")
			s.fds[i] = metricAt(t, p.admin, "process_open_fds")
		}
		samples = append(samples, s)
		t.Logf("SOAK minute %d: web sidecar RSS %.1f MiB, %v goroutines, %v fds; api-1 sidecar RSS %.1f MiB, %v goroutines, %v fds",
			minute, s.rss[0], s.goroutines[0], s.fds[0], s.rss[1], s.goroutines[1], s.fds[1])
	}
	close(stop)
	<-streamDone
	hits := v.stop(t)
	bad := failed(hits)
	for m := 0; ; m++ {
		var in []hit
		for _, h := range hits {
			if h.at.Sub(v.start) >= time.Duration(m)*time.Minute && h.at.Sub(v.start) < time.Duration(m+1)*time.Minute {
				in = append(in, h)
			}
		}
		if len(in) == 0 {
			break
		}
		t.Logf("SOAK minute %d: %d requests, p99 %v", m+1, len(in), latencyP99(in).Round(10*time.Microsecond))
	}
	p99 := latencyP99(hits)
	t.Logf("SOAK %v at %d req/s: %d requests, %d failed, p99 %v; %d streams, %d failed", d, rate, len(hits), len(bad), p99, streams, streamFails)
	if len(bad) > 0 || streamFails > 0 {
		var sample []string
		for _, h := range bad[:min(len(bad), 10)] {
			sample = append(sample, fmt.Sprintf("%s (+%v): %d %s (x-meshlet-reason %q)", h.at.Format("15:04:05.000"), h.at.Sub(v.start).Round(time.Millisecond), h.code, h.err, h.reason))
		}
		t.Errorf("%d requests and %d streams failed, e.g.:\n%s", len(bad), streamFails, strings.Join(sample, "\n"))
	}
	// Flat: the last minute against the first after warm-up. Goroutines
	// and descriptors follow the connections the open-loop generator
	// holds (it opens more while latency spikes, and they close again):
	// a peak in between is no leak, growth that stays is.
	ref, end := samples[min(1, len(samples)-1)], samples[len(samples)-1]
	for i, name := range []string{"web", "api-1"} {
		if end.rss[i] > ref.rss[i]*1.25 {
			t.Errorf("%s's sidecar's memory grew: %.1f MiB after warm-up, %.1f MiB at the end", name, ref.rss[i], end.rss[i])
		}
		if end.goroutines[i] > ref.goroutines[i]+10 {
			t.Errorf("%s's sidecar's goroutines grew: %v after warm-up, %v at the end", name, ref.goroutines[i], end.goroutines[i])
		}
		if end.fds[i] > ref.fds[i]+10 {
			t.Errorf("%s's sidecar's file descriptors grew: %v after warm-up, %v at the end", name, ref.fds[i], end.fds[i])
		}
	}
}

// processRSS is a process's resident memory (VmRSS), in bytes.
func processRSS(t *testing.T, pid int) int64 {
	t.Helper()
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "VmRSS:"); ok {
			n, _ := strconv.ParseInt(strings.Fields(v)[0], 10, 64)
			return n << 10
		}
	}
	t.Fatalf("no VmRSS for pid %d", pid)
	return 0
}

// latencyP99 is the 99th percentile latency of the hits that succeeded.
func latencyP99(hits []hit) time.Duration {
	var l []time.Duration
	for _, h := range hits {
		if h.code == 200 && h.err == "" {
			l = append(l, h.latency)
		}
	}
	if len(l) == 0 {
		return 0
	}
	slices.Sort(l)
	return l[len(l)*99/100]
}
