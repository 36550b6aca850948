package kubee2e

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/util/retry"

	"github.com/meshlet/meshlet/controlplane/inject"
	"github.com/meshlet/meshlet/controlplane/kube"
	"github.com/meshlet/meshlet/internal/meshkube"
	"github.com/meshlet/meshlet/internal/testutil"
)

// controlPlaneLogs is the log of every control plane pod now running.
func controlPlaneLogs(e *meshkube.Env) string {
	out, _ := e.Cluster.Kubectl(context.Background(), "-n", meshkube.Namespace, "logs", "-l", "app.kubernetes.io/name=meshlet-controlplane",
		"--tail=-1", "--prefix")
	return out
}

// leaseHolder is the registrar Lease's holder ("" when none).
func leaseHolder(e *meshkube.Env) string {
	l, err := e.Client().CoordinationV1().Leases(meshkube.Namespace).Get(context.Background(), kube.DefaultLeaseName, metav1.GetOptions{})
	if err != nil || l.Spec.HolderIdentity == nil {
		return ""
	}
	return *l.Spec.HolderIdentity
}

// meshDeployment is a Deployment of the test app injected as service name
// (its ServiceAccount, which it creates).
func meshDeployment(t *testing.T, e *meshkube.Env, ns, name string) *appsv1.Deployment {
	t.Helper()
	pod := meshPod(t, e, ns, name, name)
	pod.Labels = map[string]string{"app": name}
	return &appsv1.Deployment{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns},
		Spec: appsv1.DeploymentSpec{
			Selector: &metav1.LabelSelector{MatchLabels: pod.Labels},
			Template: corev1.PodTemplateSpec{ObjectMeta: pod.ObjectMeta, Spec: pod.Spec},
		},
	}
}

