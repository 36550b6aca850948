package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"
)

// lookTool finds an external load generator on PATH or in Go's install
// directory ($(go env GOBIN), else $(go env GOPATH)/bin). A missing tool
// fails the test, saying how to install it: a skipped test proves nothing.
func lookTool(t *testing.T, name, install string) string {
	t.Helper()
	skipShort(t, name+" (a real load generator)")
	if p, err := exec.LookPath(name); err == nil {
		return p
	}
	var dirs []string
	if out, err := exec.Command("go", "env", "GOBIN", "GOPATH").Output(); err == nil {
		f := strings.Split(string(out), "\n")
		if len(f) > 0 && f[0] != "" {
			dirs = append(dirs, f[0])
		}
		if len(f) > 1 {
			for _, gp := range filepath.SplitList(f[1]) {
				if gp != "" {
					dirs = append(dirs, filepath.Join(gp, "bin"))
				}
			}
		}
	}
	for _, d := range dirs {
		p := filepath.Join(d, name)
		if st, err := os.Stat(p); err == nil && !st.IsDir() && st.Mode()&0o111 != 0 {
			return p
		}
	}
	t.Fatalf("%s not found on PATH nor in %v: %s", name, dirs, install)
	return ""
}

// runTool runs a load generator with a time bound and returns its
// standard output.
func runTool(t *testing.T, timeout time.Duration, name string, args ...string) []byte {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	start := time.Now()
	err := cmd.Run()
	if ctx.Err() != nil {
		t.Fatalf("%s %s: still running after %v\nstdout:\n%s\nstderr:\n%s", filepath.Base(name), strings.Join(args, " "), timeout, stdout.Bytes(), stderr.Bytes())
	}
	if err != nil {
		t.Fatalf("%s %s: %v after %v\nstdout:\n%s\nstderr:\n%s", filepath.Base(name), strings.Join(args, " "), err, time.Since(start), stdout.Bytes(), stderr.Bytes())
	}
	return stdout.Bytes()
}

// h2loadResult is what h2load's summary says.
type h2loadResult struct {
	Total, Started, Done, Succeeded, Failed, Errored, Timeout int
	Status2xx, Status5xx                                      int
	ReqPerSec                                                 float64
}

var (
	h2loadRequests = regexp.MustCompile(`requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored, (\d+) timeout`)
	h2loadStatus   = regexp.MustCompile(`status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx`)
	h2loadFinished = regexp.MustCompile(`finished in [^,]+, ([\d.]+) req/s`)
)

func parseH2load(out []byte) (h2loadResult, error) {
	var r h2loadResult
	m := h2loadRequests.FindSubmatch(out)
	s := h2loadStatus.FindSubmatch(out)
	f := h2loadFinished.FindSubmatch(out)
	if m == nil || s == nil || f == nil {
		return r, fmt.Errorf("no h2load summary in its output:\n%s", out)
	}
	n := func(b []byte) int { v, _ := strconv.Atoi(string(b)); return v }
	r.Total, r.Started, r.Done, r.Succeeded, r.Failed, r.Errored, r.Timeout = n(m[1]), n(m[2]), n(m[3]), n(m[4]), n(m[5]), n(m[6]), n(m[7])
	r.Status2xx, r.Status5xx = n(s[1]), n(s[4])
	r.ReqPerSec, _ = strconv.ParseFloat(string(f[1]), 64)
	return r, nil
}

// ghzReport is the part of ghz's JSON report (-O json) the tests read.
type ghzReport struct {
	Count                  int            `json:"count"`
	Total                  time.Duration  `json:"total"`
	Average                time.Duration  `json:"average"`
	Rps                    float64        `json:"rps"`
	ErrorDistribution      map[string]int `json:"errorDistribution"`
	StatusCodeDistribution map[string]int `json:"statusCodeDistribution"`
	LatencyDistribution    []struct {
		Percentage int           `json:"percentage"`
		Latency    time.Duration `json:"latency"`
	} `json:"latencyDistribution"`
}

func (r ghzReport) percentile(p int) time.Duration {
	for _, l := range r.LatencyDistribution {
		if l.Percentage == p {
			return l.Latency
		}
	}
	return 0
}

func parseGhz(out []byte) (ghzReport, error) {
	var r ghzReport
	if err := json.Unmarshal(out, &r); err != nil {
		return r, fmt.Errorf("ghz JSON report: %w:\n%s", err, out)
	}
	return r, nil
}
