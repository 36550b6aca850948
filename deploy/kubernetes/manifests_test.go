// Package kubernetes_test checks meshlet's Kubernetes manifests: the
// kustomize base and every overlay build, and every object they produce
// decodes strictly with the Kubernetes scheme (unknown or duplicate fields
// are errors). That the real API server accepts them (kubectl apply
// --dry-run=server) is checked against the dev cluster in internal/kubee2e.
package kubernetes_test

import (
	"bytes"
	"slices"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	"k8s.io/client-go/kubernetes/scheme"
	"sigs.k8s.io/kustomize/api/krusty"
	"sigs.k8s.io/kustomize/kyaml/filesys"
)

// Build returns the objects of a kustomization directory as YAML
// documents.
func build(t *testing.T, dir string) [][]byte {
	t.Helper()
	k := krusty.MakeKustomizer(krusty.MakeDefaultOptions())
	m, err := k.Run(filesys.MakeFsOnDisk(), dir)
	if err != nil {
		t.Fatalf("kustomize build %s: %v", dir, err)
	}
	var docs [][]byte
	for _, r := range m.Resources() {
		b, err := r.AsYAML()
		if err != nil {
			t.Fatal(err)
		}
		docs = append(docs, b)
	}
	return docs
}

func TestManifestsDecodeStrictly(t *testing.T) {
	decoder := serializer.NewCodecFactory(scheme.Scheme, serializer.EnableStrict).UniversalDeserializer()
	for _, dir := range []string{"base", "overlays/dev"} {
		t.Run(dir, func(t *testing.T) {
			var kinds []string
			for _, doc := range build(t, dir) {
				obj, gvk, err := decoder.Decode(doc, nil, nil)
				if err != nil {
					t.Errorf("%v\n%s", err, doc)
					continue
				}
				_ = obj
				kinds = append(kinds, gvk.Kind)
				if bytes.Contains(doc, []byte("namespace: default")) {
					t.Errorf("%s in the default namespace:\n%s", gvk.Kind, doc)
				}
			}
			slices.Sort(kinds)
			want := []string{"ClusterRole", "ClusterRoleBinding", "ConfigMap", "ConfigMap", "Deployment", "MutatingWebhookConfiguration",
				"Namespace", "Role", "RoleBinding", "Service", "ServiceAccount"}
			if !slices.Equal(kinds, want) {
				t.Errorf("kinds %v, want %v", kinds, want)
			}
		})
	}
}

// TestExampleRunsEachServiceAsItsServiceAccount: the example application
// (examples/kubernetes) decodes strictly, and each Deployment runs as a
// ServiceAccount of the manifests named like the Service selecting it, as
// injection requires (a sidecar's identity is its pod's ServiceAccount).
func TestExampleRunsEachServiceAsItsServiceAccount(t *testing.T) {
	decoder := serializer.NewCodecFactory(scheme.Scheme, serializer.EnableStrict).UniversalDeserializer()
	accounts := map[string]bool{}
	var services []*corev1.Service
	var deployments []*appsv1.Deployment
	for _, doc := range build(t, "../../examples/kubernetes") {
		obj, _, err := decoder.Decode(doc, nil, nil)
		if err != nil {
			t.Fatalf("%v\n%s", err, doc)
		}
		switch o := obj.(type) {
		case *corev1.ServiceAccount:
			accounts[o.Name] = true
		case *corev1.Service:
			services = append(services, o)
		case *appsv1.Deployment:
			deployments = append(deployments, o)
		}
	}
	if len(deployments) == 0 {
		t.Fatal("no Deployments in examples/kubernetes")
	}
	for _, d := range deployments {
		var selecting []string
		for _, s := range services {
			if len(s.Spec.Selector) > 0 && labels.SelectorFromSet(s.Spec.Selector).Matches(labels.Set(d.Spec.Template.Labels)) {
				selecting = append(selecting, s.Name)
			}
		}
		sa := d.Spec.Template.Spec.ServiceAccountName
		switch {
		case len(selecting) != 1:
			t.Errorf("Deployment %s: Services %v select its pods, want one", d.Name, selecting)
		case sa != selecting[0]:
			t.Errorf("Deployment %s: serviceAccountName %q, want %q (its Service's name)", d.Name, sa, selecting[0])
		case !accounts[sa]:
			t.Errorf("Deployment %s: ServiceAccount %q is not in the manifests", d.Name, sa)
		}
	}
}
