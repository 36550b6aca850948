// Package devkube starts and stops a real one-node Kubernetes cluster for
// meshlet's tests and its Kubernetes demo, the way internal/devconsul runs a
// real Consul agent: no mocks, no registry, nothing left on the host after
// Stop.
//
// A cluster is etcd (Debian etcd-server), containerd and runc (Debian), the
// bridge and host-local CNI plugins (Debian containernetworking-plugins),
// kube-apiserver, kube-controller-manager, kube-scheduler, kubelet and
// kube-proxy (iptables mode) v1.36.3 built by `make kube` from
// deploy/tools/kubernetes, and CoreDNS (deploy/tools/coredns) as the
// kube-dns Service at 10.96.0.10. Every daemon runs in a network namespace
// of the cluster's own (`nsenter --net=/run/netns/<name>`), so its ports,
// iptables chains and bridge never touch the host or another cluster, and
// every process of the cluster (daemons, shims, containers) lives under the
// cgroup /<name>. Images come from tarballs (internal/ociimage) imported with
// `ctr images import`; pods use imagePullPolicy: Never.
//
// The recipe, its host quirks and their fixes are ../shared/PEERS.md
// ("Kubernetes: a real one-node cluster") and ../shared/K8S-ONE-NODE.md. It
// needs root and a cgroup v1 host; CheckPrerequisites names what is missing.
package devkube

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/meshlet/meshlet/internal/ociimage"
)

// Options configure Start. The zero value starts a cluster with a random
// name in a fresh directory under os.TempDir().
type Options struct {
	// Name names the cluster's network namespace (/run/netns/<Name>), its
	// cgroups (/<Name> in every hierarchy) and its CNI network: lowercase
	// letters, digits and '-', starting with a letter, at most 31 characters.
	// Default "devkube-" and 8 random hex digits, so clusters (and tests)
	// coexist.
	Name string
	// WorkDir holds the cluster's certificates, configs, data, logs and
	// sockets; it must be empty or not exist. Default: a new directory
	// os.TempDir()/<Name>-*. Stop removes it (see KeepLogs).
	WorkDir string
	// BinDir holds KubeBinaries; FindBinDir() when empty.
	BinDir string
	// ImageDir holds pause.tar and coredns.tar; FindImageDir() when empty.
	ImageDir string
	// Images are more image tarballs to import before the cluster is
	// returned (ImportImage does the same later).
	Images []string
	// Log receives progress lines (one per step, and every 10 s of a long
	// wait) and warnings; discarded when nil.
	Log *slog.Logger
	// ReadyTimeout bounds Start from the first daemon to CoreDNS answering;
	// default 4 minutes.
	ReadyTimeout time.Duration
	// Detached lets the cluster outlive this process (`devkube up`): its
	// daemons get no parent-death signal, and a later Start does not reap
	// it as stale. Stop it with Open(workDir) and Stop (`devkube down`).
	Detached bool
	// KeepLogs keeps WorkDir/logs (one file per daemon) after Stop; every
	// other file of WorkDir is removed.
	KeepLogs bool
}

var nameRE = regexp.MustCompile(`^[a-z][a-z0-9-]{0,30}$`)

