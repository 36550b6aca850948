package kubee2e

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/meshlet/meshlet/internal/devkube"
	"github.com/meshlet/meshlet/internal/meshkube"
	"github.com/meshlet/meshlet/internal/testutil"
	"github.com/meshlet/meshlet/xds"
)

// transparentApp is the example app with nothing meshlet-specific but the
// namespace label and meshlet.io/transparent-proxy: web calls api and store
// by their Service names; api fails half its answers on purpose, which a
// RetryPolicy hides; web's app port is excluded from inbound interception
// so the test can call it from the node as an ingress would. Each workload
// runs as the ServiceAccount of its service's name (a sidecar's identity).
const transparentApp = `
apiVersion: v1
kind: Namespace
metadata: {name: tp, labels: {meshlet.io/inject: enabled}}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: web, namespace: tp}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: api, namespace: tp}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: store, namespace: tp}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: redis, namespace: tp}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: cache, namespace: tp}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: tp}
spec:
  selector: {matchLabels: {app: web}}
  template:
    metadata:
      labels: {app: web}
      annotations: {meshlet.io/transparent-proxy: "true", meshlet.io/exclude-inbound-ports: "8080"}
    spec:
      serviceAccountName: web
      containers:
      - name: web
        image: meshlet.local/examples:dev
        imagePullPolicy: Never
        command: [/usr/local/bin/web, -addr=0.0.0.0:8080, -api-url=http://api.tp.svc.cluster.local, -store-addr=store.tp.svc.cluster.local:9100]
        ports: [{containerPort: 8080}]
        readinessProbe: {httpGet: {path: /health, port: 8080}, periodSeconds: 1}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: tp}
spec: {selector: {app: web}, ports: [{port: 80, targetPort: 8080}]}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: api, namespace: tp}
spec:
  replicas: 2
  selector: {matchLabels: {app: api}}
  template:
    metadata:
      labels: {app: api}
      annotations: {meshlet.io/transparent-proxy: "true"}
    spec:
      serviceAccountName: api
      containers:
      - name: api
        image: meshlet.local/examples:dev
        imagePullPolicy: Never
        command: [/usr/local/bin/api, -addr=0.0.0.0:8080, -id=$(POD_NAME), -fail-rate=0.3]
        env: [{name: POD_NAME, valueFrom: {fieldRef: {fieldPath: metadata.name}}}]
        ports: [{containerPort: 8080}]
        readinessProbe: {httpGet: {path: /health, port: 8080}, periodSeconds: 1}
---
apiVersion: v1
kind: Service
metadata: {name: api, namespace: tp}
spec: {selector: {app: api}, ports: [{port: 80, targetPort: 8080}]}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: store, namespace: tp}
spec:
  selector: {matchLabels: {app: store}}
  template:
    metadata:
      labels: {app: store}
      annotations: {meshlet.io/transparent-proxy: "true"}
    spec:
      serviceAccountName: store
      containers:
      - name: store
        image: meshlet.local/examples:dev
        imagePullPolicy: Never
        command: [/usr/local/bin/store, -addr=0.0.0.0:9100, -id=$(POD_NAME)]
        env: [{name: POD_NAME, valueFrom: {fieldRef: {fieldPath: metadata.name}}}]
        ports: [{containerPort: 9100}]
---
apiVersion: v1
kind: Service
metadata: {name: store, namespace: tp}
spec: {selector: {app: store}, ports: [{port: 9100, targetPort: 9100}]}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: redis, namespace: tp}
spec:
  selector: {matchLabels: {app: redis}}
  template:
    metadata:
      labels: {app: redis}
      annotations: {meshlet.io/transparent-proxy: "true"}
    spec:
      serviceAccountName: redis
      containers:
      - name: redis
        image: meshlet.local/redis:dev
        imagePullPolicy: Never
        args: [--port, "6379", --protected-mode, "no", --save, "", --appendonly, "no", --dir, /tmp]
        ports: [{containerPort: 6379}]
        readinessProbe: {tcpSocket: {port: 6379}, periodSeconds: 1}
---
apiVersion: v1
kind: Service
metadata: {name: redis, namespace: tp}
spec: {selector: {app: redis}, ports: [{port: 6379, targetPort: 6379}]}
---
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: cache, namespace: tp}
spec:
  serviceName: cache
  replicas: 2
  selector: {matchLabels: {app: cache}}
  template:
    metadata:
      labels: {app: cache}
      annotations: {meshlet.io/transparent-proxy: "true"}
    spec:
      serviceAccountName: cache
      containers:
      - name: redis
        image: meshlet.local/redis:dev
        imagePullPolicy: Never
        args: [--port, "6379", --protected-mode, "no", --save, "", --appendonly, "no", --dir, /tmp]
        ports: [{containerPort: 6379}]
        readinessProbe: {tcpSocket: {port: 6379}, periodSeconds: 1}
---
apiVersion: v1
kind: Service
metadata: {name: cache, namespace: tp}
spec: {clusterIP: None, selector: {app: cache}, ports: [{port: 6379, targetPort: 6379}]}
`

