// Package meshkube brings up meshlet on a real one-node Kubernetes cluster
// (internal/devkube) the way users install it: a Consul agent beside the
// cluster in its network namespace, meshlet's image imported, the
// kustomize overlay deploy/kubernetes/overlays/dev applied with kubectl,
// the policy files loaded into the meshlet-policies ConfigMap. The
// Kubernetes tests (internal/kubee2e) and `make demo-k8s` share it.
package meshkube

import (
	"bytes"
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/meshlet/meshlet/controlplane/inject"
	"github.com/meshlet/meshlet/internal/devconsul"
	"github.com/meshlet/meshlet/internal/devkube"
)

// Names of what Up installs (deploy/kubernetes).
const (
	Namespace      = inject.DefaultMeshNamespace
	Deployment     = "meshlet-controlplane"
	PoliciesConfig = "meshlet-policies"
	// ConsulHTTPPort is the Consul agent's HTTPS port on devkube.NodeIP, as
	// the dev overlay's meshlet-consul ConfigMap says.
	ConsulHTTPPort = 8500
	// ConsulSecret is the Secret of the control plane's Consul token and
	// CA, which the manifests mount.
	ConsulSecret = "meshlet-consul"
	// ExamplePolicies are the example application's policy files on
	// Kubernetes (its services by their Consul names, <service>.shop),
	// relative to the module root.
	ExamplePolicies = "examples/kubernetes/policies"
	// Overlay is the kustomization Up applies, relative to the module root.
	Overlay = "deploy/kubernetes/overlays/dev"
	// MeshletImage is the tarball of meshlet's image in the image
	// directory, ExamplesImage the example application's.
	MeshletImage  = "meshlet.tar"
	ExamplesImage = "examples.tar"
	TestAppImage  = "devkube-testapp.tar"
	// JaegerImage is Jaeger's image tarball (make images), which Up
	// always imports: the dev overlay includes components/jaeger.
	JaegerImage = "jaeger.tar"
	// JaegerService is the Service (and Deployment) of the in-cluster
	// Jaeger in Namespace, JaegerQueryPort its query API's HTTP port.
	JaegerService   = "meshlet-jaeger"
	JaegerQueryPort = 16686
)

// Options configure Up.
type Options struct {
	// Root is the module root (deploy/kubernetes, policies); found from the
	// working directory when empty.
	Root string
	// ImageDir holds the image tarballs; devkube.FindImageDir() when
	// empty. Images lists those to import besides meshlet's (base names).
	ImageDir string
	Images   []string
	// PolicyDir is loaded into the meshlet-policies ConfigMap (every
	// *.yaml); none when empty (the base's mesh.yaml stays).
	PolicyDir string
	// Log receives progress lines; discarded when nil.
	Log *slog.Logger
	// ConsulLog receives Consul's output; discarded when nil.
	ConsulLog io.Writer
	// KeepLogs keeps the cluster's logs after Stop (devkube.Options).
	KeepLogs bool
	// WorkDir is the cluster's work directory (devkube.Options.WorkDir);
	// a new temporary one when empty.
	WorkDir string
	// Detached lets the cluster and Consul outlive this process (`make
	// demo-k8s KEEP=1`): Save records them, StopSaved ends them.
	Detached bool
}

// Env is meshlet running on a dev cluster.
type Env struct {
	Cluster *devkube.Cluster
	Consul  *devconsul.Agent
	Root    string
	log     *slog.Logger
}

// Client is the cluster's admin client.
func (e *Env) Client() kubernetes.Interface { return e.Cluster.Client() }

