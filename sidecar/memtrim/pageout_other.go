//go:build !linux

package memtrim

func dropMapped(uintptr, uintptr) error { return ErrUnsupported }

func dropCached(string) error { return ErrUnsupported }
