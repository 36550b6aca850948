package bench

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// clockTicks is USER_HZ, the unit of utime and stime in /proc/<pid>/stat
// (100 on every Linux architecture Go supports).
const clockTicks = 100

// proc is a process the harness started, pinned to one CPU with taskset
// (which execs the program, so the PID is the program's own).
type proc struct {
	name string
	cmd  *exec.Cmd
	log  *os.File
	done chan struct{}

	mu  sync.Mutex // guards err
	err error      // exit status once done is closed
}

// procSpec describes a process to start.
type procSpec struct {
	name string   // label in results and log file name
	cpu  int      // CPU to pin it to
	env  []string // extra environment (KEY=value)
	bin  string
	args []string
	dir  string // log directory
}

// startProc starts s under taskset, logging to <dir>/<name>.log. The child
// gets SIGKILL if the harness dies.
func startProc(s procSpec) (*proc, error) {
	logf, err := os.Create(filepath.Join(s.dir, s.name+".log"))
	if err != nil {
		return nil, fmt.Errorf("bench: %s log: %w", s.name, err)
	}
	cmd := exec.Command("taskset", append([]string{"-c", strconv.Itoa(s.cpu), s.bin}, s.args...)...)
	cmd.Env = append(os.Environ(), s.env...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		logf.Close()
		return nil, fmt.Errorf("bench: start %s: %w", s.name, err)
	}
	p := &proc{name: s.name, cmd: cmd, log: logf, done: make(chan struct{})}
	go func() {
		err := cmd.Wait()
		p.mu.Lock()
		p.err = err
		p.mu.Unlock()
		close(p.done)
	}()
	return p, nil
}

// pid is the process's ID.
func (p *proc) pid() int { return p.cmd.Process.Pid }

// exited returns a non-nil error (with the log's tail) once the process has
// exited.
func (p *proc) exited() error {
	select {
	case <-p.done:
		p.mu.Lock()
		defer p.mu.Unlock()
		return fmt.Errorf("bench: %s exited (%v); log tail:\n%s", p.name, p.err, tail(p.log.Name(), 15))
	default:
		return nil
	}
}

// stop sends SIGTERM to the process group the harness created, then
// SIGKILL after grace. It is idempotent.
func (p *proc) stop(grace time.Duration) {
	select {
	case <-p.done:
	default:
		_ = syscall.Kill(-p.pid(), syscall.SIGTERM)
		select {
		case <-p.done:
		case <-time.After(grace):
			_ = syscall.Kill(-p.pid(), syscall.SIGKILL)
			<-p.done
		}
	}
	p.log.Close()
}

// tree returns the process's PID and those of its descendants (nginx's
// worker under its master).
func (p *proc) tree() []int {
	out := []int{p.pid()}
	for i := 0; i < len(out); i++ {
		tasks, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/children", out[i]))
		for _, t := range tasks {
			b, err := os.ReadFile(t)
			if err != nil {
				continue
			}
			for _, f := range strings.Fields(string(b)) {
				if n, err := strconv.Atoi(f); err == nil {
					out = append(out, n)
				}
			}
		}
	}
	return out
}

// cpuTicks returns utime+stime of pid (all its threads), in clock ticks.
func cpuTicks(pid int) (int64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	return parseStatCPU(b)
}

// parseStatCPU reads fields 14 and 15 (utime, stime) of a /proc/<pid>/stat
// line; the command name (field 2) may hold spaces and parentheses.
func parseStatCPU(b []byte) (int64, error) {
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, errors.New("bench: malformed /proc stat")
	}
	f := strings.Fields(string(b[i+1:]))
	// f[0] is field 3 (state): utime is field 14, f[11].
	if len(f) < 13 {
		return 0, errors.New("bench: short /proc stat")
	}
	u, err1 := strconv.ParseInt(f[11], 10, 64)
	s, err2 := strconv.ParseInt(f[12], 10, 64)
	if err := errors.Join(err1, err2); err != nil {
		return 0, fmt.Errorf("bench: /proc stat: %w", err)
	}
	return u + s, nil
}

// memory returns VmRSS, VmHWM and RssAnon of pid in bytes.
func memory(pid int) (rss, hwm, anon int64, err error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, 0, 0, err
	}
	defer f.Close()
	return parseStatusMemory(f)
}

// parseStatusMemory reads VmRSS, VmHWM and RssAnon (the anonymous part of
// VmRSS: heap, stacks; the rest is file-backed, mostly the binary's own
// pages, shared through the page cache) from /proc/PID/status.
func parseStatusMemory(f interface{ Read([]byte) (int, error) }) (rss, hwm, anon int64, err error) {
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ":")
		if !ok || (k != "VmRSS" && k != "VmHWM" && k != "RssAnon") {
			continue
		}
		fs := strings.Fields(v)
		if len(fs) != 2 || fs[1] != "kB" {
			return 0, 0, 0, fmt.Errorf("bench: %s: unexpected %q", k, v)
		}
		n, err := strconv.ParseInt(fs[0], 10, 64)
		if err != nil {
			return 0, 0, 0, fmt.Errorf("bench: %s: %w", k, err)
		}
		switch k {
		case "VmRSS":
			rss = n * 1024
		case "VmHWM":
			hwm = n * 1024
		default:
			anon = n * 1024
		}
	}
	return rss, hwm, anon, sc.Err()
}

