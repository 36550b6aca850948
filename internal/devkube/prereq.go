package devkube

import (
	"os"
	"path/filepath"
	"strings"
)

// Environment variables that point the harness at its inputs, as
// devconsul's MESHLET_CONSUL_BIN does.
const (
	// BinDirEnv names the directory holding kube-apiserver,
	// kube-controller-manager, kube-scheduler, kubelet, kube-proxy and
	// kubectl (`make kube` writes them to bin/).
	BinDirEnv = "MESHLET_KUBE_BIN_DIR"
	// ImageDirEnv names the directory holding the image tarballs pause.tar
	// and coredns.tar (`make images` writes them to bin/images/).
	ImageDirEnv = "MESHLET_KUBE_IMAGE_DIR"
)

// Package is a Debian package the cluster needs, with the files Start checks
// for to tell whether it is installed.
type Package struct {
	// Name is the Debian package name, e.g. "etcd-server".
	Name string
	// Files are absolute paths the package installs that the cluster uses.
	Files []string
}

// DebianPackages returns the Debian 12 packages the cluster runs on (the one
// list of them; deploy/tools/deps.sh installs its "kube" group from it):
// etcd-server (etcd 3.4), containerd (1.6, with ctr and the runc v2 shim),
// runc, containernetworking-plugins (bridge, host-local and loopback in
// /usr/lib/cni), iptables (kube-proxy's iptables mode), conntrack (kube-proxy
// clears UDP conntrack entries), iproute2 (ip netns) and util-linux (nsenter).
func DebianPackages() []Package {
	return []Package{
		{"etcd-server", []string{"/usr/bin/etcd"}},
		{"containerd", []string{"/usr/bin/containerd", "/usr/bin/containerd-shim-runc-v2", "/usr/bin/ctr"}},
		{"runc", []string{"/usr/sbin/runc"}},
		{"containernetworking-plugins", []string{CNIBinDir + "/bridge", CNIBinDir + "/host-local", CNIBinDir + "/loopback"}},
		{"iptables", []string{"/usr/sbin/iptables", "/usr/sbin/iptables-restore"}},
		{"conntrack", []string{"/usr/sbin/conntrack"}},
		{"iproute2", []string{"/usr/bin/ip"}},
		{"util-linux", []string{"/usr/bin/nsenter"}},
	}
}

// CNIBinDir is where Debian's containernetworking-plugins installs the CNI
// plugins.
const CNIBinDir = "/usr/lib/cni"

// KubeBinaries are the programs Start runs from Options.BinDir.
func KubeBinaries() []string {
	return []string{"kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubelet", "kube-proxy", "kubectl"}
}

// Image tarballs Start imports from Options.ImageDir: the sandbox image and
// the cluster DNS. Their tags are read from the tarballs.
const (
	PauseImageFile   = "pause.tar"
	CoreDNSImageFile = "coredns.tar"
)

// MissingError lists what the host lacks to run a cluster; its message names
// each missing piece and the command that provides it.
type MissingError struct {
	// NotRoot is set when the process does not run as uid 0.
	NotRoot bool
	// NoCgroupV1 names v1 cgroup controllers that are not mounted under
	// /sys/fs/cgroup (the cluster needs a cgroup v1 host, see PEERS.md).
	NoCgroupV1 []string
	// Packages are Debian packages with a file missing.
	Packages []string
	// Binaries are paths of missing Kubernetes programs (make kube).
	Binaries []string
	// Images are paths of missing image tarballs (make images).
	Images []string
}

// Error names every missing piece and how to get it, e.g. "devkube: cannot
// start a cluster: Debian packages missing: etcd-server (apt-get install
// etcd-server); Kubernetes binaries missing: bin/kubelet (run `make kube`,
// or set MESHLET_KUBE_BIN_DIR)".
func (e *MissingError) Error() string {
	var parts []string
	if e.NotRoot {
		parts = append(parts, "must run as root (network namespaces, cgroups, mounts)")
	}
	if len(e.NoCgroupV1) > 0 {
		parts = append(parts, "cgroup v1 controllers not mounted: "+strings.Join(e.NoCgroupV1, ", "))
	}
	if len(e.Packages) > 0 {
		parts = append(parts, "Debian packages missing: "+strings.Join(e.Packages, " ")+
			" (apt-get install "+strings.Join(e.Packages, " ")+")")
	}
	if len(e.Binaries) > 0 {
		parts = append(parts, "Kubernetes binaries missing: "+strings.Join(e.Binaries, ", ")+
			" (run `make kube`, or set "+BinDirEnv+")")
	}
	if len(e.Images) > 0 {
		parts = append(parts, "image tarballs missing: "+strings.Join(e.Images, ", ")+
			" (run `make images`, or set "+ImageDirEnv+")")
	}
	return "devkube: cannot start a cluster: " + strings.Join(parts, "; ")
}

// CheckPrerequisites reports everything missing to start a cluster with o
// (after defaults): root, a cgroup v1 host, the Debian packages of
// DebianPackages, KubeBinaries in o.BinDir and the pause and CoreDNS image
// tarballs in o.ImageDir. The error is a *MissingError; nil when all is
// there.
func CheckPrerequisites(o Options) error {
	o.defaults()
	e := &MissingError{NotRoot: os.Geteuid() != 0}
	for _, c := range []string{"cpu", "cpuacct", "cpuset", "memory", "devices", "freezer", "pids"} {
		if _, err := os.Stat(filepath.Join(cgroupRoot, c, "cgroup.procs")); err != nil {
			e.NoCgroupV1 = append(e.NoCgroupV1, c)
		}
	}
	for _, p := range DebianPackages() {
		for _, f := range p.Files {
			if _, err := os.Stat(f); err != nil {
				e.Packages = append(e.Packages, p.Name)
				break
			}
		}
	}
	for _, b := range KubeBinaries() {
		p := filepath.Join(o.BinDir, b)
		if st, err := os.Stat(p); err != nil || st.Mode()&0o111 == 0 {
			e.Binaries = append(e.Binaries, p)
		}
	}
	for _, f := range []string{PauseImageFile, CoreDNSImageFile} {
		p := filepath.Join(o.ImageDir, f)
		if _, err := os.Stat(p); err != nil {
			e.Images = append(e.Images, p)
		}
	}
	if !e.NotRoot && len(e.NoCgroupV1)+len(e.Packages)+len(e.Binaries)+len(e.Images) == 0 {
		return nil
	}
	return e
}

// moduleRoot returns the directory of the go.mod above the working
// directory, or "".
func moduleRoot() string {
	dir, err := os.Getwd()
	if err != nil {
		return ""
	}
	for d := dir; ; d = filepath.Dir(d) {
		if _, err := os.Stat(filepath.Join(d, "go.mod")); err == nil {
			return d
		}
		if filepath.Dir(d) == d {
			return ""
		}
	}
}

// FindBinDir returns $MESHLET_KUBE_BIN_DIR, else bin/ at the module root
// (found from the working directory upwards). The directory is not checked;
// CheckPrerequisites does that.
func FindBinDir() string {
	if d := os.Getenv(BinDirEnv); d != "" {
		return d
	}
	if r := moduleRoot(); r != "" {
		return filepath.Join(r, "bin")
	}
	return "bin"
}

// FindImageDir returns $MESHLET_KUBE_IMAGE_DIR, else bin/images/ at the
// module root.
func FindImageDir() string {
	if d := os.Getenv(ImageDirEnv); d != "" {
		return d
	}
	if r := moduleRoot(); r != "" {
		return filepath.Join(r, "bin", "images")
	}
	return filepath.Join("bin", "images")
}
