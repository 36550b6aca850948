package httpproxy

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"strconv"
	"syscall"
	"time"

	"github.com/meshlet/meshlet/sidecar/cluster"
	"github.com/meshlet/meshlet/sidecar/config"
	"github.com/meshlet/meshlet/sidecar/tracing"
	"go.opentelemetry.io/otel/trace"
)

// The HTTP/1.1 fast path.
//
// Each downstream HTTP/1.1 connection is served by one goroutine that
// parses request heads in place in its own read buffer (h1head.go), routes,
// authorizes and forwards them as bytes on the upstream cluster's pooled
// HTTP/1.1 connections (cluster.H1Conn), and relays the response head
// (hop-by-hop fields dropped, Via added) and body (Content-Length,
// chunked or read-until-close framing, passed through as is), writing what
// it has before each read that would block: a small response costs one
// read and one write on each side, and a streamed one (SSE, chunked) is
// flushed chunk by chunk. Retries, per-try and route timeouts, the retry
// budget, circuit breakers, outlier detection, RBAC,
// x-forwarded-client-cert and tracing (request and attempt spans, trace
// context continued and injected) behave as on the net/http path
// (forward.go).
//
// What the fast path does not do the connection does on net/http's
// server, for the rest of its life: the bytes read so far are replayed to
// it. That is HTTP/1.0, h2c (prior knowledge), Upgrade (WebSockets),
// Expect, request bodies sent chunked or larger than the route's replay
// buffer, requests to HTTP/2 clusters, routes with an idle timeout or a
// max stream duration, and anything unusual in a head
// (net/http answers its 400s and 431s).
//
// A downstream that goes away is noticed while its request is in flight: a
// monitor, ticking every watchAfter, starts a goroutine reading the
// downstream for exchanges older than that (as net/http's background read
// does for every request); the client's EOF or reset cancels the upstream
// attempt, so a long poll's app sees its client leave.

