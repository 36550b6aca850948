package cluster

import (
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/sony/gobreaker/v2"

	"github.com/meshlet/meshlet/xds"
)

// Endpoint is one upstream host of a cluster: its connection pools, its
// requests in flight, and its health as seen by outlier detection and the
// endpoint breaker.
type Endpoint struct {
	// Address is "host:port".
	Address string

	cluster *Cluster
	weight  atomic.Uint32
	retired atomic.Bool
	active  atomic.Int64 // attempts in flight (least request)
	outlier outlierState
	breaker *endpointBreaker // nil when the cluster has no endpoint breaker

	h1     *h1Pool // HTTP/1.1 pool
	h2     atomic.Pointer[http.Transport]
	h2Once sync.Once
}

func newEndpoint(c *Cluster, addr string) *Endpoint {
	e := &Endpoint{Address: addr, cluster: c}
	e.h1 = &h1Pool{e: e}
	if b := c.cfg.EndpointBreaker; b != nil {
		e.breaker = newEndpointBreaker(c, addr, b)
	}
	return e
}

// Weight returns the endpoint's load-balancing weight.
func (e *Endpoint) Weight() uint32 { return e.weight.Load() }

// Retired reports whether the endpoint left its cluster.
func (e *Endpoint) Retired() bool { return e.retired.Load() }

// Active returns the attempts in flight on the endpoint.
func (e *Endpoint) Active() int64 { return e.active.Load() }

// Ejected reports whether outlier detection has the endpoint out of
// rotation now.
func (e *Endpoint) Ejected() bool {
	u := e.outlier.ejectedUntil.Load()
	return u != 0 && time.Now().UnixNano() < u
}

// BreakerState returns "closed", "open", "half-open", or "" without an
// endpoint breaker.
func (e *Endpoint) BreakerState() string {
	if e.breaker == nil {
		return ""
	}
	return e.breaker.cb.State().String()
}

// lessLoaded compares requests in flight relative to weight.
func (e *Endpoint) lessLoaded(o *Endpoint) bool {
	return e.active.Load()*int64(max(o.Weight(), 1)) < o.active.Load()*int64(max(e.Weight(), 1))
}

func (e *Endpoint) retire() {
	e.retired.Store(true)
	e.h1.closeIdle()
	if t := e.h2.Load(); t != nil {
		t.CloseIdleConnections()
	}
}

// Attempt is one try of a request on an endpoint: Begin takes its place in
// the endpoint breaker and the in-flight count; End reports the outcome to
// outlier detection and the breaker.
type Attempt struct {
	e    *Endpoint
	done func(error)
}

var (
	errAttemptFailed    = errors.New("attempt failed")
	errAttemptCancelled = errors.New("attempt cancelled by the client")
)

// Begin starts an attempt on e, or returns false when e's breaker refuses it
// (open, or half-open with its probes taken).
func (e *Endpoint) Begin() (*Attempt, bool) {
	a := &Attempt{e: e}
	if e.breaker != nil {
		done, err := e.breaker.cb.Allow()
		if err != nil {
			return nil, false
		}
		a.done = done
	}
	e.active.Add(1)
	return a, true
}

// End finishes the attempt with its outcome.
func (a *Attempt) End(o Outcome) {
	e := a.e
	e.active.Add(-1)
	if a.done != nil {
		switch o {
		case OutcomeSuccess:
			a.done(nil)
		case OutcomeCancelled:
			a.done(errAttemptCancelled)
		default:
			a.done(errAttemptFailed)
		}
	}
	if od := e.cluster.outlier; od != nil {
		od.record(e, o, len(e.cluster.Endpoints()))
	}
	if e.retired.Load() {
		e.h1.closeIdle()
		if t := e.h2.Load(); t != nil {
			t.CloseIdleConnections()
		}
	}
}

// endpointBreaker wraps a gobreaker two-step breaker with a lock-free view of
// when it is open, so load balancing skips open endpoints without taking the
// breaker's mutex.
type endpointBreaker struct {
	cb *gobreaker.TwoStepCircuitBreaker[struct{}]
	// openUntil is the UnixNano time an open breaker turns half-open; 0
	// when closed or half-open.
	openUntil atomic.Int64
}

func newEndpointBreaker(c *Cluster, addr string, cfg *xds.EndpointBreaker) *endpointBreaker {
	b := &endpointBreaker{}
	open := time.Duration(cfg.OpenInterval)
	st := gobreaker.Settings{
		Name:        c.cfg.Name + "/" + addr,
		MaxRequests: max(cfg.HalfOpenRequests, 1),
		Interval:    time.Duration(cfg.Interval),
		Timeout:     open,
		ReadyToTrip: func(n gobreaker.Counts) bool {
			if cfg.ConsecutiveFailures > 0 && n.ConsecutiveFailures >= cfg.ConsecutiveFailures {
				return true
			}
			return cfg.FailureRatio > 0 && n.Requests >= max(cfg.MinRequests, 1) &&
				float64(n.TotalFailures) >= cfg.FailureRatio*float64(n.Requests)
		},
		IsExcluded: func(err error) bool { return errors.Is(err, errAttemptCancelled) },
		OnStateChange: func(_ string, from, to gobreaker.State) {
			if to == gobreaker.StateOpen {
				b.openUntil.Store(time.Now().Add(open).UnixNano())
			} else {
				b.openUntil.Store(0)
			}
			c.log.Warn("endpoint breaker: state change", "cluster", c.cfg.Name, "endpoint", addr, "from", from.String(), "to", to.String())
			c.events.BreakerState(c.cfg.Name, addr, to.String())
		},
	}
	b.cb = gobreaker.NewTwoStepCircuitBreaker[struct{}](st)
	return b
}

