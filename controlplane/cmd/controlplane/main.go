// Command controlplane serves meshlet's xDS configuration, built from Consul
// and policy files, to sidecars and proxyless gRPC clients.
//
//	controlplane [serve] [flags]   serve ADS (default) and the admin API
//	controlplane validate <dir>    check policy files and exit (1 on errors)
//	controlplane status [flags]    print proxies and rejected updates from the admin API;
//	                               exit 0 when none is rejected, 1 when some are,
//	                               2 when the admin API is unreachable
//	controlplane why [flags] <proxy-or-pod> <ip:port>
//	                               explain a connection from a proxy's application to an
//	                               address: interception, filter chain, route, authorization,
//	                               endpoints (exit 1 when the proxy is unknown)
//	controlplane grpc-bootstrap [flags]
//	                               print the xDS bootstrap of a proxyless gRPC client
//	                               (TLS channel credentials, JWT call credentials)
//	controlplane trace [flags] <trace-id>
//	                               print a trace from Jaeger's query API as a tree of
//	                               spans with durations (exit 1 when not found)
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/go-logr/logr"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/client-go/kubernetes"
	ctrllog "sigs.k8s.io/controller-runtime/pkg/log"

	"github.com/meshlet/meshlet/controlplane"
	"github.com/meshlet/meshlet/controlplane/admin"
	"github.com/meshlet/meshlet/controlplane/inject"
	"github.com/meshlet/meshlet/controlplane/kube"
	"github.com/meshlet/meshlet/controlplane/policy"
	"github.com/meshlet/meshlet/controlplane/traceview"
	"github.com/meshlet/meshlet/internal/cli"
	"github.com/meshlet/meshlet/xds"
)

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	cmd := "serve"
	if len(args) > 0 && (args[0] == "serve" || args[0] == "validate" || args[0] == "status" || args[0] == "trace" || args[0] == "why" || args[0] == "grpc-bootstrap") {
		cmd, args = args[0], args[1:]
	}
	switch cmd {
	case "validate":
		return validate(args, stdout, stderr)
	case "status":
		return admin.StatusCommand(context.Background(), args, stdout, stderr)
	case "why":
		return admin.WhyCommand(context.Background(), args, stdout, stderr)
	case "trace":
		return trace(args, stdout, stderr)
	case "grpc-bootstrap":
		return grpcBootstrap(args, stdout, stderr)
	default:
		return serve(args, stderr)
	}
}

// DefaultJaegerURL is Jaeger's query API on its default port.
const DefaultJaegerURL = "http://127.0.0.1:16686"

