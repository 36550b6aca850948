package devkube

import (
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// registryDir holds one entry per cluster on this host, so clusters started
// by different processes can coexist and the last one to stop removes the
// host paths they shared.
const registryDir = "/run/meshlet-devkube"

// sharedHostPaths are the host paths containerd 1.6 and the kubelet 1.36 use
// whatever their configuration says (K8S-ONE-NODE.md): shim sockets, fifos
// and runc state under /run/containerd, pod network namespaces under
// /run/netns, CNI's result cache, the kubelet's device-plugin socket and
// the /var/log/containers symlinks. They are shared by every cluster on the
// host: each cluster removes its own entries, and the last cluster to stop
// removes the directories none of them found on the host.
func sharedHostPaths() []string {
	return []string{"/run/containerd", netnsDir, "/var/lib/cni", "/var/lib/kubelet", "/var/log/containers"}
}

// registryEntry is a cluster's record in registryDir/<name>.json.
type registryEntry struct {
	Name    string `json:"name"`
	WorkDir string `json:"workDir"`
	// Owner is the pid of the process that started the cluster; with
	// Detached false the cluster dies with it and a later Start cleans up
	// after it (ReapStale).
	Owner    int  `json:"owner"`
	Detached bool `json:"detached"`
}

// hostRecord is registryDir/host.json: which shared host paths existed
// before the first of the current clusters started.
type hostRecord struct {
	Preexisting map[string]bool `json:"preexisting"`
}

// registry is the locked host registry.
type registry struct{ lock *os.File }

// lockRegistry takes the host-wide lock (flock on registryDir/lock),
// creating the directory. The lock file is re-checked after locking, since
// the last cluster's Stop removes it.
func lockRegistry() (*registry, error) {
	for {
		if err := os.MkdirAll(registryDir, 0o700); err != nil {
			return nil, fmt.Errorf("devkube: registry: %w", err)
		}
		p := filepath.Join(registryDir, "lock")
		f, err := os.OpenFile(p, os.O_CREATE|os.O_RDWR, 0o600)
		if err != nil {
			return nil, fmt.Errorf("devkube: registry: %w", err)
		}
		if err := unix.Flock(int(f.Fd()), unix.LOCK_EX); err != nil {
			f.Close()
			return nil, fmt.Errorf("devkube: registry: flock: %w", err)
		}
		var held, now unix.Stat_t
		if unix.Fstat(int(f.Fd()), &held) == nil && unix.Stat(p, &now) == nil && held.Ino == now.Ino {
			return &registry{lock: f}, nil
		}
		f.Close() // removed by a Stop while we waited: take the new one
	}
}

func (r *registry) unlock() { r.lock.Close() }

func (r *registry) entries() ([]registryEntry, error) {
	des, err := os.ReadDir(registryDir)
	if err != nil {
		return nil, fmt.Errorf("devkube: registry: %w", err)
	}
	var out []registryEntry
	for _, de := range des {
		if de.Name() == "host.json" || !strings.HasSuffix(de.Name(), ".json") {
			continue
		}
		var e registryEntry
		b, err := os.ReadFile(filepath.Join(registryDir, de.Name()))
		if err == nil && json.Unmarshal(b, &e) == nil {
			out = append(out, e)
		}
	}
	return out, nil
}

// claimStale returns the entries whose owner is gone (not Detached) after
// recording this process as their owner, so that no other ReapStale stops
// them too.
func (r *registry) claimStale() ([]registryEntry, error) {
	es, err := r.entries()
	if err != nil {
		return nil, err
	}
	var stale []registryEntry
	for _, e := range es {
		if e.Detached || processAlive(e.Owner) {
			continue
		}
		e.Owner = os.Getpid()
		if err := writeJSON(filepath.Join(registryDir, e.Name+".json"), e); err != nil {
			return stale, err
		}
		stale = append(stale, e)
	}
	return stale, nil
}

// add registers e; the first cluster records which shared paths pre-exist.
func (r *registry) add(e registryEntry) error {
	es, err := r.entries()
	if err != nil {
		return err
	}
	hostFile := filepath.Join(registryDir, "host.json")
	if _, err := os.Stat(hostFile); len(es) == 0 || errors.Is(err, fs.ErrNotExist) {
		rec := hostRecord{Preexisting: map[string]bool{}}
		for _, p := range sharedHostPaths() {
			_, err := os.Lstat(p)
			rec.Preexisting[p] = err == nil
		}
		if err := writeJSON(hostFile, rec); err != nil {
			return err
		}
	}
	return writeJSON(filepath.Join(registryDir, e.Name+".json"), e)
}

// remove deregisters name. When no cluster is left it returns the shared
// paths none of them found on the host (to be removed by the caller while
// still holding the lock), and removes the registry itself.
func (r *registry) remove(name string) (created []string, err error) {
	if err := os.Remove(filepath.Join(registryDir, name+".json")); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("devkube: registry: %w", err)
	}
	es, err := r.entries()
	if err != nil || len(es) > 0 {
		return nil, err
	}
	var rec hostRecord
	if b, err := os.ReadFile(filepath.Join(registryDir, "host.json")); err == nil {
		_ = json.Unmarshal(b, &rec)
	}
	for _, p := range sharedHostPaths() {
		if pre, known := rec.Preexisting[p]; known && !pre {
			created = append(created, p)
		}
	}
	_ = os.Remove(filepath.Join(registryDir, "host.json"))
	_ = os.Remove(filepath.Join(registryDir, "lock")) // the open lock stays held until unlock
	_ = os.Remove(registryDir)
	return created, nil
}

