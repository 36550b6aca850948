package httpproxy

import (
	"context"
	"errors"
	"math/rand/v2"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/meshlet/meshlet/sidecar/cluster"
	"github.com/meshlet/meshlet/sidecar/config"
	"github.com/meshlet/meshlet/sidecar/tracing"
	"github.com/meshlet/meshlet/xds"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/trace"
)

// The HTTP exchange engine.
//
// One request's logic is written here once, for both HTTP/1.1 wires: the
// fast path (*fastConn, h1fast.go), which reads and writes bytes, and
// net/http's server (*forward, forward.go), which has an http.Request and
// an http.ResponseWriter. The engine decides; a wire moves bytes:
//
//	admit    route → RBAC (decision, log line) → no_route → the wire's own
//	         refusal (net/http: upgrades) → no_cluster → overflow
//	         (max_requests) → a deposit into the retry budget
//	classify idempotency and the hash key (ring hash, maglev)
//	forward  pick → attempt (wire.roundTrip, one call per attempt) →
//	         classify the outcome → retry after a full-jitter backoff, or
//	         fail, or hand the response to the wire to relay
//	fail     the sidecar's own answer and its typed reason (a gRPC status
//	         for a gRPC request), written by wire.answer
//
// plus the x-forwarded-client-cert value (xfccValue) and the reason a
// relayed answer carries when the retry budget refused a retry
// (relayReason). The split follows grpc-go's ServerTransport (its HTTP/2
// server and its net/http handler server behind one interface, the RPC
// logic written once) and Caddy's reverse proxy (one retry loop over a
// pluggable transport).

// wire is the downstream side of one exchange, as the engine drives it:
// the HTTP/1.1 fast path or net/http's server. Its methods are called on
// the exchange's goroutine, a few times per attempt at most.
type wire interface {
	// roundTrip sends the request to ep once and reads the final response
	// head. ctx bounds it (the route timeout, the downstream leaving), and
	// so does perTry when positive; actx, when not nil, is the attempt
	// span's context, whose trace context the request carries instead of
	// the request span's. An error is a *cluster.UpstreamError, or any
	// other error for a reset.
	roundTrip(ctx, actx context.Context, ep *cluster.Endpoint, perTry time.Duration) (upstreamHead, error)
	// discard drops the response of the last roundTrip: it is retried.
	discard()
	// answer writes the sidecar's own answer to the downstream.
	answer(a *localAnswer)
	// gone reports whether the downstream left: the exchange is cancelled
	// and nothing is answered.
	gone() bool
	// timedOut reports whether the route timeout (or the max stream
	// duration) has passed: a failed attempt is a 504 then, not retried.
	timedOut() bool
	// replayable reports whether the request body can be sent again whole.
	replayable() bool
	// badBody reports whether reading the request body failed on its
	// content (malformed chunked encoding): a failed attempt is the
	// downstream's fault then, answered 400, not retried.
	badBody() bool
}

var (
	_ wire = (*fastConn)(nil)
	_ wire = (*forward)(nil)
)

// upstreamHead is what the engine reads of a response head: its status
// code and its grpc-status and x-meshlet-reason fields ("" when absent).
// The strings may point into the wire's buffers: valid until discard or
// the relay.
type upstreamHead struct {
	code       int
	grpcStatus string
	reason     xds.FailureReason
}

// exchange is one request through the engine: what it did, recorded in
// metrics and its span when it ends (finish), and the engine's state.
type exchange struct {
	s              *Server
	start          time.Time
	cluster, route string
	code           int               // 0: the downstream left first
	reason         xds.FailureReason // the typed reason when the sidecar failed it
	grpcStatus     string
	aborted        bool // the response body was cut short
	tr             *tracing.HTTP
	span           trace.Span // nil when not traced
	attempt        trace.Span // the open attempt span, nil when none

	// grpc is set for a gRPC request (content-type application/grpc*): the
	// sidecar's own failure answers are gRPC statuses then (fail).
	// grpcDeadline is when its grpc-timeout runs out (zero without one).
	grpc         bool
	grpcDeadline time.Time

	// The engine's state: the wire, the route table and route, the
	// cluster admitted to (its request slot held), set by admit; the
	// request's retry safety and hash key, set by classify.
	w          wire
	t          *routeTable
	rt         *config.Route
	c          *cluster.Cluster
	idempotent bool
	hashKey    uint64
	hasKey     bool
	// budgetDenied says a retry was due and the retry budget refused it.
	budgetDenied bool
}

