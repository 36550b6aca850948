// Package httpproxy is the sidecar's HTTP filter chain: an HTTP connection
// manager (HTTP/1.1 and h2c downstream) that routes each request by its
// route configuration to a cluster, picks an endpoint, and forwards the
// request over the endpoint's pooled connections, streaming bodies and
// trailers both ways.
package httpproxy

import (
	"context"
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
)

// ReasonHeader carries the typed reason on responses the sidecar itself
// fails (x-meshlet-reason).
const ReasonHeader = "X-Meshlet-Reason"

// Typed failure reasons set in ReasonHeader.
const (
	ReasonNoRoute           = "no_route"            // 404: no virtual host or route matched
	ReasonNoCluster         = "no_cluster"          // 503: the route's cluster is not configured
	ReasonNoHealthyUpstream = "no_healthy_upstream" // 503: the cluster has no endpoint
	ReasonConnectFailure    = "connect_failure"     // 503: connecting to the endpoint failed
	ReasonUpstreamReset     = "upstream_reset"      // 503: the upstream closed or reset before answering
	ReasonUpstreamTimeout   = "upstream_timeout"    // 504: the route timeout expired
)

// Server is the listener.Handler of one HTTP listener.
type Server struct {
	name     string
	codec    config.Codec
	clusters *cluster.Manager
	log      *slog.Logger
	table    atomic.Pointer[routeTable]

	srv   *http.Server
	conns *connQueue
	done  chan struct{} // closed when srv.Serve returns
}

var _ listener.Handler = (*Server)(nil)

// NewServer returns the handler for the HTTP listener l, resolving its RDS
// route configuration from snap.
func NewServer(l *config.Listener, snap *config.Snapshot, clusters *cluster.Manager, log *slog.Logger) *Server {
	s := &Server{name: l.Name, codec: l.HTTP.Codec, clusters: clusters, log: log, done: make(chan struct{})}
	s.table.Store(tableFor(l, snap))
	s.conns = newConnQueue()
	s.srv = &http.Server{
		Handler:           s,
		ReadHeaderTimeout: 30 * time.Second,
		IdleTimeout:       5 * time.Minute,
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelDebug),
	}
	s.srv.Protocols = new(http.Protocols)
	switch l.HTTP.Codec {
	case config.CodecHTTP1:
		s.srv.Protocols.SetHTTP1(true)
	case config.CodecHTTP2:
		s.srv.Protocols.SetUnencryptedHTTP2(true)
	default:
		s.srv.Protocols.SetHTTP1(true)
		s.srv.Protocols.SetUnencryptedHTTP2(true)
	}
	go func() {
		defer close(s.done)
		_ = s.srv.Serve(s.conns)
	}()
	return s
}

func tableFor(l *config.Listener, snap *config.Snapshot) *routeTable {
	rc := l.HTTP.RouteConfig
	if rc == nil {
		rc = snap.Routes[l.HTTP.RouteConfigName]
	}
	return newRouteTable(rc, l.HTTP.Via)
}

// Handle queues conn for the HTTP server.
func (s *Server) Handle(conn net.Conn) { s.conns.push(conn) }

// Update swaps the route table in place; a codec change needs a new Server.
func (s *Server) Update(l *config.Listener, snap *config.Snapshot) bool {
	if l.HTTP == nil || l.HTTP.Codec != s.codec {
		return false
	}
	s.table.Store(tableFor(l, snap))
	return true
}

// Shutdown stops accepting, closes idle connections, and waits for requests
// in flight until ctx is done, then closes everything.
func (s *Server) Shutdown(ctx context.Context) {
	if err := s.srv.Shutdown(ctx); err != nil {
		s.srv.Close()
	}
	<-s.done
}

