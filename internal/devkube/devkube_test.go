package devkube

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	batchv1 "k8s.io/api/batch/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/meshlet/meshlet/internal/testutil"
)

// testAppImageFile is the tests' app image in the image dir (make images).
const testAppImageFile = "devkube-testapp.tar"

// requireCluster fails t (it does not skip) when the host cannot run a
// cluster, naming what is missing and the command that provides it.
func requireCluster(t *testing.T) (imageDir string) {
	t.Helper()
	if testing.Short() {
		t.Skip("starts a real one-node Kubernetes cluster (~1 min); not in -short")
	}
	if err := CheckPrerequisites(Options{}); err != nil {
		t.Fatalf("%v\n(build everything with: make kube images; or run: make test-kube)", err)
	}
	dir := FindImageDir()
	if _, err := os.Stat(filepath.Join(dir, testAppImageFile)); err != nil {
		t.Fatalf("test app image missing: %v (run: make images)", err)
	}
	return dir
}

// tlog sends the cluster's progress lines to t.Log.
type tlog struct{ t testing.TB }

func (w tlog) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

// TestCluster starts one cluster and checks, against it, what the mesh will
// rely on: the node, a Deployment, a ClusterIP Service through kube-proxy
// from a pod and from the cluster's namespace, cluster DNS from a pod, a
// Job, kubectl; then that Stop leaves nothing behind.
func TestCluster(t *testing.T) {
	imageDir := requireCluster(t)
	before := cleanHostSnapshot(t)
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()

	// A second cluster starts beside the first: each has its own
	// namespace, cgroups and work dir, and stopping one leaves the other
	// (and the host paths they share) working.
	type started struct {
		c   *Cluster
		err error
	}
	second := make(chan started, 1)
	go func() {
		c2, err := Start(ctx, Options{Log: slog.New(slog.NewTextHandler(io.Discard, nil))})
		second <- started{c2, err}
	}()
	begin := time.Now()
	c, err := Start(ctx, Options{
		Log:    slog.New(slog.NewTextHandler(tlog{t}, nil)),
		Images: []string{filepath.Join(imageDir, testAppImageFile)},
	})
	s2 := <-second
	if s2.c != nil {
		t.Cleanup(func() {
			if err := s2.c.Stop(); err != nil {
				t.Error(err)
			}
		})
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("clusters %s and the second one ready in %v", c.Name(), time.Since(begin).Round(100*time.Millisecond))
	stopped := false
	t.Cleanup(func() {
		if t.Failed() {
			dumpLogs(t, c)
		}
		if !stopped {
			if err := c.Stop(); err != nil {
				t.Error(err)
			}
		}
	})
	if s2.err != nil {
		t.Fatalf("second cluster: %v", s2.err)
	}
	appImage := "meshlet.local/devkube-testapp:dev"
	cs := c.Client()
	const ns = "devkube-test"

	t.Run("NodeReady", func(t *testing.T) {
		n, err := cs.CoreV1().Nodes().Get(ctx, NodeName, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		ready := false
		for _, cond := range n.Status.Conditions {
			ready = ready || (cond.Type == corev1.NodeReady && cond.Status == corev1.ConditionTrue)
		}
		var ips []string
		for _, a := range n.Status.Addresses {
			if a.Type == corev1.NodeInternalIP {
				ips = append(ips, a.Address)
			}
		}
		if !ready || len(ips) != 1 || ips[0] != NodeIP || n.Status.NodeInfo.KubeletVersion != "v1.36.3" {
			t.Fatalf("node: ready=%v internal IPs %v kubelet %s; want ready, [%s], v1.36.3", ready, ips, n.Status.NodeInfo.KubeletVersion, NodeIP)
		}
	})

	t.Run("Kubectl", func(t *testing.T) {
		out, err := c.Kubectl(ctx, "version")
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(out, "Client Version: v1.36.3") || !strings.Contains(out, "Server Version: v1.36.3") {
			t.Fatalf("kubectl version:\n%s\nwant client and server v1.36.3", out)
		}
	})

	if _, err := cs.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	var clusterIP string
	t.Run("Deployment", func(t *testing.T) {
		labels := map[string]string{"app": "echo"}
		dep := &appsv1.Deployment{
			ObjectMeta: metav1.ObjectMeta{Name: "echo", Namespace: ns},
			Spec: appsv1.DeploymentSpec{
				Replicas: ptr(int32(2)),
				Selector: &metav1.LabelSelector{MatchLabels: labels},
				Template: corev1.PodTemplateSpec{
					ObjectMeta: metav1.ObjectMeta{Labels: labels},
					Spec: corev1.PodSpec{Containers: []corev1.Container{{
						Name: "echo", Image: appImage, ImagePullPolicy: corev1.PullNever,
						Args:  []string{"serve", ":8080"},
						Ports: []corev1.ContainerPort{{ContainerPort: 8080}},
						ReadinessProbe: &corev1.Probe{
							ProbeHandler:  corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Path: "/", Port: intstr.FromInt32(8080)}},
							PeriodSeconds: 1,
						},
					}}},
				},
			},
		}
		if _, err := cs.AppsV1().Deployments(ns).Create(ctx, dep, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		svc := &corev1.Service{
			ObjectMeta: metav1.ObjectMeta{Name: "echo", Namespace: ns},
			Spec: corev1.ServiceSpec{Selector: labels, Ports: []corev1.ServicePort{
				{Name: "http", Port: 80, TargetPort: intstr.FromInt32(8080)},
			}},
		}
		created, err := cs.CoreV1().Services(ns).Create(ctx, svc, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		clusterIP = created.Spec.ClusterIP
		pods := testutil.Poll(t, 90*time.Second, "2 echo pods Running and Ready", func() ([]corev1.Pod, error) {
			l, err := cs.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{LabelSelector: "app=echo"})
			if err != nil {
				return nil, err
			}
			var ready []corev1.Pod
			for _, p := range l.Items {
				if p.Status.Phase == corev1.PodRunning && podReady(p) {
					ready = append(ready, p)
				}
			}
			if len(ready) != 2 {
				return nil, fmt.Errorf("%d of %d pods running and ready: %s", len(ready), len(l.Items), podStates(l.Items))
			}
			return ready, nil
		})
		for _, p := range pods {
			if !strings.HasPrefix(p.Status.PodIP, "10.244.0.") {
				t.Errorf("pod %s IP %q, want one of %s", p.Name, p.Status.PodIP, PodCIDR)
			}
		}
	})
	if clusterIP == "" {
		t.Fatal("no echo Service; the remaining checks need it")
	}

	t.Run("ClusterIPFromNetns", func(t *testing.T) {
		hc := &http.Client{Transport: &http.Transport{DialContext: c.DialContext, DisableKeepAlives: true}, Timeout: 5 * time.Second}
		seen := map[string]bool{}
		// kube-proxy spreads connections over both pods: ask until both answered.
		testutil.Poll(t, 30*time.Second, "answers from both echo pods through "+clusterIP, func() (struct{}, error) {
			body, err := get(ctx, hc, "http://"+clusterIP+"/")
			if err != nil {
				return struct{}{}, err
			}
			host, ok := strings.CutPrefix(strings.Fields(body)[2], "echo-")
			if !ok {
				return struct{}{}, fmt.Errorf("answer %q is not from an echo pod", body)
			}
			seen[host] = true
			if len(seen) < 2 {
				return struct{}{}, fmt.Errorf("answered by %v so far", seen)
			}
			return struct{}{}, nil
		})
	})

	t.Run("ClusterIPFromPod", func(t *testing.T) {
		out, err := c.Kubectl(ctx, "-n", ns, "exec", "deploy/echo", "--", "/testapp", "get", "-timeout", "20s", "http://"+clusterIP+"/")
		if err != nil {
			t.Fatal(err)
		}
		if !strings.HasPrefix(out, "hello from echo-") {
			t.Fatalf("GET %s from a pod: %q, want hello from an echo pod", clusterIP, out)
		}
	})

	t.Run("DNSFromPod", func(t *testing.T) {
		name := "echo." + ns + ".svc." + ClusterDomain
		out, err := c.Kubectl(ctx, "-n", ns, "exec", "deploy/echo", "--", "/testapp", "lookup", name)
		if err != nil {
			t.Fatal(err)
		}
		if strings.TrimSpace(out) != clusterIP {
			t.Fatalf("lookup %s in a pod: %q, want %s", name, out, clusterIP)
		}
	})

	t.Run("ServerInNetnsFromPod", func(t *testing.T) {
		// A server of this process, listening in the cluster's namespace on
		// the node IP (as Consul or a webhook beside the cluster would), is
		// reachable from a pod.
		l, err := c.Listen("tcp", NodeIP+":0")
		if err != nil {
			t.Fatal(err)
		}
		srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			fmt.Fprintf(w, "node server to %s\n", r.RemoteAddr)
		}), ReadHeaderTimeout: 5 * time.Second}
		done := make(chan struct{})
		go func() { defer close(done); _ = srv.Serve(l) }()
		defer func() { _ = srv.Close(); <-done }()
		out, err := c.Kubectl(ctx, "-n", ns, "exec", "deploy/echo", "--", "/testapp", "get", "-timeout", "20s", "http://"+l.Addr().String()+"/")
		if err != nil {
			t.Fatal(err)
		}
		if !strings.HasPrefix(out, "node server to 10.244.0.") {
			t.Fatalf("GET %s from a pod: %q, want the node server answering a pod address", l.Addr(), out)
		}
	})

	t.Run("SecondCluster", func(t *testing.T) {
		c2 := s2.c
		if c2.Name() == c.Name() || c2.Netns() == c.Netns() || c2.WorkDir() == c.WorkDir() {
			t.Fatalf("clusters share a name, namespace or dir: %s %s", c.Name(), c2.Name())
		}
		if _, err := c2.Client().CoreV1().Namespaces().Get(ctx, ns, metav1.GetOptions{}); err == nil {
			t.Fatalf("namespace %s of the first cluster exists in the second: they share an apiserver", ns)
		}
		addrs, err := c2.Resolver().LookupHost(ctx, "kube-dns.kube-system.svc."+ClusterDomain)
		if err != nil || len(addrs) != 1 || addrs[0] != DNSServiceIP {
			t.Fatalf("second cluster's DNS: %v %v, want [%s]", addrs, err, DNSServiceIP)
		}
		pids := daemonPids(c2)
		if err := c2.Stop(); err != nil {
			t.Fatal(err)
		}
		checkClusterGone(t, c2, pids)
		// The first cluster still runs: the shared host paths stay.
		if _, err := os.Stat(registryDir); err != nil {
			t.Errorf("registry removed while a cluster runs: %v", err)
		}
		if _, err := cs.CoreV1().Nodes().Get(ctx, NodeName, metav1.GetOptions{}); err != nil {
			t.Errorf("first cluster after the second stopped: %v", err)
		}
	})

	t.Run("JobCompletes", func(t *testing.T) {
		// A fresh pod that reaches the Service by its short name: the pod's
		// resolv.conf search path, CoreDNS and kube-proxy together.
		job := &batchv1.Job{
			ObjectMeta: metav1.ObjectMeta{Name: "probe", Namespace: ns},
			Spec: batchv1.JobSpec{
				BackoffLimit: ptr(int32(0)),
				Template: corev1.PodTemplateSpec{Spec: corev1.PodSpec{
					RestartPolicy: corev1.RestartPolicyNever,
					Containers: []corev1.Container{{
						Name: "probe", Image: appImage, ImagePullPolicy: corev1.PullNever,
						Args: []string{"get", "-timeout", "30s", "http://echo/"},
					}},
				}},
			},
		}
		if _, err := cs.BatchV1().Jobs(ns).Create(ctx, job, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		testutil.Poll(t, 90*time.Second, "job probe Complete", func() (struct{}, error) {
			j, err := cs.BatchV1().Jobs(ns).Get(ctx, "probe", metav1.GetOptions{})
			if err != nil {
				return struct{}{}, err
			}
			for _, cond := range j.Status.Conditions {
				if cond.Status != corev1.ConditionTrue {
					continue
				}
				if cond.Type == batchv1.JobFailed {
					t.Fatalf("job failed: %s; logs: %s", cond.Message, c.mustKubectl(ctx, t, "-n", ns, "logs", "job/probe"))
				}
				if cond.Type == batchv1.JobComplete {
					return struct{}{}, nil
				}
			}
			return struct{}{}, fmt.Errorf("succeeded %d, active %d", j.Status.Succeeded, j.Status.Active)
		})
		out := c.mustKubectl(ctx, t, "-n", ns, "logs", "job/probe")
		if !strings.HasPrefix(out, "hello from echo-") {
			t.Fatalf("job output %q, want hello from an echo pod", out)
		}
	})

	// Stop, then look for anything of the cluster left on the host.
	pids := daemonPids(c)
	stopBegin := time.Now()
	stopped = true
	if err := c.Stop(); err != nil {
		t.Fatalf("Stop: %v", err)
	}
	t.Logf("stopped in %v", time.Since(stopBegin).Round(100*time.Millisecond))
	if err := c.Stop(); err != nil {
		t.Errorf("second Stop: %v", err)
	}
	t.Run("NothingLeftBehind", func(t *testing.T) {
		checkClusterGone(t, c, pids)
		after := snapshotHost(t)
		for p, b := range before {
			if a := after[p]; a != b {
				t.Errorf("host path %s changed:\n before: %s\n after:  %s", p, b, a)
			}
		}
	})
}

