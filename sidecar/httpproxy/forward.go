package httpproxy

import (
	"context"
	"errors"
	"io"
	"net/http"
	"strings"
	"sync/atomic"
	"time"

	"github.com/meshlet/meshlet/sidecar/cluster"
	"github.com/meshlet/meshlet/sidecar/config"
	"github.com/meshlet/meshlet/sidecar/tlsid"
	"github.com/meshlet/meshlet/sidecar/tracing"
	"github.com/meshlet/meshlet/xds"
)

// The net/http wire: ServeHTTP serves one request of net/http's server
// (HTTP/2, h2c, and HTTP/1.1 connections the fast path handed over or
// does not take) through the engine (engine.go), as a *forward.

// ServeHTTP routes and forwards one request: route → admission (RBAC,
// cluster, max_requests) → attempts on picked endpoints, retried per the
// route's retry policy (the engine) → the response streamed back.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	x := exchange{s: s, start: time.Now()}
	f := &forward{s: s, w: w, x: &x}
	// An HTTP/1.x request's answer may come before its body was all read.
	f.h1 = r.ProtoMajor == 1
	f.down = f.h1 && r.Body != nil && r.Body != http.NoBody
	x.setGRPC(r.Header.Get("Content-Type"), r.Header.Get("Grpc-Timeout"))
	t := s.table.Load()
	rt := t.route(r)
	if rt != nil {
		x.cluster, x.route = rt.Cluster, rt.Name
	}
	peer, _ := r.Context().Value(peerKey{}).(tlsid.Peer)
	if tr := s.tracer.Load(); tr != nil {
		ctx, span := tr.Start(r.Context(), r, tracing.Request{Cluster: x.cluster, Route: x.route, PeerID: peer.SPIFFEID})
		r = r.WithContext(ctx)
		x.tr, x.span = tr, span
	}
	f.r = r
	x.w, x.t = f, t
	defer x.finish()

	hc := s.chain.Load()
	if headerCount(r) > hc.HeadersCountLimit() {
		// The head's size is net/http's to refuse (MaxHeaderBytes), the
		// count the connection manager's (max_headers_count), as Envoy's
		// codec does, before any filter.
		x.cluster, x.route = "", ""
		x.fail(http.StatusRequestHeaderFieldsTooLarge, xds.ReasonRequestHeadersTooLarge, "")
		return
	}
	if r.ProtoMajor == 2 && connectionSpecific(r.Header) {
		// RFC 9113 §8.2.2: a request with a connection-specific field is
		// malformed. Go's HTTP/2 server lets it through: refuse it here,
		// as Envoy's codec does, rather than strip and forward it.
		x.cluster, x.route = "", ""
		x.fail(http.StatusBadRequest, xds.ReasonDownstreamProtocolError, "")
		return
	}
	r.Header.Del("X-Forwarded-Client-Cert") // SANITIZE and SANITIZE_SET: never trust the downstream's
	// An HTTP/1.1 Upgrade (WebSocket) is tunnelled when enabled; h2c
	// upgrades are ignored (served as HTTP/1.1), others refused.
	var refusal *failure
	var c *cluster.Cluster
	if rt != nil {
		if upgrade := upgradeType(r); upgrade != "" && upgrade != "h2c" {
			if hc.UpgradeAllowed(rt, upgrade) {
				f.upgrade = r.Header.Get("Upgrade")
			} else {
				refusal = &failure{http.StatusForbidden, xds.ReasonUpgradeNotAllowed}
			}
		}
		c = s.clusters.Get(rt.Cluster)
	}
	if !x.admit(hc, rt, c, refusal, peer.SPIFFEID, r.Method, r.URL.Path, r.Host, r.Header) {
		return
	}
	defer c.ReleaseRequest()
	if v := s.xfccValue(hc, peer.SPIFFEID, peer.Hash); v != "" {
		r.Header.Set("X-Forwarded-Client-Cert", v)
	}

	// The route timeout covers the whole exchange, retries included; it is
	// disarmed at the response headers of a streaming response. The max
	// stream duration covers everything.
	ctx, cancel := r.Context(), context.CancelFunc(nil)
	if rt.Timeout > 0 || rt.MaxStreamDuration > 0 || rt.IdleTimeout > 0 {
		ctx, cancel = context.WithCancel(ctx)
		defer cancel()
	}
	var routeTimer *time.Timer
	if rt.Timeout > 0 {
		routeTimer = time.AfterFunc(rt.Timeout, func() { f.timedOutFlag.Store(true); cancel() })
		defer routeTimer.Stop()
	}
	if rt.MaxStreamDuration > 0 {
		streamTimer := time.AfterFunc(rt.MaxStreamDuration, func() { f.timedOutFlag.Store(true); cancel() })
		defer streamTimer.Stop()
	}

	f.rt, f.via = rt, t.via
	x.classify(r.Method, r.ContentLength >= 0, r.Header.Get("Idempotency-Key") != "", canonHeader(r.Header))
	f.prepare()
	att := x.forward(ctx, ctx)
	if att == nil {
		return // failed, and answered unless the downstream left
	}
	resp := f.resp
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
	if reason := x.relayReason(); reason != "" {
		h.Set(ReasonHeader, string(reason))
	}
	if len(resp.Trailer) > 0 {
		names := make([]string, 0, len(resp.Trailer))
		for k := range resp.Trailer {
			names = append(names, k)
		}
		h["Trailer"] = []string{strings.Join(names, ", ")}
	}
	f.closeIfBodyLeft(h)
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
		if f.bodyLeft() {
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
	if f.bodyLeft() {
		// The upstream answered before the request body was all sent (a
		// 413, a 401 before an upload): the answer is the response, and the
		// rest of the body goes nowhere.
		f.endEarly()
	}
}

