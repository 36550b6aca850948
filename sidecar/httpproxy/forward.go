package httpproxy

import (
	"context"
	"errors"
	"io"
	"math/rand/v2"
	"net/http"
	"strings"
	"sync/atomic"
	"time"

	"github.com/meshlet/meshlet/sidecar/cluster"
	"github.com/meshlet/meshlet/sidecar/config"
	"github.com/meshlet/meshlet/sidecar/tlsid"
	"github.com/meshlet/meshlet/sidecar/tracing"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/trace"
)

// ServeHTTP routes and forwards one request: route → cluster → admission
// (max_requests) → attempts on picked endpoints, retried per the route's
// retry policy → the response streamed back.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	x := exchange{s: s, start: time.Now()}
	if r.ProtoMajor == 1 && r.Body != nil && r.Body != http.NoBody {
		x.down = r // its answer may come before its body was all read
	}
	if strings.HasPrefix(r.Header.Get("Content-Type"), "application/grpc") {
		x.grpc = true
		if d, ok := grpcTimeout(r.Header.Get("Grpc-Timeout")); ok {
			x.grpcDeadline = x.start.Add(d)
		}
	}
	t := s.table.Load()
	rt := t.route(r)
	if rt != nil {
		x.cluster, x.route = rt.Cluster, rt.Name
	}
	if tr := s.tracer.Load(); tr != nil {
		peer, _ := r.Context().Value(peerKey{}).(tlsid.Peer)
		ctx, span := tr.Start(r.Context(), r, tracing.Request{Cluster: x.cluster, Route: x.route, PeerID: peer.SPIFFEID})
		r = r.WithContext(ctx)
		x.tr, x.span = tr, span
	}
	defer x.finish()
	if !s.authorize(w, r, t, &x) {
		return
	}
	if rt == nil {
		s.fail(w, t, &x, http.StatusNotFound, ReasonNoRoute)
		return
	}
	// An HTTP/1.1 Upgrade (WebSocket) is tunnelled when enabled; h2c
	// upgrades are ignored (served as HTTP/1.1), others refused.
	upgrade := upgradeType(r)
	if upgrade == "h2c" {
		upgrade = ""
	} else if upgrade != "" && !s.chain.Load().UpgradeAllowed(rt, upgrade) {
		s.fail(w, t, &x, http.StatusForbidden, ReasonUpgradeNotAllowed)
		return
	}
	c := s.clusters.Get(rt.Cluster)
	if c == nil {
		s.fail(w, t, &x, http.StatusServiceUnavailable, ReasonNoCluster)
		return
	}
	if !c.AcquireRequest() {
		s.fail(w, t, &x, http.StatusServiceUnavailable, ReasonOverflow)
		return
	}
	defer c.ReleaseRequest()
	c.Budget().Deposit()

	// The route timeout covers the whole exchange, retries included; it is
	// disarmed at the response headers of a streaming response. The max
	// stream duration covers everything.
	ctx, cancel := r.Context(), context.CancelFunc(nil)
	if rt.Timeout > 0 || rt.MaxStreamDuration > 0 || rt.IdleTimeout > 0 {
		ctx, cancel = context.WithCancel(ctx)
		defer cancel()
	}
	var timedOut atomic.Bool
	var routeTimer *time.Timer
	if rt.Timeout > 0 {
		routeTimer = time.AfterFunc(rt.Timeout, func() { timedOut.Store(true); cancel() })
		defer routeTimer.Stop()
	}
	if rt.MaxStreamDuration > 0 {
		streamTimer := time.AfterFunc(rt.MaxStreamDuration, func() { timedOut.Store(true); cancel() })
		defer streamTimer.Stop()
	}

	f := &forward{s: s, r: r, rt: rt, c: c, timedOut: &timedOut, via: t.via, x: &x}
	if upgrade != "" {
		f.upgrade = r.Header.Get("Upgrade")
	}
	f.prepare()
	x.body = f.body
	resp, att, fl := f.run(ctx)
	if fl != nil {
		if r.Context().Err() != nil {
			return // the downstream left: nothing to answer (code 0)
		}
		s.fail(w, t, &x, fl.status, fl.reason)
		return
	}
	outcome := cluster.OutcomeForStatus(resp.StatusCode)
	defer func() { att.End(outcome) }()
	if resp.StatusCode == http.StatusSwitchingProtocols && f.upgrade != "" {
		if routeTimer != nil {
			routeTimer.Stop() // a tunnel outlives any request timeout
		}
		s.tunnel(w, resp, &x, rt, t.via, ctx)
		return
	}
	defer resp.Body.Close()
	if r.ProtoMajor == 2 && f.body != nil {
		// Runs before resp.Body.Close, which waits for the HTTP/2
		// transport's request body writer: that writer may be blocked on a
		// client that keeps its stream open after the response (a gRPC
		// stream the server ended with its status). The exchange is over,
		// so the downstream's request body is closed, which stops it.
		defer r.Body.Close()
	}
	x.code = resp.StatusCode
	stream := streaming(resp)
	if stream && routeTimer != nil {
		routeTimer.Stop()
	}

	h := w.Header()
	removeHopByHop(resp.Header, false)
	for k, vv := range resp.Header {
		h[k] = vv
	}
	if t.via != "" {
		h.Add("Via", protoVersion(resp.ProtoMajor, resp.ProtoMinor)+" "+t.via)
	}
	if f.budgetDenied {
		h.Set(ReasonHeader, ReasonRetryBudgetExhausted)
	}
	if len(resp.Trailer) > 0 {
		names := make([]string, 0, len(resp.Trailer))
		for k := range resp.Trailer {
			names = append(names, k)
		}
		h["Trailer"] = []string{strings.Join(names, ", ")}
	}
	x.closeIfBodyLeft(h)
	w.WriteHeader(resp.StatusCode)

	body := io.Reader(resp.Body)
	if rt.IdleTimeout > 0 {
		body = newIdleReader(resp.Body, rt.IdleTimeout, cancel)
	}
	if err := copyBody(w, body, stream); err != nil {
		switch {
		case r.Context().Err() != nil:
			outcome = cluster.OutcomeCancelled
		case !errors.Is(err, errDownstreamWrite):
			outcome = cluster.OutcomeLocalFailure
			s.log.Debug("httpproxy: response body aborted", "listener", s.name, "cluster", c.Name(), "error", err)
		}
		x.aborted = true
		if x.bodyLeft() {
			// resp.Body.Close waits for the attempt's request writer, which
			// may be blocked reading the body from a client that paused.
			_ = http.NewResponseController(w).SetReadDeadline(aLongTimeAgo)
		}
		panic(http.ErrAbortHandler) // reset the downstream stream: the response is incomplete
	}
	for k, vv := range resp.Trailer {
		h[http.TrailerPrefix+k] = vv
	}
	if x.span != nil {
		x.grpcStatus = resp.Trailer.Get("Grpc-Status")
		if x.grpcStatus == "" {
			x.grpcStatus = resp.Header.Get("Grpc-Status")
		}
	}
	if x.bodyLeft() {
		// The upstream answered before the request body was all sent (a
		// 413, a 401 before an upload): the answer is the response, and the
		// rest of the body goes nowhere.
		x.endEarly(w)
	}
}

