// Command pause is the sandbox ("pause") container of internal/devkube's
// one-node cluster, in the manner of Kubernetes' build/pause/linux/pause.c:
// it holds the pod's namespaces open, reaps any child re-parented to it (it is
// PID 1 of a pod that shares its process namespace), and exits 0 on SIGTERM or
// SIGINT. Built static (CGO_ENABLED=0) into the image meshlet.local/pause.
package main

import (
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
)

func main() {
	if len(os.Args) > 1 && os.Args[1] == "-v" {
		fmt.Println("pause (meshlet devkube)")
		return
	}
	run(nil)
}

// run waits for signals: SIGCHLD reaps, SIGTERM and SIGINT exit 0. Once its
// handlers are in place it writes "ready" to ready, when not nil (tests).
func run(ready io.Writer) {
	sigs := make(chan os.Signal, 16)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGCHLD)
	if ready != nil {
		fmt.Fprintln(ready, "ready")
	}
	reap() // children that exited before the handler was in place
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
