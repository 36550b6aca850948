package kubee2e

import (
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"strings"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/meshlet/meshlet/internal/meshkube"
	"github.com/meshlet/meshlet/internal/testutil"
	"github.com/meshlet/meshlet/xds"
)

// twoPortApp is a Deployment serving HTTP on 8080 (the api example app,
// which answers with the caller's SPIFFE ID) and gRPC on 9090 (testapp's
// health service), behind one Service with both ports, no annotation.
const twoPortApp = `
apiVersion: v1
kind: Namespace
metadata: {name: ports, labels: {meshlet.io/inject: enabled}}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: multi, namespace: ports}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: multi, namespace: ports}
spec:
  selector: {matchLabels: {app: multi}}
  template:
    metadata: {labels: {app: multi}}
    spec:
      serviceAccountName: multi
      containers:
      - name: http
        image: meshlet.local/examples:dev
        imagePullPolicy: Never
        command: [/usr/local/bin/api, -addr=0.0.0.0:8080, -id=$(POD_NAME)]
        env: [{name: POD_NAME, valueFrom: {fieldRef: {fieldPath: metadata.name}}}]
        ports: [{name: http, containerPort: 8080}]
        readinessProbe: {httpGet: {path: /health, port: 8080}, periodSeconds: 1}
      - name: grpc
        image: meshlet.local/devkube-testapp:dev
        imagePullPolicy: Never
        args: [serve-grpc, "0.0.0.0:9090"]
        ports: [{name: grpc, containerPort: 9090}]
---
apiVersion: v1
kind: Service
metadata: {name: multi, namespace: ports}
spec:
  selector: {app: multi}
  ports:
  - {name: http, port: 80, targetPort: http}
  - {name: grpc, port: 9090, targetPort: grpc, appProtocol: grpc}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: kv, namespace: ports}
---
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: kv, namespace: ports}
spec:
  serviceName: kv-peers
  selector: {matchLabels: {app: kv}}
  template:
    metadata: {labels: {app: kv}}
    spec:
      serviceAccountName: kv
      containers:
      - name: kv
        image: meshlet.local/examples:dev
        imagePullPolicy: Never
        command: [/usr/local/bin/api, -addr=0.0.0.0:8080, -id=$(POD_NAME)]
        env: [{name: POD_NAME, valueFrom: {fieldRef: {fieldPath: metadata.name}}}]
        ports: [{containerPort: 8080}]
        readinessProbe: {httpGet: {path: /health, port: 8080}, periodSeconds: 1}
      - name: peer
        image: meshlet.local/devkube-testapp:dev
        imagePullPolicy: Never
        args: [serve-grpc, "0.0.0.0:9300"]
        ports: [{containerPort: 9300}]
---
apiVersion: v1
kind: Service
metadata: {name: kv-peers, namespace: ports}
spec: {clusterIP: None, selector: {app: kv}, ports: [{name: http, port: 8080}, {name: peer, port: 9300}]}
---
apiVersion: v1
kind: Service
metadata: {name: kv, namespace: ports}
spec: {selector: {app: kv}, ports: [{port: 80, targetPort: 8080}]}
`

