package devproc

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func sh(script string) Spec {
	return Spec{Name: "devproc test", Path: "/bin/sh", Args: []string{"-c", script}}
}

// TestReadyThenStop: WaitReady returns once the probe passes; Stop ends the
// process group and removes the data directory; a second Stop is a no-op.
func TestReadyThenStop(t *testing.T) {
	dir := t.TempDir()
	data := filepath.Join(dir, "data")
	if err := os.Mkdir(data, 0o700); err != nil {
		t.Fatal(err)
	}
	ready := filepath.Join(dir, "ready")
	s := sh("sleep 0.05; touch " + ready + "; exec sleep 60")
	s.DataDir = data
	p, err := Start(s)
	if err != nil {
		t.Fatal(err)
	}
	err = p.WaitReady(context.Background(), 10*time.Second, 5*time.Millisecond, func(context.Context) error {
		_, err := os.Stat(ready)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	pid := p.PID()
	p.Stop()
	p.Stop()
	if err := syscall.Kill(pid, 0); !errors.Is(err, syscall.ESRCH) {
		t.Errorf("pid %d still exists after Stop (kill 0: %v)", pid, err)
	}
	if _, err := os.Stat(data); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("data dir left behind (%v)", err)
	}
	if p.State() == nil {
		t.Error("State nil after Stop")
	}
}

// TestExitDuringStartUp: the error wraps ErrExited and carries the end of
// the output, whether it goes through a pipe or to a file.
func TestExitDuringStartUp(t *testing.T) {
	for _, name := range []string{"pipe", "file", "writer"} {
		t.Run(name, func(t *testing.T) {
			s := sh("echo starting; echo 'fatal: no config' >&2; exit 3")
			var buf bytes.Buffer
			switch name {
			case "file":
				f, err := os.Create(filepath.Join(t.TempDir(), "log"))
				if err != nil {
					t.Fatal(err)
				}
				defer f.Close()
				s.Log = f
			case "writer":
				s.Log = &buf
			}
			p, err := Start(s)
			if err != nil {
				t.Fatal(err)
			}
			defer p.Stop()
			err = p.WaitReady(context.Background(), 10*time.Second, 0, func(context.Context) error { return errors.New("not yet") })
			if !errors.Is(err, ErrExited) || !strings.Contains(err.Error(), "exit status 3") || !strings.Contains(err.Error(), "fatal: no config") {
				t.Errorf("err = %v, want ErrExited with the exit status and the output's end", err)
			}
			if name == "writer" && !strings.Contains(buf.String(), "starting") {
				t.Errorf("Log got %q", buf.String())
			}
		})
	}
}

// TestNotReady: the timeout error wraps the probe's last error.
func TestNotReady(t *testing.T) {
	p, err := Start(sh("exec sleep 60"))
	if err != nil {
		t.Fatal(err)
	}
	defer p.Stop()
	errProbe := errors.New("port closed")
	err = p.WaitReady(context.Background(), 50*time.Millisecond, 5*time.Millisecond, func(context.Context) error { return errProbe })
	if !errors.Is(err, errProbe) || !strings.Contains(err.Error(), "not ready after 50ms") {
		t.Errorf("err = %v", err)
	}
}

// TestStopKillsAfterGrace: a process ignoring SIGTERM is killed after the
// grace period.
func TestStopKillsAfterGrace(t *testing.T) {
	s := sh("trap '' TERM; echo up; while :; do sleep 0.01; done")
	s.StopGrace = 100 * time.Millisecond
	p, err := Start(s)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.WaitReady(context.Background(), 10*time.Second, 5*time.Millisecond, func(context.Context) error {
		if !strings.Contains(p.Tail(), "up") {
			return errors.New("no trap yet")
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	p.Stop()
	if d := time.Since(start); d < 100*time.Millisecond {
		t.Errorf("stopped after %v, before the grace period", d)
	}
	if st := p.State(); st == nil || st.Sys().(syscall.WaitStatus).Signal() != syscall.SIGKILL {
		t.Errorf("state %v, want killed", st)
	}
}

// TestStartError: a missing binary fails Start, named.
func TestStartError(t *testing.T) {
	_, err := Start(Spec{Name: "devx", Path: filepath.Join(t.TempDir(), "missing")})
	if err == nil || !strings.HasPrefix(err.Error(), "devx: start ") {
		t.Errorf("err = %v", err)
	}
}

// TestTail: the buffer keeps the last TailBytes from a full line on.
func TestTail(t *testing.T) {
	var b tailBuffer
	for i := 0; i < 1000; i++ {
		b.Write([]byte("line of some length\n"))
	}
	b.Write([]byte("last\n"))
	p := &Process{tail: &b}
	got := p.Tail()
	if len(got) > TailBytes || !strings.HasPrefix(got, "line of") || !strings.HasSuffix(got, "last") {
		t.Errorf("tail: %d bytes, %q...%q", len(got), got[:20], got[len(got)-20:])
	}
}