// redisImage is Debian's redis-server and redis-cli (make images).
const redisImage = "redis.tar"

// TestTransparentProxy: an unmodified app calling its upstreams by
// Service name is carried through both sidecars with mTLS (api sees web's
// SPIFFE ID), a retry policy on api applies to that traffic, an intention
// deny blocks it with 403 authz_denied at the caller's sidecar, a TCP
// service is reached the same way, an address outside the mesh passes
// through (allow-any) or is refused (registry-only), a Redis client (a
// Job running redis-cli) reaches a Redis Service by name and one pod of a
// headless Service by its own name, and a Job in the namespace completes.
func TestTransparentProxy(t *testing.T) {
	e := mesh(t)
	ctx := context.Background()
	intention(t, e, "web.tp", "api.tp")
	intention(t, e, "web.tp", "store.tp")
	intention(t, e, "caller.tp", "api.tp")
	intention(t, e, "caller.tp", "redis.tp")
	intention(t, e, "caller.tp", "cache.tp")
	cm, err := e.Client().CoreV1().ConfigMaps(meshkube.Namespace).Get(ctx, meshkube.PoliciesConfig, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	// The mesh defaults, this namespace's service defaults (api and web
	// speak HTTP; a Service is <service>.tp in Consul), and a retry policy
	// for api (10 retries on 5xx: 30 calls to an api failing 30% of the
	// time all succeed but with probability 1 - 30 × 0.3^11).
	services := strings.ReplaceAll(cm.Data["services.yaml"], ".shop\n", ".tp\n")
	policies := map[string]string{"mesh.yaml": cm.Data["mesh.yaml"], "services.yaml": services,
		"retry.yaml": "apiVersion: meshlet.io/v1alpha1\nkind: RetryPolicy\nmetadata: {name: api-retries}\nspec:\n  service: api.tp\n  retryOn: [5xx]\n  numRetries: 10\n  backoff: {baseInterval: 5ms, maxInterval: 20ms}\n"}
	if err := e.SetPolicyData(ctx, policies); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = e.SetPolicyData(ctx, cm.Data) })
	applyYAML(t, e, transparentApp)
	appReady(t, e, "tp", 3*time.Minute, "web", "api", "store", "redis")
	for _, p := range pods(t, e, "tp", "") {
		if len(p.Spec.InitContainers) < 2 || p.Spec.InitContainers[0].Name != "meshlet-init" {
			t.Fatalf("pod %s: no meshlet-init before the sidecar: %v", p.Name, p.Spec.InitContainers)
		}
	}
	roots, _, err := e.Consul.Client.Agent().ConnectCARoots(nil)
	if err != nil {
		t.Fatal(err)
	}
	web := pods(t, e, "tp", "app=web")[0]
	webURL := "http://" + net.JoinHostPort(web.Status.PodIP, "8080")

	// The policy ConfigMap reaches the control plane when the kubelet
	// syncs the volume (seconds): wait for the retry policy in web's
	// sidecar before counting on it (and on its
	// service defaults: api speaks HTTP, so it sees web's identity).
	testutil.Eventually(t, 90*time.Second, "the RetryPolicy in web's sidecar", func() error {
		dump, err := sidecarAdmin(xds.ProxyID(web.Name, "web.tp"), "/config_dump")
		if err != nil {
			return err
		}
		var v any
		if err := json.Unmarshal([]byte(dump), &v); err != nil {
			return err
		}
		if !hasField(v, "numRetries", 10.0) {
			return errors.New("no route with numRetries 10 yet")
		}
		return nil
	})
	// web → api by name: mTLS, web's identity, the retry policy hides
	// api's failures (half of its answers are 503).
	ok := 0
	testutil.Eventually(t, 90*time.Second, "web reaches api by its Service name", func() error {
		code, body, err := httpGet(e, webURL+"/api")
		if err != nil || code != 200 {
			return fmt.Errorf("%d %s %v", code, body, err)
		}
		var got map[string]string
		_ = json.Unmarshal(body, &got)
		if want := "spiffe://" + roots.TrustDomain + "/ns/default/dc/dc1/svc/web.tp"; got["caller"] != want {
			// api's sidecar takes the policy set a moment after web's
			return fmt.Errorf("api saw caller %q, want %q", got["caller"], want)
		}
		return nil
	})
	var failed []string
	for range 30 {
		code, body, err := httpGet(e, webURL+"/api")
		if err == nil && code == 200 {
			ok++
		} else {
			failed = append(failed, fmt.Sprintf("%d %s %v", code, body, err))
		}
	}
	if ok != 30 {
		t.Errorf("%d of 30 calls succeeded; the retry policy (10 retries on 5xx) should hide api's 30%% failures; failures: %q", ok, failed)
	}
	// web → store (TCP) by name.
	if code, body, err := httpGet(e, webURL+"/store"); err != nil || code != 200 {
		t.Errorf("web → store by name: %d %s %v", code, body, err)
	}

	// An intention deny: refused at web's sidecar with the typed reason.
	entry := &api.ServiceIntentionsConfigEntry{Kind: api.ServiceIntentions, Name: "api.tp",
		Sources: []*api.SourceIntention{{Name: "web.tp", Action: api.IntentionActionDeny}, {Name: "caller.tp", Action: api.IntentionActionAllow}}}
	if _, _, err := e.Consul.Client.ConfigEntries().Set(entry, nil); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, 30*time.Second, "the deny in force", func() error {
		code, body, err := httpGet(e, webURL+"/api")
		if err != nil {
			return err
		}
		if code != http.StatusBadGateway || !strings.Contains(string(body), "403") || !strings.Contains(string(body), "authz_denied") {
			return fmt.Errorf("%d %s", code, body)
		}
		return nil
	})
	entry.Sources = []*api.SourceIntention{{Name: "web.tp", Action: api.IntentionActionAllow}, {Name: "caller.tp", Action: api.IntentionActionAllow}}
	if _, _, err := e.Consul.Client.ConfigEntries().Set(entry, nil); err != nil {
		t.Fatal(err)
	}

	// Outside the mesh: a server on the node, reached by a Job in the
	// namespace (pass-through); the Job completes with its sidecar.
	ln, err := e.Cluster.Listen("tcp", devkube.NodeIP+":0")
	if err != nil {
		t.Fatal(err)
	}
	outside := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { fmt.Fprint(w, "outside") })}
	go outside.Serve(ln)
	t.Cleanup(func() { outside.Close() })
	runJob(t, e, "tp", "caller-out", getContainer("http://"+ln.Addr().String()+"/", 30*time.Second), true)
	runJob(t, e, "tp", "caller", getContainer("http://api.tp.svc.cluster.local/hello", 30*time.Second), true)

	// Redis by Service name: redis-cli (-e: exit 1 on an error reply or no
	// connection) SETs through both sidecars, a second Job GETs it back.
	// The redis pod's inbound is intercepted and mTLS is strict, so only
	// the mesh path can carry it.
	redisCLI := func(args ...string) string {
		q := make([]string, len(args))
		for i, a := range args {
			q[i] = fmt.Sprintf("%q", a)
		}
		return `{name: redis-cli, image: meshlet.local/redis:dev, imagePullPolicy: Never, command: [/usr/bin/redis-cli, -e, -h, redis.tp.svc.cluster.local, -p, "6379", ` + strings.Join(q, ", ") + `]}`
	}
	runJob(t, e, "tp", "redis-set", redisCLI("SET", "meshlet", "transparent"), true)
	get := runJob(t, e, "tp", "redis-get", redisCLI("GET", "meshlet"), true)
	if logs, err := e.Cluster.Kubectl(ctx, "-n", "tp", "logs", "job/"+get, "-c", "redis-cli"); err != nil || strings.TrimSpace(logs) != "transparent" {
		t.Errorf("redis-cli GET meshlet through the mesh printed %q (%v), want transparent", logs, err)
	}

	// A headless Service (a StatefulSet's): the client dials one pod by
	// its DNS name and reaches exactly that pod, over mTLS (the pods'
	// inbound is intercepted, strict mTLS: plaintext would be refused).
	appReadyStatefulSet(t, e, "tp", "cache", 2, 3*time.Minute)
	cacheCLI := func(host string, args ...string) string {
		return strings.Replace(redisCLI(args...), "redis.tp.svc.cluster.local", host, 1)
	}
	runJob(t, e, "tp", "cache-set", cacheCLI("cache-0.cache.tp.svc.cluster.local", "SET", "pod", "cache-0"), true)
	get0 := runJob(t, e, "tp", "cache-get-0", cacheCLI("cache-0.cache.tp.svc.cluster.local", "GET", "pod"), true)
	get1 := runJob(t, e, "tp", "cache-get-1", cacheCLI("cache-1.cache.tp.svc.cluster.local", "GET", "pod"), true)
	for job, want := range map[string]string{get0: "cache-0", get1: ""} {
		if logs, err := e.Cluster.Kubectl(ctx, "-n", "tp", "logs", "job/"+job, "-c", "redis-cli"); err != nil || strings.TrimSpace(logs) != want {
			t.Errorf("%s printed %q (%v), want %q (the pod dialled, not another)", job, logs, err, want)
		}
	}

	// registry-only: the same address is refused.
	policies["mesh-outbound.yaml"] = "apiVersion: meshlet.io/v1alpha1\nkind: MeshDefaults\nmetadata: {name: mesh}\nspec: {mtls: {mode: strict}, outbound: registry-only}\n"
	delete(policies, "mesh.yaml")
	if err := e.SetPolicyData(ctx, policies); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, 90*time.Second, "registry-only in web's sidecar (no pass-through chain)", func() error {
		body, err := sidecarAdmin(xds.ProxyID(web.Name, "web.tp"), "/listeners?format=json")
		if err != nil {
			return err
		}
		var got struct {
			ListenerStatuses []struct {
				Name         string
				FilterChains []struct{ Default bool } `json:"filter_chains"`
			} `json:"listener_statuses"`
		}
		if err := json.Unmarshal([]byte(body), &got); err != nil {
			return fmt.Errorf("/listeners?format=json: %v: %s", err, body)
		}
		for _, l := range got.ListenerStatuses {
			if l.Name != xds.OutboundCaptureListener {
				continue
			}
			for _, c := range l.FilterChains {
				if c.Default {
					return fmt.Errorf("web's outbound capture listener still has its default (pass-through) chain")
				}
			}
			return nil
		}
		return fmt.Errorf("web's sidecar has no %s: %s", xds.OutboundCaptureListener, body)
	})
	runJob(t, e, "tp", "caller-refused", getContainer("http://"+ln.Addr().String()+"/", 5*time.Second), false)
}