// TestEveryServicePortThroughTheMesh: a two-port Service (HTTP and gRPC),
// injected without annotation, is reached on each port through the mesh —
// HTTP with the caller's SPIFFE ID seen by the app, gRPC's health check
// answered — and plaintext from outside the mesh to either port, by pod IP
// or ClusterIP, is refused (strict mTLS: no plaintext path around it on
// the Service's second port). A StatefulSet selected by its headless
// Service and a client Service, injected without annotation, registers as
// the client Service and is reached through both: by the client Service's
// name and by its pod's DNS name, each over mTLS (the caller's SPIFFE ID
// seen), and on the headless Service's peer port (gRPC) by the pod's name,
// which is refused in plaintext too.
func TestEveryServicePortThroughTheMesh(t *testing.T) {
	e := mesh(t)
	ctx := context.Background()
	cm, err := e.Client().CoreV1().ConfigMaps(meshkube.Namespace).Get(ctx, meshkube.PoliciesConfig, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	policies := maps.Clone(cm.Data)
	if policies == nil {
		policies = map[string]string{}
	}
	for _, svc := range []string{"multi", "kv"} {
		policies[svc+"-ports.yaml"] = fmt.Sprintf("apiVersion: meshlet.io/v1alpha1\nkind: ServiceDefaults\nmetadata: {name: %[1]s-ports}\nspec: {service: %[1]s.ports, protocol: http}\n", svc)
	}
	if err := e.SetPolicyData(ctx, policies); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = e.SetPolicyData(context.Background(), cm.Data) })
	roots, _, err := e.Consul.Client.Agent().ConnectCARoots(nil)
	if err != nil {
		t.Fatal(err)
	}
	applyYAML(t, e, twoPortApp)
	intention(t, e, "caller.ports", "multi.ports")
	intention(t, e, "caller.ports", "kv.ports")
	appReady(t, e, "ports", 3*time.Minute, "multi")
	testutil.Eventually(t, 2*time.Minute, "kv-0 Ready", func() error { return podReady(e, "ports", "kv-0") })
	pod := pods(t, e, "ports", "app=multi")[0]
	entries, _, err := e.Consul.Client.Health().Service("multi.ports", "", true, nil)
	if err != nil || len(entries) != 1 {
		t.Fatalf("Consul service multi.ports: %d passing instances (%v)", len(entries), err)
	}
	if got := entries[0].Service.Meta[xds.MetaServicePorts]; got != "80:8080,9090:9090" {
		t.Errorf("multi.ports's instance meta %s = %q, want 80:8080,9090:9090", xds.MetaServicePorts, got)
	}
	testutil.Eventually(t, 2*time.Minute, "multi serving HTTP and its gRPC port", func() error {
		dump, err := sidecarAdmin(xds.ProxyID(pod.Name, "multi.ports"), "/config_dump")
		if err != nil {
			return err
		}
		if ok, err := servesHTTP(dump); err != nil || !ok || !strings.Contains(dump, xds.LocalAppPortCluster(9090)) {
			return fmt.Errorf("the public listener does not speak HTTP (%v) or no %s in the sidecar's config yet", err, xds.LocalAppPortCluster(9090))
		}
		return nil
	})

	job := runJob(t, e, "ports", "http", getContainer("http://multi/hello", 60*time.Second), true)
	got := answerOf(t, e, "ports", job)
	if want := "spiffe://" + roots.TrustDomain + "/ns/default/dc/dc1/svc/caller.ports"; got["instance"] != pod.Name || got["caller"] != want {
		t.Errorf("http://multi/hello: answered by %q seeing caller %q; want %q seeing %q", got["instance"], got["caller"], pod.Name, want)
	}
	runJob(t, e, "ports", "grpc", `{name: get, image: meshlet.local/devkube-testapp:dev, imagePullPolicy: Never, args: [grpc-check, -timeout, 60s, "multi:9090"]}`, true)

	// The StatefulSet: registered as kv.ports, dialled directly for its
	// headless Service; reached by both names over mTLS.
	kv, _, err := e.Consul.Client.Health().Service("kv.ports", "", true, nil)
	if err != nil || len(kv) != 1 || kv[0].Service.Meta[xds.MetaDialedDirectly] != "true" || kv[0].Service.Meta[xds.MetaDirectPorts] != "9300" {
		t.Fatalf("Consul service kv.ports: %d passing instances (%v), want one dialled directly, on its peer port 9300 too", len(kv), err)
	}
	if peers, _, _ := e.Consul.Client.Catalog().Service("kv-peers.ports", "", nil); len(peers) != 0 {
		t.Errorf("the headless Service kv-peers is registered too: %d instances", len(peers))
	}
	testutil.Eventually(t, 2*time.Minute, "kv serving HTTP", func() error {
		dump, err := sidecarAdmin(xds.ProxyID("kv-0", "kv.ports"), "/config_dump")
		if err != nil {
			return err
		}
		if ok, err := servesHTTP(dump); err != nil || !ok {
			return fmt.Errorf("kv-0's public listener does not speak HTTP yet (%v)", err)
		}
		return nil
	})
	for _, url := range []string{"http://kv/hello", "http://kv-0.kv-peers:8080/hello"} {
		job := runJob(t, e, "ports", "kv", getContainer(url, 60*time.Second), true)
		got := answerOf(t, e, "ports", job)
		if want := "spiffe://" + roots.TrustDomain + "/ns/default/dc/dc1/svc/caller.ports"; got["instance"] != "kv-0" || got["caller"] != want {
			t.Errorf("%s: answered by %q seeing caller %q; want kv-0 seeing %q", url, got["instance"], got["caller"], want)
		}
	}

	// The headless Service's peer port: through the mesh by the pod's name.
	runJob(t, e, "ports", "peer", `{name: get, image: meshlet.local/devkube-testapp:dev, imagePullPolicy: Never, args: [grpc-check, -timeout, 60s, "kv-0.kv-peers:9300"]}`, true)
	kvPod, err := e.Client().CoreV1().Pods("ports").Get(ctx, "kv-0", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}

	svc, err := e.Client().CoreV1().Services("ports").Get(ctx, "multi", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for addr, h2 := range map[string]bool{
		net.JoinHostPort(pod.Status.PodIP, "8080"): false, net.JoinHostPort(pod.Status.PodIP, "9090"): true,
		net.JoinHostPort(svc.Spec.ClusterIP, "80"): false, net.JoinHostPort(svc.Spec.ClusterIP, "9090"): true,
		net.JoinHostPort(kvPod.Status.PodIP, "9300"): true,
	} {
		if err := plaintextAnswered(e, addr, h2); err == nil {
			t.Errorf("plaintext from outside the mesh to %s was answered: a path around strict mTLS", addr)
		} else {
			t.Logf("plaintext to %s refused: %v", addr, err)
		}
	}
}

// plaintextAnswered dials addr from the cluster's network namespace (no
// sidecar), sends an HTTP/1.1 request or, with h2, the HTTP/2 connection
// preface and an empty SETTINGS frame (RFC 9113 §3.4: a gRPC server
// answers with its SETTINGS), and returns nil when any byte comes back (the
// server answered in plaintext), else why not.
func plaintextAnswered(e *meshkube.Env, addr string, h2 bool) error {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := e.Cluster.DialContext(ctx, "tcp", addr)
	if err != nil {
		return err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	hello := "GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
	if h2 {
		hello = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + "\x00\x00\x00\x04\x00\x00\x00\x00\x00"
	}
	if _, err := io.WriteString(c, hello); err != nil {
		return err
	}
	b := make([]byte, 1)
	n, err := c.Read(b)
	if n > 0 {
		return nil
	}
	if err == nil {
		err = errors.New("no byte")
	}
	return err
}