func (o *Options) defaults() {
	if o.Name == "" {
		var b [4]byte
		_, _ = rand.Read(b[:])
		o.Name = "devkube-" + hex.EncodeToString(b[:])
	}
	if o.BinDir == "" {
		o.BinDir = FindBinDir()
	}
	if o.ImageDir == "" {
		o.ImageDir = FindImageDir()
	}
	if o.Log == nil {
		o.Log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	if o.ReadyTimeout == 0 {
		o.ReadyTimeout = 4 * time.Minute
	}
}

// Validate reports a Name that is not lowercase letters, digits and '-'
// starting with a letter, at most 31 characters (it names a network
// namespace, cgroups and a CNI network). Start calls it after defaults.
func (o *Options) Validate() error {
	if !nameRE.MatchString(o.Name) {
		return fmt.Errorf("devkube: name %q: want %s", o.Name, nameRE)
	}
	return nil
}

// Cluster is a running one-node cluster. Its methods are safe for
// concurrent use; Stop is idempotent.
type Cluster struct {
	name     string
	l        layout
	netns    string
	binDir   string
	log      *slog.Logger
	detached bool
	keepLogs bool

	restConfig *rest.Config         // nil until the apiserver is up
	client     kubernetes.Interface // likewise

	mu    sync.Mutex // guards procs
	procs []*daemon  // in start order

	stopOnce sync.Once
	stopErr  error
}

// daemon is one process the cluster started.
type daemon struct {
	Name string `json:"name"`
	Pid  int    `json:"pid"`
	// exited is closed once an own child has been waited for; nil for a
	// daemon of a cluster opened from its state file (not our child).
	exited chan struct{}
	log    *os.File
}

// state is WorkDir/cluster.json: what Open needs to stop a cluster another
// process started.
type state struct {
	Name     string    `json:"name"`
	WorkDir  string    `json:"workDir"`
	BinDir   string    `json:"binDir"`
	Detached bool      `json:"detached"`
	KeepLogs bool      `json:"keepLogs"`
	Daemons  []*daemon `json:"daemons"`
}

// Name returns the cluster's name (its namespace, cgroup and CNI network).
func (c *Cluster) Name() string { return c.name }

// Netns returns the path of the cluster's network namespace,
// /run/netns/<name>: run a process there with `nsenter --net=<path>` or
// `ip netns exec <name>` (e.g. Consul beside the cluster), or a socket with
// DialContext and Listen.
func (c *Cluster) Netns() string { return c.netns }

// WorkDir returns the cluster's directory.
func (c *Cluster) WorkDir() string { return c.l.dir }

// KubeletDir is the kubelet's --root-dir (pods/<uid>/volumes/... holds
// what the pods mount).
func (c *Cluster) KubeletDir() string { return c.l.kubeletRoot() }

// LogDir returns the directory of the daemons' logs (<daemon>.log).
func (c *Cluster) LogDir() string { return c.l.logs() }

// Kubeconfig returns the admin kubeconfig (O=system:masters) for
// https://127.0.0.1:16443, which is reachable inside Netns only.
func (c *Cluster) Kubeconfig() string { return c.l.adminKubeconfig() }

// Client returns a clientset with admin rights whose connections are made
// inside the cluster's namespace (DialContext).
func (c *Cluster) Client() kubernetes.Interface { return c.client }

// RESTConfig returns a copy of the admin client configuration (its Dial
// enters the cluster's namespace), for other clients (dynamic,
// controller-runtime).
func (c *Cluster) RESTConfig() *rest.Config { return rest.CopyConfig(c.restConfig) }

// Start starts a cluster and waits until the node is Ready, the default
// ServiceAccount exists and CoreDNS answers for kubernetes.default through
// the kube-dns ClusterIP. On error everything started is stopped again and
// the error names the step and, for a daemon that died, its log's tail. A
// *MissingError means the host lacks a prerequisite.
func Start(ctx context.Context, o Options) (_ *Cluster, err error) {
	o.defaults()
	if err := o.Validate(); err != nil {
		return nil, err
	}
	if err := CheckPrerequisites(o); err != nil {
		return nil, err
	}
	if n, err := ReapStale(ctx, o.Log); err != nil {
		o.Log.Warn("devkube: stale clusters not fully cleaned", "err", err)
	} else if n > 0 {
		o.Log.Info("devkube: cleaned up stale clusters", "count", n)
	}
	if _, err := os.Stat(netnsPath(o.Name)); err == nil {
		return nil, fmt.Errorf("devkube: network namespace %s exists: another cluster of that name runs", o.Name)
	}
	if o.WorkDir == "" {
		if o.WorkDir, err = os.MkdirTemp("", o.Name+"-"); err != nil {
			return nil, fmt.Errorf("devkube: work dir: %w", err)
		}
	} else {
		if o.WorkDir, err = filepath.Abs(o.WorkDir); err != nil {
			return nil, fmt.Errorf("devkube: work dir: %w", err)
		}
		if des, _ := os.ReadDir(o.WorkDir); len(des) > 0 {
			return nil, fmt.Errorf("devkube: work dir %s is not empty", o.WorkDir)
		}
	}
	c := &Cluster{
		name: o.Name, l: layout{dir: o.WorkDir}, netns: netnsPath(o.Name), binDir: o.BinDir,
		log: o.Log.With("cluster", o.Name), detached: o.Detached, keepLogs: o.KeepLogs,
	}
	defer func() {
		if err != nil {
			if serr := c.Stop(); serr != nil {
				c.log.Warn("devkube: cleanup after failed start", "err", serr)
			}
		}
	}()
	for _, d := range []string{c.l.logs(), c.l.etcd(), c.l.kubeletRoot(), c.l.path("apiserver")} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return nil, fmt.Errorf("devkube: work dir: %w", err)
		}
	}
	if err := c.saveState(); err != nil {
		return nil, err
	}
	reg, err := lockRegistry()
	if err != nil {
		return nil, err
	}
	err = reg.add(registryEntry{Name: c.name, WorkDir: c.l.dir, Owner: os.Getpid(), Detached: c.detached})
	reg.unlock()
	if err != nil {
		return nil, err
	}
	begin := time.Now()
	ctx, cancel := context.WithTimeout(ctx, o.ReadyTimeout)
	defer cancel()
	if err := c.start(ctx, o); err != nil {
		return nil, err
	}
	c.log.Info("devkube: cluster ready", "took", time.Since(begin).Round(100*time.Millisecond).String(),
		"netns", c.netns, "kubeconfig", c.Kubeconfig())
	return c, nil
}

