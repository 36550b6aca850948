package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/meshlet/meshlet/controlplane/xdsauth"
	"github.com/meshlet/meshlet/internal/devconsul"
)

// forEach runs fn(i) for i in [0, n) on workers goroutines and returns the
// first error (the others stop taking work).
func forEach(ctx context.Context, n, workers int, fn func(ctx context.Context, i int) error) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	next := make(chan int)
	var (
		wg       sync.WaitGroup
		mu       sync.Mutex // guards firstErr
		firstErr error
	)
	for range max(1, workers) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range next {
				if err := fn(ctx, i); err != nil {
					mu.Lock()
					if firstErr == nil {
						firstErr = err
					}
					mu.Unlock()
					cancel()
				}
			}
		}()
	}
feed:
	for i := range n {
		select {
		case next <- i:
		case <-ctx.Done():
			break feed
		}
	}
	close(next)
	wg.Wait()
	if firstErr != nil {
		return firstErr
	}
	return ctx.Err()
}

// tokenSet is the Consul ACL tokens of the meshed services' sidecars.
type tokenSet struct {
	// files holds the token file of each meshed service.
	files map[string]string
	// distinct is how many different tokens the sidecars present.
	distinct int
}

// makeTokens creates a token per meshed service (ServiceIdentities: the
// service, devconsul's ServiceToken), workers at a time, and writes each
// to <dir>/<service>.token.
func makeTokens(ctx context.Context, agent *devconsul.Agent, topo *topology, dir string, workers int) (*tokenSet, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	var meshed []string
	for _, s := range topo.services {
		if len(s.sidecars) > 0 {
			meshed = append(meshed, s.name)
		}
	}
	secrets := make([]string, len(meshed))
	err := forEach(ctx, len(meshed), workers, func(ctx context.Context, i int) error {
		tok, err := agent.ServiceToken(ctx, meshed[i])
		if err != nil {
			return err
		}
		if tok == "" {
			return fmt.Errorf("the Consul agent has ACLs disabled: no token for %s", meshed[i])
		}
		secrets[i] = tok
		return os.WriteFile(filepath.Join(dir, meshed[i]+".token"), []byte(tok+"\n"), 0o600)
	})
	if err != nil {
		return nil, err
	}
	ts := &tokenSet{files: make(map[string]string, len(meshed))}
	secret := make(map[string]string, len(meshed))
	for i, s := range meshed {
		ts.files[s] = filepath.Join(dir, s+".token")
		secret[s] = secrets[i]
	}
	used := map[string]bool{}
	for _, sc := range topo.sidecars {
		used[secret[sc.service]] = true
	}
	ts.distinct = len(used)
	return ts, nil
}

// warmLeaves asks the agent for the leaf certificate of every meshed
// service with the control plane's token, workers at a time, retrying
// while the Connect CA rate-limits its signing: the agent then holds them
// all, as it does for any control plane after the first, so no measured
// sync is paced by csr_max_per_second and both sides of the authenticated
// ÷ insecure comparison find the agent in the same state.
func warmLeaves(ctx context.Context, agent *devconsul.Agent, topo *topology, token string, workers int) error {
	c, err := api.NewClient(&api.Config{Address: agent.HTTPAddr, Token: token, Transport: benchTransport(workers)})
	if err != nil {
		return err
	}
	var meshed []string
	for _, s := range topo.services {
		if len(s.sidecars) > 0 {
			meshed = append(meshed, s.name)
		}
	}
	return forEach(ctx, len(meshed), workers, func(ctx context.Context, i int) error {
		deadline := time.Now().Add(5 * time.Minute)
		for {
			_, _, err := c.Agent().ConnectCALeaf(meshed[i], (&api.QueryOptions{}).WithContext(ctx))
			if err == nil {
				return nil
			}
			if ctx.Err() != nil {
				return ctx.Err()
			}
			if time.Now().After(deadline) {
				return fmt.Errorf("the leaf certificate of %s: %w", meshed[i], err)
			}
			time.Sleep(200 * time.Millisecond)
		}
	})
}

// lookupCount is a delta of meshlet_controlplane_xds_auth_lookups_total:
// Consul is the questions asked of the authority (result ok, invalid or
// unavailable), Cached the answers from the control plane's cache.
type lookupCount struct {
	Consul   int            `json:"consul"`
	Cached   int            `json:"cached"`
	ByResult map[string]int `json:"by_result"`
}

const (
	lookupsMetric = "meshlet_controlplane_xds_auth_lookups_total"
	deniedMetric  = "meshlet_controlplane_xds_auth_denied_total"
)

// authLookups returns the lookups counted between two scrapes (before may
// be nil: from the start).
func authLookups(before, after map[string]float64) lookupCount {
	lc := lookupCount{ByResult: map[string]int{}}
	for result, n := range labelDeltas(before, after, lookupsMetric, "result") {
		lc.ByResult[result] += n
		if result == xdsauth.LookupCached {
			lc.Cached += n
		} else {
			lc.Consul += n
		}
	}
	return lc
}

// authDenied returns the streams refused between two scrapes by reason,
// only the reasons that occurred.
func authDenied(before, after map[string]float64) map[string]int {
	return labelDeltas(before, after, deniedMetric, "reason")
}

// labelDeltas sums the increase of counter name between two scrapes by
// the value of one label, keeping only non-zero ones.
func labelDeltas(before, after map[string]float64, name, label string) map[string]int {
	out := map[string]int{}
	for k, v := range after {
		rest, ok := strings.CutPrefix(k, name+"{")
		if !ok {
			continue
		}
		_, val, ok := strings.Cut(rest, label+`="`)
		if !ok {
			continue
		}
		val, _, _ = strings.Cut(val, `"`)
		if d := int(v - before[k] + 0.5); d != 0 {
			out[val] += d
		}
	}
	return out
}
