package memtrim

import (
	"os"
	"syscall"

	"golang.org/x/sys/unix"
)

// dropMapped unmaps the process's pages of the read-only file mapping
// [start, start+size) (MADV_DONTNEED). The pages were never written: each
// one faults back in unchanged. (MADV_RANDOM as well would keep a bit
// less resident, 3-4 MB, at the cost of one disk read per page for every
// code path used for the first time afterwards, instead of read-around.)
func dropMapped(start, size uintptr) error {
	if _, _, e := syscall.Syscall(syscall.SYS_MADVISE, start, size, syscall.MADV_DONTNEED); e != 0 {
		return e
	}
	return nil
}

// dropCached asks the kernel to evict the file's cached pages that no
// process maps any more (POSIX_FADV_DONTNEED), so the next faults do not
// map them back around the page they need (fault-around maps every cached
// neighbour). Pages other processes map stay.
func dropCached(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	// Dirty pages (a binary just built) are not dropped: write them back
	// first. A file of an image layer is clean already; errors (a
	// read-only filesystem) change nothing.
	_ = unix.Fdatasync(int(f.Fd()))
	return unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_DONTNEED)
}
