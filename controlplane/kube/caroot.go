package kube

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"slices"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	apimeta "k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/util/workqueue"

	"github.com/meshlet/meshlet/xds"
)

// caRootResync is how often every namespace's CA root ConfigMap is
// compared with the current bundle (a renewed CA reaches them within it).
const caRootResync = time.Minute

// caRootNamespacesSkipped never get the CA root ConfigMap (injection
// never reaches them either).
var caRootNamespacesSkipped = []string{"kube-system", "kube-public", "kube-node-lease"}

// caRootPublisher keeps the ConfigMap xds.CARootConfigMap, holding the
// CA bundle of the control plane's serving certificate (key
// xds.CARootKey), in every namespace but caRootNamespacesSkipped: injected
// sidecars mount it to verify the control plane (Istio's
// istio-ca-root-cert). A deleted or edited ConfigMap is put back, a new
// namespace gets one at once, a renewed CA reaches all within
// caRootResync. It runs in the leader only.
type caRootPublisher struct {
	client kubernetes.Interface
	bundle func() []byte
	log    *slog.Logger
}

func newCARootPublisher(client kubernetes.Interface, bundle func() []byte, log *slog.Logger) *caRootPublisher {
	return &caRootPublisher{client: client, bundle: bundle, log: log}
}

// Run publishes until ctx is done. Its informers (namespaces, and the CA
// root ConfigMaps alone, by field selector) live as long as the call, so
// each leadership term starts afresh.
func (p *caRootPublisher) Run(ctx context.Context) {
	nsFactory := informers.NewSharedInformerFactory(p.client, caRootResync)
	cmFactory := informers.NewSharedInformerFactoryWithOptions(p.client, caRootResync, informers.WithTweakListOptions(func(o *metav1.ListOptions) {
		o.FieldSelector = fields.OneTermEqualSelector("metadata.name", xds.CARootConfigMap).String()
	}))
	nsInformer := nsFactory.Core().V1().Namespaces()
	cmInformer := cmFactory.Core().V1().ConfigMaps()
	queue := workqueue.NewTypedRateLimitingQueueWithConfig(workqueue.DefaultTypedControllerRateLimiter[string](),
		workqueue.TypedRateLimitingQueueConfig[string]{Name: "meshlet-ca-root"})
	defer queue.ShutDown()
	enqueue := func(obj any) {
		if d, ok := obj.(cache.DeletedFinalStateUnknown); ok {
			obj = d.Obj
		}
		if o, err := apimeta.Accessor(obj); err == nil {
			ns := o.GetNamespace()
			if ns == "" { // a Namespace itself
				ns = o.GetName()
			}
			queue.Add(ns)
		}
	}
	handler := cache.ResourceEventHandlerFuncs{AddFunc: enqueue, UpdateFunc: func(_, o any) { enqueue(o) }, DeleteFunc: enqueue}
	if _, err := nsInformer.Informer().AddEventHandler(handler); err != nil {
		p.log.Error("kube: CA root ConfigMaps: namespace informer", "error", err)
		return
	}
	if _, err := cmInformer.Informer().AddEventHandler(handler); err != nil {
		p.log.Error("kube: CA root ConfigMaps: ConfigMap informer", "error", err)
		return
	}
	nsFactory.Start(ctx.Done())
	cmFactory.Start(ctx.Done())
	defer nsFactory.Shutdown()
	defer cmFactory.Shutdown()
	if !cache.WaitForCacheSync(ctx.Done(), nsInformer.Informer().HasSynced, cmInformer.Informer().HasSynced) {
		return
	}
	go func() {
		<-ctx.Done()
		queue.ShutDown()
	}()
	for {
		ns, quit := queue.Get()
		if quit {
			return
		}
		err := p.ensure(ctx, ns, nsInformer.Lister().Get, cmInformer.Lister().ConfigMaps(ns).Get)
		if err != nil && ctx.Err() == nil {
			p.log.Warn("kube: CA root ConfigMap not written; retrying", "namespace", ns, "error", err)
			queue.AddRateLimited(ns)
		} else {
			queue.Forget(ns)
		}
		queue.Done(ns)
	}
}

// ensure makes namespace ns's CA root ConfigMap hold the current bundle.
func (p *caRootPublisher) ensure(ctx context.Context, ns string, getNS func(string) (*corev1.Namespace, error),
	getCM func(string) (*corev1.ConfigMap, error)) error {
	if slices.Contains(caRootNamespacesSkipped, ns) {
		return nil
	}
	n, err := getNS(ns)
	if apierrors.IsNotFound(err) || err == nil && (n.DeletionTimestamp != nil || n.Status.Phase == corev1.NamespaceTerminating) {
		return nil
	}
	if err != nil {
		return err
	}
	bundle := p.bundle()
	if len(bundle) == 0 {
		return fmt.Errorf("kube: no CA bundle yet")
	}
	cms := p.client.CoreV1().ConfigMaps(ns)
	cm, err := getCM(xds.CARootConfigMap)
	switch {
	case apierrors.IsNotFound(err):
		_, err = cms.Create(ctx, &corev1.ConfigMap{
			ObjectMeta: metav1.ObjectMeta{Name: xds.CARootConfigMap, Namespace: ns, Labels: map[string]string{"app.kubernetes.io/managed-by": "meshlet"}},
			Data:       map[string]string{xds.CARootKey: string(bundle)},
		}, metav1.CreateOptions{})
		if apierrors.IsAlreadyExists(err) {
			return nil // the informer brings it back to the queue
		}
		if err == nil {
			p.log.Debug("kube: CA root ConfigMap created", "namespace", ns)
		}
		return err
	case err != nil:
		return err
	case bytes.Equal([]byte(cm.Data[xds.CARootKey]), bundle) && len(cm.Data) == 1:
		return nil
	}
	cm = cm.DeepCopy()
	cm.Data = map[string]string{xds.CARootKey: string(bundle)}
	_, err = cms.Update(ctx, cm, metav1.UpdateOptions{})
	if apierrors.IsConflict(err) {
		return nil // changed meanwhile: the informer brings it back to the queue
	}
	if err == nil {
		p.log.Info("kube: CA root ConfigMap updated", "namespace", ns)
	}
	return err
}