const steps = 9

func (c *Cluster) step(n int, msg string, args ...any) {
	c.log.Info(fmt.Sprintf("devkube: [%d/%d] %s", n, steps, msg), args...)
}

func (c *Cluster) start(ctx context.Context, o Options) error {
	c.step(1, "network namespace, bridge and cgroups", "netns", c.netns, "bridge", BridgeName+" "+NodeIP+"/24")
	if err := createNetns(ctx, c.name); err != nil {
		return err
	}
	if err := createCgroups(c.name); err != nil {
		return err
	}

	c.step(2, "certificates, kubeconfigs and configs", "dir", c.l.dir)
	p, err := generatePKI(c.l.pki())
	if err != nil {
		return err
	}
	if err := writeKubeconfig(c.l.adminKubeconfig(), p, "admin"); err != nil {
		return err
	}
	if err := writeKubeconfig(c.l.kubeletKubeconfig(), p, "kubelet"); err != nil {
		return err
	}
	pauseTags, err := ociimage.Tags(filepath.Join(o.ImageDir, PauseImageFile))
	if err != nil {
		return fmt.Errorf("devkube: %w", err)
	}
	corednsTags, err := ociimage.Tags(filepath.Join(o.ImageDir, CoreDNSImageFile))
	if err != nil {
		return fmt.Errorf("devkube: %w", err)
	}
	if err := c.l.writeContainerdConfig(imageRef(pauseTags)); err != nil {
		return err
	}
	if err := c.l.writeCNIConfig(c.name); err != nil {
		return err
	}
	if err := c.l.writeKubeletConfig(c.name); err != nil {
		return err
	}
	if err := c.l.writeKubeProxyConfig(); err != nil {
		return err
	}

	c.step(3, "etcd and containerd")
	etcdURL := "http://127.0.0.1:" + strconv.Itoa(etcdClientPort)
	peerURL := "http://127.0.0.1:" + strconv.Itoa(etcdPeerPort)
	if err := c.startDaemon("etcd", "/usr/bin/etcd",
		"--name", "devkube", "--data-dir", c.l.etcd(),
		"--listen-client-urls", etcdURL, "--advertise-client-urls", etcdURL,
		"--listen-peer-urls", peerURL, "--initial-advertise-peer-urls", peerURL,
		"--initial-cluster", "devkube="+peerURL, "--log-level", "warn"); err != nil {
		return err
	}
	if err := c.startDaemon("containerd", "/usr/bin/containerd", "--config", c.l.containerdConfig()); err != nil {
		return err
	}
	httpc := &http.Client{Transport: &http.Transport{DialContext: c.DialContext}, Timeout: 2 * time.Second}
	if err := c.waitFor(ctx, "etcd health", func(ctx context.Context) error {
		return httpOK(ctx, httpc, etcdURL+"/health", `"health":"true"`)
	}); err != nil {
		return err
	}
	if err := c.waitFor(ctx, "containerd CRI", func(ctx context.Context) error {
		return criReady(ctx, c.l.containerdSock())
	}); err != nil {
		return err
	}

	c.step(4, "importing images", "pause", imageRef(pauseTags), "coredns", imageRef(corednsTags), "more", len(o.Images))
	for _, img := range append([]string{filepath.Join(o.ImageDir, PauseImageFile), filepath.Join(o.ImageDir, CoreDNSImageFile)}, o.Images...) {
		if _, err := c.ImportImage(ctx, img); err != nil {
			return err
		}
	}

	c.step(5, "kube-apiserver")
	if err := c.startAPIServer(p, etcdURL); err != nil {
		return err
	}
	if err := c.connect(); err != nil {
		return err
	}
	if err := c.waitFor(ctx, "kube-apiserver /readyz", func(ctx context.Context) error {
		b, err := c.client.Discovery().RESTClient().Get().AbsPath("/readyz").DoRaw(ctx)
		if err != nil {
			return fmt.Errorf("%w: %s", err, bytes.TrimSpace(b))
		}
		return nil
	}); err != nil {
		return err
	}

	c.step(6, "kube-controller-manager, kube-scheduler, kubelet, kube-proxy")
	if err := c.startControllers(p); err != nil {
		return err
	}

	c.step(7, "waiting for node Ready", "node", NodeName)
	if err := c.waitFor(ctx, "node "+NodeName+" Ready", func(ctx context.Context) error {
		n, err := c.client.CoreV1().Nodes().Get(ctx, NodeName, metav1.GetOptions{})
		if err != nil {
			return err
		}
		for _, cond := range n.Status.Conditions {
			if cond.Type == corev1.NodeReady {
				if cond.Status == corev1.ConditionTrue {
					return nil
				}
				return fmt.Errorf("node condition Ready=%s: %s", cond.Status, cond.Message)
			}
		}
		return errors.New("no Ready condition yet")
	}); err != nil {
		return err
	}
	if err := c.waitFor(ctx, "default ServiceAccount", func(ctx context.Context) error {
		_, err := c.client.CoreV1().ServiceAccounts("default").Get(ctx, "default", metav1.GetOptions{})
		return err
	}); err != nil {
		return err
	}

	c.step(8, "CoreDNS", "image", imageRef(corednsTags), "service", "kube-system/kube-dns "+DNSServiceIP)
	if err := deployCoreDNS(ctx, c.client, imageRef(corednsTags)); err != nil {
		return err
	}
	if err := c.waitFor(ctx, "CoreDNS Deployment available", func(ctx context.Context) error {
		d, err := c.client.AppsV1().Deployments("kube-system").Get(ctx, "coredns", metav1.GetOptions{})
		if err != nil {
			return err
		}
		if d.Status.AvailableReplicas < 1 {
			return fmt.Errorf("%d/%d available", d.Status.AvailableReplicas, *d.Spec.Replicas)
		}
		return nil
	}); err != nil {
		return err
	}

	c.step(9, "waiting for cluster DNS through the kube-dns ClusterIP", "name", "kubernetes.default.svc."+ClusterDomain)
	return c.waitFor(ctx, "DNS answer from "+DNSServiceIP, func(ctx context.Context) error {
		addrs, err := c.Resolver().LookupHost(ctx, "kubernetes.default.svc."+ClusterDomain)
		if err != nil {
			return err
		}
		if len(addrs) != 1 || addrs[0] != APIServiceIP {
			return fmt.Errorf("kubernetes.default.svc resolved to %v, want %s", addrs, APIServiceIP)
		}
		return nil
	})
}

