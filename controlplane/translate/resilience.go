package translate

import (
	"cmp"
	"slices"
	"time"

	route "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"

	"github.com/meshlet/meshlet/controlplane/policy"
	"github.com/meshlet/meshlet/controlplane/xdsbuild"
	"github.com/meshlet/meshlet/xds"
)

// outboundRoutes returns the routes to service's cluster: one per distinct
// match of its RetryPolicy and TimeoutPolicy documents (one per method when
// the match lists methods), most specific first, then the default route
// ("/"). Each route takes the retry and timeout document with its exact
// match, else the service-wide one (no match), else the defaults; documents
// apply whole, fields are not merged across documents. Every document
// read (each shapes a route) is noted on n.
func outboundRoutes(pol *policy.Set, service, clusterName string, n note) []*route.Route {
	matches := map[string]*policy.Match{}
	retries := map[string]*policy.RetryPolicy{}
	timeouts := map[string]*policy.TimeoutPolicy{}
	for _, p := range pol.RetriesFor(service) {
		retries[p.Match.Key()] = p
		matches[p.Match.Key()] = p.Match
		n.add(retrySource(p))
	}
	for _, p := range pol.TimeoutsFor(service) {
		timeouts[p.Match.Key()] = p
		matches[p.Match.Key()] = p.Match
		n.add(timeoutSource(p))
	}
	keys := make([]string, 0, len(matches))
	for k := range matches {
		if k != "" {
			keys = append(keys, k)
		}
	}
	slices.SortFunc(keys, func(a, b string) int { return compareSpecificity(matches[a], matches[b]) })

	hash := ""
	if lb := pol.LoadBalancer(service); lb != nil && lb.Algorithm == policy.AlgorithmRingHash {
		hash = lb.HashHeader
		n.add(docSource(policy.KindLoadBalancerPolicy, lb.Name, lb.Source))
	}
	spec := func(name string, m *policy.Match, method string) *route.Route {
		key := m.Key()
		rp, ok := retries[key]
		if !ok {
			rp = retries[""]
		}
		tp, ok := timeouts[key]
		if !ok {
			tp = timeouts[""]
		}
		s := xdsbuild.RouteSpec{Name: name, Cluster: clusterName, Method: method, Retry: retrySpec(rp), HashHeader: hash}
		if m != nil {
			s.Path, s.PathPrefix = m.Path, m.PathPrefix
		}
		if tp != nil {
			s.Timeout, s.IdleTimeout, s.MaxStreamDuration = tp.Request.D(), tp.Idle.D(), tp.MaxStreamDuration.D()
		}
		return xdsbuild.NewRoute(s)
	}
	var out []*route.Route
	for _, k := range keys {
		m := matches[k]
		if len(m.Methods) == 0 {
			out = append(out, spec(k, m, ""))
			continue
		}
		methods := slices.Clone(m.Methods)
		slices.Sort(methods)
		base := (&policy.Match{Path: m.Path, PathPrefix: m.PathPrefix}).Key()
		for _, meth := range methods {
			out = append(out, spec(base+"|"+meth, m, meth))
		}
	}
	return append(out, spec("default", nil, ""))
}

// compareSpecificity orders matches most specific first: exact paths before
// prefixes, longer before shorter, with methods before without, then by key.
func compareSpecificity(a, b *policy.Match) int {
	rank := func(m *policy.Match) (int, int, int) {
		exact, length := 1, len(m.PathPrefix)
		if m.Path != "" {
			exact, length = 0, len(m.Path)
		}
		methods := 1
		if len(m.Methods) > 0 {
			methods = 0
		}
		return exact, -length, methods
	}
	ae, al, am := rank(a)
	be, bl, bm := rank(b)
	return cmp.Or(cmp.Compare(ae, be), cmp.Compare(al, bl), cmp.Compare(am, bm), cmp.Compare(a.Key(), b.Key()))
}

