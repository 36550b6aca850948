package httpproxy

import (
	"bufio"
	"context"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/meshlet/meshlet/sidecar/cluster"
	"github.com/meshlet/meshlet/sidecar/config"
	"github.com/meshlet/meshlet/xds"
)

// upgradeType returns the lower-case protocol of an HTTP/1.1 Upgrade
// request (RFC 9110 §7.8: Upgrade listed in Connection), "" otherwise.
func upgradeType(r *http.Request) string {
	if r.ProtoMajor != 1 {
		return ""
	}
	u := r.Header.Get("Upgrade")
	if u == "" || !headerHasToken(r.Header, "Connection", "upgrade") {
		return ""
	}
	if i := strings.IndexAny(u, "/, "); i >= 0 {
		u = u[:i] // "websocket", not "websocket/13"
	}
	return strings.ToLower(u)
}

func headerHasToken(h http.Header, name, token string) bool {
	for _, v := range h[name] {
		if hasToken(v, token) {
			return true
		}
	}
	return false
}

// tunnelBufSize is each direction's copy buffer: small, as tunnels
// (WebSockets) are many, long-lived and mostly idle.
const tunnelBufSize = 4 << 10

var tunnelBufPool = sync.Pool{New: func() any { b := make([]byte, tunnelBufSize); return &b }}

// tunnel completes an upgrade the upstream accepted (101): it takes over
// the downstream connection, relays the 101 head, and copies bytes both
// ways until both sides are done, the route's idle timeout passes with no
// byte either way, ctx ends (max stream duration, downstream gone) or the
// server shuts down. Half-closes are passed on. The tunnel counts as one
// request, code 101, lasting as long as the tunnel.
func (s *Server) tunnel(w http.ResponseWriter, resp *http.Response, x *exchange, rt *config.Route, via string, ctx context.Context) {
	up, ok := resp.Body.(io.ReadWriteCloser)
	if !ok {
		resp.Body.Close()
		s.log.Warn("httpproxy: 101 response without an upgraded connection", "listener", s.name, "cluster", x.cluster)
		x.code, x.reason = http.StatusBadGateway, xds.ReasonUpstreamReset
		http.Error(w, string(xds.ReasonUpstreamReset), http.StatusBadGateway)
		return
	}
	defer up.Close()
	down, brw, err := http.NewResponseController(w).Hijack()
	if err != nil {
		// Only HTTP/1.1 downstreams carry upgrades; anything else is a bug.
		s.log.Warn("httpproxy: cannot take over the downstream connection for an upgrade", "listener", s.name, "error", err)
		x.code, x.reason = http.StatusBadGateway, xds.ReasonUpstreamReset
		return
	}
	defer down.Close()
	s.tunnels.Add(1)
	defer s.tunnels.Done()
	x.code = http.StatusSwitchingProtocols

	h := resp.Header.Clone()
	upgrade := h.Get("Upgrade")
	removeHopByHop(h, false)
	h.Set("Connection", "Upgrade")
	if upgrade != "" {
		h.Set("Upgrade", upgrade)
	}
	if via != "" {
		h.Add("Via", "1.1 "+via)
	}
	_, _ = brw.WriteString("HTTP/1.1 101 Switching Protocols\r\n")
	_ = h.Write(brw)
	_, _ = brw.WriteString("\r\n")
	if err := brw.Flush(); err != nil {
		return
	}

	var once sync.Once
	closeBoth := func() {
		once.Do(func() {
			up.Close()
			down.Close()
		})
	}
	stopCtx := context.AfterFunc(ctx, closeBoth)
	defer stopCtx()
	stopShutdown := context.AfterFunc(s.tunnelCtx, closeBoth)
	defer stopShutdown()
	var idle *time.Timer
	if rt.IdleTimeout > 0 {
		idle = time.AfterFunc(rt.IdleTimeout, closeBoth)
		defer idle.Stop()
	}
	active := func() {
		if idle != nil {
			idle.Reset(rt.IdleTimeout)
		}
	}
	relay := func(dst io.Writer, src io.Reader) {
		err := copyActive(dst, src, active)
		if err == nil {
			if cw, ok := dst.(interface{ CloseWrite() error }); ok && cw.CloseWrite() == nil {
				return // EOF passed on; the other direction goes on
			}
		}
		closeBoth()
	}
	// Downstream → upstream on a new goroutine (the bytes the server
	// buffered first), upstream → downstream on this one: two goroutines
	// per tunnel, and no buffer held while a plain socket is idle.
	downR := &drainingReader{br: brw.Reader, conn: down}
	brw = nil
	done := make(chan struct{})
	go func() {
		defer close(done)
		relay(up, downR)
	}()
	relay(down, up)
	<-done
	closeBoth()
}

// readWaiter is a source that can wait until it has bytes to read without
// holding a buffer (a plain socket with nothing buffered above it); it
// returns at once when it cannot tell.
type readWaiter interface {
	WaitReadable() error
}

// drainingReader reads the downstream connection through the bytes its
// HTTP server buffered, then from the connection itself.
type drainingReader struct {
	br   *bufio.Reader
	conn net.Conn
}

func (d *drainingReader) Read(p []byte) (int, error) {
	if d.br != nil {
		if d.br.Buffered() > 0 {
			return d.br.Read(p)
		}
		d.br = nil
	}
	return d.conn.Read(p)
}

// WaitReadable implements readWaiter.
func (d *drainingReader) WaitReadable() error {
	if d.br != nil {
		if d.br.Buffered() > 0 {
			return nil
		}
		d.br = nil // drained: an idle tunnel keeps no buffer
	}
	return cluster.WaitReadable(d.conn)
}

// copyActive copies src to dst until EOF (nil) or an error, calling
// active after each chunk. A buffer is taken from the pool only once src
// has bytes, when src can tell (readWaiter).
func copyActive(dst io.Writer, src io.Reader, active func()) error {
	w, _ := src.(readWaiter)
	for {
		if w != nil {
			if err := w.WaitReadable(); err != nil {
				return err
			}
		}
		bp := tunnelBufPool.Get().(*[]byte)
		n, rerr := src.Read(*bp)
		var werr error
		if n > 0 {
			active()
			_, werr = dst.Write((*bp)[:n])
		}
		tunnelBufPool.Put(bp)
		switch {
		case werr != nil:
			return werr
		case rerr == io.EOF:
			return nil
		case rerr != nil:
			return rerr
		}
	}
}
