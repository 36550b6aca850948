// Command pause is the sandbox ("pause") container of internal/devkube's
// one-node cluster, in the manner of Kubernetes' build/pause/linux/pause.c:
// it holds the pod's namespaces open, reaps any child re-parented to it (it is
// PID 1 of a pod that shares its process namespace), and exits 0 on SIGTERM or
// SIGINT. Built static (CGO_ENABLED=0) into the image meshlet.local/pause.
package main

import (
	"fmt"
	"os"
	"os/signal"
	"syscall"
)

func main() {
	if len(os.Args) > 1 && os.Args[1] == "-v" {
		fmt.Println("pause (meshlet devkube)")
		return
	}
	sigs := make(chan os.Signal, 16)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGCHLD)
	for s := range sigs {
		if s != syscall.SIGCHLD {
			os.Exit(0)
		}
		reap()
	}
}

// reap collects every exited child without blocking.
func reap() {
	for {
		var ws syscall.WaitStatus
		pid, err := syscall.Wait4(-1, &ws, syscall.WNOHANG, nil)
		if pid <= 0 || err != nil {
			return
		}
	}
}