// exchange is what one request did, recorded in metrics and its span when
// the handler returns.
type exchange struct {
	s              *Server
	start          time.Time
	cluster, route string
	code           int    // 0: the downstream left first
	reason         string // the typed reason when the sidecar failed it
	grpcStatus     string
	aborted        bool // the response body was cut short
	tr             *tracing.HTTP
	span           trace.Span // nil when not traced
	attempt        trace.Span // the open attempt span, nil when none

	// grpc is set for a gRPC request (content-type application/grpc*): the
	// sidecar's own failure answers are gRPC statuses then (grpcFail).
	// grpcDeadline is when its grpc-timeout runs out (zero without one).
	grpc         bool
	grpcDeadline time.Time

	// down is the request on the net/http path when it is HTTP/1.x and has
	// a body (nil otherwise, and on the fast path, which reads bodies
	// whole first); body is its replay body once forwarding began.
	down *http.Request
	body *replayBody
}

// bodyLeft reports whether the request's body (net/http path, HTTP/1.x)
// is not known to have been read to its end: an answer now is an early
// one, which ends the connection (closeIfBodyLeft, endEarly).
func (x *exchange) bodyLeft() bool {
	return x.down != nil && (x.body == nil || !x.body.complete())
}

// closeIfBodyLeft adds Connection: close to the answer's head h when the
// request body is left: the connection cannot carry another request
// (RFC 9112 §9.6; Envoy closes an HTTP/1 connection whose response ends
// before its request, and net/http's server does for a request with
// Expect: 100-continue). Called before WriteHeader.
func (x *exchange) closeIfBodyLeft(h http.Header) {
	if x.bodyLeft() {
		h["Connection"] = closeValue
	}
}

