// Package consul watches a Consul agent with blocking queries and turns what
// it sees into model.Catalog values: every service's instances with their
// health, and every connect-proxy registration with its upstreams. It knows
// nothing of xDS.
package consul

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cenkalti/backoff/v5"
	"github.com/hashicorp/consul/api"

	"github.com/meshlet/meshlet/controlplane/model"
)

// Defaults for Config.
const (
	// DefaultWaitTime is the longest a blocking query waits (Consul's
	// "wait" parameter; Consul caps it at 10 min).
	DefaultWaitTime = 5 * time.Minute
	// DefaultMinBackoff and DefaultMaxBackoff bound the jittered exponential
	// backoff between failed queries.
	DefaultMinBackoff = 200 * time.Millisecond
	DefaultMaxBackoff = 5 * time.Second
	// DefaultRecoveryGrace is how long after a failed query answers again
	// a service whose every sidecar turned critical keeps the ones healthy
	// before (see Config.RecoveryGrace): Consul's default check interval
	// is 10 s, and a restarted agent restores TTL checks as critical until
	// their next update.
	DefaultRecoveryGrace = 30 * time.Second
)

// Config configures a Watcher.
type Config struct {
	// Client talks to the Consul agent. Required.
	Client *api.Client
	// Address is the agent's address, used in log lines only.
	Address string
	// Logger receives state changes (agent unreachable, reachable again).
	// Defaults to slog.Default().
	Logger *slog.Logger
	// WaitTime bounds each blocking query; defaults to DefaultWaitTime.
	WaitTime time.Duration
	// MinBackoff and MaxBackoff bound retry delays after a failed query;
	// defaults DefaultMinBackoff and DefaultMaxBackoff.
	MinBackoff, MaxBackoff time.Duration
	// Anonymous tells that Client sends no ACL token: when the agent
	// answers that its ACLs default to deny, the Watcher says, once, that
	// it sees only what Consul's anonymous token may read (Consul filters
	// the answers to an anonymous request without saying so).
	Anonymous bool
	// RecoveryGrace is how long after one of its queries failed and then
	// answered again (the agent restarted, or was unreachable) the Watcher
	// keeps as endpoints the sidecars of a service that were healthy
	// before when every sidecar of it is critical, for any reason: a
	// restarted agent restores its services' TTL checks as critical, and
	// HTTP/TCP checks start critical, until their next update or run, so
	// its first answers would look like every instance failing. Outside
	// that window only sidecars failed by node checks alone are kept (see
	// catalogBuilder.build). DefaultRecoveryGrace when 0; negative turns
	// the window off.
	RecoveryGrace time.Duration
}

func (c *Config) setDefaults() {
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	if c.WaitTime == 0 {
		c.WaitTime = DefaultWaitTime
	}
	if c.MinBackoff == 0 {
		c.MinBackoff = DefaultMinBackoff
	}
	if c.MaxBackoff == 0 {
		c.MaxBackoff = DefaultMaxBackoff
	}
	if c.RecoveryGrace == 0 {
		c.RecoveryGrace = DefaultRecoveryGrace
	}
}

// Validate reports a missing Client.
func (c *Config) Validate() error {
	if c.Client == nil {
		return errors.New("consul: Config.Client is required")
	}
	return nil
}

