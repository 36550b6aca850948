package devkube

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"syscall"
	"time"
)

// Stop stops the cluster and removes everything it made, whichever process
// started it: the node agents and controllers first (nothing recreates
// pods), then every pod through containerd's CRI (containers, shims, pod
// network namespaces, CNI state), containerd, kube-apiserver and etcd (each
// by process group: SIGTERM, SIGKILL after 10 s); then whatever still runs in
// the cluster's cgroups, its entries in the host paths containerd and the
// kubelet hard-code, every mount under the work dir (the kubelet's root
// bind mount included), the network namespace, the cgroups in every
// hierarchy (v1 and unified), its host registry entry (the last cluster
// removes the shared host directories none found) and the work dir
// (WorkDir/logs stays with KeepLogs). It goes on past failures and returns
// them joined. It is idempotent.
func (c *Cluster) Stop() error {
	c.stopOnce.Do(func() { c.stopErr = c.stop() })
	return c.stopErr
}

func (c *Cluster) stop() error {
	begin := time.Now()
	c.log.Info("devkube: stopping", "dir", c.l.dir)
	var errs []error
	for _, n := range []string{"kube-proxy", "kube-scheduler", "kube-controller-manager", "kubelet"} {
		c.stopDaemon(n)
	}
	// What the running containers leave on the host, from their bundles
	// (all that is left to go by when containerd died with its owner) and
	// from the CRI.
	td := bundles(c.l.path("containerd", "state"))
	if c.running("containerd") {
		cri, err := teardownPods(context.Background(), c.l.containerdSock())
		if err != nil {
			errs = append(errs, err)
		}
		td.ids = append(td.ids, cri.ids...)
		td.netns = append(td.netns, cri.netns...)
	}
	for _, n := range []string{"containerd", "kube-apiserver", "etcd"} {
		c.stopDaemon(n)
	}
	if n, err := killCgroup(filepath.Join(cgroupRoot, "freezer", c.name), 10*time.Second); err != nil {
		errs = append(errs, err)
	} else if n > 0 {
		c.log.Info("devkube: killed leftover processes", "count", n)
	}
	if err := removeOwnSharedEntries(c.name, c.l.dir, c.l.containerdSock(), td.ids, td.netns); err != nil {
		errs = append(errs, err)
	}
	if err := unmountAll(c.l.dir); err != nil {
		errs = append(errs, err)
	}
	if err := deleteNetns(c.name); err != nil {
		errs = append(errs, err)
	}
	if err := removeCgroups(c.name); err != nil {
		errs = append(errs, err)
	}
	if reg, err := lockRegistry(); err != nil {
		errs = append(errs, err)
	} else {
		created, err := reg.remove(c.name)
		if err != nil {
			errs = append(errs, err)
		}
		if err := removeCreatedSharedPaths(created); err != nil {
			errs = append(errs, err)
		}
		reg.unlock()
	}
	c.mu.Lock()
	for _, d := range c.procs {
		if d.log != nil {
			d.log.Close()
		}
	}
	c.mu.Unlock()
	if err := c.removeWorkDir(); err != nil {
		errs = append(errs, err)
	}
	err := errors.Join(errs...)
	c.log.Info("devkube: stopped", "took", time.Since(begin).Round(100*time.Millisecond).String(), "err", err)
	return err
}

// removeWorkDir removes the work dir, or all of it but logs/ with KeepLogs.
// Mounts are gone by now; a mount that could not be removed makes this fail
// rather than delete through it.
func (c *Cluster) removeWorkDir() error {
	if c.l.dir == "" {
		return nil
	}
	if mps, _ := mountsUnder(c.l.dir); len(mps) > 0 {
		return fmt.Errorf("devkube: not removing %s: still mounted: %v", c.l.dir, mps)
	}
	if !c.keepLogs {
		if err := os.RemoveAll(c.l.dir); err != nil {
			return fmt.Errorf("devkube: %w", err)
		}
		return nil
	}
	des, err := os.ReadDir(c.l.dir)
	if err != nil {
		return fmt.Errorf("devkube: %w", err)
	}
	for _, de := range des {
		if de.Name() == "logs" {
			continue
		}
		if err := os.RemoveAll(filepath.Join(c.l.dir, de.Name())); err != nil {
			return fmt.Errorf("devkube: %w", err)
		}
	}
	return nil
}

func (c *Cluster) daemon(name string) *daemon {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, d := range c.procs {
		if d.Name == name {
			return d
		}
	}
	return nil
}

// running reports whether the named daemon is alive.
func (c *Cluster) running(name string) bool {
	d := c.daemon(name)
	return d != nil && !d.gone()
}

// gone reports whether the daemon has exited (and been reaped, for our own
// children).
func (d *daemon) gone() bool {
	if d.exited != nil {
		select {
		case <-d.exited:
			return true
		default:
			return false
		}
	}
	return !processAlive(d.Pid)
}

// stopDaemon sends SIGTERM to the daemon's process group, then SIGKILL
// after 10 s, and waits for it to exit.
func (c *Cluster) stopDaemon(name string) {
	d := c.daemon(name)
	if d == nil || d.gone() {
		return
	}
	begin := time.Now()
	_ = syscall.Kill(-d.Pid, syscall.SIGTERM)
	if d.wait(10 * time.Second) {
		c.log.Debug("devkube: stopped", "daemon", name, "took", time.Since(begin).Round(time.Millisecond).String())
		return
	}
	c.log.Warn("devkube: daemon ignored SIGTERM, killing it", "daemon", name, "pid", d.Pid)
	_ = syscall.Kill(-d.Pid, syscall.SIGKILL)
	if !d.wait(10 * time.Second) {
		c.log.Warn("devkube: daemon survived SIGKILL", "daemon", name, "pid", d.Pid)
	}
}

// wait waits up to timeout for the daemon to exit.
func (d *daemon) wait(timeout time.Duration) bool {
	deadline := time.After(timeout)
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for {
		if d.gone() {
			return true
		}
		select {
		case <-deadline:
			return d.gone()
		case <-tick.C:
		}
	}
}