// ServeHTTP routes and forwards one request.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	t := s.table.Load()
	rt := t.route(r.Host, r.URL.Path)
	if rt == nil {
		s.fail(w, t, http.StatusNotFound, ReasonNoRoute)
		return
	}
	c := s.clusters.Get(rt.Cluster)
	if c == nil {
		s.fail(w, t, http.StatusServiceUnavailable, ReasonNoCluster)
		return
	}
	ep := c.Pick()
	if ep == nil {
		s.fail(w, t, http.StatusServiceUnavailable, ReasonNoHealthyUpstream)
		return
	}
	ctx := r.Context()
	if rt.Timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, rt.Timeout)
		defer cancel()
	}
	defer ep.Release()

	out := r.Clone(ctx)
	out.RequestURI = ""
	out.URL.Scheme = "http"
	out.URL.Host = ep.Address
	out.Close = false
	if r.ContentLength == 0 {
		out.Body = nil // lets the transport retry an idempotent request on a stale pooled connection
	}
	removeHopByHop(out.Header, true)
	if t.via != "" {
		out.Header.Add("Via", protoVersion(r.ProtoMajor, r.ProtoMinor)+" "+t.via)
	}

	resp, err := ep.Transport().RoundTrip(out)
	if err != nil {
		if r.Context().Err() != nil {
			return // the downstream went away: nothing to answer, not an upstream failure
		}
		status, reason := classify(ctx, err)
		s.log.Debug("httpproxy: upstream request failed", "listener", s.name, "cluster", c.Name(), "endpoint", ep.Address, "reason", reason, "error", err)
		s.fail(w, t, status, reason)
		return
	}
	defer resp.Body.Close()

	h := w.Header()
	removeHopByHop(resp.Header, false)
	for k, vv := range resp.Header {
		h[k] = vv
	}
	if t.via != "" {
		h.Add("Via", protoVersion(resp.ProtoMajor, resp.ProtoMinor)+" "+t.via)
	}
	if len(resp.Trailer) > 0 {
		names := make([]string, 0, len(resp.Trailer))
		for k := range resp.Trailer {
			names = append(names, k)
		}
		h["Trailer"] = []string{strings.Join(names, ", ")}
	}
	w.WriteHeader(resp.StatusCode)

	if err := copyBody(w, resp, streaming(resp)); err != nil {
		if r.Context().Err() == nil {
			s.log.Debug("httpproxy: response body aborted", "listener", s.name, "cluster", c.Name(), "endpoint", ep.Address, "error", err)
		}
		panic(http.ErrAbortHandler) // reset the downstream stream: the response is incomplete
	}
	for k, vv := range resp.Trailer {
		h[http.TrailerPrefix+k] = vv
	}
}

// fail answers a request the sidecar could not forward, with the typed
// reason in ReasonHeader.
func (s *Server) fail(w http.ResponseWriter, t *routeTable, status int, reason string) {
	h := w.Header()
	h.Set(ReasonHeader, reason)
	h.Set("Content-Type", "text/plain; charset=utf-8")
	if t.via != "" {
		h.Add("Via", "1.1 "+t.via)
	}
	w.WriteHeader(status)
	io.WriteString(w, reason+"\n")
}

// classify maps a round-trip error to a status code and typed reason.
func classify(ctx context.Context, err error) (int, string) {
	if errors.Is(ctx.Err(), context.DeadlineExceeded) {
		return http.StatusGatewayTimeout, ReasonUpstreamTimeout
	}
	var op *net.OpError
	if errors.As(err, &op) && op.Op == "dial" {
		return http.StatusServiceUnavailable, ReasonConnectFailure
	}
	return http.StatusServiceUnavailable, ReasonUpstreamReset
}

// hopByHop are the connection-specific fields of RFC 9110 §7.6.1 plus the
// legacy ones proxies drop (Keep-Alive, Proxy-Connection).
var hopByHop = []string{"Connection", "Proxy-Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "Te", "Trailer", "Transfer-Encoding", "Upgrade"}

// removeHopByHop deletes hop-by-hop fields and those Connection names. On
// requests, "TE: trailers" is kept (gRPC needs it end to end).
func removeHopByHop(h http.Header, request bool) {
	for _, c := range h["Connection"] {
		for f := range strings.SplitSeq(c, ",") {
			if f = strings.TrimSpace(f); f != "" {
				h.Del(f)
			}
		}
	}
	trailers := false
	if request {
		for _, v := range h["Te"] {
			for f := range strings.SplitSeq(v, ",") {
				if strings.EqualFold(strings.TrimSpace(f), "trailers") {
					trailers = true
				}
			}
		}
	}
	for _, k := range hopByHop {
		delete(h, k)
	}
	if trailers {
		h["Te"] = []string{"trailers"}
	}
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

// copyBody streams resp.Body to w, flushing after each read when flush is
// set. It returns the first read or write error (io.EOF is success).
func copyBody(w http.ResponseWriter, resp *http.Response, flush bool) error {
	bp := bufPool.Get().(*[]byte)
	defer bufPool.Put(bp)
	buf := *bp
	rc := http.NewResponseController(w)
	for {
		n, rerr := resp.Body.Read(buf)
		if n > 0 {
			if _, werr := w.Write(buf[:n]); werr != nil {
				return werr
			}
			if flush {
				if err := rc.Flush(); err != nil {
					return err
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