// Watcher runs one blocking query on the catalog's service list and one per
// service on its health endpoint (/v1/health/service/<name>, all instances
// with their checks). Each change produces a new Catalog, which keeps the
// values of the previous one for what did not change.
//
// Each blocking query holds one HTTP connection to the agent: N service
// names (a sidecar's connect-proxy registration is a name of its own) and P
// services with proxies (their leaf certificates) take N+P+3. An agent lets
// one address hold limits.http_max_conns_per_client of them (200 by
// default), so a mesh of more than about 60 services with sidecars needs
// that limit raised; the Watcher logs so when the agent refuses.
type Watcher struct {
	cfg Config

	// reachable is the last known state of the agent, for logging only
	// transitions: 1 reachable, 0 unreachable, -1 unknown (start).
	reachable atomic.Int32
	// queries counts the blocking queries running now (each holds one
	// HTTP connection to the agent); limitLogged is when the agent's
	// connection limit was last reported, csrLogged the Connect CA's
	// signing rate limit (unix nanoseconds).
	queries     atomic.Int64
	limitLogged atomic.Int64
	csrLogged   atomic.Int64
	// lastAnswer is when a query last had an answer (unix nanoseconds):
	// a failure within outageAfter of it is not an outage.
	lastAnswer atomic.Int64
	// recovered is when a query that had failed (the agent unreachable or
	// answering 5xx) last answered again (unix nanoseconds), the start of
	// Config.RecoveryGrace.
	recovered atomic.Int64
	// anonymousLogged is set once the lack of a token has been reported;
	// unknownToken while Consul does not know the token (reported once,
	// whichever query learns it first).
	anonymousLogged atomic.Bool
	unknownToken    atomic.Bool
	// leafExposureChecked is set once checkLeafExposure has run.
	leafExposureChecked atomic.Bool

	// builder converts entries into Catalogs; only Run's goroutine uses it.
	builder *catalogBuilder
	// held is the builder's held services at the last build (logHeld);
	// only Run's goroutine uses it.
	held map[string][]string
	// graceTimer calls rebuild (Run's notify) when the recovery grace of
	// a service held through it ends (Run's goroutine only).
	graceTimer *time.Timer
	rebuild    func()

	mu sync.Mutex // guards the fields below
	// entries by service name; nil until that service's first answer.
	entries map[string][]*api.ServiceEntry
	// dirty names the services whose entries changed (or that went away)
	// since builder last saw them.
	dirty map[string]bool
	// listed is the latest service list, nil before the first answer.
	listed map[string]bool
	// ca, leaves (by service) and intentions (by destination) come from
	// the Connect CA and the service-intentions config entries.
	ca         *model.CA
	leaves     map[string]*model.Leaf
	intentions map[string]*model.Intentions
	// intentionsSeen is set once the intentions have answered: no Catalog
	// is published before, so no proxy starts on a deny-all that only
	// reflects intentions not read yet (a control plane restart).
	intentionsSeen bool
}

// New returns a Watcher for cfg, or an error from cfg.Validate.
func New(cfg Config) (*Watcher, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	cfg.setDefaults()
	w := &Watcher{cfg: cfg, builder: newCatalogBuilder(), entries: map[string][]*api.ServiceEntry{}, dirty: map[string]bool{},
		leaves: map[string]*model.Leaf{}, intentions: map[string]*model.Intentions{}}
	w.reachable.Store(-1)
	return w, nil
}

// Run watches until ctx is done and calls publish with a new Catalog after
// every change, from one goroutine, never concurrently. Changes arriving
// while publish runs are coalesced into the next call. The first Catalog is
// published once every listed service and the intentions have answered
// once. Besides the
// catalog it follows the Connect CA roots, the service-intentions config
// entries, and the leaf certificate of every service that has a proxy. Run
// returns ctx.Err() after all its goroutines have stopped.
func (w *Watcher) Run(ctx context.Context, publish func(*model.Catalog)) error {
	changed := make(chan struct{}, 1)
	notify := func() {
		select {
		case changed <- struct{}{}:
		default:
		}
	}
	w.rebuild = notify
	defer func() {
		if w.graceTimer != nil {
			w.graceTimer.Stop()
		}
	}()
	var wg sync.WaitGroup
	for _, loop := range []func(context.Context, func()){w.watchServiceList, w.watchRoots, w.watchIntentions} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			loop(ctx, notify)
		}()
	}
	leaves := &leafWatches{w: w, running: map[string]context.CancelFunc{}}
	for {
		select {
		case <-ctx.Done():
			leaves.stop()
			wg.Wait()
			return ctx.Err()
		case <-changed:
			if cat, ok := w.snapshot(); ok {
				leaves.sync(ctx, cat.ProxiedServices(), notify)
				publish(cat)
			}
		}
	}
}

