package devkube

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"sort"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// mountsUnder returns the mount points at or below dir (from
// /proc/self/mountinfo), deepest first, each once.
func mountsUnder(dir string) ([]string, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil, fmt.Errorf("devkube: mounts: %w", err)
	}
	defer f.Close()
	seen := map[string]bool{}
	var out []string
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64*1024), 1024*1024)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 5 {
			continue
		}
		mp := unescapeMount(fields[4])
		if (mp == dir || strings.HasPrefix(mp, dir+"/")) && !seen[mp] {
			seen[mp] = true
			out = append(out, mp)
		}
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("devkube: mounts: %w", err)
	}
	sort.Slice(out, func(i, j int) bool { return len(out[i]) > len(out[j]) })
	return out, nil
}

// unmountAll unmounts every mount at or below dir, deepest first, stacked
// mounts included (the kubelet bind-mounts its root dir onto itself). A busy
// mount is retried, then detached (MNT_DETACH) so nothing stays visible.
func unmountAll(dir string) error {
	for round := 0; round < 20; round++ {
		mps, err := mountsUnder(dir)
		if err != nil {
			return err
		}
		if len(mps) == 0 {
			return nil
		}
		for _, mp := range mps {
			err := unix.Unmount(mp, 0)
			if errors.Is(err, syscall.EBUSY) && round >= 5 {
				err = unix.Unmount(mp, unix.MNT_DETACH)
			}
			if err != nil && !errors.Is(err, syscall.EINVAL) && !errors.Is(err, syscall.ENOENT) && !errors.Is(err, syscall.EBUSY) {
				return fmt.Errorf("devkube: umount %s: %w", mp, err)
			}
		}
		if round >= 5 {
			time.Sleep(50 * time.Millisecond)
		}
	}
	mps, _ := mountsUnder(dir)
	return fmt.Errorf("devkube: mounts still present under %s: %v", dir, mps)
}