// TestRegistrarRegainsLease: the one control plane replica loses the
// registrar's Lease (another holder writes it, as a replica cut off from
// the API server for longer than the renew deadline would find) and, when
// that holder does not renew, takes it back; its registrar, started
// afresh for the new term, registers a Deployment created afterwards,
// whose pod gets Ready (its sidecar is served only once registered).
func TestRegistrarRegainsLease(t *testing.T) {
	e := mesh(t)
	ensureNamespace(t, e, "shop", true)
	ctx := context.Background()
	// One replica (the dev overlay's; an earlier test may have scaled it
	// to two and back).
	var leader string
	testutil.Eventually(t, 2*time.Minute, "one control plane replica", func() error {
		l, err := e.Client().CoreV1().Pods(meshkube.Namespace).List(ctx, metav1.ListOptions{LabelSelector: "app.kubernetes.io/name=meshlet-controlplane"})
		if err != nil {
			return err
		}
		if len(l.Items) != 1 {
			return fmt.Errorf("%d pods", len(l.Items))
		}
		leader = l.Items[0].Name
		return podReady(e, meshkube.Namespace, leader)
	})
	testutil.Eventually(t, time.Minute, "the replica leads", func() error {
		if h := leaseHolder(e); h != leader {
			return fmt.Errorf("lease held by %q", h)
		}
		return nil
	})
	termsOver := strings.Count(controlPlaneLogs(e), "kube: leadership term over")

	// Another holder takes the Lease for 15 s (retrying when the leader
	// renewed in between: the update is optimistic, as the elector's).
	leases := e.Client().CoordinationV1().Leases(meshkube.Namespace)
	err := retry.RetryOnConflict(retry.DefaultRetry, func() error {
		l, err := leases.Get(ctx, kube.DefaultLeaseName, metav1.GetOptions{})
		if err != nil {
			return err
		}
		intruder, now, d := "intruder", metav1.NewMicroTime(time.Now()), int32(15)
		l.Spec.HolderIdentity, l.Spec.AcquireTime, l.Spec.RenewTime, l.Spec.LeaseDurationSeconds = &intruder, &now, &now, &d
		_, err = leases.Update(ctx, l, metav1.UpdateOptions{})
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	lost := time.Now()
	testutil.Eventually(t, time.Minute, "the leader's term ends", func() error {
		if n := strings.Count(controlPlaneLogs(e), "kube: leadership term over"); n <= termsOver {
			return fmt.Errorf("%d terms over in the log, %d before (lease held by %q)", n, termsOver, leaseHolder(e))
		}
		return nil
	})
	t.Logf("figure: the registrar's term ended %v after another holder took its Lease", time.Since(lost).Round(100*time.Millisecond))
	testutil.Eventually(t, time.Minute, "the replica leads again", func() error {
		if h := leaseHolder(e); h != leader {
			return fmt.Errorf("lease held by %q", h)
		}
		return nil
	})
	t.Logf("figure: leadership regained %v after it was taken", time.Since(lost).Round(100*time.Millisecond))

	intention(t, e, "regained.shop", "api.shop")
	d := meshDeployment(t, e, "shop", "regained")
	if _, err := e.Client().AppsV1().Deployments("shop").Create(ctx, d, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = e.Client().AppsV1().Deployments("shop").Delete(context.Background(), "regained", metav1.DeleteOptions{})
	})
	appReady(t, e, "shop", 2*time.Minute, "regained")
	testutil.Eventually(t, time.Minute, "the new term registers the Deployment's pod", func() error {
		entries, _, err := e.Consul.Client.Health().Service("regained.shop", "", true, nil)
		if err != nil || len(entries) != 1 {
			return fmt.Errorf("%d passing instances (%v)", len(entries), err)
		}
		return nil
	})
	logs := controlPlaneLogs(e)
	if !strings.Contains(logs, "kube: registrar starting") || !strings.Contains(logs, "pod=shop/regained-") {
		t.Errorf("the control plane's log does not show the new term registering the pod:\n%s", lastLines(logs, 30))
	}
	// controller-runtime logs through the control plane's logger.
	if strings.Contains(logs, "log.SetLogger(...) was never called") {
		t.Errorf("controller-runtime's logger was never set:\n%s", lastLines(logs, 30))
	}
	if testing.Verbose() {
		t.Logf("the control plane's log of the lost and regained lease:\n%s", lastLines(logs, 60))
	}
}

// TestControlPlaneRestartAdmitsNoWrongService: pods created one after the
// other while the control plane restarts (a rollout, then its pod deleted)
// are each admitted with the service of the Service selecting them, or
// refused while no replica is ready — never named from a cache that has
// not synced. The pods' ServiceAccount may act as both the Service's name
// and their workload's, so a wrong name would be admitted, not refused.
func TestControlPlaneRestartAdmitsNoWrongService(t *testing.T) {
	e := mesh(t)
	ensureNamespace(t, e, "shop", true)
	ctx := context.Background()
	serviceAccount(t, e, "shop", "streamer")
	cm, err := e.Client().CoreV1().ConfigMaps(meshkube.Namespace).Get(ctx, meshkube.PoliciesConfig, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	original, policies := cm.Data, map[string]string{}
	for k, v := range cm.Data {
		policies[k] = v
	}
	if !strings.Contains(policies["mesh.yaml"], "spec:") || strings.Contains(policies["mesh.yaml"], "serviceAccounts:") {
		t.Fatalf("mesh.yaml of the policies ConfigMap is not the expected MeshDefaults:\n%s", policies["mesh.yaml"])
	}
	policies["mesh.yaml"] = strings.TrimRight(policies["mesh.yaml"], "\n") +
		"\n  serviceAccounts:\n  - {namespace: shop, serviceAccount: streamer, services: [restarted, stream]}\n"
	if err := e.SetPolicyData(ctx, policies); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := e.SetPolicyData(context.Background(), original); err != nil {
			t.Error(err)
		}
	})
	svc := &corev1.Service{ObjectMeta: metav1.ObjectMeta{Name: "restarted", Namespace: "shop"},
		Spec: corev1.ServiceSpec{Selector: map[string]string{"app": "restarted"}, Ports: []corev1.ServicePort{{Port: 80}}}}
	if _, err := e.Client().CoreV1().Services("shop").Create(ctx, svc, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = e.Client().CoreV1().Services("shop").Delete(context.Background(), "restarted", metav1.DeleteOptions{})
	})

	// The stream: server-side dry runs, which the webhook admits as it
	// would the pods (GenerateName stream-: the workload name is "stream").
	pod := testPod("stream")
	pod.Name, pod.GenerateName, pod.Labels = "", "stream-", map[string]string{"app": "restarted"}
	pod.Spec.ServiceAccountName = "streamer"
	create := func() (string, error) {
		got, err := e.Client().CoreV1().Pods("shop").Create(ctx, pod, metav1.CreateOptions{DryRun: []string{metav1.DryRunAll}})
		if err != nil {
			return "", err
		}
		rec, ok, err := inject.ParseRecord(got)
		if !ok || err != nil {
			return "", fmt.Errorf("admitted without an injection record (%v)", err)
		}
		return rec.Service, nil
	}
	// The binding is in force (the policies are reloaded within a minute
	// or so: the kubelet's ConfigMap sync) before the stream starts.
	testutil.Eventually(t, 2*time.Minute, "the ServiceAccount binding in force", func() error {
		p := pod.DeepCopy()
		p.Annotations = map[string]string{inject.AnnotationService: "stream"}
		_, err := e.Client().CoreV1().Pods("shop").Create(ctx, p, metav1.CreateOptions{DryRun: []string{metav1.DryRunAll}})
		return err
	})
	if s, err := create(); err != nil || s != "restarted" {
		t.Fatalf("before the restart: service %q, %v", s, err)
	}

	type result struct {
		at      time.Time
		service string
		err     error
	}
	var mu sync.Mutex
	var results []result
	streamCtx, stop := context.WithCancel(ctx)
	streamed := make(chan struct{})
	go func() {
		defer close(streamed)
		tick := time.NewTicker(50 * time.Millisecond)
		defer tick.Stop()
		for {
			s, err := create()
			mu.Lock()
			results = append(results, result{time.Now(), s, err})
			mu.Unlock()
			select {
			case <-streamCtx.Done():
				return
			case <-tick.C:
			}
		}
	}()
	t.Cleanup(func() {
		stop()
		<-streamed
	})
	restarted := func(how string, args ...string) {
		t.Helper()
		before := pods(t, e, meshkube.Namespace, "app.kubernetes.io/name=meshlet-controlplane")
		kubectl(t, e, args...)
		testutil.Eventually(t, 3*time.Minute, "the control plane "+how, func() error {
			now := pods(t, e, meshkube.Namespace, "app.kubernetes.io/name=meshlet-controlplane")
			if len(now) != 1 || slices.ContainsFunc(before, func(p corev1.Pod) bool { return p.Name == now[0].Name }) {
				return fmt.Errorf("%d pods", len(now))
			}
			return podReady(e, meshkube.Namespace, now[0].Name)
		})
		if err := e.WaitInjecting(ctx, 2*time.Minute); err != nil {
			t.Fatal(err)
		}
	}
	restarted("rolled out", "-n", meshkube.Namespace, "rollout", "restart", "deployment/"+meshkube.Deployment)
	cps := pods(t, e, meshkube.Namespace, "app.kubernetes.io/name=meshlet-controlplane")
	restarted("replaced after its pod was deleted", "-n", meshkube.Namespace, "delete", "pod", cps[0].Name, "--wait=false")
	if rp := pods(t, e, meshkube.Namespace, "app.kubernetes.io/name=meshlet-controlplane")[0].Spec.Containers[0].ReadinessProbe; rp == nil ||
		rp.HTTPGet == nil || rp.HTTPGet.Path != kube.ReadyPath {
		t.Errorf("the control plane's readinessProbe is %+v, want %s", rp, kube.ReadyPath)
	}
	done := time.Now()
	testutil.Until(t, time.Minute, "admissions after the restarts", func() bool {
		mu.Lock()
		defer mu.Unlock()
		n := 0
		for _, r := range results {
			if r.at.After(done) && r.err == nil {
				n++
			}
		}
		return n >= 20
	})
	stop()
	<-streamed

	admitted, refusals := 0, map[string]int{}
	for _, r := range results {
		switch {
		case r.err != nil:
			refusals[firstLine(r.err.Error())]++
		case r.service == "restarted":
			admitted++
		default:
			t.Errorf("a pod admitted at %s as service %q, want restarted (the Service selecting it)", r.at.Format(time.TimeOnly), r.service)
		}
	}
	t.Logf("figure: %d pods created while the control plane restarted twice: %d admitted as the Service selecting them, %d refused while no replica served",
		len(results), admitted, len(results)-admitted)
	for msg, n := range refusals {
		t.Logf("refused %d×: %s", n, msg)
	}
}

func firstLine(s string) string {
	s, _, _ = strings.Cut(s, "\n")
	return s
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}