// setGRPC marks a gRPC request (contentType application/grpc*) and its
// deadline from a grpc-timeout value (gRPC over HTTP/2).
func (x *exchange) setGRPC(contentType, timeout string) {
	if !strings.HasPrefix(contentType, "application/grpc") {
		return
	}
	x.grpc = true
	if d, ok := grpcTimeout(timeout); ok {
		x.grpcDeadline = x.start.Add(d)
	}
}

// admit runs admission for a request whose route is rt (nil: none
// matched), in Envoy's filter order: the RBAC filter of chain hc (a
// denial is logged, counted and answered 403 authz_denied with its rule),
// no route (404 no_route), refusal (the wire's own, nil for none: 403
// upgrade_not_allowed on net/http), no cluster c (503 no_cluster), the
// cluster's max_requests (503 overflow), then a deposit into the cluster's
// retry budget. The rest describe the request to RBAC: the peer's SPIFFE
// ID ("" when not authenticated), method, path without the query,
// authority and header. It answers a refused request through x.w and
// returns false; true means c's request slot is held, which the caller
// releases when the exchange ends.
func (x *exchange) admit(hc *config.HTTPConnectionManager, rt *config.Route, c *cluster.Cluster, refusal *failure,
	peer, method, path, authority string, header config.HeaderValues) bool {
	s := x.s
	if hc.RBAC != nil {
		ok, rule := hc.RBAC.Decide(&config.RBACRequest{Principal: peer, Method: method, Path: path, Authority: authority, Header: header})
		if !ok {
			s.rec.AuthzDenied(s.name, rule)
			s.log.Info("authz: request denied", "listener", s.name, "peer", peer, "method", strings.Clone(method), "path", strings.Clone(path), "rule", rule)
			x.cluster, x.route = "", ""
			x.fail(http.StatusForbidden, xds.ReasonAuthzDenied, rule)
			return false
		}
	}
	switch {
	case rt == nil:
		x.fail(http.StatusNotFound, xds.ReasonNoRoute, "")
	case refusal != nil:
		x.fail(refusal.status, refusal.reason, "")
	case c == nil:
		x.fail(http.StatusServiceUnavailable, xds.ReasonNoCluster, "")
	case !c.AcquireRequest():
		x.fail(http.StatusServiceUnavailable, xds.ReasonOverflow, "")
	default:
		c.Budget().Deposit()
		x.rt, x.c = rt, c
		return true
	}
	return false
}

// xfccValue returns the x-forwarded-client-cert value for chain hc and the
// peer (Envoy's SANITIZE_SET with By, Hash and, with set_current_client_cert_details
// uri, URI: "By=<local SPIFFE ID>;Hash=<cert hash>;URI=<peer SPIFFE ID>"),
// "" when none is set (another mode, or no authenticated peer). The
// downstream's own value is never forwarded (SANITIZE, SANITIZE_SET).
func (s *Server) xfccValue(hc *config.HTTPConnectionManager, peerID, peerHash string) string {
	if hc.ForwardClientCert != config.XFCCSanitizeSet || peerID == "" {
		return ""
	}
	v := "Hash=" + peerHash
	if s.localID != nil {
		if by := s.localID(); by != "" {
			v = "By=" + by + ";" + v
		}
	}
	if hc.SetCurrentURI {
		v += ";URI=" + peerID
	}
	return v
}

// classify decides whether the request may be sent twice and its hash
// key. Idempotent are the methods of RFC 9110 §9.2.2 with a body of known
// length (one of unknown length, streaming, is never assumed replay-safe),
// and any request with an Idempotency-Key (keyed). The hash key is that
// of the route's hash_policy header (RouteAction.hash_policy.header), when
// the request has it with a value.
func (x *exchange) classify(method string, lengthKnown, keyed bool, h headerLookup) {
	switch method {
	case http.MethodGet, http.MethodHead, http.MethodOptions, http.MethodTrace, http.MethodPut, http.MethodDelete:
		x.idempotent = lengthKnown
	}
	if keyed {
		x.idempotent = true
	}
	if name := x.rt.HashHeader; name != "" {
		if v, ok := h.lookup(name); ok && v != "" {
			x.hashKey, x.hasKey = cluster.HashKey(v), true
		}
	}
}

