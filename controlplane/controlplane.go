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
)

// Defaults for Config.
const (
	DefaultXDSAddress    = "127.0.0.1:18000"
	DefaultConsulAddress = "127.0.0.1:8500"
	DefaultPolicyDir     = "policies"
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
	// ConsulToken is an ACL token for Consul, if ACLs are on. With ACLs
	// defaulting to deny it needs the rules of consul.ControlPlaneACLRules
	// (with Kube, consul.KubeControlPlaneACLRules).
	ConsulToken string
	// ConsulCAFile is a PEM file of the CA certificates that verify the
	// agent's HTTPS certificate; the system roots when empty.
	ConsulCAFile string
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
	// injected pods to the same Consul. Its Consul, Registerer and Logger
	// are filled in here.
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

	srv := server.New(server.Config{Logger: log})
	defer srv.Close()
	reg := prometheus.NewRegistry()
	for _, c := range []prometheus.Collector{srv.Collector(), collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{})} {
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
	if cfg.Kube != nil {
		kc := *cfg.Kube
		kc.Consul, kc.Registerer, kc.Logger = client.Catalog(), reg, log
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
		setPolicies := func(set *policy.Set) { srv.SetPolicies(set.WithDefaultCollector(cfg.TraceCollector)) }
		if err := policy.Watch(ctx, cfg.PolicyDir, log, setPolicies); err != nil {
			cancel(err)
		}
	}()
	go func() {
		defer wg.Done()
		_ = watcher.Run(ctx, func(cat *model.Catalog) {
			log.Debug("consul: catalog changed", "services", len(cat.Services), "proxies", len(cat.Proxies))
			srv.SetCatalog(cat)
		})
	}()
	go func() {
		defer wg.Done()
		if err := srv.Serve(lis); err != nil && !errors.Is(err, net.ErrClosed) {
			cancel(fmt.Errorf("controlplane: serve xDS: %w", err))
		}
	}()
	log.Info("controlplane: serving ADS", "xds", lis.Addr().String(), "consul", cfg.ConsulAddress, "policies", cfg.PolicyDir)
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
