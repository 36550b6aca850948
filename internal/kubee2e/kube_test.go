// Package kubee2e tests meshlet on a real one-node Kubernetes cluster
// (internal/devkube: etcd, kube-apiserver, controller-manager, scheduler,
// kubelet with containerd, kube-proxy, CoreDNS), installed the way users
// install it (internal/meshkube: kubectl apply -k deploy/kubernetes/overlays/dev,
// Consul beside the cluster). It needs root, `make kube images`, bin/consul
// and the Debian packages of `deploy/tools/deps.sh kube`; -short skips it.
package kubee2e

import (
	"bufio"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
	batchv1 "k8s.io/api/batch/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/meshlet/meshlet/controlplane/consul"
	"github.com/meshlet/meshlet/controlplane/inject"
	"github.com/meshlet/meshlet/controlplane/kube"
	"github.com/meshlet/meshlet/internal/devkube"
	"github.com/meshlet/meshlet/internal/meshkube"
	"github.com/meshlet/meshlet/internal/testutil"
	"github.com/meshlet/meshlet/xds"
)

var (
	envOnce sync.Once
	env     *meshkube.Env
	envErr  error
)

func TestMain(m *testing.M) {
	flag.Parse()
	// Tests of devkube that compare the host before and after a cluster
	// must not see this binary's cluster start or stop.
	release, err := devkube.LockHostForTests(false)
	if err != nil {
		fmt.Fprintln(os.Stderr, "kubee2e:", err)
		os.Exit(1)
	}
	code := m.Run()
	if env != nil {
		if err := env.Stop(); err != nil {
			fmt.Fprintln(os.Stderr, "kubee2e: stop:", err)
			code = 1
		}
	}
	release()
	os.Exit(code)
}

// mesh returns the shared cluster with meshlet installed, starting it on
// first use (about a minute warm).
func mesh(t *testing.T) *meshkube.Env {
	t.Helper()
	if testing.Short() {
		t.Skip("-short: no Kubernetes cluster")
	}
	envOnce.Do(func() {
		log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
		ctx, cancel := context.WithTimeout(context.Background(), 6*time.Minute)
		defer cancel()
		root, _ := filepath.Abs("../..")
		env, envErr = meshkube.Up(ctx, meshkube.Options{Root: root, PolicyDir: filepath.Join(root, meshkube.ExamplePolicies), Log: log,
			Images: []string{meshkube.ExamplesImage, meshkube.TestAppImage, redisImage}})
	})
	if envErr != nil {
		t.Fatalf("the cluster with meshlet: %v", envErr)
	}
	return env
}

func kubectl(t *testing.T, e *meshkube.Env, args ...string) string {
	t.Helper()
	out, err := e.Cluster.Kubectl(context.Background(), args...)
	if err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	return out
}

// httpGet GETs url from inside the cluster's network namespace.
func httpGet(e *meshkube.Env, url string) (int, []byte, error) {
	c := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{DialContext: e.Cluster.DialContext, DisableKeepAlives: true}}
	resp, err := c.Get(url)
	if err != nil {
		return 0, nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, b, err
}

func intention(t *testing.T, e *meshkube.Env, source, destination string) {
	t.Helper()
	entry := &api.ServiceIntentionsConfigEntry{Kind: api.ServiceIntentions, Name: destination}
	if got, _, err := e.Consul.Client.ConfigEntries().Get(api.ServiceIntentions, destination, nil); err == nil {
		entry = got.(*api.ServiceIntentionsConfigEntry)
	}
	entry.Sources = slices.DeleteFunc(entry.Sources, func(s *api.SourceIntention) bool { return s.Name == source })
	entry.Sources = append(entry.Sources, &api.SourceIntention{Name: source, Action: api.IntentionActionAllow})
	if _, _, err := e.Consul.Client.ConfigEntries().Set(entry, nil); err != nil {
		t.Fatal(err)
	}
}

func TestManifestsAcceptedByTheAPIServer(t *testing.T) {
	e := mesh(t)
	for _, dir := range []string{"deploy/kubernetes/base", meshkube.Overlay} {
		out := kubectl(t, e, "apply", "--dry-run=server", "-k", filepath.Join(e.Root, dir))
		if !strings.Contains(out, "(server dry run)") {
			t.Errorf("%s: %s", dir, out)
		}
	}
}

