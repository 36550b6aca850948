package kube

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/meshlet/meshlet/controlplane/consul"
	"github.com/meshlet/meshlet/controlplane/inject"
	"github.com/meshlet/meshlet/internal/devconsul"
	"github.com/meshlet/meshlet/internal/testlog"
	"github.com/meshlet/meshlet/internal/testutil"
)

func injectedPod(name, service string, port int, ready bool) *corev1.Pod {
	rec, _ := json.Marshal(inject.Record{Service: service, Port: port, PublicPort: 20000,
		Upstreams: []inject.Upstream{{Service: "store", LocalPort: 9192}}})
	status := corev1.ConditionFalse
	if ready {
		status = corev1.ConditionTrue
	}
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "shop", UID: types.UID("uid-" + name),
			Labels:      map[string]string{inject.LabelInjected: "true", "app": service},
			Annotations: map[string]string{inject.AnnotationInjected: string(rec)}},
		Spec: corev1.PodSpec{NodeName: "node1"},
		Status: corev1.PodStatus{Phase: corev1.PodRunning, PodIP: "10.244.0." + fmt.Sprint(len(name)),
			Conditions: []corev1.PodCondition{{Type: corev1.PodReady, Status: status}}},
	}
}

func TestRegisterShapes(t *testing.T) {
	pod := injectedPod("api-7c9d8f6b5d-x2x4z", "api", 8080, true)
	svc := &corev1.Service{ObjectMeta: metav1.ObjectMeta{Name: "api", Namespace: "shop"},
		Spec: corev1.ServiceSpec{ClusterIP: "10.96.0.42", Ports: []corev1.ServicePort{{Port: 80}}}}
	reg, ok := Register(pod, inject.Record{Service: "api", Port: 8080, PublicPort: 20000}, svc)
	if !ok {
		t.Fatal("not registered")
	}
	in, px := reg.Instance, reg.Proxy
	if in.Node != "node1-virtual" || in.NodeMeta[MetaSyntheticNode] != "true" || in.Service.ID != "api-7c9d8f6b5d-x2x4z-api" ||
		in.Service.Port != 8080 || in.Service.Address != pod.Status.PodIP {
		t.Errorf("instance = %+v / %+v", in, in.Service)
	}
	if px.Service.ID != "api-7c9d8f6b5d-x2x4z-api-sidecar-proxy" || px.Service.Kind != api.ServiceKindConnectProxy || px.Service.Port != 20000 ||
		px.Service.Proxy.DestinationServiceID != in.Service.ID || px.Service.Proxy.LocalServicePort != 8080 {
		t.Errorf("proxy = %+v / %+v", px.Service, px.Service.Proxy)
	}
	for _, r := range []*api.CatalogRegistration{in, px} {
		m := r.Service.Meta
		if m[MetaNamespace] != "shop" || m[MetaPodName] != pod.Name || m[MetaPodUID] != string(pod.UID) || m[MetaManagedBy] != ManagedBy || m[MetaService] != "api" {
			t.Errorf("%s meta = %v", r.Service.ID, m)
		}
		if r.Check.Type != CheckType || r.Check.Status != api.HealthPassing || r.Check.ServiceID != r.Service.ID || r.Check.CheckID != "shop/"+r.Service.ID {
			t.Errorf("%s check = %+v", r.Service.ID, r.Check)
		}
		if v := r.Service.TaggedAddresses[consul.VirtualTaggedAddress]; v.Address != "10.96.0.42" || v.Port != 80 {
			t.Errorf("%s virtual = %+v", r.Service.ID, v)
		}
	}
	for _, tc := range []struct {
		name string
		edit func(*corev1.Pod)
	}{
		{"no IP yet", func(p *corev1.Pod) { p.Status.PodIP = "" }},
		{"terminating", func(p *corev1.Pod) { p.DeletionTimestamp = &metav1.Time{Time: time.Now()} }},
		{"succeeded", func(p *corev1.Pod) { p.Status.Phase = corev1.PodSucceeded }},
		{"failed", func(p *corev1.Pod) { p.Status.Phase = corev1.PodFailed }},
	} {
		p := pod.DeepCopy()
		tc.edit(p)
		if _, ok := Register(p, inject.Record{Service: "api", Port: 8080}, nil); ok {
			t.Errorf("%s: registered", tc.name)
		}
	}
}

