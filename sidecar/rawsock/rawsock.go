// Package rawsock reads and writes TCP sockets with raw system calls.
//
// Go's net.Conn enters the runtime's system-call state around every read
// and write (entersyscall/exitsyscall), which lets the system monitor hand
// the processor to another thread when a call outlasts its tick (20 µs and
// up): on a proxy pinned to one core (GOMAXPROCS=1) a slow loopback write
// then costs a thread switch, and the threads fight over the core. A
// non-blocking socket call never blocks, so Conn makes it with
// syscall.RawSyscall inside the socket's syscall.RawConn, waiting for
// readiness through the runtime's poller as net.Conn does: same
// deadlines, same close, no system-call state and no hand-off.
package rawsock

import (
	"io"
	"net"
	"os"
	"syscall"
	"unsafe"
)

// Conn is a TCP connection whose Read and Write use raw system calls. The
// rest of net.Conn (Close, deadlines, addresses) is the *net.TCPConn's. A
// Conn is for one reader and one writer at a time, as a net.Conn.
type Conn struct {
	*net.TCPConn
	rc syscall.RawConn

	// The callbacks and their arguments and results, made once per
	// connection (a closure per call would be an allocation per call).
	rbuf    []byte
	rn      int
	rerrno  syscall.Errno
	readFn  func(fd uintptr) bool
	wbuf    []byte
	wn      int
	werrno  syscall.Errno
	writeFn func(fd uintptr) bool
}

// Wrap returns c as a *Conn when it is a *net.TCPConn, else c itself.
func Wrap(c net.Conn) net.Conn {
	tc, ok := c.(*net.TCPConn)
	if !ok {
		return c
	}
	rc, err := tc.SyscallConn()
	if err != nil {
		return c
	}
	r := &Conn{TCPConn: tc, rc: rc}
	r.readFn = r.read
	r.writeFn = r.write
	return r
}

// Unwrap returns the *net.TCPConn.
func (c *Conn) Unwrap() net.Conn { return c.TCPConn }

func (c *Conn) read(fd uintptr) bool {
	for {
		r, _, e := syscall.RawSyscall(syscall.SYS_READ, fd, uintptr(unsafe.Pointer(&c.rbuf[0])), uintptr(len(c.rbuf)))
		switch e {
		case syscall.EINTR:
			continue
		case syscall.EAGAIN:
			return false // wait until readable
		}
		c.rn, c.rerrno = int(r), e
		return true
	}
}

// Read implements io.Reader: a 0-byte read at end of stream is io.EOF.
func (c *Conn) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	c.rbuf, c.rn, c.rerrno = p, 0, 0
	err := c.rc.Read(c.readFn)
	c.rbuf = nil
	if err != nil {
		return 0, &net.OpError{Op: "read", Net: "tcp", Source: c.LocalAddr(), Addr: c.RemoteAddr(), Err: err}
	}
	if c.rerrno != 0 {
		return 0, &net.OpError{Op: "read", Net: "tcp", Source: c.LocalAddr(), Addr: c.RemoteAddr(), Err: os.NewSyscallError("read", c.rerrno)}
	}
	if c.rn == 0 {
		return 0, io.EOF
	}
	return c.rn, nil
}

func (c *Conn) write(fd uintptr) bool {
	for c.wn < len(c.wbuf) {
		p := c.wbuf[c.wn:]
		r, _, e := syscall.RawSyscall(syscall.SYS_WRITE, fd, uintptr(unsafe.Pointer(&p[0])), uintptr(len(p)))
		switch e {
		case 0:
			c.wn += int(r)
		case syscall.EINTR:
		case syscall.EAGAIN:
			return false // wait until writable
		default:
			c.werrno = e
			return true
		}
	}
	return true
}

// Write implements io.Writer: it writes all of p or fails.
func (c *Conn) Write(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	c.wbuf, c.wn, c.werrno = p, 0, 0
	err := c.rc.Write(c.writeFn)
	n := c.wn
	c.wbuf = nil
	if err != nil {
		return n, &net.OpError{Op: "write", Net: "tcp", Source: c.LocalAddr(), Addr: c.RemoteAddr(), Err: err}
	}
	if c.werrno != 0 {
		return n, &net.OpError{Op: "write", Net: "tcp", Source: c.LocalAddr(), Addr: c.RemoteAddr(), Err: os.NewSyscallError("write", c.werrno)}
	}
	return n, nil
}