func (c *Cluster) startAPIServer(p *pki, etcdURL string) error {
	return c.startDaemon("kube-apiserver", filepath.Join(c.binDir, "kube-apiserver"),
		"--etcd-servers="+etcdURL,
		"--bind-address=0.0.0.0", // inside the namespace only: loopback for kubeconfigs, NodeIP for pods
		"--advertise-address="+NodeIP,
		"--secure-port="+strconv.Itoa(APIServerPort),
		"--cert-dir="+c.l.path("apiserver"),
		"--tls-cert-file="+p.path("apiserver.crt"), "--tls-private-key-file="+p.path("apiserver.key"),
		"--client-ca-file="+p.path("ca.crt"),
		"--service-account-key-file="+p.path("sa.pub"),
		"--service-account-signing-key-file="+p.path("sa.key"),
		"--service-account-issuer=https://kubernetes.default.svc."+ClusterDomain,
		"--service-cluster-ip-range="+ServiceCIDR,
		"--authorization-mode=Node,RBAC",
		"--kubelet-client-certificate="+p.path("apiserver-kubelet-client.crt"),
		"--kubelet-client-key="+p.path("apiserver-kubelet-client.key"),
		"--kubelet-certificate-authority="+p.path("ca.crt"),
		"--kubelet-preferred-address-types=Hostname,InternalIP",
		"--allow-privileged=true",
		"--profiling=false",
	)
}