// appReady waits until every pod of the Deployments is Ready.
func appReady(t *testing.T, e *meshkube.Env, ns string, timeout time.Duration, names ...string) {
	t.Helper()
	for _, name := range names {
		testutil.Eventually(t, timeout, "deployment "+ns+"/"+name+" available", func() error {
			d, err := e.Client().AppsV1().Deployments(ns).Get(context.Background(), name, metav1.GetOptions{})
			if err != nil {
				return err
			}
			want := int32(1)
			if d.Spec.Replicas != nil {
				want = *d.Spec.Replicas
			}
			if d.Status.ReadyReplicas != want || d.Status.UpdatedReplicas != want || d.Status.Replicas != want {
				return fmt.Errorf("ready %d of %d (%d pods)%s", d.Status.ReadyReplicas, want, d.Status.Replicas, podsState(e, ns, d.Spec.Selector))
			}
			return nil
		})
	}
}

// podsState describes the pods sel selects in ns, for a readiness
// timeout to say why: each pod's phase, unready conditions, and every
// container's state (waiting or terminated reason, restarts, readiness).
func podsState(e *meshkube.Env, ns string, sel *metav1.LabelSelector) string {
	s, err := metav1.LabelSelectorAsSelector(sel)
	if err != nil {
		return ""
	}
	l, err := e.Client().CoreV1().Pods(ns).List(context.Background(), metav1.ListOptions{LabelSelector: s.String()})
	if err != nil {
		return ": " + err.Error()
	}
	var b strings.Builder
	for _, p := range l.Items {
		fmt.Fprintf(&b, "\n  pod %s: %s", p.Name, p.Status.Phase)
		for _, c := range p.Status.Conditions {
			if c.Status != corev1.ConditionTrue {
				fmt.Fprintf(&b, "; %s %s %s", c.Type, c.Reason, c.Message)
			}
		}
		for _, cs := range append(slices.Clone(p.Status.InitContainerStatuses), p.Status.ContainerStatuses...) {
			fmt.Fprintf(&b, "\n    %s: ready %v, restarts %d", cs.Name, cs.Ready, cs.RestartCount)
			if w := cs.State.Waiting; w != nil {
				fmt.Fprintf(&b, ", waiting %s %s", w.Reason, w.Message)
			}
			if x := cs.State.Terminated; x != nil {
				fmt.Fprintf(&b, ", terminated %s (exit %d) %s", x.Reason, x.ExitCode, x.Message)
			}
			if x := cs.LastTerminationState.Terminated; x != nil {
				fmt.Fprintf(&b, ", last terminated %s (exit %d)", x.Reason, x.ExitCode)
			}
		}
	}
	return b.String()
}

func pods(t *testing.T, e *meshkube.Env, ns, selector string) []corev1.Pod {
	t.Helper()
	l, err := e.Client().CoreV1().Pods(ns).List(context.Background(), metav1.ListOptions{LabelSelector: selector})
	if err != nil {
		t.Fatal(err)
	}
	var out []corev1.Pod
	for _, p := range l.Items {
		if p.DeletionTimestamp == nil {
			out = append(out, p)
		}
	}
	return out
}

