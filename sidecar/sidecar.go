// Package sidecar wires meshlet's per-service proxy: an ADS client feeding
// validated config into the cluster and listener managers, whose listeners
// run the HTTP, TCP and UDP proxies, plus the admin endpoints. The sidecar knows
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
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	adminv3 "github.com/envoyproxy/go-control-plane/envoy/admin/v3"
	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/timestamppb"

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
	"github.com/meshlet/meshlet/xds"
)

// Defaults for Config.
const (
	DefaultXDSAddress   = "127.0.0.1:18000"
	DefaultAdminAddress = "127.0.0.1:19000"
	// DefaultWarmTimeout is how long a new config waits for the route
	// configurations and load assignments it references before it is
	// activated anyway (Envoy's initial_fetch_timeout default).
	DefaultWarmTimeout = 15 * time.Second
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
	// XDSAddress is the control plane's ADS address; DefaultXDSAddress when
	// empty.
	XDSAddress string
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
}

// Validate reports a missing NodeID.
func (c *Config) Validate() error {
	if c.NodeID == "" {
		return errors.New("sidecar: Config.NodeID is required (the proxy service ID registered in Consul)")
	}
	return nil
}

// Sidecar is one running proxy. Create it with New, run it with Run.
type Sidecar struct {
	cfg       Config
	log       *slog.Logger
	clusters  *cluster.Manager
	listeners *listener.Manager
	client    *xdsclient.Client
	adminLn   net.Listener
	healthLn  net.Listener // nil without Config.HealthAddress
	metrics   *telemetry.Metrics
	tls       *tlsid.Store
	tracing   *tracing.Manager

	// applyMu serialises Update and activation; the managers are called
	// with it held (they never call back into the Sidecar).
	applyMu   sync.Mutex
	warmTimer *time.Timer // guarded by applyMu

	mu sync.Mutex // guards the fields below; held only for short copies
	// state of each xDS type, by type URL.
	state map[string]*resourceState
	// Accepted, decoded resources. Maps are replaced, never modified.
	lds      map[string]*config.Listener
	rds      map[string]*config.RouteConfig
	cds      map[string]*config.Cluster
	eds      map[string]*config.LoadAssignment
	sds      map[string]*config.Secret
	active   *config.Snapshot
	rejected map[string]admin.Rejection

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
		cfg:      cfg,
		log:      cfg.Logger.With("node", cfg.NodeID),
		metrics:  telemetry.New(),
		tls:      tlsid.NewStore(),
		state:    map[string]*resourceState{},
		rejected: map[string]admin.Rejection{},
	}
	s.metrics.WatchCertificates(s.tls.All)
	s.tracing = tracing.NewManager(s.log, s.metrics, cfg.NodeID)
	s.clusters = cluster.NewManager(s.log, s.metrics, s.tls)
	s.metrics.WatchClusters(s.clusterStats)
	s.listeners = listener.NewManager(s.newHandler, cfg.DrainTimeout, s.log, listener.WithPacketFactory(s.newPacketHandler))
	client, err := xdsclient.New(xdsclient.Config{
		Server: cfg.XDSAddress,
		Node: &core.Node{
			Id:                   cfg.NodeID,
			Cluster:              cfg.Service,
			UserAgentName:        xds.UserAgentName,
			UserAgentVersionType: &core.Node_UserAgentVersion{UserAgentVersion: Version},
		},
		Handler:    s,
		Logger:     s.log,
		MinBackoff: cfg.XDSMinBackoff,
		MaxBackoff: cfg.XDSMaxBackoff,
	})
	if err != nil {
		return nil, err
	}
	s.client = client
	s.metrics.WatchXDS(func() telemetry.XDSStatus {
		st := client.Status()
		return telemetry.XDSStatus{Connected: st.Connected, Versions: st.Versions, ACKs: st.ACKsByType, NACKs: st.NACKsByType}
	})
	if cfg.StateDir != "" {
		if err := os.MkdirAll(cfg.StateDir, 0o700); err != nil {
			return nil, fmt.Errorf("sidecar: state directory: %w", err)
		}
	}
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
		if err := s.restore(); err != nil {
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
		_ = s.client.Run(xctx)
	}()
	s.log.Info("sidecar: started", "xds", s.cfg.XDSAddress, "admin", s.adminLn.Addr().String())

	<-ctx.Done()
	s.log.Info("sidecar: shutting down; draining listeners")
	s.ready.Store(false)
	stopXDS()
	s.applyMu.Lock()
	if s.warmTimer != nil {
		s.warmTimer.Stop()
	}
	s.applyMu.Unlock()
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
			return httpproxy.NewServer(l, snap, s.clusters, s.log, httpproxy.Options{Recorder: s.metrics, Secure: secure, LocalID: localID, Tracing: s.tracing.HTTP, NetHTTPOnly: s.cfg.NetHTTPOnly}), nil
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

