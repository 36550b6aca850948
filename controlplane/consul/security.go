package consul

import (
	"cmp"
	"context"
	"fmt"
	"reflect"
	"regexp"
	"slices"
	"sync"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/meshlet/meshlet/controlplane/model"
)

// watchRoots follows /v1/agent/connect/ca/roots.
func (w *Watcher) watchRoots(ctx context.Context, notify func()) {
	w.blockingLoop(ctx, "the Connect CA roots", noPermission, func(opts *api.QueryOptions) (*api.QueryMeta, func(), error) {
		list, meta, err := w.cfg.Client.Agent().ConnectCARoots(opts)
		if err != nil {
			return nil, nil, err
		}
		return meta, func() {
			ca := &model.CA{TrustDomain: list.TrustDomain}
			for _, r := range list.Roots {
				ca.Roots = append(ca.Roots, model.Root{ID: r.ID, CertPEM: r.RootCertPEM, Active: r.ID == list.ActiveRootID || r.Active})
			}
			slices.SortStableFunc(ca.Roots, func(a, b model.Root) int {
				if a.Active != b.Active {
					if a.Active {
						return -1
					}
					return 1
				}
				return cmp.Compare(a.ID, b.ID)
			})
			w.mu.Lock()
			if !reflect.DeepEqual(w.ca, ca) { // unchanged roots keep their value: no rebuild
				w.ca = ca
			}
			w.mu.Unlock()
			notify()
		}, nil
	})
}

// watchLeaf follows /v1/agent/connect/ca/leaf/<service>: the agent renews
// the certificate and answers the blocking query with the new one.
func (w *Watcher) watchLeaf(ctx context.Context, service string, notify func()) {
	w.blockingLoop(ctx, "the leaf certificate of "+service, "service:write on "+service, func(opts *api.QueryOptions) (*api.QueryMeta, func(), error) {
		leaf, meta, err := w.cfg.Client.Agent().ConnectCALeaf(service, opts)
		if err != nil {
			return nil, nil, err
		}
		return meta, func() {
			w.mu.Lock()
			w.leaves[service] = &model.Leaf{
				Service: service, CertPEM: leaf.CertPEM, KeyPEM: leaf.PrivateKeyPEM, SPIFFEID: leaf.ServiceURI,
				ValidAfter: leaf.ValidAfter, ValidBefore: leaf.ValidBefore, Serial: leaf.SerialNumber,
			}
			w.mu.Unlock()
			w.cfg.Logger.Info("consul: leaf certificate", "service", service, "serial", leaf.SerialNumber, "validBefore", leaf.ValidBefore)
			notify()
			if w.leafExposureChecked.CompareAndSwap(false, true) {
				w.checkLeafExposure(ctx, service)
			}
		}, nil
	})
}

// AnonymousToken is the secret ID of Consul's anonymous token: a request
// carrying it is treated as one with no token.
const AnonymousToken = "anonymous"

// checkLeafExposure asks the agent, once, for service's leaf certificate
// as the anonymous token. Consul 1.19's agent answers
// /v1/agent/connect/ca/leaf/<service> from its cache without checking the
// caller's token, so a leaf the control plane fetched is handed, key
// included, to anyone who can reach the agent's HTTP API; when it is, this
// says so, with the remedy.
func (w *Watcher) checkLeafExposure(ctx context.Context, service string) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	leaf, _, err := w.cfg.Client.Agent().ConnectCALeaf(service, (&api.QueryOptions{Token: AnonymousToken}).WithContext(ctx))
	if err != nil || leaf == nil || leaf.PrivateKeyPEM == "" {
		return
	}
	w.cfg.Logger.Warn("consul: this agent hands cached leaf certificates and their keys to requests without a token "+
		"(Consul answers /v1/agent/connect/ca/leaf from its cache without checking the caller): keep workloads from "+
		"reaching its HTTP API (bind it to loopback, or a NetworkPolicy letting only the control plane in); README, Security model",
		"agent", w.cfg.Address, "service", service)
}

// watchIntentions follows the service-intentions config entries.
func (w *Watcher) watchIntentions(ctx context.Context, notify func()) {
	warned := map[string]bool{} // the problems logged, by entry: once each
	w.blockingLoop(ctx, "the service intentions", "intentions:read on every service", func(opts *api.QueryOptions) (*api.QueryMeta, func(), error) {
		entries, meta, err := w.cfg.Client.ConfigEntries().List(api.ServiceIntentions, opts)
		if err != nil {
			return nil, nil, err
		}
		return meta, func() {
			out := map[string]*model.Intentions{}
			for _, e := range entries {
				if si, ok := e.(*api.ServiceIntentionsConfigEntry); ok {
					in, problems := convertIntentions(si)
					out[si.Name] = in
					for _, p := range problems {
						if key := si.Name + "\x00" + p; !warned[key] {
							warned[key] = true
							w.cfg.Logger.Warn("consul: an intention cannot be enforced as written; it fails closed",
								"entry", "service-intentions/"+si.Name, "problem", p)
						}
					}
				}
			}
			w.mu.Lock()
			// Unchanged intentions keep their value: the proxies of
			// their destination are not rebuilt (model.Catalog.Same).
			for dest, in := range out {
				if prev := w.intentions[dest]; prev != nil && reflect.DeepEqual(prev, in) {
					out[dest] = prev
				}
			}
			w.intentions, w.intentionsSeen = out, true
			w.mu.Unlock()
			notify()
		}, nil
	})
}