// appReadyStatefulSet waits until the StatefulSet name of ns has n Ready
// replicas.
func appReadyStatefulSet(t *testing.T, e *meshkube.Env, ns, name string, n int32, timeout time.Duration) {
	t.Helper()
	testutil.Eventually(t, timeout, "statefulset "+name+" ready", func() error {
		ss, err := e.Client().AppsV1().StatefulSets(ns).Get(context.Background(), name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		if ss.Status.ReadyReplicas != n {
			return fmt.Errorf("%d of %d ready", ss.Status.ReadyReplicas, n)
		}
		return nil
	})
}

// hasField reports whether the JSON value v (from json.Unmarshal into
// any) holds key with value want at any depth.
func hasField(v any, key string, want any) bool {
	switch x := v.(type) {
	case map[string]any:
		if got, ok := x[key]; ok && got == want {
			return true
		}
		for _, c := range x {
			if hasField(c, key, want) {
				return true
			}
		}
	case []any:
		for _, c := range x {
			if hasField(c, key, want) {
				return true
			}
		}
	}
	return false
}

// jobSeq numbers runJob's Jobs.
var jobSeq atomic.Int64

// getContainer is a Job container running testapp get url.
func getContainer(url string, timeout time.Duration) string {
	return fmt.Sprintf(`{name: get, image: meshlet.local/devkube-testapp:dev, imagePullPolicy: Never, args: [get, -timeout, %s, %q]}`, timeout, url)
}

// runJob runs a Job of ns, as the mesh service caller (and its
// ServiceAccount caller, created if need be), with one container (a YAML
// flow mapping) and waits for it to succeed (or, with !succeed, to fail).
// The Job is named name-N, N unique in this test process (a Job's template
// is immutable, and -count reruns the test), and its name is returned.
func runJob(t *testing.T, e *meshkube.Env, ns, name, container string, succeed bool) string {
	t.Helper()
	name = fmt.Sprintf("%s-%d", name, jobSeq.Add(1))
	if err := e.EnsureServiceAccount(context.Background(), ns, "caller"); err != nil {
		t.Fatal(err)
	}
	applyYAML(t, e, fmt.Sprintf(`
apiVersion: batch/v1
kind: Job
metadata: {name: %s, namespace: %s}
spec:
  backoffLimit: 0
  template:
    metadata: {annotations: {meshlet.io/transparent-proxy: "true", meshlet.io/service: caller}}
    spec:
      serviceAccountName: caller
      restartPolicy: Never
      containers:
      - %s
`, name, ns, container))
	testutil.Eventually(t, 2*time.Minute, "job "+name+" done", func() error {
		j, err := e.Client().BatchV1().Jobs(ns).Get(context.Background(), name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		switch {
		case j.Status.Succeeded > 0 && succeed, j.Status.Failed > 0 && !succeed:
			return nil
		case j.Status.Succeeded > 0 || j.Status.Failed > 0:
			logs, _ := e.Cluster.Kubectl(context.Background(), "-n", ns, "logs", "job/"+name, "--all-containers")
			t.Fatalf("job %s: succeeded %d failed %d, want success %v\n%s", name, j.Status.Succeeded, j.Status.Failed, succeed, logs)
		}
		return fmt.Errorf("active %d", j.Status.Active)
	})
	return name
}

// applyYAML applies manifests with kubectl.
func applyYAML(t *testing.T, e *meshkube.Env, manifests string) {
	t.Helper()
	f := t.TempDir() + "/m.yaml"
	if err := writeFile(f, manifests); err != nil {
		t.Fatal(err)
	}
	kubectl(t, e, "apply", "-f", f)
}

func writeFile(path, s string) error { return os.WriteFile(path, []byte(s), 0o644) }

// sidecarAdmin GETs path from the admin endpoint of the sidecar with node
// ID id, on its pod's loopback.
func sidecarAdmin(id, path string) (string, error) {
	return inPodGet("-node-id="+id, "http://127.0.0.1:19000"+path)
}