// TestInjectedAppOverMTLS deploys the example application (plain
// Deployments and Services in a namespace labelled for injection) and
// checks every acceptance point of injection and registration.
func TestInjectedAppOverMTLS(t *testing.T) {
	e := mesh(t)
	ctx := context.Background()
	intention(t, e, "web.shop", "api.shop")
	intention(t, e, "web.shop", "store.shop")
	intention(t, e, "caller.shop", "api.shop")
	applied := time.Now()
	kubectl(t, e, "apply", "-k", filepath.Join(e.Root, "examples/kubernetes"))
	appReady(t, e, "shop", 3*time.Minute, "web", "api", "store")
	t.Logf("figure: example application (5 injected pods) Ready %v after kubectl apply", time.Since(applied).Round(time.Millisecond))

	// Every pod has the native sidecar among its init containers (after
	// meshlet-init, which installs the interception rules).
	all := pods(t, e, "shop", "")
	if len(all) != 5 {
		t.Fatalf("%d pods in shop, want 5", len(all))
	}
	for _, p := range all {
		if inject.NativeSidecar(&p.Spec) == nil {
			t.Errorf("pod %s: no native sidecar: %+v", p.Name, p.Spec.InitContainers)
		}
	}

	// The HTTP probe of api (an app listening on loopback only) was
	// rewritten to the sidecar's health port, and passes: the pods are
	// Ready under strict mTLS.
	for _, p := range pods(t, e, "shop", "app=api") {
		rp := p.Spec.Containers[0].ReadinessProbe
		if rp == nil || rp.HTTPGet == nil || rp.HTTPGet.Port.IntValue() != xds.PodHealthPort || rp.HTTPGet.Path != xds.AppHealthPath("api", "readyz") {
			t.Errorf("pod %s readiness probe %+v, want the sidecar's health port", p.Name, rp)
		}
		if p.Annotations[inject.AnnotationOriginalProbes] == "" {
			t.Errorf("pod %s keeps no original probe", p.Name)
		}
	}

	// Registered in Consul: IDs, meta, the readiness check.
	apiPods := pods(t, e, "shop", "app=api")
	testutil.Eventually(t, 30*time.Second, "api pods registered and passing", func() error {
		entries, _, err := e.Consul.Client.Health().Service("api.shop", "", true, nil)
		if err != nil {
			return err
		}
		if len(entries) != len(apiPods) {
			return fmt.Errorf("%d passing api instances, want %d", len(entries), len(apiPods))
		}
		return nil
	})
	node := apiPods[0].Spec.NodeName + kube.NodeSuffix
	list, _, err := e.Consul.Client.Catalog().NodeServiceList(node, nil)
	if err != nil {
		t.Fatal(err)
	}
	byID := map[string]*api.AgentService{}
	for _, s := range list.Services {
		byID[s.ID] = s
	}
	checks, _, err := e.Consul.Client.Health().Node(node, nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range apiPods {
		in, px := byID[xds.InstanceID(p.Name, "api.shop")], byID[xds.ProxyID(p.Name, "api.shop")]
		if in == nil || px == nil {
			t.Fatalf("pod %s: instance %v proxy %v not in consul node %s", p.Name, in, px, node)
		}
		if in.Address != p.Status.PodIP || in.Port != 8080 || px.Port != xds.PodPublicPort || px.Proxy.DestinationServiceID != in.ID {
			t.Errorf("pod %s: instance %s:%d proxy port %d dest %q", p.Name, in.Address, in.Port, px.Port, px.Proxy.DestinationServiceID)
		}
		for k, v := range map[string]string{kube.MetaNamespace: "shop", kube.MetaPodName: p.Name, kube.MetaPodUID: string(p.UID), kube.MetaManagedBy: kube.ManagedBy} {
			if in.Meta[k] != v || px.Meta[k] != v {
				t.Errorf("pod %s: meta %s = %q / %q, want %q", p.Name, k, in.Meta[k], px.Meta[k], v)
			}
		}
		if v := in.TaggedAddresses[consul.VirtualTaggedAddress]; v.Address == "" {
			t.Errorf("pod %s: no virtual tagged address (the api Service's ClusterIP)", p.Name)
		}
		n := 0
		for _, c := range checks {
			if (c.ServiceID == in.ID || c.ServiceID == px.ID) && c.Type == kube.CheckType && c.Status == api.HealthPassing {
				n++
			}
		}
		if n != 2 {
			t.Errorf("pod %s: %d passing %s checks, want 2", p.Name, n, kube.CheckType)
		}
	}

	// web → api over mTLS: api sees web's SPIFFE ID; web → store (TCP).
	roots, _, err := e.Consul.Client.Agent().ConnectCARoots(nil)
	if err != nil {
		t.Fatal(err)
	}
	wantCaller := "spiffe://" + roots.TrustDomain + "/ns/default/dc/dc1/svc/web.shop"
	web := pods(t, e, "shop", "app=web")[0]
	webURL := "http://" + net.JoinHostPort(web.Status.PodIP, "8080")
	seen := map[string]bool{}
	testutil.Eventually(t, 30*time.Second, "web reaches every api pod over mTLS", func() error {
		code, body, err := httpGet(e, webURL+"/api")
		if err != nil {
			return err
		}
		var got map[string]string
		if code != 200 || json.Unmarshal(body, &got) != nil {
			return fmt.Errorf("%d %s", code, body)
		}
		if got["caller"] != wantCaller {
			t.Fatalf("api saw caller %q, want %q (web's SPIFFE ID from its certificate)", got["caller"], wantCaller)
		}
		seen[got["instance"]] = true
		if len(seen) < len(apiPods) {
			return fmt.Errorf("answered by %v so far", slices.Sorted(func(y func(string) bool) {
				for k := range seen {
					if !y(k) {
						return
					}
				}
			}))
		}
		return nil
	})
	if code, body, err := httpGet(e, webURL+"/store"); err != nil || code != 200 {
		t.Errorf("web → store: %d %s %v", code, body, err)
	}
	if rss, err := sidecarRSS(xds.ProxyID(web.Name, "web.shop")); err != nil {
		t.Errorf("sidecar RSS: %v", err)
	} else {
		t.Logf("figure: web's sidecar RSS in its pod after these requests: %.1f MiB", float64(rss)/(1<<20))
	}

	// A Job with an injected pod (client-only: no port, no Service)
	// reaches api and completes; its native sidecar does not hold it up.
	// It is the service caller (its name), run as the ServiceAccount
	// caller.
	serviceAccount(t, e, "shop", "caller")
	job := &batchv1.Job{
		ObjectMeta: metav1.ObjectMeta{Name: "caller", Namespace: "shop"},
		Spec: batchv1.JobSpec{BackoffLimit: ptr(int32(0)), Template: corev1.PodTemplateSpec{
			ObjectMeta: metav1.ObjectMeta{Annotations: map[string]string{inject.AnnotationUpstreams: "api:9191"}},
			Spec: corev1.PodSpec{ServiceAccountName: "caller", RestartPolicy: corev1.RestartPolicyNever, Containers: []corev1.Container{{
				Name: "caller", Image: "meshlet.local/devkube-testapp:dev", ImagePullPolicy: corev1.PullNever,
				Args: []string{"get", "-timeout", "60s", "http://127.0.0.1:9191/hello"},
			}}},
		}},
	}
	if _, err := e.Client().BatchV1().Jobs("shop").Create(ctx, job, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, 2*time.Minute, "job caller complete", func() error {
		j, err := e.Client().BatchV1().Jobs("shop").Get(ctx, "caller", metav1.GetOptions{})
		if err != nil {
			return err
		}
		for _, c := range j.Status.Conditions {
			if c.Type == batchv1.JobFailed && c.Status == corev1.ConditionTrue {
				logs, _ := e.Cluster.Kubectl(ctx, "-n", "shop", "logs", "job/caller", "--all-containers")
				t.Fatalf("job failed: %s\n%s", c.Message, logs)
			}
			if c.Type == batchv1.JobComplete && c.Status == corev1.ConditionTrue {
				return nil
			}
		}
		return fmt.Errorf("active %d, succeeded %d", j.Status.Active, j.Status.Succeeded)
	})
	testutil.Eventually(t, 30*time.Second, "the finished job's pod deregistered", func() error {
		entries, _, err := e.Consul.Client.Catalog().Service("caller.shop", "", nil)
		if err != nil || len(entries) > 0 {
			return fmt.Errorf("%d caller instances in consul (%v)", len(entries), err)
		}
		return nil
	})

	// Scaling api to 0 removes it from Consul.
	kubectl(t, e, "-n", "shop", "scale", "deployment/api", "--replicas=0")
	testutil.Eventually(t, 60*time.Second, "api gone from consul", func() error {
		for _, name := range []string{"api.shop", "api.shop-sidecar-proxy"} {
			entries, _, err := e.Consul.Client.Catalog().Service(name, "", nil)
			if err != nil {
				return err
			}
			if len(entries) > 0 {
				return fmt.Errorf("%d %s registrations left", len(entries), name)
			}
		}
		return nil
	})
	kubectl(t, e, "-n", "shop", "scale", "deployment/api", "--replicas=1")
	appReady(t, e, "shop", 2*time.Minute, "api")
}

// TestInjectionLeavesOthersAlone: a pod labelled meshlet.io/inject=false
// and a pod of a namespace without the label come up unchanged.
func TestInjectionLeavesOthersAlone(t *testing.T) {
	e := mesh(t)
	ctx := context.Background()
	if _, err := e.Client().CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "plain"}}, metav1.CreateOptions{}); err != nil && !strings.Contains(err.Error(), "already exists") {
		t.Fatal(err)
	}
	ensureNamespace(t, e, "shop", true)
	for _, tc := range []struct{ ns, name string }{{"shop", "opted-out"}, {"plain", "unlabelled"}} {
		pod := testPod(tc.name)
		if tc.ns == "shop" {
			pod.Labels[inject.LabelInject] = "false"
		}
		created, err := e.Client().CoreV1().Pods(tc.ns).Create(ctx, pod, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if len(created.Spec.InitContainers) != 0 || len(created.Spec.Containers) != 1 || created.Annotations[inject.AnnotationInjected] != "" {
			t.Errorf("%s/%s was changed: %+v", tc.ns, tc.name, created.Spec)
		}
		testutil.Eventually(t, time.Minute, tc.ns+"/"+tc.name+" ready", func() error { return podReady(e, tc.ns, tc.name) })
	}
}

