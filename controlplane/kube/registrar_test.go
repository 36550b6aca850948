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
	"k8s.io/apimachinery/pkg/util/intstr"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/client/fake"
	"sigs.k8s.io/controller-runtime/pkg/event"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"

	"github.com/meshlet/meshlet/controlplane/consul"
	"github.com/meshlet/meshlet/controlplane/inject"
	"github.com/meshlet/meshlet/internal/devconsul"
	"github.com/meshlet/meshlet/internal/testlog"
	"github.com/meshlet/meshlet/xds"
)

func injectedPod(name, service string, port int, ready bool) *corev1.Pod {
	rec, _ := json.Marshal(inject.Record{Service: service, Port: port, PublicPort: 20000,
		Upstreams: []inject.Upstream{{Service: "store", LocalPort: 9192}}})
	status := corev1.ConditionFalse
	if ready {
		status = corev1.ConditionTrue
	}
	ip := "10.244.0." + fmt.Sprint(len(name))
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "shop", UID: types.UID("uid-" + name),
			Labels:      map[string]string{inject.LabelInjected: "true", "app": service},
			Annotations: map[string]string{inject.AnnotationInjected: string(rec)}},
		Spec: corev1.PodSpec{NodeName: "node1"},
		Status: corev1.PodStatus{Phase: corev1.PodRunning, PodIP: ip, PodIPs: []corev1.PodIP{{IP: ip}},
			HostIP: "192.0.2.10", HostIPs: []corev1.HostIP{{IP: "192.0.2.10"}},
			Conditions: []corev1.PodCondition{{Type: corev1.PodReady, Status: status}}},
	}
}

// dualStack gives pod a second address, of the other family, and its
// host too.
func dualStack(pod *corev1.Pod, v6 string) *corev1.Pod {
	pod.Status.PodIPs = append(pod.Status.PodIPs, corev1.PodIP{IP: v6})
	pod.Status.HostIPs = append(pod.Status.HostIPs, corev1.HostIP{IP: "2001:db8::10"})
	return pod
}

// slice is an EndpointSlice of service listing pod with conditions.
func slice(name, service string, pod *corev1.Pod, cond discoveryv1.EndpointConditions) discoveryv1.EndpointSlice {
	return discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Name: name, Namespace: pod.Namespace, Labels: map[string]string{discoveryv1.LabelServiceName: service}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Endpoints: []discoveryv1.Endpoint{{Addresses: []string{pod.Status.PodIP}, Conditions: cond,
			TargetRef: &corev1.ObjectReference{Kind: "Pod", Namespace: pod.Namespace, Name: pod.Name, UID: pod.UID}}},
	}
}

func ptrTo[T any](v T) *T { return &v }

