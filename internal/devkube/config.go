package devkube

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"text/template"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
	kubeproxyv1alpha1 "k8s.io/kube-proxy/config/v1alpha1"
	kubeletv1beta1 "k8s.io/kubelet/config/v1beta1"
	"sigs.k8s.io/yaml"
)

// The cluster's fixed addresses. Every cluster runs in its own network
// namespace, so these never clash between clusters or with the host.
const (
	// NodeName is the node's name (kubelet --hostname-override); it resolves
	// to 127.0.0.1 in the namespace, where the apiserver reaches the kubelet.
	NodeName = "localhost"
	// NodeIP is the node's InternalIP: the CNI bridge's address (loopback is
	// refused as a node IP and no dummy interface driver exists here).
	NodeIP = "10.244.0.1"
	// PodCIDR is the pod network of the bridge's host-local IPAM.
	PodCIDR = "10.244.0.0/24"
	// ServiceCIDR is the ClusterIP range.
	ServiceCIDR = "10.96.0.0/16"
	// APIServiceIP is the ClusterIP of the default/kubernetes Service.
	APIServiceIP = "10.96.0.1"
	// DNSServiceIP is the ClusterIP of kube-system/kube-dns (CoreDNS), the
	// kubelet's clusterDNS.
	DNSServiceIP = "10.96.0.10"
	// ClusterDomain is the kubelet's clusterDomain.
	ClusterDomain = "cluster.local"
	// BridgeName is the CNI bridge in the cluster's namespace.
	BridgeName = "devkube0"
	// APIServerPort is kube-apiserver's secure port, on every address of
	// the namespace: https://127.0.0.1:16443 (kubeconfigs) and
	// https://10.244.0.1:16443 (the kubernetes Service's endpoint).
	APIServerPort = 16443
)

// Ports of the other daemons, inside the namespace (K8S-ONE-NODE.md).
const (
	etcdClientPort        = 23791
	etcdPeerPort          = 23801
	controllerManagerPort = 20257
	schedulerPort         = 20259
	kubeletPort           = 20250
	kubeletHealthzPort    = 20248
	kubeProxyHealthzPort  = 10256
	kubeProxyMetricsPort  = 10249
)

// layout names the files and directories of a cluster's work dir.
type layout struct{ dir string }

func (l layout) path(elem ...string) string {
	return filepath.Join(append([]string{l.dir}, elem...)...)
}
func (l layout) pki() string              { return l.path("pki") }
func (l layout) logs() string             { return l.path("logs") }
func (l layout) etcd() string             { return l.path("etcd") }
func (l layout) containerd() string       { return l.path("containerd") }
func (l layout) containerdSock() string   { return l.path("containerd", "containerd.sock") }
func (l layout) containerdConfig() string { return l.path("containerd", "config.toml") }
func (l layout) cniConfDir() string       { return l.path("cni", "net.d") }
func (l layout) kubeletRoot() string      { return l.path("kubelet", "root") }
func (l layout) kubeletConfig() string    { return l.path("kubelet", "config.yaml") }
func (l layout) kubeProxyConfig() string  { return l.path("kube-proxy.yaml") }
func (l layout) adminKubeconfig() string  { return l.path("admin.kubeconfig") }
func (l layout) kubeletKubeconfig() string {
	return l.path("kubelet.kubeconfig")
}
func (l layout) state() string { return l.path("cluster.json") }

// writeKubeconfig writes a kubeconfig for https://127.0.0.1:APIServerPort
// with the CA and the client certificate <user>.crt/.key of p embedded.
func writeKubeconfig(path string, p *pki, user string) error {
	ca, err := p.read("ca.crt")
	if err != nil {
		return err
	}
	crt, err := p.read(user + ".crt")
	if err != nil {
		return err
	}
	key, err := p.read(user + ".key")
	if err != nil {
		return err
	}
	cfg := clientcmdapi.NewConfig()
	cfg.Clusters["devkube"] = &clientcmdapi.Cluster{
		Server:                   "https://127.0.0.1:" + strconv.Itoa(APIServerPort),
		CertificateAuthorityData: ca,
	}
	cfg.AuthInfos[user] = &clientcmdapi.AuthInfo{ClientCertificateData: crt, ClientKeyData: key}
	cfg.Contexts["devkube"] = &clientcmdapi.Context{Cluster: "devkube", AuthInfo: user}
	cfg.CurrentContext = "devkube"
	if err := clientcmd.WriteToFile(*cfg, path); err != nil {
		return fmt.Errorf("devkube: kubeconfig %s: %w", filepath.Base(path), err)
	}
	return nil
}

