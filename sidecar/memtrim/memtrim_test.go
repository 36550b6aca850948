package memtrim

import (
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"testing"
)

func TestExecutableMappings(t *testing.T) {
	maps := `00400000-00f44000 r-xp 00000000 fd:01 123 /opt/meshlet/sidecar
00f44000-01e19000 r--p 00b44000 fd:01 123 /opt/meshlet/sidecar
01e19000-01ebc000 rw-p 01a19000 fd:01 123 /opt/meshlet/sidecar
01ebc000-01f00000 rw-p 00000000 00:00 0
7f00a0000000-7f00a0200000 r-xp 00000000 fd:01 77 /usr/lib/x86_64-linux-gnu/libc.so.6
7f00b0000000-7f00b0001000 r--p 00000000 fd:01 88 /opt/meshlet/sidecar (deleted)
`
	path := filepath.Join(t.TempDir(), "maps")
	if err := os.WriteFile(path, []byte(maps), 0o600); err != nil {
		t.Fatal(err)
	}
	got, err := executableMappings(path, "/opt/meshlet/sidecar")
	if err != nil {
		t.Fatal(err)
	}
	want := []Mapping{{0x400000, 0xf44000, "r-xp"}, {0xf44000, 0x1e19000, "r--p"}}
	if len(got) != len(want) || got[0] != want[0] || got[1] != want[1] {
		t.Errorf("mappings = %+v, want %+v (read-only mappings of the binary only)", got, want)
	}
}

// residentKB returns the resident kB of this process's mappings in maps,
// from /proc/self/smaps.
func residentKB(t *testing.T, maps []Mapping) int {
	t.Helper()
	b, err := os.ReadFile("/proc/self/smaps")
	if err != nil {
		t.Fatal(err)
	}
	total, in := 0, false
	for line := range strings.Lines(string(b)) {
		f := strings.Fields(line)
		if len(f) >= 5 && strings.Contains(f[0], "-") && !strings.HasSuffix(f[0], ":") {
			var lo, hi uintptr
			if _, err := fmt.Sscanf(f[0], "%x-%x", &lo, &hi); err == nil {
				in = false
				for _, m := range maps {
					if m.Start == lo && m.End == hi {
						in = true
					}
				}
			}
			continue
		}
		if v, ok := strings.CutPrefix(line, "Rss:"); ok && in {
			n, _ := strconv.Atoi(strings.Fields(v)[0])
			total += n
		}
	}
	return total
}

// TestReclaimShrinksFileBackedRSS: after Reclaim, the binary's read-only
// mappings (text, read-only data) hold far fewer resident pages than
// start-up left; what comes back is the code that runs meanwhile (this
// test's, its measuring included, and the runtime's) with its neighbours,
// one to two megabytes, a good part of this small binary. The program
// goes on running.
func TestReclaimShrinksFileBackedRSS(t *testing.T) {
	if runtime.GOOS != "linux" {
		if _, err := Reclaim(); err != ErrUnsupported {
			t.Fatalf("Reclaim off Linux: %v, want ErrUnsupported", err)
		}
		return
	}
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	ro, err := executableMappings("/proc/self/maps", exe)
	if err != nil || len(ro) == 0 {
		t.Fatalf("read-only mappings of %s: %v, %v", exe, ro, err)
	}
	before := residentKB(t, ro)
	maps, err := Reclaim()
	if err != nil {
		t.Fatal(err)
	}
	after := residentKB(t, ro)
	t.Logf("read-only mappings resident %d kB -> %d kB (%d mappings)", before, after, len(maps))
	if len(maps) != len(ro) || after > before-before/4 {
		t.Errorf("read-only mappings resident %d kB -> %d kB: want a quarter of it gone at least", before, after)
	}
	// Code paged out still runs.
	if s := strconv.Itoa(12345); s != "12345" {
		t.Fatal(s)
	}
}
