package policy

import (
	"fmt"
	"math"
	"slices"
	"strings"
	"time"

	"github.com/meshlet/meshlet/xds"
	"go.yaml.in/yaml/v3"
)

// Kinds of resilience policy documents. Each targets a destination service
// (spec.service) and applies in the sidecars of its callers.
const (
	// KindRetryPolicy configures retries (Envoy RouteAction.retry_policy).
	KindRetryPolicy = "RetryPolicy"
	// KindTimeoutPolicy configures timeouts (Envoy RouteAction.timeout,
	// idle_timeout, max_stream_duration, Cluster.connect_timeout; for TCP
	// services TcpProxy.idle_timeout).
	KindTimeoutPolicy = "TimeoutPolicy"
	// KindCircuitBreakerPolicy configures connection-pool limits (Envoy
	// Cluster.circuit_breakers) and a per-endpoint breaker (gobreaker).
	KindCircuitBreakerPolicy = "CircuitBreakerPolicy"
	// KindOutlierDetectionPolicy configures ejection of failing endpoints
	// (Envoy Cluster.outlier_detection).
	KindOutlierDetectionPolicy = "OutlierDetectionPolicy"
	// KindLoadBalancerPolicy chooses the load-balancing algorithm (Envoy
	// Cluster.lb_policy, RouteAction.hash_policy).
	KindLoadBalancerPolicy = "LoadBalancerPolicy"
)

// Duration is a YAML duration written with a unit ("250ms", "5s", "1m").
// A bare number is refused, so "5" cannot silently mean 5 ns.
type Duration time.Duration

// UnmarshalYAML parses a Go duration string. Its error is a
// *yaml.TypeError, so decoding goes on with the other fields.
func (d *Duration) UnmarshalYAML(n *yaml.Node) error {
	bad := &yaml.TypeError{Errors: []string{fmt.Sprintf("must be a duration with a unit, like 250ms or 5s (got %q)", n.Value)}}
	if n.Kind != yaml.ScalarNode || n.Tag == "!!int" || n.Tag == "!!float" {
		return bad
	}
	v, err := time.ParseDuration(n.Value)
	if err != nil {
		return bad
	}
	*d = Duration(v)
	return nil
}

// MarshalYAML writes the duration as a string.
func (d Duration) MarshalYAML() (any, error) { return time.Duration(d).String(), nil }

// D returns the duration as a time.Duration.
func (d Duration) D() time.Duration { return time.Duration(d) }

// Match selects the requests of a destination service that a route-level
// policy (RetryPolicy, TimeoutPolicy) applies to. At most one of PathPrefix
// and Path; no match at all means every request. Methods (uppercase tokens)
// match the :method pseudo-header. It becomes an Envoy RouteMatch.
type Match struct {
	PathPrefix string   `yaml:"pathPrefix,omitempty"`
	Path       string   `yaml:"path,omitempty"`
	Methods    []string `yaml:"methods,omitempty"`
}

// Key identifies a match for conflict checks and route naming: "" for no
// match, else "prefix:/v1/|GET,POST" style.
func (m *Match) Key() string {
	if m == nil {
		return ""
	}
	k := "prefix:/"
	switch {
	case m.Path != "":
		k = "path:" + m.Path
	case m.PathPrefix != "":
		k = "prefix:" + m.PathPrefix
	}
	if len(m.Methods) > 0 {
		ms := slices.Clone(m.Methods)
		slices.Sort(ms)
		k += "|" + strings.Join(ms, ",")
	}
	return k
}

func (m *Match) validate(v *validator, field string) {
	if m == nil {
		return
	}
	if m.Path != "" && m.PathPrefix != "" {
		v.errorf(field, "set pathPrefix or path, not both")
	}
	for _, f := range []struct{ name, val string }{{"pathPrefix", m.PathPrefix}, {"path", m.Path}} {
		if f.val != "" && !strings.HasPrefix(f.val, "/") {
			v.errorf(field+"."+f.name, "must start with \"/\" (got %q)", f.val)
		}
	}
	seen := map[string]bool{}
	for i, meth := range m.Methods {
		if meth == "" || strings.ToUpper(meth) != meth || strings.ContainsAny(meth, " \t/") {
			v.errorf(fmt.Sprintf("%s.methods[%d]", field, i), "must be an uppercase method token like GET or POST (got %q)", meth)
		}
		if seen[meth] {
			v.errorf(fmt.Sprintf("%s.methods[%d]", field, i), "method %s listed twice", meth)
		}
		seen[meth] = true
	}
}