func TestRegisterShapes(t *testing.T) {
	pod := injectedPod("api-7c9d8f6b5d-x2x4z", "api", 8080, true)
	svc := &corev1.Service{ObjectMeta: metav1.ObjectMeta{Name: "api", Namespace: "shop"},
		Spec: corev1.ServiceSpec{ClusterIP: "10.96.0.42", Ports: []corev1.ServicePort{{Port: 80}}}}
	reg, ok := Register(pod, inject.Record{Service: "api", Port: 8080, PublicPort: 20000}, svc, nil)
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
		// The synthetic node is the pod's host.
		if r.Address != "192.0.2.10" || r.TaggedAddresses[TaggedLANIPv4] != "192.0.2.10" || !r.SkipNodeUpdate {
			t.Errorf("%s node address %q, tagged %v", r.Service.ID, r.Address, r.TaggedAddresses)
		}
		if v := r.Service.TaggedAddresses[TaggedLANIPv4]; v.Address != pod.Status.PodIP || v.Port != r.Service.Port {
			t.Errorf("%s lan_ipv4 = %+v", r.Service.ID, v)
		}
	}
	for _, tc := range []struct {
		name string
		edit func(*corev1.Pod)
	}{
		{"no IP yet", func(p *corev1.Pod) { p.Status.PodIP, p.Status.PodIPs = "", nil }},
		{"terminating", func(p *corev1.Pod) { p.DeletionTimestamp = &metav1.Time{Time: time.Now()} }},
		{"succeeded", func(p *corev1.Pod) { p.Status.Phase = corev1.PodSucceeded }},
		{"failed", func(p *corev1.Pod) { p.Status.Phase = corev1.PodFailed }},
	} {
		p := pod.DeepCopy()
		tc.edit(p)
		if _, ok := Register(p, inject.Record{Service: "api", Port: 8080}, nil, nil); ok {
			t.Errorf("%s: registered", tc.name)
		}
	}
	// The Consul name of a namespaced record names the instance, the
	// proxy and its destination.
	nreg, _ := Register(pod, inject.Record{Service: "api", ConsulService: "api.shop", Port: 8080, PublicPort: 20000}, svc, nil)
	if nreg.Instance.Service.ID != "api-7c9d8f6b5d-x2x4z-api.shop" || nreg.Instance.Service.Service != "api.shop" ||
		nreg.Proxy.Service.Service != "api.shop-sidecar-proxy" || nreg.Proxy.Service.Proxy.DestinationServiceName != "api.shop" ||
		nreg.Instance.Service.Meta[MetaService] != "api" {
		t.Errorf("namespaced: instance %+v, proxy %+v", nreg.Instance.Service, nreg.Proxy.Service)
	}
	// Without a host IP (a fake API server), the node keeps loopback.
	p := pod.DeepCopy()
	p.Status.HostIP, p.Status.HostIPs = "", nil
	if reg, _ := Register(p, inject.Record{Service: "api", Port: 8080}, nil, nil); reg.Instance.Address != "127.0.0.1" {
		t.Errorf("node address without a host IP = %q", reg.Instance.Address)
	}
}