// Update implements xdsclient.Handler: it validates one response, binds new
// listener addresses, stores the resources and activates the config once
// every reference is resolved (or the warm timeout passes).
func (s *Sidecar) Update(typeURL, version string, resources []*anypb.Any) (map[string][]string, error) {
	s.applyMu.Lock()
	defer s.applyMu.Unlock()
	decoded, raw, err := decodeAll(typeURL, resources)
	if err == nil && typeURL == xds.ListenerType {
		err = s.listeners.Bind(typed[*config.Listener](decoded))
	}
	if err != nil {
		s.mu.Lock()
		s.rejected[typeURL] = admin.Rejection{Version: version, Time: time.Now(), Error: err.Error()}
		s.mu.Unlock()
		return nil, err
	}

	var deps map[string][]string
	s.mu.Lock()
	st := s.state[typeURL]
	if st == nil {
		st = &resourceState{}
		s.state[typeURL] = st
	}
	switch typeURL {
	case xds.ListenerType:
		s.lds = typed[*config.Listener](decoded)
		names := config.RouteNames(s.lds)
		s.rds = keep(s.rds, names, nil)
		deps = map[string][]string{xds.RouteType: names, xds.SecretType: s.secretNamesLocked()}
		st.raw = raw
	case xds.ClusterType:
		s.cds = typed[*config.Cluster](decoded)
		names := config.EndpointNames(s.cds)
		s.eds = keep(s.eds, names, nil)
		deps = map[string][]string{xds.EndpointType: names, xds.SecretType: s.secretNamesLocked()}
		st.raw = raw
	case xds.SecretType:
		names := s.secretNamesLocked()
		s.sds = keep(s.sds, names, typed[*config.Secret](decoded))
		st.raw = keep(st.raw, names, raw)
	case xds.RouteType:
		names := config.RouteNames(s.lds)
		s.rds = keep(s.rds, names, typed[*config.RouteConfig](decoded))
		st.raw = keep(st.raw, names, raw)
	case xds.EndpointType:
		names := config.EndpointNames(s.cds)
		s.eds = keep(s.eds, names, typed[*config.LoadAssignment](decoded))
		st.raw = keep(st.raw, names, raw)
	}
	st.received, st.version, st.updated = true, version, time.Now()
	delete(s.rejected, typeURL)
	raw = st.raw
	s.mu.Unlock()
	if s.cfg.StateDir != "" {
		if err := s.persist(typeURL, version, raw); err != nil {
			s.log.Warn("sidecar: could not persist accepted config", "type", typeURL, "dir", s.cfg.StateDir, "error", err)
		}
	}

	s.activate(false)
	return deps, nil
}

// secretNamesLocked returns the SDS names the accepted listeners and
// clusters reference, pruning secrets no longer referenced. s.mu must be
// held.
func (s *Sidecar) secretNamesLocked() []string {
	names := config.SecretNames(s.lds, s.cds)
	s.sds = keep(s.sds, names, nil)
	return names
}

// keep returns the entries of fresh, else of old, whose names are in names.
// Route configurations and load assignments are sent by name in state of the
// world; those not in a response keep their last accepted value.
func keep[T any](old map[string]T, names []string, fresh map[string]T) map[string]T {
	out := make(map[string]T, len(names))
	for _, n := range names {
		if v, ok := fresh[n]; ok {
			out[n] = v
		} else if v, ok := old[n]; ok {
			out[n] = v
		}
	}
	return out
}

// missing lists what the accepted config references but has not received.
// s.mu must be held.
func (s *Sidecar) missingLocked() []string {
	var miss []string
	if st := s.state[xds.ClusterType]; st == nil || !st.received {
		miss = append(miss, "clusters (CDS)")
	}
	if st := s.state[xds.ListenerType]; st == nil || !st.received {
		miss = append(miss, "listeners (LDS)")
	}
	for _, n := range config.RouteNames(s.lds) {
		if _, ok := s.rds[n]; !ok {
			miss = append(miss, fmt.Sprintf("route configuration %q (RDS)", n))
		}
	}
	for _, n := range config.EndpointNames(s.cds) {
		if _, ok := s.eds[n]; !ok {
			miss = append(miss, fmt.Sprintf("load assignment %q (EDS)", n))
		}
	}
	for _, n := range config.SecretNames(s.lds, s.cds) {
		if _, ok := s.sds[n]; !ok {
			miss = append(miss, fmt.Sprintf("secret %q (SDS)", n))
		}
	}
	return miss
}