func daemonPids(c *Cluster) []int {
	c.mu.Lock()
	defer c.mu.Unlock()
	var pids []int
	for _, d := range c.procs {
		pids = append(pids, d.Pid)
	}
	return pids
}

// checkClusterGone asserts that nothing of a stopped cluster remains: its
// daemons, any process in its cgroups or naming its work dir, its network
// namespace, mounts under its work dir or naming it, its cgroups in every
// hierarchy, its work dir.
func checkClusterGone(t *testing.T, c *Cluster, pids []int) {
	t.Helper()
	if len(pids) < 7 {
		t.Errorf("only %d daemon pids recorded: %v", len(pids), pids)
	}
	for _, pid := range pids {
		if processAlive(pid) {
			t.Errorf("daemon pid %d still running", pid)
		}
	}
	if left := processesOf(t, c.Name(), c.WorkDir()); len(left) > 0 {
		t.Errorf("processes of the cluster still running: %v", left)
	}
	if _, err := os.Stat(c.Netns()); !os.IsNotExist(err) {
		t.Errorf("network namespace %s: %v, want it gone", c.Netns(), err)
	}
	if mps, err := mountsUnder(c.WorkDir()); err != nil || len(mps) > 0 {
		t.Errorf("mounts under %s: %v %v", c.WorkDir(), mps, err)
	}
	if mps := mountsNaming(t, c.Name()); len(mps) > 0 {
		t.Errorf("mounts naming %s: %v", c.Name(), mps)
	}
	hs, err := cgroupHierarchies()
	if err != nil {
		t.Fatal(err)
	}
	for _, h := range hs {
		if _, err := os.Stat(filepath.Join(h, c.Name())); !os.IsNotExist(err) {
			t.Errorf("cgroup %s/%s: %v, want it gone", h, c.Name(), err)
		}
	}
	if _, err := os.Stat(c.WorkDir()); !os.IsNotExist(err) {
		t.Errorf("work dir %s: %v, want it removed", c.WorkDir(), err)
	}
}

