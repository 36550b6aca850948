// Package memtrim gives back to the kernel the pages of the running binary
// that only start-up used.
//
// A Go binary's code and read-only data are mapped from its file; the
// package initialisers of everything linked in (protobuf descriptors of the
// Envoy APIs, gRPC, OpenTelemetry...) run once, scattered over the whole
// text, and the kernel maps pages around each fault (fault-around), so a
// freshly started sidecar has most of its binary resident: about 20 MB of
// its RSS, of which the proxy's steady state uses a few. Reclaim asks the
// kernel to reclaim those file-backed pages (madvise MADV_PAGEOUT, Linux
// 5.4+); the ones still in use fault back in (from disk if the kernel let
// them go). Anonymous memory (heap, stacks) and the writable data segment
// are not touched.
//
// The kernel reclaims only the pages no other process maps: with several
// processes of one binary (sidecars of one image on a node) the shared
// pages stay, and are paid once for all of them rather than per sidecar.
// MADV_DONTNEED would unmap them anyway, but the next fault maps back
// every cached neighbour (fault-around), which undoes it.
package memtrim

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"strings"
)

// ErrUnsupported is returned where the platform has no MADV_PAGEOUT.
var ErrUnsupported = errors.New("memtrim: not supported on this platform")

// Mapping is one read-only mapping of the executable, [Start, End).
type Mapping struct {
	Start, End uintptr
	Perms      string // as in /proc/self/maps: "r-xp", "r--p"
}

// Size returns the mapping's length in bytes.
func (m Mapping) Size() uintptr { return m.End - m.Start }

// Reclaim pages out the read-only file mappings of the running executable
// (its text and read-only data) and returns them. It errors when
// /proc/self/maps cannot be read, with ErrUnsupported off Linux, and with
// the madvise error (EINVAL before Linux 5.4) of the first mapping that
// failed; nothing is lost either way: pages are only dropped from this
// process's page tables and faulted back on use.
func Reclaim() ([]Mapping, error) {
	exe, err := os.Executable()
	if err != nil {
		return nil, fmt.Errorf("memtrim: %w", err)
	}
	maps, err := executableMappings("/proc/self/maps", exe)
	if err != nil {
		return nil, err
	}
	for _, m := range maps {
		if err := pageout(m.Start, m.Size()); err != nil {
			return maps, fmt.Errorf("memtrim: madvise(MADV_PAGEOUT) %x-%x: %w", m.Start, m.End, err)
		}
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
