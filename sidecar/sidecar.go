// Package sidecar wires meshlet's per-service proxy: the xDS state
// (package xdsstate: ADS stream, accepted resources, warming, persistence)
// hands each config snapshot it activates to the cluster and listener
// managers (apply.go), whose listeners run the HTTP, TCP and UDP proxies;
// the admin endpoints show it all (adminviews.go). The sidecar knows
// only xDS; it keeps serving its last accepted config while the control
// plane is away.
package sidecar

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"

	"github.com/meshlet/meshlet/sidecar/admin"
	"github.com/meshlet/meshlet/sidecar/apphealth"
	"github.com/meshlet/meshlet/sidecar/cluster"
	"github.com/meshlet/meshlet/sidecar/config"
	"github.com/meshlet/meshlet/sidecar/httpproxy"
	"github.com/meshlet/meshlet/sidecar/listener"
	"github.com/meshlet/meshlet/sidecar/memtrim"
	"github.com/meshlet/meshlet/sidecar/tcpproxy"
	"github.com/meshlet/meshlet/sidecar/telemetry"
	"github.com/meshlet/meshlet/sidecar/tlsid"
	"github.com/meshlet/meshlet/sidecar/tracing"
	"github.com/meshlet/meshlet/sidecar/udpproxy"
	"github.com/meshlet/meshlet/sidecar/xdsclient"
	"github.com/meshlet/meshlet/sidecar/xdsstate"
	"github.com/meshlet/meshlet/xds"
)

// Defaults for Config.
const (
	DefaultXDSAddress   = "127.0.0.1:18000"
	DefaultAdminAddress = "127.0.0.1:19000"
	// DefaultWarmTimeout is how long a new config waits for the route
	// configurations and load assignments it references before it is
	// activated anyway (Envoy's initial_fetch_timeout default).
	DefaultWarmTimeout = xdsstate.DefaultWarmTimeout
)

// Version is reported to the control plane as the node's user agent
// version.
const Version = "0.1.0"

// Config configures a Sidecar.
type Config struct {
	// NodeID is the xDS node ID: the proxy's service ID in Consul. Required.
	NodeID string
	// Service is the service the sidecar fronts, sent as the node's cluster
	// (informational).
	Service string
	// XDSAddress is the control plane's ADS address, host:port, or several
	// replicas' separated by commas (see xdsclient.Config.Server);
	// DefaultXDSAddress when empty.
	XDSAddress string
	// XDSCredentials verify the control plane (TLS against a CA bundle)
	// and prove the sidecar's identity (a bearer token file), or are
	// Insecure (plaintext, no token; development only). Required.
	XDSCredentials xdsclient.Credentials
	// AdminAddress is where the admin endpoints listen; DefaultAdminAddress
	// when empty. Port 0 picks a free port (see AdminAddr).
	AdminAddress string
	// DrainTimeout bounds draining of removed listeners and of all listeners
	// at shutdown; listener.DefaultDrainTimeout when 0.
	DrainTimeout time.Duration
	// WarmTimeout is DefaultWarmTimeout when 0.
	WarmTimeout time.Duration
	// Logger defaults to slog.Default().
	Logger *slog.Logger
	// XDSMinBackoff and XDSMaxBackoff bound reconnect delays; the xdsclient
	// defaults when 0.
	XDSMinBackoff, XDSMaxBackoff time.Duration
	// StateDir, when set, is where the last accepted config is kept (one
	// JSON DiscoveryResponse per type), so a sidecar restarted while the
	// control plane is away comes up serving it. Created if missing.
	StateDir string
	// Pprof serves net/http/pprof under /debug/pprof/ on the admin
	// endpoint; off by default.
	Pprof bool
	// ReclaimStartupMemory, once the first config is applied, gives the
	// kernel back the pages of the binary that only start-up touched
	// (memtrim.Reclaim: madvise MADV_DONTNEED of its text and read-only
	// data, then POSIX_FADV_DONTNEED of the unmapped cached pages; about
	// 20 MB of RSS). Off by default for embedders (tests run
	// several sidecars in one process); the sidecar command turns it on.
	ReclaimStartupMemory bool
	// HealthAddress, when set, is where the health port listens
	// (apphealth: xds.ReadyPath and the application's rewritten probes),
	// e.g. ":15020" in a Kubernetes pod, where the kubelet must reach it
	// on the pod's address. Empty opens none (outside Kubernetes, the
	// admin endpoint's /ready serves the same).
	HealthAddress string
	// AppProbes are the application probes the health port runs (the
	// injection webhook's rewrite of the pod's probes); see xds.AppProbes.
	AppProbes xds.AppProbes
	// NetHTTPOnly turns the HTTP/1.1 fast path off: every HTTP connection
	// is served by net/http's server (httpproxy.Options.NetHTTPOnly). Off
	// by default; for comparison and as an escape hatch.
	NetHTTPOnly bool
	// ShutdownDelay is how long, at most, a stopping sidecar keeps
	// accepting connections after its readiness fails (so that Consul's
	// check, then callers' endpoints, drop it), shedding HTTP/1.x
	// keep-alive connections meanwhile (Connection: close on every
	// response, as Envoy's draining connection managers do); it stops
	// accepting as soon as no new connection arrived for ShutdownQuiet,
	// then drains for DrainTimeout. 0 (the library's default) closes the
	// listeners at once; the sidecar command's -shutdown-delay defaults to
	// DefaultShutdownDelay. The role of Istio's terminationDrainDuration
	// (5 s) and consul-dataplane's shutdown grace period, ended early by
	// quiet as Linkerd's proxy does once its callers have moved on.
	ShutdownDelay time.Duration
}