// TestRegisterDualStack: a dual-stack pod and Service (either family
// first) register the pod's first IP as the address, each family's pod IP
// as lan_ipv4 / lan_ipv6, the Service's first ClusterIP as the virtual
// address and each family's as virtual_ipv4 / virtual_ipv6; the synthetic
// node is the first host IP, with both families tagged.
func TestRegisterDualStack(t *testing.T) {
	type addr = api.ServiceAddress
	for _, tc := range []struct {
		name       string
		podIPs     []string
		clusterIPs []string
		address    string
		tagged     map[string]addr // of the instance (port 8080)
	}{
		{
			name: "IPv4 first", podIPs: []string{"10.244.0.7", "fd00:10:244::7"}, clusterIPs: []string{"10.96.0.42", "fd00:10:96::42"},
			address: "10.244.0.7",
			tagged: map[string]addr{
				consul.VirtualTaggedAddress: {Address: "10.96.0.42", Port: 80},
				TaggedVirtualIPv4:           {Address: "10.96.0.42", Port: 80}, TaggedVirtualIPv6: {Address: "fd00:10:96::42", Port: 80},
				TaggedLANIPv4: {Address: "10.244.0.7", Port: 8080}, TaggedLANIPv6: {Address: "fd00:10:244::7", Port: 8080},
			},
		},
		{
			name: "IPv6 first", podIPs: []string{"fd00:10:244::7", "10.244.0.7"}, clusterIPs: []string{"fd00:10:96::42", "10.96.0.42"},
			address: "fd00:10:244::7",
			tagged: map[string]addr{
				consul.VirtualTaggedAddress: {Address: "fd00:10:96::42", Port: 80},
				TaggedVirtualIPv4:           {Address: "10.96.0.42", Port: 80}, TaggedVirtualIPv6: {Address: "fd00:10:96::42", Port: 80},
				TaggedLANIPv4: {Address: "10.244.0.7", Port: 8080}, TaggedLANIPv6: {Address: "fd00:10:244::7", Port: 8080},
			},
		},
		{
			name: "IPv6 only", podIPs: []string{"fd00:10:244::7"}, clusterIPs: []string{"fd00:10:96::42"},
			address: "fd00:10:244::7",
			tagged: map[string]addr{
				consul.VirtualTaggedAddress: {Address: "fd00:10:96::42", Port: 80}, TaggedVirtualIPv6: {Address: "fd00:10:96::42", Port: 80},
				TaggedLANIPv6: {Address: "fd00:10:244::7", Port: 8080},
			},
		},
		{
			name: "dual-stack pod, headless Service", podIPs: []string{"10.244.0.7", "fd00:10:244::7"}, clusterIPs: []string{corev1.ClusterIPNone},
			address: "10.244.0.7",
			tagged: map[string]addr{
				TaggedLANIPv4: {Address: "10.244.0.7", Port: 8080}, TaggedLANIPv6: {Address: "fd00:10:244::7", Port: 8080},
			},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			pod := injectedPod("api-1", "api", 8080, true)
			pod.Status.PodIP, pod.Status.PodIPs = tc.podIPs[0], nil
			for _, ip := range tc.podIPs {
				pod.Status.PodIPs = append(pod.Status.PodIPs, corev1.PodIP{IP: ip})
			}
			pod.Status.HostIPs = []corev1.HostIP{{IP: "192.0.2.10"}, {IP: "2001:db8::10"}}
			svc := &corev1.Service{ObjectMeta: metav1.ObjectMeta{Name: "api", Namespace: "shop"},
				Spec: corev1.ServiceSpec{ClusterIP: tc.clusterIPs[0], ClusterIPs: tc.clusterIPs, Ports: []corev1.ServicePort{{Port: 80}}}}
			reg, ok := Register(pod, inject.Record{Service: "api", Port: 8080, PublicPort: 20000}, svc, nil)
			if !ok {
				t.Fatal("not registered")
			}
			in, px := reg.Instance, reg.Proxy
			if in.Service.Address != tc.address || px.Service.Address != tc.address {
				t.Errorf("addresses %q / %q, want %q", in.Service.Address, px.Service.Address, tc.address)
			}
			if got, _ := json.Marshal(in.Service.TaggedAddresses); string(got) != string(must(json.Marshal(tc.tagged))) {
				t.Errorf("instance tagged addresses\n got %s\nwant %s", got, must(json.Marshal(tc.tagged)))
			}
			// The proxy's pod addresses carry its own port.
			for k, v := range tc.tagged {
				if k == TaggedLANIPv4 || k == TaggedLANIPv6 {
					v.Port = 20000
				}
				if px.Service.TaggedAddresses[k] != v {
					t.Errorf("proxy %s = %+v, want %+v", k, px.Service.TaggedAddresses[k], v)
				}
			}
			if in.Address != "192.0.2.10" || in.TaggedAddresses[TaggedLANIPv4] != "192.0.2.10" || in.TaggedAddresses[TaggedLANIPv6] != "2001:db8::10" {
				t.Errorf("node %q %v", in.Address, in.TaggedAddresses)
			}
		})
	}
}

func must[T any](v T, err error) T {
	if err != nil {
		panic(err)
	}
	return v
}

