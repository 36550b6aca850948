package kube

import (
	"cmp"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"sync"
	"time"

	"github.com/hashicorp/consul/api"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/client-go/informers"
	listerscorev1 "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/util/workqueue"

	"github.com/meshlet/meshlet/controlplane/consul"
	"github.com/meshlet/meshlet/controlplane/inject"
	"github.com/meshlet/meshlet/xds"
)

// Consul names the registrar writes, consul-k8s's endpoints controller's
// own where it has one, so that Consul users find what they know.
const (
	// ManagedBy is the "managed-by" meta value of every service instance
	// the registrar owns; a resync removes those whose pod is gone.
	ManagedBy = "meshlet-kube-registrar"
	// MetaNamespace, MetaPodName, MetaPodUID and MetaManagedBy are the
	// service meta keys (consul-k8s: k8s-namespace, pod-name, pod-uid,
	// managed-by); MetaService is the Kubernetes Service of the same name,
	// when there is one.
	MetaNamespace = consul.MetaK8sNamespace
	MetaPodName   = consul.MetaPodName
	MetaPodUID    = consul.MetaPodUID
	MetaManagedBy = "managed-by"
	MetaService   = "k8s-service-name"
	// NodeSuffix makes the synthetic Consul node of a Kubernetes node:
	// "<k8s node>-virtual" (consul-k8s), with node meta synthetic-node=true.
	NodeSuffix = "-virtual"
	// MetaSyntheticNode marks those nodes.
	MetaSyntheticNode = "synthetic-node"
	// CheckType is the type of the check that follows the pod's Ready
	// condition (consul-k8s: kubernetes-readiness).
	CheckType = "kubernetes-readiness"
	// CheckName is its name.
	CheckName = "Kubernetes Readiness Check"
)

// Registration is what the registrar writes to Consul for one pod: its
// service instance and its sidecar proxy (connect-proxy), each with the
// readiness check, on the synthetic node of its Kubernetes node.
type Registration struct {
	Instance, Proxy *api.CatalogRegistration
}

// Register builds the Registration of an injected pod, with the Service
// of the same name as rec.Service when svc is not nil. The IDs are
// xds.InstanceID and xds.ProxyID of the pod's name and service. A pod
// without an IP yet, terminating, or terminated has none (ok false).
func Register(pod *corev1.Pod, rec inject.Record, svc *corev1.Service) (Registration, bool) {
	if pod.Status.PodIP == "" || pod.DeletionTimestamp != nil || pod.Spec.NodeName == "" ||
		pod.Status.Phase == corev1.PodSucceeded || pod.Status.Phase == corev1.PodFailed {
		return Registration{}, false
	}
	node := pod.Spec.NodeName + NodeSuffix
	meta := map[string]string{
		MetaNamespace: pod.Namespace,
		MetaPodName:   pod.Name,
		MetaPodUID:    string(pod.UID),
		MetaManagedBy: ManagedBy,
	}
	tagged := map[string]api.ServiceAddress{}
	if svc != nil {
		meta[MetaService] = svc.Name
		if ip := svc.Spec.ClusterIP; ip != "" && ip != corev1.ClusterIPNone && len(svc.Spec.Ports) > 0 {
			tagged[consul.VirtualTaggedAddress] = api.ServiceAddress{Address: ip, Port: int(svc.Spec.Ports[0].Port)}
		}
	}
	proxyMeta := maps.Clone(meta)
	for key, v := range map[string]string{
		consul.MetaExcludeOutboundPorts: rec.Exclusions.OutboundPorts, consul.MetaExcludeOutboundCIDRs: rec.Exclusions.OutboundCIDRs,
		consul.MetaExcludeInboundPorts: rec.Exclusions.InboundPorts, consul.MetaExcludeUIDs: rec.Exclusions.UIDs,
	} {
		if v != "" {
			proxyMeta[key] = v
		}
	}
	status, output := api.HealthCritical, "Pod is not Ready"
	for _, c := range pod.Status.Conditions {
		if c.Type == corev1.PodReady && c.Status == corev1.ConditionTrue {
			status, output = api.HealthPassing, "Kubernetes health checks passing"
		} else if c.Type == corev1.PodReady && c.Message != "" {
			output = "Pod is not Ready: " + c.Message
		}
	}
	name := cmp.Or(rec.ConsulService, rec.Service) // records before namespaced names had only Service
	instanceID, proxyID := xds.InstanceID(pod.Name, name), xds.ProxyID(pod.Name, name)
	check := func(serviceID string) *api.AgentCheck {
		return &api.AgentCheck{
			Node: node, CheckID: pod.Namespace + "/" + serviceID, Name: CheckName, Type: CheckType,
			Status: status, ServiceID: serviceID, Output: output,
		}
	}
	nodeMeta := map[string]string{MetaSyntheticNode: "true"}
	var ups []api.Upstream
	for _, u := range rec.Upstreams {
		ups = append(ups, api.Upstream{DestinationType: api.UpstreamDestTypeService, DestinationName: u.Service,
			LocalBindAddress: "127.0.0.1", LocalBindPort: u.LocalPort})
	}
	return Registration{
		Instance: &api.CatalogRegistration{
			Node: node, Address: "127.0.0.1", NodeMeta: nodeMeta, SkipNodeUpdate: true,
			Service: &api.AgentService{
				ID: instanceID, Service: name, Address: pod.Status.PodIP, Port: rec.Port,
				Meta: meta, TaggedAddresses: tagged,
			},
			Check: check(instanceID),
		},
		Proxy: &api.CatalogRegistration{
			Node: node, Address: "127.0.0.1", NodeMeta: nodeMeta, SkipNodeUpdate: true,
			Service: &api.AgentService{
				Kind: api.ServiceKindConnectProxy, ID: proxyID, Service: name + "-sidecar-proxy",
				Address: pod.Status.PodIP, Port: rec.PublicPort, Meta: proxyMeta, TaggedAddresses: tagged,
				Proxy: proxyConfig(rec, instanceID, ups),
			},
			Check: check(proxyID),
		},
	}, true
}

