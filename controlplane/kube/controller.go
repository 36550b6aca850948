package kube

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"time"

	"github.com/go-logr/logr"
	"github.com/hashicorp/consul/api"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/rest"
	"sigs.k8s.io/controller-runtime/pkg/builder"
	"sigs.k8s.io/controller-runtime/pkg/cache"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/controller"
	"sigs.k8s.io/controller-runtime/pkg/event"
	"sigs.k8s.io/controller-runtime/pkg/handler"
	"sigs.k8s.io/controller-runtime/pkg/manager"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"
	"sigs.k8s.io/controller-runtime/pkg/source"

	"github.com/meshlet/meshlet/controlplane/inject"
)

// RegistrarConfig configures a Registrar.
type RegistrarConfig struct {
	// RESTConfig reaches the API server (NewRESTConfig). Every Run builds
	// its own controller-runtime manager from it: caches of the injected
	// pods (inject.LabelInjected=true), Services and EndpointSlices, and
	// the controller.
	RESTConfig *rest.Config
	// Consul is the catalog to write to.
	Consul ConsulCatalog
	// Workers is how many pods are reconciled at once (one pod is never
	// reconciled by two at a time); DefaultRegistrarWorkers when 0.
	Workers int
	// Resync is how often every registration the registrar owns is checked
	// against the pods and against Consul (stale ones removed, missing
	// ones written again); DefaultResync when 0.
	Resync time.Duration
	// CacheSyncTimeout bounds the wait for the caches at the start of a
	// Run; DefaultCacheSyncTimeout when 0. Run then fails, and the caller
	// (runRegistrar) tries again with a fresh manager.
	CacheSyncTimeout time.Duration
	// Logger defaults to slog.Default().
	Logger *slog.Logger
}

// Defaults of RegistrarConfig.
const (
	DefaultResync           = 5 * time.Minute
	DefaultRegistrarWorkers = 4
	DefaultCacheSyncTimeout = 2 * time.Minute
	// RegistrarControllerName names the controller in controller-runtime's
	// logs and metrics.
	RegistrarControllerName = "meshlet-registrar"
)

// Registrar registers injected pods in Consul (the consul-k8s endpoints
// controller's model): each pod with an IP becomes a service instance and
// a connect-proxy, whose kubernetes-readiness checks follow the pod's Ready
// condition and its EndpointSlices' serving condition; a pod deleted,
// terminating (its deletion timestamp, or an EndpointSlice marking its
// endpoint terminating) or finished is deregistered. Pods that no Service
// selects (Jobs, clients) are registered too, as client-only proxies when
// they have no port (Register).
//
// It runs on sigs.k8s.io/controller-runtime: each Run is one leadership
// term with a manager of its own (caches, work queue, Workers reconciling,
// the resync), so nothing of an earlier term — a shut-down queue, what an
// earlier term believed Consul held — is carried into the next one. It
// must run in one replica at a time (leader election: see Run in kube.go).
type Registrar struct {
	cfg RegistrarConfig
	log *slog.Logger
}

