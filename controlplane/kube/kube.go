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
	toolscache "k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/client-go/tools/leaderelection"
	"k8s.io/client-go/tools/leaderelection/resourcelock"
	"k8s.io/client-go/tools/record"
	"k8s.io/client-go/util/flowcontrol"

	"github.com/meshlet/meshlet/controlplane/inject"
)

// Defaults for Config, matching deploy/kubernetes.
const (
	DefaultWebhookAddress    = ":9443"
	DefaultSecretName        = "meshlet-webhook-tls"
	DefaultServiceName       = "meshlet-controlplane"
	DefaultWebhookConfigName = "meshlet-injector"
	DefaultLeaseName         = "meshlet-registrar"
	// HealthPath is the webhook server's liveness path (the control plane
	// pod's livenessProbe, over HTTPS): 200 while the process serves.
	HealthPath = "/healthz"
	// ReadyPath is the webhook server's readiness path (the pod's
	// readinessProbe): 200 once the webhook's informer caches have synced
	// and Config.Ready says the rest of the control plane is ready (the
	// xDS server has its first Consul catalog); 503 naming what it waits
	// for until then. The Service sends admissions and xDS streams to
	// ready pods only.
	ReadyPath = "/readyz"
	// WebhookCacheWait bounds how long an admission request that arrives
	// before the webhook's Service cache has synced waits for it; then it
	// is answered 503 with Retry-After: 1, which the API server retries
	// within the webhook's timeout (10 s in deploy/kubernetes). Refusing
	// outright would fail the pod's creation; answering from a partial
	// cache could name its service wrongly.
	WebhookCacheWait = 2 * time.Second
)

// Config configures Run.
type Config struct {
	// RESTConfig reaches the API server (NewRESTConfig builds one). The
	// registrar's controller-runtime manager is built from it (Register
	// needs it), and Client when that is nil.
	RESTConfig *rest.Config
	// Client talks to the API server; built from RESTConfig when nil.
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
	// controlplane command). It runs in the leader only when LeaderElect,
	// afresh each leadership term.
	Register    bool
	LeaderElect bool
	LeaseName   string
	// RegistrarWorkers is how many pods the registrar reconciles at once;
	// DefaultRegistrarWorkers when 0.
	RegistrarWorkers int
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
	// Ready, if set, is the readiness of the rest of the control plane
	// (ReadyPath answers 503 with its reason while it is false): the xDS
	// server's Ready, true once the first Consul catalog has arrived.
	Ready func() (bool, string)
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

// NewRESTConfig returns the API server configuration of kubeconfig, or the
// in-cluster one when kubeconfig is empty, with the control plane's user
// agent and one rate limiter (ClientQPS, ClientBurst) shared by every
// client made from it.
func NewRESTConfig(kubeconfig string) (*rest.Config, error) {
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
	rc.RateLimiter = flowcontrol.NewTokenBucketRateLimiter(ClientQPS, ClientBurst)
	return rc, nil
}

// NewClient returns a client for kubeconfig, or the in-cluster
// configuration when kubeconfig is empty (NewRESTConfig).
func NewClient(kubeconfig string) (kubernetes.Interface, error) {
	rc, err := NewRESTConfig(kubeconfig)
	if err != nil {
		return nil, err
	}
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
		if cfg.RESTConfig == nil {
			return errors.New("kube: Config.Client or Config.RESTConfig is required")
		}
		c, err := kubernetes.NewForConfig(cfg.RESTConfig)
		if err != nil {
			return fmt.Errorf("kube: client: %w", err)
		}
		cfg.Client = c
	}
	var reg *Registrar
	if cfg.Register {
		if cfg.RESTConfig == nil {
			return errors.New("kube: Config.RESTConfig is required to register pods (Register)")
		}
		var err error
		if reg, err = NewRegistrar(RegistrarConfig{RESTConfig: cfg.RESTConfig, Consul: cfg.Consul, Workers: cfg.RegistrarWorkers, Logger: log}); err != nil {
			return err
		}
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

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	// The webhook reads Services in every replica (the registrar has
	// caches of its own, in the leader).
	all := informers.NewSharedInformerFactory(cfg.Client, 0)
	services := all.Core().V1().Services()
	sel := serviceSelector{lister: services.Lister()}
	caches := newCacheGate("the webhook's Service cache", services.Informer().HasSynced)
	broadcaster := record.NewBroadcaster(record.WithContext(ctx))
	broadcaster.StartRecordingToSink(&typedcorev1.EventSinkImpl{Interface: cfg.Client.CoreV1().Events("")})
	defer broadcaster.Shutdown()
	recorder := broadcaster.NewRecorder(scheme.Scheme, corev1.EventSource{Component: "meshlet-injector"})

	wh := inject.NewWebhook(inject.New(cfg.Injector), inject.WebhookOptions{
		Services: sel, Events: eventRecorder{recorder}, Logger: log, Registerer: cfg.Registerer,
	})
	mux := http.NewServeMux()
	mux.Handle(inject.Path, caches.gate(wh, WebhookCacheWait))
	mux.HandleFunc(HealthPath, func(w http.ResponseWriter, _ *http.Request) { io.WriteString(w, "ok\n") })
	mux.Handle(ReadyPath, readiness{caches: caches, ready: cfg.Ready})
	lis, err := net.Listen("tcp", cfg.WebhookAddress)
	if err != nil {
		return fmt.Errorf("kube: listen for the webhook on %s: %w", cfg.WebhookAddress, err)
	}
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second,
		TLSConfig: &tls.Config{GetCertificate: certs.GetCertificate, MinVersion: tls.VersionTLS12},
		ErrorLog:  slog.NewLogLogger(log.Handler(), slog.LevelDebug)}

	all.Start(ctx.Done())
	defer all.Shutdown() // after cancel: it waits for the informers to stop

	var wg sync.WaitGroup
	errc := make(chan error, 3)
	wg.Add(2)
	go func() {
		defer wg.Done()
		caches.run(ctx)
		if caches.synced() {
			log.Info("kube: the webhook's caches have synced; admitting pods")
		}
	}()
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
	// What one replica at a time does, afresh each term: keep the CA root
	// ConfigMap in every namespace, and register pods in Consul.
	roots := newCARootPublisher(cfg.Client, certs.CABundle, log)
	leader := func(ctx context.Context) {
		var lwg sync.WaitGroup
		lwg.Add(1)
		go func() {
			defer lwg.Done()
			roots.Run(ctx)
		}()
		if reg != nil {
			runRegistrar(ctx, reg, log)
		} else {
			<-ctx.Done()
		}
		lwg.Wait()
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		if !cfg.LeaderElect {
			leader(ctx)
			return
		}
		runLeader(ctx, leaderElection{client: cfg.Client, namespace: cfg.Namespace, name: cfg.LeaseName,
			identity: cfg.Identity, timing: defaultLeaderTiming()}, log, leader)
	}()
	var runErr error
	select {
	case <-ctx.Done():
	case runErr = <-errc:
	}
	cancel()
	sctx, scancel := context.WithTimeout(context.Background(), 5*time.Second)
	_ = srv.Shutdown(sctx)
	scancel()
	wg.Wait()
	return runErr
}

