// Command store is the demo's TCP service: a tiny in-memory key-value store
// with a line protocol, carried through the mesh as opaque TCP.
//
//	SET <key> <value>  → OK
//	GET <key>          → VALUE <value> | NOT_FOUND
//	PING               → PONG
//	WHO                → ID <instance>
//	anything else      → ERR <reason>
package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"strings"
	"sync"
	"syscall"
)

func main() {
	addr := flag.String("addr", "127.0.0.1:9100", "listen address")
	id := flag.String("id", "store-1", "instance ID answered to WHO")
	flag.Parse()
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	ln, err := net.Listen("tcp", *addr)
	if err != nil {
		log.Error("store: listen", "error", err)
		os.Exit(1)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	go func() {
		<-ctx.Done()
		ln.Close()
	}()
	log.Info("store: listening", "addr", *addr)
	var (
		mu   sync.Mutex
		data = map[string]string{}
		wg   sync.WaitGroup
	)
	for {
		conn, err := ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				break
			}
			log.Warn("store: accept", "error", err)
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer conn.Close()
			sc := bufio.NewScanner(conn)
			w := bufio.NewWriter(conn)
			for sc.Scan() {
				f := strings.Fields(sc.Text())
				switch {
				case len(f) == 1 && strings.EqualFold(f[0], "PING"):
					w.WriteString("PONG\n")
				case len(f) == 1 && strings.EqualFold(f[0], "WHO"):
					w.WriteString("ID " + *id + "\n")
				case len(f) == 3 && strings.EqualFold(f[0], "SET"):
					mu.Lock()
					data[f[1]] = f[2]
					mu.Unlock()
					w.WriteString("OK\n")
				case len(f) == 2 && strings.EqualFold(f[0], "GET"):
					mu.Lock()
					v, ok := data[f[1]]
					mu.Unlock()
					if ok {
						w.WriteString("VALUE " + v + "\n")
					} else {
						w.WriteString("NOT_FOUND\n")
					}
				default:
					w.WriteString("ERR unknown command\n")
				}
				if w.Flush() != nil {
					return
				}
			}
		}()
	}
	wg.Wait()
	log.Info("store: stopped")
}