// activate applies the accepted resources as one Snapshot once nothing is
// missing, or, with force (the warm timer fired), with what there is.
// applyMu must be held.
func (s *Sidecar) activate(force bool) {
	s.mu.Lock()
	missing := s.missingLocked()
	haveBase := s.state[xds.ListenerType] != nil && s.state[xds.ClusterType] != nil
	snap := &config.Snapshot{Listeners: s.lds, Routes: s.rds, Clusters: s.cds, Endpoints: s.eds, Secrets: s.sds}
	s.mu.Unlock()

	if len(missing) > 0 {
		if !force || !haveBase {
			if haveBase && s.warmTimer == nil {
				s.warmTimer = time.AfterFunc(s.cfg.WarmTimeout, func() {
					s.applyMu.Lock()
					defer s.applyMu.Unlock()
					s.warmTimer = nil
					s.activate(true)
				})
			}
			s.log.Debug("xds: warming", "waiting for", strings.Join(missing, ", "))
			return
		}
		s.log.Warn("xds: activating config without everything it references after the warm timeout",
			"missing", strings.Join(missing, ", "), "warmTimeout", s.cfg.WarmTimeout)
	}
	if s.warmTimer != nil {
		s.warmTimer.Stop()
		s.warmTimer = nil
	}
	s.tls.Set(snap.Secrets) // first: new handshakes use new certificates and roots
	s.tracing.Sync(snap.TraceProviders())
	s.clusters.Update(snap.Clusters, snap.Endpoints)
	if err := s.listeners.Apply(snap); err != nil {
		s.log.Error("xds: applying listeners", "error", err)
	}
	s.mu.Lock()
	s.active = snap
	s.mu.Unlock()
	if !s.ready.Swap(true) {
		s.log.Info("sidecar: ready; first config applied", "listeners", len(snap.Listeners), "clusters", len(snap.Clusters))
		if s.cfg.ReclaimStartupMemory {
			s.reclaimStartupMemory()
		}
	}
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

// Ready implements admin.Source.
func (s *Sidecar) Ready() (bool, string) {
	if s.ready.Load() {
		return true, ""
	}
	s.mu.Lock()
	missing := s.missingLocked()
	s.mu.Unlock()
	if !s.client.Status().Connected {
		missing = append([]string{"control plane at " + s.cfg.XDSAddress + " (not connected)"}, missing...)
	}
	return false, "waiting for " + strings.Join(missing, ", ")
}

// ConfigDump implements admin.Source.
func (s *Sidecar) ConfigDump() *admin.ConfigDump {
	st := s.client.Status()
	s.mu.Lock()
	defer s.mu.Unlock()
	dump := &adminv3.ConfigDump{}
	version := func(t string) (string, *timestamppb.Timestamp, map[string]*anypb.Any) {
		rs := s.state[t]
		if rs == nil {
			return "", nil, nil
		}
		return rs.version, timestamppb.New(rs.updated), rs.raw
	}
	{
		v, ts, raw := version(xds.ListenerType)
		d := &adminv3.ListenersConfigDump{VersionInfo: v}
		for _, n := range sortedNames(raw) {
			d.DynamicListeners = append(d.DynamicListeners, &adminv3.ListenersConfigDump_DynamicListener{
				Name:        n,
				ActiveState: &adminv3.ListenersConfigDump_DynamicListenerState{VersionInfo: v, Listener: raw[n], LastUpdated: ts},
			})
		}
		dump.Configs = append(dump.Configs, xds.MustAny(d))
	}
	{
		v, ts, raw := version(xds.ClusterType)
		d := &adminv3.ClustersConfigDump{VersionInfo: v}
		for _, n := range sortedNames(raw) {
			d.DynamicActiveClusters = append(d.DynamicActiveClusters, &adminv3.ClustersConfigDump_DynamicCluster{VersionInfo: v, Cluster: raw[n], LastUpdated: ts})
		}
		dump.Configs = append(dump.Configs, xds.MustAny(d))
	}
	{
		v, ts, raw := version(xds.RouteType)
		d := &adminv3.RoutesConfigDump{}
		for _, n := range sortedNames(raw) {
			d.DynamicRouteConfigs = append(d.DynamicRouteConfigs, &adminv3.RoutesConfigDump_DynamicRouteConfig{VersionInfo: v, RouteConfig: raw[n], LastUpdated: ts})
		}
		dump.Configs = append(dump.Configs, xds.MustAny(d))
	}
	{
		v, ts, raw := version(xds.EndpointType)
		d := &adminv3.EndpointsConfigDump{}
		for _, n := range sortedNames(raw) {
			d.DynamicEndpointConfigs = append(d.DynamicEndpointConfigs, &adminv3.EndpointsConfigDump_DynamicEndpointConfig{VersionInfo: v, EndpointConfig: raw[n], LastUpdated: ts})
		}
		dump.Configs = append(dump.Configs, xds.MustAny(d))
	}
	{
		v, ts, raw := version(xds.SecretType)
		d := &adminv3.SecretsConfigDump{}
		for _, n := range sortedNames(raw) {
			d.DynamicActiveSecrets = append(d.DynamicActiveSecrets, &adminv3.SecretsConfigDump_DynamicSecret{
				Name: n, VersionInfo: v, LastUpdated: ts, Secret: redact(raw[n]),
			})
		}
		dump.Configs = append(dump.Configs, xds.MustAny(d))
	}
	rej := make(map[string]admin.Rejection, len(s.rejected))
	for k, v := range s.rejected {
		rej[k] = v
	}
	return &admin.ConfigDump{Envoy: dump, XDS: admin.XDSState{
		Server: s.cfg.XDSAddress, Node: s.cfg.NodeID, Connected: st.Connected,
		Versions: st.Versions, ACKs: st.ACKs, NACKs: st.NACKs, Rejected: rej,
	}}
}

// redact returns a secret with its private key replaced, as Envoy's
// config_dump does; anything else is returned as is.
func redact(a *anypb.Any) *anypb.Any {
	var sec tlsv3.Secret
	if a.UnmarshalTo(&sec) != nil {
		return a
	}
	if c := sec.GetTlsCertificate(); c != nil && c.GetPrivateKey() != nil {
		c.PrivateKey = &core.DataSource{Specifier: &core.DataSource_InlineString{InlineString: "[redacted]"}}
	}
	return xds.MustAny(&sec)
}

// Certs implements admin.Source.
func (s *Sidecar) Certs() []config.CertInfo {
	all := s.tls.All()
	var out []config.CertInfo
	now := time.Now()
	for _, n := range sortedNames(all) {
		out = append(out, all[n].Infos(now)...)
	}
	return out
}

func sortedNames[T any](m map[string]T) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}