// exchange serves the request whose head is parsed: keep says the
// connection may carry another request; fallback that the request is for
// net/http's server (nothing was consumed).
func (fc *fastConn) exchange() (keep, fallback bool) {
	s := fc.s
	fc.answered = false
	h := &fc.head
	tr := s.tracer.Load()
	t := s.table.Load()
	hc := s.chain.Load()
	method := bstr(h.method)
	rt := t.routeFor(bstr(h.host), bstr(h.path), method, h)
	var c *cluster.Cluster
	if rt != nil {
		if rt.IdleTimeout > 0 || rt.MaxStreamDuration > 0 {
			return false, true
		}
		if c = s.clusters.Get(rt.Cluster); c != nil && !c.HTTP1() {
			return false, true
		}
	}
	// The body, replayable, whole in buf before anything goes upstream.
	if h.contentLength > 0 {
		limit := int64(config.DefaultBodyBufferBytes)
		if rt != nil {
			limit = int64(rt.BodyBufferBytes)
		}
		if h.contentLength > limit || int64(h.size)+h.contentLength > fastMaxBuf {
			return false, true
		}
		if !fc.readBody(h.size + int(h.contentLength)) {
			return false, false
		}
	}
	msg := fc.buf[fc.r : fc.r+h.size+int(h.contentLength)]
	body := msg[h.size:]

	x := &fc.ex
	*x = exchange{s: s, start: time.Now()}
	if rt != nil {
		x.cluster, x.route = rt.Cluster, rt.Name
	}
	keep = !h.closeConn
	if tr != nil {
		x.tr = tr
		fc.traceCtx, x.span = tr.StartHead(context.Background(), reqCarrier{h}, methodName(h.method),
			tracing.Request{Cluster: x.cluster, Route: x.route, PeerID: fc.peer.SPIFFEID}, fc.describe)
	}
	fc.x, fc.heldRequest = x, nil
	defer func() {
		fc.r += len(msg)
		fc.settle()
	}()

	// Authorization (RBAC filter), then x-forwarded-client-cert.
	if hc.RBAC != nil {
		ok, rule := hc.RBAC.Decide(&config.RBACRequest{
			Principal: fc.peer.SPIFFEID, Method: method, Path: bstr(h.path), Authority: bstr(h.host), Header: h,
		})
		if !ok {
			s.rec.AuthzDenied(s.name, rule)
			s.log.Info("authz: request denied", "listener", s.name, "peer", fc.peer.SPIFFEID, "method", string(h.method), "path", string(h.path), "rule", rule)
			x.cluster, x.route = "", ""
			return fc.fail(x, t, http.StatusForbidden, ReasonAuthzDenied, rule) && keep, false
		}
	}
	if rt == nil {
		return fc.fail(x, t, http.StatusNotFound, ReasonNoRoute, "") && keep, false
	}
	if c == nil {
		return fc.fail(x, t, http.StatusServiceUnavailable, ReasonNoCluster, "") && keep, false
	}
	if !c.AcquireRequest() {
		return fc.fail(x, t, http.StatusServiceUnavailable, ReasonOverflow, "") && keep, false
	}
	fc.heldRequest = c
	c.Budget().Deposit()

	// The upstream request: the head without hop-by-hop fields, plus
	// X-Forwarded-Proto, TE: trailers, x-forwarded-client-cert, Via; then
	// the body.
	op := outPool.Get().(*[]byte)
	defer outPool.Put(op)
	out := (*op)[:0]
	out = append(out, h.method...)
	out = append(out, ' ')
	out = append(out, h.target...)
	out = append(out, " HTTP/1.1\r\n"...)
	var traceFields []string
	if tr != nil {
		traceFields = tr.Fields() // injected anew below
	}
	for i := range h.fields {
		if f := &h.fields[i]; !f.drop && !isField(f.name, traceFields) {
			out = append(out, f.name...)
			out = append(out, ": "...)
			out = append(out, f.value...)
			out = append(out, "\r\n"...)
		}
	}
	if !h.xfp {
		if s.secure {
			out = append(out, "X-Forwarded-Proto: https\r\n"...)
		} else {
			out = append(out, "X-Forwarded-Proto: http\r\n"...)
		}
	}
	if h.teTrailers {
		out = append(out, "Te: trailers\r\n"...)
	}
	if v := fc.xfccValue(hc); len(v) > 0 {
		out = append(out, "X-Forwarded-Client-Cert: "...)
		out = append(out, v...)
		out = append(out, "\r\n"...)
	}
	if t.via != "" {
		out = append(out, "Via: 1.1 "...)
		out = append(out, t.via...)
		out = append(out, "\r\n"...)
	}
	*op = out
	prefix := len(out) // the rest (trace context, blank line, body) is per attempt

	fc.since.Store(x.start.UnixNano())
	fc.state.Store(fcBusy)
	defer func() {
		if !fc.endBusy() {
			keep = false
		}
	}()
	return fc.forward(x, t, rt, c, op, prefix, body) && keep, false
}

// requestTail completes the upstream request in *op after its first prefix
// bytes: the trace context of ctx (when traced), the blank line, the body.
func (fc *fastConn) requestTail(op *[]byte, prefix int, ctx context.Context, body []byte) []byte {
	*op = (*op)[:prefix]
	if x := fc.x; x.tr != nil {
		x.tr.InjectInto(ctx, outCarrier{op})
	}
	out := append(*op, "\r\n"...)
	out = append(out, body...)
	*op = out
	return out
}

// settle records the exchange and releases its request slot, once.
func (fc *fastConn) settle() {
	if fc.x == nil {
		return // settled already
	}
	if fc.heldRequest != nil {
		fc.heldRequest.ReleaseRequest()
		fc.heldRequest = nil
	}
	fc.x.finish()
	fc.x, fc.traceCtx = nil, nil
}

