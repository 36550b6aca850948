package bench

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"slices"
	"strconv"
	"sync"
	"syscall"
	"time"
	"unsafe"
)

// openLoopOptions shape runOpenLoop.
type openLoopOptions struct {
	Addr        string
	Rate        int // requests per second
	Duration    time.Duration
	Connections int // keep-alive connections, at most one request in flight on each
}

// runOpenLoop is the harness's own open-loop HTTP/1.1 load generator, in
// the manner of wrk2: requests are due on a fixed schedule (Rate per
// second) whether or not earlier ones have been answered; a due request
// waits for a free connection if all are busy, and its latency is counted
// from when it was due, so a stalled proxy cannot hide the requests it
// delayed (no coordinated omission). It is lean (a prepared request, a
// minimal response parser, one goroutine per connection) because it shares
// its CPU with the app: vegeta's net/http client tops out near 20k req/s
// there and fortio's near 25k, below half of HAProxy's maximum.
func runOpenLoop(ctx context.Context, o openLoopOptions) (loadResult, error) {
	req := []byte("GET / HTTP/1.1\r\nHost: app\r\n\r\n")
	total := int(float64(o.Rate) * o.Duration.Seconds())
	if total < 1 {
		return loadResult{}, errors.New("bench: open loop: no request to send")
	}
	due := make(chan time.Time, total) // never blocks the pacer
	type connResult struct {
		lat    []time.Duration
		errors int64
		sample string
	}
	results := make(chan connResult, o.Connections)
	var wg sync.WaitGroup
	dial := func() (net.Conn, *bufio.Reader, error) {
		c, err := net.DialTimeout("tcp", o.Addr, 5*time.Second)
		if err != nil {
			return nil, nil, err
		}
		return c, bufio.NewReaderSize(c, 16<<10), nil
	}
	for range o.Connections {
		c, br, err := dial()
		if err != nil {
			close(due)
			wg.Wait()
			return loadResult{}, fmt.Errorf("bench: open loop: %w", err)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := connResult{lat: make([]time.Duration, 0, total/o.Connections+16)}
			defer func() {
				if c != nil {
					c.Close()
				}
				results <- r
			}()
			for t := range due {
				var err error
				if c == nil {
					c, br, err = dial()
				}
				if err == nil {
					_ = c.SetDeadline(time.Now().Add(10 * time.Second))
					if _, err = c.Write(req); err == nil {
						var keep bool
						if keep, err = readResponse(br); err == nil {
							r.lat = append(r.lat, time.Since(t))
							if !keep {
								c.Close()
								c = nil
							}
							continue
						}
					}
				}
				r.errors++
				if r.sample == "" {
					r.sample = err.Error()
				}
				if c != nil {
					c.Close()
					c = nil
				}
			}
		}()
	}
	// The pacer: request i is due at start + i/Rate. It sleeps until the
	// next one is due and releases every request due by then.
	interval := time.Second / time.Duration(o.Rate)
	_, sent, perr := pace(ctx, total, interval, due)
	close(due)
	wg.Wait()
	close(results)
	res := loadResult{Seconds: sent.Seconds()}
	var lat []time.Duration
	for r := range results {
		lat = append(lat, r.lat...)
		res.Errors += r.errors
		if res.ErrorSample == "" {
			res.ErrorSample = r.sample
		}
	}
	res.Requests = int64(len(lat)) + res.Errors
	slices.Sort(lat)
	res.P50, res.P90, res.P99, res.P999 = percentiles(lat)
	if ctx.Err() != nil {
		return res, ctx.Err()
	}
	if perr != nil {
		return res, perr
	}
	if len(lat) == 0 {
		return res, fmt.Errorf("bench: open loop: no request succeeded: %s", res.ErrorSample)
	}
	return res, nil
}