// convertIntentions turns a service-intentions entry into model rules,
// most precedent source first, and says what of it cannot be enforced as
// written (Consul validates entries when they are written; these are
// checked again so that no sidecar is sent an RBAC filter it must NACK):
// a source without a name is left out; a permission whose HTTP match is
// unusable (a header without a name or without exactly one match, a path
// or header regex RE2 does not compile) fails closed — an allow is left out, a deny denies every
// request of its source.
func convertIntentions(e *api.ServiceIntentionsConfigEntry) (*model.Intentions, []string) {
	in := &model.Intentions{Destination: e.Name}
	var problems []string
	srcs := slices.Clone(e.Sources)
	slices.SortStableFunc(srcs, func(a, b *api.SourceIntention) int { return cmp.Compare(b.Precedence, a.Precedence) })
	for i, s := range srcs {
		if s == nil || s.Peer != "" || s.SamenessGroup != "" {
			continue // cluster peering is not supported
		}
		if s.Name == "" {
			problems = append(problems, fmt.Sprintf("Sources[%d].Name: required; the source is left out", i))
			continue
		}
		src := model.IntentionSource{Name: s.Name, Action: string(s.Action), Origin: fmt.Sprintf("consul intention %s => %s", s.Name, e.Name)}
		for j, p := range s.Permissions {
			if p == nil {
				continue
			}
			perm := model.IntentionPermission{Action: string(p.Action)}
			if h := p.HTTP; h != nil {
				perm.HTTP = model.HTTPMatch{PathExact: h.PathExact, PathPrefix: h.PathPrefix, PathRegex: h.PathRegex, Methods: h.Methods}
				bad := badRegex(h.PathRegex, fmt.Sprintf("Sources[%d].Permissions[%d].HTTP.PathRegex", i, j))
				for k, hh := range h.Header {
					field := fmt.Sprintf("Sources[%d].Permissions[%d].HTTP.Header[%d]", i, j, k)
					kinds := 0
					for _, set := range []bool{hh.Present, hh.Exact != "", hh.Prefix != "", hh.Suffix != "", hh.Regex != ""} {
						if set {
							kinds++
						}
					}
					switch {
					case hh.Name == "":
						bad = cmp.Or(bad, field+".Name: required")
					case kinds != 1:
						bad = cmp.Or(bad, field+": exactly one of Present, Exact, Prefix, Suffix and Regex is required")
					default:
						bad = cmp.Or(bad, badRegex(hh.Regex, field+".Regex"))
					}
					perm.HTTP.Headers = append(perm.HTTP.Headers, model.HeaderMatch{
						Name: hh.Name, Exact: hh.Exact, Prefix: hh.Prefix, Suffix: hh.Suffix, Regex: hh.Regex, Present: hh.Present, Invert: hh.Invert,
					})
				}
				if bad != "" {
					if p.Action != api.IntentionActionDeny {
						problems = append(problems, bad+"; the allow is left out")
						continue
					}
					problems = append(problems, bad+"; the deny applies to every request")
					perm.HTTP = model.HTTPMatch{}
				}
			}
			src.Permissions = append(src.Permissions, perm)
		}
		in.Sources = append(in.Sources, src)
	}
	return in, problems
}

// badRegex is field's problem when re (non-empty) is not an RE2 regular
// expression (Envoy's safe_regex, which sidecars compile), else "".
func badRegex(re, field string) string {
	if re == "" {
		return ""
	}
	if _, err := regexp.Compile(re); err != nil {
		return field + ": " + err.Error()
	}
	return ""
}

// leafWatches runs one leaf watch per proxied service.
type leafWatches struct {
	w       *Watcher
	running map[string]context.CancelFunc
	wg      sync.WaitGroup
}

// sync starts watches for services that gained a proxy and stops those of
// services that lost all theirs.
func (l *leafWatches) sync(ctx context.Context, services []string, notify func()) {
	want := map[string]bool{}
	for _, s := range services {
		want[s] = true
		if _, ok := l.running[s]; ok {
			continue
		}
		sctx, cancel := context.WithCancel(ctx)
		l.running[s] = cancel
		l.wg.Add(1)
		go func() {
			defer l.wg.Done()
			l.w.watchLeaf(sctx, s, notify)
		}()
	}
	for s, cancel := range l.running {
		if !want[s] {
			cancel()
			delete(l.running, s)
			l.w.mu.Lock()
			delete(l.w.leaves, s)
			l.w.mu.Unlock()
		}
	}
}

func (l *leafWatches) stop() {
	for _, cancel := range l.running {
		cancel()
	}
	l.wg.Wait()
}
