package devkube

import (
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	kubeletv1beta1 "k8s.io/kubelet/config/v1beta1"
	"sigs.k8s.io/yaml"
)

func readCert(t *testing.T, path string) *x509.Certificate {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	blk, _ := pem.Decode(b)
	if blk == nil {
		t.Fatalf("%s: no PEM", path)
	}
	c, err := x509.ParseCertificate(blk.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func TestPKI(t *testing.T) {
	p, err := generatePKI(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	roots.AddCert(readCert(t, p.path("ca.crt")))
	tests := []struct {
		name  string
		file  string
		cn    string
		orgs  []string
		usage x509.ExtKeyUsage
		dns   string // a name the certificate must be valid for
		ip    string
	}{
		{"apiserver", "apiserver", "kube-apiserver", nil, x509.ExtKeyUsageServerAuth, "kubernetes.default.svc.cluster.local", APIServiceIP},
		{"apiserver on loopback", "apiserver", "kube-apiserver", nil, x509.ExtKeyUsageServerAuth, "localhost", "127.0.0.1"},
		{"apiserver on node IP", "apiserver", "kube-apiserver", nil, x509.ExtKeyUsageServerAuth, "kubernetes", NodeIP},
		{"admin", "admin", "meshlet-devkube-admin", []string{"system:masters"}, x509.ExtKeyUsageClientAuth, "", ""},
		{"kubelet serving", "kubelet", "system:node:localhost", []string{"system:nodes"}, x509.ExtKeyUsageServerAuth, "localhost", "127.0.0.1"},
		{"kubelet client", "kubelet", "system:node:localhost", []string{"system:nodes"}, x509.ExtKeyUsageClientAuth, "", ""},
		{"apiserver-kubelet-client", "apiserver-kubelet-client", "kube-apiserver-kubelet-client", []string{"system:masters"}, x509.ExtKeyUsageClientAuth, "", ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := readCert(t, p.path(tt.file+".crt"))
			if c.Subject.CommonName != tt.cn || !slices.Equal(c.Subject.Organization, tt.orgs) {
				t.Errorf("subject CN=%s O=%v, want CN=%s O=%v", c.Subject.CommonName, c.Subject.Organization, tt.cn, tt.orgs)
			}
			if _, err := c.Verify(x509.VerifyOptions{Roots: roots, DNSName: tt.dns, KeyUsages: []x509.ExtKeyUsage{tt.usage}}); err != nil {
				t.Errorf("verify: %v", err)
			}
			if tt.ip != "" && !slices.ContainsFunc(c.IPAddresses, func(ip net.IP) bool { return ip.Equal(net.ParseIP(tt.ip)) }) {
				t.Errorf("IP SANs %v lack %s", c.IPAddresses, tt.ip)
			}
			if _, err := os.Stat(p.path(tt.file + ".key")); err != nil {
				t.Error(err)
			}
		})
	}
	for _, f := range []string{"sa.key", "sa.pub", "ca.key"} {
		b, err := os.ReadFile(p.path(f))
		if err != nil || !strings.HasPrefix(string(b), "-----BEGIN ") {
			t.Errorf("%s: %v %.20q", f, err, b)
		}
	}
}

func TestConfigFiles(t *testing.T) {
	l := layout{dir: t.TempDir()}
	if err := l.writeKubeletConfig("devkube-x"); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(l.kubeletConfig())
	if err != nil {
		t.Fatal(err)
	}
	var kc kubeletv1beta1.KubeletConfiguration
	if err := yaml.UnmarshalStrict(b, &kc); err != nil {
		t.Fatalf("kubelet config does not decode strictly: %v\n%s", err, b)
	}
	if kc.Kind != "KubeletConfiguration" || kc.CgroupRoot != "/devkube-x" || kc.CgroupDriver != "cgroupfs" ||
		kc.FailCgroupV1 == nil || *kc.FailCgroupV1 || !slices.Equal(kc.ClusterDNS, []string{DNSServiceIP}) ||
		kc.ContainerRuntimeEndpoint != "unix://"+l.containerdSock() || !strings.HasPrefix(kc.PodLogsDir, l.dir) {
		t.Errorf("kubelet config:\n%s", b)
	}

	if err := l.writeContainerdConfig("meshlet.local/pause:dev"); err != nil {
		t.Fatal(err)
	}
	b, err = os.ReadFile(l.containerdConfig())
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{`sandbox_image = "meshlet.local/pause:dev"`, "restrict_oom_score_adj = true",
		`address = "` + l.containerdSock() + `"`, `root = "` + l.path("containerd", "root") + `"`, "SystemdCgroup = false"} {
		if !strings.Contains(string(b), want) {
			t.Errorf("containerd config lacks %q:\n%s", want, b)
		}
	}

	if err := l.writeCNIConfig("devkube-x"); err != nil {
		t.Fatal(err)
	}
	b, err = os.ReadFile(filepath.Join(l.cniConfDir(), "10-devkube-x.conflist"))
	if err != nil {
		t.Fatal(err)
	}
	var cni struct {
		Name    string `json:"name"`
		Plugins []struct {
			Type   string `json:"type"`
			Bridge string `json:"bridge"`
			IPAM   struct {
				Routes []struct{ Dst string } `json:"routes"`
			} `json:"ipam"`
		} `json:"plugins"`
	}
	if err := json.Unmarshal(b, &cni); err != nil {
		t.Fatal(err)
	}
	if cni.Name != "devkube-x" || len(cni.Plugins) != 1 || cni.Plugins[0].Bridge != BridgeName ||
		len(cni.Plugins[0].IPAM.Routes) != 1 || cni.Plugins[0].IPAM.Routes[0].Dst != "0.0.0.0/0" {
		t.Errorf("cni config:\n%s", b)
	}

	if err := l.writeKubeProxyConfig(); err != nil {
		t.Fatal(err)
	}
	b, err = os.ReadFile(l.kubeProxyConfig())
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"mode: iptables", "hostnameOverride: localhost", "kubeconfig: " + l.adminKubeconfig()} {
		if !strings.Contains(string(b), want) {
			t.Errorf("kube-proxy config lacks %q:\n%s", want, b)
		}
	}
}

func TestSandboxNetns(t *testing.T) {
	info := `{"pid":1,"runtimeSpec":{"linux":{"namespaces":[{"type":"pid"},{"type":"network","path":"/var/run/netns/cni-1234"}]}}}`
	if got := sandboxNetns(info); got != "/var/run/netns/cni-1234" {
		t.Fatalf("sandboxNetns = %q", got)
	}
	if got := sandboxNetns("not json"); got != "" {
		t.Fatalf("sandboxNetns(bad) = %q, want empty", got)
	}
}

func TestUnescapeMount(t *testing.T) {
	if got := unescapeMount(`/a\040b\011c`); got != "/a b\tc" {
		t.Fatalf("got %q", got)
	}
}

func TestOptionsName(t *testing.T) {
	var o Options
	o.defaults()
	if err := o.Validate(); err != nil || !strings.HasPrefix(o.Name, "devkube-") {
		t.Fatalf("default name %q: %v", o.Name, err)
	}
	for _, bad := range []string{"Upper", "1x", "a_b", strings.Repeat("a", 32)} {
		o := Options{Name: bad}
		if err := o.Validate(); err == nil {
			t.Errorf("name %q accepted", bad)
		}
	}
}

func TestMissingErrorNamesTheFix(t *testing.T) {
	err := CheckPrerequisites(Options{BinDir: t.TempDir(), ImageDir: t.TempDir()})
	m, ok := err.(*MissingError)
	if !ok {
		t.Fatalf("err = %v, want *MissingError", err)
	}
	if len(m.Binaries) != len(KubeBinaries()) || len(m.Images) != 2 {
		t.Fatalf("binaries %v images %v", m.Binaries, m.Images)
	}
	for _, want := range []string{"make kube", "make images", BinDirEnv} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not say %q", err, want)
		}
	}
}