// TestRegisterEndpointSliceConditions: what the pod's EndpointSlices say
// of its endpoint decides with the pod's own state, as Kubernetes does.
func TestRegisterEndpointSliceConditions(t *testing.T) {
	ready := injectedPod("api-1", "api", 8080, true)
	unready := injectedPod("api-1", "api", 8080, false)
	other := ready.DeepCopy()
	other.UID = "uid-an-earlier-api-1"
	for _, tc := range []struct {
		name       string
		pod        *corev1.Pod
		slices     []discoveryv1.EndpointSlice
		registered bool
		status     string
		output     string
	}{
		{name: "no slice (no Service)", pod: ready, registered: true, status: api.HealthPassing},
		{name: "ready and serving", pod: ready, registered: true, status: api.HealthPassing,
			slices: []discoveryv1.EndpointSlice{slice("api-a", "api", ready, discoveryv1.EndpointConditions{Ready: ptrTo(true), Serving: ptrTo(true), Terminating: ptrTo(false)})}},
		{name: "conditions unset (ready defaults to true)", pod: ready, registered: true, status: api.HealthPassing,
			slices: []discoveryv1.EndpointSlice{slice("api-a", "api", ready, discoveryv1.EndpointConditions{})}},
		{name: "slice says not serving while the pod says Ready", pod: ready, registered: true, status: api.HealthCritical,
			output: "EndpointSlice shop/api-a marks the endpoint not serving",
			slices: []discoveryv1.EndpointSlice{slice("api-a", "api", ready, discoveryv1.EndpointConditions{Ready: ptrTo(false), Serving: ptrTo(false)})}},
		{name: "serving unset defers to ready", pod: ready, registered: true, status: api.HealthCritical,
			output: "EndpointSlice shop/api-a marks the endpoint not serving",
			slices: []discoveryv1.EndpointSlice{slice("api-a", "api", ready, discoveryv1.EndpointConditions{Ready: ptrTo(false)})}},
		{name: "one family's slice not serving", pod: ready, registered: true, status: api.HealthCritical,
			output: "EndpointSlice shop/api-v6 marks the endpoint not serving",
			slices: []discoveryv1.EndpointSlice{
				slice("api-v4", "api", ready, discoveryv1.EndpointConditions{Serving: ptrTo(true)}),
				slice("api-v6", "api", ready, discoveryv1.EndpointConditions{Serving: ptrTo(false)}),
			}},
		{name: "publishNotReadyAddresses: serving, but the pod is not Ready", pod: unready, registered: true, status: api.HealthCritical,
			output: "Pod is not Ready",
			slices: []discoveryv1.EndpointSlice{slice("api-a", "api", unready, discoveryv1.EndpointConditions{Ready: ptrTo(true), Serving: ptrTo(true)})}},
		{name: "terminating and still serving: deregistered", pod: ready,
			slices: []discoveryv1.EndpointSlice{slice("api-a", "api", ready, discoveryv1.EndpointConditions{Ready: ptrTo(false), Serving: ptrTo(true), Terminating: ptrTo(true)})}},
		{name: "terminating, not serving: deregistered", pod: ready,
			slices: []discoveryv1.EndpointSlice{slice("api-a", "api", ready, discoveryv1.EndpointConditions{Ready: ptrTo(false), Serving: ptrTo(false), Terminating: ptrTo(true)})}},
		{name: "an earlier pod of the same name terminating (another UID)", pod: ready, registered: true, status: api.HealthPassing,
			slices: []discoveryv1.EndpointSlice{slice("api-a", "api", other, discoveryv1.EndpointConditions{Terminating: ptrTo(true)})}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			reg, ok := Register(tc.pod, inject.Record{Service: "api", Port: 8080, PublicPort: 20000}, nil, tc.slices)
			if ok != tc.registered {
				t.Fatalf("registered %v, want %v", ok, tc.registered)
			}
			if !ok {
				return
			}
			for _, r := range []*api.CatalogRegistration{reg.Instance, reg.Proxy} {
				if r.Check.Status != tc.status || tc.output != "" && r.Check.Output != tc.output {
					t.Errorf("%s check %s %q, want %s %q", r.Service.ID, r.Check.Status, r.Check.Output, tc.status, tc.output)
				}
			}
		})
	}
}

