// Package controlplane wires meshlet's control plane: Consul watcher and
// policy watcher feed the xDS server, which serves sidecars and proxyless
// gRPC clients over ADS.
package controlplane

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/consul/api"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/meshlet/meshlet/controlplane/admin"
	"github.com/meshlet/meshlet/controlplane/consul"
	"github.com/meshlet/meshlet/controlplane/kube"
	"github.com/meshlet/meshlet/controlplane/model"
	"github.com/meshlet/meshlet/controlplane/policy"
	"github.com/meshlet/meshlet/controlplane/server"
	"github.com/meshlet/meshlet/controlplane/xdsauth"
)

// Defaults for Config.
const (
	DefaultXDSAddress    = "127.0.0.1:18000"
	DefaultConsulAddress = "127.0.0.1:8500"
	DefaultPolicyDir     = "policies"
	// DefaultXDSTLSDir is where a control plane outside Kubernetes keeps
	// the CA and serving certificate it issues itself for ADS (relative to
	// its working directory); sidecars verify it with its ca.crt.
	DefaultXDSTLSDir = "meshlet-xds-tls"
	// DefaultAdminAddress is the admin API address of the controlplane
	// command (flag -admin-addr) and where `controlplane status` looks.
	DefaultAdminAddress = admin.DefaultAddress
)

// Config configures Run.
type Config struct {
	// XDSAddress is where ADS is served (host:port); DefaultXDSAddress when
	// empty. Port 0 picks a free port (see Ready).
	XDSAddress string
	// ConsulAddress is the Consul agent's HTTP address (host:port or URL;
	// https://host:port for its HTTPS API); DefaultConsulAddress when
	// empty.
	ConsulAddress string
	// ConsulToken is the control plane's own ACL token for Consul (its
	// least privilege: consul.ControlPlaneACLRules; with Kube,
	// consul.KubeControlPlaneACLRules). Environment variables
	// of the Consul CLI are read too (CONSUL_HTTP_TOKEN_FILE,
	// CONSUL_CACERT, CONSUL_HTTP_SSL...).
	ConsulToken string
	// ConsulTokenFile holds ConsulToken instead (a mounted Secret).
	ConsulTokenFile string
	// ConsulCAFile is the CA bundle that verifies Consul's HTTPS API (an
	// https:// ConsulAddress).
	ConsulCAFile string
	// XDSInsecure serves ADS in plaintext and without authentication:
	// any process that reaches the port can take any service's
	// configuration and private key. Development only; logged as a
	// warning at every start. Sidecars must use -xds-insecure too.
	XDSInsecure bool
	// XDSCertFile and XDSKeyFile serve ADS with this certificate (read
	// again when it changes) instead of a self-issued one.
	XDSCertFile, XDSKeyFile string
	// XDSTLSDir keeps the CA and serving certificate the control plane
	// issues itself for ADS outside Kubernetes (servingcert.Dir: issued at
	// first start, persisted, renewed); DefaultXDSTLSDir when empty. Its
	// ca.crt is the sidecars' -xds-ca-file. On Kubernetes the webhook's
	// self-managed certificate serves ADS too.
	XDSTLSDir string
	// XDSCertNames are names (DNS or IP) the self-issued certificate
	// carries besides the local ones (servingcert.LocalNames): the
	// addresses sidecars on other machines dial.
	XDSCertNames []string
	// XDSTLSReady, if set, is called with the CA bundle file sidecars
	// verify ADS with, once serving (self-issued certificates only).
	XDSTLSReady func(caFile string)
	// ConsulAuthMethod, when set, names a Consul auth method (type jwt or
	// kubernetes) that JWTs presented on ADS are exchanged through for
	// Consul ACL tokens (xdsauth.ConsulLogin): proxyless gRPC clients and
	// sidecars outside Kubernetes holding a JWT. Without it, JWTs are
	// Kubernetes ServiceAccount tokens reviewed by the API server (Kube).
	ConsulAuthMethod string
	// AuthCache tunes the cache of token reviews (xdsauth.Cached).
	AuthCache xdsauth.CacheOptions
	// PolicyDir is the policy directory; DefaultPolicyDir when empty. It must
	// exist.
	PolicyDir string
	// TraceCollector is the OTLP collector sidecars export spans to when
	// MeshDefaults.tracing names none; nil or an empty endpoint leaves
	// tracing to the policy files (off when they name no collector).
	TraceCollector *policy.Collector
	// AdminAddress is where the admin HTTP API listens (host:port): /ready,
	// /status (every proxy, its versions, and every rejected update with
	// the policy file or Consul entry behind it), /metrics (Prometheus; the
	// control plane's own registry). It is unauthenticated: keep it on
	// loopback. Port 0 picks a free port (see AdminReady). Empty serves no
	// admin API, so embedding Run (tests) binds nothing unasked; the
	// controlplane command's -admin-addr defaults to DefaultAdminAddress.
	AdminAddress string
	// AdminPprof also serves Go profiles under /debug/pprof/ on the admin
	// API (off by default: profiles expose internals).
	AdminPprof bool
	// Logger defaults to slog.Default().
	Logger *slog.Logger
	// AdminReady, if set, is called with the bound admin address once the
	// admin API serves, before Ready. It is not called without
	// AdminAddress.
	AdminReady func(adminAddr net.Addr)
	// Ready, if set, is called with the bound xDS address once serving.
	Ready func(xdsAddr net.Addr)
	// Kube, when set, also runs the Kubernetes side (kube.Run): the
	// injection webhook and the registration controller, which writes
	// injected pods to the same Consul. Its Consul, Registerer, Logger,
	// Certs and Ready (the xDS server's) are filled in here.
	Kube *kube.Config
}