var closeValue = []string{"close"}

// endEarly ends an answer written while the request body was left unread:
// it flushes the answer, stops reading the body (a past read deadline: a
// read blocked on a client that paused returns, so an attempt's request
// writer ends and the upstream response's Close, which waits for it,
// returns), and has the connection close lingering after the response
// (serverConn.Close), so the client's kernel does not reset the
// connection over the answer while the client still sends.
func (x *exchange) endEarly(w http.ResponseWriter) {
	rc := http.NewResponseController(w)
	_ = rc.Flush()
	_ = rc.SetReadDeadline(aLongTimeAgo)
	if sc, ok := x.down.Context().Value(serverConnKey{}).(*serverConn); ok {
		sc.lingerOnClose()
	}
}

func (x *exchange) finish() {
	x.s.rec.Request(RequestRecord{Listener: x.s.name, Cluster: x.cluster, Route: x.route, Code: x.code, Reason: x.reason, Duration: time.Since(x.start)})
	if x.span == nil {
		return
	}
	reason := x.reason
	if x.aborted && reason == "" {
		reason = ReasonUpstreamReset
	}
	if x.attempt != nil {
		tracing.End(x.attempt, x.code, reason, x.grpcStatus, "")
	}
	tracing.End(x.span, x.code, reason, x.grpcStatus, "")
}

// authorize applies x-forwarded-client-cert handling and the RBAC filter
// of the chain; it answers 403 and returns false when the request is
// denied.
func (s *Server) authorize(w http.ResponseWriter, r *http.Request, t *routeTable, x *exchange) bool {
	hc := s.chain.Load()
	r.Header.Del("X-Forwarded-Client-Cert") // SANITIZE and SANITIZE_SET: never trust the downstream's
	peer, _ := r.Context().Value(peerKey{}).(tlsid.Peer)
	if hc.RBAC != nil {
		ok, rule := hc.RBAC.Decide(&config.RBACRequest{
			Principal: peer.SPIFFEID, Method: r.Method, Path: r.URL.Path, Authority: r.Host, Header: r.Header,
		})
		if !ok {
			s.rec.AuthzDenied(s.name, rule)
			s.log.Info("authz: request denied", "listener", s.name, "peer", peer.SPIFFEID, "method", r.Method, "path", r.URL.Path, "rule", rule)
			w.Header().Set(RuleHeader, rule)
			x.cluster, x.route = "", ""
			s.fail(w, t, x, http.StatusForbidden, ReasonAuthzDenied)
			return false
		}
	}
	if hc.ForwardClientCert == config.XFCCSanitizeSet && peer.SPIFFEID != "" {
		v := "Hash=" + peer.Hash
		if s.localID != nil {
			if by := s.localID(); by != "" {
				v = "By=" + by + ";" + v
			}
		}
		if hc.SetCurrentURI {
			v += ";URI=" + peer.SPIFFEID
		}
		r.Header.Set("X-Forwarded-Client-Cert", v)
	}
	return true
}

