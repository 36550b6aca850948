// Package kubernetes_test checks meshlet's Kubernetes manifests: the
// kustomize base and every overlay build, and every object they produce
// decodes strictly with the Kubernetes scheme (unknown or duplicate fields
// are errors). That the real API server accepts them (kubectl apply
// --dry-run=server) is checked against the dev cluster in internal/kubee2e.
package kubernetes_test

import (
	"bytes"
	"net"
	"slices"
	"strconv"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	"k8s.io/client-go/kubernetes/scheme"
	"sigs.k8s.io/kustomize/api/krusty"
	"sigs.k8s.io/kustomize/kyaml/filesys"
	"sigs.k8s.io/yaml"

	"github.com/meshlet/meshlet/controlplane/policy"
	"github.com/meshlet/meshlet/internal/devjaeger"
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
	// Base: meshlet alone. The dev overlay adds components/jaeger: its
	// Deployment, Service and configuration.
	base := []string{"ClusterRole", "ClusterRoleBinding", "ConfigMap", "ConfigMap", "ConfigMap", "Deployment", "MutatingWebhookConfiguration",
		"Namespace", "Role", "RoleBinding", "Service", "ServiceAccount"}
	dev := slices.Concat(base, []string{"ConfigMap", "Deployment", "Service"})
	for dir, want := range map[string][]string{"base": base, "overlays/dev": dev} {
		slices.Sort(want)
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

// objects decodes the objects of a kustomization directory.
func objects(t *testing.T, dir string) []runtime.Object {
	t.Helper()
	decoder := serializer.NewCodecFactory(scheme.Scheme, serializer.EnableStrict).UniversalDeserializer()
	var objs []runtime.Object
	for _, doc := range build(t, dir) {
		obj, _, err := decoder.Decode(doc, nil, nil)
		if err != nil {
			t.Fatalf("%v\n%s", err, doc)
		}
		objs = append(objs, obj)
	}
	return objs
}

func find[T metav1.Object](objs []runtime.Object, name string) T {
	var zero T
	for _, o := range objs {
		if v, ok := o.(T); ok && v.GetName() == name {
			return v
		}
	}
	return zero
}

// TestTracingSetting: the base exports no spans (meshlet-tracing's
// otlp-endpoint is empty) and passes the ConfigMap to the control plane
// (MESHLET_OTLP_ENDPOINT, -otlp-protocol); the dev overlay, with
// components/jaeger, points it at the Jaeger Service, and that Jaeger
// listens where its Service, probes and the endpoint say.
func TestTracingSetting(t *testing.T) {
	for _, tc := range []struct {
		name, dir, endpoint, image string
	}{
		{name: "base: tracing off", dir: "base"},
		{name: "dev: components/jaeger", dir: "overlays/dev", endpoint: "meshlet-jaeger.meshlet-system.svc:4317",
			image: "meshlet.local/jaeger:" + devjaeger.Version},
	} {
		t.Run(tc.name, func(t *testing.T) {
			objs := objects(t, tc.dir)
			cm := find[*corev1.ConfigMap](objs, "meshlet-tracing")
			if cm == nil {
				t.Fatal("no ConfigMap meshlet-tracing")
			}
			if got := cm.Data["otlp-endpoint"]; got != tc.endpoint {
				t.Errorf("otlp-endpoint %q, want %q", got, tc.endpoint)
			}
			if tc.endpoint != "" {
				c := policy.Collector{Protocol: cm.Data["otlp-protocol"], Endpoint: cm.Data["otlp-endpoint"]}
				if err := c.Validate(); err != nil {
					t.Errorf("the control plane would refuse meshlet-tracing: %v", err)
				}
			}
			cp := find[*appsv1.Deployment](objs, "meshlet-controlplane").Spec.Template.Spec.Containers[0]
			fromCM := map[string]string{}
			for _, e := range cp.Env {
				if e.ValueFrom != nil && e.ValueFrom.ConfigMapKeyRef != nil && e.ValueFrom.ConfigMapKeyRef.Name == cm.Name {
					fromCM[e.Name] = e.ValueFrom.ConfigMapKeyRef.Key
				}
			}
			if fromCM["MESHLET_OTLP_ENDPOINT"] != "otlp-endpoint" || fromCM["MESHLET_OTLP_PROTOCOL"] != "otlp-protocol" ||
				!slices.Contains(cp.Args, "-otlp-protocol=$(MESHLET_OTLP_PROTOCOL)") {
				t.Errorf("the control plane does not read meshlet-tracing: env %v, args %v", fromCM, cp.Args)
			}
			dep := find[*appsv1.Deployment](objs, "meshlet-jaeger")
			if tc.endpoint == "" {
				if dep != nil {
					t.Error("Jaeger in the base")
				}
				return
			}
			if dep == nil {
				t.Fatal("no Deployment meshlet-jaeger")
			}
			svc := find[*corev1.Service](objs, "meshlet-jaeger")
			if svc == nil || svc.Namespace != "meshlet-system" ||
				!labels.SelectorFromSet(svc.Spec.Selector).Matches(labels.Set(dep.Spec.Template.Labels)) {
				t.Fatalf("Service meshlet-jaeger %+v does not select Jaeger's pods", svc)
			}
			host, port, _ := net.SplitHostPort(tc.endpoint)
			if host != svc.Name+"."+svc.Namespace+".svc" {
				t.Errorf("otlp-endpoint host %s is not the Service %s/%s", host, svc.Namespace, svc.Name)
			}
			c := dep.Spec.Template.Spec.Containers[0]
			if c.Image != tc.image || c.ImagePullPolicy != corev1.PullNever {
				t.Errorf("Jaeger image %s (pull %s), want %s (Never)", c.Image, c.ImagePullPolicy, tc.image)
			}
			// Every port of the Service and the probes is one Jaeger
			// listens on (config.yaml, all on 0.0.0.0: the pod's
			// addresses), and the endpoint is one of the Service's.
			byName := map[string]int32{}
			for _, p := range c.Ports {
				byName[p.Name] = p.ContainerPort
			}
			cfgMap := find[*corev1.ConfigMap](objs, dep.Spec.Template.Spec.Volumes[0].ConfigMap.Name)
			if cfgMap == nil {
				t.Fatalf("Jaeger's configuration ConfigMap %s is not in the manifests", dep.Spec.Template.Spec.Volumes[0].ConfigMap.Name)
			}
			listens := jaegerListeners(t, cfgMap.Data["jaeger.yaml"])
			svcPorts := map[string]bool{}
			for _, p := range svc.Spec.Ports {
				svcPorts[strconv.Itoa(int(p.Port))] = true
				cport := byName[p.TargetPort.StrVal]
				if !listens[net.JoinHostPort("0.0.0.0", strconv.Itoa(int(cport)))] {
					t.Errorf("Service port %s → %s (%d): Jaeger does not listen there (%v)", p.Name, p.TargetPort.StrVal, cport, listens)
				}
			}
			if !svcPorts[port] {
				t.Errorf("otlp-endpoint port %s is not a port of the Service", port)
			}
			for _, probe := range []*corev1.Probe{c.ReadinessProbe, c.LivenessProbe} {
				if !listens[net.JoinHostPort("0.0.0.0", strconv.Itoa(int(byName[probe.HTTPGet.Port.StrVal])))] {
					t.Errorf("probe port %s: Jaeger does not listen there", probe.HTTPGet.Port.StrVal)
				}
			}
			if !slices.Contains(c.Args, "--config=/etc/jaeger/jaeger.yaml") || c.VolumeMounts[0].MountPath != "/etc/jaeger" {
				t.Errorf("Jaeger runs with %v, mounts %v", c.Args, c.VolumeMounts)
			}
		})
	}
}

// jaegerListeners returns the endpoints of a Jaeger configuration: the
// OTLP receivers, the query API and the health check.
func jaegerListeners(t *testing.T, config string) map[string]bool {
	t.Helper()
	var cfg struct {
		Receivers struct {
			OTLP struct {
				Protocols struct {
					GRPC, HTTP struct{ Endpoint string }
				}
			}
		}
		Extensions struct {
			Query struct {
				GRPC, HTTP struct{ Endpoint string }
			} `json:"jaeger_query"`
			Health struct {
				HTTP struct{ Endpoint string }
			} `json:"healthcheckv2"`
		}
	}
	if err := yaml.Unmarshal([]byte(config), &cfg); err != nil {
		t.Fatalf("Jaeger's configuration: %v", err)
	}
	out := map[string]bool{}
	for _, e := range []string{cfg.Receivers.OTLP.Protocols.GRPC.Endpoint, cfg.Receivers.OTLP.Protocols.HTTP.Endpoint,
		cfg.Extensions.Query.GRPC.Endpoint, cfg.Extensions.Query.HTTP.Endpoint, cfg.Extensions.Health.HTTP.Endpoint} {
		if e == "" {
			t.Errorf("Jaeger's configuration leaves an endpoint to its default (localhost in Jaeger v2): %+v", cfg)
		}
		out[e] = true
	}
	return out
}