// Defaults of a stopping sidecar (Config.ShutdownDelay).
const (
	// DefaultShutdownDelay bounds the wait for callers to move on: a
	// Consul check every second (the demo's, consul-k8s's readiness sync)
	// and a push, with room for checks every few seconds.
	DefaultShutdownDelay = 10 * time.Second
	// ShutdownQuiet is how long without a new connection ends the wait:
	// callers' keep-alive connections, shed, come back as new ones while
	// this sidecar is still among their endpoints.
	ShutdownQuiet = time.Second
)

// Validate reports a missing NodeID.
func (c *Config) Validate() error {
	if c.NodeID == "" {
		return errors.New("sidecar: Config.NodeID is required (the proxy service ID registered in Consul)")
	}
	if err := c.XDSCredentials.Validate(); err != nil {
		return fmt.Errorf("sidecar: %w", err)
	}
	return nil
}

// Sidecar is one running proxy. Create it with New, run it with Run.
type Sidecar struct {
	cfg       Config
	log       *slog.Logger
	clusters  *cluster.Manager
	listeners *listener.Manager
	xds       *xdsstate.State
	adminLn   net.Listener
	healthLn  net.Listener // nil without Config.HealthAddress
	metrics   *telemetry.Metrics
	tls       *tlsid.Store
	tracing   *tracing.Manager
	// shedding is set when the sidecar stops (Config.ShutdownDelay): its
	// HTTP servers close each HTTP/1.x connection after its response.
	shedding atomic.Bool

	mu sync.Mutex // guards active
	// active is the snapshot applied last, nil before the first.
	active *xdsstate.Snapshot

	ready atomic.Bool
}