func (c *Cluster) startControllers(p *pki) error {
	admin := c.l.adminKubeconfig()
	if err := c.startDaemon("kube-controller-manager", filepath.Join(c.binDir, "kube-controller-manager"),
		"--kubeconfig="+admin, "--leader-elect=false",
		"--bind-address=127.0.0.1", "--secure-port="+strconv.Itoa(controllerManagerPort),
		"--service-account-private-key-file="+p.path("sa.key"), "--root-ca-file="+p.path("ca.crt"),
		"--cluster-signing-cert-file="+p.path("ca.crt"), "--cluster-signing-key-file="+p.path("ca.key"),
		"--use-service-account-credentials=false",
		"--controllers=*,-nodeipam,-cloud-node-lifecycle,-service-lb-controller,-node-route-controller",
		// Its default, /usr/libexec/kubernetes/kubelet-plugins/volume/exec/,
		// would be created on the host.
		"--flex-volume-plugin-dir="+c.l.path("kubelet", "volume-plugins"),
		"--profiling=false",
	); err != nil {
		return err
	}
	if err := c.startDaemon("kube-scheduler", filepath.Join(c.binDir, "kube-scheduler"),
		"--kubeconfig="+admin, "--leader-elect=false",
		"--bind-address=127.0.0.1", "--secure-port="+strconv.Itoa(schedulerPort), "--profiling=false",
	); err != nil {
		return err
	}
	if err := c.startDaemon("kubelet", filepath.Join(c.binDir, "kubelet"),
		"--config="+c.l.kubeletConfig(), "--kubeconfig="+c.l.kubeletKubeconfig(),
		"--hostname-override="+NodeName, "--node-ip="+NodeIP,
		"--root-dir="+c.l.kubeletRoot(), "--cert-dir="+c.l.path("kubelet", "pki"),
	); err != nil {
		return err
	}
	return c.startDaemon("kube-proxy", filepath.Join(c.binDir, "kube-proxy"), "--config="+c.l.kubeProxyConfig())
}

// connect builds the admin client, dialing inside the namespace.
func (c *Cluster) connect() error {
	cfg, err := clientcmd.BuildConfigFromFlags("", c.l.adminKubeconfig())
	if err != nil {
		return fmt.Errorf("devkube: kubeconfig: %w", err)
	}
	cfg.Dial = c.DialContext
	cfg.QPS, cfg.Burst = 50, 100
	cs, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return fmt.Errorf("devkube: client: %w", err)
	}
	c.restConfig, c.client = cfg, cs
	return nil
}

// Resolver returns a resolver that asks the cluster DNS (the kube-dns
// ClusterIP, through kube-proxy) from inside the namespace.
func (c *Cluster) Resolver() *net.Resolver {
	return &net.Resolver{PreferGo: true, Dial: func(ctx context.Context, network, _ string) (net.Conn, error) {
		return c.DialContext(ctx, network, net.JoinHostPort(DNSServiceIP, "53"))
	}}
}

// daemonPath is the PATH the daemons run with: runc, iptables and conntrack
// live in /usr/sbin.
const daemonPath = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

