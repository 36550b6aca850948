package bench

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/csv"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// loadResult is what one load-generator run measured.
type loadResult struct {
	Requests int64   // completed requests (including failed ones)
	Errors   int64   // failed requests: transport errors, non-2xx, non-OK
	Seconds  float64 // length of the run
	// Latency percentiles in milliseconds; NaN when the tool does not give
	// them.
	P50, P90, P99, P999 float64
	// ErrorSample is one error message, to say what failed.
	ErrorSample string
}

func (r loadResult) rps() float64 {
	if r.Seconds <= 0 {
		return math.NaN()
	}
	return float64(r.Requests-r.Errors) / r.Seconds
}

// runCmd runs a load generator pinned to cpu with a time bound and returns
// its standard output.
func runCmd(ctx context.Context, timeout time.Duration, cpu int, stdin string, name string, args ...string) ([]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, "taskset", append([]string{"-c", strconv.Itoa(cpu), name}, args...)...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if stdin != "" {
		cmd.Stdin = strings.NewReader(stdin)
	}
	err := cmd.Run()
	if ctx.Err() != nil {
		return nil, fmt.Errorf("bench: %s still running after %v; stderr: %s", filepath.Base(name), timeout, lastLine(stderr.String()))
	}
	if err != nil {
		return nil, fmt.Errorf("bench: %s %s: %v; stderr: %s", filepath.Base(name), strings.Join(args, " "), err, lastLine(stderr.String()))
	}
	return stdout.Bytes(), nil
}

func lastLine(s string) string {
	s = strings.TrimSpace(s)
	if i := strings.LastIndexByte(s, '\n'); i >= 0 {
		s = s[i+1:]
	}
	if len(s) > 300 {
		s = s[:300]
	}
	return s
}

// percentiles returns p50, p90, p99 and p99.9 of sorted latencies, in ms
// (nearest rank).
func percentiles(sorted []time.Duration) (p50, p90, p99, p999 float64) {
	if len(sorted) == 0 {
		n := math.NaN()
		return n, n, n, n
	}
	at := func(q float64) float64 {
		i := int(math.Ceil(q*float64(len(sorted)))) - 1
		i = min(max(i, 0), len(sorted)-1)
		return float64(sorted[i]) / float64(time.Millisecond)
	}
	return at(0.50), at(0.90), at(0.99), at(0.999)
}

// wrkScript makes wrk print one machine-readable summary line.
const wrkScript = `done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("MESHLET-WRK %d %d %d %d %d %d %d %d %d %d %d\n",
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency:percentile(99.9)))
end
`

// wrkOptions shape a wrk run.
type wrkOptions struct {
	URL         string
	Connections int
	Duration    time.Duration
	CloseEach   bool // "Connection: close": one connection per request
	Script      string
	CPU         int
}

func runWrk(ctx context.Context, bin string, o wrkOptions) (loadResult, error) {
	// wrk takes whole seconds.
	secs := max(1, int(math.Ceil(o.Duration.Seconds())))
	args := []string{"-t1", "-c", strconv.Itoa(o.Connections), "-d", fmt.Sprintf("%ds", secs),
		"--timeout", "5s", "-s", o.Script}
	if o.CloseEach {
		args = append(args, "-H", "Connection: close")
	}
	args = append(args, o.URL)
	out, err := runCmd(ctx, o.Duration+30*time.Second, o.CPU, "", bin, args...)
	if err != nil {
		return loadResult{}, err
	}
	return parseWrk(out)
}

func parseWrk(out []byte) (loadResult, error) {
	var r loadResult
	for line := range strings.Lines(string(out)) {
		f := strings.Fields(line)
		if len(f) != 12 || f[0] != "MESHLET-WRK" {
			continue
		}
		var n [11]int64
		for i := range n {
			v, err := strconv.ParseInt(f[i+1], 10, 64)
			if err != nil {
				return r, fmt.Errorf("bench: wrk summary %q: %w", line, err)
			}
			n[i] = v
		}
		r.Requests = n[0]
		r.Seconds = float64(n[1]) / 1e6
		// Connect errors are not requests; read/write/timeout errors and
		// bad statuses are failed requests.
		r.Errors = n[3] + n[4] + n[5] + n[6]
		if n[2]+r.Errors > 0 {
			r.ErrorSample = fmt.Sprintf("wrk errors: connect %d, read %d, write %d, status %d, timeout %d", n[2], n[3], n[4], n[5], n[6])
		}
		r.Requests += n[2] // count connect failures as failed requests too
		r.Errors += n[2]
		r.P50, r.P90, r.P99, r.P999 = float64(n[7])/1e3, float64(n[8])/1e3, float64(n[9])/1e3, float64(n[10])/1e3
		return r, nil
	}
	return r, fmt.Errorf("bench: no summary line in wrk output:\n%s", out)
}

