package main

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/meshlet/meshlet/internal/testutil"
)

const runEnv = "PAUSE_TEST_RUN"

func TestMain(m *testing.M) {
	if os.Getenv(runEnv) != "" {
		run(os.Stdout)
		return
	}
	os.Exit(m.Run())
}

// startPause starts the test binary as pause (under the given wrapper
// command, if any) and waits until it has installed its signal handlers.
func startPause(t *testing.T, wrapper ...string) *exec.Cmd {
	t.Helper()
	args := append(wrapper, os.Args[0])
	cmd := exec.Command(args[0], args[1:]...)
	cmd.Env = append(os.Environ(), runEnv+"=1")
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil || line != "ready\n" {
		_ = cmd.Process.Kill()
		t.Fatalf("pause did not get ready: %q %v", line, err)
	}
	go func() { _, _ = io.Copy(io.Discard, out) }()
	return cmd
}

func TestExitsZeroOnSIGTERM(t *testing.T) {
	for _, sig := range []syscall.Signal{syscall.SIGTERM, syscall.SIGINT} {
		t.Run(sig.String(), func(t *testing.T) {
			cmd := startPause(t)
			// SIGCHLD with no child to reap must not end it.
			if err := cmd.Process.Signal(syscall.SIGCHLD); err != nil {
				t.Fatal(err)
			}
			if err := cmd.Process.Signal(sig); err != nil {
				t.Fatal(err)
			}
			done := make(chan error, 1)
			go func() { done <- cmd.Wait() }()
			select {
			case err := <-done:
				if err != nil {
					t.Fatalf("pause exited with %v after %v, want status 0", err, sig)
				}
			case <-time.After(10 * time.Second):
				_ = cmd.Process.Kill()
				<-done
				t.Fatalf("pause still running 10 s after %v", sig)
			}
		})
	}
}

// TestReapsOrphansAsPID1 runs pause as PID 1 of a new PID namespace (as in a
// pod), makes an orphan in that namespace (a shell backgrounds a sleep and
// exits, so the sleep is re-parented to pause) and checks that pause reaps
// it: the orphan shows up as pause's child and is gone, zombie included,
// once it has exited.
func TestReapsOrphansAsPID1(t *testing.T) {
	if testing.Short() {
		t.Skip("needs root and a PID namespace")
	}
	if os.Geteuid() != 0 {
		t.Fatal("needs root (unshare --pid); run as root or with -short")
	}
	cmd := startPause(t, "unshare", "--pid", "--fork", "--kill-child")
	defer func() { _ = cmd.Process.Kill(); _ = cmd.Wait() }()
	childrenOf := func(pid int) []string {
		p := strconv.Itoa(pid)
		b, _ := os.ReadFile("/proc/" + p + "/task/" + p + "/children")
		return strings.Fields(string(b))
	}
	c := childrenOf(cmd.Process.Pid) // unshare's only child is pause
	if len(c) != 1 {
		t.Fatalf("children of unshare: %v, want pause alone", c)
	}
	pid, _ := strconv.Atoi(c[0])
	out, err := exec.Command("nsenter", "-t", strconv.Itoa(pid), "--pid", "--",
		"sh", "-c", "sleep 1 </dev/null >/dev/null 2>&1 & echo $!").CombinedOutput()
	if err != nil {
		t.Fatalf("nsenter: %v: %s", err, out)
	}
	sawOrphan := false
	testutil.Eventually(t, 10*time.Second, "the orphan re-parented to pause, then reaped", func() error {
		c := childrenOf(pid)
		sawOrphan = sawOrphan || len(c) > 0
		if sawOrphan && len(c) == 0 {
			return nil
		}
		return fmt.Errorf("children of pause: %v (saw the orphan: %v)", c, sawOrphan)
	})
}