// hostPathsToWatch are the host paths containerd, the kubelet, etcd and the
// CNI plugins use by default; the cluster redirects most of them into its
// work dir, and Stop must leave all of them as they were.
func hostPathsToWatch() []string {
	home, _ := os.UserHomeDir()
	return append(sharedHostPaths(), registryDir, filepath.Join(home, ".kube"), "/run/containerd/s", "/run/containerd/fifo", "/run/containerd/runc",
		"/var/lib/containerd", "/opt/containerd", "/etc/cni", "/var/lib/etcd", "/etc/kubernetes",
		"/var/run/kubernetes", "/usr/libexec/kubernetes", "/var/log/pods", "/var/lib/kubelet/device-plugins",
		"/var/lib/cni/results", "/var/lib/cni/networks")
}

// cleanHostSnapshot takes the host test lock exclusively until t ends (no
// other test binary's cluster starts or stops while t compares the host
// before and after), stops the clusters whose owner died (a killed earlier
// run: what a Start would do, and must not count as this test's change to
// the host), then snapshots the host.
func cleanHostSnapshot(t *testing.T) map[string]string {
	t.Helper()
	release, err := LockHostForTests(true)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(release)
	if _, err := ReapStale(context.Background(), slog.New(slog.NewTextHandler(tlog{t}, nil))); err != nil {
		t.Fatalf("stale clusters of an earlier run: %v", err)
	}
	return snapshotHost(t)
}