func ensureNamespace(t *testing.T, e *meshkube.Env, name string, inject bool) {
	t.Helper()
	ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name}}
	if inject {
		ns.Labels = map[string]string{"meshlet.io/inject": "enabled"}
	}
	if _, err := e.Client().CoreV1().Namespaces().Create(context.Background(), ns, metav1.CreateOptions{}); err != nil && !strings.Contains(err.Error(), "already exists") {
		t.Fatal(err)
	}
}

// serviceAccount creates the ServiceAccount name in ns unless it exists.
func serviceAccount(t *testing.T, e *meshkube.Env, ns, name string) {
	t.Helper()
	if err := e.EnsureServiceAccount(context.Background(), ns, name); err != nil {
		t.Fatal(err)
	}
}

// meshPod is testPod(name) for injection in ns as service (its
// meshlet.io/service), run as the ServiceAccount of that name, which it
// creates: injection admits a pod only as the service its ServiceAccount
// may act as.
func meshPod(t *testing.T, e *meshkube.Env, ns, name, service string) *corev1.Pod {
	t.Helper()
	serviceAccount(t, e, ns, service)
	pod := testPod(name)
	pod.Annotations = map[string]string{inject.AnnotationService: service}
	pod.Spec.ServiceAccountName = service
	return pod
}