// vegetaOptions shape an open-loop vegeta run.
type vegetaOptions struct {
	URL         string
	Rate        int // requests per second
	Duration    time.Duration
	Connections int // at most this many connections (like the closed loop)
	Dir         string
	CPU         int
}

// runVegeta attacks at a fixed rate (open loop: a request is sent on
// schedule whether or not earlier ones have been answered, from as many
// workers as needed) and computes the percentiles from every result.
func runVegeta(ctx context.Context, bin string, o vegetaOptions) (loadResult, error) {
	bin2 := filepath.Join(o.Dir, "vegeta.bin")
	_, err := runCmd(ctx, o.Duration+30*time.Second, o.CPU, "GET "+o.URL+"\n", bin, "attack",
		"-rate", fmt.Sprintf("%d/1s", o.Rate), "-duration", o.Duration.String(),
		"-max-connections", strconv.Itoa(o.Connections), "-workers", strconv.Itoa(o.Connections),
		"-timeout", "10s", "-output", bin2)
	if err != nil {
		return loadResult{}, err
	}
	out, err := runCmd(ctx, time.Minute, o.CPU, "", bin, "encode", "-to", "csv", bin2)
	os.Remove(bin2)
	if err != nil {
		return loadResult{}, err
	}
	return parseVegetaCSV(out, o.Duration)
}

// parseVegetaCSV reads `vegeta encode -to csv` output: timestamp (ns),
// status code, latency (ns), bytes out, bytes in, error, ...
func parseVegetaCSV(out []byte, d time.Duration) (loadResult, error) {
	r := loadResult{Seconds: d.Seconds()}
	cr := csv.NewReader(bytes.NewReader(out))
	cr.FieldsPerRecord = -1
	var lat []time.Duration
	var first, last int64
	for {
		rec, err := cr.Read()
		if err == io.EOF {
			break
		}
		if err != nil {
			return r, fmt.Errorf("bench: vegeta csv: %w", err)
		}
		if len(rec) < 6 {
			return r, fmt.Errorf("bench: vegeta csv: short record %q", rec)
		}
		ts, _ := strconv.ParseInt(rec[0], 10, 64)
		code, _ := strconv.Atoi(rec[1])
		ns, _ := strconv.ParseInt(rec[2], 10, 64)
		if first == 0 || ts < first {
			first = ts
		}
		last = max(last, ts)
		r.Requests++
		if code < 200 || code >= 400 || rec[5] != "" {
			r.Errors++
			if r.ErrorSample == "" {
				r.ErrorSample = fmt.Sprintf("status %d %s", code, rec[5])
			}
			continue
		}
		lat = append(lat, time.Duration(ns))
	}
	if r.Requests == 0 {
		return r, errors.New("bench: vegeta sent no request")
	}
	if span := float64(last-first) / 1e9; span > 0 && r.Requests > 1 {
		// The rate actually sent: vegeta lags when its CPU is short.
		r.Seconds = span * float64(r.Requests) / float64(r.Requests-1)
	}
	slices.Sort(lat)
	r.P50, r.P90, r.P99, r.P999 = percentiles(lat)
	return r, nil
}

// ghzOptions shape a ghz run (closed loop, unary calls).
type ghzOptions struct {
	Addr        string
	Concurrency int
	Connections int
	Duration    time.Duration
	CPU         int
}

// ghzUnaryCall is grpc-go's interop TestService.UnaryCall asking for a
// 1 KiB response (the same size as the HTTP workloads).
const ghzUnaryCall = "grpc.testing.TestService/UnaryCall"

func runGhz(ctx context.Context, bin string, o ghzOptions) (loadResult, error) {
	out, err := runCmd(ctx, o.Duration+60*time.Second, o.CPU, "", bin, "--insecure", "--call", ghzUnaryCall,
		"-d", `{"response_size": 1024}`, "-c", strconv.Itoa(o.Concurrency), "--connections", strconv.Itoa(o.Connections),
		"-z", o.Duration.String(), "--duration-stop", "ignore", "--cpus", "1", "-O", "json", o.Addr)
	if err != nil {
		return loadResult{}, err
	}
	return parseGhz(out)
}

// ghzReport is the part of ghz's JSON report read here.
type ghzReport struct {
	Count   int64         `json:"count"`
	Total   time.Duration `json:"total"`
	Details []struct {
		Latency time.Duration `json:"latency"`
		Status  string        `json:"status"`
		Error   string        `json:"error"`
	} `json:"details"`
}

func parseGhz(out []byte) (loadResult, error) {
	var rep ghzReport
	if err := json.Unmarshal(out, &rep); err != nil {
		return loadResult{}, fmt.Errorf("bench: ghz JSON report: %w", err)
	}
	r := loadResult{Requests: int64(len(rep.Details)), Seconds: rep.Total.Seconds()}
	lat := make([]time.Duration, 0, len(rep.Details))
	for _, d := range rep.Details {
		if d.Status != "OK" || d.Error != "" {
			r.Errors++
			if r.ErrorSample == "" {
				r.ErrorSample = d.Status + " " + d.Error
			}
			continue
		}
		lat = append(lat, d.Latency)
	}
	if r.Requests == 0 {
		return r, errors.New("bench: ghz made no call")
	}
	slices.Sort(lat)
	r.P50, r.P90, r.P99, r.P999 = percentiles(lat)
	return r, nil
}