// Retry conditions (Envoy retry_on values): HTTP ones and gRPC status codes
// read from the response headers of a trailers-only gRPC response, which
// meshlet's sidecar implements, then Envoy-only conditions (envoyRetryConditions).
var retryConditions = slices.Concat(xds.SidecarRetryConditions, envoyRetryConditions)

// envoyRetryConditions are Envoy retry_on conditions that meshlet's sidecar
// does not implement. They are accepted because the control plane serves
// standard xDS (Envoy, proxyless gRPC) and passes retryOn through as
// retry_on; a meshlet sidecar rejects them with a NACK naming the field.
var envoyRetryConditions = xds.EnvoyOnlyRetryConditions

func joinConditions(cs []xds.RetryOn) string {
	ss := make([]string, len(cs))
	for i, c := range cs {
		ss[i] = string(c)
	}
	return strings.Join(ss, ", ")
}

// Retry defaults.
var (
	// DefaultRetryOn applies when a RetryPolicy does not list retryOn
	// (Istio's default set).
	DefaultRetryOn = []xds.RetryOn{xds.RetryConnectFailure, xds.RetryRefusedStream, xds.RetryGRPCUnavailable, xds.RetryGRPCCancelled, xds.RetryRetriableStatusCodes}
	// DefaultRetriableStatusCodes applies with retriable-status-codes when
	// none are listed.
	DefaultRetriableStatusCodes = []int{503}
	// BuiltinRetryOn is what every route retries on when no RetryPolicy
	// targets its service: only failures where nothing reached the upstream,
	// so any request, POST included, is safe to send again.
	BuiltinRetryOn = []xds.RetryOn{xds.RetryConnectFailure, xds.RetryRefusedStream}
)

// Defaults the translator applies for what a policy leaves out (and, for
// retries, when there is no policy); each spec's comment lists them too.
const (
	DefaultNumRetries         = 2
	DefaultBackoffBase        = 25 * time.Millisecond              // Envoy retry_back_off.base_interval default; max is 10 × base
	DefaultBodyBufferBytes    = xds.DefaultBodyBufferBytes         // 64 KiB: larger request bodies are not retried
	DefaultBudgetRatio        = xds.DefaultRetryBudgetRatio        // retries ≤ 20% of requests (Linkerd)
	DefaultBudgetMinPerSecond = xds.DefaultRetryBudgetMinPerSecond // plus 10 retries per second (Linkerd)
	DefaultBudgetTTL          = xds.DefaultRetryBudgetTTL          // over a 10 s window (Linkerd)

	DefaultMaxConnections     = 1024 // Envoy CircuitBreakers.Thresholds defaults
	DefaultMaxPendingRequests = 1024
	DefaultMaxRequests        = 1024
	// DefaultMaxRetries is unlimited (2^32-1): every cluster has a retry
	// budget, and Envoy ignores max_retries when a retry budget is set
	// (CircuitBreakers.Thresholds.retry_budget); Istio sets 2^32-1 for the
	// same reason. Envoy's own default of 3 retries in flight denied
	// retries at low load with four clients.
	DefaultMaxRetries = math.MaxUint32

	DefaultBreakerConsecutiveFailures = 5
	DefaultBreakerMinRequests         = 10
	DefaultBreakerInterval            = 10 * time.Second
	DefaultBreakerOpenInterval        = 30 * time.Second
	DefaultBreakerHalfOpenRequests    = 1

	DefaultConsecutive5xx                 = 5 // Envoy OutlierDetection defaults
	DefaultConsecutiveLocalOriginFailures = 5
	DefaultOutlierInterval                = 10 * time.Second
	DefaultBaseEjectionTime               = 30 * time.Second
	DefaultMaxEjectionTime                = 300 * time.Second
	DefaultMaxEjectionPercent             = 10

	// NonIdempotentSafe and NonIdempotentRetry are the values of
	// RetryPolicy.NonIdempotent.
	NonIdempotentSafe  = "safe"
	NonIdempotentRetry = "retry"

	maxNumRetries      = 10
	maxBodyBufferBytes = 16 << 20 // 16 MiB
)

