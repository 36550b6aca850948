// Package devjaeger starts and stops a real Jaeger (v2, the OpenTelemetry
// Collector based `jaeger` binary) on free loopback ports, for tests and the
// demo. The binary is the one `make jaeger` builds into bin/ (Jaeger v1.76.0
// from deploy/tools/jaeger).
//
// The instance keeps traces in memory, receives spans over OTLP (gRPC and
// HTTP) and serves Jaeger's query API (HTTP /api/... and gRPC). Every
// listener is bound to 127.0.0.1; the collector's own telemetry endpoints
// (Prometheus metrics on :8888, health check, zpages, pprof, expvar, remote
// sampling) are left out of the configuration and Jaeger does not trace
// itself, so several instances can run side by side, nothing listens on a
// public interface and nothing is sent anywhere (see Config).
package devjaeger

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/meshlet/meshlet/internal/devproc"
	"github.com/meshlet/meshlet/internal/freeport"
)

// BinaryEnv names the environment variable that may point at the jaeger
// binary.
const BinaryEnv = "MESHLET_JAEGER_BIN"

// Version is the Jaeger release `make jaeger` builds.
const Version = "1.76.0"

// Default values for Options.
const (
	// DefaultReadyTimeout bounds the wait for a started Jaeger to serve.
	DefaultReadyTimeout = 60 * time.Second
	// DefaultMaxTraces is the number of traces the in-memory store keeps.
	DefaultMaxTraces = 100000
	// stopGrace is how long Stop waits after SIGTERM before SIGKILL.
	stopGrace = devproc.DefaultStopGrace
)

// FindBinary returns the jaeger binary: $MESHLET_JAEGER_BIN, else bin/jaeger
// at the module root (found from the working directory upwards), else
// jaeger on PATH. The error says how to build it.
func FindBinary() (string, error) {
	if p := os.Getenv(BinaryEnv); p != "" {
		if _, err := os.Stat(p); err != nil {
			return "", fmt.Errorf("devjaeger: %s=%s: %w", BinaryEnv, p, err)
		}
		return p, nil
	}
	if dir, err := os.Getwd(); err == nil {
		for d := dir; ; d = filepath.Dir(d) {
			if _, err := os.Stat(filepath.Join(d, "go.mod")); err == nil {
				p := filepath.Join(d, "bin", "jaeger")
				if _, err := os.Stat(p); err == nil {
					return p, nil
				}
				break
			}
			if filepath.Dir(d) == d {
				break
			}
		}
	}
	if p, err := exec.LookPath("jaeger"); err == nil {
		return p, nil
	}
	return "", errors.New("devjaeger: jaeger binary not found: run `make jaeger` (builds Jaeger v" + Version + " into bin/) or set " + BinaryEnv)
}

// Options configure Start. The zero value is ready to use.
type Options struct {
	// Binary is the jaeger executable; FindBinary() when empty.
	Binary string
	// Log receives Jaeger's output (the collector logs at info level, on
	// stderr); discarded when nil. With Detached, pass an *os.File: any
	// other writer is fed through a pipe that dies with this process.
	Log io.Writer
	// ReadyTimeout bounds the wait for the query API and the OTLP ports;
	// DefaultReadyTimeout (60 s) when 0.
	ReadyTimeout time.Duration
	// Detached leaves Jaeger running when this process exits (no
	// PR_SET_PDEATHSIG) and keeps its configuration directory, for
	// `make demo KEEP=1`. Call Release to forget it without stopping it.
	Detached bool
	// OTLPGRPCPort is the OTLP/gRPC receiver's port on 127.0.0.1 (Jaeger's
	// usual one is 4317); 0 picks a free one.
	OTLPGRPCPort int
	// OTLPHTTPPort is the OTLP/HTTP receiver's port on 127.0.0.1 (usually
	// 4318); 0 picks a free one.
	OTLPHTTPPort int
	// QueryPort is the query API's HTTP port on 127.0.0.1 (usually 16686);
	// 0 picks a free one. The query gRPC port is always a free one.
	QueryPort int
	// MaxTraces bounds the in-memory store; DefaultMaxTraces when 0.
	MaxTraces int
}

// Jaeger is a running Jaeger instance. Its exported fields are set by Start
// and must not be changed.
type Jaeger struct {
	// OTLPGRPCAddr is the OTLP/gRPC receiver, "127.0.0.1:port" (plaintext).
	OTLPGRPCAddr string
	// OTLPHTTPAddr is the OTLP/HTTP receiver, "127.0.0.1:port"; spans are
	// posted to http://OTLPHTTPAddr/v1/traces.
	OTLPHTTPAddr string
	// QueryURL is the query API's base URL, "http://127.0.0.1:port"
	// (e.g. QueryURL + "/api/traces/<trace-id>").
	QueryURL string
	// QueryGRPCAddr is the query API's gRPC endpoint (api_v2 and api_v3),
	// "127.0.0.1:port".
	QueryGRPCAddr string
	// ConfigPath is the collector configuration file Jaeger runs with.
	ConfigPath string

	proc *devproc.Process
}