// failure is a request the sidecar fails itself.
type failure struct {
	status int
	reason string
}

// forward is one request's journey through its attempts.
type forward struct {
	s        *Server
	r        *http.Request
	rt       *config.Route
	c        *cluster.Cluster
	timedOut *atomic.Bool
	via      string
	x        *exchange // the request's record and span
	upgrade  string    // the Upgrade header of a tunnelled upgrade, else ""

	body       *replayBody // nil without a request body
	idempotent bool
	hashKey    uint64
	hasKey     bool

	budgetDenied bool // a retry was due and the budget refused it
}

// prepare strips hop-by-hop headers, adds Via, decides idempotency and the
// hash key, and wraps the body for replay.
func (f *forward) prepare() {
	r := f.r
	if h := f.rt.HashHeader; h != "" {
		if v := r.Header.Get(h); v != "" {
			f.hashKey, f.hasKey = cluster.HashKey(v), true
		}
	}
	// RFC 9110 §9.2.2; a body of unknown length (streaming) is never
	// assumed replay-safe; an Idempotency-Key marks the request safe.
	switch r.Method {
	case http.MethodGet, http.MethodHead, http.MethodOptions, http.MethodTrace, http.MethodPut, http.MethodDelete:
		f.idempotent = r.ContentLength >= 0
	}
	if r.Header.Get("Idempotency-Key") != "" {
		f.idempotent = true
	}
	removeHopByHop(r.Header, true)
	// Expect: 100-continue is answered here (the server sends 100 Continue
	// when the body is first read, as the request goes upstream), as Envoy
	// does by default; the upstream gets a plain request.
	delete(r.Header, "Expect")
	// X-Forwarded-Proto tells the app the scheme its client used; one set by
	// an earlier hop (the caller's sidecar) is kept (Envoy's sidecar default,
	// use_remote_address false). X-Forwarded-For and -Host pass unchanged.
	if _, ok := r.Header["X-Forwarded-Proto"]; !ok {
		if r.TLS != nil || f.s.secure {
			r.Header["X-Forwarded-Proto"] = httpsValue
		} else {
			r.Header["X-Forwarded-Proto"] = httpValue
		}
	}
	if f.upgrade != "" {
		r.Header.Set("Connection", "Upgrade")
		r.Header.Set("Upgrade", f.upgrade)
	}
	if f.via != "" {
		r.Header.Add("Via", protoVersion(r.ProtoMajor, r.ProtoMinor)+" "+f.via)
	}
	if f.x.tr != nil {
		// The request's trace context; an attempt span replaces it with its
		// own (startAttempt).
		f.x.tr.Inject(r.Context(), r.Header)
	}
	if r.ContentLength != 0 && r.Body != nil && r.Body != http.NoBody {
		f.body = newReplayBody(r.Body, f.rt.BodyBufferBytes, r.ContentLength)
	}
}

var (
	httpValue  = []string{"http"}
	httpsValue = []string{"https"}
)

// request builds the upstream request of one attempt.
func (f *forward) request(ctx context.Context, ep *cluster.Endpoint) *http.Request {
	r := f.r
	u := *r.URL
	u.Scheme, u.Host = "http", ep.Address
	out := r.WithContext(ctx)
	out.URL = &u
	out.RequestURI = ""
	out.Close = false
	if f.body != nil {
		out.Body = f.body.attempt()
	} else {
		out.Body = nil // lets the transport resend on a stale pooled connection
	}
	return out
}

