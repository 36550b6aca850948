package kubee2e

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/meshlet/meshlet/controlplane/inject"
	"github.com/meshlet/meshlet/internal/meshkube"
	"github.com/meshlet/meshlet/internal/testutil"
	"github.com/meshlet/meshlet/xds"
)

// probeAs runs `sidecar xds-check` for node in a pod of ns (not injected)
// as ServiceAccount sa, verifying ADS with the namespace's CA root
// ConfigMap; token says which token it presents: "" none, "projected" a
// projected ServiceAccount token of audience meshlet, "default" the
// ServiceAccount token Kubernetes mounts (audience: the API server), or
// "secret:<name>" the token key of a Secret. It returns the pod's exit
// code and output.
func probeAs(t *testing.T, e *meshkube.Env, ns, name, sa, node, token string) (int32, string) {
	t.Helper()
	ctx := context.Background()
	args := []string{"xds-check", "-node-id", node, "-xds-addr", inject.DefaultXDSAddress, "-xds-ca-file", "/ca/" + xds.CARootKey, "-timeout", "20s"}
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{"meshlet.io/inject": "false", "test": "trust"}},
		Spec: corev1.PodSpec{
			ServiceAccountName: sa, RestartPolicy: corev1.RestartPolicyNever,
			Containers: []corev1.Container{{Name: "probe", Image: inject.DefaultImage, ImagePullPolicy: corev1.PullNever,
				Command:      []string{inject.SidecarBinary},
				VolumeMounts: []corev1.VolumeMount{{Name: "ca", MountPath: "/ca", ReadOnly: true}}}},
			Volumes: []corev1.Volume{{Name: "ca", VolumeSource: corev1.VolumeSource{ConfigMap: &corev1.ConfigMapVolumeSource{
				LocalObjectReference: corev1.LocalObjectReference{Name: xds.CARootConfigMap}}}}},
		},
	}
	c := &pod.Spec.Containers[0]
	switch {
	case token == "projected":
		exp := int64(xds.TokenExpirationSeconds)
		pod.Spec.Volumes = append(pod.Spec.Volumes, corev1.Volume{Name: "token", VolumeSource: corev1.VolumeSource{Projected: &corev1.ProjectedVolumeSource{
			Sources: []corev1.VolumeProjection{{ServiceAccountToken: &corev1.ServiceAccountTokenProjection{Audience: xds.TokenAudience, ExpirationSeconds: &exp, Path: "token"}}}}}})
		c.VolumeMounts = append(c.VolumeMounts, corev1.VolumeMount{Name: "token", MountPath: "/token", ReadOnly: true})
		args = append(args, "-token-file", "/token/token")
	case token == "default":
		args = append(args, "-token-file", "/var/run/secrets/kubernetes.io/serviceaccount/token")
	case strings.HasPrefix(token, "secret:"):
		pod.Spec.Volumes = append(pod.Spec.Volumes, corev1.Volume{Name: "token", VolumeSource: corev1.VolumeSource{Secret: &corev1.SecretVolumeSource{
			SecretName: strings.TrimPrefix(token, "secret:")}}})
		c.VolumeMounts = append(c.VolumeMounts, corev1.VolumeMount{Name: "token", MountPath: "/token", ReadOnly: true})
		args = append(args, "-token-file", "/token/token")
	}
	c.Args = args
	pods := e.Client().CoreV1().Pods(ns)
	if _, err := pods.Create(ctx, pod, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = pods.Delete(context.Background(), name, metav1.DeleteOptions{GracePeriodSeconds: ptr(int64(0))})
	})
	var code int32
	testutil.Until(t, 90*time.Second, "probe pod "+name+" done", func() bool {
		p, err := pods.Get(ctx, name, metav1.GetOptions{})
		if err != nil || len(p.Status.ContainerStatuses) == 0 || p.Status.ContainerStatuses[0].State.Terminated == nil {
			return false
		}
		code = p.Status.ContainerStatuses[0].State.Terminated.ExitCode
		return true
	})
	out, err := pods.GetLogs(name, &corev1.PodLogOptions{}).Do(ctx).Raw()
	if err != nil {
		t.Fatal(err)
	}
	return code, string(out)
}

