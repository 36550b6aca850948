package main

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"sync"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"

	"github.com/meshlet/meshlet/sidecar/xdsclient"
)

// fleet is one generation of simulated sidecars: an ADS client per
// registered proxy, all started at once, each with a fresh sim reporting
// to the fleet's own tracker. A sim counts its sidecar synced once only,
// so every phase that measures a sync (the initial one, the reconnect
// storm, the insecure comparison) starts a new fleet rather than
// reconnecting an old one.
type fleet struct {
	tr      *tracker
	started time.Time // when the clients were started

	cancel context.CancelFunc
	wg     sync.WaitGroup
	mu     sync.Mutex // guards err
	// err is the first error a client's Run returned other than its
	// context's end (credentials that cannot be read).
	err error
}

// startFleet makes one client per sidecar of topo dialling server with
// creds(sidecar), then starts them all. Stop it with stop.
func startFleet(ctx context.Context, topo *topology, server string, creds func(*sidecar) xdsclient.Credentials) (*fleet, error) {
	f := &fleet{tr: newTracker(len(topo.sidecars))}
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	clients := make([]*xdsclient.Client, 0, len(topo.sidecars))
	for _, sc := range topo.sidecars {
		c, err := xdsclient.New(xdsclient.Config{Server: server, Node: &core.Node{Id: sc.id, Cluster: sc.service},
			Handler: newSim(sc.id, f.tr), Logger: log, Credentials: creds(sc)})
		if err != nil {
			return nil, err
		}
		clients = append(clients, c)
	}
	cctx, cancel := context.WithCancel(ctx)
	f.cancel = cancel
	f.started = time.Now()
	for _, c := range clients {
		f.wg.Add(1)
		go func() {
			defer f.wg.Done()
			if err := c.Run(cctx); err != nil && cctx.Err() == nil {
				f.mu.Lock()
				if f.err == nil {
					f.err = err
				}
				f.mu.Unlock()
			}
		}()
	}
	return f, nil
}

// stop ends every client and waits for them. It may be called again.
func (f *fleet) stop() {
	f.cancel()
	f.wg.Wait()
}

// failed returns the first error a client stopped on, nil if none.
func (f *fleet) failed() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.err
}

// waitSync waits until every sidecar of f has a whole config, at most
// timeout, and returns when the last one did. It fails early when a client
// cannot start or the Consul agent refuses the control plane's connections.
func waitSync(ctx context.Context, f *fleet, cp *controlPlane, timeout time.Duration) (time.Time, error) {
	deadline := time.After(timeout)
	poll := time.NewTicker(time.Second)
	defer poll.Stop()
	for {
		select {
		case <-f.tr.syncDone:
			f.tr.mu.Lock()
			defer f.tr.mu.Unlock()
			return f.tr.syncedAt, nil
		case <-poll.C:
			if err := f.failed(); err != nil {
				return time.Time{}, fmt.Errorf("a simulated sidecar cannot start: %w", err)
			}
			// The control plane cannot sync while the agent refuses its
			// connections: say so now rather than at the timeout.
			if b, err := os.ReadFile(cp.logFile.Name()); err == nil && bytes.Contains(b, []byte("limits.http_max_conns_per_client")) {
				why := ""
				if bytes.Contains(b, []byte("authority unavailable: consul")) && bytes.Contains(b, []byte("Unexpected response code: 429")) {
					// Each token review in flight holds a connection of
					// its own besides the blocking queries.
					why = "; its token reviews were refused too: every review in flight holds a connection of its own, on top of one per blocking query"
				}
				return time.Time{}, fmt.Errorf("the Consul agent refuses the control plane's connections (limits.http_max_conns_per_client %d)%s: raise -consul-max-conns (see %s)", cp.maxConns, why, cp.logFile.Name())
			}
		case <-deadline:
			f.tr.mu.Lock()
			n := f.tr.synced
			f.tr.mu.Unlock()
			return time.Time{}, fmt.Errorf("only %d of %d sidecars had a whole config after %v (see %s)", n, f.tr.want, timeout, cp.logFile.Name())
		case <-ctx.Done():
			return time.Time{}, ctx.Err()
		}
	}
}