// containerdConfigTemplate is containerd 1.6's config (version 2) with every
// path under the work dir, the CRI plugin's sandbox image, the cgroupfs
// driver and restrict_oom_score_adj (root lacks CAP_SYS_RESOURCE here; without
// it every sandbox fails with "can't get final child's PID from pipe: EOF").
// Values are TOML basic strings (Go-quoted ASCII paths).
var containerdConfigTemplate = template.Must(template.New("config.toml").Funcs(template.FuncMap{"q": strconv.Quote}).Parse(`version = 2
root = {{q .Root}}
state = {{q .State}}
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs", "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]

[grpc]
  address = {{q .Sock}}

[ttrpc]
  address = {{q .TTRPCSock}}

[plugins."io.containerd.internal.v1.opt"]
  path = {{q .Opt}}

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = {{q .SandboxImage}}
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = {{q .RuncRoot}}
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = {{q .CNIBin}}
    conf_dir = {{q .CNIConf}}
`))

func (l layout) writeContainerdConfig(sandboxImage string) error {
	if err := os.MkdirAll(l.containerd(), 0o700); err != nil {
		return fmt.Errorf("devkube: containerd config: %w", err)
	}
	var b strings.Builder
	err := containerdConfigTemplate.Execute(&b, map[string]string{
		"Root":         l.path("containerd", "root"),
		"State":        l.path("containerd", "state"),
		"Sock":         l.containerdSock(),
		"TTRPCSock":    l.containerdSock() + ".ttrpc",
		"Opt":          l.path("containerd", "opt"),
		"SandboxImage": sandboxImage,
		"RuncRoot":     l.path("containerd", "runc"),
		"CNIBin":       CNIBinDir,
		"CNIConf":      l.cniConfDir(),
	})
	if err != nil {
		return fmt.Errorf("devkube: containerd config: %w", err)
	}
	return writeFile(l.containerdConfig(), b.String())
}

// writeCNIConfig writes the bridge network: BridgeName with host-local IPAM
// over PodCIDR (state under the work dir) and a default route, which a
// connect() to a ClusterIP needs before kube-proxy's DNAT can act; safe only
// because the namespace has no uplink. The network is named after the
// cluster, so CNI's cache files (/var/lib/cni/results/<name>-*) are told
// apart.
func (l layout) writeCNIConfig(name string) error {
	conf := map[string]any{
		"cniVersion": "1.0.0",
		"name":       name,
		"plugins": []any{map[string]any{
			"type":        "bridge",
			"bridge":      BridgeName,
			"isGateway":   true,
			"ipMasq":      false,
			"hairpinMode": true,
			"ipam": map[string]any{
				"type":    "host-local",
				"ranges":  [][]map[string]string{{{"subnet": PodCIDR, "gateway": NodeIP}}},
				"routes":  []map[string]string{{"dst": "0.0.0.0/0"}},
				"dataDir": l.path("cni", "ipam"),
			},
		}},
	}
	b, err := json.MarshalIndent(conf, "", "  ")
	if err != nil {
		return fmt.Errorf("devkube: cni config: %w", err)
	}
	if err := os.MkdirAll(l.cniConfDir(), 0o755); err != nil {
		return fmt.Errorf("devkube: cni config: %w", err)
	}
	return writeFile(filepath.Join(l.cniConfDir(), "10-"+name+".conflist"), string(b))
}