// xfccValue returns the x-forwarded-client-cert value for chain hc (Envoy
// SANITIZE_SET: By, Hash, URI of the peer), nil when none is set.
func (fc *fastConn) xfccValue(hc *config.HTTPConnectionManager) []byte {
	if hc.ForwardClientCert != config.XFCCSanitizeSet || fc.peer.SPIFFEID == "" {
		return nil
	}
	if fc.xfccFor != hc {
		v := "Hash=" + fc.peer.Hash
		if fc.s.localID != nil {
			if by := fc.s.localID(); by != "" {
				v = "By=" + by + ";" + v
			}
		}
		if hc.SetCurrentURI {
			v += ";URI=" + fc.peer.SPIFFEID
		}
		fc.xfcc, fc.xfccFor = []byte(v), hc
	}
	return fc.xfcc
}

// fail answers a request the sidecar fails itself, with its typed reason
// (and the denying rule for authz_denied); false when the write failed.
func (fc *fastConn) fail(x *exchange, t *routeTable, status int, reason, rule string) bool {
	x.code, x.reason = status, reason
	op := outPool.Get().(*[]byte)
	defer outPool.Put(op)
	out := appendStatusLine((*op)[:0], status)
	if reason != "" {
		out = append(out, "X-Meshlet-Reason: "...)
		out = append(out, reason...)
		out = append(out, "\r\n"...)
	}
	if rule != "" {
		out = append(out, "X-Meshlet-Authz-Rule: "...)
		out = append(out, rule...)
		out = append(out, "\r\n"...)
	}
	out = append(out, "Content-Type: text/plain; charset=utf-8\r\nDate: "...)
	out = time.Now().UTC().AppendFormat(out, http.TimeFormat)
	out = append(out, "\r\n"...)
	if t.via != "" {
		out = append(out, "Via: 1.1 "...)
		out = append(out, t.via...)
		out = append(out, "\r\n"...)
	}
	out = append(out, "Content-Length: "...)
	out = strconv.AppendInt(out, int64(len(reason)+1), 10)
	out = append(out, "\r\n"...)
	if fc.head.closeConn || fc.s.fast.draining.Load() {
		out = append(out, "Connection: close\r\n"...)
	}
	out = append(out, "\r\n"...)
	if string(fc.head.method) != "HEAD" {
		out = append(out, reason...)
		out = append(out, '\n')
	}
	*op = out
	fc.settle()
	_, err := fc.rw.Write(out)
	fc.answered = err == nil
	return err == nil
}

func appendStatusLine(b []byte, code int) []byte {
	b = append(b, "HTTP/1.1 "...)
	b = strconv.AppendInt(b, int64(code), 10)
	b = append(b, ' ')
	return append(append(b, http.StatusText(code)...), "\r\n"...)
}

