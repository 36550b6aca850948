package testutil

import (
	"net"
	"sync"
	"testing"
)

// ServeTCP listens on a free loopback port ("127.0.0.1:0") and runs handle
// for each accepted connection in its own goroutine, closing the
// connection when handle returns. It returns the listener's address,
// "127.0.0.1:port". At cleanup the listener and every connection still
// open are closed, and ServeTCP's goroutines (the accept loop, the
// handlers) are waited for, so none outlives the test (goleak).
func ServeTCP(tb testing.TB, handle func(net.Conn)) string {
	tb.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	var (
		wg    sync.WaitGroup
		mu    sync.Mutex
		open  = map[net.Conn]struct{}{} // guarded by mu
		ended bool                      // guarded by mu: cleanup has begun
	)
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			if ended {
				mu.Unlock()
				c.Close()
				return
			}
			open[c] = struct{}{}
			mu.Unlock()
			wg.Go(func() {
				defer func() {
					mu.Lock()
					delete(open, c)
					mu.Unlock()
					c.Close()
				}()
				handle(c)
			})
		}
	})
	tb.Cleanup(func() {
		ln.Close()
		mu.Lock()
		ended = true
		for c := range open {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	return ln.Addr().String()
}
