// Package httpproxy is the sidecar's HTTP filter chain: an HTTP connection
// manager (HTTP/1.1 and h2c downstream) that routes each request by its
// route configuration to a cluster, picks an endpoint, and forwards the
// request over the endpoint's pooled connections, streaming bodies and
// trailers both ways.
package httpproxy

import (
	"context"
	"crypto/tls"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/meshlet/meshlet/sidecar/cluster"
	"github.com/meshlet/meshlet/sidecar/config"
	"github.com/meshlet/meshlet/sidecar/listener"
	"github.com/meshlet/meshlet/sidecar/tlsid"
	"github.com/meshlet/meshlet/sidecar/tracing"
	"github.com/meshlet/meshlet/xds"
)

// ReasonHeader carries the typed reason (an xds.FailureReason) on
// responses the sidecar itself fails (x-meshlet-reason).
const ReasonHeader = xds.ReasonHeader

// Recorder receives one record per request, and the retries, for metrics.
// Implementations must be safe for concurrent use.
type Recorder interface {
	// Request records a finished request.
	Request(RequestRecord)
	// Retry records a retry sent, by cause (a retry_on condition).
	Retry(cluster, cause string)
	// RetryDenied records a retry that was due but not sent, and why
	// ("retry_budget_exhausted", "max_retries", "non_idempotent",
	// "body_too_large").
	RetryDenied(cluster, reason string)
	// AuthzDenied records a request refused by authorization and the rule
	// that refused it.
	AuthzDenied(listener, rule string)
	// Connections adds delta (+1 opened, -1 closed) to the listener's
	// active downstream connections.
	Connections(listener string, delta int)
}

// RequestRecord is one finished request.
type RequestRecord struct {
	// Listener is the listener's name; Cluster and Route name the upstream
	// cluster and the route that matched ("" when none did).
	Listener, Cluster, Route string
	// Code is the response status code, 0 when the downstream left first.
	Code int
	// Reason is the typed reason when the sidecar failed the request (the
	// xds.FailureReason it answered in ReasonHeader, the metric label
	// "reason"), else "".
	Reason xds.FailureReason
	// Duration runs from the request headers to the end of the response.
	Duration time.Duration
}

type nopRecorder struct{}

func (nopRecorder) Request(RequestRecord)      {}
func (nopRecorder) Retry(string, string)       {}
func (nopRecorder) RetryDenied(string, string) {}
func (nopRecorder) AuthzDenied(string, string) {}
func (nopRecorder) Connections(string, int)    {}

// Options are the optional parts of a Server.
type Options struct {
	// Recorder receives metrics; nil records nothing.
	Recorder Recorder
	// Secure selects the listener's mTLS chain ("tls" or the only chain);
	// otherwise its plaintext chain.
	Secure bool
	// LocalID returns this sidecar's SPIFFE ID, the By of
	// x-forwarded-client-cert; nil when unknown.
	LocalID func() string
	// Tracing returns the tracing of a connection manager's config; nil
	// (or a nil result) traces nothing.
	Tracing func(*config.Tracing) *tracing.HTTP
	// NetHTTPOnly serves every connection with net/http's server, without
	// the HTTP/1.1 fast path (h1fast.go). Default false: HTTP/1.1
	// connections start on the fast path.
	NetHTTPOnly bool
	// Shedding, when non-nil and true, makes every HTTP/1.x response say
	// Connection: close and end its connection, as Envoy's connection
	// managers do while draining: keep-alive callers come back on new
	// connections, which their load balancer sends elsewhere once this
	// sidecar left their endpoints. The sidecar sets it at shutdown
	// (Sidecar.Run), before it stops accepting. HTTP/2 connections are
	// not shed (they end at the listener's drain).
	Shedding *atomic.Bool
}

// RuleHeader names the rule behind an authorization denial
// (x-meshlet-authz-rule), next to ReasonHeader "authz_denied".
const RuleHeader = "X-Meshlet-Authz-Rule"

