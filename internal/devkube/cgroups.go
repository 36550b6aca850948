package devkube

import (
	"bufio"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// cgroupRoot is where the host mounts its cgroup hierarchies.
const cgroupRoot = "/sys/fs/cgroup"

// cgroupHierarchies returns the mount points of every cgroup hierarchy under
// /sys/fs/cgroup (v1 controllers, named v1 hierarchies such as systemd, and
// the v2 "unified" one), from /proc/self/mountinfo.
func cgroupHierarchies() ([]string, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil, fmt.Errorf("devkube: cgroups: %w", err)
	}
	defer f.Close()
	var out []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		// id parent major:minor root mountpoint opts ... - fstype source superopts
		fields := strings.Fields(sc.Text())
		sep := -1
		for i, x := range fields {
			if x == "-" {
				sep = i
				break
			}
		}
		if sep < 0 || sep+1 >= len(fields) || len(fields) < 5 {
			continue
		}
		fstype, mp := fields[sep+1], unescapeMount(fields[4])
		if (fstype == "cgroup" || fstype == "cgroup2") && strings.HasPrefix(mp, cgroupRoot+"/") {
			out = append(out, mp)
		}
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("devkube: cgroups: %w", err)
	}
	sort.Strings(out)
	return out, nil
}

// daemonsCgroup is the freezer cgroup the harness puts every daemon in
// (their children, such as containerd's shims, inherit it); the kubelet puts
// containers under <cluster>/kubepods. So every process of a cluster lives
// under freezer:/<cluster>.
func daemonsCgroup(name string) string {
	return filepath.Join(cgroupRoot, "freezer", name, "daemons")
}

// createCgroups makes /<name> in every v1 hierarchy (the kubelet's
// cgroupRoot must exist in each), copies cpuset.cpus and cpuset.mems from
// the root (a new cpuset cgroup starts empty), and makes the daemons'
// freezer cgroup.
func createCgroups(name string) error {
	hs, err := cgroupHierarchies()
	if err != nil {
		return err
	}
	for _, h := range hs {
		if filepath.Base(h) == "unified" {
			continue // runc and the kubelet make theirs there
		}
		if err := os.MkdirAll(filepath.Join(h, name), 0o755); err != nil {
			return fmt.Errorf("devkube: cgroups: %w", err)
		}
		if filepath.Base(h) == "cpuset" {
			for _, f := range []string{"cpuset.cpus", "cpuset.mems"} {
				b, err := os.ReadFile(filepath.Join(h, f))
				if err != nil {
					return fmt.Errorf("devkube: cgroups: %w", err)
				}
				if err := os.WriteFile(filepath.Join(h, name, f), b, 0o644); err != nil {
					return fmt.Errorf("devkube: cgroups: %s: %w", f, err)
				}
			}
		}
	}
	if err := os.MkdirAll(daemonsCgroup(name), 0o755); err != nil {
		return fmt.Errorf("devkube: cgroups: %w", err)
	}
	return nil
}

// cgroupPids returns the processes in the cgroup dir and every cgroup below
// it; none when dir does not exist.
func cgroupPids(dir string) ([]int, error) {
	var pids []int
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return nil
			}
			return err
		}
		if !d.IsDir() {
			return nil
		}
		b, err := os.ReadFile(filepath.Join(p, "cgroup.procs"))
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return nil
			}
			return err
		}
		for _, f := range strings.Fields(string(b)) {
			if pid, err := strconv.Atoi(f); err == nil {
				pids = append(pids, pid)
			}
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("devkube: cgroups: %w", err)
	}
	return pids, nil
}

// killCgroup kills every process in the freezer cgroup dir and below:
// freeze (nothing forks while it is killed), SIGKILL each, thaw, and wait up
// to timeout for the cgroups to empty. It returns the number killed.
func killCgroup(dir string, timeout time.Duration) (int, error) {
	pids, err := cgroupPids(dir)
	if err != nil || len(pids) == 0 {
		return 0, err
	}
	state := filepath.Join(dir, "freezer.state")
	_ = os.WriteFile(state, []byte("FROZEN"), 0o644)
	for _, pid := range pids {
		_ = syscall.Kill(pid, syscall.SIGKILL)
	}
	_ = os.WriteFile(state, []byte("THAWED"), 0o644)
	deadline := time.Now().Add(timeout)
	for {
		left, err := cgroupPids(dir)
		if err != nil {
			return len(pids), err
		}
		if len(left) == 0 {
			return len(pids), nil
		}
		if time.Now().After(deadline) {
			return len(pids), fmt.Errorf("devkube: cgroups: processes %v still in %s after SIGKILL", left, dir)
		}
		for _, pid := range left { // forked between listing and freezing
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// removeCgroups removes /<name> and everything below it in every hierarchy
// (v1 and unified), deepest first. A cgroup still busy (a process exiting)
// is retried for a few seconds.
func removeCgroups(name string) error {
	hs, err := cgroupHierarchies()
	if err != nil {
		return err
	}
	var errs []error
	for _, h := range hs {
		top := filepath.Join(h, name)
		var dirs []string
		err := filepath.WalkDir(top, func(p string, d fs.DirEntry, err error) error {
			if err != nil {
				if errors.Is(err, fs.ErrNotExist) {
					return nil
				}
				return err
			}
			if d.IsDir() {
				dirs = append(dirs, p)
			}
			return nil
		})
		if err != nil {
			errs = append(errs, err)
			continue
		}
		sort.Slice(dirs, func(i, j int) bool { return len(dirs[i]) > len(dirs[j]) })
		for _, d := range dirs {
			if err := rmdirRetry(d, 5*time.Second); err != nil {
				errs = append(errs, err)
			}
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("devkube: cgroups: %w", err)
	}
	return nil
}

func rmdirRetry(dir string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		err := syscall.Rmdir(dir)
		if err == nil || errors.Is(err, syscall.ENOENT) {
			return nil
		}
		if !errors.Is(err, syscall.EBUSY) || time.Now().After(deadline) {
			return fmt.Errorf("rmdir %s: %w", dir, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// unescapeMount decodes the octal escapes (\040 for space ...) of a
// mountinfo path.
func unescapeMount(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}
