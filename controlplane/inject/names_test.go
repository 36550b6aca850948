package inject

import "testing"

func TestServiceNames(t *testing.T) {
	for _, tc := range []struct {
		name       string
		names      ServiceNames
		ns, svc    string
		consul     string
		fromNS     string
		kube       string
		kubeInNSOK bool
	}{
		{name: "namespaced", names: NamespacedNames, ns: "shop", svc: "api", consul: "api.shop", fromNS: "shop", kube: "api", kubeInNSOK: true},
		{name: "default is namespaced", ns: "shop", svc: "api", consul: "api.shop", fromNS: "shop", kube: "api", kubeInNSOK: true},
		{name: "namespaced, seen from another namespace", names: NamespacedNames, ns: "shop", svc: "api", consul: "api.shop", fromNS: "prod", kubeInNSOK: false},
		{name: "a dashed namespace stays apart", names: NamespacedNames, ns: "a-b", svc: "api", consul: "api.a-b", fromNS: "b", kubeInNSOK: false},
		{name: "flat", names: FlatNames, ns: "shop", svc: "api", consul: "api", fromNS: "prod", kube: "api", kubeInNSOK: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := tc.names.Consul(tc.ns, tc.svc); got != tc.consul {
				t.Fatalf("Consul(%s, %s) = %q, want %q", tc.ns, tc.svc, got, tc.consul)
			}
			kube, ok := tc.names.Kubernetes(tc.fromNS, tc.consul)
			if ok != tc.kubeInNSOK || ok && kube != tc.kube {
				t.Fatalf("Kubernetes(%s, %s) = %q %t, want %q %t", tc.fromNS, tc.consul, kube, ok, tc.kube, tc.kubeInNSOK)
			}
		})
	}
	if err := ServiceNames("nested").Validate(); err == nil {
		t.Fatal("an unknown mode validated")
	}
}
