// Package kube is the control plane's Kubernetes side: the sidecar
// injection webhook's HTTPS server (controlplane/inject), its serving
// certificate, and the registration controller that writes injected pods
// into Consul. Kubernetes only ever feeds Consul: the xDS side reads
// Consul and never Kubernetes, so a pod and a VM are the same thing to
// translate.
package kube

import (
	"cmp"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
	typedcorev1 "k8s.io/client-go/kubernetes/typed/core/v1"
	listerscorev1 "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/client-go/tools/leaderelection"
	"k8s.io/client-go/tools/leaderelection/resourcelock"
	"k8s.io/client-go/tools/record"

	"github.com/meshlet/meshlet/controlplane/inject"
)

// Defaults for Config, matching deploy/kubernetes.
const (
	DefaultWebhookAddress    = ":9443"
	DefaultSecretName        = "meshlet-webhook-tls"
	DefaultServiceName       = "meshlet-controlplane"
	DefaultWebhookConfigName = "meshlet-injector"
	DefaultLeaseName         = "meshlet-registrar"
	// HealthPath is the webhook server's health path (the control plane
	// pod's probes, over HTTPS).
	HealthPath = "/healthz"
)

// Config configures Run.
type Config struct {
	// Client talks to the API server (NewClient builds one).
	Client kubernetes.Interface
	// Consul is the catalog the registrar writes to.
	Consul ConsulCatalog
	// Namespace is meshlet's own namespace (env POD_NAMESPACE in the
	// pod); inject.DefaultMeshNamespace when empty.
	Namespace string
	// Injector configures injection; its MeshNamespace is set to
	// Namespace, and NativeSidecars from NativeSidecars. An empty Image is
	// the control plane's own (its pod's "controlplane" container, found
	// by Identity in Namespace).
	Injector inject.Config
	// NativeSidecars is "true", "false" or "auto" (default): auto injects
	// native sidecars when the API server is 1.29 or later.
	NativeSidecars string
	// WebhookAddress is where the webhook serves HTTPS;
	// DefaultWebhookAddress when empty.
	WebhookAddress string
	// CertDir, when set, serves the webhook with tls.crt and tls.key from
	// there (cert-manager); else certificates are self-managed in the
	// SecretName Secret and written into WebhookConfigName's caBundle.
	CertDir           string
	SecretName        string
	ServiceName       string
	WebhookConfigName string
	// Register turns the registration controller on (default in the
	// controlplane command). It runs in the leader only when LeaderElect.
	Register    bool
	LeaderElect bool
	LeaseName   string
	// Identity names this replica in the lease (the pod's name).
	Identity string
	// Registerer takes the webhook's metrics; nil registers none.
	Registerer prometheus.Registerer
	Logger     *slog.Logger
	// WebhookReady, if set, is called with the webhook's bound address.
	WebhookReady func(net.Addr)
	// Certs are the serving certificates (NewServingCerts) when the caller
	// made them already (the control plane serves xDS with the same
	// ones); nil makes them here.
	Certs *ServingCerts
}