// watchServiceList follows /v1/catalog/services and runs one service watch
// per listed service, stopping the watches of services that disappear.
func (w *Watcher) watchServiceList(ctx context.Context, notify func()) {
	type running struct {
		cancel context.CancelFunc
		done   chan struct{}
	}
	watches := map[string]running{}
	defer func() {
		for _, r := range watches {
			r.cancel()
			<-r.done
		}
	}()
	apply := func(services map[string][]string) {
		listed := map[string]bool{}
		for name := range services {
			if name == "consul" {
				continue
			}
			listed[name] = true
			if _, ok := watches[name]; !ok {
				sctx, cancel := context.WithCancel(ctx)
				r := running{cancel: cancel, done: make(chan struct{})}
				watches[name] = r
				go func() {
					defer close(r.done)
					w.watchService(sctx, name, notify)
				}()
			}
		}
		for name, r := range watches {
			if !listed[name] {
				r.cancel()
				<-r.done
				delete(watches, name)
			}
		}
		w.mu.Lock()
		w.listed = listed
		for name := range w.entries {
			if !listed[name] {
				delete(w.entries, name)
				w.dirty[name] = true
			}
		}
		w.mu.Unlock()
		notify()
	}
	w.blockingLoop(ctx, "the service list", "service:read on every service", func(opts *api.QueryOptions) (*api.QueryMeta, func(), error) {
		services, meta, err := w.cfg.Client.Catalog().Services(opts)
		if err != nil {
			return nil, nil, err
		}
		return meta, func() { apply(services) }, nil
	})
}

// watchService follows /v1/health/service/<name>.
func (w *Watcher) watchService(ctx context.Context, name string, notify func()) {
	w.blockingLoop(ctx, "the instances of "+name, "service:read on "+name+" and node:read on every node", func(opts *api.QueryOptions) (*api.QueryMeta, func(), error) {
		entries, meta, err := w.cfg.Client.Health().Service(name, "", false, opts)
		if err != nil {
			return nil, nil, err
		}
		return meta, func() {
			w.mu.Lock()
			w.entries[name] = entries
			w.dirty[name] = true
			w.mu.Unlock()
			notify()
		}, nil
	})
}

// blockingLoop runs query as a Consul blocking query until ctx is done
// (consul api/watch/plan.go): WaitIndex from the last LastIndex, reset to 0
// when the index goes backwards, results with an unchanged index skipped,
// capped jittered exponential backoff on error. query returns the result's
// meta and a function that applies the result, called only when the index
// changed. what names the result in logs ("the leaf certificate of api");
// needs is the ACL permission without which Consul filters the result
// ("service:read on every service"), named in the warning logged when the
// answer says Consul left something out (X-Consul-Results-Filtered-By-ACLs).
// noPermission is blockingLoop's needs for a query any token may make.
const noPermission = "no permission"