// pace sends to due, at start + i×interval, the due time of request i for
// i < total, and returns start and how long it took. It waits on a timerfd
// read through Go's network poller: a plain time.Sleep wakes an idle
// program up to a millisecond late (the poller waits in whole
// milliseconds), which would add up to 1 ms to every latency at low rates;
// a timerfd wakes the poller on time without blocking a thread.
func pace(ctx context.Context, total int, interval time.Duration, due chan<- time.Time) (time.Time, time.Duration, error) {
	tf, err := newTimerFD()
	if err != nil {
		return time.Time{}, 0, err
	}
	defer tf.close()
	start := time.Now()
	for i := 0; i < total && ctx.Err() == nil; {
		now := time.Now()
		for ; i < total; i++ {
			t := start.Add(time.Duration(i) * interval)
			if wait := t.Sub(now); wait > 0 {
				if err := tf.sleep(wait); err != nil {
					return start, time.Since(start), err
				}
				break
			}
			due <- t
		}
	}
	return start, time.Since(start), nil
}

// timerFD is a Linux timerfd (CLOCK_MONOTONIC) read through the poller.
type timerFD struct {
	f   *os.File
	buf [8]byte
}

func newTimerFD() (*timerFD, error) {
	const clockMonotonic, tfdNonblock, tfdCloexec = 1, syscall.O_NONBLOCK, syscall.O_CLOEXEC
	fd, _, errno := syscall.Syscall(syscall.SYS_TIMERFD_CREATE, clockMonotonic, tfdNonblock|tfdCloexec, 0)
	if errno != 0 {
		return nil, fmt.Errorf("bench: timerfd_create: %w", errno)
	}
	return &timerFD{f: os.NewFile(fd, "timerfd")}, nil
}

// sleep waits d (relative, one shot).
func (t *timerFD) sleep(d time.Duration) error {
	// struct itimerspec { it_interval, it_value }: both timespecs.
	spec := [2]syscall.Timespec{{}, syscall.NsecToTimespec(int64(d))}
	rc, err := t.f.SyscallConn()
	if err != nil {
		return err
	}
	var errno syscall.Errno
	if err := rc.Control(func(fd uintptr) {
		_, _, errno = syscall.Syscall6(syscall.SYS_TIMERFD_SETTIME, fd, 0, uintptr(unsafe.Pointer(&spec)), 0, 0, 0)
	}); err != nil {
		return err
	}
	if errno != 0 {
		return fmt.Errorf("bench: timerfd_settime: %w", errno)
	}
	_, err = io.ReadFull(t.f, t.buf[:])
	return err
}

func (t *timerFD) close() { t.f.Close() }

// readResponse reads one HTTP/1.1 response with a Content-Length body and
// reports whether the connection stays open. Anything else (chunked
// bodies, non-200 statuses) is an error: the app always answers 200 with
// 1 KiB.
func readResponse(br *bufio.Reader) (keepAlive bool, err error) {
	line, err := br.ReadSlice('\n')
	if err != nil {
		return false, err
	}
	if len(line) < 12 || !bytes.HasPrefix(line, []byte("HTTP/1.1 ")) {
		return false, fmt.Errorf("bad status line %q", line)
	}
	if !bytes.Equal(line[9:12], []byte("200")) {
		return false, fmt.Errorf("status %s", bytes.TrimSpace(line[9:]))
	}
	length := -1
	keepAlive = true
	for {
		line, err = br.ReadSlice('\n')
		if err != nil {
			return false, err
		}
		if len(line) <= 2 { // "\r\n": end of the header
			break
		}
		k, v, ok := bytes.Cut(line, []byte(":"))
		if !ok {
			return false, fmt.Errorf("bad header line %q", line)
		}
		v = bytes.TrimSpace(v)
		switch {
		case asciiEqualFold(k, "content-length"):
			if length, err = strconv.Atoi(string(v)); err != nil {
				return false, fmt.Errorf("bad content-length %q", v)
			}
		case asciiEqualFold(k, "connection"):
			keepAlive = !asciiEqualFold(v, "close")
		case asciiEqualFold(k, "transfer-encoding"):
			return false, fmt.Errorf("unexpected transfer-encoding %q", v)
		}
	}
	if length < 0 {
		return false, errors.New("no content-length")
	}
	if n, err := br.Discard(length); err != nil {
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return false, fmt.Errorf("body: %d of %d bytes: %w", n, length, err)
	}
	return keepAlive, nil
}

func asciiEqualFold(b []byte, s string) bool {
	if len(b) != len(s) {
		return false
	}
	for i := range len(b) {
		c := b[i]
		if 'A' <= c && c <= 'Z' {
			c += 'a' - 'A'
		}
		if c != s[i] {
			return false
		}
	}
	return true
}