// canonHeader is an http.Header as a headerLookup by any spelling of the
// name (http.Header.Get).
type canonHeader http.Header

func (h canonHeader) lookup(name string) (string, bool) {
	v := http.Header(h).Get(name)
	return v, v != ""
}

// forward is the net/http wire of one request (see wire).
type forward struct {
	s  *Server
	r  *http.Request
	w  http.ResponseWriter
	rt *config.Route
	// timedOutFlag is set when the route timeout or the max stream
	// duration expires.
	timedOutFlag atomic.Bool
	via          string
	x            *exchange // the request's record and span
	upgrade      string    // the Upgrade header of a tunnelled upgrade, else ""

	// h1 says the request is HTTP/1.x (its connection can be shed).
	h1 bool
	// down says the request is HTTP/1.x with a body: an answer may come
	// before the body was all read. body is its replay body once
	// forwarding began (nil without a request body).
	down bool
	body *replayBody

	resp *http.Response // the response of the last roundTrip
}

// roundTrip implements wire.
func (f *forward) roundTrip(ctx, actx context.Context, ep *cluster.Endpoint, perTry time.Duration) (upstreamHead, error) {
	if actx == nil {
		actx = ctx
	} else {
		f.x.tr.Inject(actx, f.r.Header)
	}
	resp, err := ep.RoundTrip(ctx, f.request(actx, ep), perTry)
	if err != nil {
		return upstreamHead{}, err
	}
	if resp.StatusCode == http.StatusSwitchingProtocols && f.upgrade == "" {
		// No upgrade was asked for: a malformed answer, as on the fast
		// path (readResponseHead).
		resp.Body.Close()
		return upstreamHead{}, &cluster.UpstreamError{Kind: cluster.KindReset, Sent: true, Err: errResponseHead}
	}
	f.resp = resp
	return upstreamHead{code: resp.StatusCode, grpcStatus: resp.Header.Get("Grpc-Status"), reason: xds.FailureReason(resp.Header.Get(ReasonHeader))}, nil
}

// discard implements wire.
func (f *forward) discard() {
	f.resp.Body.Close()
	f.resp = nil
}

// gone implements wire: the request's context ended.
func (f *forward) gone() bool { return f.r.Context().Err() != nil }