func (w *Watcher) blockingLoop(ctx context.Context, what, needs string, query func(*api.QueryOptions) (*api.QueryMeta, func(), error)) {
	var index uint64
	bo := backoff.NewExponentialBackOff()
	bo.InitialInterval = w.cfg.MinBackoff
	bo.MaxInterval = w.cfg.MaxBackoff
	bo.Reset()
	w.queries.Add(1)
	defer w.queries.Add(-1)
	// denied is set while this query's ACL refusal is reported, filtered
	// while its answers are filtered by ACLs: only transitions are logged.
	var denied, filtered bool
	// failed is set while this query fails for want of an answer (not
	// refused by ACLs or limits), for Config.RecoveryGrace.
	failed := false
	for ctx.Err() == nil {
		opts := (&api.QueryOptions{WaitIndex: index, WaitTime: w.cfg.WaitTime}).WithContext(ctx)
		meta, apply, err := query(opts)
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			switch se := (api.StatusError{}); {
			case errors.As(err, &se) && se.Code == http.StatusTooManyRequests && strings.Contains(se.Body, "Rate limit reached"):
				// The Connect CA's signing rate limit (csr_max_per_second),
				// not the connection limit: leaves come as the CA allows.
				w.csrRateLimited(what, err)
			case errors.As(err, &se) && se.Code == http.StatusTooManyRequests:
				w.connectionLimit(what, err)
			case errors.As(err, &se) && se.Code == http.StatusForbidden:
				// The agent answered: it is reachable, the token may
				// not do this.
				w.reached()
				if !denied {
					denied = w.aclDenied(aclError(err, what))
				} else {
					w.cfg.Logger.Debug("consul: query refused by ACLs", "query", what, "error", err)
				}
			case time.Now().UnixNano()-w.limitLogged.Load() < int64(time.Minute):
				// Over its limit the agent also answers 429 on
				// connections idle in the pool and closes them:
				// not an outage.
				w.cfg.Logger.Debug("consul: query failed while over the connection limit", "query", what, "error", err)
			default:
				failed = true
				w.unreachable(what, err)
			}
			select {
			case <-ctx.Done():
				return
			case <-time.After(bo.NextBackOff()):
			}
			continue
		}
		w.reached()
		if failed {
			failed = false
			w.recovered.Store(time.Now().UnixNano())
		}
		if needs != noPermission {
			// A query that needs no permission (the CA roots) answers even
			// for a token Consul does not know: it proves nothing, and
			// clearing the flag would report the unknown token again.
			w.unknownToken.Store(false)
		}
		bo.Reset()
		if denied {
			denied = false
			w.cfg.Logger.Info("consul: the ACL token is allowed "+what+" now", "agent", w.cfg.Address)
		}
		if meta == nil {
			meta = &api.QueryMeta{}
		}
		if w.cfg.Anonymous && meta.DefaultACLPolicy == "deny" && w.anonymousLogged.CompareAndSwap(false, true) {
			w.cfg.Logger.Error("consul: the agent's ACLs default to deny and the control plane gives no ACL token: "+
				"Consul answers it only what the anonymous token may read (nothing, by default), so the mesh looks empty; "+
				"give it a token with the rules of controlplane/consul.ControlPlaneACLRules (-consul-token or "+
				"CONSUL_HTTP_TOKEN; README, Consul ACLs)", "agent", w.cfg.Address)
		}
		if meta.ResultsFilteredByACLs != filtered {
			filtered = meta.ResultsFilteredByACLs
			w.aclFiltered(what, needs, filtered)
		}
		next := meta.LastIndex
		if next == index && index != 0 {
			continue // the wait timed out with nothing new
		}
		apply()
		switch {
		case next < index:
			index = 0 // the index went backwards (agent restart, snapshot restore): start over
		case next == 0:
			index = 1 // never block on index 0, which returns at once
		default:
			index = next
		}
	}
}

// aclDenied reports a query Consul refused for the ACL token (HTTP 403)
// with an error naming the missing permission, and reports whether it did:
// an unknown token is reported once for all the queries (until one
// succeeds), the others log it at debug level.
func (w *Watcher) aclDenied(err *ACLError) bool {
	if err.TokenNotFound && w.unknownToken.Swap(true) {
		w.cfg.Logger.Debug("consul: query refused by ACLs", "error", err)
		return false
	}
	w.cfg.Logger.Error(err.Error()+"; the control plane's token needs the rules of controlplane/consul.ControlPlaneACLRules "+
		"(README, Consul ACLs); retrying with backoff", "agent", w.cfg.Address, "consul", err.Body)
	return true
}