// proxyConfig is the connect-proxy's Proxy block: its destination, the app
// on loopback, the explicit upstreams, and Consul's transparent mode
// (outbound listener port xds.OutboundCapturePort) when the pod's traffic is
// intercepted.
func proxyConfig(rec inject.Record, instanceID string, ups []api.Upstream) *api.AgentServiceConnectProxyConfig {
	pc := &api.AgentServiceConnectProxyConfig{
		DestinationServiceName: cmp.Or(rec.ConsulService, rec.Service), DestinationServiceID: instanceID,
		LocalServiceAddress: "127.0.0.1", LocalServicePort: rec.Port, Upstreams: ups,
	}
	if rec.Transparent {
		pc.Mode = api.ProxyModeTransparent
		pc.TransparentProxy = &api.TransparentProxyConfig{OutboundListenerPort: xds.OutboundCapturePort}
	}
	return pc
}

// ConsulCatalog is the part of Consul's catalog API the registrar uses
// (*api.Catalog).
type ConsulCatalog interface {
	Register(reg *api.CatalogRegistration, q *api.WriteOptions) (*api.WriteMeta, error)
	Deregister(dereg *api.CatalogDeregistration, q *api.WriteOptions) (*api.WriteMeta, error)
	Nodes(q *api.QueryOptions) ([]*api.Node, *api.QueryMeta, error)
	NodeServiceList(node string, q *api.QueryOptions) (*api.CatalogNodeServiceList, *api.QueryMeta, error)
}

var _ ConsulCatalog = (*api.Catalog)(nil)

// RegistrarConfig configures a Registrar.
type RegistrarConfig struct {
	// Informers is a factory over every namespace; the registrar adds its
	// Service and EndpointSlice informers to it. Pods are watched through
	// PodInformers, a factory restricted to injected pods
	// (inject.LabelInjected=true).
	Informers, PodInformers informers.SharedInformerFactory
	// Consul is the catalog to write to.
	Consul ConsulCatalog
	// Resync is how often every registration the registrar owns is checked
	// against the pods (stale ones removed); DefaultResync when 0.
	Resync time.Duration
	// Logger defaults to slog.Default().
	Logger *slog.Logger
}

// DefaultResync is RegistrarConfig.Resync's default.
const DefaultResync = 5 * time.Minute

// Registrar registers injected pods in Consul (the consul-k8s endpoints
// controller's model): each pod with an IP becomes a service instance and
// a connect-proxy, whose kubernetes-readiness checks follow the pod's Ready
// condition; a pod deleted, terminating or finished is deregistered. Pods
// that no Service selects (Jobs, clients) are registered too, as
// client-only proxies when they have no port. It must run in one replica
// at a time (leader election).
type Registrar struct {
	cfg      RegistrarConfig
	log      *slog.Logger
	pods     listerscorev1.PodLister
	services listerscorev1.ServiceLister
	synced   []cache.InformerSynced
	queue    workqueue.TypedRateLimitingInterface[string]

	mu         sync.Mutex            // guards registered
	registered map[string]registered // by pod key (namespace/name)
}

// registered is what was last written for a pod.
type registered struct {
	node, instanceID, proxyID string
	hash                      string
}