func (c *Config) setDefaults() {
	c.Namespace = cmp.Or(c.Namespace, inject.DefaultMeshNamespace)
	c.Injector.MeshNamespace = c.Namespace
	c.NativeSidecars = cmp.Or(c.NativeSidecars, "auto")
	c.WebhookAddress = cmp.Or(c.WebhookAddress, DefaultWebhookAddress)
	c.SecretName = cmp.Or(c.SecretName, DefaultSecretName)
	c.ServiceName = cmp.Or(c.ServiceName, DefaultServiceName)
	c.WebhookConfigName = cmp.Or(c.WebhookConfigName, DefaultWebhookConfigName)
	c.LeaseName = cmp.Or(c.LeaseName, DefaultLeaseName)
	if c.Identity == "" {
		c.Identity, _ = os.Hostname()
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
}

// Rate limits of the control plane's Kubernetes client (NewClient), shared
// by its informers, the webhook and the TokenReviews of sidecars'
// tokens: requests per second and burst.
const (
	ClientQPS   = 80
	ClientBurst = 160
)

// NewClient returns a client for kubeconfig, or the in-cluster
// configuration when kubeconfig is empty.
func NewClient(kubeconfig string) (kubernetes.Interface, error) {
	var rc *rest.Config
	var err error
	if kubeconfig == "" {
		rc, err = rest.InClusterConfig()
	} else {
		rc, err = clientcmd.BuildConfigFromFlags("", kubeconfig)
	}
	if err != nil {
		return nil, fmt.Errorf("kube: client configuration: %w", err)
	}
	rc.UserAgent = "meshlet-controlplane"
	// client-go's default (5 requests/s, bursts of 10) would take 200 s to
	// review the tokens of 1,000 sidecars reconnecting after a control
	// plane restart; istiod's client allows 80/s, bursts of 160.
	rc.QPS, rc.Burst = ClientQPS, ClientBurst
	c, err := kubernetes.NewForConfig(rc)
	if err != nil {
		return nil, fmt.Errorf("kube: client: %w", err)
	}
	return c, nil
}

// Run serves the webhook and, when configured, runs the registrar until
// ctx is done. Errors: the webhook address cannot be bound, its
// certificate cannot be made or read, or the API server is unreachable at
// start.
func Run(ctx context.Context, cfg Config) error {
	cfg.setDefaults()
	log := cfg.Logger
	if cfg.Client == nil {
		return errors.New("kube: Config.Client is required")
	}
	native, err := nativeSidecars(cfg.Client, cfg.NativeSidecars)
	if err != nil {
		return err
	}
	cfg.Injector.NativeSidecars = native
	if cfg.Injector.Image == "" {
		if cfg.Injector.Image, err = ownImage(ctx, cfg.Client, cfg.Namespace, cfg.Identity); err != nil {
			return err
		}
	}

	certs := cfg.Certs
	if certs == nil {
		if certs, err = NewServingCerts(ctx, cfg); err != nil {
			return err
		}
	}

	all := informers.NewSharedInformerFactory(cfg.Client, 0)
	services := all.Core().V1().Services()
	sel := serviceSelector{lister: services.Lister()}
	_ = services.Informer() // the webhook reads Services in every replica
	broadcaster := record.NewBroadcaster(record.WithContext(ctx))
	broadcaster.StartRecordingToSink(&typedcorev1.EventSinkImpl{Interface: cfg.Client.CoreV1().Events("")})
	defer broadcaster.Shutdown()
	recorder := broadcaster.NewRecorder(scheme.Scheme, corev1.EventSource{Component: "meshlet-injector"})

	wh := inject.NewWebhook(inject.New(cfg.Injector), inject.WebhookOptions{
		Services: sel, Events: eventRecorder{recorder}, Logger: log, Registerer: cfg.Registerer,
	})
	mux := http.NewServeMux()
	mux.Handle(inject.Path, wh)
	mux.HandleFunc(HealthPath, func(w http.ResponseWriter, _ *http.Request) { io.WriteString(w, "ok\n") })
	lis, err := net.Listen("tcp", cfg.WebhookAddress)
	if err != nil {
		return fmt.Errorf("kube: listen for the webhook on %s: %w", cfg.WebhookAddress, err)
	}
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second,
		TLSConfig: &tls.Config{GetCertificate: certs.GetCertificate, MinVersion: tls.VersionTLS12},
		ErrorLog:  slog.NewLogLogger(log.Handler(), slog.LevelDebug)}

	var reg *Registrar
	var podFactory informers.SharedInformerFactory
	if cfg.Register {
		podFactory = informers.NewSharedInformerFactoryWithOptions(cfg.Client, 0, informers.WithTweakListOptions(func(o *metav1.ListOptions) {
			o.LabelSelector = inject.LabelInjected + "=true"
		}))
		if reg, err = NewRegistrar(RegistrarConfig{Informers: all, PodInformers: podFactory, Consul: cfg.Consul, Logger: log}); err != nil {
			lis.Close()
			return err
		}
	}
	all.Start(ctx.Done())
	if podFactory != nil {
		podFactory.Start(ctx.Done())
	}
	defer all.Shutdown()
	if podFactory != nil {
		defer podFactory.Shutdown()
	}

	var wg sync.WaitGroup
	errc := make(chan error, 3)
	wg.Add(1)
	go func() {
		defer wg.Done()
		if err := srv.ServeTLS(lis, "", ""); err != nil && !errors.Is(err, http.ErrServerClosed) {
			errc <- fmt.Errorf("kube: serve the webhook: %w", err)
		}
	}()
	log.Info("kube: serving the injection webhook", "address", lis.Addr().String(), "native_sidecars", native,
		"image", cfg.Injector.Image, "certificates", certs.Source)
	if cfg.WebhookReady != nil {
		cfg.WebhookReady(lis.Addr())
	}
	if certs.run != nil {
		wg.Add(1)
		go func() {
			defer wg.Done()
			certs.run(ctx)
		}()
	}
	// What one replica at a time does: keep the CA root ConfigMap in
	// every namespace, and register pods in Consul.
	roots := newCARootPublisher(cfg.Client, certs.CABundle, log)
	leader := func(ctx context.Context) error {
		var lwg sync.WaitGroup
		lwg.Add(1)
		go func() {
			defer lwg.Done()
			roots.Run(ctx)
		}()
		defer lwg.Wait()
		if reg == nil {
			<-ctx.Done()
			return nil
		}
		return reg.Run(ctx)
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		if !cfg.LeaderElect {
			if err := leader(ctx); err != nil && ctx.Err() == nil {
				errc <- err
			}
			return
		}
		runLeader(ctx, cfg, log, leader)
	}()
	var runErr error
	select {
	case <-ctx.Done():
	case runErr = <-errc:
	}
	sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	_ = srv.Shutdown(sctx)
	cancel()
	wg.Wait()
	return runErr
}

