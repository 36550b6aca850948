package main

import (
	"context"
	"fmt"
	"math/rand/v2"
	"time"
)

// Kinds of endpoint change.
const (
	// kindSidecarHealth flips the check of an instance that has a sidecar:
	// the sidecar leaves (or rejoins) its service's endpoints at every
	// sidecar with that service upstream.
	kindSidecarHealth = "sidecar-instance-health"
	// kindPlainHealth flips the check of an instance without a sidecar:
	// no sidecar's config changes (only the proxyless clients' would).
	kindPlainHealth = "plain-instance-health"
	// kindScaleOut registers an instance with a sidecar in a meshed
	// service (its endpoint joins); kindScaleIn removes it again.
	kindScaleOut = "scale-out"
	kindScaleIn  = "scale-in"
)

// change is one endpoint change written to Consul. Fields after t0 are
// guarded by the tracker's mutex once the change is expected.
type change struct {
	n       int
	kind    string
	service string
	t0      time.Time     // just before the timed write
	write   time.Duration // how long the timed write took
	want    int           // affected sidecars
	got     int           // affected sidecars that have it
	last    time.Duration // latency to the last of them so far
	done    chan struct{} // closed when got == want
}

func (c *change) delivered(d time.Duration, _ time.Time) {
	c.got++
	if d > c.last {
		c.last = d
	}
	if c.got == c.want {
		close(c.done)
	}
}

// driver writes a stream of endpoint changes at a fixed rate.
type driver struct {
	t   *topology
	w   *writer
	tr  *tracker
	rng *rand.Rand
	// busy holds the meshed services with a change in flight: one change
	// per service at a time, so every expectation is unambiguous.
	busy    map[string]*change
	changes []*change
	// Timeout is how long a change may wait for its sidecars before the
	// service is reused anyway (its missing deliveries are counted at the
	// end).
	Timeout time.Duration
	// Mix is the share of each kind, in percent: sidecar health, plain
	// health, scale (out or in, alternating per service).
	Mix [3]int
}

func (d *driver) run(ctx context.Context, n int, rate float64) error {
	tick := time.NewTicker(time.Duration(float64(time.Second) / rate))
	defer tick.Stop()
	for i := range n {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-tick.C:
		}
		if err := d.one(ctx, i); err != nil {
			return err
		}
	}
	return nil
}

// freeService returns a random meshed service with no change in flight.
func (d *driver) freeService() *service {
	for name, c := range d.busy {
		select {
		case <-c.done:
			delete(d.busy, name)
		default:
			if time.Since(c.t0) > d.Timeout {
				delete(d.busy, name)
			}
		}
	}
	meshed := d.meshed()
	for range 1000 {
		s := meshed[d.rng.IntN(len(meshed))]
		if d.busy[s.name] == nil {
			return s
		}
	}
	return nil
}

// scaledIn returns, every other time, a meshed service scaled out
// before and free now (nil otherwise), so scale-outs and scale-ins
// alternate.
func (d *driver) scaledIn() *service {
	if d.rng.IntN(2) == 0 {
		return nil
	}
	var out []*service
	for _, s := range d.meshed() {
		if s.extra != nil {
			out = append(out, s)
		}
	}
	d.freeService() // releases services whose change is done
	for _, i := range d.rng.Perm(len(out)) {
		if d.busy[out[i].name] == nil {
			return out[i]
		}
	}
	return nil
}

func (d *driver) meshed() []*service {
	n := 0
	for n < len(d.t.services) && len(d.t.services[n].sidecars) > 0 {
		n++
	}
	return d.t.services[:n]
}

func (d *driver) one(ctx context.Context, i int) error {
	r := d.rng.IntN(d.Mix[0] + d.Mix[1] + d.Mix[2])
	ch := &change{n: i, done: make(chan struct{})}
	switch {
	case r < d.Mix[0]:
		s := d.freeService()
		if s == nil {
			return fmt.Errorf("no meshed service free for a change: lower -rate")
		}
		sc := s.sidecars[d.rng.IntN(len(s.sidecars))]
		in := sc.inst
		in.critical = !in.critical
		ch.kind, ch.service = kindSidecarHealth, s.name
		d.tr.expect(ch, d.downstreamIDs(s.name), s.name, sc.endpoint(), !in.critical)
		d.busy[s.name] = ch
		ch.t0 = time.Now()
		if err := d.w.setCheck(ctx, s, in, in.critical); err != nil {
			return err
		}
	case r < d.Mix[0]+d.Mix[1]:
		s := d.t.services[d.rng.IntN(len(d.t.services))]
		var plain []*instance
		for _, in := range s.instances {
			if in.sidecar == nil {
				plain = append(plain, in)
			}
		}
		if len(plain) == 0 {
			return d.one(ctx, i)
		}
		in := plain[d.rng.IntN(len(plain))]
		in.critical = !in.critical
		ch.kind, ch.service = kindPlainHealth, s.name
		close(ch.done)
		ch.t0 = time.Now()
		if err := d.w.setCheck(ctx, s, in, in.critical); err != nil {
			return err
		}
	default:
		s := d.scaledIn()
		if s == nil {
			s = d.freeService()
		}
		if s == nil {
			return fmt.Errorf("no meshed service free for a change: lower -rate")
		}
		ch.service = s.name
		d.busy[s.name] = ch
		if s.extra == nil {
			nd := d.t.nodes[d.rng.IntN(len(d.t.nodes))]
			in := &instance{id: s.name + "-x", checkID: s.name + "-x-check", node: nd, port: 8100}
			in.sidecar = &sidecar{id: in.id + "-sidecar-proxy", service: s.name, inst: in, port: 21100}
			if err := d.w.register(ctx, d.t.instanceReg(s, in)); err != nil {
				return err
			}
			s.extra = in
			ch.kind = kindScaleOut
			d.tr.expect(ch, d.downstreamIDs(s.name), s.name, in.sidecar.endpoint(), true)
			ch.t0 = time.Now()
			if err := d.w.register(ctx, d.t.sidecarReg(in.sidecar)); err != nil {
				return err
			}
		} else {
			in := s.extra
			ch.kind = kindScaleIn
			d.tr.expect(ch, d.downstreamIDs(s.name), s.name, in.sidecar.endpoint(), false)
			ch.t0 = time.Now()
			if err := d.w.deregister(ctx, in.node.name, in.sidecar.id); err != nil {
				return err
			}
			ch.write = time.Since(ch.t0)
			s.extra = nil
			d.changes = append(d.changes, ch)
			return d.w.deregister(ctx, in.node.name, in.id)
		}
	}
	ch.write = time.Since(ch.t0)
	d.changes = append(d.changes, ch)
	return nil
}

func (d *driver) downstreamIDs(service string) []string {
	var ids []string
	for _, sc := range d.t.down[service] {
		ids = append(ids, sc.id)
	}
	return ids
}