// clusterStats returns the live counters of every cluster, for metrics.
func (s *Sidecar) clusterStats() map[string]telemetry.ClusterStats {
	all := s.clusters.All()
	out := make(map[string]telemetry.ClusterStats, len(all))
	for n, c := range all {
		st := c.Stats()
		out[n] = telemetry.ClusterStats{Connections: st.Connections, Requests: st.Requests, Pending: st.Pending}
	}
	return out
}

// Listeners implements admin.Source.
func (s *Sidecar) Listeners() []admin.Listener {
	addrs := s.listeners.Addresses()
	s.mu.Lock()
	var active map[string]*config.Listener
	if s.active != nil {
		active = s.active.Listeners
	}
	s.mu.Unlock()
	out := make([]admin.Listener, 0, len(addrs))
	for _, n := range sortedNames(addrs) {
		al := admin.Listener{Name: n, Address: addrs[n]}
		if l := active[n]; l != nil && l.OriginalDst {
			al.Chains = captureChains(l)
		}
		out = append(out, al)
	}
	return out
}

// captureChains describes the chains of the capture listener l for the
// admin endpoint.
func captureChains(l *config.Listener) []admin.Chain {
	out := make([]admin.Chain, 0, len(l.Chains)+1)
	for _, c := range l.AllChains() {
		ac := admin.Chain{Name: c.Name, DestinationPort: c.Match.Port, TransportProtocol: c.TransportProtocol, Default: c == l.Default}
		for _, p := range c.Match.Prefixes {
			ac.PrefixRanges = append(ac.PrefixRanges, p.String())
		}
		out = append(out, ac)
	}
	return out
}

// Clusters implements admin.Source.
func (s *Sidecar) Clusters() []admin.Cluster {
	all := s.clusters.All()
	out := make([]admin.Cluster, 0, len(all))
	for _, n := range sortedNames(all) {
		st := all[n].Stats()
		c := admin.Cluster{Name: n, Requests: st.Requests, Pending: st.Pending, Connections: st.Connections}
		for _, e := range all[n].Endpoints() {
			c.Endpoints = append(c.Endpoints, admin.Endpoint{Address: e.Address, Weight: e.Weight(),
				Active: e.Active(), Ejected: e.Ejected(), Breaker: e.BreakerState()})
		}
		out = append(out, c)
	}
	return out
}