// aclFiltered reports that Consul left part of a query's answer out
// because the ACL token may not read it (filtered), or that it no longer
// does.
func (w *Watcher) aclFiltered(what, needs string, filtered bool) {
	if !filtered {
		w.cfg.Logger.Info("consul: "+what+" no longer filtered by ACLs", "agent", w.cfg.Address)
		return
	}
	w.cfg.Logger.Warn("consul: ACL token lacks "+needs+": Consul left part of "+what+" out of its answer "+
		"(X-Consul-Results-Filtered-By-ACLs), so the mesh misses what the token may not read; the control plane's "+
		"token needs the rules of controlplane/consul.ControlPlaneACLRules (README, Consul ACLs)", "agent", w.cfg.Address)
}

// connectionLimit reports, at most once a minute, that the agent refuses
// connections beyond its per-client limit: the agent is reachable, but
// the watcher needs one connection per blocking query.
func (w *Watcher) connectionLimit(what string, err error) {
	if !onceAMinute(&w.limitLogged) {
		w.cfg.Logger.Debug("consul: query refused by the connection limit", "query", what, "error", err)
		return
	}
	w.cfg.Logger.Error("consul: the agent refuses more concurrent connections from this address "+
		"(HTTP 429: its limits.http_max_conns_per_client, 200 by default, is reached); the control plane "+
		"holds one blocking query, hence one connection, per Consul service name and per proxied service's "+
		"leaf certificate: raise the limit on the agent above the number of queries; retrying with backoff",
		"agent", w.cfg.Address, "queries", w.queries.Load(), "query", what, "error", err)
}

// onceAMinute reports whether a minute has passed since *last (unix
// nanoseconds), and if so moves it to now: one caller wins.
func onceAMinute(last *atomic.Int64) bool {
	now := time.Now().UnixNano()
	l := last.Load()
	return now-l >= int64(time.Minute) && last.CompareAndSwap(l, now)
}

// csrRateLimited reports, at most once a minute, that the Connect CA
// refuses to sign leaf certificates faster than its csr_max_per_second
// (HTTP 429 "Rate limit reached"): the proxies of the services still
// waiting keep their last config until their leaf comes.
func (w *Watcher) csrRateLimited(what string, err error) {
	if !onceAMinute(&w.csrLogged) {
		w.cfg.Logger.Debug("consul: leaf certificate signing rate-limited", "query", what, "error", err)
		return
	}
	w.cfg.Logger.Warn("consul: the Connect CA rate-limits leaf certificate signing (HTTP 429: its "+
		"csr_max_per_second, 50 by default); proxies of services without a leaf yet keep their last config; "+
		"retrying with backoff", "agent", w.cfg.Address, "query", what, "error", err)
}

// outageAfter is how long after the last answer a failed query means the
// agent is unreachable.
const outageAfter = time.Second

func (w *Watcher) unreachable(what string, err error) {
	if time.Now().UnixNano()-w.lastAnswer.Load() < int64(outageAfter) {
		// Another query had an answer just now: this connection failed
		// (closed by the agent over its connection limit before any 429,
		// an idle pooled connection), the agent did not.
		w.cfg.Logger.Debug("consul: query failed", "query", what, "error", err)
		return
	}
	if w.reachable.Swap(0) != 0 {
		w.cfg.Logger.Error("consul: agent unreachable; retrying with backoff, last good state kept",
			"agent", w.cfg.Address, "query", what, "error", err)
		return
	}
	w.cfg.Logger.Debug("consul: query failed", "query", what, "error", err)
}

func (w *Watcher) reached() {
	w.lastAnswer.Store(time.Now().UnixNano())
	if old := w.reachable.Swap(1); old == 0 {
		w.cfg.Logger.Info("consul: agent reachable again", "agent", w.cfg.Address)
	} else if old == -1 {
		w.cfg.Logger.Info("consul: connected", "agent", w.cfg.Address)
	}
}