// writeKubeletConfig writes the KubeletConfiguration (v1beta1) of
// K8S-ONE-NODE.md: cgroup v1 with cgroupfs under /<name>, swap allowed, image
// GC effectively off (imported images must stay: pods use
// imagePullPolicy Never), every path under the work dir, and the cluster DNS.
func (l layout) writeKubeletConfig(name string) error {
	f, t := false, true
	zero := int32(0)
	gcHigh, gcLow := int32(100), int32(99)
	resolv := "/etc/resolv.conf"
	cfg := kubeletv1beta1.KubeletConfiguration{
		TypeMeta: metav1.TypeMeta{APIVersion: "kubelet.config.k8s.io/v1beta1", Kind: "KubeletConfiguration"},
		Authentication: kubeletv1beta1.KubeletAuthentication{
			Anonymous: kubeletv1beta1.KubeletAnonymousAuthentication{Enabled: &f},
			Webhook:   kubeletv1beta1.KubeletWebhookAuthentication{Enabled: &t},
			X509:      kubeletv1beta1.KubeletX509Authentication{ClientCAFile: filepath.Join(l.pki(), "ca.crt")},
		},
		Authorization:               kubeletv1beta1.KubeletAuthorization{Mode: kubeletv1beta1.KubeletAuthorizationModeWebhook},
		Address:                     "127.0.0.1",
		Port:                        kubeletPort,
		HealthzBindAddress:          "127.0.0.1",
		HealthzPort:                 ptr(int32(kubeletHealthzPort)),
		ReadOnlyPort:                0,
		TLSCertFile:                 filepath.Join(l.pki(), "kubelet.crt"),
		TLSPrivateKeyFile:           filepath.Join(l.pki(), "kubelet.key"),
		ContainerRuntimeEndpoint:    "unix://" + l.containerdSock(),
		CgroupDriver:                "cgroupfs",
		CgroupRoot:                  "/" + name,
		FailCgroupV1:                &f,
		FailSwapOn:                  &f,
		OOMScoreAdj:                 &zero, // cannot go below 0 without CAP_SYS_RESOURCE
		PodLogsDir:                  l.path("kubelet", "pod-logs"),
		VolumePluginDir:             l.path("kubelet", "volume-plugins"),
		ResolverConfig:              &resolv,
		ClusterDNS:                  []string{DNSServiceIP},
		ClusterDomain:               ClusterDomain,
		ImageGCHighThresholdPercent: &gcHigh,
		ImageGCLowThresholdPercent:  &gcLow,
		EvictionHard: map[string]string{
			"memory.available": "100Mi", "nodefs.available": "1%",
			"imagefs.available": "1%", "nodefs.inodesFree": "1%",
		},
		SyncFrequency:             metav1.Duration{Duration: 10 * time.Second},
		FileCheckFrequency:        metav1.Duration{Duration: 10 * time.Second},
		NodeStatusUpdateFrequency: metav1.Duration{Duration: 5 * time.Second},
	}
	b, err := yaml.Marshal(cfg)
	if err != nil {
		return fmt.Errorf("devkube: kubelet config: %w", err)
	}
	if err := os.MkdirAll(filepath.Dir(l.kubeletConfig()), 0o755); err != nil {
		return fmt.Errorf("devkube: kubelet config: %w", err)
	}
	return writeFile(l.kubeletConfig(), string(b))
}

// writeKubeProxyConfig writes the KubeProxyConfiguration (v1alpha1):
// iptables mode, node "localhost", every listener on loopback, and the
// conntrack and OOM settings left alone (they are host-wide or need
// CAP_SYS_RESOURCE).
func (l layout) writeKubeProxyConfig() error {
	zero := int32(0)
	cfg := kubeproxyv1alpha1.KubeProxyConfiguration{
		TypeMeta:           metav1.TypeMeta{APIVersion: "kubeproxy.config.k8s.io/v1alpha1", Kind: "KubeProxyConfiguration"},
		HostnameOverride:   NodeName,
		BindAddress:        NodeIP,
		HealthzBindAddress: "127.0.0.1:" + strconv.Itoa(kubeProxyHealthzPort),
		MetricsBindAddress: "127.0.0.1:" + strconv.Itoa(kubeProxyMetricsPort),
		Mode:               "iptables",
		ClusterCIDR:        PodCIDR,
		NodePortAddresses:  []string{"primary"}, // the node IP only
		OOMScoreAdj:        &zero,
		Conntrack: kubeproxyv1alpha1.KubeProxyConntrackConfiguration{
			MaxPerCore:            &zero,
			Min:                   &zero,
			TCPEstablishedTimeout: &metav1.Duration{},
			TCPCloseWaitTimeout:   &metav1.Duration{},
		},
		ConfigSyncPeriod: metav1.Duration{Duration: 15 * time.Minute},
	}
	cfg.ClientConnection.Kubeconfig = l.adminKubeconfig()
	b, err := yaml.Marshal(cfg)
	if err != nil {
		return fmt.Errorf("devkube: kube-proxy config: %w", err)
	}
	return writeFile(l.kubeProxyConfig(), string(b))
}

func writeFile(path, content string) error {
	if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
		return fmt.Errorf("devkube: %w", err)
	}
	return nil
}

func ptr[T any](v T) *T { return &v }
