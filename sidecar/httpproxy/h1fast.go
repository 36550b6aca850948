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
	"github.com/meshlet/meshlet/xds"
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
// flushed chunk by chunk. It is one of the engine's two wires
// (engine.go): admission, RBAC, x-forwarded-client-cert, retries, per-try
// and route timeouts, the retry budget, circuit breakers, outlier
// detection and the sidecar's own answers are the engine's, the same as
// on the net/http wire (forward.go); the connection loop is h1conn.go,
// the relay h1relay.go, the handoff to net/http h1handoff.go.
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
	*x = exchange{s: s, start: time.Now(), w: fc, t: t}
	x.setGRPC(bstr(h.contentType), bstr(h.grpcTimeout))
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

	if !x.admit(hc, rt, c, nil, fc.peer.SPIFFEID, method, bstr(h.path), bstr(h.host), h) {
		return fc.answered && keep, false
	}
	fc.heldRequest = c
	x.classify(method, true, h.idempotencyKey, h)

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
	return fc.forward(x, op, prefix, body) && keep, false
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

// xfccValue returns Server.xfccValue for chain hc and the connection's
// peer, cached for the connection's life while the chain stays; nil when
// none is set.
func (fc *fastConn) xfccValue(hc *config.HTTPConnectionManager) []byte {
	if fc.xfccFor != hc {
		fc.xfcc, fc.xfccFor = nil, hc
		if v := fc.s.xfccValue(hc, fc.peer.SPIFFEID, fc.peer.Hash); v != "" {
			fc.xfcc = []byte(v)
		}
	}
	return fc.xfcc
}

// answer implements wire: the answer as one write, after the exchange is
// settled (recorded, its request slot released). It says Connection:
// close when the client did or the server drains; a HEAD gets no body.
func (fc *fastConn) answer(a *localAnswer) {
	op := outPool.Get().(*[]byte)
	defer outPool.Put(op)
	out := appendStatusLine((*op)[:0], a.status)
	out = appendField(out, ReasonHeader, string(a.reason))
	out = appendField(out, RuleHeader, a.rule)
	out = appendField(out, "Content-Type", a.contentType)
	out = appendField(out, "Grpc-Status", a.grpcStatus)
	out = appendField(out, "Grpc-Message", a.grpcMessage)
	out = append(out, "Date: "...)
	out = time.Now().UTC().AppendFormat(out, http.TimeFormat)
	out = append(out, "\r\n"...)
	if a.via != "" {
		out = append(out, "Via: 1.1 "...)
		out = append(out, a.via...)
		out = append(out, "\r\n"...)
	}
	out = append(out, "Content-Length: "...)
	out = strconv.AppendInt(out, int64(a.bodyLen()), 10)
	out = append(out, "\r\n"...)
	if fc.head.closeConn || fc.s.closing() {
		out = append(out, "Connection: close\r\n"...)
	}
	out = append(out, "\r\n"...)
	if string(fc.head.method) != "HEAD" {
		out = a.appendBody(out)
	}
	*op = out
	fc.settle()
	_, err := fc.rw.Write(out)
	fc.answered = err == nil
}

// appendField appends the field "name: value" to a head, nothing when
// value is "".
func appendField(b []byte, name, value string) []byte {
	if value == "" {
		return b
	}
	b = append(b, name...)
	b = append(b, ": "...)
	b = append(b, value...)
	return append(b, "\r\n"...)
}

func appendStatusLine(b []byte, code int) []byte {
	b = append(b, "HTTP/1.1 "...)
	b = strconv.AppendInt(b, int64(code), 10)
	b = append(b, ' ')
	return append(append(b, http.StatusText(code)...), "\r\n"...)
}

// forward has the engine send the request (head in (*op)[:prefix], body)
// on attempts until one gives the response to relay, or the request
// fails; it reports whether the downstream connection may carry another
// request.
func (fc *fastConn) forward(x *exchange, op *[]byte, prefix int, body []byte) bool {
	fc.op, fc.prefix, fc.body = op, prefix, body
	fc.req = fc.requestTail(op, prefix, fc.traceCtx, body)
	fc.resend = len(body) == 0 && x.idempotent
	fc.routeDeadline = time.Time{}
	ctx := context.Background()
	if x.rt.Timeout > 0 {
		fc.routeDeadline = x.start.Add(x.rt.Timeout)
		var cancel context.CancelFunc
		ctx, cancel = context.WithDeadline(ctx, fc.routeDeadline)
		defer cancel()
	}
	att := x.forward(ctx, fc.traceCtx)
	fc.op, fc.req, fc.body = nil, nil, nil
	if att == nil {
		return fc.answered && !fc.head.closeConn
	}
	return fc.relay(x, att)
}

// roundTrip implements wire: the request (its trace context anew for an
// attempt span) on a pooled connection to ep, the response head read
// into fc.resp.
func (fc *fastConn) roundTrip(ctx, actx context.Context, ep *cluster.Endpoint, perTry time.Duration) (upstreamHead, error) {
	if actx != nil {
		fc.req = fc.requestTail(fc.op, fc.prefix, actx, fc.body)
	}
	uc, err := fc.attempt(ctx, ep, fc.req, perTry, fc.routeDeadline, fc.resend)
	if err != nil {
		return upstreamHead{}, err
	}
	fc.uc = uc
	rh := &fc.resp
	return upstreamHead{code: rh.code, grpcStatus: bstr(rh.grpcStatus), reason: xds.FailureReason(bstr(rh.reason))}, nil
}

// discard implements wire: the connection of the response is not reused.
func (fc *fastConn) discard() {
	fc.uc.Release(false)
	fc.uc = cluster.H1Conn{}
	fc.setUp(nil)
}

// gone implements wire: the watcher saw the client leave, or Shutdown
// gave up on the exchange.
func (fc *fastConn) gone() bool { return fc.isCancelled() }

// timedOut implements wire.
func (fc *fastConn) timedOut() bool {
	return !fc.routeDeadline.IsZero() && !time.Now().Before(fc.routeDeadline)
}

// replayable implements wire: bodies are read whole before forwarding.
func (fc *fastConn) replayable() bool { return true }

// badBody implements wire: the fast path takes Content-Length bodies only
// (chunked requests go to net/http), which can be cut short, not
// malformed.
func (fc *fastConn) badBody() bool { return false }

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