// TestADSTrustInCluster: from inside pods of the cluster, against the
// control plane installed from deploy/kubernetes (TokenReviews against the
// real API server): no credential, another service's projected token, the
// ServiceAccount's default token (the API server's audience), and the
// token of a pod since deleted all get no configuration and no key of the
// api pod's sidecar, each refused with its reason. The api pod's own
// sidecar, with its projected token, is served (it gets Ready).
func TestADSTrustInCluster(t *testing.T) {
	e := mesh(t)
	ctx := context.Background()
	const ns = "trust"
	ensureNamespace(t, e, ns, true)
	serviceAccount(t, e, ns, "web")
	serviceAccount(t, e, ns, "api")
	api := meshPod(t, e, ns, "api-0", "api")
	created, err := e.Client().CoreV1().Pods(ns).Create(ctx, api, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, 2*time.Minute, "api-0 Ready (its sidecar served over TLS with its projected token)", func() error { return podReady(e, ns, "api-0") })
	node := xds.ProxyID("api-0", "api.trust")

	for _, tc := range []struct {
		name, pod, sa, token string
		want                 xds.AuthDenial
	}{
		{name: "no credential", pod: "probe-none", sa: "api", token: "", want: xds.DenyNoCredential},
		{name: "another service's token", pod: "probe-web", sa: "web", token: "projected", want: xds.DenyWrongNode},
		{name: "the API server's audience", pod: "probe-audience", sa: "api", token: "default", want: xds.DenyInvalidToken},
		{name: "its own ServiceAccount, another pod", pod: "probe-other-pod", sa: "api", token: "projected", want: xds.DenyWrongNode},
	} {
		t.Run(tc.name, func(t *testing.T) {
			code, out := probeAs(t, e, ns, tc.pod, tc.sa, node, tc.token)
			expectRefused(t, code, out, tc.want)
		})
	}

	t.Run("token of a deleted pod", func(t *testing.T) {
		// The attacker who had api-0 kept its sidecar's token (read here
		// from the kubelet's volume, as root on the node could).
		path := filepath.Join(e.Cluster.KubeletDir(), "pods", string(created.UID), "volumes", "kubernetes.io~projected", inject.TokenVolume, "token")
		tok, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		sec := &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: "stolen", Namespace: ns}, Data: map[string][]byte{"token": tok}}
		if _, err := e.Client().CoreV1().Secrets(ns).Create(ctx, sec, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		if err := e.Client().CoreV1().Pods(ns).Delete(ctx, "api-0", metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
		testutil.Until(t, 2*time.Minute, "api-0 gone", func() bool {
			_, err := e.Client().CoreV1().Pods(ns).Get(ctx, "api-0", metav1.GetOptions{})
			return apierrors.IsNotFound(err)
		})
		code, out := probeAs(t, e, ns, "probe-deleted-pod", "web", node, "secret:stolen")
		if code == 0 || !strings.Contains(out, "not served") ||
			!strings.Contains(out, string(xds.DenyUnregisteredNode)) && !strings.Contains(out, string(xds.DenyInvalidToken)) {
			t.Fatalf("exit %d, want a refusal (unregistered_node or invalid_token):\n%s", code, out)
		}
		t.Logf("the deleted pod's token: %s", strings.TrimSpace(out))
	})

	metrics, err := controlPlaneMetrics(e)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{`meshlet_controlplane_xds_auth_lookups_total{authority="kubernetes",result="ok"}`,
		`meshlet_controlplane_xds_auth_lookups_total{authority="kubernetes",result="invalid"}`} {
		if !strings.Contains(metrics, want) {
			t.Errorf("control plane metrics lack %s:\n%s", want, grepLines(metrics, "xds_auth"))
		}
	}
}

func expectRefused(t *testing.T, code int32, out string, want xds.AuthDenial) {
	t.Helper()
	if code == 0 || !strings.Contains(out, "not served") || !strings.Contains(out, fmt.Sprintf("(%s)", want)) || strings.Contains(out, "private key received") {
		t.Fatalf("exit %d, want refused (%s) and nothing served:\n%s", code, want, out)
	}
	t.Logf("%s", strings.TrimSpace(out))
}

// TestServiceNotItsServiceAccountRefused: a pod that claims service api
// while running as ServiceAccount web is refused at admission, the message
// naming its ServiceAccount, the service and the setting that would allow
// it; allowed by that setting (MeshDefaults spec.serviceAccounts, through
// the policies ConfigMap), the same pod is admitted.
func TestServiceNotItsServiceAccountRefused(t *testing.T) {
	e := mesh(t)
	ctx := context.Background()
	ensureNamespace(t, e, "shop", true)
	serviceAccount(t, e, "shop", "web")
	pod := testPod("web-as-api")
	pod.Annotations = map[string]string{inject.AnnotationService: "api"}
	pod.Spec.ServiceAccountName = "web"
	_, err := e.Client().CoreV1().Pods("shop").Create(ctx, pod, metav1.CreateOptions{DryRun: []string{metav1.DryRunAll}})
	if err == nil || !strings.Contains(err.Error(), `ServiceAccount "web" may not act as service "api"`) ||
		!strings.Contains(err.Error(), "MeshDefaults spec.serviceAccounts") {
		t.Fatalf("err = %v, want the refusal naming ServiceAccount, service and setting", err)
	}
	t.Logf("refused: %v", err)

	binding := `apiVersion: meshlet.io/v1alpha1
kind: MeshDefaults
metadata: {name: mesh}
spec:
  serviceAccounts:
  - {namespace: shop, serviceAccount: web, services: [api]}
`
	if err := e.SetPolicyData(ctx, map[string]string{"mesh.yaml": binding}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := e.SetPolicies(context.Background(), filepath.Join(e.Root, meshkube.ExamplePolicies)); err != nil {
			t.Error(err)
		}
	})
	testutil.Eventually(t, 90*time.Second, "the binding in force at admission", func() error {
		_, err := e.Client().CoreV1().Pods("shop").Create(ctx, pod, metav1.CreateOptions{DryRun: []string{metav1.DryRunAll}})
		return err
	})
}