// New returns a Sidecar bound to its admin address, or an error when cfg is
// invalid or the admin address cannot be bound.
func New(cfg Config) (*Sidecar, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if cfg.XDSAddress == "" {
		cfg.XDSAddress = DefaultXDSAddress
	}
	if cfg.AdminAddress == "" {
		cfg.AdminAddress = DefaultAdminAddress
	}
	if cfg.WarmTimeout == 0 {
		cfg.WarmTimeout = DefaultWarmTimeout
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	s := &Sidecar{
		cfg:     cfg,
		log:     cfg.Logger.With("node", cfg.NodeID),
		metrics: telemetry.New(),
		tls:     tlsid.NewStore(),
	}
	s.metrics.WatchCertificates(s.tls.All)
	s.tracing = tracing.NewManager(s.log, s.metrics, cfg.NodeID)
	s.clusters = cluster.NewManager(s.log, s.metrics, s.tls)
	s.metrics.WatchClusters(s.clusterStats)
	s.listeners = listener.NewManager(s.newHandler, cfg.DrainTimeout, s.log, listener.WithPacketFactory(s.newPacketHandler),
		listener.WithAcceptRecorder(s.metrics))
	st, err := xdsstate.New(xdsstate.Config{
		Server: cfg.XDSAddress,
		Node: &core.Node{
			Id:                   cfg.NodeID,
			Cluster:              cfg.Service,
			UserAgentName:        xds.UserAgentName,
			UserAgentVersionType: &core.Node_UserAgentVersion{UserAgentVersion: Version},
		},
		Credentials: cfg.XDSCredentials,
		Applier:     applier{s},
		WarmTimeout: cfg.WarmTimeout,
		StateDir:    cfg.StateDir,
		MinBackoff:  cfg.XDSMinBackoff,
		MaxBackoff:  cfg.XDSMaxBackoff,
		Logger:      s.log,
	})
	if err != nil {
		return nil, fmt.Errorf("sidecar: %w", err)
	}
	s.xds = st
	s.metrics.WatchXDS(func() telemetry.XDSStatus {
		st := s.xds.Status()
		return telemetry.XDSStatus{Connected: st.Connected, Versions: st.Versions, ACKs: st.ACKsByType, NACKs: st.NACKsByType}
	})
	s.adminLn, err = net.Listen("tcp", cfg.AdminAddress)
	if err != nil {
		return nil, fmt.Errorf("sidecar: admin listener on %s: %w", cfg.AdminAddress, err)
	}
	if cfg.HealthAddress != "" {
		if s.healthLn, err = net.Listen("tcp", cfg.HealthAddress); err != nil {
			s.adminLn.Close()
			return nil, fmt.Errorf("sidecar: health listener on %s: %w", cfg.HealthAddress, err)
		}
	}
	return s, nil
}

// HealthAddr returns the bound health port address, nil without
// Config.HealthAddress.
func (s *Sidecar) HealthAddr() net.Addr {
	if s.healthLn == nil {
		return nil
	}
	return s.healthLn.Addr()
}

// AdminAddr returns the bound admin address.
func (s *Sidecar) AdminAddr() net.Addr { return s.adminLn.Addr() }

// IsReady reports whether the first config is active.
func (s *Sidecar) IsReady() bool { return s.ready.Load() }

// Run serves until ctx is done, then stops accepting, drains listeners for
// up to the drain timeout, and closes upstream pools. It returns nil after a
// clean shutdown.
func (s *Sidecar) Run(ctx context.Context) error {
	adminSrv := &http.Server{Handler: admin.Handler(s, s.metrics.Registry, admin.Options{Pprof: s.cfg.Pprof}), ReadHeaderTimeout: 10 * time.Second}
	var wg sync.WaitGroup
	wg.Add(2)
	go func() {
		defer wg.Done()
		if err := adminSrv.Serve(s.adminLn); err != nil && !errors.Is(err, http.ErrServerClosed) {
			s.log.Error("sidecar: admin server failed", "error", err)
		}
	}()
	if s.cfg.StateDir != "" {
		if err := s.xds.Restore(); err != nil {
			s.log.Warn("sidecar: could not restore all persisted config; waiting for the control plane", "dir", s.cfg.StateDir, "error", err)
		}
	}
	var healthSrv *http.Server
	if s.healthLn != nil {
		healthSrv = &http.Server{Handler: apphealth.Handler(s.IsReady, s.cfg.AppProbes), ReadHeaderTimeout: 10 * time.Second}
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := healthSrv.Serve(s.healthLn); err != nil && !errors.Is(err, http.ErrServerClosed) {
				s.log.Error("sidecar: health server failed", "error", err)
			}
		}()
	}
	xctx, stopXDS := context.WithCancel(context.Background())
	go func() {
		defer wg.Done()
		_ = s.xds.Run(xctx)
	}()
	s.log.Info("sidecar: started", "xds", s.cfg.XDSAddress, "admin", s.adminLn.Addr().String())

	<-ctx.Done()
	s.ready.Store(false)
	if d := s.cfg.ShutdownDelay; d > 0 {
		s.log.Info("sidecar: stopping; not ready, shedding keep-alive connections until callers stop opening new ones",
			"quiet", ShutdownQuiet.String(), "atMost", d.String())
		s.shedding.Store(true)
		waited, quiet := s.listeners.AwaitQuiet(ShutdownQuiet, d)
		s.log.Info("sidecar: callers moved on", "waited", waited.Round(time.Millisecond).String(), "quiet", quiet)
	}
	s.log.Info("sidecar: shutting down; draining listeners")
	stopXDS()
	s.xds.Close() // no config is activated after this
	s.listeners.Close(context.Background())
	s.clusters.Close()
	tctx, tcancel := context.WithTimeout(context.Background(), 5*time.Second)
	s.tracing.Close(tctx) // flush the spans of the last requests
	tcancel()
	sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_ = adminSrv.Shutdown(sctx)
	if healthSrv != nil {
		_ = healthSrv.Shutdown(sctx)
	}
	wg.Wait()
	return nil
}