// removeCreatedSharedPaths removes shared host paths no cluster found on
// the host. /run/netns is a mount (ip netns add bind-mounts it onto itself)
// and is left alone while it holds any namespace, ours or not.
func removeCreatedSharedPaths(paths []string) error {
	var errs []error
	for _, p := range paths {
		if p == netnsDir {
			des, err := os.ReadDir(p)
			if err != nil || len(des) > 0 {
				continue
			}
			_ = unix.Unmount(p, 0)
			if err := syscall.Rmdir(p); err != nil && !errors.Is(err, syscall.ENOENT) {
				errs = append(errs, err)
			}
			continue
		}
		if err := os.RemoveAll(p); err != nil {
			errs = append(errs, err)
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("devkube: shared host paths: %w", err)
	}
	return nil
}

// shimSocket is containerd 1.6's shim socket for a container or sandbox id
// (runtime/v2/shim/util.go SocketAddress: /run/containerd/s/ followed by the
// hex SHA-256 of <grpc address>/<namespace>/<id>).
func shimSocket(containerdAddr, namespace, id string) string {
	sum := sha256.Sum256([]byte(filepath.Join(containerdAddr, namespace, id)))
	return fmt.Sprintf("/run/containerd/s/%x", sum)
}

// removeOwnSharedEntries removes this cluster's entries from the shared host
// paths: the shim sockets of its sandboxes and containers, its pods' network
// namespaces under /run/netns (unmounted first), CNI results of its network
// (named after the cluster) and /var/log/containers symlinks into its work
// dir.
func removeOwnSharedEntries(name, workDir, containerdAddr string, ids, podNetns []string) error {
	var errs []error
	for _, id := range ids {
		if err := os.Remove(shimSocket(containerdAddr, "k8s.io", id)); err != nil && !errors.Is(err, fs.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	for _, p := range podNetns {
		if !strings.HasPrefix(p, netnsDir+"/cni-") && !strings.HasPrefix(p, "/var"+netnsDir+"/cni-") {
			continue
		}
		_ = unix.Unmount(p, unix.MNT_DETACH)
		if err := os.Remove(p); err != nil && !errors.Is(err, fs.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	// CNI caches results as <network>-<sandbox id>-<ifname>: our network's
	// and the CRI's loopback ("cni-loopback") of our sandboxes.
	patterns := []string{"/var/lib/cni/results/" + name + "-*"}
	for _, id := range ids {
		patterns = append(patterns, "/var/lib/cni/results/*-"+id+"-*")
	}
	for _, pat := range patterns {
		ms, err := filepath.Glob(pat)
		if err != nil {
			continue
		}
		for _, m := range ms {
			if err := os.Remove(m); err != nil && !errors.Is(err, fs.ErrNotExist) {
				errs = append(errs, err)
			}
		}
	}
	if des, err := os.ReadDir("/var/log/containers"); err == nil {
		for _, de := range des {
			p := filepath.Join("/var/log/containers", de.Name())
			if t, err := os.Readlink(p); err == nil && strings.HasPrefix(t, workDir+"/") {
				if err := os.Remove(p); err != nil && !errors.Is(err, fs.ErrNotExist) {
					errs = append(errs, err)
				}
			}
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("devkube: host paths: %w", err)
	}
	return nil
}

func writeJSON(path string, v any) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return fmt.Errorf("devkube: %w", err)
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return fmt.Errorf("devkube: %w", err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("devkube: %w", err)
	}
	return nil
}

// hostTestLock is the lock file LockHostForTests takes (the FHS place for
// lock files; it stays, empty, after the tests).
const hostTestLock = "/run/lock/meshlet-devkube-tests"

// LockHostForTests takes the host-wide test lock (flock on
// /run/lock/meshlet-devkube-tests), blocking until it is granted, and
// returns the function that releases it. A test that snapshots the host
// paths clusters share and asserts that a stopped cluster left them as it
// found them takes it exclusive: no cluster of another test binary may
// start or stop meanwhile (go test runs packages in parallel). A test
// binary that starts clusters of its own takes it shared for its whole run.
// Errors are those of open(2) and flock(2).
func LockHostForTests(exclusive bool) (release func(), err error) {
	if err := os.MkdirAll(filepath.Dir(hostTestLock), 0o755); err != nil {
		return nil, fmt.Errorf("devkube: test lock: %w", err)
	}
	f, err := os.OpenFile(hostTestLock, os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, fmt.Errorf("devkube: test lock: %w", err)
	}
	how := unix.LOCK_SH
	if exclusive {
		how = unix.LOCK_EX
	}
	if err := unix.Flock(int(f.Fd()), how); err != nil {
		f.Close()
		return nil, fmt.Errorf("devkube: test lock: flock: %w", err)
	}
	return func() { f.Close() }, nil
}
