// Command sidecar is meshlet's per-service proxy. It is configured only over
// xDS (ADS) by the control plane, identifying itself by its proxy service ID
// in Consul.
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/meshlet/meshlet/internal/cli"
	"github.com/meshlet/meshlet/sidecar"
	"github.com/meshlet/meshlet/sidecar/listener"
	"github.com/meshlet/meshlet/xds"
)

func main() {
	os.Exit(run(os.Args[1:], os.Stderr))
}

func run(args []string, stderr io.Writer) int {
	if len(args) > 0 && args[0] == "wait-ready" {
		return waitReady(args[1:], stderr)
	}
	fs := flag.NewFlagSet("sidecar", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var cfg sidecar.Config
	fs.StringVar(&cfg.NodeID, "node-id", os.Getenv("MESHLET_NODE_ID"), "xDS node ID: the proxy's service ID in Consul, e.g. web-sidecar-proxy (required; env MESHLET_NODE_ID)")
	fs.StringVar(&cfg.Service, "service", os.Getenv("MESHLET_SERVICE"), "service this sidecar fronts (informational; env MESHLET_SERVICE)")
	fs.StringVar(&cfg.XDSAddress, "xds-addr", cli.EnvOr("MESHLET_XDS_ADDR", sidecar.DefaultXDSAddress), "control plane ADS address host:port (env MESHLET_XDS_ADDR)")
	fs.StringVar(&cfg.AdminAddress, "admin-addr", sidecar.DefaultAdminAddress, "admin endpoint host:port, loopback by default (/ready, /config_dump, /listeners, /clusters, /certs, /metrics)")
	fs.DurationVar(&cfg.DrainTimeout, "drain-timeout", listener.DefaultDrainTimeout, "how long removed listeners, and all listeners at shutdown, wait for open connections")
	fs.DurationVar(&cfg.WarmTimeout, "warm-timeout", sidecar.DefaultWarmTimeout, "how long a new config waits for the routes and endpoints it references")
	fs.StringVar(&cfg.StateDir, "state-dir", os.Getenv("MESHLET_STATE_DIR"), "keep the last accepted config here, so a restart while the control plane is away comes up serving it (env MESHLET_STATE_DIR; off when empty)")
	fs.BoolVar(&cfg.Pprof, "admin-pprof", false, "serve Go profiles under /debug/pprof/ on the admin endpoint")
	fs.BoolVar(&cfg.ReclaimStartupMemory, "reclaim-startup-memory", true, "once ready, give the kernel back the pages of the binary only start-up used (madvise MADV_DONTNEED of its text and read-only data; about 20 MB of RSS)")
	fs.BoolVar(&cfg.NetHTTPOnly, "http1-nethttp-only", os.Getenv("MESHLET_HTTP1_NETHTTP_ONLY") != "", "serve every HTTP connection with net/http's server, without the HTTP/1.1 fast path (env MESHLET_HTTP1_NETHTTP_ONLY)")
	fs.StringVar(&cfg.HealthAddress, "health-addr", os.Getenv("MESHLET_HEALTH_ADDR"), "health port host:port for the kubelet: "+xds.ReadyPath+" and the application's rewritten probes (env MESHLET_HEALTH_ADDR; off when empty; the injection webhook sets :15020)")
	logger := cli.LogLevel(fs, stderr)
	if err := fs.Parse(args); err != nil {
		return 2
	}
	var err error
	if cfg.Logger, err = logger(); err != nil {
		fmt.Fprintf(stderr, "sidecar: %v\n", err)
		return 2
	}
	if cfg.AppProbes, err = xds.ParseAppProbes(os.Getenv(xds.EnvAppProbes)); err != nil {
		fmt.Fprintf(stderr, "sidecar: %v\n", err)
		return 2
	}
	s, err := sidecar.New(cfg)
	if err != nil {
		cfg.Logger.Error("sidecar: cannot start", "error", err)
		return 1
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := s.Run(ctx); err != nil {
		cfg.Logger.Error("sidecar: exiting", "error", err)
		return 1
	}
	return 0
}

// waitReady is `sidecar wait-ready [-url URL] [-timeout D]`: it polls the
// sidecar's readiness until it answers 200 (exit 0) or the timeout passes
// (exit 1). The injection webhook runs it as the sidecar container's
// postStart hook on clusters without native sidecars, so the application's
// containers start only once the sidecar serves.
func waitReady(args []string, stderr io.Writer) int {
	fs := flag.NewFlagSet("sidecar wait-ready", flag.ContinueOnError)
	fs.SetOutput(stderr)
	url := fs.String("url", fmt.Sprintf("http://127.0.0.1:%d%s", xds.PodHealthPort, xds.ReadyPath), "readiness URL to poll")
	timeout := fs.Duration("timeout", 2*time.Minute, "give up after this long")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	tick := time.NewTicker(200 * time.Millisecond)
	defer tick.Stop()
	client := &http.Client{Timeout: time.Second}
	var last string
	for {
		resp, err := client.Get(*url)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return 0
			}
			last = resp.Status
		} else {
			last = err.Error()
		}
		select {
		case <-ctx.Done():
			fmt.Fprintf(stderr, "sidecar wait-ready: %s not ready after %v: %s\n", *url, *timeout, last)
			return 1
		case <-tick.C:
		}
	}
}