// startDaemon runs bin with args in the cluster's namespace, in its own
// process group, in the daemons' freezer cgroup (joined before exec, so its
// children inherit it), with stdout and stderr appended to logs/<name>.log.
func (c *Cluster) startDaemon(name, bin string, args ...string) error {
	logf, err := os.OpenFile(filepath.Join(c.l.logs(), name+".log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return fmt.Errorf("devkube: %s: %w", name, err)
	}
	const script = `cg=$1 ns=$2; shift 2; echo $$ > "$cg/cgroup.procs" && exec nsenter --net="$ns" -- "$@"`
	cmd := exec.Command("/bin/sh", append([]string{"-c", script, "devkube-" + name, daemonsCgroup(c.name), c.netns, bin}, args...)...)
	cmd.Env = append(os.Environ(), daemonPath)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if !c.detached {
		cmd.SysProcAttr.Pdeathsig = syscall.SIGKILL
	}
	if err := cmd.Start(); err != nil {
		logf.Close()
		return fmt.Errorf("devkube: start %s: %w", name, err)
	}
	d := &daemon{Name: name, Pid: cmd.Process.Pid, exited: make(chan struct{}), log: logf}
	go func() { // owned by the cluster: ends when the daemon exits (Stop)
		_ = cmd.Wait()
		close(d.exited)
	}()
	c.mu.Lock()
	c.procs = append(c.procs, d)
	c.mu.Unlock()
	c.log.Debug("devkube: started", "daemon", name, "pid", d.Pid)
	return c.saveState()
}

func (c *Cluster) saveState() error {
	c.mu.Lock()
	s := state{Name: c.name, WorkDir: c.l.dir, BinDir: c.binDir, Detached: c.detached, KeepLogs: c.keepLogs, Daemons: c.procs}
	err := writeJSON(c.l.state(), s)
	c.mu.Unlock()
	return err
}

// waitFor polls probe every 250 ms until it returns nil, a daemon dies (the
// error then carries the tail of its log) or ctx ends. It logs progress
// every 10 s.
func (c *Cluster) waitFor(ctx context.Context, what string, probe func(context.Context) error) error {
	start := time.Now()
	lastLog := start
	tick := time.NewTicker(250 * time.Millisecond)
	defer tick.Stop()
	for {
		pctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		err := probe(pctx)
		cancel()
		if err == nil {
			c.log.Debug("devkube: ready", "what", what, "took", time.Since(start).Round(time.Millisecond).String())
			return nil
		}
		if d := c.deadDaemon(); d != nil {
			return fmt.Errorf("devkube: %s exited while waiting for %s; last lines of %s:\n%s",
				d.Name, what, d.log.Name(), tail(d.log.Name(), 30))
		}
		if time.Since(lastLog) >= 10*time.Second {
			lastLog = time.Now()
			c.log.Info("devkube: still waiting", "for", what, "elapsed", time.Since(start).Round(time.Second).String(), "last", err.Error())
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("devkube: waiting for %s: %w (last: %w)", what, ctx.Err(), err)
		case <-tick.C:
		}
	}
}

func (c *Cluster) deadDaemon() *daemon {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, d := range c.procs {
		if d.exited == nil {
			continue
		}
		select {
		case <-d.exited:
			return d
		default:
		}
	}
	return nil
}

// Command returns a command that runs name with args inside the cluster's
// network namespace (nsenter --net), with the daemons' PATH; the caller
// sets its I/O and starts it, and owns the process.
func (c *Cluster) Command(ctx context.Context, name string, args ...string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, "nsenter", append([]string{"--net=" + c.netns, "--", name}, args...)...)
	cmd.Env = append(os.Environ(), daemonPath)
	return cmd
}

// KubectlFlags returns the flags that point kubectl at the cluster: the
// admin kubeconfig and a cache dir in the work dir (kubectl's default,
// ~/.kube/cache, would be left behind on the host).
func (c *Cluster) KubectlFlags() []string {
	return []string{"--kubeconfig=" + c.Kubeconfig(), "--cache-dir=" + c.l.path("kubectl-cache")}
}