// runRegistrar runs reg until ctx is done, starting it again (a fresh
// manager) when a run fails — its caches did not sync, the API server was
// unreachable — after 1 s, doubling to 30 s.
func runRegistrar(ctx context.Context, reg *Registrar, log *slog.Logger) {
	backoff := time.Second
	for {
		err := reg.Run(ctx)
		if ctx.Err() != nil {
			return
		}
		log.Error("kube: registrar stopped; starting it again", "error", err, "after", backoff)
		t := time.NewTimer(backoff)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
		backoff = min(2*backoff, 30*time.Second)
	}
}

// leaderElection names the Lease runLeader campaigns for, and its timing.
type leaderElection struct {
	client                    kubernetes.Interface
	namespace, name, identity string
	timing                    leaderTiming
}

// leaderTiming is client-go leader election's: how long a lease lasts
// unrenewed, how long the leader tries to renew it before giving up, and
// how often it tries.
type leaderTiming struct {
	lease, renew, retry time.Duration
}

// defaultLeaderTiming is 15 s, 10 s, 2 s (client-go's and
// controller-runtime's defaults).
func defaultLeaderTiming() leaderTiming {
	return leaderTiming{lease: 15 * time.Second, renew: 10 * time.Second, retry: 2 * time.Second}
}

// runLeader runs term while this replica holds the Lease, once per
// leadership term, until ctx is done: campaigning again after losing it
// (client-go leaderelection, released when ctx is done). A term's ctx is
// cancelled when the lease is lost, and the next term starts only once
// the previous term returned, so two terms never overlap in a replica.
func runLeader(ctx context.Context, le leaderElection, log *slog.Logger, term func(context.Context)) {
	lock := &resourcelock.LeaseLock{
		LeaseMeta:  metav1.ObjectMeta{Name: le.name, Namespace: le.namespace},
		Client:     le.client.CoordinationV1(),
		LockConfig: resourcelock.ResourceLockConfig{Identity: le.identity},
	}
	lease := le.namespace + "/" + le.name
	// client-go calls OnStartedLeading in a goroutine it does not wait
	// for; this runner is the one goroutine that runs terms, one at a time.
	terms := make(chan context.Context)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			select {
			case <-ctx.Done():
				return
			case tctx := <-terms:
				term(tctx)
				log.Info("kube: leadership term over", "lease", lease, "identity", le.identity)
			}
		}
	}()
	defer wg.Wait()
	for ctx.Err() == nil {
		elector, err := leaderelection.NewLeaderElector(leaderelection.LeaderElectionConfig{
			Lock: lock, LeaseDuration: le.timing.lease, RenewDeadline: le.timing.renew, RetryPeriod: le.timing.retry,
			ReleaseOnCancel: true, Name: le.name,
			Callbacks: leaderelection.LeaderCallbacks{
				OnStartedLeading: func(tctx context.Context) {
					log.Info("kube: leading; running the registrar", "lease", lease, "identity", le.identity)
					select {
					case terms <- tctx:
					case <-tctx.Done():
					}
				},
				OnStoppedLeading: func() { log.Info("kube: not leading", "lease", lease, "identity", le.identity) },
				OnNewLeader: func(id string) {
					if id != le.identity {
						log.Info("kube: registrar leader", "identity", id)
					}
				},
			},
		})
		if err != nil {
			log.Error("kube: leader election", "error", err)
			return
		}
		elector.Run(ctx)
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

func (s serviceSelector) SelectingServices(ns string, podLabels map[string]string) ([]inject.SelectingService, error) {
	svcs, err := s.lister.Services(ns).List(labels.Everything())
	if err != nil {
		return nil, err
	}
	var out []inject.SelectingService
	for _, svc := range svcs {
		if selects(svc, podLabels) {
			out = append(out, inject.SelectingService{Name: svc.Name, Headless: svc.Spec.ClusterIP == corev1.ClusterIPNone})
		}
	}
	return out, nil
}

// selects reports whether Service svc selects pods labelled podLabels (a
// Service without a selector selects none: its endpoints are its own).
func selects(svc *corev1.Service, podLabels map[string]string) bool {
	return len(svc.Spec.Selector) > 0 && labels.SelectorFromSet(svc.Spec.Selector).Matches(labels.Set(podLabels))
}

// cacheGate holds admissions and readiness until informer caches have
// synced: a pod admitted from a partial Service cache could be given the
// wrong service name.
type cacheGate struct {
	what      string
	hasSynced []toolscache.InformerSynced
	done      chan struct{} // closed once synced
}

func newCacheGate(what string, hasSynced ...toolscache.InformerSynced) *cacheGate {
	return &cacheGate{what: what, hasSynced: hasSynced, done: make(chan struct{})}
}

// run waits for the caches until ctx is done.
func (g *cacheGate) run(ctx context.Context) {
	if toolscache.WaitForCacheSync(ctx.Done(), g.hasSynced...) {
		close(g.done)
	}
}

// synced reports whether the caches have synced.
func (g *cacheGate) synced() bool {
	select {
	case <-g.done:
		return true
	default:
		return false
	}
}

// gate serves next once the caches have synced. A request arriving before
// waits for them up to wait (or its own end); then it is answered 500
// with Retry-After: 1 and a message saying why: the API server's webhook
// client retries a 5xx that carries Retry-After (client-go's rest client)
// within the webhook's timeout, and should the caches still not be ready,
// the pod's creation fails with this message (failurePolicy Fail) rather
// than admitting it with a service named from a partial cache. 500 rather
// than 503: client-go keeps a 500's text in the error it reports.
func (g *cacheGate) gate(next http.Handler, wait time.Duration) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !g.synced() {
			t := time.NewTimer(wait)
			select {
			case <-g.done:
			case <-t.C:
			case <-r.Context().Done():
			}
			t.Stop()
		}
		if !g.synced() {
			w.Header().Set("Content-Type", "text/plain; charset=utf-8")
			w.Header().Set("Retry-After", "1")
			w.WriteHeader(http.StatusInternalServerError)
			fmt.Fprintf(w, "inject: caches not synced: %s is still loading after the control plane started; retry\n", g.what)
			return
		}
		next.ServeHTTP(w, r)
	})
}

// readiness serves ReadyPath: 200 once the caches have synced and ready
// (when set) says so, else 503 naming what is awaited.
type readiness struct {
	caches *cacheGate
	ready  func() (bool, string)
}

func (h readiness) ServeHTTP(w http.ResponseWriter, _ *http.Request) {
	var waiting []string
	if !h.caches.synced() {
		waiting = append(waiting, "waiting for "+h.caches.what+" to sync")
	}
	if h.ready != nil {
		if ok, why := h.ready(); !ok {
			waiting = append(waiting, why)
		}
	}
	if len(waiting) > 0 {
		http.Error(w, "not ready: "+strings.Join(waiting, "; "), http.StatusServiceUnavailable)
		return
	}
	io.WriteString(w, "ok\n")
}

// eventRecorder is inject.EventRecorder over client-go's recorder.
type eventRecorder struct{ r record.EventRecorder }

func (e eventRecorder) Skipped(ref *corev1.ObjectReference, reason inject.Skip, msg string) {
	e.r.Event(ref, corev1.EventTypeWarning, "MeshletInjectionSkipped", string(reason)+": "+msg)
}