func testPod(name string) *corev1.Pod {
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{"test": name}},
		Spec: corev1.PodSpec{Containers: []corev1.Container{{
			Name: "app", Image: "meshlet.local/devkube-testapp:dev", ImagePullPolicy: corev1.PullNever,
			Args:           []string{"serve", ":8080"},
			Ports:          []corev1.ContainerPort{{ContainerPort: 8080}},
			ReadinessProbe: &corev1.Probe{ProbeHandler: corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Path: "/", Port: intstr.FromInt32(8080)}}, PeriodSeconds: 1},
		}}},
	}
}

func podReady(e *meshkube.Env, ns, name string) error {
	p, err := e.Client().CoreV1().Pods(ns).Get(context.Background(), name, metav1.GetOptions{})
	if err != nil {
		return err
	}
	for _, c := range p.Status.Conditions {
		if c.Type == corev1.PodReady && c.Status == corev1.ConditionTrue {
			return nil
		}
	}
	return fmt.Errorf("phase %s", p.Status.Phase)
}

// TestReinjectionChangesNothing: an injected pod's spec submitted again
// (server-side dry run, which calls the webhook) comes back unchanged.
func TestReinjectionChangesNothing(t *testing.T) {
	e := mesh(t)
	ensureNamespace(t, e, "shop", true)
	ctx := context.Background()
	created, err := e.Client().CoreV1().Pods("shop").Create(ctx, meshPod(t, e, "shop", "reinjected", "reinjected"), metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if inject.NativeSidecar(&created.Spec) == nil {
		t.Fatalf("not injected: init containers %v", created.Spec.InitContainers)
	}
	again := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "reinjected-2", Labels: created.Labels, Annotations: created.Annotations}, Spec: created.Spec}
	again.Spec.NodeName = ""
	got, err := e.Client().CoreV1().Pods("shop").Create(ctx, again, metav1.CreateOptions{DryRun: []string{metav1.DryRunAll}})
	if err != nil {
		t.Fatal(err)
	}
	a, _ := json.Marshal([]any{created.Spec.InitContainers, created.Spec.Containers, created.Spec.Volumes, created.Annotations})
	b, _ := json.Marshal([]any{got.Spec.InitContainers, got.Spec.Containers, got.Spec.Volumes, got.Annotations})
	if string(a) != string(b) {
		t.Errorf("re-submitting an injected pod changed it:\nbefore %s\nafter  %s", a, b)
	}
}