// run sends attempts until one gives a response to return, or the request
// fails. The returned attempt must be ended by the caller.
func (f *forward) run(ctx context.Context) (*http.Response, *cluster.Attempt, *failure) {
	p := f.rt.Retry
	var triedBuf [4]*cluster.Endpoint
	tried := triedBuf[:0]
	retries := 0
	var last *failure
	for {
		var avoid []*cluster.Endpoint
		if p != nil && p.OtherHost {
			avoid = tried
		}
		att, picked := f.c.Pick(f.hashKey, f.hasKey, avoid)
		if picked != cluster.Picked {
			if last != nil {
				return nil, nil, last
			}
			if picked == cluster.CircuitOpen {
				return nil, nil, &failure{http.StatusServiceUnavailable, ReasonCircuitOpen}
			}
			return nil, nil, &failure{http.StatusServiceUnavailable, ReasonNoHealthyUpstream}
		}
		ep := att.Endpoint()
		tried = append(tried, ep)

		var perTry time.Duration
		if p != nil {
			perTry = p.PerTry
		}
		actx, aspan := f.startAttempt(ctx, retries+1, ep)
		resp, err := ep.RoundTrip(ctx, f.request(actx, ep), perTry)
		if err == nil {
			cond, sent := statusCondition(resp.StatusCode, resp.Header.Get("Grpc-Status"), p), true
			if notReached(resp.StatusCode, resp.Header.Get(ReasonHeader)) {
				// The upstream sidecar says the request never reached its app.
				cond, sent = "connect-failure", false
			}
			if cond == "" || !f.mayRetry(cond, sent, retries) {
				f.x.attempt = aspan // ended with the response
				return resp, att, nil
			}
			resp.Body.Close()
			att.End(cluster.OutcomeForStatus(resp.StatusCode))
			last = &failure{resp.StatusCode, ""}
			f.s.rec.Retry(f.c.Name(), cond)
			f.x.endAttempt(aspan, resp.StatusCode, resp.Header.Get(ReasonHeader), cond, retries+1)
		} else {
			if f.r.Context().Err() != nil {
				att.End(cluster.OutcomeCancelled)
				f.x.endAttempt(aspan, 0, "", "", 0)
				return nil, nil, &failure{0, ""}
			}
			att.End(cluster.OutcomeLocalFailure)
			var ue *cluster.UpstreamError
			if !errors.As(err, &ue) {
				ue = &cluster.UpstreamError{Kind: cluster.KindReset, Sent: true, Err: err}
			}
			fl, cond := f.failureFor(ue)
			f.s.log.Debug("httpproxy: attempt failed", "listener", f.s.name, "cluster", f.c.Name(), "endpoint", ep.Address,
				"attempt", retries+1, "reason", fl.reason, "error", err)
			if f.timedOut.Load() || !f.mayRetry(cond, ue.Sent, retries) {
				if f.budgetDenied && fl.reason != ReasonOverflow {
					fl.reason = ReasonRetryBudgetExhausted
				}
				f.x.endAttempt(aspan, 0, fl.reason, "", 0)
				return nil, nil, fl
			}
			last = fl
			f.s.rec.Retry(f.c.Name(), cond)
			f.x.endAttempt(aspan, 0, fl.reason, cond, retries+1)
		}
		// A retry: wait the full-jitter backoff, then go again.
		retries++
		if !f.c.AcquireRetry() {
			f.s.rec.RetryDenied(f.c.Name(), "max_retries")
			return nil, nil, &failure{http.StatusServiceUnavailable, ReasonOverflow}
		}
		ok := sleepBackoff(ctx, p, retries)
		f.c.ReleaseRetry()
		if !ok {
			if f.r.Context().Err() != nil {
				return nil, nil, &failure{0, ""}
			}
			return nil, nil, &failure{http.StatusGatewayTimeout, ReasonUpstreamTimeout}
		}
	}
}