// Start writes a configuration for Jaeger (memory storage, OTLP receivers,
// query API, every endpoint on a 127.0.0.1 port) into a temporary directory,
// runs `jaeger --config <file>` and waits until the query API answers
// GET /api/services with 200 and both OTLP ports accept connections, at most
// Options.ReadyTimeout. A free port taken by someone else between probe and
// bind is retried (three attempts). Jaeger runs in its own process group and,
// unless Options.Detached, dies with this process (PR_SET_PDEATHSIG). Stop it
// with Stop. ctx bounds start-up only; cancelling it later does not stop
// Jaeger.
func Start(ctx context.Context, o Options) (*Jaeger, error) {
	if o.Binary == "" {
		b, err := FindBinary()
		if err != nil {
			return nil, err
		}
		o.Binary = b
	}
	// Jaeger runs in its temporary directory: a relative path would not
	// resolve there.
	if abs, err := filepath.Abs(o.Binary); err == nil {
		o.Binary = abs
	}
	if o.ReadyTimeout == 0 {
		o.ReadyTimeout = DefaultReadyTimeout
	}
	if o.MaxTraces == 0 {
		o.MaxTraces = DefaultMaxTraces
	}
	var lastErr error
	for attempt := 0; attempt < 3; attempt++ {
		j, err := start(ctx, o)
		if err == nil {
			return j, nil
		}
		lastErr = err
		if ctx.Err() != nil {
			break
		}
	}
	return nil, lastErr
}

// ports are the TCP ports one instance listens on, all on 127.0.0.1.
type ports struct {
	otlpGRPC, otlpHTTP, queryHTTP, queryGRPC int
}

func start(ctx context.Context, o Options) (*Jaeger, error) {
	free, err := FreePorts(4)
	if err != nil {
		return nil, err
	}
	p := ports{otlpGRPC: free[0], otlpHTTP: free[1], queryHTTP: free[2], queryGRPC: free[3]}
	if o.OTLPGRPCPort != 0 {
		p.otlpGRPC = o.OTLPGRPCPort
	}
	if o.OTLPHTTPPort != 0 {
		p.otlpHTTP = o.OTLPHTTPPort
	}
	if o.QueryPort != 0 {
		p.queryHTTP = o.QueryPort
	}
	dir, err := os.MkdirTemp("", "meshlet-jaeger-")
	if err != nil {
		return nil, fmt.Errorf("devjaeger: config dir: %w", err)
	}
	cfgPath := filepath.Join(dir, "jaeger.yaml")
	if err := os.WriteFile(cfgPath, []byte(Config(p.otlpGRPC, p.otlpHTTP, p.queryHTTP, p.queryGRPC, o.MaxTraces)), 0o600); err != nil {
		os.RemoveAll(dir)
		return nil, fmt.Errorf("devjaeger: write config: %w", err)
	}
	proc, err := devproc.Start(devproc.Spec{
		Name: "devjaeger", Path: o.Binary, Args: []string{"--config", cfgPath}, Dir: dir,
		Log: o.Log, Detached: o.Detached, DataDir: dir, StopGrace: stopGrace,
	})
	if err != nil {
		os.RemoveAll(dir)
		return nil, err
	}
	addr := func(port int) string { return "127.0.0.1:" + strconv.Itoa(port) }
	j := &Jaeger{
		OTLPGRPCAddr:  addr(p.otlpGRPC),
		OTLPHTTPAddr:  addr(p.otlpHTTP),
		QueryURL:      "http://" + addr(p.queryHTTP),
		QueryGRPCAddr: addr(p.queryGRPC),
		ConfigPath:    cfgPath,
		proc:          proc,
	}
	if err := j.waitReady(ctx, o.ReadyTimeout); err != nil {
		j.Stop()
		return nil, err
	}
	return j, nil
}

