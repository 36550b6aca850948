// Command sidecar is meshlet's per-service proxy. It is configured only over
// xDS (ADS) by the control plane, identifying itself by its proxy service ID
// in Consul.
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"

	"github.com/meshlet/meshlet/internal/cli"
	"github.com/meshlet/meshlet/sidecar"
	"github.com/meshlet/meshlet/sidecar/intercept"
	"github.com/meshlet/meshlet/sidecar/listener"
	"github.com/meshlet/meshlet/sidecar/xdsclient"
	"github.com/meshlet/meshlet/xds"
)

func main() {
	os.Exit(run(os.Args[1:], os.Stderr))
}

func run(args []string, stderr io.Writer) int {
	if len(args) > 0 && args[0] == "wait-ready" {
		return waitReady(args[1:], stderr)
	}
	if len(args) > 0 && args[0] == "intercept" {
		return interceptCmd(args[1:], os.Stdout, stderr)
	}
	if len(args) > 0 && args[0] == "xds-check" {
		return xdsCheck(args[1:], os.Stdout, stderr)
	}
	fs := flag.NewFlagSet("sidecar", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var cfg sidecar.Config
	fs.StringVar(&cfg.NodeID, "node-id", os.Getenv("MESHLET_NODE_ID"), "xDS node ID: the proxy's service ID in Consul, e.g. web-sidecar-proxy (required; env MESHLET_NODE_ID)")
	fs.StringVar(&cfg.Service, "service", os.Getenv("MESHLET_SERVICE"), "service this sidecar fronts (informational; env MESHLET_SERVICE)")
	fs.StringVar(&cfg.XDSAddress, "xds-addr", cli.EnvOr("MESHLET_XDS_ADDR", sidecar.DefaultXDSAddress), "control plane ADS address host:port, or several replicas' separated by commas (env MESHLET_XDS_ADDR)")
	xdsCredentialFlags(fs, &cfg.XDSCredentials)
	fs.StringVar(&cfg.AdminAddress, "admin-addr", sidecar.DefaultAdminAddress, "admin endpoint host:port, loopback by default (/ready, /config_dump, /listeners, /clusters, /certs, /metrics)")
	fs.DurationVar(&cfg.DrainTimeout, "drain-timeout", listener.DefaultDrainTimeout, "how long removed listeners, and all listeners at shutdown, wait for open connections")
	fs.DurationVar(&cfg.ShutdownDelay, "shutdown-delay", sidecar.DefaultShutdownDelay, "on SIGTERM: at most how long to keep accepting connections (not ready, keep-alive connections shed) until callers stop opening new ones for 1s, before closing the listeners and draining; 0 closes them at once")
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

// xdsCredentialFlags declares the flags of the ADS credentials: TLS
// against a CA bundle and a bearer token file, or plaintext.
func xdsCredentialFlags(fs *flag.FlagSet, c *xdsclient.Credentials) {
	fs.StringVar(&c.CAFile, "xds-ca-file", os.Getenv(xds.EnvXDSCAFile), "CA bundle (PEM) the control plane's serving certificate must chain to; read again when it changes (env "+xds.EnvXDSCAFile+"; in a pod "+xds.PodCAFile+")")
	fs.StringVar(&c.ServerName, "xds-server-name", os.Getenv(xds.EnvXDSServerName), "name the control plane's certificate must carry (env "+xds.EnvXDSServerName+"; default: the host of -xds-addr)")
	fs.StringVar(&c.TokenFile, "token-file", os.Getenv(xds.EnvTokenFile), "file holding this proxy's token, read at every ADS stream: a projected ServiceAccount token of audience "+xds.TokenAudience+" (Kubernetes) or a Consul ACL token with service:write on the proxy's service (env "+xds.EnvTokenFile+"; in a pod "+xds.PodTokenFile+")")
	fs.BoolVar(&c.Insecure, "xds-insecure", os.Getenv(xds.EnvXDSInsecure) != "", "dial ADS in plaintext and send no token (development only; the control plane must run with -xds-insecure too) (env "+xds.EnvXDSInsecure+")")
}

// xdsCheck is `sidecar xds-check -node-id ID [credential flags]`: one ADS
// stream as that node, asking for its secrets, to see whether this
// process's credentials get it served (and what) or refused (and why).
// Without -token-file it sends no token, as an unauthenticated process
// would. Exit status 0 when served, 1 when refused or unreachable (the
// reason on stderr), 2 for bad flags.
func xdsCheck(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("sidecar xds-check", flag.ContinueOnError)
	fs.SetOutput(stderr)
	node := fs.String("node-id", os.Getenv("MESHLET_NODE_ID"), "the xDS node ID to ask as (env MESHLET_NODE_ID)")
	addr := fs.String("xds-addr", cli.EnvOr("MESHLET_XDS_ADDR", sidecar.DefaultXDSAddress), "control plane ADS address host:port (env MESHLET_XDS_ADDR)")
	timeout := fs.Duration("timeout", 10*time.Second, "give up after this long")
	var creds xdsclient.Credentials
	xdsCredentialFlags(fs, &creds)
	if err := fs.Parse(args); err != nil || fs.NArg() != 0 || *node == "" {
		fmt.Fprintln(stderr, "usage: sidecar xds-check -node-id ID [-xds-addr host:port] [-xds-ca-file F] [-token-file F | -xds-insecure]")
		return 2
	}
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	res, err := xdsclient.Probe(ctx, *addr, creds, &core.Node{Id: *node})
	if err != nil {
		fmt.Fprintf(stderr, "xds-check: %s as node %s: not served: %v\n", *addr, *node, err)
		return 1
	}
	fmt.Fprintf(stdout, "xds-check: %s as node %s: served secrets %v; workload certificate %q; private key received: %t\n",
		*addr, *node, res.Secrets, res.SPIFFEID, res.PrivateKey)
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

// interceptCmd is `sidecar intercept [flags]`: the injected init container
// (root, NET_ADMIN and NET_RAW) installs the pod's transparent
// interception rules with it (intercept.Install), prints the resulting nat
// tables on stdout and logs each step on stderr. Exit status 0 when the
// rules are installed and the self-check passed (or was skipped, said in
// the log), 1 when installing or the self-check failed (the message names
// the cause), 2 for bad flags. -dry-run prints the rules (iptables-restore
// format, IPv4 then IPv6) without touching anything.
func interceptCmd(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("sidecar intercept", flag.ContinueOnError)
	fs.SetOutput(stderr)
	proxyUID := fs.Uint("proxy-uid", xds.SidecarUID, "the sidecar's uid: its connections are never redirected")
	outPort := fs.Int("outbound-port", xds.OutboundCapturePort, "redirect outbound TCP here (the sidecar's outbound capture port)")
	inPort := fs.Int("inbound-port", xds.InboundCapturePort, "redirect inbound TCP here (the sidecar's inbound capture port)")
	inbound := fs.String("inbound", cli.EnvOr("MESHLET_INBOUND", string(intercept.InboundAll)), "all: redirect every inbound port but the sidecar's and the excluded ones; none: intercept outbound only (env MESHLET_INBOUND)")
	exOutPorts := fs.String("exclude-outbound-ports", os.Getenv("MESHLET_EXCLUDE_OUTBOUND_PORTS"), "outbound destination ports not redirected, e.g. 5432,6379,7000-7010 (annotation meshlet.io/exclude-outbound-ports; env MESHLET_EXCLUDE_OUTBOUND_PORTS)")
	exOutCIDRs := fs.String("exclude-outbound-cidrs", os.Getenv("MESHLET_EXCLUDE_OUTBOUND_CIDRS"), "outbound destinations not redirected, IPv4 and IPv6, e.g. 10.0.0.0/8,fd00::/8 (annotation meshlet.io/exclude-outbound-cidrs; env MESHLET_EXCLUDE_OUTBOUND_CIDRS)")
	exInPorts := fs.String("exclude-inbound-ports", os.Getenv("MESHLET_EXCLUDE_INBOUND_PORTS"), "inbound ports not redirected, e.g. 9090 (annotation meshlet.io/exclude-inbound-ports; env MESHLET_EXCLUDE_INBOUND_PORTS)")
	exUIDs := fs.String("exclude-uids", os.Getenv("MESHLET_EXCLUDE_UIDS"), "uids whose outbound connections are not redirected, e.g. 1000,1001 (annotation meshlet.io/exclude-uids; env MESHLET_EXCLUDE_UIDS)")
	kubeAPI := fs.String("kube-api-servers", kubeAPIFromEnv(), "Kubernetes API server addresses ip:port whose connections are not redirected; default KUBERNETES_SERVICE_HOST:KUBERNETES_SERVICE_PORT, which the kubelet sets in every container")
	backend := fs.String("backend", cli.EnvOr("MESHLET_IPTABLES_BACKEND", string(intercept.BackendAuto)), "iptables backend: auto (detect), nft or legacy (env MESHLET_IPTABLES_BACKEND)")
	dir := fs.String("iptables-dir", "", "directory of iptables-nft-restore and the others (default: PATH, /usr/sbin, /sbin)")
	dryRun := fs.Bool("dry-run", false, "print the rules (iptables-restore format) and change nothing")
	check := fs.Bool("check", true, "after applying, verify that a test connection is really redirected (fails on the nft/legacy mismatch)")
	logger := cli.LogLevel(fs, stderr)
	if err := fs.Parse(args); err != nil {
		return 2
	}
	usage := func(err error) int {
		fmt.Fprintf(stderr, "sidecar intercept: %v\n", err)
		return 2
	}
	if fs.NArg() != 0 {
		return usage(fmt.Errorf("unexpected arguments %q", fs.Args()))
	}
	log, err := logger()
	if err != nil {
		return usage(err)
	}
	if *proxyUID > 1<<32-1 {
		return usage(fmt.Errorf("-proxy-uid %d: not a uid", *proxyUID))
	}
	cfg := intercept.Config{
		ProxyUID:     uint32(*proxyUID),
		OutboundPort: *outPort,
		InboundPort:  *inPort,
		Inbound:      intercept.InboundMode(*inbound),
	}
	if cfg.ExcludeOutboundPorts, err = intercept.ParsePorts(*exOutPorts); err != nil {
		return usage(fmt.Errorf("-exclude-outbound-ports: %w", err))
	}
	if cfg.ExcludeOutboundCIDRs, err = intercept.ParseCIDRs(*exOutCIDRs); err != nil {
		return usage(fmt.Errorf("-exclude-outbound-cidrs: %w", err))
	}
	if cfg.ExcludeInboundPorts, err = intercept.ParsePorts(*exInPorts); err != nil {
		return usage(fmt.Errorf("-exclude-inbound-ports: %w", err))
	}
	if cfg.ExcludeUIDs, err = intercept.ParseUIDs(*exUIDs); err != nil {
		return usage(fmt.Errorf("-exclude-uids: %w", err))
	}
	if cfg.KubeAPIServers, err = intercept.ParseAddrPorts(*kubeAPI); err != nil {
		return usage(fmt.Errorf("-kube-api-servers: %w", err))
	}
	if err := cfg.Validate(); err != nil {
		return usage(err)
	}
	be, err := intercept.ParseBackend(*backend)
	if err != nil {
		return usage(fmt.Errorf("-backend: %w", err))
	}
	if *dryRun {
		for _, f := range []intercept.Family{intercept.IPv4, intercept.IPv6} {
			rules, err := intercept.Rules(cfg, f)
			if err != nil {
				return usage(err)
			}
			tool := "iptables-restore"
			if f == intercept.IPv6 {
				tool = "ip6tables-restore"
			}
			fmt.Fprintf(stdout, "# meshlet: %s rules, for %s --noflush\n%s", f, tool, rules)
		}
		return 0
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	rep, err := intercept.Install(ctx, cfg, intercept.Options{Backend: be, Dir: *dir, SkipCheck: !*check, Logger: log})
	for _, fr := range rep.Families {
		if fr.Rules != "" {
			fmt.Fprintf(stdout, "# meshlet: %s nat table (%s backend)\n%s", fr.Family, rep.Detection.Backend, fr.Rules)
		}
	}
	if err != nil {
		fmt.Fprintf(stderr, "sidecar intercept: %v\n", err)
		return 1
	}
	return 0
}

// kubeAPIFromEnv returns "host:port" of the Kubernetes API server's
// Service from the variables the kubelet sets in every container, or "".
func kubeAPIFromEnv() string {
	host, port := os.Getenv("KUBERNETES_SERVICE_HOST"), os.Getenv("KUBERNETES_SERVICE_PORT")
	if host == "" || port == "" {
		return ""
	}
	return net.JoinHostPort(host, port)
}