// retrySpec returns the retry policy of a route: p's, with defaults for
// what it leaves out, or the built-in policy when p is nil.
func retrySpec(p *policy.RetryPolicy) *xdsbuild.RetrySpec {
	s := &xdsbuild.RetrySpec{
		RetryOn:         policy.BuiltinRetryOn,
		NumRetries:      policy.DefaultNumRetries,
		BackoffBase:     policy.DefaultBackoffBase,
		BodyBufferBytes: policy.DefaultBodyBufferBytes,
	}
	if p != nil {
		s.RetryOn = p.RetryOn
		if len(s.RetryOn) == 0 {
			s.RetryOn = policy.DefaultRetryOn
		}
		if p.NumRetries != nil {
			s.NumRetries = *p.NumRetries
		}
		s.PerTryTimeout = p.PerTryTimeout.D()
		if b := p.Backoff; b != nil {
			if b.BaseInterval > 0 {
				s.BackoffBase = b.BaseInterval.D()
			}
			s.BackoffMax = b.MaxInterval.D()
		}
		if p.BodyBufferBytes != nil {
			s.BodyBufferBytes = uint32(*p.BodyBufferBytes)
		}
		if p.NonIdempotent == policy.NonIdempotentRetry {
			s.NonIdempotent = policy.NonIdempotentRetry
		}
		codes := p.RetriableStatusCodes
		if len(codes) == 0 && slices.Contains(s.RetryOn, xds.RetryRetriableStatusCodes) {
			codes = policy.DefaultRetriableStatusCodes
		}
		for _, c := range codes {
			s.RetriableStatusCodes = append(s.RetriableStatusCodes, uint32(c))
		}
	}
	if s.BackoffMax == 0 {
		s.BackoffMax = 10 * s.BackoffBase
	}
	return s
}

// tcpConnectAttempts is TcpProxy.max_connect_attempts for a TCP service:
// the first attempt plus the retries of its service-wide RetryPolicy (or the
// built-in one) when that retries on connect-failure. The service-wide
// RetryPolicy is noted on n.
func tcpConnectAttempts(pol *policy.Set, service string, n note) int {
	var p *policy.RetryPolicy
	for _, r := range pol.RetriesFor(service) {
		if r.Match == nil {
			p = r
		}
	}
	if p != nil {
		n.add(retrySource(p))
	}
	s := retrySpec(p)
	if !slices.Contains(s.RetryOn, xds.RetryConnectFailure) {
		return 1
	}
	return s.NumRetries + 1
}

// tcpIdleTimeout is TcpProxy.idle_timeout for a TCP service, and
// UdpProxyConfig.idle_timeout (the session's) for a UDP one: the idle of
// its service-wide TimeoutPolicy (a connection has no paths to match), 0
// when unset (the field stays unset: Envoy's defaults of 1 h for TCP, 1 min
// for UDP). Both ends take it: the callers' outbound listeners and the
// service's own inbound listener, so neither closes before the other. The
// TimeoutPolicy is noted on n when it sets the idle timeout.
func tcpIdleTimeout(pol *policy.Set, service string, n note) time.Duration {
	for _, t := range pol.TimeoutsFor(service) {
		if t.Match == nil {
			if t.Idle > 0 {
				n.add(timeoutSource(t))
			}
			return t.Idle.D()
		}
	}
	return 0
}

