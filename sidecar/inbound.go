package sidecar

import (
	"context"
	"crypto/tls"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/meshlet/meshlet/sidecar/config"
	"github.com/meshlet/meshlet/sidecar/listener"
	"github.com/meshlet/meshlet/sidecar/rawsock"
	"github.com/meshlet/meshlet/sidecar/telemetry"
	"github.com/meshlet/meshlet/sidecar/tlsid"
)

// HandshakeTimeout bounds the wait for the first byte and the TLS
// handshake of an inbound connection.
const HandshakeTimeout = 10 * time.Second

// inbound is the listener.Handler of a listener: it tells TLS from
// plaintext by the first byte (as Envoy's tls_inspector does), runs the
// mTLS handshake off the accept loop, reports failures by reason, and hands
// the connection to the handler of the matching filter chain.
//
// With a plaintext chain (permissive mode), the wait for the first byte is
// bounded by the listener's listener_filters_timeout; a connection that has
// sent nothing by then — the plaintext client of a server-first protocol,
// waiting for the server's greeting — goes to the plaintext chain when
// continue_on_listener_filters_timeout is set, as with Envoy, and is closed
// otherwise. Without a plaintext chain (strict mode) nothing ever falls
// back: a silent client is closed after HandshakeTimeout.
type inbound struct {
	name    string
	log     *slog.Logger
	metrics *telemetry.Metrics
	store   *tlsid.Store
	shape   string // chain layout, to tell whether Update can apply in place

	secure    listener.Handler           // the mTLS chain's handler, nil without one
	plain     listener.Handler           // the plaintext chain's handler, nil without one
	tlsConfig atomic.Pointer[tls.Config] // of the mTLS chain
	ctx       context.Context            // ended by Shutdown: aborts handshakes
	stop      context.CancelFunc         //
	wg        sync.WaitGroup             // handshakes in progress

	// detect is the wait for the first byte in nanoseconds (at most
	// HandshakeTimeout) and fallback whether a connection silent that long
	// gets the plaintext chain; both follow Update.
	detect   atomic.Int64
	fallback atomic.Bool
}

var _ listener.OriginalDstHandler = (*inbound)(nil)

// chainShape describes which chains a listener has and whether they are TLS.
func chainShape(l *config.Listener) string {
	shape := ""
	for _, c := range l.Chains {
		kind := "tcp"
		if c.HTTP != nil {
			kind = "http"
		}
		if c.TLS != nil {
			kind += "+tls"
		}
		shape += c.TransportProtocol + ":" + kind + ";"
	}
	return shape
}

// newInbound builds the handler of l; chainHandler makes the handler of one
// chain (secure selects the mTLS one).
func (s *Sidecar) newInbound(l *config.Listener, snap *config.Snapshot, chainHandler func(secure bool) (listener.Handler, error)) (listener.Handler, error) {
	in := &inbound{name: l.Name, log: s.log, metrics: s.metrics, store: s.tls, shape: chainShape(l)}
	in.ctx, in.stop = context.WithCancel(context.Background())
	in.setDetect(l)
	if c := l.Chain(true); c != nil && c.TLS != nil {
		h, err := chainHandler(true)
		if err != nil {
			return nil, err
		}
		in.secure = h
		in.tlsConfig.Store(s.tls.ServerConfig(c.TLS))
	}
	if c := l.Chain(false); c != nil && c.TLS == nil {
		h, err := chainHandler(false)
		if err != nil {
			return nil, err
		}
		in.plain = h
	}
	return in, nil
}

// Handle implements listener.Handler.
func (in *inbound) Handle(conn net.Conn) {
	if in.secure == nil {
		in.plain.Handle(conn)
		return
	}
	in.wg.Add(1)
	go func() {
		defer in.wg.Done()
		in.accept(conn, netip.AddrPort{})
	}()
}

// HandleOriginalDst implements listener.OriginalDstHandler: Handle for a
// connection a capture listener took, whose chain handler gets dst.
func (in *inbound) HandleOriginalDst(conn net.Conn, dst netip.AddrPort) {
	if in.secure == nil {
		listener.HandleRedirected(in.plain, conn, dst)
		return
	}
	in.wg.Add(1)
	go func() {
		defer in.wg.Done()
		in.accept(conn, dst)
	}()
}

// setDetect sets the first-byte wait and fallback from l: tls_inspector's
// listener_filters_timeout (0 is no limit of its own) and
// continue_on_listener_filters_timeout, with a plaintext chain only.
func (in *inbound) setDetect(l *config.Listener) {
	wait := HandshakeTimeout
	if l.TLSInspector && l.FiltersTimeout > 0 {
		wait = min(wait, l.FiltersTimeout)
	}
	in.detect.Store(int64(wait))
	plain := l.Chain(false)
	in.fallback.Store(l.TLSInspector && l.FiltersTimeout > 0 && l.ContinueOnFiltersTimeout && plain != nil && plain.TLS == nil)
}

