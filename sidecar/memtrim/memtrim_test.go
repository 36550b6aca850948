package memtrim

import (
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

// rssFile returns RssFile of this process in kB.
func rssFile(t *testing.T) int {
	t.Helper()
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		t.Fatal(err)
	}
	for line := range strings.Lines(string(b)) {
		if v, ok := strings.CutPrefix(line, "RssFile:"); ok {
			n, _ := strconv.Atoi(strings.Fields(v)[0])
			return n
		}
	}
	t.Fatal("no RssFile in /proc/self/status")
	return 0
}

// TestReclaimShrinksFileBackedRSS: after Reclaim, the test binary's
// file-backed resident memory is well below what start-up left (the code
// that runs meanwhile, Reclaim's own and the runtime's, comes back: about
// a megabyte, much of this small binary), and the program goes on running
// (its code faults back in).
func TestReclaimShrinksFileBackedRSS(t *testing.T) {
	if runtime.GOOS != "linux" {
		if _, err := Reclaim(); err != ErrUnsupported {
			t.Fatalf("Reclaim off Linux: %v, want ErrUnsupported", err)
		}
		return
	}
	before := rssFile(t)
	maps, err := Reclaim()
	if err != nil {
		t.Fatal(err)
	}
	after := rssFile(t)
	var size uintptr
	for _, m := range maps {
		size += m.Size()
	}
	t.Logf("RssFile %d kB -> %d kB (%d read-only mappings, %d kB)", before, after, len(maps), size>>10)
	if len(maps) == 0 || after*10 > before*6 {
		t.Errorf("RssFile %d kB -> %d kB: want at most 60%% of it after reclaiming %d mappings", before, after, len(maps))
	}
	// Code paged out still runs.
	if s := strconv.Itoa(12345); s != "12345" {
		t.Fatal(s)
	}
}
