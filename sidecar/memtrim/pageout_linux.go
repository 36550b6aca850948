package memtrim

import (
	"syscall"

	"golang.org/x/sys/unix"
)

func pageout(start, size uintptr) error {
	if _, _, e := syscall.Syscall(syscall.SYS_MADVISE, start, size, unix.MADV_PAGEOUT); e != 0 {
		return e
	}
	return nil
}