// available reports whether the breaker may let a request through at now
// (closed, half-open, or open with its open interval over).
func (b *endpointBreaker) available(now int64) bool {
	u := b.openUntil.Load()
	return u == 0 || now >= u
}

// DefaultTLSHandshakeTimeout bounds an upstream TLS handshake when the
// context has no earlier deadline.
const DefaultTLSHandshakeTimeout = 10 * time.Second

// Dial opens a connection to the endpoint within the cluster's connect
// timeout and max_connections, with the cluster's mTLS when it has one. The
// connection releases its slot when closed; for plaintext, Unwrap gives the
// *net.TCPConn for zero-copy splicing.
func (e *Endpoint) Dial(ctx context.Context) (net.Conn, error) {
	c := e.cluster
	if !c.acquireConn() {
		return nil, &UpstreamError{Kind: KindOverflow, Err: errMaxConnections}
	}
	raw, err := c.dialer.DialContext(ctx, "tcp", e.Address)
	if err != nil {
		c.releaseConn()
		return nil, &UpstreamError{Kind: KindConnectFailure, Err: err}
	}
	return e.secure(ctx, &slotConn{Conn: raw, c: c})
}

// secure runs the cluster's TLS handshake over conn, or returns conn as is
// for a plaintext cluster. On failure conn is closed.
func (e *Endpoint) secure(ctx context.Context, conn net.Conn) (net.Conn, error) {
	c := e.cluster
	if c.tlsConfig == nil {
		return conn, nil
	}
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, DefaultTLSHandshakeTimeout)
		defer cancel()
	}
	tc := tls.Client(conn, c.tlsConfig)
	if err := tc.HandshakeContext(ctx); err != nil {
		conn.Close()
		c.events.TLSHandshake(c.cfg.Name, e.Address, err)
		c.log.Warn("tls: upstream handshake failed", "cluster", c.cfg.Name, "endpoint", e.Address, "reason", c.events.TLSReason(err), "error", err)
		return nil, &UpstreamError{Kind: KindTLSHandshake, Err: err}
	}
	c.events.TLSHandshake(c.cfg.Name, e.Address, nil)
	return tc, nil
}

// slotConn releases its cluster connection slot when closed.
type slotConn struct {
	net.Conn
	c    *Cluster
	once sync.Once
}

func (s *slotConn) Close() error {
	err := s.Conn.Close()
	s.once.Do(s.c.releaseConn)
	return err
}

// Unwrap returns the underlying connection.
func (s *slotConn) Unwrap() net.Conn { return s.Conn }

// transport2 returns the endpoint's HTTP/2 cleartext (prior knowledge)
// pool: a net/http Transport multiplexing streams on its connections.
func (e *Endpoint) transport2() *http.Transport {
	e.h2Once.Do(func() {
		dial := func(ctx context.Context, _, _ string) (net.Conn, error) { return e.Dial(ctx) }
		t := &http.Transport{IdleConnTimeout: DefaultIdleConnTimeout, DisableCompression: true}
		t.Protocols = new(http.Protocols)
		if e.cluster.tlsConfig != nil {
			t.DialTLSContext = dial // the request scheme is https; ALPN negotiated h2
			t.Protocols.SetHTTP2(true)
		} else {
			t.DialContext = dial
			t.Protocols.SetUnencryptedHTTP2(true)
		}
		e.h2.Store(t)
	})
	return e.h2.Load()
}

// RoundTrip sends req on the endpoint and returns the response, whose body
// the caller must close. headerTimeout, when positive, bounds the wait for
// the response headers (the per-try timeout): HTTP/1.1 uses a read deadline
// on the connection, HTTP/2 a context. Errors are *UpstreamError saying
// whether any byte may have reached the upstream; an expired headerTimeout
// is KindTimeout.
func (e *Endpoint) RoundTrip(ctx context.Context, req *http.Request, headerTimeout time.Duration) (*http.Response, error) {
	if e.cluster.cfg.Protocol == xds.ProtocolHTTP2 || e.cluster.cfg.Protocol == xds.ProtocolGRPC {
		return e.roundTrip2(ctx, req, headerTimeout)
	}
	return e.h1.roundTrip(ctx, req, headerTimeout)
}

func (e *Endpoint) roundTrip2(ctx context.Context, req *http.Request, headerTimeout time.Duration) (*http.Response, error) {
	if e.cluster.tlsConfig != nil {
		req.URL.Scheme = "https"
	}
	if headerTimeout <= 0 {
		resp, err := e.transport2().RoundTrip(req.WithContext(ctx))
		if err != nil {
			return nil, classifyH2(err)
		}
		return resp, nil
	}
	tryCtx, cancel := context.WithCancel(ctx)
	var fired atomic.Bool
	timer := time.AfterFunc(headerTimeout, func() { fired.Store(true); cancel() })
	resp, err := e.transport2().RoundTrip(req.WithContext(tryCtx))
	stopped := timer.Stop()
	if err != nil || !stopped {
		cancel()
		if resp != nil {
			resp.Body.Close()
		}
		if fired.Load() {
			return nil, &UpstreamError{Kind: KindTimeout, Sent: true, Err: context.DeadlineExceeded}
		}
		return nil, classifyH2(err)
	}
	resp.Body = &cancelBody{ReadCloser: resp.Body, cancel: cancel}
	return resp, nil
}

// cancelBody releases the attempt's context when the body is closed.
type cancelBody struct {
	io.ReadCloser
	cancel context.CancelFunc
}

func (b *cancelBody) Close() error {
	err := b.ReadCloser.Close()
	b.cancel()
	return err
}

// Endpoint returns the endpoint the attempt runs on.
func (a *Attempt) Endpoint() *Endpoint { return a.e }