// TestRegistrarAgainstConsul runs the registrar over a fake API server
// (client-go's) and a real Consul agent: pods registered with their checks
// following readiness, a Service's ClusterIP becoming the virtual address,
// deletion and termination deregistering, and a stale registration of a
// pod that no longer exists removed at start.
func TestRegistrarAgainstConsul(t *testing.T) {
	if testing.Short() {
		t.Skip("-short: starts a real Consul agent (make test runs it)")
	}
	agent := devconsul.StartForTest(t)
	// The test writes and reads with the management token, the registrar
	// with the control plane's (consul.KubeControlPlaneACLRules only).
	cat := agent.Client.Catalog()
	cpToken, err := agent.ControlPlaneToken(context.Background(), true)
	if err != nil {
		t.Fatal(err)
	}
	cp, err := agent.NewClient(cpToken)
	if err != nil {
		t.Fatal(err)
	}

	// A registration left by an earlier leader for a pod that is gone.
	stale := injectedPod("gone-1", "api", 8080, true)
	sreg, _ := Register(stale, inject.Record{Service: "api", Port: 8080, PublicPort: 20000}, nil)
	for _, r := range []*api.CatalogRegistration{sreg.Instance, sreg.Proxy} {
		if _, err := cat.Register(r, nil); err != nil {
			t.Fatal(err)
		}
	}

	api1 := injectedPod("api-1", "api", 8080, false)
	client := fake.NewClientset(api1)
	all := informers.NewSharedInformerFactory(client, 0)
	pods := informers.NewSharedInformerFactory(client, 0)
	log, _ := testlog.New(t, "registrar")
	r, err := NewRegistrar(RegistrarConfig{Informers: all, PodInformers: pods, Consul: cp.Catalog(), Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	all.Start(ctx.Done())
	pods.Start(ctx.Done())
	done := make(chan error, 1)
	go func() { done <- r.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		<-done
		all.Shutdown()
		pods.Shutdown()
	})

	services := func() map[string]*api.AgentService {
		list, _, err := cat.NodeServiceList("node1-virtual", nil)
		if err != nil || list == nil {
			return nil
		}
		m := map[string]*api.AgentService{}
		for _, s := range list.Services {
			m[s.ID] = s
		}
		return m
	}
	status := func(serviceID string) string {
		list, _, err := agent.Client.Health().Node("node1-virtual", nil)
		if err != nil {
			return ""
		}
		for _, c := range list {
			if c.ServiceID == serviceID {
				return c.Status
			}
		}
		return ""
	}
	waitFor := func(what string, cond func() bool) {
		t.Helper()
		testutil.Eventually(t, 10*time.Second, what, func() error {
			if cond() {
				return nil
			}
			return fmt.Errorf("consul has %v", slices.Collect(func(yield func(string) bool) {
				for id := range services() {
					if !yield(id) {
						return
					}
				}
			}))
		})
	}

	waitFor("api-1 registered, critical, stale gone", func() bool {
		s := services()
		return s["api-1-api"] != nil && s["api-1-api-sidecar-proxy"] != nil && s["gone-1-api"] == nil && s["gone-1-api-sidecar-proxy"] == nil &&
			status("api-1-api") == api.HealthCritical
	})
	if p := services()["api-1-api-sidecar-proxy"]; p.Kind != api.ServiceKindConnectProxy || p.Proxy == nil ||
		len(p.Proxy.Upstreams) != 1 || p.Proxy.Upstreams[0].DestinationName != "store" || p.Proxy.Upstreams[0].LocalBindPort != 9192 {
		t.Errorf("proxy registration = %+v / %+v", p, p.Proxy)
	}

	// Ready: the checks pass.
	ready := injectedPod("api-1", "api", 8080, true)
	if _, err := client.CoreV1().Pods("shop").UpdateStatus(ctx, ready, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor("checks passing", func() bool {
		return status("api-1-api") == api.HealthPassing && status("api-1-api-sidecar-proxy") == api.HealthPassing
	})

	// A Service named api appears, with its slice listing the pod: the
	// virtual address follows.
	if _, err := client.CoreV1().Services("shop").Create(ctx, &corev1.Service{ObjectMeta: metav1.ObjectMeta{Name: "api", Namespace: "shop"},
		Spec: corev1.ServiceSpec{ClusterIP: "10.96.0.7", Ports: []corev1.ServicePort{{Port: 80}}}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := client.DiscoveryV1().EndpointSlices("shop").Create(ctx, &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Name: "api-abc", Namespace: "shop", Labels: map[string]string{discoveryv1.LabelServiceName: "api"}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Endpoints:   []discoveryv1.Endpoint{{Addresses: []string{ready.Status.PodIP}, TargetRef: &corev1.ObjectReference{Kind: "Pod", Name: "api-1", Namespace: "shop"}}},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor("virtual address", func() bool {
		s := services()["api-1-api"]
		return s != nil && s.TaggedAddresses[consul.VirtualTaggedAddress].Address == "10.96.0.7"
	})

	// Terminating: deregistered at once.
	term := ready.DeepCopy()
	term.DeletionTimestamp = &metav1.Time{Time: time.Now()}
	if _, err := client.CoreV1().Pods("shop").Update(ctx, term, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor("deregistered while terminating", func() bool {
		s := services()
		return s != nil && s["api-1-api"] == nil && s["api-1-api-sidecar-proxy"] == nil
	})

	// A second pod, then deleted.
	if _, err := client.CoreV1().Pods("shop").Create(ctx, injectedPod("api-2", "api", 8080, true), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor("api-2 registered", func() bool { return services()["api-2-api"] != nil })
	if err := client.CoreV1().Pods("shop").Delete(ctx, "api-2", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor("api-2 deregistered", func() bool { s := services(); return s != nil && s["api-2-api"] == nil })
}

// TestRegistrarNeedsKubeRules: with a token of consul.ControlPlaneACLRules
// (no node:write), the registrar's writes fail, and its log names the
// permission missing and the rules to give.
func TestRegistrarNeedsKubeRules(t *testing.T) {
	agent := devconsul.StartForTest(t)
	token, err := agent.ControlPlaneToken(context.Background(), false)
	if err != nil {
		t.Fatal(err)
	}
	cp, err := agent.NewClient(token)
	if err != nil {
		t.Fatal(err)
	}
	client := fake.NewClientset(injectedPod("api-1", "api", 8080, true))
	all := informers.NewSharedInformerFactory(client, 0)
	pods := informers.NewSharedInformerFactory(client, 0)
	log, logs := testlog.New(t, "registrar")
	r, err := NewRegistrar(RegistrarConfig{Informers: all, PodInformers: pods, Consul: cp.Catalog(), Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	all.Start(ctx.Done())
	pods.Start(ctx.Done())
	done := make(chan error, 1)
	go func() { done <- r.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		<-done
		all.Shutdown()
		pods.Shutdown()
	})
	line := logs.WaitFor(t, 10*time.Second, "consul: ACL token lacks node:write on node1-virtual (needed for registering api-1-api on node node1-virtual)")
	if !strings.Contains(line, "KubeControlPlaneACLRules") {
		t.Errorf("the log line does not name the rules to give: %s", line)
	}
	if list, _, err := agent.Client.Catalog().NodeServiceList("node1-virtual", nil); err != nil || list != nil && len(list.Services) > 0 {
		t.Errorf("registered without node:write: %+v, %v", list, err)
	}
}

// TestRegisterHeadless: the pod of a headless Service (clusterIP None, a
// StatefulSet's) is registered without a virtual tagged address — which is
// what makes it headless to the translator (model.Service.Headless) — and
// otherwise as any pod: its own address and the app port, a transparent
// proxy.
func TestRegisterHeadless(t *testing.T) {
	pod := injectedPod("db-0", "db", 7000, true)
	svc := &corev1.Service{ObjectMeta: metav1.ObjectMeta{Name: "db", Namespace: "shop"},
		Spec: corev1.ServiceSpec{ClusterIP: corev1.ClusterIPNone, Ports: []corev1.ServicePort{{Port: 7000}}}}
	reg, ok := Register(pod, inject.Record{Service: "db", Port: 7000, PublicPort: 20000, Transparent: true}, svc)
	if !ok {
		t.Fatal("not registered")
	}
	for _, r := range []*api.CatalogRegistration{reg.Instance, reg.Proxy} {
		if v, ok := r.Service.TaggedAddresses[consul.VirtualTaggedAddress]; ok {
			t.Errorf("%s has virtual address %+v", r.Service.ID, v)
		}
		if r.Service.Address != pod.Status.PodIP || r.Service.Meta[MetaService] != "db" {
			t.Errorf("%s = %+v", r.Service.ID, r.Service)
		}
	}
	if reg.Instance.Service.Port != 7000 || reg.Proxy.Service.Proxy.Mode != api.ProxyModeTransparent || reg.Proxy.Service.Proxy.DestinationServiceID != reg.Instance.Service.ID {
		t.Errorf("instance port %d, proxy %+v", reg.Instance.Service.Port, reg.Proxy.Service.Proxy)
	}
}
