// Command devkube starts and stops internal/devkube's one-node Kubernetes
// cluster for humans and the Kubernetes demo:
//
//	devkube up [-name meshlet-dev] [-dir .work/devkube] [-image x.tar ...]
//	                  start it and leave it running; prints how to use kubectl
//	devkube down [-dir .work/devkube]
//	                  stop it and remove everything it made
//	devkube env [-dir .work/devkube]
//	                  print KUBECONFIG, DEVKUBE_NETNS and a kubectl alias for a shell
//	devkube import [-dir .work/devkube] x.tar ...
//	                  import image tarballs into the running cluster
//	devkube kubectl [-dir .work/devkube] ARGS...
//	                  run bin/kubectl with the admin kubeconfig in the cluster's namespace
//
// The binaries come from bin/ (or $MESHLET_KUBE_BIN_DIR) and the pause and
// CoreDNS images from bin/images/ (or $MESHLET_KUBE_IMAGE_DIR): `make kube
// images`. It needs root. DEVKUBE_DEBUG=1 logs every daemon start, wait and
// stop. Exit status 1 on failure, 2 on bad usage.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/meshlet/meshlet/internal/devkube"
)

type images []string

func (i *images) String() string     { return strings.Join(*i, ",") }
func (i *images) Set(v string) error { *i = append(*i, v); return nil }

func main() {
	level := slog.LevelInfo
	if os.Getenv("DEVKUBE_DEBUG") != "" {
		level = slog.LevelDebug
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	err := run(os.Args[1:], log)
	if err != nil {
		fmt.Fprintln(os.Stderr, "devkube:", err)
		if errors.Is(err, flag.ErrHelp) {
			os.Exit(2)
		}
		os.Exit(1)
	}
}

func usage() error {
	fmt.Fprintln(os.Stderr, "usage: devkube up|down|env|import|kubectl [-dir DIR] ...")
	return flag.ErrHelp
}

// defaultDir is .work/devkube at the module root (or the working dir).
func defaultDir() string {
	dir, _ := os.Getwd()
	for d := dir; ; d = filepath.Dir(d) {
		if _, err := os.Stat(filepath.Join(d, "go.mod")); err == nil {
			return filepath.Join(d, ".work", "devkube")
		}
		if filepath.Dir(d) == d {
			return filepath.Join(dir, ".work", "devkube")
		}
	}
}

func run(args []string, log *slog.Logger) error {
	if len(args) == 0 {
		return usage()
	}
	cmd, args := args[0], args[1:]
	fl := flag.NewFlagSet("devkube "+cmd, flag.ContinueOnError)
	dir := fl.String("dir", defaultDir(), "the cluster's work dir")
	name := fl.String("name", "meshlet-dev", "cluster name (network namespace /run/netns/NAME); up only")
	var imgs images
	fl.Var(&imgs, "image", "image tarball to import at start; repeatable; up only")
	if err := fl.Parse(args); err != nil {
		return fmt.Errorf("%w: %w", err, flag.ErrHelp)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	switch cmd {
	case "up":
		return up(ctx, *dir, *name, imgs, log)
	case "down":
		c, err := devkube.Open(*dir, log)
		if err != nil {
			return fmt.Errorf("no cluster at %s: %w", *dir, err)
		}
		if err := c.Stop(); err != nil {
			return err
		}
		fmt.Printf("devkube: cluster %s stopped; nothing of it is left on the host\n", c.Name())
		return nil
	case "env":
		c, err := devkube.Open(*dir, log)
		if err != nil {
			return fmt.Errorf("no cluster at %s: %w", *dir, err)
		}
		fmt.Printf("export KUBECONFIG=%s\nexport DEVKUBE_NETNS=%s\nalias kubectl='ip netns exec %s %s %s'\n",
			c.Kubeconfig(), c.Name(), c.Name(), kubectlPath(), strings.Join(c.KubectlFlags(), " "))
		return nil
	case "import":
		c, err := devkube.Open(*dir, log)
		if err != nil {
			return fmt.Errorf("no cluster at %s: %w", *dir, err)
		}
		for _, t := range fl.Args() {
			tags, err := c.ImportImage(ctx, t)
			if err != nil {
				return err
			}
			fmt.Printf("devkube: imported %s (%s)\n", t, strings.Join(tags, ", "))
		}
		return nil
	case "kubectl":
		c, err := devkube.Open(*dir, log)
		if err != nil {
			return fmt.Errorf("no cluster at %s: %w", *dir, err)
		}
		k := c.Command(ctx, kubectlPath(), append(c.KubectlFlags(), fl.Args()...)...)
		k.Stdin, k.Stdout, k.Stderr = os.Stdin, os.Stdout, os.Stderr
		return k.Run()
	default:
		return usage()
	}
}

func kubectlPath() string { return filepath.Join(devkube.FindBinDir(), "kubectl") }

func up(ctx context.Context, dir, name string, imgs []string, log *slog.Logger) error {
	if old, err := devkube.Open(dir, log); err == nil {
		if _, err := os.Stat(old.Netns()); err == nil {
			return fmt.Errorf("cluster %s is already up at %s (devkube down stops it)", old.Name(), dir)
		}
		log.Info("devkube: cleaning up a cluster that is no longer running", "dir", dir)
		if err := old.Stop(); err != nil {
			return err
		}
	}
	if err := os.RemoveAll(dir); err != nil { // leftover logs of a previous cluster
		return err
	}
	c, err := devkube.Start(ctx, devkube.Options{Name: name, WorkDir: dir, Images: imgs, Log: log, Detached: true})
	if err != nil {
		return err
	}
	k := kubectlPath()
	dirFlag := ""
	if dir != defaultDir() {
		dirFlag = " -dir " + dir
	}
	fmt.Printf(`
devkube: cluster %[1]s is up (Kubernetes v1.36.3, one node, CoreDNS at %[2]s)
  network namespace  %[3]s (every daemon, port and iptables rule of the cluster is in it)
  kubectl            ip netns exec %[1]s %[4]s %[8]s get pods -A
                     or: go run ./internal/devkube/cmd/devkube kubectl%[7]s get pods -A
  a shell inside     ip netns exec %[1]s bash   (then: export KUBECONFIG=%[5]s)
  import an image    go run ./internal/devkube/cmd/devkube import%[7]s bin/images/meshlet.tar
  logs               %[6]s/
  stop               go run ./internal/devkube/cmd/devkube down%[7]s   (or make kube-down)
`, c.Name(), devkube.DNSServiceIP, c.Netns(), k, c.Kubeconfig(), c.LogDir(), dirFlag, strings.Join(c.KubectlFlags(), " "))
	return nil
}
