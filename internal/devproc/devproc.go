// Package devproc runs a development dependency (the dev Consul agent of
// internal/devconsul, the Jaeger of internal/devjaeger) as a child process:
// started in its own process group with its output captured, waited on
// until a readiness check passes or it exits (the error then carries the
// tail of its output), and stopped with SIGTERM, then SIGKILL after a grace
// period, its data directory removed.
package devproc

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// Defaults of Spec and WaitReady.
const (
	// DefaultStopGrace is how long Stop waits after SIGTERM before SIGKILL.
	DefaultStopGrace = 10 * time.Second
	// DefaultProbeInterval is how often WaitReady probes.
	DefaultProbeInterval = 100 * time.Millisecond
	// TailBytes is how much of the end of a process's output errors carry.
	TailBytes = 4 << 10
)

// ErrExited is wrapped by WaitReady's error when the process exited before
// it was ready.
var ErrExited = errors.New("exited during start-up")

// Spec describes a process to Start.
type Spec struct {
	// Name names the process in errors, e.g. "devconsul: consul agent".
	Name string
	// Path is the program, as for exec.Command (looked up in PATH when it
	// has no slash).
	Path string
	// Args are the program's arguments, without its name.
	Args []string
	// Dir is the working directory; this process's when empty.
	Dir string
	// Log receives the process's stdout and stderr; discarded when nil. An
	// *os.File is handed to the process itself (it keeps writing after this
	// process exits, as Detached needs); any other writer is fed through a
	// pipe by this process.
	Log io.Writer
	// Detached leaves the process running when this process exits;
	// otherwise it gets SIGKILL when its parent goes (PR_SET_PDEATHSIG).
	Detached bool
	// DataDir, when set, is removed by Stop and Kill once the process has
	// exited (not by Release).
	DataDir string
	// StopGrace is how long Stop waits after SIGTERM before SIGKILL;
	// DefaultStopGrace (10 s) when 0.
	StopGrace time.Duration
}

// Process is a started process. Its methods are safe for concurrent use.
type Process struct {
	name      string
	dataDir   string
	stopGrace time.Duration
	cmd       *exec.Cmd
	logFile   *os.File      // Spec.Log when it is a file, for the tail
	tail      *tailBuffer   // the output's end when it goes through a pipe
	exited    chan struct{} // closed when the process has been waited for
	stopOnce  sync.Once
}

// Start starts s in its own process group (its PID is the group's ID).
// The error, prefixed by s.Name, is exec's when the command cannot start.
func Start(s Spec) (*Process, error) {
	cmd := exec.Command(s.Path, s.Args...)
	cmd.Dir = s.Dir
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if !s.Detached {
		cmd.SysProcAttr.Pdeathsig = syscall.SIGKILL
	}
	p := &Process{name: s.Name, dataDir: s.DataDir, stopGrace: s.StopGrace, cmd: cmd, exited: make(chan struct{})}
	if p.stopGrace == 0 {
		p.stopGrace = DefaultStopGrace
	}
	switch w := s.Log.(type) {
	case *os.File:
		cmd.Stdout, cmd.Stderr = w, w
		p.logFile = w
	case nil:
		if !s.Detached { // a pipe would die with this process
			p.tail = &tailBuffer{}
			cmd.Stdout, cmd.Stderr = p.tail, p.tail
		}
	default:
		p.tail = &tailBuffer{}
		mw := io.MultiWriter(w, p.tail)
		cmd.Stdout, cmd.Stderr = mw, mw
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("%s: start %s: %w", s.Name, s.Path, err)
	}
	go func() {
		_ = cmd.Wait()
		close(p.exited)
	}()
	return p, nil
}