// failure is a request the sidecar fails itself; status 0: the
// downstream left, nothing is answered.
type failure struct {
	status int
	reason xds.FailureReason
}

// forward sends attempts until one gives a response to relay, or the
// request fails: it picks an endpoint (another one than those tried, with
// retry_host_predicate previous_hosts), runs one attempt (its span when
// attempts get their own), classifies the outcome (a status or gRPC status
// under retry_on, a failure by kind, a meshlet sidecar upstream that says
// the request never reached its app) and either returns the attempt whose
// response the wire relays (its attempt span in x.attempt), or retries
// after a full-jitter backoff, or fails the request. ctx bounds the
// exchange; traceCtx is the request span's context. It returns nil when
// the request failed: it was answered then, unless the downstream left.
func (x *exchange) forward(ctx, traceCtx context.Context) *cluster.Attempt {
	s, c, p, w := x.s, x.c, x.rt.Retry, x.w
	spawn := x.tr != nil && x.tr.SpawnAttempts() && x.span.IsRecording()
	var perTry time.Duration
	if p != nil {
		perTry = p.PerTry
	}
	var triedBuf [4]*cluster.Endpoint
	tried := triedBuf[:0]
	retries := 0
	var last *failure
	for {
		var avoid []*cluster.Endpoint
		if p != nil && p.OtherHost {
			avoid = tried
		}
		att, picked := c.Pick(x.hashKey, x.hasKey, avoid)
		if picked != cluster.Picked {
			fl := last
			if fl == nil {
				fl = &failure{http.StatusServiceUnavailable, xds.ReasonNoHealthyUpstream}
				if picked == cluster.CircuitOpen {
					fl.reason = xds.ReasonCircuitOpen
				}
			}
			return x.failWith(fl)
		}
		ep := att.Endpoint()
		tried = append(tried, ep)

		var actx context.Context
		var aspan trace.Span
		if spawn {
			// Each attempt its own span, whose context the request carries.
			actx, aspan = x.tr.StartAttempt(traceCtx, retries+1, ep.Address, c.PeerID())
		}
		head, err := w.roundTrip(ctx, actx, ep, perTry)
		if err == nil {
			cond, sent := statusCondition(head.code, head.grpcStatus, p), true
			if notReached(head.code, head.reason) {
				// The upstream sidecar says the request never reached its app.
				cond, sent = xds.RetryConnectFailure, false
			}
			if cond == "" || !x.mayRetry(cond, sent, retries) {
				x.attempt = aspan // ended with the response
				return att
			}
			code, reason := head.code, xds.FailureReason(strings.Clone(string(head.reason)))
			w.discard()
			att.End(cluster.OutcomeForStatus(code))
			last = &failure{code, ""}
			s.rec.Retry(c.Name(), string(cond))
			x.endAttempt(aspan, code, reason, string(cond), retries+1)
		} else {
			if w.gone() {
				att.End(cluster.OutcomeCancelled)
				x.endAttempt(aspan, 0, "", "", 0)
				return nil
			}
			if w.badBody() {
				// The upstream did not fail: the request did (the transport
				// aborted the attempt as the body broke off).
				att.End(cluster.OutcomeCancelled)
				x.endAttempt(aspan, 0, xds.ReasonDownstreamProtocolError, "", 0)
				return x.failWith(&failure{http.StatusBadRequest, xds.ReasonDownstreamProtocolError})
			}
			att.End(cluster.OutcomeLocalFailure)
			var ue *cluster.UpstreamError
			if !errors.As(err, &ue) {
				ue = &cluster.UpstreamError{Kind: cluster.KindReset, Sent: true, Err: err}
			}
			timedOut := w.timedOut()
			fl, cond := failureFor(ue, timedOut)
			s.log.Debug("httpproxy: attempt failed", "listener", s.name, "cluster", c.Name(), "endpoint", ep.Address,
				"attempt", retries+1, "reason", fl.reason, "error", err)
			if timedOut || !x.mayRetry(cond, ue.Sent, retries) {
				if x.budgetDenied && fl.reason != xds.ReasonOverflow {
					fl.reason = xds.ReasonRetryBudgetExhausted
				}
				x.endAttempt(aspan, 0, fl.reason, "", 0)
				return x.failWith(fl)
			}
			last = fl
			s.rec.Retry(c.Name(), string(cond))
			x.endAttempt(aspan, 0, fl.reason, string(cond), retries+1)
		}
		// A retry: wait the full-jitter backoff, then go again.
		retries++
		if !c.AcquireRetry() {
			s.rec.RetryDenied(c.Name(), "max_retries")
			return x.failWith(&failure{http.StatusServiceUnavailable, xds.ReasonOverflow})
		}
		ok := sleepBackoff(ctx, p, retries)
		c.ReleaseRetry()
		if w.gone() {
			return nil
		}
		if !ok {
			return x.failWith(&failure{http.StatusGatewayTimeout, xds.ReasonUpstreamTimeout})
		}
	}
}