// Server is the listener.Handler of one HTTP listener.
type Server struct {
	name     string
	codec    config.Codec
	clusters *cluster.Manager
	log      *slog.Logger
	rec      Recorder
	secure   bool
	localID  func() string
	tracers  func(*config.Tracing) *tracing.HTTP
	table    atomic.Pointer[routeTable]
	chain    atomic.Pointer[config.HTTPConnectionManager]
	tracer   atomic.Pointer[tracing.HTTP] // nil: not traced

	srv   *http.Server
	conns *connQueue
	done  chan struct{} // closed when srv.Serve returns
	// closeNow is set when Shutdown's context ends: connections close at
	// once, without lingering.
	closeNow atomic.Bool

	// fast is the HTTP/1.1 fast path; off when fastOff.
	fast    fastServer
	fastOff bool
	// shed is Options.Shedding (nil: never).
	shed *atomic.Bool

	// tunnels counts upgraded connections (WebSockets), which the HTTP
	// server no longer tracks; tunnelCtx ends them at shutdown.
	tunnels      sync.WaitGroup
	tunnelCtx    context.Context
	tunnelCancel context.CancelFunc
}

var _ listener.Handler = (*Server)(nil)

// NewServer returns the handler of the HTTP connection manager of one chain
// of listener l (see Options.Secure), resolving its RDS route
// configuration from snap.
func NewServer(l *config.Listener, snap *config.Snapshot, clusters *cluster.Manager, log *slog.Logger, o Options) *Server {
	if o.Recorder == nil {
		o.Recorder = nopRecorder{}
	}
	hc := l.Chain(o.Secure).HTTP
	s := &Server{name: l.Name, codec: hc.Codec, clusters: clusters, log: log, rec: o.Recorder, secure: o.Secure, localID: o.LocalID, tracers: o.Tracing, done: make(chan struct{}),
		fastOff: o.NetHTTPOnly || hc.Codec == config.CodecHTTP2, shed: o.Shedding}
	s.table.Store(tableFor(hc, snap))
	s.chain.Store(hc)
	s.tracer.Store(s.tracerFor(hc))
	s.tunnelCtx, s.tunnelCancel = context.WithCancel(context.Background())
	s.conns = newConnQueue()
	s.srv = &http.Server{
		Handler: s,
		// The request limits of the connection manager, as the fast path
		// applies them (h1conn.go): net/http reads MaxHeaderBytes plus
		// 4 KiB of slack before its 431 (HTTP/2: the header list size it
		// advertises), so the slack is taken off. The header count is
		// checked per request (forward.go).
		MaxHeaderBytes:    max(hc.HeadersBytesLimit()-4096, 1),
		ReadHeaderTimeout: hc.RequestHeadersTimeout,
		IdleTimeout:       DownstreamIdleTimeout,
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelDebug),
		ConnState: func(_ net.Conn, st http.ConnState) {
			switch st {
			case http.StateNew:
				o.Recorder.Connections(l.Name, 1)
			case http.StateClosed, http.StateHijacked:
				o.Recorder.Connections(l.Name, -1)
			}
		},
		// The peer's identity is read once per connection (a *tls.Conn, or
		// one the fast path handed over); handlers reach an HTTP/1.1
		// connection's serverConn to close it lingering.
		ConnContext: func(ctx context.Context, c net.Conn) context.Context {
			if tc, ok := c.(interface{ ConnectionState() tls.ConnectionState }); ok {
				ctx = context.WithValue(ctx, peerKey{}, tlsid.PeerOf(tc.ConnectionState()))
			}
			if sc, ok := c.(interface{ base() *serverConn }); ok {
				ctx = context.WithValue(ctx, serverConnKey{}, sc.base())
			}
			return ctx
		},
	}
	s.srv.Protocols = new(http.Protocols)
	switch hc.Codec {
	case config.CodecHTTP1:
		s.srv.Protocols.SetHTTP1(true)
	case config.CodecHTTP2:
		s.srv.Protocols.SetUnencryptedHTTP2(true)
		s.srv.Protocols.SetHTTP2(true)
	default:
		s.srv.Protocols.SetHTTP1(true)
		s.srv.Protocols.SetUnencryptedHTTP2(true)
		s.srv.Protocols.SetHTTP2(true)
	}
	go func() {
		defer close(s.done)
		_ = s.srv.Serve(s.conns)
	}()
	s.fast.init()
	if s.fastOff {
		close(s.fast.done)
	} else {
		go s.monitor()
	}
	return s
}

type peerKey struct{}

func tableFor(hc *config.HTTPConnectionManager, snap *config.Snapshot) *routeTable {
	rc := hc.RouteConfig
	if rc == nil {
		rc = snap.Routes[hc.RouteConfigName]
	}
	return newRouteTable(rc, hc.Via)
}