// NewRegistrar returns a Registrar; Run starts it.
func NewRegistrar(cfg RegistrarConfig) (*Registrar, error) {
	if cfg.RESTConfig == nil || cfg.Consul == nil {
		return nil, errors.New("kube: RegistrarConfig needs RESTConfig and Consul")
	}
	if cfg.Resync <= 0 {
		cfg.Resync = DefaultResync
	}
	if cfg.Workers <= 0 {
		cfg.Workers = DefaultRegistrarWorkers
	}
	if cfg.CacheSyncTimeout <= 0 {
		cfg.CacheSyncTimeout = DefaultCacheSyncTimeout
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	return &Registrar{cfg: cfg, log: cfg.Logger}, nil
}

// podServiceField indexes the cached pods by the service of their
// injection record (a Service's change reaches the pods registered under
// its name).
const podServiceField = "meshlet.io/service"

// Run runs one term until ctx is done: a fresh controller-runtime manager
// whose caches (injected pods, Services, EndpointSlices) must sync before
// anything is written; then the stale registrations the registrar owns are
// removed (pods gone while no replica led), pods are registered and
// deregistered as they change by Workers at once (Consul errors retried
// with the controller's backoff, 5 ms doubling to 1000 s), and everything
// is checked again every Resync. It returns nil when ctx is done, or why
// the term could not run (the caches did not sync in CacheSyncTimeout,
// the API server cannot be reached). Run may be called again after it
// returns: each call starts from nothing.
func (r *Registrar) Run(ctx context.Context) error {
	noMetrics, skipNameValidation := "0", true
	shutdown := 10 * time.Second
	mgr, err := manager.New(r.cfg.RESTConfig, manager.Options{
		Logger: logr.FromSlogHandler(r.log.Handler()),
		// The control plane serves its own metrics and probes.
		Metrics:                 metricsserver.Options{BindAddress: noMetrics},
		GracefulShutdownTimeout: &shutdown,
		Cache: cache.Options{
			ByObject: map[client.Object]cache.ByObject{
				&corev1.Pod{}: {Label: labels.SelectorFromSet(labels.Set{inject.LabelInjected: "true"})},
			},
			DefaultTransform: cache.TransformStripManagedFields(),
		},
	})
	if err != nil {
		return fmt.Errorf("kube: registrar: manager: %w", err)
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	rec := newReconciler(mgr.GetCache(), r.cfg.Consul, r.log)
	if err := mgr.GetFieldIndexer().IndexField(ctx, &corev1.Pod{}, podServiceField, podServiceIndex); err != nil {
		return fmt.Errorf("kube: registrar: pod index: %w", err)
	}
	// resync → the queue: pods whose registration went missing in Consul.
	requeue := make(chan event.GenericEvent)
	err = builder.ControllerManagedBy(mgr).
		Named(RegistrarControllerName).
		For(&corev1.Pod{}).
		Watches(&corev1.Service{}, handler.EnqueueRequestsFromMapFunc(rec.servicePods)).
		Watches(&discoveryv1.EndpointSlice{}, handler.EnqueueRequestsFromMapFunc(slicePods)).
		WatchesRawSource(source.Channel(requeue, &handler.EnqueueRequestForObject{})).
		WithOptions(controller.Options{
			MaxConcurrentReconciles: r.cfg.Workers,
			CacheSyncTimeout:        r.cfg.CacheSyncTimeout,
			// One controller per term: the name is taken again.
			SkipNameValidation: &skipNameValidation,
		}).
		Complete(rec)
	if err != nil {
		return fmt.Errorf("kube: registrar: controller: %w", err)
	}
	err = mgr.Add(manager.RunnableFunc(func(ctx context.Context) error {
		if !mgr.GetCache().WaitForCacheSync(ctx) {
			return nil // stopping, or the controller reports the timeout
		}
		t := time.NewTicker(r.cfg.Resync)
		defer t.Stop()
		for {
			rec.resync(ctx, requeue)
			select {
			case <-ctx.Done():
				return nil
			case <-t.C:
			}
		}
	}))
	if err != nil {
		return fmt.Errorf("kube: registrar: resync: %w", err)
	}
	r.log.Info("kube: registrar starting", "workers", r.cfg.Workers)
	if err := mgr.Start(ctx); err != nil {
		return fmt.Errorf("kube: registrar: %w", err)
	}
	return nil
}

// podServiceIndex is podServiceField's index function.
func podServiceIndex(o client.Object) []string {
	pod, ok := o.(*corev1.Pod)
	if !ok {
		return nil
	}
	rec, has, err := inject.ParseRecord(pod)
	if !has || err != nil || rec.Service == "" {
		return nil
	}
	return []string{rec.Service}
}

// slicePods maps an EndpointSlice to the pods it lists (for an update,
// controller-runtime maps the old slice too: a pod leaving a slice is
// reconciled).
func slicePods(_ context.Context, o client.Object) []reconcile.Request {
	es, ok := o.(*discoveryv1.EndpointSlice)
	if !ok {
		return nil
	}
	var out []reconcile.Request
	for _, ep := range es.Endpoints {
		if ref := ep.TargetRef; ref != nil && ref.Kind == "Pod" {
			out = append(out, reconcile.Request{NamespacedName: types.NamespacedName{Namespace: es.Namespace, Name: ref.Name}})
		}
	}
	return out
}

// reconciler is one term's controller state: what it wrote to Consul,
// by pod. Nothing outlives the term.
type reconciler struct {
	reader client.Reader
	consul ConsulCatalog
	log    *slog.Logger

	mu         sync.Mutex                          // guards registered
	registered map[types.NamespacedName]registered // by pod
}

var _ reconcile.Reconciler = (*reconciler)(nil)

// registered is what was last written for a pod, and when.
type registered struct {
	node, instanceID, proxyID string
	hash                      string
	at                        time.Time
}

func newReconciler(reader client.Reader, consul ConsulCatalog, log *slog.Logger) *reconciler {
	return &reconciler{reader: reader, consul: consul, log: log, registered: map[types.NamespacedName]registered{}}
}

// servicePods maps a Service to the injected pods of its namespace
// registered under its name (its meta, its virtual addresses) and, for a
// headless Service, to the pods it selects (dialled directly:
// Registration.SetDialedDirectly).
func (r *reconciler) servicePods(ctx context.Context, o client.Object) []reconcile.Request {
	var pods corev1.PodList
	if err := r.reader.List(ctx, &pods, client.InNamespace(o.GetNamespace()), client.MatchingFields{podServiceField: o.GetName()}); err != nil {
		r.log.Warn("kube: registrar: cannot list the pods of a Service", "service", o.GetNamespace()+"/"+o.GetName(), "error", err)
		return nil
	}
	out := make([]reconcile.Request, 0, len(pods.Items))
	for _, p := range pods.Items {
		out = append(out, reconcile.Request{NamespacedName: types.NamespacedName{Namespace: p.Namespace, Name: p.Name}})
	}
	if svc, ok := o.(*corev1.Service); ok && svc.Spec.ClusterIP == corev1.ClusterIPNone && len(svc.Spec.Selector) > 0 {
		var selected corev1.PodList
		if err := r.reader.List(ctx, &selected, client.InNamespace(svc.Namespace), client.MatchingLabels(svc.Spec.Selector)); err != nil {
			r.log.Warn("kube: registrar: cannot list the pods a headless Service selects", "service", svc.Namespace+"/"+svc.Name, "error", err)
			return out
		}
		for _, p := range selected.Items {
			if req := (reconcile.Request{NamespacedName: types.NamespacedName{Namespace: p.Namespace, Name: p.Name}}); !slices.Contains(out, req) {
				out = append(out, req)
			}
		}
	}
	return out
}

// Reconcile brings Consul to what pod req should have. An error (Consul
// refused or is unreachable) requeues it with the controller's backoff.
func (r *reconciler) Reconcile(ctx context.Context, req reconcile.Request) (reconcile.Result, error) {
	key := req.NamespacedName
	var want Registration
	ok := false
	var pod corev1.Pod
	err := r.reader.Get(ctx, req.NamespacedName, &pod)
	switch {
	case apierrors.IsNotFound(err):
	case err != nil:
		return reconcile.Result{}, fmt.Errorf("kube: registrar: pod %s: %w", key.String(), err)
	default:
		if want, ok, err = r.desired(ctx, &pod); err != nil {
			return reconcile.Result{}, err
		}
	}
	r.mu.Lock()
	have, had := r.registered[key]
	r.mu.Unlock()
	if !ok {
		if !had {
			return reconcile.Result{}, nil
		}
		if err := r.deregister(ctx, have); err != nil {
			return reconcile.Result{}, err
		}
		r.mu.Lock()
		delete(r.registered, key)
		r.mu.Unlock()
		r.log.Info("kube: deregistered a pod from consul", "pod", key.String(), "service", have.instanceID)
		return reconcile.Result{}, nil
	}
	h := hash(want)
	if had && have.hash == h {
		return reconcile.Result{}, nil
	}
	if had && (have.node != want.Instance.Node || have.instanceID != want.Instance.Service.ID) {
		if err := r.deregister(ctx, have); err != nil {
			return reconcile.Result{}, err
		}
	}
	wo := (&api.WriteOptions{}).WithContext(ctx)
	// The instance first: the proxy's health includes its destination's.
	for _, reg := range []*api.CatalogRegistration{want.Instance, want.Proxy} {
		if _, err := r.consul.Register(reg, wo); err != nil {
			return reconcile.Result{}, fmt.Errorf("kube: register %s: %w", reg.Service.ID, aclNamed(err, "registering "+reg.Service.ID+" on node "+reg.Node))
		}
	}
	r.mu.Lock()
	r.registered[key] = registered{node: want.Instance.Node, instanceID: want.Instance.Service.ID, proxyID: want.Proxy.Service.ID, hash: h, at: time.Now()}
	r.mu.Unlock()
	r.log.Info("kube: registered a pod in consul", "pod", key.String(), "service", want.Instance.Service.Service,
		"address", want.Instance.Service.Address, "check", want.Instance.Check.Status)
	return reconcile.Result{}, nil
}

// desired is the registration pod should have, if any: its injection
// record, the Service of the record's name and that Service's
// EndpointSlices, from the term's caches.
func (r *reconciler) desired(ctx context.Context, pod *corev1.Pod) (Registration, bool, error) {
	rec, has, err := inject.ParseRecord(pod)
	if err != nil {
		r.log.Warn("kube: registrar: pod has an unreadable injection record; not registered", "pod", pod.Namespace+"/"+pod.Name, "error", err)
	}
	if !has || err != nil {
		return Registration{}, false, nil
	}
	var svc *corev1.Service
	var s corev1.Service
	switch err := r.reader.Get(ctx, types.NamespacedName{Namespace: pod.Namespace, Name: rec.Service}, &s); {
	case err == nil:
		svc = &s
	case !apierrors.IsNotFound(err):
		return Registration{}, false, fmt.Errorf("kube: registrar: service %s/%s: %w", pod.Namespace, rec.Service, err)
	}
	var eps discoveryv1.EndpointSliceList
	if err := r.reader.List(ctx, &eps, client.InNamespace(pod.Namespace),
		client.MatchingLabels{discoveryv1.LabelServiceName: rec.Service}); err != nil {
		return Registration{}, false, fmt.Errorf("kube: registrar: endpointslices of %s/%s: %w", pod.Namespace, rec.Service, err)
	}
	reg, ok := Register(pod, rec, svc, eps.Items)
	if ok {
		var svcs corev1.ServiceList
		if err := r.reader.List(ctx, &svcs, client.InNamespace(pod.Namespace)); err != nil {
			return Registration{}, false, fmt.Errorf("kube: registrar: services of %s: %w", pod.Namespace, err)
		}
		// The instance's own ports: its app port and its Service's targets.
		own := []int{rec.Port}
		if svc != nil {
			for _, p := range resolvePorts(svc, pod) {
				own = append(own, p.target)
			}
		}
		dialed, extra := false, []int(nil)
		for i := range svcs.Items {
			if s := &svcs.Items[i]; s.Name != rec.Service && s.Spec.ClusterIP == corev1.ClusterIPNone && selects(s, pod.Labels) {
				dialed = true
				for _, p := range resolvePorts(s, pod) {
					if !slices.Contains(own, p.target) && !slices.Contains(extra, p.target) {
						extra = append(extra, p.target)
					}
				}
			}
		}
		if dialed {
			reg.SetDialedDirectly(extra)
		}
	}
	return reg, ok, nil
}

func (r *reconciler) deregister(ctx context.Context, have registered) error {
	wo := (&api.WriteOptions{}).WithContext(ctx)
	for _, id := range []string{have.proxyID, have.instanceID} {
		if _, err := r.consul.Deregister(&api.CatalogDeregistration{Node: have.node, ServiceID: id}, wo); err != nil {
			return fmt.Errorf("kube: deregister %s: %w", id, aclNamed(err, "deregistering "+id+" from node "+have.node))
		}
	}
	return nil
}

// resync compares Consul with the pods: it removes the registrations this
// registrar owns (meta managed-by) whose pod is gone, was replaced
// (another UID) or should not be registered any more (terminating,
// finished), including those an earlier leader wrote; and it sends to
// requeue the pods this term registered whose registration is no longer
// in Consul (removed by hand, a Consul agent that lost its state), to be
// written again.
func (r *reconciler) resync(ctx context.Context, requeue chan<- event.GenericEvent) {
	listed := time.Now()
	nodes, _, err := r.consul.Nodes((&api.QueryOptions{NodeMeta: map[string]string{MetaSyntheticNode: "true"}}).WithContext(ctx))
	if err != nil {
		r.log.Warn("kube: registrar: resync: cannot list consul nodes", "error", err)
		return
	}
	present := map[[2]string]bool{} // node, service ID
	for _, n := range nodes {
		list, _, err := r.consul.NodeServiceList(n.Node, (&api.QueryOptions{}).WithContext(ctx))
		if err != nil {
			r.log.Warn("kube: registrar: resync: cannot list a consul node's services", "node", n.Node, "error", err)
			return // not knowing what is there, remove and rewrite nothing
		}
		if list == nil {
			continue
		}
		for _, s := range list.Services {
			present[[2]string{n.Node, s.ID}] = true
			if s.Meta[MetaManagedBy] != ManagedBy || r.wanted(ctx, n.Node, s) {
				continue
			}
			wo := (&api.WriteOptions{}).WithContext(ctx)
			if _, err := r.consul.Deregister(&api.CatalogDeregistration{Node: n.Node, ServiceID: s.ID}, wo); err != nil {
				r.log.Warn("kube: registrar: resync: deregister failed", "service", s.ID,
					"error", aclNamed(err, "deregistering "+s.ID+" from node "+n.Node))
				continue
			}
			r.log.Info("kube: removed a stale consul registration", "service", s.ID, "node", n.Node,
				"pod", s.Meta[MetaNamespace]+"/"+s.Meta[MetaPodName])
		}
	}
	var missing []types.NamespacedName
	r.mu.Lock()
	for key, have := range r.registered {
		if have.at.After(listed) || present[[2]string{have.node, have.instanceID}] && present[[2]string{have.node, have.proxyID}] {
			continue // written since the listing began, or there
		}
		// Forget it: the next reconcile writes it again.
		delete(r.registered, key)
		missing = append(missing, key)
	}
	r.mu.Unlock()
	for _, nn := range missing {
		r.log.Info("kube: a pod's consul registration went missing; registering it again", "pod", nn.String())
		pod := &corev1.Pod{}
		pod.Namespace, pod.Name = nn.Namespace, nn.Name
		select {
		case requeue <- event.GenericEvent{Object: pod}:
		case <-ctx.Done():
			return
		}
	}
}

// wanted reports whether service s on node is what a current pod should
// have registered.
func (r *reconciler) wanted(ctx context.Context, node string, s *api.AgentService) bool {
	var pod corev1.Pod
	switch err := r.reader.Get(ctx, types.NamespacedName{Namespace: s.Meta[MetaNamespace], Name: s.Meta[MetaPodName]}, &pod); {
	case apierrors.IsNotFound(err):
		return false
	case err != nil:
		return true // not knowing, keep it: the pod's reconcile decides
	case string(pod.UID) != s.Meta[MetaPodUID]:
		return false
	}
	want, ok, err := r.desired(ctx, &pod)
	if err != nil {
		return true // not knowing, keep it: the pod's reconcile decides
	}
	return ok && want.Instance.Node == node && (s.ID == want.Instance.Service.ID || s.ID == want.Proxy.Service.ID)
}
