// Command sidecar is meshlet's per-service proxy. It is configured only over
// xDS (ADS) by the control plane, identifying itself by its proxy service ID
// in Consul.
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"

	"github.com/meshlet/meshlet/internal/cli"
	"github.com/meshlet/meshlet/sidecar"
	"github.com/meshlet/meshlet/sidecar/listener"
)

func main() {
	os.Exit(run(os.Args[1:], os.Stderr))
}

func run(args []string, stderr io.Writer) int {
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
	logger := cli.LogLevel(fs, stderr)
	if err := fs.Parse(args); err != nil {
		return 2
	}
	var err error
	if cfg.Logger, err = logger(); err != nil {
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