// newHandler builds a listener's handler: per filter chain an HTTP server
// or TCP proxy, behind TLS detection and handshakes when a chain is mTLS.
// A capture listener's handler selects chains by each connection's
// original destination, each set of chains served by the handler
// newHandler builds for an ordinary listener holding them.
func (s *Sidecar) newHandler(l *config.Listener, snap *config.Snapshot) (listener.Handler, error) {
	if l.OriginalDst {
		return listener.NewCapture(l, snap, s.newHandler, listener.CaptureOptions{Log: s.log, Recorder: s.metrics, DrainTimeout: s.cfg.DrainTimeout})
	}
	return s.newInbound(l, snap, func(secure bool) (listener.Handler, error) {
		c := l.Chain(secure)
		switch {
		case c == nil:
			return nil, fmt.Errorf("listener %q has no chain for this connection", l.Name)
		case c.HTTP != nil:
			var localID func() string
			if c.TLS != nil {
				certSecret := c.TLS.CertSecret
				localID = func() string {
					if sec := s.tls.Get(certSecret); sec != nil {
						return sec.SPIFFEID
					}
					return ""
				}
			}
			return httpproxy.NewServer(l, snap, s.clusters, s.log, httpproxy.Options{Recorder: s.metrics, Secure: secure, LocalID: localID, Tracing: s.tracing.HTTP, NetHTTPOnly: s.cfg.NetHTTPOnly,
				Shedding: &s.shedding}), nil
		case c.TCP != nil:
			return tcpproxy.New(l, secure, s.clusters, s.log, s.metrics), nil
		}
		return nil, fmt.Errorf("listener %q has no filter", l.Name)
	})
}

// newPacketHandler builds a UDP listener's proxy. Its datagrams pass in
// plaintext, which it logs once per listener.
func (s *Sidecar) newPacketHandler(l *config.Listener, _ *config.Snapshot) (listener.PacketHandler, error) {
	s.log.Info("udp listener: datagrams pass in plaintext, without mTLS, peer identity or authorization (UDP has no TLS)",
		"listener", l.Name, "cluster", l.UDP.Cluster, "idle", l.UDP.IdleTimeout)
	return udpproxy.New(l, s.clusters, s.log, s.metrics), nil
}

// reclaimStartupMemory pages out the binary's start-up pages (memtrim).
func (s *Sidecar) reclaimStartupMemory() {
	start := time.Now()
	maps, err := memtrim.Reclaim()
	if err != nil {
		s.log.Warn("memory: start-up pages of the binary not reclaimed", "error", err)
		return
	}
	var size uintptr
	for _, m := range maps {
		size += m.Size()
	}
	s.log.Debug("memory: start-up pages of the binary reclaimed", "mappings", len(maps), "bytes", size, "took", time.Since(start))
}
