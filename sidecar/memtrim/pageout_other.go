//go:build !linux

package memtrim

func pageout(uintptr, uintptr) error { return ErrUnsupported }