func (c *Config) setDefaults() {
	if c.XDSAddress == "" {
		c.XDSAddress = DefaultXDSAddress
	}
	if c.ConsulAddress == "" {
		c.ConsulAddress = DefaultConsulAddress
	}
	if c.PolicyDir == "" {
		c.PolicyDir = DefaultPolicyDir
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
}

// Run serves until ctx is done. It returns nil after a clean shutdown, or
// the first fatal error: the xDS or admin address cannot be bound, the
// policy directory cannot be watched, or the Consul client cannot be built.
// An unreachable Consul agent is not fatal: it is logged and retried.
func Run(ctx context.Context, cfg Config) error {
	cfg.setDefaults()
	if c := cfg.TraceCollector; c != nil && c.Endpoint != "" {
		if err := c.Validate(); err != nil {
			return fmt.Errorf("controlplane: trace collector: %w", err)
		}
	}
	log := cfg.Logger

	cc := api.DefaultConfig()
	cc.Address = cfg.ConsulAddress
	if cfg.ConsulToken != "" {
		cc.Token = cfg.ConsulToken
	}
	if cfg.ConsulTokenFile != "" {
		cc.TokenFile = cfg.ConsulTokenFile
	}
	if cfg.ConsulCAFile != "" {
		cc.TLSConfig.CAFile = cfg.ConsulCAFile
	}
	client, err := api.NewClient(cc)
	if err != nil {
		return fmt.Errorf("controlplane: consul client for %s: %w", cfg.ConsulAddress, err)
	}
	watcher, err := consul.New(consul.Config{Client: client, Address: cfg.ConsulAddress, Logger: log,
		Anonymous: cc.Token == "" && cc.TokenFile == ""})
	if err != nil {
		return err
	}
	lis, err := net.Listen("tcp", cfg.XDSAddress)
	if err != nil {
		return fmt.Errorf("controlplane: listen for xDS on %s: %w", cfg.XDSAddress, err)
	}
	var adminLis net.Listener
	if cfg.AdminAddress != "" {
		if adminLis, err = net.Listen("tcp", cfg.AdminAddress); err != nil {
			lis.Close()
			return fmt.Errorf("controlplane: listen for the admin API on %s: %w", cfg.AdminAddress, err)
		}
	}

	var policies atomic.Pointer[policy.Set]
	mayActAs := func(ns, sa, svc string) bool { return policies.Load().ServiceAccountMayActAs(ns, sa, svc) }
	sec, err := newXDSSecurity(ctx, cfg, cc, mayActAs)
	if err != nil {
		lis.Close()
		if adminLis != nil {
			adminLis.Close()
		}
		return err
	}
	srv := server.New(server.Config{Logger: log, GRPCOptions: sec.serverOptions, StreamIdentity: xdsauth.StreamIdentity, AuthDenials: sec.denials})
	defer srv.Close()
	reg := prometheus.NewRegistry()
	collected := []prometheus.Collector{srv.Collector(), collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{})}
	if sec.guard != nil {
		collected = append(collected, sec.guard.Collector())
	}
	for _, c := range collected {
		if err := reg.Register(c); err != nil {
			lis.Close()
			if adminLis != nil {
				adminLis.Close()
			}
			return fmt.Errorf("controlplane: register metrics: %w", err)
		}
	}

	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	var wg sync.WaitGroup
	var adminSrv *http.Server
	if adminLis != nil {
		ao := admin.Options{Pprof: cfg.AdminPprof}
		// In a pod, the Kubernetes API server's Service, which interception
		// leaves alone (controlplane why says so).
		if ap, err := netip.ParseAddrPort(net.JoinHostPort(os.Getenv("KUBERNETES_SERVICE_HOST"), os.Getenv("KUBERNETES_SERVICE_PORT"))); err == nil {
			ao.Explain.KubeAPIServer = ap
		}
		adminSrv = &http.Server{Handler: admin.Handler(srv, reg, ao), ReadHeaderTimeout: 10 * time.Second}
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := adminSrv.Serve(adminLis); err != nil && !errors.Is(err, http.ErrServerClosed) {
				cancel(fmt.Errorf("controlplane: serve the admin API: %w", err))
			}
		}()
		log.Info("controlplane: serving the admin API", "admin", adminLis.Addr().String(), "pprof", cfg.AdminPprof)
		if cfg.AdminReady != nil {
			cfg.AdminReady(adminLis.Addr())
		}
	}
	if sec.run != nil {
		wg.Add(1)
		go func() {
			defer wg.Done()
			sec.run(ctx)
		}()
	}
	if cfg.Kube != nil {
		kc := *cfg.Kube
		kc.Consul, kc.Registerer, kc.Logger, kc.Certs = client.Catalog(), reg, log, sec.kubeCerts
		// The pod is ready (ReadyPath) once the xDS server has its first
		// Consul catalog too.
		kc.Ready = srv.Ready
		kc.Injector.ServiceAccountMayActAs, kc.Injector.XDSInsecure = mayActAs, cfg.XDSInsecure
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := kube.Run(ctx, kc); err != nil {
				cancel(err)
			}
		}()
	}
	wg.Add(3)
	go func() {
		defer wg.Done()
		setPolicies := func(set *policy.Set) {
			policies.Store(set)
			srv.SetPolicies(set.WithDefaultCollector(cfg.TraceCollector))
		}
		if err := policy.Watch(ctx, cfg.PolicyDir, log, setPolicies); err != nil {
			cancel(err)
		}
	}()
	go func() {
		defer wg.Done()
		_ = watcher.Run(ctx, func(cat *model.Catalog) {
			log.Debug("consul: catalog changed", "services", len(cat.Services), "proxies", len(cat.Proxies))
			if sec.guard != nil {
				sec.guard.SetCatalog(cat) // first: no snapshot built from cat reaches a stream it revokes
			}
			srv.SetCatalog(cat)
		})
	}()
	go func() {
		defer wg.Done()
		if err := srv.Serve(lis); err != nil && !errors.Is(err, net.ErrClosed) {
			cancel(fmt.Errorf("controlplane: serve xDS: %w", err))
		}
	}()
	log.Info("controlplane: serving ADS", "xds", lis.Addr().String(), "consul", cfg.ConsulAddress, "policies", cfg.PolicyDir,
		"tls", sec.describe)
	if sec.caFile != "" && cfg.XDSTLSReady != nil {
		cfg.XDSTLSReady(sec.caFile)
	}
	if cfg.Ready != nil {
		cfg.Ready(lis.Addr())
	}
	<-ctx.Done()
	if adminSrv != nil {
		adminSrv.Close()
	}
	srv.Close()
	wg.Wait()
	if err := context.Cause(ctx); err != nil && !errors.Is(err, context.Canceled) {
		return err
	}
	return nil
}