// Handle serves conn: on the HTTP/1.1 fast path, or on net/http's server
// for HTTP/2 (an h2 ALPN, an http2 codec) and when the fast path is off
// (wrapped as a serverConn, which closes lingering after an early answer,
// unless it is TLS with h2, which net/http must see as a *tls.Conn).
func (s *Server) Handle(conn net.Conn) {
	if tc, ok := conn.(*tls.Conn); ok && tc.ConnectionState().NegotiatedProtocol == "h2" {
		s.conns.push(conn)
		return
	}
	if s.fastOff {
		s.conns.push(s.serverConn(conn, nil))
		return
	}
	s.handleFast(conn)
}

// Update swaps the route table and authorization in place; a codec change
// needs a new Server.
func (s *Server) Update(l *config.Listener, snap *config.Snapshot) bool {
	c := l.Chain(s.secure)
	if c == nil || c.HTTP == nil || c.HTTP.Codec != s.codec || !sameServerLimits(c.HTTP, s.chain.Load()) {
		return false
	}
	s.table.Store(tableFor(c.HTTP, snap))
	s.chain.Store(c.HTTP)
	s.tracer.Store(s.tracerFor(c.HTTP))
	return true
}

// sameServerLimits reports whether a and b set net/http's server the same
// way (its MaxHeaderBytes and ReadHeaderTimeout are fixed once it serves).
func sameServerLimits(a, b *config.HTTPConnectionManager) bool {
	return a.HeadersBytesLimit() == b.HeadersBytesLimit() && a.RequestHeadersTimeout == b.RequestHeadersTimeout
}

func (s *Server) tracerFor(hc *config.HTTPConnectionManager) *tracing.HTTP {
	if s.tracers == nil || hc.Tracing == nil {
		return nil
	}
	return s.tracers(hc.Tracing)
}

// closing reports whether responses end their HTTP/1.x connection: the
// server drains (Shutdown) or sheds (Options.Shedding).
func (s *Server) closing() bool {
	return s.fast.draining.Load() || s.shed != nil && s.shed.Load()
}

// Shutdown stops accepting, closes idle connections, and waits for requests
// in flight and upgraded tunnels until ctx is done, then closes everything.
func (s *Server) Shutdown(ctx context.Context) {
	fastDone := make(chan struct{})
	go func() {
		defer close(fastDone)
		s.shutdownFast(ctx)
	}()
	// Connections handed over during the fast path's drain still reach
	// srv until the fast path is done.
	<-fastDone
	if err := s.srv.Shutdown(ctx); err != nil {
		s.closeNow.Store(true) // no lingering: Close closes at once
		s.srv.Close()
	}
	<-s.done
	tunnelsDone := make(chan struct{})
	go func() {
		s.tunnels.Wait()
		close(tunnelsDone)
	}()
	select {
	case <-tunnelsDone:
	case <-ctx.Done():
	}
	s.tunnelCancel()
	<-tunnelsDone
}

func protoVersion(major, minor int) string {
	switch {
	case major == 1 && minor == 1:
		return "1.1"
	case major == 2:
		return "2"
	case major == 1 && minor == 0:
		return "1.0"
	}
	return strconv.Itoa(major) + "." + strconv.Itoa(minor)
}

// streaming reports whether each chunk of the response should be flushed
// as it arrives: server-sent events, gRPC, and bodies of unknown length.
func streaming(resp *http.Response) bool {
	if resp.ContentLength == -1 {
		return true
	}
	ct := resp.Header.Get("Content-Type")
	return strings.HasPrefix(ct, "text/event-stream") || strings.HasPrefix(ct, "application/grpc")
}

var bufPool = sync.Pool{New: func() any { b := make([]byte, 32<<10); return &b }}

// errDownstreamWrite marks a failed write to the downstream.
var errDownstreamWrite = errors.New("httpproxy: writing to the downstream failed")

// copyBody streams body to w, flushing after each read when flush is set.
// It returns the first read error (io.EOF is success) or errDownstreamWrite.
func copyBody(w http.ResponseWriter, body io.Reader, flush bool) error {
	bp := bufPool.Get().(*[]byte)
	defer bufPool.Put(bp)
	buf := *bp
	rc := http.NewResponseController(w)
	for {
		n, rerr := body.Read(buf)
		if n > 0 {
			if _, werr := w.Write(buf[:n]); werr != nil {
				return errDownstreamWrite
			}
			if flush {
				if err := rc.Flush(); err != nil {
					return errDownstreamWrite
				}
			}
		}
		if rerr == io.EOF {
			return nil
		}
		if rerr != nil {
			return rerr
		}
	}
}