// startAttempt opens the span of attempt n when attempts get their own
// spans, and returns the context whose trace context the upstream request
// carries.
func (f *forward) startAttempt(ctx context.Context, n int, ep *cluster.Endpoint) (context.Context, trace.Span) {
	tr := f.x.tr
	if tr == nil || !tr.SpawnAttempts() || !f.x.span.IsRecording() {
		return ctx, nil
	}
	actx, span := tr.StartAttempt(ctx, n, ep.Address, f.c.PeerID())
	tr.Inject(actx, f.r.Header)
	return actx, span
}

// endAttempt ends an attempt that did not give the response: its span,
// or, without attempt spans, an event on the request's span. cause is the
// retry_on condition when it is retried.
func (x *exchange) endAttempt(span trace.Span, code int, reason, cause string, n int) {
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
			attrs = append(attrs, tracing.AttrReason.String(reason))
		}
		x.span.AddEvent("retry", trace.WithAttributes(attrs...))
	}
}

// failureFor maps a failed attempt to the failure to report and the
// retry_on condition it matches.
func (f *forward) failureFor(ue *cluster.UpstreamError) (*failure, string) {
	return failureFor(ue, f.timedOut.Load())
}

// failureFor maps a failed attempt to the failure to report and the
// retry_on condition it matches; timedOut says the route timeout has
// passed (504, not retried).
func failureFor(ue *cluster.UpstreamError, timedOut bool) (*failure, string) {
	switch {
	case timedOut:
		return &failure{http.StatusGatewayTimeout, ReasonUpstreamTimeout}, ""
	case ue.Kind == cluster.KindTimeout:
		// Envoy treats a per-try timeout as a 504: retried under 5xx and gateway-error.
		return &failure{http.StatusGatewayTimeout, ReasonUpstreamTimeout}, "gateway-error"
	case ue.Kind == cluster.KindConnectFailure:
		return &failure{http.StatusServiceUnavailable, ReasonConnectFailure}, "connect-failure"
	case ue.Kind == cluster.KindTLSHandshake:
		return &failure{http.StatusServiceUnavailable, ReasonTLSHandshakeFailed}, "connect-failure"
	case ue.Kind == cluster.KindRefusedStream:
		return &failure{http.StatusServiceUnavailable, ReasonUpstreamReset}, "refused-stream"
	case ue.Kind == cluster.KindOverflow:
		return &failure{http.StatusServiceUnavailable, ReasonOverflow}, ""
	}
	return &failure{http.StatusServiceUnavailable, ReasonUpstreamReset}, "reset"
}

// mayRetry decides whether an attempt that met cond is retried: the policy
// lists cond, retries are left, the request is safe to send again (nothing
// reached the upstream, or it is idempotent or the policy says so), its body
// can be replayed, and the retry budget has a token. A gRPC status condition
// (every gRPC call is a POST) is itself the opt-in, as in gRPC's own retry
// policy, where retryable status codes are declared per service.
func (f *forward) mayRetry(cond string, sent bool, retries int) bool {
	return retryAllowed(retryAsk{p: f.rt.Retry, c: f.c, rec: f.s.rec, cond: cond, sent: sent, retries: retries,
		idempotent: f.idempotent, replayable: f.body == nil || f.body.replayable(), gone: f.r.Context().Err() != nil}, &f.budgetDenied)
}

// retryAsk is what deciding one retry reads, on either path.
type retryAsk struct {
	p       *config.RetryPolicy
	c       *cluster.Cluster
	rec     Recorder
	cond    string // the retry_on condition the attempt met
	sent    bool   // something may have reached the upstream
	retries int    // retries sent so far
	// idempotent: the request may be sent twice; replayable: its body can
	// be sent again; gone: the downstream left.
	idempotent, replayable, gone bool
}