// forward sends req (head and body) on attempts until one gives the
// response to relay, or the request fails; it reports whether the
// downstream connection may carry another request.
func (fc *fastConn) forward(x *exchange, t *routeTable, rt *config.Route, c *cluster.Cluster, op *[]byte, prefix int, body []byte) bool {
	h := &fc.head
	hasBody := len(body) > 0
	spawn := x.tr != nil && x.tr.SpawnAttempts() && x.span.IsRecording()
	req := fc.requestTail(op, prefix, fc.traceCtx, body)
	p := rt.Retry
	var hashKey uint64
	var hasKey bool
	if name := rt.HashHeader; name != "" {
		if v, ok := h.lookup(name); ok {
			hashKey, hasKey = cluster.HashKey(v), true
		}
	}
	idempotent := h.idempotencyKey
	switch string(h.method) {
	case http.MethodGet, http.MethodHead, http.MethodOptions, http.MethodTrace, http.MethodPut, http.MethodDelete:
		idempotent = true
	}
	var routeDeadline time.Time
	ctx := context.Background()
	if rt.Timeout > 0 {
		routeDeadline = x.start.Add(rt.Timeout)
		var cancel context.CancelFunc
		ctx, cancel = context.WithDeadline(ctx, routeDeadline)
		defer cancel()
	}
	var triedBuf [4]*cluster.Endpoint
	tried := triedBuf[:0]
	retries := 0
	budgetDenied := false
	var last *failure
	for {
		var avoid []*cluster.Endpoint
		if p != nil && p.OtherHost {
			avoid = tried
		}
		att, picked := c.Pick(hashKey, hasKey, avoid)
		if picked != cluster.Picked {
			fl := last
			if fl == nil {
				fl = &failure{http.StatusServiceUnavailable, ReasonNoHealthyUpstream}
				if picked == cluster.CircuitOpen {
					fl.reason = ReasonCircuitOpen
				}
			}
			return fc.failWith(x, t, fl)
		}
		ep := att.Endpoint()
		tried = append(tried, ep)
		var perTry time.Duration
		if p != nil {
			perTry = p.PerTry
		}
		var aspan trace.Span
		if spawn {
			// Each attempt its own span, whose context the request carries.
			var actx context.Context
			actx, aspan = x.tr.StartAttempt(fc.traceCtx, retries+1, ep.Address, c.PeerID())
			req = fc.requestTail(op, prefix, actx, body)
		}
		uc, err := fc.attempt(ctx, ep, req, perTry, routeDeadline, !hasBody && idempotent)
		var cond string
		sent := true
		if err == nil {
			rh := &fc.resp
			cond = statusCondition(rh.code, bstr(rh.grpcStatus), p)
			if notReached(rh.code, bstr(rh.reason)) {
				cond, sent = "connect-failure", false
			}
			if cond == "" || !fc.mayRetry(rt, c, cond, sent, retries, idempotent, &budgetDenied) {
				x.attempt = aspan // ended with the response
				return fc.relay(x, t, rt, att, uc, routeDeadline, perTry, budgetDenied)
			}
			code := rh.code
			reason := string(rh.reason)
			uc.Release(false)
			fc.setUp(nil)
			att.End(cluster.OutcomeForStatus(code))
			last = &failure{code, ""}
			fc.s.rec.Retry(c.Name(), cond)
			x.endAttempt(aspan, code, reason, cond, retries+1)
		} else {
			if fc.isCancelled() {
				att.End(cluster.OutcomeCancelled)
				x.endAttempt(aspan, 0, "", "", 0)
				return false
			}
			att.End(cluster.OutcomeLocalFailure)
			var ue *cluster.UpstreamError
			if !errors.As(err, &ue) {
				ue = &cluster.UpstreamError{Kind: cluster.KindReset, Sent: true, Err: err}
			}
			timedOut := !routeDeadline.IsZero() && !time.Now().Before(routeDeadline)
			fl, cond := failureFor(ue, timedOut)
			fc.s.log.Debug("httpproxy: attempt failed", "listener", fc.s.name, "cluster", c.Name(), "endpoint", ep.Address,
				"attempt", retries+1, "reason", fl.reason, "error", err)
			if timedOut || !fc.mayRetry(rt, c, cond, ue.Sent, retries, idempotent, &budgetDenied) {
				if budgetDenied && fl.reason != ReasonOverflow {
					fl.reason = ReasonRetryBudgetExhausted
				}
				x.endAttempt(aspan, 0, fl.reason, "", 0)
				return fc.failWith(x, t, fl)
			}
			last = fl
			fc.s.rec.Retry(c.Name(), cond)
			x.endAttempt(aspan, 0, fl.reason, cond, retries+1)
		}
		retries++
		if !c.AcquireRetry() {
			fc.s.rec.RetryDenied(c.Name(), "max_retries")
			return fc.failWith(x, t, &failure{http.StatusServiceUnavailable, ReasonOverflow})
		}
		ok := sleepBackoff(ctx, p, retries)
		c.ReleaseRetry()
		if fc.isCancelled() {
			return false
		}
		if !ok {
			return fc.failWith(x, t, &failure{http.StatusGatewayTimeout, ReasonUpstreamTimeout})
		}
	}
}