// Up starts the cluster and Consul, installs meshlet and waits until its
// webhook injects. On error everything started is stopped.
func Up(ctx context.Context, o Options) (_ *Env, err error) {
	if o.Log == nil {
		o.Log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	if o.Root == "" {
		if o.Root, err = moduleRoot(); err != nil {
			return nil, err
		}
	}
	o.ImageDir = cmp.Or(o.ImageDir, devkube.FindImageDir())
	images := []string{filepath.Join(o.ImageDir, MeshletImage), filepath.Join(o.ImageDir, JaegerImage)}
	for _, im := range o.Images {
		images = append(images, filepath.Join(o.ImageDir, im))
	}
	for _, im := range images {
		if _, err := os.Stat(im); err != nil {
			return nil, fmt.Errorf("meshkube: image %s: %w (make images builds it)", im, err)
		}
	}
	start := time.Now()
	c, err := devkube.Start(ctx, devkube.Options{Images: images, Log: o.Log, KeepLogs: o.KeepLogs, WorkDir: o.WorkDir, Detached: o.Detached})
	if err != nil {
		return nil, err
	}
	e := &Env{Cluster: c, Root: o.Root, log: o.Log}
	defer func() {
		if err != nil {
			e.Stop()
		}
	}()
	o.Log.Info("meshkube: cluster up; starting Consul beside it", "netns", c.Netns(), "after", time.Since(start).Round(time.Second))
	// As production runs it: ACLs on (default deny) and the HTTP API over
	// HTTPS only; the control plane gets its least-privilege token and
	// Consul's CA in the Secret the manifests mount.
	e.Consul, err = devconsul.Start(ctx, devconsul.Options{Netns: c.Netns(), BindAddress: devkube.NodeIP, HTTPPort: ConsulHTTPPort,
		Dial: c.DialContext, Log: o.ConsulLog, NodeName: "consul", Detached: o.Detached, TLS: true,
		Dir: filepath.Join(c.WorkDir(), "consul")})
	if err != nil {
		return nil, err
	}
	if err := e.consulSecret(ctx); err != nil {
		return nil, err
	}
	o.Log.Info("meshkube: installing meshlet (kubectl apply -k " + Overlay + ")")
	if out, err := c.Kubectl(ctx, "apply", "-k", filepath.Join(o.Root, Overlay)); err != nil {
		return nil, fmt.Errorf("meshkube: %w\n%s", err, out)
	}
	if o.PolicyDir != "" {
		if err := e.SetPolicies(ctx, o.PolicyDir); err != nil {
			return nil, err
		}
	}
	if err := e.WaitInjecting(ctx, 3*time.Minute); err != nil {
		return nil, err
	}
	o.Log.Info("meshkube: meshlet is up: the control plane serves and its webhook injects", "after", time.Since(start).Round(time.Second))
	return e, nil
}

// consulSecret writes the Secret ConsulSecret in Namespace (making
// the namespace): the control plane's Consul ACL token (rules
// consul.KubeControlPlaneACLRules) under "token" and Consul's CA under
// "ca.crt", what deploy/kubernetes mounts at /etc/meshlet/consul.
func (e *Env) consulSecret(ctx context.Context) error {
	tok, err := e.Consul.ControlPlaneToken(ctx, true)
	if err != nil {
		return fmt.Errorf("meshkube: the control plane's Consul token: %w", err)
	}
	ca, err := os.ReadFile(e.Consul.CAFile)
	if err != nil {
		return fmt.Errorf("meshkube: Consul's CA: %w", err)
	}
	client := e.Client()
	ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: Namespace}}
	if _, err := client.CoreV1().Namespaces().Create(ctx, ns, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("meshkube: namespace %s: %w", Namespace, err)
	}
	sec := &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: ConsulSecret, Namespace: Namespace},
		Data: map[string][]byte{"token": []byte(tok), "ca.crt": ca}}
	if _, err := client.CoreV1().Secrets(Namespace).Create(ctx, sec, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("meshkube: secret %s/%s: %w", Namespace, ConsulSecret, err)
	}
	return nil
}

// Stop stops Consul and the cluster, removing everything they made.
func (e *Env) Stop() error {
	var errs []error
	if e.Consul != nil {
		errs = append(errs, e.Consul.Stop())
	}
	if e.Cluster != nil {
		errs = append(errs, e.Cluster.Stop())
	}
	return errors.Join(errs...)
}

// saved is what Save writes: enough to stop a detached Env later.
type saved struct {
	ClusterDir string `json:"clusterDir"`
	ConsulPID  int    `json:"consulPid"`
}

// Save records a detached Env in path (JSON) for StopSaved.
func (e *Env) Save(path string) error {
	b, _ := json.Marshal(saved{ClusterDir: e.Cluster.WorkDir(), ConsulPID: e.Consul.PID()})
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	return os.WriteFile(path, b, 0o644)
}

// StopSaved stops the Env recorded in path by Save (Consul's process
// group, then the cluster) and removes path. A missing path is no error.
func StopSaved(path string, log *slog.Logger) error {
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	var s saved
	if err := json.Unmarshal(b, &s); err != nil {
		return fmt.Errorf("meshkube: %s: %w", path, err)
	}
	var errs []error
	if s.ConsulPID > 0 {
		if err := syscall.Kill(-s.ConsulPID, syscall.SIGTERM); err != nil && !errors.Is(err, syscall.ESRCH) {
			errs = append(errs, err)
		}
		for i := 0; i < 100 && syscall.Kill(s.ConsulPID, 0) == nil; i++ {
			time.Sleep(100 * time.Millisecond)
		}
		_ = syscall.Kill(-s.ConsulPID, syscall.SIGKILL)
	}
	if c, err := devkube.Open(s.ClusterDir, log); err == nil {
		errs = append(errs, c.Stop())
	} else if !errors.Is(err, os.ErrNotExist) {
		errs = append(errs, err)
	}
	errs = append(errs, os.Remove(path))
	return errors.Join(errs...)
}