// TestBadAnnotationRefused: a malformed annotation is refused at
// admission, naming the annotation and its value.
func TestBadAnnotationRefused(t *testing.T) {
	e := mesh(t)
	ensureNamespace(t, e, "shop", true)
	pod := testPod("bad-upstreams")
	pod.Annotations = map[string]string{inject.AnnotationUpstreams: "api:notaport"}
	_, err := e.Client().CoreV1().Pods("shop").Create(context.Background(), pod, metav1.CreateOptions{})
	if err == nil || !strings.Contains(err.Error(), `meshlet.io/upstreams="api:notaport"`) {
		t.Fatalf("err = %v, want a refusal naming the annotation and value", err)
	}
	t.Logf("refused: %v", err)
}

// TestPoliciesConfigMapReloads: editing the meshlet-policies ConfigMap
// reaches the running control plane (the kubelet swaps the mounted files;
// the control plane's watcher reloads them), and a broken file is
// reported with its line and field while the last good set stays.
func TestPoliciesConfigMapReloads(t *testing.T) {
	e := mesh(t)
	ctx := context.Background()
	cm, err := e.Client().CoreV1().ConfigMaps(meshkube.Namespace).Get(ctx, meshkube.PoliciesConfig, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	data := cm.Data
	t.Cleanup(func() { _ = e.SetPolicyData(ctx, data) })
	logs := func() string {
		out, _ := e.Cluster.Kubectl(ctx, "-n", meshkube.Namespace, "logs", "deploy/"+meshkube.Deployment)
		return out
	}
	next := map[string]string{"extra.yaml": "apiVersion: meshlet.io/v1alpha1\nkind: ServiceDefaults\nmetadata: {name: extra}\nspec:\n  service: extra\n  protocol: http2\n"}
	for k, v := range data {
		next[k] = v
	}
	if err := e.SetPolicyData(ctx, next); err != nil {
		t.Fatal(err)
	}
	want := fmt.Sprintf("files=%d", len(next))
	start := time.Now()
	testutil.Eventually(t, 90*time.Second, "the control plane loads the edited ConfigMap", func() error {
		if l := logs(); !strings.Contains(l, `msg="policy: loaded"`) || !strings.Contains(l, want) {
			return fmt.Errorf("no %q in the log", want)
		}
		return nil
	})
	t.Logf("figure: a policy ConfigMap edit applied %v later", time.Since(start).Round(time.Second))
	next["extra.yaml"] = strings.Replace(next["extra.yaml"], "http2", "htp", 1)
	if err := e.SetPolicyData(ctx, next); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, 90*time.Second, "the broken file reported", func() error {
		if !strings.Contains(logs(), `extra.yaml:6: spec.protocol`) {
			return fmt.Errorf("no file:line:field error in the log")
		}
		return nil
	})
}