// snapshotHost describes each watched path: missing, or its sorted entries.
func snapshotHost(t *testing.T) map[string]string {
	t.Helper()
	snap := map[string]string{}
	for _, p := range hostPathsToWatch() {
		des, err := os.ReadDir(p)
		switch {
		case os.IsNotExist(err):
			snap[p] = "missing"
		case err != nil:
			snap[p] = "error " + err.Error()
		default:
			var names []string
			for _, de := range des {
				names = append(names, de.Name())
			}
			sort.Strings(names)
			snap[p] = "entries [" + strings.Join(names, " ") + "]"
		}
	}
	return snap
}

// processesOf lists processes in a cgroup of the cluster or whose command
// line names its work dir.
func processesOf(t *testing.T, name, workDir string) []string {
	t.Helper()
	des, err := os.ReadDir("/proc")
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, de := range des {
		pid, err := strconv.Atoi(de.Name())
		if err != nil || !processAlive(pid) {
			continue
		}
		cg, _ := os.ReadFile(filepath.Join("/proc", de.Name(), "cgroup"))
		cmd, _ := os.ReadFile(filepath.Join("/proc", de.Name(), "cmdline"))
		inCgroup := false
		for _, line := range strings.Split(string(cg), "\n") {
			parts := strings.SplitN(line, ":", 3)
			if len(parts) == 3 && (parts[2] == "/"+name || strings.HasPrefix(parts[2], "/"+name+"/")) {
				inCgroup = true
			}
		}
		if inCgroup || bytes.Contains(cmd, []byte(workDir)) {
			out = append(out, fmt.Sprintf("%d %s", pid, bytes.ReplaceAll(cmd, []byte{0}, []byte{' '})))
		}
	}
	return out
}