// failWith answers fl unless the downstream left; it returns nil, for
// forward.
func (x *exchange) failWith(fl *failure) *cluster.Attempt {
	if !x.w.gone() {
		x.fail(fl.status, fl.reason, "")
	}
	return nil
}

// relayReason is the typed reason a relayed upstream answer carries in
// ReasonHeader: retry_budget_exhausted when a retry was due and the
// budget refused it (the answer is that of the last attempt), else "".
func (x *exchange) relayReason() xds.FailureReason {
	if x.budgetDenied {
		return xds.ReasonRetryBudgetExhausted
	}
	return ""
}

// localAnswer is the sidecar's own answer to a request it fails, as a
// wire writes it: status (the HTTP status on the wire: 200 for a gRPC
// request's trailers-only answer), the typed reason in ReasonHeader, the
// denying rule in RuleHeader (authz_denied only), contentType, the
// grpc-status and grpc-message of a gRPC request ("" otherwise), the Via
// received-by ("" for none: the field is "Via: 1.1 <via>"), and the body
// (body: the reason and a newline; none for gRPC).
type localAnswer struct {
	status                  int
	reason                  xds.FailureReason
	rule                    string
	contentType             string
	grpcStatus, grpcMessage string
	via                     string
	body                    bool
}

// bodyLen is the length of the answer's body.
func (a *localAnswer) bodyLen() int {
	if !a.body {
		return 0
	}
	return len(a.reason) + 1
}

// appendBody appends the answer's body to b.
func (a *localAnswer) appendBody(b []byte) []byte {
	if !a.body {
		return b
	}
	return append(append(b, a.reason...), '\n')
}

// fail answers the request with the sidecar's own answer for status and
// reason (and the denying rule of authz_denied), recorded in x. A gRPC
// request is answered as gRPC clients expect, and as Envoy does for gRPC
// requests: a trailers-only response (HTTP 200, content-type
// application/grpc, grpc-status and grpc-message, the reason in
// ReasonHeader too), the status mapped from the HTTP status the way gRPC's
// HTTP-to-gRPC status mapping does (403 PERMISSION_DENIED, 404
// UNIMPLEMENTED, 429/502/503/504 UNAVAILABLE, 401 UNAUTHENTICATED, 400
// INTERNAL, else UNKNOWN), except that a route timeout, or any failure once
// the request's own grpc-timeout has run out, is DEADLINE_EXCEEDED: the
// caller's deadline ended the call, whichever side noticed first.
func (x *exchange) fail(status int, reason xds.FailureReason, rule string) {
	x.code, x.reason = status, reason
	a := localAnswer{status: status, reason: reason, rule: rule, via: x.t.via}
	if x.grpc {
		code := grpcCodeFor(status)
		if reason == xds.ReasonUpstreamTimeout || !x.grpcDeadline.IsZero() && !time.Now().Before(x.grpcDeadline) {
			code = grpcDeadlineExceeded
		}
		x.grpcStatus = strconv.Itoa(code)
		a.status, a.contentType = http.StatusOK, "application/grpc"
		a.grpcStatus, a.grpcMessage = x.grpcStatus, url.PathEscape("meshlet: "+string(reason))
	} else {
		a.contentType, a.body = "text/plain; charset=utf-8", true
	}
	x.w.answer(&a)
}