// timedOut implements wire.
func (f *forward) timedOut() bool { return f.timedOutFlag.Load() }

// replayable implements wire: the replay body has all it read.
func (f *forward) replayable() bool { return f.body == nil || f.body.replayable() }

// badBody implements wire.
func (f *forward) badBody() bool { return f.body != nil && f.body.malformed() }

// answer implements wire. An answer given before the request body was all
// read says Connection: close and the connection closes lingering
// (endEarly); a gRPC answer is trailers-only.
func (f *forward) answer(a *localAnswer) {
	h := f.w.Header()
	h.Set(ReasonHeader, string(a.reason))
	if a.rule != "" {
		h.Set(RuleHeader, a.rule)
	}
	h.Set("Content-Type", a.contentType)
	if a.grpcStatus != "" {
		h.Set("Grpc-Status", a.grpcStatus)
		h.Set("Grpc-Message", a.grpcMessage)
	}
	if a.via != "" {
		h.Add("Via", "1.1 "+a.via)
	}
	if a.grpcStatus != "" {
		f.w.WriteHeader(a.status)
		return
	}
	f.closeIfBodyLeft(h)
	f.w.WriteHeader(a.status)
	_, _ = f.w.Write(a.appendBody(make([]byte, 0, a.bodyLen())))
	if f.bodyLeft() {
		f.endEarly()
	}
}

// bodyLeft reports whether the request's body (HTTP/1.x) is not known to
// have been read to its end: an answer now is an early one, which ends
// the connection (closeIfBodyLeft, endEarly).
func (f *forward) bodyLeft() bool {
	return f.down && (f.body == nil || !f.body.complete())
}

// closeIfBodyLeft adds Connection: close to the answer's head h when the
// request body is left: the connection cannot carry another request
// (RFC 9112 §9.6; Envoy closes an HTTP/1 connection whose response ends
// before its request, and net/http's server does for a request with
// Expect: 100-continue). It does too for an HTTP/1.x request while the
// server sheds its connections (Options.Shedding). Called before
// WriteHeader.
func (f *forward) closeIfBodyLeft(h http.Header) {
	if f.bodyLeft() || f.h1 && f.s.closing() {
		h["Connection"] = closeValue
	}
}

var closeValue = []string{"close"}

// connectionSpecific reports whether an HTTP/2 request's header has a
// connection-specific field (RFC 9113 §8.2.2): Connection, Keep-Alive,
// Proxy-Connection, Transfer-Encoding, Upgrade, or TE with a value other
// than "trailers".
func connectionSpecific(h http.Header) bool {
	for _, k := range []string{"Connection", "Keep-Alive", "Proxy-Connection", "Transfer-Encoding", "Upgrade"} {
		if _, ok := h[k]; ok {
			return true
		}
	}
	for _, v := range h["Te"] {
		if !strings.EqualFold(strings.TrimSpace(v), "trailers") {
			return true
		}
	}
	return false
}

// endEarly ends an answer written while the request body was left unread:
// it flushes the answer, stops reading the body (a past read deadline: a
// read blocked on a client that paused returns, so an attempt's request
// writer ends and the upstream response's Close, which waits for it,
// returns), and has the connection close lingering after the response
// (serverConn.Close), so the client's kernel does not reset the
// connection over the answer while the client still sends.
func (f *forward) endEarly() {
	rc := http.NewResponseController(f.w)
	_ = rc.Flush()
	_ = rc.SetReadDeadline(aLongTimeAgo)
	if sc, ok := f.r.Context().Value(serverConnKey{}).(*serverConn); ok {
		sc.lingerOnClose()
	}
}

// prepare strips hop-by-hop headers, adds X-Forwarded-Proto, Via and the
// trace context, and wraps the body for replay.
func (f *forward) prepare() {
	r := f.r
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

// headerCount is the number of header fields of r as its client sent them
// (Host included; net/http keeps it apart from Header).
func headerCount(r *http.Request) int {
	n := 0
	for _, vs := range r.Header {
		n += len(vs)
	}
	if r.Host != "" {
		n++
	}
	return n
}