// RetryPolicy is the spec of a RetryPolicy document:
//
//	spec:
//	  service: api                  # required: the destination service
//	  match: {pathPrefix: /v1/}     # optional: which requests (default all)
//	  numRetries: 2                 # retries after the first attempt, 0-10 (default 2)
//	  retryOn: [5xx, connect-failure]             # default connect-failure, refused-stream,
//	                                              # unavailable, cancelled, retriable-status-codes
//	  retriableStatusCodes: [503]   # with retriable-status-codes (default [503])
//	  perTryTimeout: 500ms          # each attempt (default: none, the request timeout bounds all)
//	  backoff: {baseInterval: 25ms, maxInterval: 250ms}   # full-jitter exponential (defaults shown)
//	  bodyBufferBytes: 65536        # request bodies up to this size can be replayed (default 64 KiB)
//	  nonIdempotent: safe           # safe (default) | retry
//	  budget: {ratio: 0.2, minRetriesPerSecond: 10, ttl: 10s}   # service-wide; no match allowed
//
// Without any RetryPolicy a service still gets retries on connect-failure
// and refused-stream (BuiltinRetryOn), 2 retries, the default budget: cases
// where nothing reached the upstream. With nonIdempotent "safe", a request
// that is not idempotent (POST, PATCH, or a body of unknown length) is
// retried only when nothing reached the upstream, or when it carries an
// Idempotency-Key header; "retry" retries it like any other. gRPC calls are
// all POSTs: listing a gRPC status (cancelled, deadline-exceeded, internal,
// resource-exhausted, unavailable) in retryOn opts those responses in, as
// gRPC's own retry policy does per service.
//
// retryOn is Envoy's retry_on vocabulary, passed through unchanged: it also
// accepts the Envoy conditions envoy-ratelimited, retriable-4xx,
// reset-before-request, http3-post-connect-failure and retriable-headers,
// for Envoy and other standard xDS clients of the control plane. meshlet's
// sidecar does not implement those: it rejects the route configuration
// with a NACK naming the field (retry_on: unsupported condition), keeps its
// last accepted config, and `controlplane status` traces the rejection back
// to this document's file and line.
type RetryPolicy struct {
	Service              string        `yaml:"service"`
	Match                *Match        `yaml:"match,omitempty"`
	NumRetries           *int          `yaml:"numRetries,omitempty"`
	RetryOn              []xds.RetryOn `yaml:"retryOn,omitempty"`
	RetriableStatusCodes []int         `yaml:"retriableStatusCodes,omitempty"`
	PerTryTimeout        Duration      `yaml:"perTryTimeout,omitempty"`
	Backoff              *RetryBackoff `yaml:"backoff,omitempty"`
	BodyBufferBytes      *int          `yaml:"bodyBufferBytes,omitempty"`
	NonIdempotent        string        `yaml:"nonIdempotent,omitempty"`
	Budget               *RetryBudget  `yaml:"budget,omitempty"`

	Source Source `yaml:"-"`
	Name   string `yaml:"-"`
}

// RetryBackoff is the exponential backoff between attempts (Envoy
// retry_back_off); each wait is drawn uniformly from [0, min(max, base×2^n)].
type RetryBackoff struct {
	BaseInterval Duration `yaml:"baseInterval,omitempty"` // default 25ms
	MaxInterval  Duration `yaml:"maxInterval,omitempty"`  // default 10 × base
}

// RetryBudget bounds retries per destination service, as Linkerd does:
// retries may use Ratio of the requests seen in the last TTL, plus
// MinRetriesPerSecond × TTL.
type RetryBudget struct {
	Ratio               *float64 `yaml:"ratio,omitempty"`               // 0-1, default 0.2
	MinRetriesPerSecond *int     `yaml:"minRetriesPerSecond,omitempty"` // default 10
	TTL                 Duration `yaml:"ttl,omitempty"`                 // default 10s
}

