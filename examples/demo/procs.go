package main

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// proc is one process the demo started, in its own process group.
type proc struct {
	name    string
	cmd     *exec.Cmd
	logPath string
	exited  chan struct{}
}

// procs starts and stops the demo's processes.
type procs struct {
	binDir string
	logDir string
	keep   bool // children outlive the demo (no PR_SET_PDEATHSIG)
	list   []*proc
}

func (ps *procs) start(name, binary string, args ...string) (*proc, error) {
	return ps.startWithEnv(name, binary, nil, args...)
}

// startWithEnv is start with env added to the demo's environment (secrets
// such as CONSUL_HTTP_TOKEN, which a command line would show in ps).
func (ps *procs) startWithEnv(name, binary string, env []string, args ...string) (*proc, error) {
	logPath := filepath.Join(ps.logDir, name+".log")
	f, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(filepath.Join(ps.binDir, binary), args...)
	cmd.Stdout, cmd.Stderr = f, f
	if env != nil {
		cmd.Env = append(os.Environ(), env...)
	}
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if !ps.keep {
		cmd.SysProcAttr.Pdeathsig = syscall.SIGKILL
	}
	if err := cmd.Start(); err != nil {
		f.Close()
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	p := &proc{name: name, cmd: cmd, logPath: logPath, exited: make(chan struct{})}
	go func() {
		_ = cmd.Wait()
		f.Close()
		close(p.exited)
	}()
	ps.list = append(ps.list, p)
	return p, nil
}

// alive reports whether p is still running.
func (p *proc) alive() bool {
	select {
	case <-p.exited:
		return false
	default:
		return true
	}
}

// terminate sends SIGTERM to p's process group and waits up to grace, then
// SIGKILLs it. It returns once the process has exited.
func (p *proc) terminate(grace time.Duration) {
	if !p.alive() {
		return
	}
	_ = syscall.Kill(-p.cmd.Process.Pid, syscall.SIGTERM)
	select {
	case <-p.exited:
	case <-time.After(grace):
		_ = syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
		<-p.exited
	}
}

// stopAll terminates every process, newest first, and returns the names of
// any that could not be confirmed gone.
func (ps *procs) stopAll() []string {
	for i := len(ps.list) - 1; i >= 0; i-- {
		ps.list[i].terminate(10 * time.Second)
	}
	var left []string
	for _, p := range ps.list {
		if syscall.Kill(p.cmd.Process.Pid, 0) == nil && p.alive() {
			left = append(left, p.name)
		}
	}
	return left
}

// tail returns the last n lines of p's log.
func (p *proc) tail(n int) string {
	b, err := os.ReadFile(p.logPath)
	if err != nil {
		return ""
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// writePIDFile records name and pid of every process (and Consul's) so
// `meshlet-demo -stop` can end a kept demo.
func writePIDFile(path string, entries map[string]int) error {
	var b strings.Builder
	for name, pid := range entries {
		fmt.Fprintf(&b, "%s %d\n", name, pid)
	}
	return os.WriteFile(path, []byte(b.String()), 0o644)
}

// stopFromPIDFile ends the processes of a kept demo.
func stopFromPIDFile(path string) error {
	f, err := os.Open(path)
	if errors.Is(err, os.ErrNotExist) {
		fmt.Println("demo: nothing to stop (no " + path + ")")
		return nil
	}
	if err != nil {
		return err
	}
	defer f.Close()
	var pids []int
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) != 2 {
			continue
		}
		pid, err := strconv.Atoi(fields[1])
		if err != nil {
			continue
		}
		pids = append(pids, pid)
		_ = syscall.Kill(-pid, syscall.SIGTERM)
		fmt.Printf("demo: stopping %s (pid %d)\n", fields[0], pid)
	}
	deadline := time.Now().Add(10 * time.Second)
	for _, pid := range pids {
		for running(pid) && time.Now().Before(deadline) {
			time.Sleep(100 * time.Millisecond)
		}
		_ = syscall.Kill(-pid, syscall.SIGKILL)
	}
	return os.Remove(path)
}

// running reports whether pid is a live process (not gone, not a zombie
// waiting for a parent that no longer exists).
func running(pid int) bool {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return false
	}
	// The state follows the parenthesised command name: "pid (comm) S ...".
	i := strings.LastIndexByte(string(b), ')')
	return i < 0 || i+2 >= len(b) || b[i+2] != 'Z'
}