// finish records the exchange and ends its spans.
func (x *exchange) finish() {
	x.s.rec.Request(RequestRecord{Listener: x.s.name, Cluster: x.cluster, Route: x.route, Code: x.code, Reason: x.reason, Duration: time.Since(x.start)})
	if x.span == nil {
		return
	}
	reason := x.reason
	if x.aborted && reason == "" {
		reason = xds.ReasonUpstreamReset
	}
	if x.attempt != nil {
		tracing.End(x.attempt, x.code, reason, x.grpcStatus, "")
	}
	tracing.End(x.span, x.code, reason, x.grpcStatus, "")
}

// endAttempt ends an attempt that did not give the response: its span,
// or, without attempt spans, an event on the request's span. cause is the
// retry_on condition when it is retried.
func (x *exchange) endAttempt(span trace.Span, code int, reason xds.FailureReason, cause string, n int) {
	if span != nil {
		tracing.End(span, code, reason, "", cause)
		return
	}
	if x.span != nil && x.span.IsRecording() && cause != "" {
		attrs := []attribute.KeyValue{tracing.AttrAttempt.Int(n), tracing.AttrRetryCause.String(cause)}
		if code > 0 {
			attrs = append(attrs, attribute.Int("http.response.status_code", code))
		}
		if reason != "" {
			attrs = append(attrs, tracing.AttrReason.String(string(reason)))
		}
		x.span.AddEvent("retry", trace.WithAttributes(attrs...))
	}
}

// failureFor maps a failed attempt to the failure to report and the
// retry_on condition it matches; timedOut says the route timeout has
// passed (504, not retried).
func failureFor(ue *cluster.UpstreamError, timedOut bool) (*failure, xds.RetryOn) {
	switch {
	case timedOut:
		return &failure{http.StatusGatewayTimeout, xds.ReasonUpstreamTimeout}, ""
	case ue.Kind == cluster.KindTimeout:
		// Envoy treats a per-try timeout as a 504: retried under 5xx and gateway-error.
		return &failure{http.StatusGatewayTimeout, xds.ReasonUpstreamTimeout}, xds.RetryGatewayError
	case ue.Kind == cluster.KindConnectFailure:
		return &failure{http.StatusServiceUnavailable, xds.ReasonConnectFailure}, xds.RetryConnectFailure
	case ue.Kind == cluster.KindTLSHandshake:
		return &failure{http.StatusServiceUnavailable, xds.ReasonTLSHandshakeFailed}, xds.RetryConnectFailure
	case ue.Kind == cluster.KindRefusedStream:
		return &failure{http.StatusServiceUnavailable, xds.ReasonUpstreamReset}, xds.RetryRefusedStream
	case ue.Kind == cluster.KindOverflow:
		return &failure{http.StatusServiceUnavailable, xds.ReasonOverflow}, ""
	}
	return &failure{http.StatusServiceUnavailable, xds.ReasonUpstreamReset}, xds.RetryReset
}

// mayRetry decides whether an attempt that met cond is retried: the policy
// lists cond, retries are left, the downstream is still there, the request
// is safe to send again (nothing reached the upstream, or it is idempotent
// or the policy says so), its body can be replayed, and the retry budget
// has a token (a refusal sets budgetDenied). A gRPC status condition
// (every gRPC call is a POST) is itself the opt-in, as in gRPC's own retry
// policy, where retryable status codes are declared per service. Denials
// are recorded by reason.
func (x *exchange) mayRetry(cond xds.RetryOn, sent bool, retries int) bool {
	p, c, rec := x.rt.Retry, x.c, x.s.rec
	if p == nil || cond == "" || retries >= p.NumRetries || !matches(p, cond) || x.w.gone() {
		return false
	}
	if sent && !x.idempotent && !p.NonIdempotentRetry && !cond.IsGRPC() {
		rec.RetryDenied(c.Name(), "non_idempotent")
		return false
	}
	if !x.w.replayable() {
		rec.RetryDenied(c.Name(), "body_too_large")
		return false
	}
	if !c.Budget().TryWithdraw() {
		x.budgetDenied = true
		rec.RetryDenied(c.Name(), string(xds.ReasonRetryBudgetExhausted))
		return false
	}
	return true
}