func (p *RetryPolicy) validate(v *validator) {
	requireService(v, p.Service)
	p.Match.validate(v, "spec.match")
	if p.NumRetries != nil && (*p.NumRetries < 0 || *p.NumRetries > maxNumRetries) {
		v.errorf("spec.numRetries", "must be between 0 and %d (got %d)", maxNumRetries, *p.NumRetries)
	}
	for i, c := range p.RetryOn {
		if !slices.Contains(retryConditions, c) {
			v.errorf(fmt.Sprintf("spec.retryOn[%d]", i), "unknown condition %q (known: %s)", c, joinConditions(retryConditions))
		}
	}
	for i, code := range p.RetriableStatusCodes {
		if code < 100 || code > 599 {
			v.errorf(fmt.Sprintf("spec.retriableStatusCodes[%d]", i), "must be an HTTP status code 100-599 (got %d)", code)
		}
	}
	if len(p.RetriableStatusCodes) > 0 && len(p.RetryOn) > 0 && !slices.Contains(p.RetryOn, xds.RetryRetriableStatusCodes) {
		v.errorf("spec.retriableStatusCodes", "has no effect unless retryOn lists retriable-status-codes")
	}
	positive(v, "spec.perTryTimeout", p.PerTryTimeout)
	if b := p.Backoff; b != nil {
		positive(v, "spec.backoff.baseInterval", b.BaseInterval)
		positive(v, "spec.backoff.maxInterval", b.MaxInterval)
		if b.BaseInterval > 0 && b.MaxInterval > 0 && b.MaxInterval < b.BaseInterval {
			v.errorf("spec.backoff.maxInterval", "must not be below baseInterval (%v)", b.BaseInterval.D())
		}
	}
	if p.BodyBufferBytes != nil && (*p.BodyBufferBytes < 0 || *p.BodyBufferBytes > maxBodyBufferBytes) {
		v.errorf("spec.bodyBufferBytes", "must be between 0 and %d (got %d)", maxBodyBufferBytes, *p.BodyBufferBytes)
	}
	switch p.NonIdempotent {
	case "", NonIdempotentSafe, NonIdempotentRetry:
	default:
		v.errorf("spec.nonIdempotent", "must be %q or %q (got %q)", NonIdempotentSafe, NonIdempotentRetry, p.NonIdempotent)
	}
	if b := p.Budget; b != nil {
		if p.Match != nil {
			v.errorf("spec.budget", "a retry budget covers the whole service: set it in a RetryPolicy without match")
		}
		if b.Ratio != nil && (*b.Ratio < 0 || *b.Ratio > 1) {
			v.errorf("spec.budget.ratio", "must be between 0 and 1 (got %g)", *b.Ratio)
		}
		if b.MinRetriesPerSecond != nil && *b.MinRetriesPerSecond < 0 {
			v.errorf("spec.budget.minRetriesPerSecond", "must not be negative (got %d)", *b.MinRetriesPerSecond)
		}
		positive(v, "spec.budget.ttl", b.TTL)
	}
}

// TimeoutPolicy is the spec of a TimeoutPolicy document:
//
//	spec:
//	  service: api              # required
//	  match: {path: /slow}      # optional (not with connect)
//	  request: 5s               # whole exchange, retries included, until the response is
//	                            # complete; for streaming responses (SSE, gRPC streams)
//	                            # only until the response headers (default: none)
//	  idle: 1m                  # no bytes either way for this long resets the request (default: none);
//	                            # for a tcp service, from the document without match, it closes
//	                            # the connection at both sidecars (TcpProxy.idle_timeout, default 1h)
//	  maxStreamDuration: 1h     # caps any request, streams included (default: none)
//	  connect: 2s               # TCP connect to an endpoint (default 5s); service-wide
//
// Per-attempt timeouts are RetryPolicy.perTryTimeout.
type TimeoutPolicy struct {
	Service           string   `yaml:"service"`
	Match             *Match   `yaml:"match,omitempty"`
	Request           Duration `yaml:"request,omitempty"`
	Idle              Duration `yaml:"idle,omitempty"`
	MaxStreamDuration Duration `yaml:"maxStreamDuration,omitempty"`
	Connect           Duration `yaml:"connect,omitempty"`

	Source Source `yaml:"-"`
	Name   string `yaml:"-"`
}

func (p *TimeoutPolicy) validate(v *validator) {
	requireService(v, p.Service)
	p.Match.validate(v, "spec.match")
	positive(v, "spec.request", p.Request)
	positive(v, "spec.idle", p.Idle)
	positive(v, "spec.maxStreamDuration", p.MaxStreamDuration)
	positive(v, "spec.connect", p.Connect)
	if p.Connect != 0 && p.Match != nil {
		v.errorf("spec.connect", "the connect timeout covers the whole service: set it in a TimeoutPolicy without match")
	}
	if p.Request == 0 && p.Idle == 0 && p.MaxStreamDuration == 0 && p.Connect == 0 {
		v.errorf("spec", "sets no timeout (request, idle, maxStreamDuration or connect)")
	}
}