// Kubectl runs bin/kubectl with the admin kubeconfig inside the cluster's
// namespace and returns its standard output. The error carries the exit
// status and standard error.
func (c *Cluster) Kubectl(ctx context.Context, args ...string) (string, error) {
	cmd := c.Command(ctx, filepath.Join(c.binDir, "kubectl"), append(c.KubectlFlags(), args...)...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return stdout.String(), fmt.Errorf("devkube: kubectl %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return stdout.String(), nil
}

// ImportImage imports an image tarball (docker-archive or OCI layout, as
// internal/ociimage writes) into containerd's k8s.io namespace with
// `ctr images import`, and returns the references it names (use them with
// imagePullPolicy: Never).
func (c *Cluster) ImportImage(ctx context.Context, tarPath string) ([]string, error) {
	tags, err := ociimage.Tags(tarPath)
	if err != nil {
		return nil, fmt.Errorf("devkube: import: %w", err)
	}
	cmd := exec.CommandContext(ctx, "ctr", "--address", c.l.containerdSock(), "-n", "k8s.io", "images", "import", tarPath)
	cmd.Env = append(os.Environ(), daemonPath)
	if out, err := cmd.CombinedOutput(); err != nil {
		return nil, fmt.Errorf("devkube: ctr images import %s: %w: %s", tarPath, err, strings.TrimSpace(string(out)))
	}
	c.log.Debug("devkube: imported", "image", tags)
	return tags, nil
}

// httpOK GETs url and wants a 200 whose body contains want.
func httpOK(ctx context.Context, hc *http.Client, url, want string) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	resp, err := hc.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
	if resp.StatusCode != http.StatusOK || !strings.Contains(string(b), want) {
		return fmt.Errorf("%s: %s %q", url, resp.Status, b)
	}
	return nil
}

// tail returns the last n lines of a file.
func tail(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return err.Error()
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// Open returns the cluster whose work dir is workDir (started by this or
// another process, e.g. `devkube up`), for Stop, Kubectl and the clients.
func Open(workDir string, log *slog.Logger) (*Cluster, error) {
	b, err := os.ReadFile(filepath.Join(workDir, "cluster.json"))
	if err != nil {
		return nil, fmt.Errorf("devkube: open %s: %w", workDir, err)
	}
	var s state
	if err := json.Unmarshal(b, &s); err != nil {
		return nil, fmt.Errorf("devkube: open %s: %w", workDir, err)
	}
	if log == nil {
		log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	c := &Cluster{
		name: s.Name, l: layout{dir: s.WorkDir}, netns: netnsPath(s.Name), binDir: s.BinDir,
		log: log.With("cluster", s.Name), detached: s.Detached, keepLogs: s.KeepLogs, procs: s.Daemons,
	}
	if _, err := os.Stat(c.l.adminKubeconfig()); err == nil {
		if err := c.connect(); err != nil {
			return nil, err
		}
	}
	return c, nil
}

// ReapStale stops the clusters of this host whose starting process has
// died without stopping them (registered, not Detached, owner gone), as
// Stop would have. It returns how many it stopped. Each stale cluster is
// claimed under the registry lock (its owner becomes this process) before
// it is stopped, so concurrent Starts, in this process or others, stop it
// once; if this process dies while stopping it, the next one takes over.
func ReapStale(ctx context.Context, log *slog.Logger) (int, error) {
	if log == nil {
		log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	if _, err := os.Stat(registryDir); errors.Is(err, os.ErrNotExist) {
		return 0, nil
	}
	reg, err := lockRegistry()
	if err != nil {
		return 0, err
	}
	stale, err := reg.claimStale()
	reg.unlock()
	if err != nil {
		return 0, err
	}
	n := 0
	var errs []error
	for _, e := range stale {
		log.Info("devkube: stopping stale cluster", "cluster", e.Name, "owner", e.Owner, "dir", e.WorkDir)
		c, err := Open(e.WorkDir, log)
		if err != nil { // no state: clean up what the name alone tells
			c = &Cluster{name: e.Name, l: layout{dir: e.WorkDir}, netns: netnsPath(e.Name), log: log}
		}
		if err := c.Stop(); err != nil {
			errs = append(errs, err)
		}
		n++
	}
	return n, errors.Join(errs...)
}

// processAlive reports whether pid exists and is not a zombie.
func processAlive(pid int) bool {
	if pid <= 0 {
		return false
	}
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return false
	}
	// pid (comm) S ...: the state follows the last ')'.
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	return i >= 0 && i+2 < len(s) && s[i+2] != 'Z' && s[i+2] != 'X'
}