// Config returns the collector configuration (YAML) Start writes for the
// given 127.0.0.1 ports: an in-memory store of at most maxTraces traces, an
// OTLP receiver (gRPC and HTTP) feeding it directly, the jaeger_query
// extension (HTTP and gRPC) reading it, and nothing else: the collector's
// internal metrics (a Prometheus endpoint on :8888 by default) and traces
// are off, jaeger_query's self-tracing is off (Jaeger v2 turns it on by
// default and exports its own spans to localhost:4317, which would land in
// whatever listens there and stall shutdown for 10 s when nothing does), and
// no other extension (health check, zpages, pprof, expvar, remote sampling)
// is configured.
func Config(otlpGRPCPort, otlpHTTPPort, queryHTTPPort, queryGRPCPort, maxTraces int) string {
	return fmt.Sprintf(`# Written by meshlet's internal/devjaeger: every endpoint on 127.0.0.1.
service:
  extensions: [jaeger_storage, jaeger_query]
  pipelines:
    traces:
      receivers: [otlp]
      exporters: [jaeger_storage_exporter]
  telemetry:
    resource:
      service.name: jaeger
    metrics:
      level: none
    traces:
      level: none
    logs:
      level: info

extensions:
  jaeger_storage:
    backends:
      memstore:
        memory:
          max_traces: %[5]d
  jaeger_query:
    enable_tracing: false
    storage:
      traces: memstore
    http:
      endpoint: 127.0.0.1:%[3]d
    grpc:
      endpoint: 127.0.0.1:%[4]d

receivers:
  otlp:
    protocols:
      grpc:
        endpoint: 127.0.0.1:%[1]d
      http:
        endpoint: 127.0.0.1:%[2]d

exporters:
  jaeger_storage_exporter:
    trace_storage: memstore
`, otlpGRPCPort, otlpHTTPPort, queryHTTPPort, queryGRPCPort, maxTraces)
}

// waitReady probes Jaeger every 100 ms until it serves, at most timeout.
func (j *Jaeger) waitReady(ctx context.Context, timeout time.Duration) error {
	// No keep-alive: nothing of the probe outlives start-up.
	client := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	return j.proc.WaitReady(ctx, timeout, 100*time.Millisecond, func(ctx context.Context) error { return j.probe(ctx, client) })
}

// probe returns nil when the query API answers and both OTLP ports accept
// connections.
func (j *Jaeger) probe(ctx context.Context, client *http.Client) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, j.QueryURL+"/api/services", nil)
	if err != nil {
		return fmt.Errorf("query request: %w", err)
	}
	resp, err := client.Do(req)
	if err != nil {
		return fmt.Errorf("query API: %w", err)
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("query API: GET /api/services: %s", resp.Status)
	}
	var d net.Dialer
	for _, addr := range []string{j.OTLPGRPCAddr, j.OTLPHTTPAddr} {
		c, err := d.DialContext(ctx, "tcp", addr)
		if err != nil {
			return fmt.Errorf("otlp receiver: %w", err)
		}
		c.Close()
	}
	return nil
}

// Stop terminates Jaeger (SIGTERM to its process group, then SIGKILL after
// 10 s), waits for it to exit and removes its configuration directory. It is
// idempotent and safe for concurrent use; after Release it does nothing.
func (j *Jaeger) Stop() { j.proc.Stop() }

// Release forgets Jaeger without stopping it (after Start with
// Options.Detached): it keeps running, with its configuration directory,
// when this process exits. Stop it later by PID.
func (j *Jaeger) Release() { j.proc.Release() }

// PID returns Jaeger's process ID (also its process group ID).
func (j *Jaeger) PID() int { return j.proc.PID() }

// Exited returns a channel closed once the Jaeger process has exited and been
// reaped.
func (j *Jaeger) Exited() <-chan struct{} { return j.proc.Exited() }

// StartForTest starts Jaeger for t with default Options and stops it in
// t.Cleanup. A missing binary or a failed start fails the test (it is not
// skipped); under -short (make test-short) the test is skipped before
// anything starts. Jaeger's log goes to a file in t.TempDir() and is printed
// when t fails.
func StartForTest(t testing.TB) *Jaeger {
	t.Helper()
	return StartForTestWith(t, Options{})
}

// StartForTestWith is StartForTest with options (Log is set by it).
func StartForTestWith(t testing.TB, o Options) *Jaeger {
	t.Helper()
	if testing.Short() {
		t.Skip("-short: starts a real Jaeger (make test runs it)")
	}
	o.Log = devproc.TestLog(t, "jaeger.log")
	j, err := Start(context.Background(), o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(j.Stop)
	return j
}

// FreePorts returns n distinct ports free on 127.0.0.1 at the time of the
// call, outside the kernel's ephemeral range (see internal/freeport), so no
// socket bound to port 0 can take one before it is used.
func FreePorts(n int) ([]int, error) {
	p, err := freeport.Ports(n)
	if err != nil {
		return nil, fmt.Errorf("devjaeger: %w", err)
	}
	return p, nil
}