// CircuitBreakerPolicy is the spec of a CircuitBreakerPolicy document:
//
//	spec:
//	  service: api
//	  maxConnections: 1024       # connections to all endpoints (Envoy default 1024)
//	  maxPendingRequests: 1024   # requests waiting for a connection (default 1024)
//	  maxRequests: 1024          # requests in flight (default 1024)
//	  maxRetries: 3              # retries in flight (default: unlimited, the retry budget bounds them)
//	  endpoint:                  # a breaker per endpoint (github.com/sony/gobreaker); off by default
//	    consecutiveFailures: 5   # opens after this many failures in a row (default 5)
//	    failureRatio: 0.5        # or when this share of at least minRequests fail (default off)
//	    minRequests: 10          #
//	    interval: 10s            # counting window while closed (default 10s)
//	    openInterval: 30s        # open this long, then half-open (default 30s)
//	    halfOpenRequests: 1      # probes allowed while half-open (default 1)
//
// Beyond a limit the sidecar fails fast with 503 (x-meshlet-reason:
// overflow); an open endpoint breaker takes the endpoint out of rotation
// (circuit_open when none is left).
type CircuitBreakerPolicy struct {
	Service            string           `yaml:"service"`
	MaxConnections     *int             `yaml:"maxConnections,omitempty"`
	MaxPendingRequests *int             `yaml:"maxPendingRequests,omitempty"`
	MaxRequests        *int             `yaml:"maxRequests,omitempty"`
	MaxRetries         *int             `yaml:"maxRetries,omitempty"`
	Endpoint           *EndpointBreaker `yaml:"endpoint,omitempty"`

	Source Source `yaml:"-"`
	Name   string `yaml:"-"`
}

// EndpointBreaker configures the per-endpoint breaker (gobreaker Settings:
// ReadyToTrip from ConsecutiveFailures / FailureRatio+MinRequests, Interval,
// Timeout = OpenInterval, MaxRequests = HalfOpenRequests).
type EndpointBreaker struct {
	ConsecutiveFailures *int     `yaml:"consecutiveFailures,omitempty"`
	FailureRatio        *float64 `yaml:"failureRatio,omitempty"`
	MinRequests         *int     `yaml:"minRequests,omitempty"`
	Interval            Duration `yaml:"interval,omitempty"`
	OpenInterval        Duration `yaml:"openInterval,omitempty"`
	HalfOpenRequests    *int     `yaml:"halfOpenRequests,omitempty"`
}

func (p *CircuitBreakerPolicy) validate(v *validator) {
	requireService(v, p.Service)
	for _, f := range []struct {
		name string
		val  *int
	}{{"maxConnections", p.MaxConnections}, {"maxPendingRequests", p.MaxPendingRequests}, {"maxRequests", p.MaxRequests}, {"maxRetries", p.MaxRetries}} {
		if f.val != nil && *f.val < 0 {
			v.errorf("spec."+f.name, "must not be negative (got %d)", *f.val)
		}
	}
	if e := p.Endpoint; e != nil {
		if e.ConsecutiveFailures != nil && *e.ConsecutiveFailures < 1 {
			v.errorf("spec.endpoint.consecutiveFailures", "must be at least 1 (got %d)", *e.ConsecutiveFailures)
		}
		if e.FailureRatio != nil && (*e.FailureRatio <= 0 || *e.FailureRatio > 1) {
			v.errorf("spec.endpoint.failureRatio", "must be above 0 and at most 1 (got %g)", *e.FailureRatio)
		}
		if e.MinRequests != nil && *e.MinRequests < 1 {
			v.errorf("spec.endpoint.minRequests", "must be at least 1 (got %d)", *e.MinRequests)
		}
		if e.MinRequests != nil && e.FailureRatio == nil {
			v.errorf("spec.endpoint.minRequests", "has no effect without failureRatio")
		}
		positive(v, "spec.endpoint.interval", e.Interval)
		positive(v, "spec.endpoint.openInterval", e.OpenInterval)
		if e.HalfOpenRequests != nil && *e.HalfOpenRequests < 1 {
			v.errorf("spec.endpoint.halfOpenRequests", "must be at least 1 (got %d)", *e.HalfOpenRequests)
		}
	}
}

