package devkube

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// criTeardown is what tearing down the pods left to clean on the host.
type criTeardown struct {
	ids   []string // sandbox and container IDs (their shim sockets)
	netns []string // the sandboxes' network namespace paths
}

// teardownPods stops and removes every pod sandbox through containerd's CRI
// service, as the kubelet does when it deletes a pod: containers are killed,
// CNI DEL releases the pod's address and veth, and containerd removes the
// pod's network namespace and the shims exit. It runs after the kubelet has
// stopped, so nothing recreates them. It returns the IDs and namespaces
// seen, to clear what containerd leaves on the host if it is interrupted.
func teardownPods(ctx context.Context, sock string) (criTeardown, error) {
	var td criTeardown
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return td, fmt.Errorf("devkube: cri: %w", err)
	}
	defer conn.Close()
	rt := runtimeapi.NewRuntimeServiceClient(conn)
	ctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()

	cs, err := rt.ListContainers(ctx, &runtimeapi.ListContainersRequest{})
	if err != nil {
		return td, fmt.Errorf("devkube: cri: list containers: %w", err)
	}
	for _, c := range cs.Containers {
		td.ids = append(td.ids, c.Id)
	}
	sbs, err := rt.ListPodSandbox(ctx, &runtimeapi.ListPodSandboxRequest{})
	if err != nil {
		return td, fmt.Errorf("devkube: cri: list sandboxes: %w", err)
	}
	var errs []error
	for _, sb := range sbs.Items {
		td.ids = append(td.ids, sb.Id)
		if st, err := rt.PodSandboxStatus(ctx, &runtimeapi.PodSandboxStatusRequest{PodSandboxId: sb.Id, Verbose: true}); err == nil {
			if p := sandboxNetns(st.Info["info"]); p != "" {
				td.netns = append(td.netns, p)
			}
		}
		if _, err := rt.StopPodSandbox(ctx, &runtimeapi.StopPodSandboxRequest{PodSandboxId: sb.Id}); err != nil {
			errs = append(errs, fmt.Errorf("stop sandbox %s (%s/%s): %w", sb.Id, sb.Metadata.GetNamespace(), sb.Metadata.GetName(), err))
			continue
		}
		if _, err := rt.RemovePodSandbox(ctx, &runtimeapi.RemovePodSandboxRequest{PodSandboxId: sb.Id}); err != nil {
			errs = append(errs, fmt.Errorf("remove sandbox %s: %w", sb.Id, err))
		}
	}
	if err := errors.Join(errs...); err != nil {
		return td, fmt.Errorf("devkube: cri: %w", err)
	}
	return td, nil
}

// sandboxNetns reads the network namespace path from containerd's verbose
// sandbox info (its runtimeSpec's linux.namespaces).
func sandboxNetns(info string) string {
	var v struct {
		RuntimeSpec struct {
			Linux struct {
				Namespaces []struct {
					Type string `json:"type"`
					Path string `json:"path"`
				} `json:"namespaces"`
			} `json:"linux"`
		} `json:"runtimeSpec"`
	}
	if json.Unmarshal([]byte(info), &v) != nil {
		return ""
	}
	for _, ns := range v.RuntimeSpec.Linux.Namespaces {
		if ns.Type == "network" {
			return ns.Path
		}
	}
	return ""
}

// criReady asks containerd's CRI service for its version and status.
func criReady(ctx context.Context, sock string) error {
	if _, err := os.Stat(sock); err != nil {
		return err
	}
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return err
	}
	defer conn.Close()
	rt := runtimeapi.NewRuntimeServiceClient(conn)
	if _, err := rt.Version(ctx, &runtimeapi.VersionRequest{}); err != nil {
		return err
	}
	st, err := rt.Status(ctx, &runtimeapi.StatusRequest{})
	if err != nil {
		return err
	}
	for _, c := range st.GetStatus().GetConditions() {
		if c.Type == runtimeapi.RuntimeReady && !c.Status {
			return fmt.Errorf("runtime not ready: %s %s", c.Reason, c.Message)
		}
	}
	return nil
}

// bundles reads containerd's task bundles under its state dir
// (io.containerd.runtime.v2.task/k8s.io/<id>/config.json, the OCI runtime
// spec of each running container and sandbox): their IDs and the network
// namespaces of the sandboxes. Stop uses it when containerd is no longer
// there to ask, e.g. after the process that started the cluster died.
func bundles(stateDir string) criTeardown {
	var td criTeardown
	dir := filepath.Join(stateDir, "io.containerd.runtime.v2.task", "k8s.io")
	des, err := os.ReadDir(dir)
	if err != nil {
		return td
	}
	for _, de := range des {
		td.ids = append(td.ids, de.Name())
		b, err := os.ReadFile(filepath.Join(dir, de.Name(), "config.json"))
		if err != nil {
			continue
		}
		if p := sandboxNetns(`{"runtimeSpec":` + string(b) + `}`); p != "" {
			td.netns = append(td.netns, p)
		}
	}
	return td
}