// WaitReady calls probe at once and then every interval
// (DefaultProbeInterval when 0) until it returns nil. It fails when the
// process exits first (wrapping ErrExited), when timeout passes (wrapping
// probe's last error) or when ctx is done; the error carries the tail of
// the process's output. It does not stop the process.
func (p *Process) WaitReady(ctx context.Context, timeout, interval time.Duration, probe func(context.Context) error) error {
	if interval == 0 {
		interval = DefaultProbeInterval
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	tick := time.NewTicker(interval)
	defer tick.Stop()
	for {
		err := probe(ctx)
		if err == nil {
			return nil
		}
		select {
		case <-p.exited:
			return fmt.Errorf("%s: %w (%v)%s", p.name, ErrExited, p.cmd.ProcessState, p.tailSuffix())
		case <-ctx.Done():
			return fmt.Errorf("%s: not ready after %v: %w%s", p.name, timeout, err, p.tailSuffix())
		case <-tick.C:
		}
	}
}

// tailSuffix is "\n<name> output (last lines):\n<tail>", or "" without
// output.
func (p *Process) tailSuffix() string {
	t := p.Tail()
	if t == "" {
		return ""
	}
	return "\n" + p.name + " output (end):\n" + t
}

// Tail returns the last TailBytes (4 KiB) of the process's output, from
// its first full line; "" when the output is discarded (Spec.Log nil with
// Detached) or unreadable.
func (p *Process) Tail() string {
	var b []byte
	switch {
	case p.tail != nil:
		b = p.tail.bytes()
	case p.logFile != nil:
		var err error
		if b, err = readTail(p.logFile.Name(), TailBytes); err != nil {
			return ""
		}
	}
	if len(b) >= TailBytes {
		if i := bytes.IndexByte(b, '\n'); i >= 0 {
			b = b[i+1:]
		}
	}
	return strings.TrimRight(string(b), "\n")
}

// readTail reads the last n bytes of the file at path.
func readTail(path string, n int64) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, err
	}
	off := max(fi.Size()-n, 0)
	b := make([]byte, fi.Size()-off)
	k, err := f.ReadAt(b, off)
	if err != nil && !errors.Is(err, io.EOF) {
		return nil, err
	}
	return b[:k], nil
}

// PID returns the process's ID (also its process group's).
func (p *Process) PID() int { return p.cmd.Process.Pid }

// Exited returns a channel closed once the process has exited and been
// reaped.
func (p *Process) Exited() <-chan struct{} { return p.exited }

// State is the process's exit state once Exited is closed, nil before.
func (p *Process) State() *os.ProcessState {
	select {
	case <-p.exited:
		return p.cmd.ProcessState
	default:
		return nil
	}
}

// Stop sends SIGTERM to the process group, SIGKILL after the grace period
// (Spec.StopGrace), waits for the process to exit and removes
// Spec.DataDir. It is idempotent; after Kill or Release it does nothing.
func (p *Process) Stop() {
	p.stopOnce.Do(func() {
		pgid := p.cmd.Process.Pid
		_ = syscall.Kill(-pgid, syscall.SIGTERM)
		t := time.NewTimer(p.stopGrace)
		defer t.Stop()
		select {
		case <-p.exited:
		case <-t.C:
			_ = syscall.Kill(-pgid, syscall.SIGKILL)
			<-p.exited
		}
		p.removeDataDir()
	})
}

// Kill sends SIGKILL to the process group at once, as a crash would, waits
// for the process to exit and removes Spec.DataDir. Like Stop, it acts once.
func (p *Process) Kill() {
	p.stopOnce.Do(func() {
		_ = syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
		<-p.exited
		p.removeDataDir()
	})
}

// Release forgets the process without stopping it (started with
// Spec.Detached, it keeps running, with its data directory, when this
// process exits); Stop and Kill do nothing afterwards.
func (p *Process) Release() { p.stopOnce.Do(func() {}) }

func (p *Process) removeDataDir() {
	if p.dataDir != "" {
		_ = os.RemoveAll(p.dataDir)
	}
}

// tailBuffer keeps the last TailBytes written to it.
type tailBuffer struct {
	mu  sync.Mutex
	buf []byte // guarded by mu; at most 2*TailBytes
}

func (b *tailBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if len(p) >= TailBytes {
		b.buf = append(b.buf[:0], p[len(p)-TailBytes:]...)
		return len(p), nil
	}
	b.buf = append(b.buf, p...)
	if len(b.buf) > 2*TailBytes {
		b.buf = append(b.buf[:0], b.buf[len(b.buf)-TailBytes:]...)
	}
	return len(p), nil
}

func (b *tailBuffer) bytes() []byte {
	b.mu.Lock()
	defer b.mu.Unlock()
	return bytes.Clone(b.buf[max(len(b.buf)-TailBytes, 0):])
}

// TestLog creates the file name in tb.TempDir() to pass as Spec.Log (or a
// launcher's Options.Log) and, at cleanup, closes it and logs its content
// (headed "<name>:") when tb failed. Register it before the process's own
// cleanup so the process has stopped when the log is printed.
func TestLog(tb testing.TB, name string) *os.File {
	tb.Helper()
	path := filepath.Join(tb.TempDir(), name)
	f, err := os.Create(path)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() {
		f.Close()
		if tb.Failed() {
			b, _ := os.ReadFile(path)
			tb.Logf("%s:\n%s", name, b)
		}
	})
	return f
}