// TestFigures measures what the issue note reports: the time from creating
// a pod to Ready with and without injection, and the webhook's admission
// latency (its histogram, read from the control plane's admin API in its
// pod).
func TestFigures(t *testing.T) {
	e := mesh(t)
	ensureNamespace(t, e, "shop", true)
	ensureNamespace(t, e, "plain", false)
	ctx := context.Background()
	intention(t, e, "timing.shop", "api.shop")
	ready := map[string]time.Duration{}
	for i, ns := range []string{"plain", "shop", "plain", "shop"} {
		name := fmt.Sprintf("timing-%d", i)
		pod := meshPod(t, e, ns, name, "timing")
		start := time.Now()
		if _, err := e.Client().CoreV1().Pods(ns).Create(ctx, pod, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		testutil.Eventually(t, 2*time.Minute, name+" ready", func() error { return podReady(e, ns, name) })
		d := time.Since(start)
		if ready[ns] == 0 || d < ready[ns] {
			ready[ns] = d
		}
		_ = e.Client().CoreV1().Pods(ns).Delete(ctx, name, metav1.DeleteOptions{})
	}
	t.Logf("figure: pod created → Ready: %v without injection, %v injected (%.2fx)", ready["plain"].Round(time.Millisecond),
		ready["shop"].Round(time.Millisecond), float64(ready["shop"])/float64(ready["plain"]))

	metrics, err := controlPlaneMetrics(e)
	if err != nil {
		t.Fatalf("control plane metrics: %v", err)
	}
	p99, n := histogramQuantile(metrics, "meshlet_controlplane_admission_seconds", `result="injected"`, 0.99)
	if n == 0 {
		t.Fatalf("no injected admissions in the histogram:\n%s", grepLines(metrics, "admission"))
	}
	t.Logf("figure: webhook admission latency p99 ≤ %v over %d injected pods (histogram bucket bound)", p99, n)
}

// TestRegistrarLeaderElection: with two control plane replicas (the base's
// count) one holds the registrar's Lease; when its pod goes, the other
// takes over and registers new pods.
func TestRegistrarLeaderElection(t *testing.T) {
	e := mesh(t)
	ensureNamespace(t, e, "shop", true)
	ctx := context.Background()
	intention(t, e, "elected.shop", "api.shop")
	kubectl(t, e, "-n", meshkube.Namespace, "scale", "deployment/"+meshkube.Deployment, "--replicas=2")
	t.Cleanup(func() {
		kubectl(t, e, "-n", meshkube.Namespace, "scale", "deployment/"+meshkube.Deployment, "--replicas=1")
	})
	appReady(t, e, meshkube.Namespace, 2*time.Minute, meshkube.Deployment)
	holder := func() string {
		l, err := e.Client().CoordinationV1().Leases(meshkube.Namespace).Get(ctx, kube.DefaultLeaseName, metav1.GetOptions{})
		if err != nil || l.Spec.HolderIdentity == nil {
			return ""
		}
		return *l.Spec.HolderIdentity
	}
	cps := pods(t, e, meshkube.Namespace, "app.kubernetes.io/name=meshlet-controlplane")
	names := []string{cps[0].Name, cps[1].Name}
	var leader string
	testutil.Eventually(t, 30*time.Second, "a replica leads", func() error {
		if leader = holder(); !slices.Contains(names, leader) {
			return fmt.Errorf("lease held by %q, replicas %v", leader, names)
		}
		return nil
	})
	if err := e.Client().CoreV1().Pods(meshkube.Namespace).Delete(ctx, leader, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	testutil.Eventually(t, time.Minute, "another replica leads", func() error {
		// The other replica, or the one the Deployment starts in place
		// of the deleted pod: whichever acquires the Lease first.
		if h := holder(); h == leader || h == "" {
			return fmt.Errorf("lease held by %q", h)
		}
		return nil
	})
	t.Logf("figure: registrar leadership moved %v after the leader's pod was deleted", time.Since(start).Round(100*time.Millisecond))
	pod := meshPod(t, e, "shop", "elected", "elected")
	if _, err := e.Client().CoreV1().Pods("shop").Create(ctx, pod, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, time.Minute, "the new leader registers a new pod", func() error {
		entries, _, err := e.Consul.Client.Health().Service("elected.shop", "", true, nil)
		if err != nil || len(entries) != 1 {
			return fmt.Errorf("%d passing instances (%v)", len(entries), err)
		}
		return nil
	})
}

// TestWebhookDownFailsOnlyOptedInNamespaces: with the control plane
// gone, failurePolicy Fail refuses pods in labelled namespaces, and pods
// elsewhere are created as usual. Last: it takes the control plane down
// and back.
func TestWebhookDownFailsOnlyOptedInNamespaces(t *testing.T) {
	e := mesh(t)
	ensureNamespace(t, e, "shop", true)
	ensureNamespace(t, e, "plain", false)
	ctx := context.Background()
	kubectl(t, e, "-n", meshkube.Namespace, "scale", "deployment/"+meshkube.Deployment, "--replicas=0")
	t.Cleanup(func() {
		kubectl(t, e, "-n", meshkube.Namespace, "scale", "deployment/"+meshkube.Deployment, "--replicas=1")
		if err := e.WaitInjecting(ctx, 2*time.Minute); err != nil {
			t.Error(err)
		}
	})
	testutil.Eventually(t, 2*time.Minute, "control plane pods gone, terminating ones included (they serve until they exit)", func() error {
		l, err := e.Client().CoreV1().Pods(meshkube.Namespace).List(ctx, metav1.ListOptions{LabelSelector: "app.kubernetes.io/name=meshlet-controlplane"})
		if err != nil {
			return err
		}
		if n := len(l.Items); n > 0 {
			return fmt.Errorf("%d left", n)
		}
		return nil
	})
	// A pod the webhook would inject (its ServiceAccount named like its
	// service), so only the webhook being down refuses it.
	_, err := e.Client().CoreV1().Pods("shop").Create(ctx, meshPod(t, e, "shop", "while-down", "while-down"), metav1.CreateOptions{})
	if err == nil || !strings.Contains(err.Error(), "inject.meshlet.io") {
		t.Errorf("labelled namespace while the webhook is down: err = %v, want a refusal by the webhook", err)
	}
	if _, err := e.Client().CoreV1().Pods("plain").Create(ctx, testPod("while-down"), metav1.CreateOptions{}); err != nil {
		t.Errorf("unlabelled namespace while the webhook is down: %v", err)
	}
}

// sidecarRSS finds the sidecar process with node ID id on this host (the
// kubelet runs containers here) and returns its resident set (VmRSS).
func sidecarRSS(id string) (int64, error) {
	pid, err := findProcess("-node-id=" + id)
	if err != nil {
		return 0, err
	}
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	for s.Scan() {
		if v, ok := strings.CutPrefix(s.Text(), "VmRSS:"); ok {
			kb, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			return kb << 10, err
		}
	}
	return 0, fmt.Errorf("no VmRSS for pid %d", pid)
}

// findProcess returns the PID whose command line contains arg.
func findProcess(arg string) (int, error) {
	dirs, err := os.ReadDir("/proc")
	if err != nil {
		return 0, err
	}
	for _, d := range dirs {
		pid, err := strconv.Atoi(d.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", d.Name(), "cmdline"))
		if err != nil {
			continue
		}
		for _, a := range strings.Split(string(b), "\x00") {
			if a == arg || strings.HasPrefix(a, arg) {
				return pid, nil
			}
		}
	}
	return 0, fmt.Errorf("no process with %q", arg)
}

// controlPlaneMetrics reads the control plane's /metrics from its admin
// API, which listens on its pod's loopback.
func controlPlaneMetrics(*meshkube.Env) (string, error) {
	return inPodGet("-kube", "http://127.0.0.1:19100/metrics")
}

// inPodGet GETs url from inside the network namespace of the process whose
// command line has arg (the kubelet runs containers on this host:
// /proc/<pid>/ns/net is their pod's namespace), to reach what a pod serves
// on its loopback.
func inPodGet(arg, url string) (string, error) {
	pid, err := findProcess(arg)
	if err != nil {
		return "", err
	}
	ns := fmt.Sprintf("/proc/%d/ns/net", pid)
	c := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{DisableKeepAlives: true,
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			return devkube.DialInNetns(ctx, ns, network, addr)
		}}}
	resp, err := c.Get(url)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return string(b), err
}

// histogramQuantile returns the upper bound of the bucket holding quantile
// q of a Prometheus histogram's series matching label, and its count.
func histogramQuantile(text, name, label string, q float64) (time.Duration, int) {
	type bucket struct {
		le    float64
		count float64
	}
	var bs []bucket
	for _, line := range strings.Split(text, "\n") {
		if !strings.HasPrefix(line, name+"_bucket{") || !strings.Contains(line, label) {
			continue
		}
		i := strings.Index(line, `le="`)
		j := strings.Index(line[i+4:], `"`)
		le, _ := strconv.ParseFloat(line[i+4:i+4+j], 64)
		if line[i+4:i+4+j] == "+Inf" {
			le = math.Inf(1)
		}
		f := strings.Fields(line)
		c, _ := strconv.ParseFloat(f[len(f)-1], 64)
		bs = append(bs, bucket{le, c})
	}
	slices.SortFunc(bs, func(a, b bucket) int {
		switch {
		case a.le < b.le:
			return -1
		case a.le > b.le:
			return 1
		}
		return 0
	})
	if len(bs) == 0 || bs[len(bs)-1].count == 0 {
		return 0, 0
	}
	total := bs[len(bs)-1].count
	for _, b := range bs {
		if b.count >= q*total {
			return time.Duration(b.le * float64(time.Second)), int(total)
		}
	}
	return 0, int(total)
}

func grepLines(text, sub string) string {
	var out []string
	for _, l := range strings.Split(text, "\n") {
		if strings.Contains(l, sub) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

func ptr[T any](v T) *T { return &v }