// failWith answers fl as the net/http path does (ServeHTTP: s.fail).
func (fc *fastConn) failWith(x *exchange, t *routeTable, fl *failure) bool {
	return fc.fail(x, t, fl.status, fl.reason, "") && !fc.head.closeConn
}

// mayRetry is forward.mayRetry for the fast path (bodies are always
// buffered whole, so replayable).
func (fc *fastConn) mayRetry(rt *config.Route, c *cluster.Cluster, cond string, sent bool, retries int, idempotent bool, budgetDenied *bool) bool {
	return retryAllowed(retryAsk{p: rt.Retry, c: c, rec: fc.s.rec, cond: cond, sent: sent, retries: retries,
		idempotent: idempotent, replayable: true, gone: fc.isCancelled()}, budgetDenied)
}

// staleConn reports the errors of a pooled connection the upstream closed
// while it was idle, met by the request's write or its first read: EOF,
// reset, broken pipe.
func staleConn(err error) bool {
	return errors.Is(err, io.EOF) || errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE)
}

// attempt sends req on a connection to ep and reads the final response
// head into fc.resp. The per-try timeout and the route deadline bound it
// as a read deadline. A request that met a pooled connection the upstream
// had just closed goes again at once on another when resend is set (no
// body, idempotent), as net/http does.
func (fc *fastConn) attempt(ctx context.Context, ep *cluster.Endpoint, req []byte, perTry time.Duration, routeDeadline time.Time, resend bool) (cluster.H1Conn, error) {
	for try := 0; ; try++ {
		uc, reused, err := ep.GetH1(ctx, resend && try == 0)
		if err != nil {
			return uc, err
		}
		if !fc.setUp(uc.Conn()) {
			uc.Release(false)
			return cluster.H1Conn{}, &cluster.UpstreamError{Kind: cluster.KindReset, Err: context.Canceled}
		}
		deadline := routeDeadline
		if perTry > 0 {
			if d := time.Now().Add(perTry); deadline.IsZero() || d.Before(deadline) {
				deadline = d
			}
		}
		if !deadline.IsZero() {
			_ = uc.SetDeadline(deadline)
		}
		fc.resp.size = 0
		_, err = uc.Write(req)
		if err == nil {
			err = readResponseHead(uc.Reader(), &fc.resp)
		} else if uc.Written() > 0 && (errors.Is(err, syscall.EPIPE) || errors.Is(err, syscall.ECONNRESET)) &&
			readResponseHead(uc.Reader(), &fc.resp) == nil {
			// The upstream closed while the body was being written, after
			// answering (a 413, a 401 before an upload; its kernel reset the
			// connection over the unread body): that answer, already in the
			// socket, is the response, not a reset, as net/http's transport
			// has it. The rest of the body goes nowhere, and the connection
			// cannot be reused.
			fc.resp.closeConn = true
			return uc, nil
		}
		if err == nil {
			return uc, nil
		}
		sent := uc.Written() > 0
		uc.Release(false)
		fc.setUp(nil)
		if reused && fc.resp.size == 0 && staleConn(err) {
			// The upstream closed an idle connection as the request went out
			// (keep-alive race): it did not process the request.
			if resend && try == 0 {
				continue
			}
			err = &cluster.UpstreamError{Kind: cluster.KindReset, Sent: sent, Err: err}
		}
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			return cluster.H1Conn{}, &cluster.UpstreamError{Kind: cluster.KindTimeout, Sent: sent, Err: err}
		}
		var ue *cluster.UpstreamError
		if !errors.As(err, &ue) {
			err = &cluster.UpstreamError{Kind: cluster.KindReset, Sent: sent, Err: err}
		}
		return cluster.H1Conn{}, err
	}
}