// OutlierDetectionPolicy is the spec of an OutlierDetectionPolicy
// document (Envoy Cluster.outlier_detection):
//
//	spec:
//	  service: api
//	  consecutive5xx: 5                   # 5xx answers in a row (default 5; 0 turns it off)
//	  consecutiveGatewayErrors: 0         # 502/503/504 in a row (default off)
//	  consecutiveLocalOriginFailures: 5   # connect failures, resets, timeouts (default 5; 0 off)
//	  interval: 10s                       # how often ejections are reviewed (default 10s)
//	  baseEjectionTime: 30s               # ejected for base × times ejected (default 30s)
//	  maxEjectionTime: 300s               # cap on one ejection (default 300s)
//	  maxEjectionPercent: 10              # at most this share ejected, but always one (default 10)
type OutlierDetectionPolicy struct {
	Service                        string   `yaml:"service"`
	Consecutive5xx                 *int     `yaml:"consecutive5xx,omitempty"`
	ConsecutiveGatewayErrors       *int     `yaml:"consecutiveGatewayErrors,omitempty"`
	ConsecutiveLocalOriginFailures *int     `yaml:"consecutiveLocalOriginFailures,omitempty"`
	Interval                       Duration `yaml:"interval,omitempty"`
	BaseEjectionTime               Duration `yaml:"baseEjectionTime,omitempty"`
	MaxEjectionTime                Duration `yaml:"maxEjectionTime,omitempty"`
	MaxEjectionPercent             *int     `yaml:"maxEjectionPercent,omitempty"`

	Source Source `yaml:"-"`
	Name   string `yaml:"-"`
}

func (p *OutlierDetectionPolicy) validate(v *validator) {
	requireService(v, p.Service)
	for _, f := range []struct {
		name string
		val  *int
	}{{"consecutive5xx", p.Consecutive5xx}, {"consecutiveGatewayErrors", p.ConsecutiveGatewayErrors}, {"consecutiveLocalOriginFailures", p.ConsecutiveLocalOriginFailures}} {
		if f.val != nil && *f.val < 0 {
			v.errorf("spec."+f.name, "must not be negative (got %d)", *f.val)
		}
	}
	positive(v, "spec.interval", p.Interval)
	positive(v, "spec.baseEjectionTime", p.BaseEjectionTime)
	positive(v, "spec.maxEjectionTime", p.MaxEjectionTime)
	if p.MaxEjectionPercent != nil && (*p.MaxEjectionPercent < 0 || *p.MaxEjectionPercent > 100) {
		v.errorf("spec.maxEjectionPercent", "must be between 0 and 100 (got %d)", *p.MaxEjectionPercent)
	}
}

// Load-balancing algorithms.
const (
	AlgorithmRoundRobin   = "roundRobin"   // weighted round robin (default)
	AlgorithmLeastRequest = "leastRequest" // power of two choices, fewest requests in flight
	AlgorithmRingHash     = "ringHash"     // consistent hashing on a request header
)

// LoadBalancerPolicy is the spec of a LoadBalancerPolicy document:
//
//	spec:
//	  service: api
//	  algorithm: ringHash      # roundRobin (default) | leastRequest | ringHash
//	  hashHeader: x-user-id    # ringHash only: the header whose value picks the endpoint
//
// Endpoint weights come from Consul (Weights.Passing) with every algorithm.
type LoadBalancerPolicy struct {
	Service    string `yaml:"service"`
	Algorithm  string `yaml:"algorithm"`
	HashHeader string `yaml:"hashHeader,omitempty"`

	Source Source `yaml:"-"`
	Name   string `yaml:"-"`
}

func (p *LoadBalancerPolicy) validate(v *validator) {
	requireService(v, p.Service)
	switch p.Algorithm {
	case AlgorithmRoundRobin, AlgorithmLeastRequest:
		if p.HashHeader != "" {
			v.errorf("spec.hashHeader", "only applies to algorithm %s", AlgorithmRingHash)
		}
	case AlgorithmRingHash:
		if p.HashHeader == "" {
			v.errorf("spec.hashHeader", "required with algorithm %s: the request header to hash", AlgorithmRingHash)
		} else if strings.ContainsAny(p.HashHeader, " :\t") {
			v.errorf("spec.hashHeader", "must be a header name (got %q)", p.HashHeader)
		}
	case "":
		v.errorf("spec.algorithm", "required (%s, %s or %s)", AlgorithmRoundRobin, AlgorithmLeastRequest, AlgorithmRingHash)
	default:
		v.errorf("spec.algorithm", "unknown algorithm %q (want %s, %s or %s)", p.Algorithm, AlgorithmRoundRobin, AlgorithmLeastRequest, AlgorithmRingHash)
	}
}

func requireService(v *validator, s string) {
	if s == "" {
		v.errorf("spec.service", "required: the destination service this policy applies to")
	}
}

func positive(v *validator, field string, d Duration) {
	if d < 0 {
		v.errorf(field, "must be positive (got %v)", d.D())
	}
}