// fakeTerm is one registrar term's reconciler over a fake API server
// (controller-runtime's fake client, with the pod index the term's cache
// has) and Consul catalog cat.
func fakeTerm(t *testing.T, cat ConsulCatalog, objs ...client.Object) (*reconciler, client.Client, *testlog.Buffer) {
	t.Helper()
	c := fake.NewClientBuilder().WithObjects(objs...).WithIndex(&corev1.Pod{}, podServiceField, podServiceIndex).Build()
	log, logs := testlog.New(t, "registrar")
	return newReconciler(c, cat, log), c, logs
}

func reconcilePod(t *testing.T, r *reconciler, name string) {
	t.Helper()
	if _, err := r.Reconcile(context.Background(), reconcile.Request{NamespacedName: types.NamespacedName{Namespace: "shop", Name: name}}); err != nil {
		t.Fatalf("reconcile %s: %v", name, err)
	}
}

// TestRegistrarAgainstConsul runs a registrar term's reconciler over a fake
// API server and a real Consul agent, as its controller does on each
// event: pods registered with their checks following readiness and their
// EndpointSlices, a Service's ClusterIPs becoming the virtual addresses,
// a terminating endpoint and a deleted pod deregistered, a stale
// registration of a pod that no longer exists removed by the resync, and a
// registration removed from Consul behind the registrar's back written
// again.
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
	ctx := context.Background()

	// A registration left by an earlier leader for a pod that is gone.
	stale := dualStack(injectedPod("gone-1", "api", 8080, true), "fd00:10:244::6")
	sreg, _ := Register(stale, inject.Record{Service: "api", Port: 8080, PublicPort: 20000}, nil, nil)
	for _, r := range []*api.CatalogRegistration{sreg.Instance, sreg.Proxy} {
		if _, err := cat.Register(r, nil); err != nil {
			t.Fatal(err)
		}
	}

	api1 := dualStack(injectedPod("api-1", "api", 8080, false), "fd00:10:244::5")
	r, c, _ := fakeTerm(t, cp.Catalog(), api1)
	requeue := make(chan event.GenericEvent, 10)

	services := func() map[string]*api.AgentService {
		list, _, err := cat.NodeServiceList("node1-virtual", nil)
		if err != nil || list == nil {
			return map[string]*api.AgentService{}
		}
		m := map[string]*api.AgentService{}
		for _, s := range list.Services {
			m[s.ID] = s
		}
		return m
	}
	check := func(serviceID string) *api.HealthCheck {
		list, _, err := agent.Client.Health().Node("node1-virtual", nil)
		if err != nil {
			t.Fatal(err)
		}
		for _, c := range list {
			if c.ServiceID == serviceID {
				return c
			}
		}
		return &api.HealthCheck{}
	}
	expect := func(what string, cond func() bool) {
		t.Helper()
		if !cond() {
			t.Fatalf("%s: consul has %v", what, slices.Sorted(func(yield func(string) bool) {
				for id := range services() {
					if !yield(id) {
						return
					}
				}
			}))
		}
	}

	r.resync(ctx, requeue)
	expect("stale gone", func() bool { s := services(); return s["gone-1-api"] == nil && s["gone-1-api-sidecar-proxy"] == nil })
	reconcilePod(t, r, "api-1")
	expect("api-1 registered, critical", func() bool {
		s := services()
		return s["api-1-api"] != nil && s["api-1-api-sidecar-proxy"] != nil && check("api-1-api").Status == api.HealthCritical
	})
	p := services()["api-1-api-sidecar-proxy"]
	if p.Kind != api.ServiceKindConnectProxy || p.Proxy == nil ||
		len(p.Proxy.Upstreams) != 1 || p.Proxy.Upstreams[0].DestinationName != "store" || p.Proxy.Upstreams[0].LocalBindPort != 9192 {
		t.Errorf("proxy registration = %+v / %+v", p, p.Proxy)
	}
	// Dual-stack: Consul keeps both families' addresses.
	if in := services()["api-1-api"]; in.Address != api1.Status.PodIP || in.TaggedAddresses[TaggedLANIPv6].Address != "fd00:10:244::5" ||
		in.TaggedAddresses[TaggedLANIPv4].Address != api1.Status.PodIP {
		t.Errorf("instance %s tagged %v", in.Address, in.TaggedAddresses)
	}
	if n, _, err := cat.Node("node1-virtual", nil); err != nil || n.Node.Address != "192.0.2.10" || n.Node.TaggedAddresses[TaggedLANIPv6] != "2001:db8::10" {
		t.Errorf("synthetic node = %+v (%v), want the pod's host IPs", n.Node, err)
	}

	// Ready: the checks pass.
	api1.Status.Conditions[0].Status = corev1.ConditionTrue
	if err := c.Status().Update(ctx, api1); err != nil {
		t.Fatal(err)
	}
	reconcilePod(t, r, "api-1")
	expect("checks passing", func() bool {
		return check("api-1-api").Status == api.HealthPassing && check("api-1-api-sidecar-proxy").Status == api.HealthPassing
	})

	// A dual-stack Service named api appears, with its slice listing the
	// pod: the controller maps both to the pod, the virtual addresses
	// follow.
	svc := &corev1.Service{ObjectMeta: metav1.ObjectMeta{Name: "api", Namespace: "shop"},
		Spec: corev1.ServiceSpec{ClusterIP: "10.96.0.7", ClusterIPs: []string{"10.96.0.7", "fd00:10:96::7"}, Ports: []corev1.ServicePort{{Port: 80}}}}
	es := slice("api-abc", "api", api1, discoveryv1.EndpointConditions{Ready: ptrTo(true), Serving: ptrTo(true), Terminating: ptrTo(false)})
	for _, o := range []client.Object{svc, &es} {
		if err := c.Create(ctx, o); err != nil {
			t.Fatal(err)
		}
	}
	want := []reconcile.Request{{NamespacedName: types.NamespacedName{Namespace: "shop", Name: "api-1"}}}
	if got := r.servicePods(ctx, svc); !slices.Equal(got, want) {
		t.Errorf("Service api maps to %v, want %v", got, want)
	}
	if got := slicePods(ctx, &es); !slices.Equal(got, want) {
		t.Errorf("EndpointSlice api-abc maps to %v, want %v", got, want)
	}
	reconcilePod(t, r, "api-1")
	expect("virtual addresses", func() bool {
		s := services()["api-1-api"]
		return s != nil && s.TaggedAddresses[consul.VirtualTaggedAddress].Address == "10.96.0.7" &&
			s.TaggedAddresses[TaggedVirtualIPv6].Address == "fd00:10:96::7" && s.Meta[MetaService] == "api"
	})

	// A headless Service selecting the pod too (a StatefulSet's governing
	// Service): it maps to the pod, which is then dialled directly.
	peers := &corev1.Service{ObjectMeta: metav1.ObjectMeta{Name: "api-peers", Namespace: "shop"},
		Spec: corev1.ServiceSpec{ClusterIP: corev1.ClusterIPNone, Selector: map[string]string{"app": "api"}, Ports: []corev1.ServicePort{{Port: 8080}, {Port: 9300}}}}
	if err := c.Create(ctx, peers); err != nil {
		t.Fatal(err)
	}
	if got := r.servicePods(ctx, peers); !slices.Equal(got, want) {
		t.Errorf("headless Service api-peers maps to %v, want %v", got, want)
	}
	reconcilePod(t, r, "api-1")
	expect("dialed directly, on its peer port too", func() bool {
		s := services()["api-1-api"]
		return s != nil && s.Meta[xds.MetaDialedDirectly] == "true" && s.Meta[xds.MetaDirectPorts] == "9300"
	})
	if err := c.Delete(ctx, peers); err != nil {
		t.Fatal(err)
	}
	reconcilePod(t, r, "api-1")
	expect("no longer dialed directly", func() bool {
		s := services()["api-1-api"]
		return s != nil && s.Meta[xds.MetaDialedDirectly] == "" && s.Meta[xds.MetaDirectPorts] == ""
	})

	// The slice marks the endpoint not serving: critical, saying so.
	es.Endpoints[0].Conditions = discoveryv1.EndpointConditions{Ready: ptrTo(false), Serving: ptrTo(false), Terminating: ptrTo(false)}
	if err := c.Update(ctx, &es); err != nil {
		t.Fatal(err)
	}
	reconcilePod(t, r, "api-1")
	expect("critical while not serving", func() bool {
		c := check("api-1-api")
		return c.Status == api.HealthCritical && strings.Contains(c.Output, "EndpointSlice shop/api-abc marks the endpoint not serving")
	})

	// Terminating (the slice says it first): deregistered at once.
	es.Endpoints[0].Conditions = discoveryv1.EndpointConditions{Ready: ptrTo(false), Serving: ptrTo(true), Terminating: ptrTo(true)}
	if err := c.Update(ctx, &es); err != nil {
		t.Fatal(err)
	}
	reconcilePod(t, r, "api-1")
	expect("deregistered while terminating", func() bool {
		s := services()
		return s["api-1-api"] == nil && s["api-1-api-sidecar-proxy"] == nil
	})

	// A second pod, then deleted.
	if err := c.Create(ctx, injectedPod("api-2", "api", 8080, true)); err != nil {
		t.Fatal(err)
	}
	reconcilePod(t, r, "api-2")
	expect("api-2 registered", func() bool { return services()["api-2-api"] != nil })

	// Removed from Consul behind the registrar's back: the resync sends
	// it back to the queue, and it is written again.
	if _, err := cat.Deregister(&api.CatalogDeregistration{Node: "node1-virtual", ServiceID: "api-2-api"}, nil); err != nil {
		t.Fatal(err)
	}
	r.resync(ctx, requeue)
	select {
	case ev := <-requeue:
		if ev.Object.GetNamespace() != "shop" || ev.Object.GetName() != "api-2" {
			t.Fatalf("resync requeued %s/%s, want shop/api-2", ev.Object.GetNamespace(), ev.Object.GetName())
		}
	default:
		t.Fatal("resync did not requeue the pod whose registration went missing")
	}
	reconcilePod(t, r, "api-2")
	expect("api-2 registered again", func() bool { return services()["api-2-api"] != nil })

	if err := c.Delete(ctx, injectedPod("api-2", "api", 8080, true)); err != nil {
		t.Fatal(err)
	}
	reconcilePod(t, r, "api-2")
	expect("api-2 deregistered", func() bool { return services()["api-2-api"] == nil && services()["api-2-api-sidecar-proxy"] == nil })

	// Workers reconcile pods at once (one pod never by two).
	var pods []string
	for i := range 8 {
		name := fmt.Sprintf("many-%d", i)
		if err := c.Create(ctx, injectedPod(name, "many", 8080, true)); err != nil {
			t.Fatal(err)
		}
		pods = append(pods, name)
	}
	errs := make(chan error, len(pods))
	for _, name := range pods {
		go func() {
			_, err := r.Reconcile(ctx, reconcile.Request{NamespacedName: types.NamespacedName{Namespace: "shop", Name: name}})
			errs <- err
		}()
	}
	for range pods {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	expect("8 pods registered at once", func() bool {
		n := 0
		for id := range services() {
			if strings.HasPrefix(id, "many-") {
				n++
			}
		}
		return n == 16
	})

	// A new term knows nothing of the last one's writes: it writes again
	// (idempotent), and its resync keeps what current pods should have.
	r2, _, _ := fakeTerm(t, cp.Catalog(), injectedPod("many-0", "many", 8080, true))
	r2.resync(ctx, requeue)
	expect("the new term removed the pods its API server does not have", func() bool {
		s := services()
		return s["many-0-many"] != nil && s["many-1-many"] == nil
	})
	reconcilePod(t, r2, "many-0")
}