// mountsNaming lists mount points that contain name (the cluster's netns
// or cgroup).
func mountsNaming(t *testing.T, name string) []string {
	t.Helper()
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) > 4 && strings.Contains(f[4], name) {
			out = append(out, f[4])
		}
	}
	return out
}

func podReady(p corev1.Pod) bool {
	for _, c := range p.Status.Conditions {
		if c.Type == corev1.PodReady && c.Status == corev1.ConditionTrue {
			return true
		}
	}
	return false
}

func podStates(pods []corev1.Pod) string {
	var s []string
	for _, p := range pods {
		st := string(p.Status.Phase)
		for _, cs := range p.Status.ContainerStatuses {
			if w := cs.State.Waiting; w != nil {
				st += " " + w.Reason + ": " + w.Message
			}
		}
		s = append(s, p.Name+" "+st)
	}
	return strings.Join(s, "; ")
}

func get(ctx context.Context, hc *http.Client, url string) (string, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return "", err
	}
	resp, err := hc.Do(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return "", err
	}
	if resp.StatusCode != http.StatusOK || len(strings.Fields(string(b))) < 3 {
		return "", fmt.Errorf("%s: %s %q", url, resp.Status, b)
	}
	return string(b), nil
}

func (c *Cluster) mustKubectl(ctx context.Context, t *testing.T, args ...string) string {
	t.Helper()
	out, err := c.Kubectl(ctx, args...)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// dumpLogs logs the tail of every daemon's log.
func dumpLogs(t *testing.T, c *Cluster) {
	des, _ := os.ReadDir(c.LogDir())
	for _, de := range des {
		t.Logf("--- %s (last 40 lines)\n%s", de.Name(), tail(filepath.Join(c.LogDir(), de.Name()), 40))
	}
	if out, err := c.Kubectl(context.Background(), "get", "pods", "-A", "-o", "wide"); err == nil {
		t.Logf("--- pods\n%s", out)
	}
}

// helperEnv makes the test binary, re-executed by TestReapStale, start a
// cluster, print its work dir and wait to be killed (TestMain).
const helperEnv = "DEVKUBE_TEST_HELPER"

func TestMain(m *testing.M) {
	if os.Getenv(helperEnv) != "" {
		c, err := Start(context.Background(), Options{})
		if err != nil {
			fmt.Println("ERROR", err)
			os.Exit(1)
		}
		fmt.Println("READY", c.WorkDir(), c.Name())
		select {} // until TestReapStale kills this process
	}
	os.Exit(m.Run())
}

// TestReapStale kills the process that started a cluster (as a crashed test
// would be): its daemons die with it (parent-death signal) but the pod
// containers and their shims do not, nor do the namespace, mounts and
// cgroups. The next Start's ReapStale must remove all of it.
func TestReapStale(t *testing.T) {
	requireCluster(t)
	before := cleanHostSnapshot(t)
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	helper := exec.CommandContext(ctx, os.Args[0])
	helper.Env = append(os.Environ(), helperEnv+"=1")
	out, err := helper.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := helper.Start(); err != nil {
		t.Fatal(err)
	}
	var workDir, name string
	sc := bufio.NewScanner(out)
	for sc.Scan() {
		if f := strings.Fields(sc.Text()); len(f) == 3 && f[0] == "READY" {
			workDir, name = f[1], f[2]
			break
		} else if len(f) > 0 && f[0] == "ERROR" {
			t.Fatalf("helper: %s", sc.Text())
		}
	}
	if workDir == "" {
		_ = helper.Process.Kill()
		t.Fatalf("helper ended without starting a cluster (%v)", helper.Wait())
	}
	go io.Copy(io.Discard, out) //nolint:errcheck // drain until the helper dies
	c, err := Open(workDir, nil)
	if err != nil {
		t.Fatal(err)
	}
	// The cluster runs pods (CoreDNS) whose containers outlive the helper.
	if pids, _ := cgroupPids(filepath.Join(cgroupRoot, "freezer", name, "kubepods")); len(pids) == 0 {
		t.Fatalf("no pod processes in the cluster's kubepods cgroup")
	}
	pids := daemonPids(c)

	if err := helper.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	_ = helper.Wait()
	if left := processesOf(t, name, workDir); len(left) == 0 {
		t.Fatal("nothing of the cluster survived its owner: this test would prove nothing")
	}
	// Starts reap concurrently (TestCluster starts two clusters at once;
	// go test runs packages in parallel): the stale cluster must be
	// stopped once, without errors from reapers tearing down the same
	// namespace and mounts.
	const reapers = 3
	type reaped struct {
		n   int
		err error
	}
	results := make(chan reaped, reapers)
	for range reapers {
		go func() {
			n, err := ReapStale(ctx, slog.New(slog.NewTextHandler(tlog{t}, nil)))
			results <- reaped{n, err}
		}()
	}
	n := 0
	for range reapers {
		r := <-results
		if r.err != nil {
			t.Error(r.err)
		}
		n += r.n
	}
	if n != 1 {
		t.Fatalf("%d concurrent ReapStale stopped %d clusters in all, want 1", reapers, n)
	}
	checkClusterGone(t, c, pids)
	after := snapshotHost(t)
	for p, b := range before {
		if a := after[p]; a != b {
			t.Errorf("host path %s changed:\n before: %s\n after:  %s", p, b, a)
		}
	}
}