// NewRegistrar returns a Registrar; Run starts it. It registers its
// informers' handlers, so call it before the factories start.
func NewRegistrar(cfg RegistrarConfig) (*Registrar, error) {
	if cfg.Informers == nil || cfg.PodInformers == nil || cfg.Consul == nil {
		return nil, errors.New("kube: RegistrarConfig needs Informers, PodInformers and Consul")
	}
	if cfg.Resync == 0 {
		cfg.Resync = DefaultResync
	}
	r := &Registrar{cfg: cfg, log: cfg.Logger, registered: map[string]registered{},
		queue: workqueue.NewTypedRateLimitingQueueWithConfig(workqueue.DefaultTypedControllerRateLimiter[string](),
			workqueue.TypedRateLimitingQueueConfig[string]{Name: "meshlet-registrar"})}
	if r.log == nil {
		r.log = slog.Default()
	}
	podInf := cfg.PodInformers.Core().V1().Pods()
	svcInf := cfg.Informers.Core().V1().Services()
	sliceInf := cfg.Informers.Discovery().V1().EndpointSlices()
	r.pods, r.services = podInf.Lister(), svcInf.Lister()
	enqueuePod := func(obj any) {
		if k, err := cache.DeletionHandlingMetaNamespaceKeyFunc(obj); err == nil {
			r.queue.Add(k)
		}
	}
	if _, err := podInf.Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc: enqueuePod, UpdateFunc: func(_, n any) { enqueuePod(n) }, DeleteFunc: enqueuePod,
	}); err != nil {
		return nil, fmt.Errorf("kube: pod informer: %w", err)
	}
	// A Service appearing, changing or going changes the registrations
	// of the pods its EndpointSlices list (meta, virtual address).
	enqueueSlice := func(obj any) {
		if d, ok := obj.(cache.DeletedFinalStateUnknown); ok {
			obj = d.Obj
		}
		es, ok := obj.(*discoveryv1.EndpointSlice)
		if !ok {
			return
		}
		for _, ep := range es.Endpoints {
			if ref := ep.TargetRef; ref != nil && ref.Kind == "Pod" {
				r.queue.Add(es.Namespace + "/" + ref.Name)
			}
		}
	}
	if _, err := sliceInf.Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc: enqueueSlice, UpdateFunc: func(_, n any) { enqueueSlice(n) }, DeleteFunc: enqueueSlice,
	}); err != nil {
		return nil, fmt.Errorf("kube: endpointslice informer: %w", err)
	}
	r.synced = []cache.InformerSynced{podInf.Informer().HasSynced, svcInf.Informer().HasSynced, sliceInf.Informer().HasSynced}
	return r, nil
}

// Run reconciles until ctx is done: it waits for the informers' caches,
// removes stale registrations it owns, then registers and deregisters
// pods as they change, checking everything again every Resync. Consul
// errors are retried with the queue's backoff (5 ms doubling to 1000 s).
func (r *Registrar) Run(ctx context.Context) error {
	defer r.queue.ShutDown()
	if !cache.WaitForCacheSync(ctx.Done(), r.synced...) {
		return fmt.Errorf("kube: registrar: informer caches did not sync: %w", ctx.Err())
	}
	r.log.Info("kube: registrar running")
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for r.next(ctx) {
		}
	}()
	t := time.NewTicker(r.cfg.Resync)
	defer t.Stop()
	for {
		r.resync(ctx)
		select {
		case <-ctx.Done():
			r.queue.ShutDown()
			wg.Wait()
			return nil
		case <-t.C:
		}
	}
}

func (r *Registrar) next(ctx context.Context) bool {
	key, quit := r.queue.Get()
	if quit {
		return false
	}
	defer r.queue.Done(key)
	if err := r.reconcile(ctx, key); err != nil {
		r.log.Warn("kube: registrar: consul write failed; retrying", "pod", key, "error", err)
		r.queue.AddRateLimited(key)
		return true
	}
	r.queue.Forget(key)
	return true
}