// TestRegistrarNeedsKubeRules: with a token of consul.ControlPlaneACLRules
// (no node:write), the registrar's writes fail, and the error (which the
// controller logs and retries) names the permission missing and the rules
// to give.
func TestRegistrarNeedsKubeRules(t *testing.T) {
	if testing.Short() {
		t.Skip("-short: starts a real Consul agent (make test runs it)")
	}
	agent := devconsul.StartForTest(t)
	token, err := agent.ControlPlaneToken(context.Background(), false)
	if err != nil {
		t.Fatal(err)
	}
	cp, err := agent.NewClient(token)
	if err != nil {
		t.Fatal(err)
	}
	r, _, _ := fakeTerm(t, cp.Catalog(), injectedPod("api-1", "api", 8080, true))
	_, err = r.Reconcile(context.Background(), reconcile.Request{NamespacedName: types.NamespacedName{Namespace: "shop", Name: "api-1"}})
	if err == nil || !strings.Contains(err.Error(), "consul: ACL token lacks node:write on node1-virtual (needed for registering api-1-api on node node1-virtual)") ||
		!strings.Contains(err.Error(), "KubeControlPlaneACLRules") {
		t.Errorf("err = %v, want the permission missing and the rules to give", err)
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
	reg, ok := Register(pod, inject.Record{Service: "db", Port: 7000, PublicPort: 20000, Transparent: true}, svc, nil)
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

// TestRegisterServicePorts: the instance lists its Service's TCP ports
// with their target ports resolved (a number, a container port's name, an
// unset target meaning the port; an unknown name and a UDP port left out)
// in meta xds.MetaServicePorts; the proxy does not; one virtual address
// stays on the first port (consul-k8s's tagged address).
func TestRegisterServicePorts(t *testing.T) {
	pod := injectedPod("api-1", "api", 8080, true)
	pod.Spec.Containers = []corev1.Container{{Name: "app", Ports: []corev1.ContainerPort{
		{Name: "http", ContainerPort: 8080}, {Name: "grpc", ContainerPort: 9090}, {Name: "dns", ContainerPort: 5353, Protocol: corev1.ProtocolUDP}}}}
	svc := &corev1.Service{ObjectMeta: metav1.ObjectMeta{Name: "api", Namespace: "shop"},
		Spec: corev1.ServiceSpec{ClusterIP: "10.96.0.20", ClusterIPs: []string{"10.96.0.20"}, Ports: []corev1.ServicePort{
			{Name: "http", Port: 80, TargetPort: intstr.FromString("http")},
			{Name: "grpc", Port: 9090, TargetPort: intstr.FromString("grpc")},
			{Name: "admin", Port: 8081},
			{Name: "metrics", Port: 9100, TargetPort: intstr.FromInt32(9102)},
			{Name: "gone", Port: 7000, TargetPort: intstr.FromString("nosuchport")},
			{Name: "dns", Port: 53, TargetPort: intstr.FromString("dns"), Protocol: corev1.ProtocolUDP},
		}}}
	reg, ok := Register(pod, inject.Record{Service: "api", Port: 8080, PublicPort: 20000, Transparent: true}, svc, nil)
	if !ok {
		t.Fatal("not registered")
	}
	if got, want := reg.Instance.Service.Meta[xds.MetaServicePorts], "80:8080,9090:9090,8081:8081,9100:9102"; got != want {
		t.Errorf("instance meta %s = %q, want %q", xds.MetaServicePorts, got, want)
	}
	if v, ok := reg.Proxy.Service.Meta[xds.MetaServicePorts]; ok {
		t.Errorf("proxy carries %s = %q", xds.MetaServicePorts, v)
	}
	if v := reg.Instance.Service.TaggedAddresses[consul.VirtualTaggedAddress]; v.Address != "10.96.0.20" || v.Port != 80 {
		t.Errorf("virtual = %+v, want 10.96.0.20:80", v)
	}
}
