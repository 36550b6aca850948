// Package memtrim gives back to the kernel the pages of the running binary
// that only start-up used.
//
// A Go binary's code and read-only data are mapped from its file; the
// package initialisers of everything linked in (protobuf descriptors of the
// Envoy APIs, gRPC, OpenTelemetry...) run once, scattered over the whole
// text, and the kernel maps every cached page around each fault
// (fault-around), so a freshly started sidecar has most of its binary
// resident: about 20 MB of its RSS, of which the proxy's steady state uses
// a few. Reclaim drops the process's mappings of those never-written pages
// (madvise MADV_DONTNEED) and asks the kernel to evict the binary's cached
// pages that no process maps any more (posix_fadvise POSIX_FADV_DONTNEED),
// so that later faults do not map them back; the pages still in use fault
// back in (read from disk, with read-around, when evicted). Pages other processes of the binary map stay cached, and
// anonymous memory (heap, stacks) and the writable data segment are not
// touched.
//
// (MADV_PAGEOUT alone would skip every page another process maps: with
// two sidecars of one binary on a host, whichever reclaims first keeps
// almost everything.)
package memtrim

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"strings"
)

// ErrUnsupported is returned off Linux.
var ErrUnsupported = errors.New("memtrim: not supported on this platform")

// Mapping is one read-only mapping of the executable, [Start, End).
type Mapping struct {
	Start, End uintptr
	Perms      string // as in /proc/self/maps: "r-xp", "r--p"
}

// Size returns the mapping's length in bytes.
func (m Mapping) Size() uintptr { return m.End - m.Start }

// Reclaim drops the resident pages of the read-only file mappings of the
// running executable (its text and read-only data) and returns those
// mappings. It errors when /proc/self/maps cannot be read, with
// ErrUnsupported off Linux, and with the madvise or fadvise error of the
// first step that failed; nothing is lost either way: the pages are only
// dropped from this process's page tables (and the page cache) and faulted
// back on use.
func Reclaim() ([]Mapping, error) {
	exe, err := os.Executable()
	if err != nil {
		return nil, fmt.Errorf("memtrim: %w", err)
	}
	maps, err := executableMappings("/proc/self/maps", exe)
	if err != nil {
		return nil, err
	}
	if len(maps) == 0 {
		return nil, nil
	}
	for _, m := range maps {
		if err := dropMapped(m.Start, m.Size()); err != nil {
			return maps, fmt.Errorf("memtrim: madvise(MADV_DONTNEED) %x-%x: %w", m.Start, m.End, err)
		}
	}
	// What runs between the two steps (this code, the runtime) is mapped
	// back with its cached neighbours and stays: well under a megabyte.
	if err := dropCached(exe); err != nil {
		return maps, fmt.Errorf("memtrim: posix_fadvise(POSIX_FADV_DONTNEED) %s: %w", exe, err)
	}
	return maps, nil
}

// executableMappings returns the mappings of file exe in the maps file at
// path that are not writable.
func executableMappings(path, exe string) ([]Mapping, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("memtrim: %w", err)
	}
	defer f.Close()
	var out []Mapping
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		// 00400000-00f44000 r-xp 00000000 fd:01 123 /path/to/binary
		fs := strings.Fields(sc.Text())
		if len(fs) < 6 || strings.Join(fs[5:], " ") != exe || strings.Contains(fs[1], "w") {
			continue
		}
		var m Mapping
		if _, err := fmt.Sscanf(fs[0], "%x-%x", &m.Start, &m.End); err != nil || m.End <= m.Start {
			continue
		}
		m.Perms = fs[1]
		out = append(out, m)
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("memtrim: %s: %w", path, err)
	}
	return out, nil
}