// retryAllowed is the retry decision of mayRetry; a budget refusal sets
// *budgetDenied. Denials are recorded by reason.
func retryAllowed(a retryAsk, budgetDenied *bool) bool {
	p := a.p
	if p == nil || a.cond == "" || a.retries >= p.NumRetries || !matches(p, a.cond) || a.gone {
		return false
	}
	if a.sent && !a.idempotent && !p.NonIdempotentRetry && !isGRPCCondition(a.cond) {
		a.rec.RetryDenied(a.c.Name(), "non_idempotent")
		return false
	}
	if !a.replayable {
		a.rec.RetryDenied(a.c.Name(), "body_too_large")
		return false
	}
	if !a.c.Budget().TryWithdraw() {
		*budgetDenied = true
		a.rec.RetryDenied(a.c.Name(), ReasonRetryBudgetExhausted)
		return false
	}
	return true
}

// matches reports whether the policy retries on cond. A connect failure
// or a refused stream also matches "5xx", "gateway-error" and "reset" as in
// Envoy, where they surface as a 503.
func matches(p *config.RetryPolicy, cond string) bool {
	switch cond {
	case "connect-failure":
		return p.On&(config.RetryConnectFailure|config.Retry5xx|config.RetryGatewayError|config.RetryReset) != 0
	case "refused-stream":
		return p.On&(config.RetryRefusedStream|config.Retry5xx|config.RetryGatewayError|config.RetryReset) != 0
	case "reset":
		return p.On&(config.RetryReset|config.Retry5xx|config.RetryGatewayError) != 0
	}
	c, ok := config.RetryConditions[cond]
	return ok && p.On&c != 0
}

// statusCondition returns the retry_on condition a response meets under p
// ("" when none): a retriable status code, 5xx / gateway-error, or a gRPC
// status in the headers of a trailers-only response.
func statusCondition(code int, grpcStatus string, p *config.RetryPolicy) string {
	if p == nil {
		return ""
	}
	if p.On&config.RetryRetriableStatusCodes != 0 {
		for _, c := range p.StatusCodes {
			if c == code {
				return "retriable-status-codes"
			}
		}
	}
	if code == 502 || code == 503 || code == 504 {
		if p.On&config.RetryGatewayError != 0 {
			return "gateway-error"
		}
	}
	if code >= 500 && p.On&config.Retry5xx != 0 {
		return "5xx"
	}
	if gs := grpcStatus; gs != "" {
		cond := grpcConditions[gs]
		if c, ok := config.RetryConditions[cond]; ok && p.On&c != 0 {
			return cond
		}
	}
	return ""
}

func isGRPCCondition(cond string) bool {
	switch cond {
	case "cancelled", "deadline-exceeded", "internal", "resource-exhausted", "unavailable":
		return true
	}
	return false
}

// notReached reports a 503 from an upstream meshlet sidecar whose typed
// reason says the request never reached the application behind it.
func notReached(code int, reason string) bool {
	if code != http.StatusServiceUnavailable {
		return false
	}
	switch reason {
	case ReasonConnectFailure, ReasonNoHealthyUpstream, ReasonCircuitOpen, ReasonOverflow, ReasonTLSHandshakeFailed:
		return true
	}
	return false
}

// grpcConditions maps grpc-status values to retry_on conditions.
var grpcConditions = map[string]string{
	"1": "cancelled", "4": "deadline-exceeded", "8": "resource-exhausted", "13": "internal", "14": "unavailable",
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

// idleReader cancels the request when no bytes arrive for d.
type idleReader struct {
	r     io.Reader
	d     time.Duration
	timer *time.Timer
}

func newIdleReader(r io.Reader, d time.Duration, cancel context.CancelFunc) *idleReader {
	return &idleReader{r: r, d: d, timer: time.AfterFunc(d, cancel)}
}

func (i *idleReader) Read(p []byte) (int, error) {
	n, err := i.r.Read(p)
	if n > 0 {
		i.timer.Reset(i.d)
	}
	if err != nil {
		i.timer.Stop()
	}
	return n, err
}