// runLeader runs fn while this replica holds the lease, campaigning again
// after losing it, until ctx is done (client-go leaderelection with a Lease
// lock; 15 s lease, 10 s renew deadline, 2 s retry, its defaults).
func runLeader(ctx context.Context, cfg Config, log *slog.Logger, fn func(context.Context) error) {
	lock := &resourcelock.LeaseLock{
		LeaseMeta:  metav1.ObjectMeta{Name: cfg.LeaseName, Namespace: cfg.Namespace},
		Client:     cfg.Client.CoordinationV1(),
		LockConfig: resourcelock.ResourceLockConfig{Identity: cfg.Identity},
	}
	for ctx.Err() == nil {
		le, err := leaderelection.NewLeaderElector(leaderelection.LeaderElectionConfig{
			Lock: lock, LeaseDuration: 15 * time.Second, RenewDeadline: 10 * time.Second, RetryPeriod: 2 * time.Second,
			ReleaseOnCancel: true, Name: cfg.LeaseName,
			Callbacks: leaderelection.LeaderCallbacks{
				OnStartedLeading: func(lctx context.Context) {
					log.Info("kube: leading; running the registrar", "lease", cfg.Namespace+"/"+cfg.LeaseName, "identity", cfg.Identity)
					if err := fn(lctx); err != nil && lctx.Err() == nil {
						log.Error("kube: registrar stopped", "error", err)
					}
				},
				OnStoppedLeading: func() { log.Info("kube: not leading; registrar stopped", "identity", cfg.Identity) },
				OnNewLeader: func(id string) {
					if id != cfg.Identity {
						log.Info("kube: registrar leader", "identity", id)
					}
				},
			},
		})
		if err != nil {
			log.Error("kube: leader election", "error", err)
			return
		}
		le.Run(ctx)
	}
}

// nativeSidecars decides native sidecar injection: "true", "false", or
// "auto" (the API server's version is 1.29 or later, where the
// SidecarContainers feature is on by default).
func nativeSidecars(c kubernetes.Interface, mode string) (bool, error) {
	switch mode {
	case "true":
		return true, nil
	case "false":
		return false, nil
	case "auto":
	default:
		return false, fmt.Errorf("kube: native sidecars %q: want true, false or auto", mode)
	}
	v, err := c.Discovery().ServerVersion()
	if err != nil {
		return false, fmt.Errorf("kube: API server version: %w", err)
	}
	major, _ := strconv.Atoi(strings.TrimRight(v.Major, "+"))
	minor, _ := strconv.Atoi(strings.TrimRight(v.Minor, "+"))
	return major > 1 || major == 1 && minor >= 29, nil
}

// ownImage is the image of the control plane's own container (the
// Deployment's one image: the sidecar's binary is in it too), read from
// its pod (the downward API does not give images).
func ownImage(ctx context.Context, c kubernetes.Interface, ns, pod string) (string, error) {
	p, err := c.CoreV1().Pods(ns).Get(ctx, pod, metav1.GetOptions{})
	if err != nil {
		return "", fmt.Errorf("kube: the sidecar image is the control plane's own, but its pod %s/%s cannot be read (set -sidecar-image): %w", ns, pod, err)
	}
	for _, c := range p.Spec.Containers {
		if c.Name == "controlplane" {
			return c.Image, nil
		}
	}
	return p.Spec.Containers[0].Image, nil
}

// serviceSelector is inject.ServiceSelector over a Service lister.
type serviceSelector struct{ lister listerscorev1.ServiceLister }

func (s serviceSelector) SelectingServices(ns string, podLabels map[string]string) ([]string, error) {
	svcs, err := s.lister.Services(ns).List(labels.Everything())
	if err != nil {
		return nil, err
	}
	var out []string
	for _, svc := range svcs {
		if len(svc.Spec.Selector) == 0 {
			continue
		}
		if labels.SelectorFromSet(svc.Spec.Selector).Matches(labels.Set(podLabels)) {
			out = append(out, svc.Name)
		}
	}
	return out, nil
}

// eventRecorder is inject.EventRecorder over client-go's recorder.
type eventRecorder struct{ r record.EventRecorder }

func (e eventRecorder) Skipped(ref *corev1.ObjectReference, reason inject.Skip, msg string) {
	e.r.Event(ref, corev1.EventTypeWarning, "MeshletInjectionSkipped", string(reason)+": "+msg)
}