// reconcile brings Consul to what pod key should have.
func (r *Registrar) reconcile(ctx context.Context, key string) error {
	ns, name, err := cache.SplitMetaNamespaceKey(key)
	if err != nil {
		return nil
	}
	var want Registration
	ok := false
	pod, err := r.pods.Pods(ns).Get(name)
	switch {
	case apierrors.IsNotFound(err):
	case err != nil:
		return err
	default:
		want, ok = r.desired(pod)
	}
	r.mu.Lock()
	have, had := r.registered[key]
	r.mu.Unlock()
	if !ok {
		if !had {
			return nil
		}
		if err := r.deregister(have); err != nil {
			return err
		}
		r.mu.Lock()
		delete(r.registered, key)
		r.mu.Unlock()
		r.log.Info("kube: deregistered a pod from consul", "pod", key, "service", have.instanceID)
		return nil
	}
	h := hash(want)
	if had && have.hash == h {
		return nil
	}
	if had && (have.node != want.Instance.Node || have.instanceID != want.Instance.Service.ID) {
		if err := r.deregister(have); err != nil {
			return err
		}
	}
	wo := (&api.WriteOptions{}).WithContext(ctx)
	// The instance first: the proxy's health includes its destination's.
	for _, reg := range []*api.CatalogRegistration{want.Instance, want.Proxy} {
		if _, err := r.cfg.Consul.Register(reg, wo); err != nil {
			return fmt.Errorf("kube: register %s: %w", reg.Service.ID, aclNamed(err, "registering "+reg.Service.ID+" on node "+reg.Node))
		}
	}
	r.mu.Lock()
	r.registered[key] = registered{node: want.Instance.Node, instanceID: want.Instance.Service.ID, proxyID: want.Proxy.Service.ID, hash: h}
	r.mu.Unlock()
	r.log.Info("kube: registered a pod in consul", "pod", key, "service", want.Instance.Service.Service,
		"address", want.Instance.Service.Address, "check", want.Instance.Check.Status)
	return nil
}

// desired is the registration pod should have, if any.
func (r *Registrar) desired(pod *corev1.Pod) (Registration, bool) {
	rec, has, err := inject.ParseRecord(pod)
	if err != nil {
		r.log.Warn("kube: registrar: pod has an unreadable injection record; not registered", "pod", pod.Namespace+"/"+pod.Name, "error", err)
	}
	if !has || err != nil {
		return Registration{}, false
	}
	svc, _ := r.services.Services(pod.Namespace).Get(rec.Service)
	return Register(pod, rec, svc)
}

func (r *Registrar) deregister(have registered) error {
	for _, id := range []string{have.proxyID, have.instanceID} {
		if _, err := r.cfg.Consul.Deregister(&api.CatalogDeregistration{Node: have.node, ServiceID: id}, nil); err != nil {
			return fmt.Errorf("kube: deregister %s: %w", id, aclNamed(err, "deregistering "+id+" from node "+have.node))
		}
	}
	return nil
}

// resync removes the registrations this registrar owns (meta managed-by)
// whose pod is gone, was replaced (another UID) or should not be
// registered any more (terminating, finished), including those an earlier
// leader wrote, and queues every injected pod.
func (r *Registrar) resync(ctx context.Context) {
	nodes, _, err := r.cfg.Consul.Nodes((&api.QueryOptions{NodeMeta: map[string]string{MetaSyntheticNode: "true"}}).WithContext(ctx))
	if err != nil {
		r.log.Warn("kube: registrar: resync: cannot list consul nodes", "error", err)
	} else {
		for _, n := range nodes {
			list, _, err := r.cfg.Consul.NodeServiceList(n.Node, (&api.QueryOptions{}).WithContext(ctx))
			if err != nil || list == nil {
				continue
			}
			for _, s := range list.Services {
				if s.Meta[MetaManagedBy] != ManagedBy {
					continue
				}
				pod, err := r.pods.Pods(s.Meta[MetaNamespace]).Get(s.Meta[MetaPodName])
				if err == nil && string(pod.UID) == s.Meta[MetaPodUID] {
					if want, ok := r.desired(pod); ok && want.Instance.Node == n.Node &&
						(s.ID == want.Instance.Service.ID || s.ID == want.Proxy.Service.ID) {
						continue // reconcile keeps it right
					}
				}
				if _, err := r.cfg.Consul.Deregister(&api.CatalogDeregistration{Node: n.Node, ServiceID: s.ID}, nil); err != nil {
					r.log.Warn("kube: registrar: resync: deregister failed", "service", s.ID,
						"error", aclNamed(err, "deregistering "+s.ID+" from node "+n.Node))
					continue
				}
				r.log.Info("kube: removed a stale consul registration", "service", s.ID, "node", n.Node,
					"pod", s.Meta[MetaNamespace]+"/"+s.Meta[MetaPodName])
			}
		}
	}
	pods, err := r.pods.List(labels.Everything())
	if err != nil {
		return
	}
	for _, p := range pods {
		r.queue.Add(p.Namespace + "/" + p.Name)
	}
}

// aclNamed is err, or when Consul refused it for the ACL token (HTTP 403)
// an error naming the permission missing and what needed it (the rules the
// registrar needs: consul.KubeControlPlaneACLRules).
func aclNamed(err error, what string) error {
	if aerr := consul.ACLErrorOf(err, what); aerr != nil {
		return fmt.Errorf("%w (the control plane's token needs the rules of consul.KubeControlPlaneACLRules)", aerr)
	}
	return err
}

func hash(reg Registration) string {
	b, _ := json.Marshal(reg)
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}