// coreTicks returns the busy and total ticks of one CPU from /proc/stat.
func coreTicks(cpu int) (busy, total int64, err error) {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0, 0, err
	}
	return parseCoreTicks(b, cpu)
}

func parseCoreTicks(b []byte, cpu int) (busy, total int64, err error) {
	prefix := "cpu" + strconv.Itoa(cpu) + " "
	for line := range strings.Lines(string(b)) {
		if !strings.HasPrefix(line, prefix) {
			continue
		}
		f := strings.Fields(line)[1:]
		for i, s := range f {
			n, err := strconv.ParseInt(s, 10, 64)
			if err != nil {
				return 0, 0, fmt.Errorf("bench: /proc/stat %s: %w", prefix, err)
			}
			if i >= 8 { // guest time is already counted in user
				break
			}
			total += n
			if i != 3 && i != 4 { // idle, iowait
				busy += n
			}
		}
		return busy, total, nil
	}
	return 0, 0, fmt.Errorf("bench: no %q in /proc/stat", strings.TrimSpace(prefix))
}

// tail returns the last n lines of a file.
func tail(path string, n int) string {
	b, _ := os.ReadFile(path)
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// grepLog returns the first lines of a log holding any of words.
func grepLog(path string, words ...string) string {
	b, _ := os.ReadFile(path)
	var out []string
	for line := range strings.Lines(string(b)) {
		for _, w := range words {
			if strings.Contains(line, w) && len(out) < 5 {
				out = append(out, strings.TrimSpace(line))
				break
			}
		}
	}
	return strings.Join(out, "\n")
}

// usageMeter measures the CPU time and resident memory of a set of
// processes over a window: CPU as the difference of utime+stime, memory as
// the largest VmRSS sum seen by a sampler every 200 ms plus VmHWM at the
// end, and how busy the proxies' CPU was with other processes.
type usageMeter struct {
	procs []*proc
	cpu   int

	startTicks map[int]int64 // by PID
	coreBusy0  int64
	coreTotal0 int64

	stopc chan struct{}
	wg    sync.WaitGroup

	mu      sync.Mutex // guards maxRSS, maxAnon
	maxRSS  map[string]int64
	maxAnon map[string]int64 // RssAnon at the sample of maxRSS
}

// procUsage is one process's share of a run.
type procUsage struct {
	Name       string  `json:"name"`
	CPUSeconds float64 `json:"cpu_seconds"`
	RSSMB      float64 `json:"rss_mb"`  // largest VmRSS sampled during the window (process tree)
	AnonMB     float64 `json:"anon_mb"` // its anonymous part (RssAnon)
	HWMMB      float64 `json:"hwm_mb"`  // VmHWM at the end (process tree)
}

func startUsage(procs []*proc, cpu int) *usageMeter {
	m := &usageMeter{procs: procs, cpu: cpu, startTicks: map[int]int64{}, stopc: make(chan struct{}), maxRSS: map[string]int64{}, maxAnon: map[string]int64{}}
	for _, p := range procs {
		for _, pid := range p.tree() {
			t, _ := cpuTicks(pid)
			m.startTicks[pid] = t
		}
	}
	m.coreBusy0, m.coreTotal0, _ = coreTicks(cpu)
	m.sample()
	m.wg.Add(1)
	go func() {
		defer m.wg.Done()
		t := time.NewTicker(200 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-m.stopc:
				return
			case <-t.C:
				m.sample()
			}
		}
	}()
	return m
}

func (m *usageMeter) sample() {
	for _, p := range m.procs {
		var sum, anonSum int64
		for _, pid := range p.tree() {
			rss, _, anon, err := memory(pid)
			if err == nil {
				sum += rss
				anonSum += anon
			}
		}
		m.mu.Lock()
		if sum > m.maxRSS[p.name] {
			m.maxRSS[p.name], m.maxAnon[p.name] = sum, anonSum
		}
		m.mu.Unlock()
	}
}

// stop ends the window and returns each process's usage and the share of
// the proxies' CPU used by other processes (noise from a shared machine).
func (m *usageMeter) stop() ([]procUsage, float64) {
	m.sample()
	close(m.stopc)
	m.wg.Wait()
	busy, total, _ := coreTicks(m.cpu)
	var out []procUsage
	var ours int64
	for _, p := range m.procs {
		u := procUsage{Name: p.name}
		var ticks, hwm int64
		for _, pid := range p.tree() {
			t, err := cpuTicks(pid)
			if err != nil {
				continue
			}
			ticks += t - m.startTicks[pid] // a new PID started at 0
			if _, h, _, err := memory(pid); err == nil {
				hwm += h
			}
		}
		ours += ticks
		u.CPUSeconds = float64(ticks) / clockTicks
		m.mu.Lock()
		u.RSSMB = float64(m.maxRSS[p.name]) / (1 << 20)
		u.AnonMB = float64(m.maxAnon[p.name]) / (1 << 20)
		m.mu.Unlock()
		u.HWMMB = float64(hwm) / (1 << 20)
		out = append(out, u)
	}
	other := 0.0
	if dt := total - m.coreTotal0; dt > 0 {
		other = max(0, float64(busy-m.coreBusy0-ours)/float64(dt))
	}
	return out, other
}