// clusterOptions applies the service-wide policies of service to o, noting
// on n each document that sets a field.
func clusterOptions(pol *policy.Set, service string, o xdsbuild.ClusterOptions, n note) xdsbuild.ClusterOptions {
	budget := &xds.RetryBudget{Ratio: policy.DefaultBudgetRatio, MinRetriesPerSecond: policy.DefaultBudgetMinPerSecond, TTL: xds.Duration(policy.DefaultBudgetTTL)}
	for _, r := range pol.RetriesFor(service) {
		if b := r.Budget; r.Match == nil && b != nil {
			n.add(retrySource(r))
			if b.Ratio != nil {
				budget.Ratio = *b.Ratio
			}
			if b.MinRetriesPerSecond != nil {
				budget.MinRetriesPerSecond = *b.MinRetriesPerSecond
			}
			if b.TTL > 0 {
				budget.TTL = xds.Duration(b.TTL)
			}
		}
	}
	o.Extras = &xds.ClusterExtras{RetryBudget: budget}
	for _, t := range pol.TimeoutsFor(service) {
		if t.Match == nil && t.Connect > 0 {
			o.ConnectTimeout = t.Connect.D()
			n.add(timeoutSource(t))
		}
	}
	if cb := pol.CircuitBreaker(service); cb != nil {
		n.add(docSource(policy.KindCircuitBreakerPolicy, cb.Name, cb.Source))
		o.Thresholds = &xdsbuild.Thresholds{
			MaxConnections:     or(cb.MaxConnections, policy.DefaultMaxConnections),
			MaxPendingRequests: or(cb.MaxPendingRequests, policy.DefaultMaxPendingRequests),
			MaxRequests:        or(cb.MaxRequests, policy.DefaultMaxRequests),
			MaxRetries:         or(cb.MaxRetries, policy.DefaultMaxRetries),
		}
		if e := cb.Endpoint; e != nil {
			eb := &xds.EndpointBreaker{
				ConsecutiveFailures: or(e.ConsecutiveFailures, policy.DefaultBreakerConsecutiveFailures),
				MinRequests:         or(e.MinRequests, policy.DefaultBreakerMinRequests),
				Interval:            xds.Duration(durOr(e.Interval, policy.DefaultBreakerInterval)),
				OpenInterval:        xds.Duration(durOr(e.OpenInterval, policy.DefaultBreakerOpenInterval)),
				HalfOpenRequests:    or(e.HalfOpenRequests, policy.DefaultBreakerHalfOpenRequests),
			}
			if e.FailureRatio != nil {
				eb.FailureRatio = *e.FailureRatio
			} else {
				eb.MinRequests = 0
			}
			o.Extras.EndpointBreaker = eb
		}
	}
	if od := pol.OutlierDetection(service); od != nil {
		n.add(docSource(policy.KindOutlierDetectionPolicy, od.Name, od.Source))
		o.Outlier = &xdsbuild.OutlierSpec{
			Consecutive5xx:                 or(od.Consecutive5xx, policy.DefaultConsecutive5xx),
			ConsecutiveGatewayErrors:       or(od.ConsecutiveGatewayErrors, 0),
			ConsecutiveLocalOriginFailures: or(od.ConsecutiveLocalOriginFailures, policy.DefaultConsecutiveLocalOriginFailures),
			Interval:                       durOr(od.Interval, policy.DefaultOutlierInterval),
			BaseEjectionTime:               durOr(od.BaseEjectionTime, policy.DefaultBaseEjectionTime),
			MaxEjectionTime:                durOr(od.MaxEjectionTime, policy.DefaultMaxEjectionTime),
			MaxEjectionPercent:             or(od.MaxEjectionPercent, policy.DefaultMaxEjectionPercent),
		}
	}
	if lb := pol.LoadBalancer(service); lb != nil {
		n.add(docSource(policy.KindLoadBalancerPolicy, lb.Name, lb.Source))
		switch lb.Algorithm {
		case policy.AlgorithmLeastRequest:
			o.LB = xdsbuild.LBLeastRequest
		case policy.AlgorithmRingHash:
			o.LB = xdsbuild.LBRingHash
		}
	}
	return o
}

func or(p *int, def int) uint32 {
	if p != nil {
		return uint32(*p)
	}
	return uint32(def)
}

func durOr(d policy.Duration, def time.Duration) time.Duration {
	if d > 0 {
		return d.D()
	}
	return def
}