// trace prints one trace from Jaeger as an indented tree. The module-built
// Jaeger has no web UI; this is how traces are read without one.
func trace(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("controlplane trace", flag.ContinueOnError)
	fs.SetOutput(stderr)
	jaegerURL := fs.String("jaeger-url", cli.EnvOr("MESHLET_JAEGER_URL", DefaultJaegerURL), "Jaeger query API base URL (env MESHLET_JAEGER_URL)")
	timeout := fs.Duration("timeout", 10*time.Second, "how long to wait for Jaeger")
	wait := fs.Int("wait-spans", 0, "poll until the trace has at least this many spans (Jaeger ingests asynchronously); 0 fetches once")
	fs.Usage = func() {
		fmt.Fprintln(stderr, "usage: controlplane trace [-jaeger-url URL] [-wait-spans N] <trace-id>")
		fmt.Fprintln(stderr, "Prints the trace as a tree: service, span, duration, offset from the trace's start, kind and key tags.")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil || fs.NArg() != 1 {
		fs.Usage()
		return 2
	}
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	var (
		t   *traceview.Trace
		err error
	)
	if *wait > 0 {
		t, err = traceview.WaitTrace(ctx, *jaegerURL, fs.Arg(0), *wait)
	} else {
		t, err = traceview.Fetch(ctx, *jaegerURL, fs.Arg(0))
	}
	if err != nil {
		fmt.Fprintf(stderr, "controlplane trace: %v\n", err)
		return 1
	}
	if err := traceview.Render(stdout, t); err != nil {
		fmt.Fprintf(stderr, "controlplane trace: %v\n", err)
		return 1
	}
	return 0
}

// grpcBootstrap prints a proxyless gRPC client's xDS bootstrap
// (xds.GRPCBootstrap) for GRPC_XDS_BOOTSTRAP_CONFIG or a file named by
// GRPC_XDS_BOOTSTRAP.
func grpcBootstrap(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("controlplane grpc-bootstrap", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var b xds.GRPCBootstrap
	fs.StringVar(&b.Server, "xds-addr", controlplane.DefaultXDSAddress, "the control plane's ADS address as the client dials it")
	fs.StringVar(&b.NodeID, "node-id", "", "the client's xDS node ID (required)")
	fs.StringVar(&b.CAFile, "xds-ca-file", "", "CA bundle verifying the control plane (its -xds-tls-dir's ca.crt; in a pod "+xds.PodCAFile+")")
	fs.StringVar(&b.TokenFile, "token-file", "", "the client's JWT: a projected ServiceAccount token of audience "+xds.TokenAudience+", or a JWT the -consul-auth-method trusts")
	fs.BoolVar(&b.Insecure, "xds-insecure", false, "plaintext, no token (a control plane run with -xds-insecure)")
	fs.Usage = func() {
		fmt.Fprintln(stderr, "usage: controlplane grpc-bootstrap -node-id ID [-xds-addr host:port] -xds-ca-file F -token-file F")
		fmt.Fprintln(stderr, "Prints a grpc-go xDS bootstrap; run the client with "+xds.EnvGRPCCallCreds+"=true so it sends the token.")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil || fs.NArg() != 0 {
		fs.Usage()
		return 2
	}
	out, err := b.JSON()
	if err != nil {
		fmt.Fprintf(stderr, "controlplane grpc-bootstrap: %v\n", err)
		return 2
	}
	fmt.Fprintf(stdout, "%s\n", out)
	return 0
}

func validate(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("controlplane validate", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintln(stderr, "usage: controlplane validate <policy-dir>")
		fmt.Fprintln(stderr, "Checks every *.yaml/*.yml file in the directory; prints file:line: field: error and exits 1 on problems.")
	}
	if err := fs.Parse(args); err != nil || fs.NArg() != 1 {
		fs.Usage()
		return 2
	}
	dir := fs.Arg(0)
	if st, err := os.Stat(dir); err != nil || !st.IsDir() {
		fmt.Fprintf(stderr, "%s: not a directory\n", dir)
		return 1
	}
	set, err := policy.Load(dir)
	if err != nil {
		fmt.Fprintln(stderr, err)
		return 1
	}
	fmt.Fprintf(stdout, "%s: OK (%d file(s): %s)\n", dir, len(set.Files), set.Summary())
	return 0
}

func serve(args []string, stderr io.Writer) int {
	fs := flag.NewFlagSet("controlplane", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var cfg controlplane.Config
	fs.StringVar(&cfg.XDSAddress, "xds-addr", controlplane.DefaultXDSAddress, "host:port to serve ADS (gRPC) on")
	fs.StringVar(&cfg.ConsulAddress, "consul-addr", cli.EnvOr("CONSUL_HTTP_ADDR", controlplane.DefaultConsulAddress), "Consul agent HTTP address (env CONSUL_HTTP_ADDR)")
	fs.StringVar(&cfg.ConsulToken, "consul-token", os.Getenv("CONSUL_HTTP_TOKEN"), "the control plane's Consul ACL token (env CONSUL_HTTP_TOKEN; its rules: README, Security model)")
	fs.StringVar(&cfg.ConsulTokenFile, "consul-token-file", os.Getenv("CONSUL_HTTP_TOKEN_FILE"), "file holding the control plane's Consul ACL token, e.g. a mounted Secret (env CONSUL_HTTP_TOKEN_FILE)")
	fs.StringVar(&cfg.ConsulCAFile, "consul-ca-file", os.Getenv("CONSUL_CACERT"), "CA bundle verifying Consul's HTTPS API, with an https:// -consul-addr (env CONSUL_CACERT)")
	fs.StringVar(&cfg.ConsulAuthMethod, "consul-auth-method", "", "Consul auth method (type jwt or kubernetes) JWTs presented on ADS are logged in with for Consul ACL tokens, as consul-dataplane's login: proxyless gRPC clients and sidecars holding a JWT outside Kubernetes (default: with -kube, JWTs are ServiceAccount tokens checked with a TokenReview)")
	fs.BoolVar(&cfg.XDSInsecure, "xds-insecure", false, "serve ADS in plaintext WITHOUT authentication: any process reaching -xds-addr gets any service's config and private key (development only; sidecars need -xds-insecure too)")
	fs.StringVar(&cfg.XDSCertFile, "xds-cert-file", "", "serve ADS with this certificate (PEM; read again when it changes) instead of a self-issued one; with -xds-key-file")
	fs.StringVar(&cfg.XDSKeyFile, "xds-key-file", "", "the key of -xds-cert-file (PEM)")
	fs.StringVar(&cfg.XDSTLSDir, "xds-tls-dir", controlplane.DefaultXDSTLSDir, "outside Kubernetes, without -xds-cert-file: where the control plane keeps the CA and ADS serving certificate it issues itself (created at first start, renewed); sidecars verify ADS with its ca.crt (-xds-ca-file)")
	certNames := fs.String("xds-cert-names", "", "comma-separated DNS names or IP addresses the self-issued ADS certificate carries besides localhost, the host name, loopback and -xds-addr's host (the addresses sidecars on other machines dial)")
	fs.StringVar(&cfg.PolicyDir, "policy-dir", controlplane.DefaultPolicyDir, "directory of policy files (watched for changes)")
	fs.StringVar(&cfg.AdminAddress, "admin-addr", controlplane.DefaultAdminAddress, "host:port of the admin API (/ready, /status, /metrics; unauthenticated, keep it on loopback; port 0 picks one; empty turns it off)")
	fs.BoolVar(&cfg.AdminPprof, "admin-pprof", false, "serve Go profiles under /debug/pprof/ on the admin API")
	var collector policy.Collector
	fs.StringVar(&collector.Endpoint, "otlp-endpoint", os.Getenv("MESHLET_OTLP_ENDPOINT"), "OTLP collector sidecars export spans to when MeshDefaults.tracing names none: host:port for grpc, a URL for http (env MESHLET_OTLP_ENDPOINT; tracing is off when neither names one)")
	fs.StringVar(&collector.Protocol, "otlp-protocol", policy.CollectorGRPC, "OTLP protocol of -otlp-endpoint: grpc or http")
	var kc kube.Config
	kubeOn := fs.Bool("kube", false, "also run the Kubernetes side: the sidecar injection webhook and the registration of injected pods in Consul (see README, Kubernetes)")
	kubeconfig := fs.String("kubeconfig", os.Getenv("KUBECONFIG"), "with -kube: kubeconfig file (env KUBECONFIG); in-cluster configuration when empty")
	fs.StringVar(&kc.Namespace, "mesh-namespace", cli.EnvOr("POD_NAMESPACE", inject.DefaultMeshNamespace), "with -kube: meshlet's own namespace, never injected (env POD_NAMESPACE)")
	fs.StringVar(&kc.WebhookAddress, "webhook-addr", kube.DefaultWebhookAddress, "with -kube: where the injection webhook serves HTTPS ("+inject.Path+", "+kube.HealthPath+")")
	fs.StringVar(&kc.CertDir, "webhook-cert-dir", "", "with -kube: serve the webhook with tls.crt/tls.key from this directory (cert-manager); default: self-managed certificates in a Secret, caBundle patched")
	fs.StringVar(&kc.WebhookConfigName, "webhook-config", kube.DefaultWebhookConfigName, "with -kube: the MutatingWebhookConfiguration whose caBundle the self-managed CA goes into")
	fs.StringVar(&kc.ServiceName, "webhook-service", kube.DefaultServiceName, "with -kube: the webhook's Service (the certificate's DNS names)")
	fs.StringVar(&kc.Injector.Image, "sidecar-image", os.Getenv("MESHLET_SIDECAR_IMAGE"), "with -kube: image of the injected sidecar (env MESHLET_SIDECAR_IMAGE; default: the control plane's own image, read from its pod)")
	pullPolicy := fs.String("sidecar-pull-policy", "", "with -kube: imagePullPolicy of the injected sidecar (Always, IfNotPresent, Never; default Kubernetes')")
	fs.StringVar(&kc.Injector.XDSAddress, "sidecar-xds-addr", inject.DefaultXDSAddress, "with -kube: the ADS address injected sidecars dial")
	fs.StringVar(&kc.NativeSidecars, "native-sidecars", "auto", "with -kube: inject native sidecars (init containers with restartPolicy Always): true, false, or auto (API server 1.29 or later)")
	fs.BoolVar(&kc.Injector.TransparentByDefault, "transparent-proxy", true, "with -kube: intercept injected pods' traffic unless they set meshlet.io/transparent-proxy: \"false\" (an init container installs iptables rules); consul-k8s's default")
	names := fs.String("kube-service-names", string(inject.NamespacedNames), "with -kube: how a Kubernetes Service is named in Consul: namespaced (<service>.<namespace>: namespaces are boundaries) or flat (<service>: same-named Services of every namespace are one service, one identity; consul-k8s CE's default)")
	fs.BoolVar(&kc.Register, "register", true, "with -kube: register injected pods in Consul")
	fs.BoolVar(&kc.LeaderElect, "leader-elect", true, "with -kube: run the registration in one replica at a time (Lease "+kube.DefaultLeaseName+")")
	fs.StringVar(&kc.Identity, "identity", os.Getenv("POD_NAME"), "with -kube: this replica's name in the lease (env POD_NAME; default the host name)")
	logger := cli.LogLevel(fs, stderr)
	if err := fs.Parse(args); err != nil {
		return 2
	}
	var err error
	if cfg.Logger, err = logger(); err != nil {
		fmt.Fprintf(stderr, "controlplane: %v\n", err)
		return 2
	}
	if *kubeOn {
		kc.Injector.Names = inject.ServiceNames(*names)
		if err := kc.Injector.Names.Validate(); err != nil {
			fmt.Fprintf(stderr, "controlplane: -kube-service-names: %v\n", err)
			return 2
		}
		switch p := corev1.PullPolicy(*pullPolicy); p {
		case "", corev1.PullAlways, corev1.PullIfNotPresent, corev1.PullNever:
			kc.Injector.ImagePullPolicy = p
		default:
			fmt.Fprintf(stderr, "controlplane: -sidecar-pull-policy %q: want Always, IfNotPresent or Never\n", p)
			return 2
		}
		if kc.RESTConfig, err = kube.NewRESTConfig(*kubeconfig); err == nil {
			kc.Client, err = kubernetes.NewForConfig(kc.RESTConfig)
		}
		if err != nil {
			fmt.Fprintf(stderr, "controlplane: %v\n", err)
			return 2
		}
		// controller-runtime (the registrar) logs through a process-wide
		// logger of its own.
		ctrllog.SetLogger(logr.FromSlogHandler(cfg.Logger.Handler()))
		cfg.Kube = &kc
	}
	for _, n := range strings.Split(*certNames, ",") {
		if n = strings.TrimSpace(n); n != "" {
			cfg.XDSCertNames = append(cfg.XDSCertNames, n)
		}
	}
	if collector.Endpoint != "" {
		if err := collector.Validate(); err != nil {
			fmt.Fprintf(stderr, "controlplane: -otlp-endpoint: %v\n", err)
			return 2
		}
		cfg.TraceCollector = &collector
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := controlplane.Run(ctx, cfg); err != nil {
		cfg.Logger.Error("controlplane: exiting", "error", err)
		return 1
	}
	return 0
}