// SetPolicies replaces the meshlet-policies ConfigMap with the *.yaml
// files of dir (what `kubectl create configmap --from-file` does).
func (e *Env) SetPolicies(ctx context.Context, dir string) error {
	files, err := filepath.Glob(filepath.Join(dir, "*.yaml"))
	if err != nil {
		return err
	}
	data := map[string]string{}
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			return err
		}
		data[filepath.Base(f)] = string(b)
	}
	return e.SetPolicyData(ctx, data)
}

// SetPolicyData replaces the meshlet-policies ConfigMap's data.
func (e *Env) SetPolicyData(ctx context.Context, data map[string]string) error {
	cms := e.Client().CoreV1().ConfigMaps(Namespace)
	cm, err := cms.Get(ctx, PoliciesConfig, metav1.GetOptions{})
	if err != nil {
		return fmt.Errorf("meshkube: policies: %w", err)
	}
	cm.Data = data
	if _, err := cms.Update(ctx, cm, metav1.UpdateOptions{}); err != nil {
		return fmt.Errorf("meshkube: policies: %w", err)
	}
	return nil
}

// WaitInjecting waits until the control plane's Deployment is available
// and its webhook injects a pod (a server-side dry run in a labelled
// namespace, which calls the webhook without creating anything).
func (e *Env) WaitInjecting(ctx context.Context, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	ns := "meshkube-probe"
	// The namespace and the probe's ServiceAccount (named like its
	// service, as injection requires) are made in the loop: the namespace
	// of an earlier call may still be terminating.
	ensure := func() error {
		_, err := e.Client().CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns,
			Labels: map[string]string{inject.LabelInject: inject.NamespaceEnabled}}}, metav1.CreateOptions{})
		if err != nil && !apierrors.IsAlreadyExists(err) {
			return fmt.Errorf("meshkube: %w", err)
		}
		return e.EnsureServiceAccount(ctx, ns, "probe")
	}
	pod := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{GenerateName: "probe-", Namespace: ns, Annotations: map[string]string{inject.AnnotationService: "probe"}},
		Spec: corev1.PodSpec{ServiceAccountName: "probe", Containers: []corev1.Container{{Name: "c", Image: "meshlet.local/pause:dev"}}}}
	var last error
	tick := time.NewTicker(500 * time.Millisecond)
	defer tick.Stop()
	next := time.Now()
	for {
		var got *corev1.Pod
		err := ensure()
		if err == nil {
			got, err = e.Client().CoreV1().Pods(ns).Create(ctx, pod, metav1.CreateOptions{DryRun: []string{metav1.DryRunAll}})
		}
		switch {
		case err != nil:
			last = err
		case inject.NativeSidecar(&got.Spec) == nil:
			last = errors.New("the dry-run pod came back without a sidecar")
		default:
			_ = e.Client().CoreV1().Namespaces().Delete(ctx, ns, metav1.DeleteOptions{})
			return nil
		}
		if time.Now().After(next) {
			e.log.Info("meshkube: waiting for the webhook", "last", firstLine(last.Error()))
			next = time.Now().Add(10 * time.Second)
		}
		select {
		case <-ctx.Done():
			logs, _ := e.Cluster.Kubectl(context.Background(), "-n", Namespace, "logs", "deploy/"+Deployment, "--tail=30")
			pods, _ := e.Cluster.Kubectl(context.Background(), "-n", Namespace, "get", "pods", "-o", "wide")
			return fmt.Errorf("meshkube: the webhook does not inject after %v: %v\n%s\n%s", timeout, last, pods, logs)
		case <-tick.C:
		}
	}
}

// EnsureServiceAccount creates the ServiceAccount name in namespace unless
// it exists. An injected pod must run as a ServiceAccount named like its
// service (or one MeshDefaults spec.serviceAccounts binds to it): the
// sidecar's identity is its ServiceAccount.
func (e *Env) EnsureServiceAccount(ctx context.Context, namespace, name string) error {
	sa := &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: namespace}}
	if _, err := e.Client().CoreV1().ServiceAccounts(namespace).Create(ctx, sa, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("meshkube: ServiceAccount %s/%s: %w", namespace, name, err)
	}
	return nil
}

func firstLine(s string) string {
	s, _, _ = strings.Cut(s, "\n")
	return s
}

// moduleRoot finds go.mod from the working directory upwards.
func moduleRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for d := dir; ; d = filepath.Dir(d) {
		if b, err := os.ReadFile(filepath.Join(d, "go.mod")); err == nil && bytes.HasPrefix(b, []byte("module github.com/meshlet/meshlet")) {
			return d, nil
		}
		if filepath.Dir(d) == d {
			return "", errors.New("meshkube: module root not found above " + dir)
		}
	}
}