// matches reports whether the policy retries on cond. A connect failure
// or a refused stream also matches "5xx", "gateway-error" and "reset" as in
// Envoy, where they surface as a 503.
func matches(p *config.RetryPolicy, cond xds.RetryOn) bool {
	switch cond {
	case xds.RetryConnectFailure:
		return p.On&(config.RetryConnectFailure|config.Retry5xx|config.RetryGatewayError|config.RetryReset) != 0
	case xds.RetryRefusedStream:
		return p.On&(config.RetryRefusedStream|config.Retry5xx|config.RetryGatewayError|config.RetryReset) != 0
	case xds.RetryReset:
		return p.On&(config.RetryReset|config.Retry5xx|config.RetryGatewayError) != 0
	}
	c, ok := config.RetryConditions[cond]
	return ok && p.On&c != 0
}

// statusCondition returns the retry_on condition a response meets under p
// ("" when none): a retriable status code, 5xx / gateway-error, or a gRPC
// status in the headers of a trailers-only response.
func statusCondition(code int, grpcStatus string, p *config.RetryPolicy) xds.RetryOn {
	if p == nil {
		return ""
	}
	if p.On&config.RetryRetriableStatusCodes != 0 {
		for _, c := range p.StatusCodes {
			if c == code {
				return xds.RetryRetriableStatusCodes
			}
		}
	}
	if code == 502 || code == 503 || code == 504 {
		if p.On&config.RetryGatewayError != 0 {
			return xds.RetryGatewayError
		}
	}
	if code >= 500 && p.On&config.Retry5xx != 0 {
		return xds.Retry5xx
	}
	if gs := grpcStatus; gs != "" {
		cond := xds.GRPCRetryCondition(gs)
		if c, ok := config.RetryConditions[cond]; ok && p.On&c != 0 {
			return cond
		}
	}
	return ""
}

// notReached reports a 503 from an upstream meshlet sidecar whose typed
// reason says the request never reached the application behind it.
func notReached(code int, reason xds.FailureReason) bool {
	if code != http.StatusServiceUnavailable {
		return false
	}
	switch reason {
	case xds.ReasonConnectFailure, xds.ReasonNoHealthyUpstream, xds.ReasonCircuitOpen, xds.ReasonOverflow, xds.ReasonTLSHandshakeFailed:
		return true
	}
	return false
}

// sleepBackoff waits the full-jitter exponential backoff before retry n
// (1-based): uniform in [0, min(max, base × 2^(n-1))]. It returns false when
// ctx ends first.
func sleepBackoff(ctx context.Context, p *config.RetryPolicy, n int) bool {
	ceiling := p.BackoffBase << min(n-1, 30)
	if ceiling <= 0 || ceiling > p.BackoffMax {
		ceiling = p.BackoffMax
	}
	if ceiling <= 0 {
		return ctx.Err() == nil
	}
	d := rand.N(ceiling + 1)
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}

// gRPC status codes (google.golang.org/grpc/codes) the sidecar answers.
const (
	grpcUnknown          = 2
	grpcDeadlineExceeded = 4
	grpcPermissionDenied = 7
	grpcUnimplemented    = 12
	grpcInternal         = 13
	grpcUnavailable      = 14
	grpcUnauthenticated  = 16
)

// grpcCodeFor maps an HTTP status to a gRPC status (gRPC's
// doc/http-grpc-status-mapping.md).
func grpcCodeFor(status int) int {
	switch status {
	case http.StatusBadRequest:
		return grpcInternal
	case http.StatusUnauthorized:
		return grpcUnauthenticated
	case http.StatusForbidden:
		return grpcPermissionDenied
	case http.StatusNotFound:
		return grpcUnimplemented
	case http.StatusTooManyRequests, http.StatusBadGateway, http.StatusServiceUnavailable, http.StatusGatewayTimeout:
		return grpcUnavailable
	}
	return grpcUnknown
}

// grpcTimeout parses a grpc-timeout header value (gRPC over HTTP/2: 1 to 8
// digits and a unit, H M S m u n).
func grpcTimeout(v string) (time.Duration, bool) {
	if len(v) < 2 || len(v) > 9 {
		return 0, false
	}
	n, err := strconv.ParseInt(v[:len(v)-1], 10, 64)
	if err != nil || n < 0 {
		return 0, false
	}
	unit := map[byte]time.Duration{'H': time.Hour, 'M': time.Minute, 'S': time.Second, 'm': time.Millisecond, 'u': time.Microsecond, 'n': time.Nanosecond}[v[len(v)-1]]
	if unit == 0 {
		return 0, false
	}
	return time.Duration(n) * unit, true
}