func (in *inbound) accept(conn net.Conn, dst netip.AddrPort) {
	remote := conn.RemoteAddr().String()
	start := time.Now()
	wait := time.Duration(in.detect.Load())
	_ = conn.SetDeadline(start.Add(wait))
	stop := context.AfterFunc(in.ctx, func() { conn.Close() })
	defer stop()
	var first [1]byte
	_, err := io.ReadFull(conn, first[:])
	if errors.Is(err, os.ErrDeadlineExceeded) && wait < HandshakeTimeout {
		// A deadline that passed before this goroutine got to read fails
		// the read even with a byte waiting: look once more.
		_ = conn.SetDeadline(time.Now().Add(time.Millisecond))
		_, err = io.ReadFull(conn, first[:])
	}
	if errors.Is(err, os.ErrDeadlineExceeded) && in.fallback.Load() && in.ctx.Err() == nil {
		// Nothing sent: a client waiting for the server to speak first.
		_ = conn.SetDeadline(time.Time{})
		in.log.Debug("tls: no first byte; plaintext chain", "listener", in.name, "remote", remote, "waited", time.Since(start))
		listener.HandleRedirected(in.plain, conn, dst)
		return
	}
	if err != nil {
		conn.Close()
		return // closed (or silent) before sending anything: not worth a log line
	}
	_ = conn.SetDeadline(start.Add(HandshakeTimeout))
	pc := &prefixConn{Conn: conn, prefix: first[:]}
	if first[0] != 0x16 { // not a TLS handshake record
		if in.plain != nil {
			_ = conn.SetDeadline(time.Time{})
			listener.HandleRedirected(in.plain, pc, dst)
			return
		}
		reason := tlsid.ReasonNotTLS
		if first[0] >= 'A' && first[0] <= 'Z' {
			reason = tlsid.ReasonPlaintext // an HTTP method, most likely
		}
		in.metrics.InboundHandshake(in.name, reason)
		in.log.Warn("tls: connection refused: plaintext on a strict mTLS listener", "listener", in.name, "remote", remote, "reason", reason)
		conn.Close()
		return
	}
	// TLS records go through raw system calls (rawsock); the plaintext
	// paths above keep the *net.TCPConn (the TCP proxy splices it).
	tc := tls.Server(&prefixConn{Conn: rawsock.Wrap(conn), prefix: first[:]}, in.tlsConfig.Load())
	if err := tc.HandshakeContext(in.ctx); err != nil {
		reason := tlsid.Reason(err)
		peer := ""
		if cs := tc.ConnectionState(); len(cs.PeerCertificates) > 0 {
			peer = tlsid.PeerOf(cs).SPIFFEID
		}
		in.metrics.InboundHandshake(in.name, reason)
		in.log.Warn("tls: handshake failed", "listener", in.name, "remote", remote, "peer", peer, "reason", reason, "error", err)
		conn.Close()
		return
	}
	_ = conn.SetDeadline(time.Time{})
	in.metrics.InboundHandshake(in.name, "")
	listener.HandleRedirected(in.secure, tc, dst)
}

// Update implements listener.Handler: same chain layout, new chain configs.
func (in *inbound) Update(l *config.Listener, snap *config.Snapshot) bool {
	if l.OriginalDst || chainShape(l) != in.shape {
		return false
	}
	if in.secure != nil && !in.secure.Update(l, snap) {
		return false
	}
	if in.plain != nil && !in.plain.Update(l, snap) {
		return false
	}
	if c := l.Chain(true); c != nil && c.TLS != nil {
		in.tlsConfig.Store(in.store.ServerConfig(c.TLS))
	}
	in.setDetect(l)
	return true
}

// Shutdown implements listener.Handler.
func (in *inbound) Shutdown(ctx context.Context) {
	in.stop()
	in.wg.Wait()
	var wg sync.WaitGroup
	for _, h := range []listener.Handler{in.secure, in.plain} {
		if h != nil {
			wg.Add(1)
			go func() {
				defer wg.Done()
				h.Shutdown(ctx)
			}()
		}
	}
	wg.Wait()
}

// prefixConn replays bytes already read before reading from the connection.
type prefixConn struct {
	net.Conn
	prefix []byte
}

func (p *prefixConn) Read(b []byte) (int, error) {
	if len(p.prefix) > 0 {
		n := copy(b, p.prefix)
		p.prefix = p.prefix[n:]
		return n, nil
	}
	return p.Conn.Read(b)
}

// CloseWrite half-closes the connection when the underlying one can.
func (p *prefixConn) CloseWrite() error {
	if cw, ok := p.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return p.Conn.Close()
}