// snapshot builds a Catalog from the current entries, and false until every
// listed service has answered once. Only the services whose entries changed
// since the last Catalog are converted again; what did not change keeps its
// values (see catalogBuilder). Only Run's goroutine calls it.
func (w *Watcher) snapshot() (*model.Catalog, bool) {
	w.mu.Lock()
	if w.listed == nil || !w.intentionsSeen {
		w.mu.Unlock()
		return nil, false
	}
	for name := range w.listed {
		if _, ok := w.entries[name]; !ok {
			w.mu.Unlock()
			return nil, false
		}
	}
	changed := make(map[string][]*api.ServiceEntry, len(w.dirty))
	var removed []string
	for name := range w.dirty {
		if es, ok := w.entries[name]; ok && w.listed[name] {
			changed[name] = es
		} else {
			removed = append(removed, name)
		}
	}
	clear(w.dirty)
	ca := w.ca
	leaves := make(map[string]*model.Leaf, len(w.leaves))
	for k, v := range w.leaves {
		leaves[k] = v
	}
	intentions := w.intentions
	w.mu.Unlock()
	for _, name := range removed {
		w.builder.remove(name)
	}
	for name, es := range changed {
		w.builder.update(name, es)
	}
	graceEnd := time.Unix(0, w.recovered.Load()).Add(w.cfg.RecoveryGrace)
	w.builder.recovering = w.recovered.Load() != 0 && time.Now().Before(graceEnd)
	cat := w.builder.build()
	cat.CA, cat.Leaves, cat.Intentions = ca, leaves, intentions
	w.logHeld(w.builder.heldServices(), graceEnd)
	if w.builder.heldInGrace {
		// Build again when the window closes: what is still critical
		// then leaves the endpoints.
		if w.graceTimer == nil {
			w.graceTimer = time.AfterFunc(time.Until(graceEnd)+10*time.Millisecond, func() {
				if w.rebuild != nil {
					w.rebuild()
				}
			})
		} else {
			w.graceTimer.Reset(time.Until(graceEnd) + 10*time.Millisecond)
		}
	}
	return cat, true
}

// logHeld logs the services whose every sidecar turned critical (their
// last healthy ones kept as endpoints, see catalogBuilder.build) when that
// starts, and when it ends.
func (w *Watcher) logHeld(held map[string][]string, graceEnd time.Time) {
	for svc, ids := range held {
		if _, ok := w.held[svc]; !ok && w.builder.recovering {
			w.cfg.Logger.Warn("consul: every sidecar of "+svc+" is critical just after the agent answered again; keeping the ones healthy before "+
				"as its endpoints until one passes or the recovery grace ends (a restarted agent restores TTL checks as critical and "+
				"starts HTTP/TCP checks critical until their next update: its first answers must not look like every instance failing)",
				"service", svc, "kept", strings.Join(ids, ","), "until", graceEnd.Format(time.RFC3339), "agent", w.cfg.Address)
		} else if !ok {
			w.cfg.Logger.Warn("consul: every sidecar of "+svc+" is critical at once; keeping the ones healthy before as its endpoints "+
				"(panic routing, as Envoy's healthy_panic_threshold) until one passes again or they deregister: a Consul outage "+
				"(a node's serfHealth failing while its agent is frozen or restarting) must not look like every instance left; "+
				"callers' retries and outlier detection still steer around any that is really down",
				"service", svc, "kept", strings.Join(ids, ","), "agent", w.cfg.Address)
		}
	}
	for svc := range w.held {
		if _, ok := held[svc]; !ok {
			w.cfg.Logger.Info("consul: "+svc+"'s sidecars are no longer held (one passes again, they deregistered, or the recovery grace ended); its endpoints follow Consul's health again", "service", svc)
		}
	}
	w.held = maps.Clone(held)
}

// String describes the watcher for logs.
func (w *Watcher) String() string { return fmt.Sprintf("consul watcher (%s)", w.cfg.Address) }