// redisOptions shape a redis-benchmark run: GET of one 1 KiB value.
type redisOptions struct {
	Host        string
	Port        int
	Connections int
	Requests    int
	CPU         int
}

func runRedisBenchmark(ctx context.Context, bin string, o redisOptions) (loadResult, error) {
	out, err := runCmd(ctx, 5*time.Minute, o.CPU, "", bin, "-h", o.Host, "-p", strconv.Itoa(o.Port),
		"-c", strconv.Itoa(o.Connections), "-n", strconv.Itoa(o.Requests), "-t", "get", "--csv")
	if err != nil {
		return loadResult{}, err
	}
	return parseRedisCSV(out, o.Requests)
}

// parseRedisCSV reads redis-benchmark --csv (7.x): "test","rps",
// "avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms",
// "p99_latency_ms","max_latency_ms".
func parseRedisCSV(out []byte, n int) (loadResult, error) {
	recs, err := csv.NewReader(bytes.NewReader(out)).ReadAll()
	if err != nil {
		return loadResult{}, fmt.Errorf("bench: redis-benchmark csv: %w", err)
	}
	for _, rec := range recs {
		if len(rec) < 7 || rec[0] != "GET" {
			continue
		}
		num := func(s string) float64 { v, _ := strconv.ParseFloat(s, 64); return v }
		rps := num(rec[1])
		if rps <= 0 {
			return loadResult{}, fmt.Errorf("bench: redis-benchmark: rps %q", rec[1])
		}
		return loadResult{Requests: int64(n), Seconds: float64(n) / rps, P50: num(rec[4]), P90: math.NaN(), P99: num(rec[6]), P999: math.NaN()}, nil
	}
	return loadResult{}, fmt.Errorf("bench: no GET line in redis-benchmark output:\n%s", out)
}

// tlsClientOptions shape the full-handshake client.
type tlsClientOptions struct {
	Addr        string
	Concurrency int
	Duration    time.Duration
	Config      *tls.Config // a fresh session-less copy is used for every connection
	Request     []byte      // written after the handshake; the server closes after answering
	MinBody     int         // bytes expected back at least
}

// runTLSClient opens one mTLS connection per request, each a full
// handshake (no session cache, no tickets), from this process.
func runTLSClient(ctx context.Context, o tlsClientOptions) (loadResult, error) {
	ctx, cancel := context.WithTimeout(ctx, o.Duration)
	defer cancel()
	var (
		mu     sync.Mutex // guards lat, sample
		lat    []time.Duration
		sample string
		errs   atomic.Int64
		wg     sync.WaitGroup
	)
	start := time.Now()
	for range o.Concurrency {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var mine []time.Duration
			buf := make([]byte, 4096)
			for ctx.Err() == nil {
				t0 := time.Now()
				err := tlsOnce(o, buf)
				if ctx.Err() != nil && err != nil {
					break // cut by the end of the run
				}
				if err != nil {
					errs.Add(1)
					mu.Lock()
					if sample == "" {
						sample = err.Error()
					}
					mu.Unlock()
					continue
				}
				mine = append(mine, time.Since(t0))
			}
			mu.Lock()
			lat = append(lat, mine...)
			mu.Unlock()
		}()
	}
	wg.Wait()
	r := loadResult{Seconds: time.Since(start).Seconds(), Errors: errs.Load(), ErrorSample: sample}
	r.Requests = int64(len(lat)) + r.Errors
	slices.Sort(lat)
	r.P50, r.P90, r.P99, r.P999 = percentiles(lat)
	if len(lat) == 0 {
		return r, fmt.Errorf("bench: no TLS request succeeded: %s", sample)
	}
	return r, nil
}

func tlsOnce(o tlsClientOptions, buf []byte) error {
	raw, err := net.DialTimeout("tcp", o.Addr, 5*time.Second)
	if err != nil {
		return err
	}
	defer raw.Close()
	_ = raw.SetDeadline(time.Now().Add(10 * time.Second))
	cfg := o.Config.Clone()
	cfg.ClientSessionCache = nil
	c := tls.Client(raw, cfg)
	if err := c.Handshake(); err != nil {
		return fmt.Errorf("handshake: %w", err)
	}
	if _, err := c.Write(o.Request); err != nil {
		return err
	}
	n := 0
	for {
		k, err := c.Read(buf)
		n += k
		if err == io.EOF {
			break
		}
		if err != nil {
			if n >= o.MinBody { // a close without close_notify after the answer
				break
			}
			return err
		}
	}
	if n < o.MinBody {
		return fmt.Errorf("short answer: %d bytes", n)
	}
	return nil
}
