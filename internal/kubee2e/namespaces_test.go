package kubee2e

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/meshlet/meshlet/internal/meshkube"
	"github.com/meshlet/meshlet/internal/testutil"
	"github.com/meshlet/meshlet/xds"
)

// namespacedApp is the same application in namespace %[1]s: api (a
// Deployment and its Service) and db (a StatefulSet of one pod and its
// headless Service), both answering JSON with their pod's name and
// namespace as instance and the caller's SPIFFE ID.
const namespacedApp = `
apiVersion: v1
kind: Namespace
metadata: {name: %[1]s, labels: {meshlet.io/inject: enabled}}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: api, namespace: %[1]s}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: db, namespace: %[1]s}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: api, namespace: %[1]s}
spec:
  selector: {matchLabels: {app: api}}
  template:
    metadata: {labels: {app: api}}
    spec:
      serviceAccountName: api
      containers:
      - name: api
        image: meshlet.local/examples:dev
        imagePullPolicy: Never
        command: [/usr/local/bin/api, -addr=0.0.0.0:8080, -id=$(POD_NAME).%[1]s]
        env: [{name: POD_NAME, valueFrom: {fieldRef: {fieldPath: metadata.name}}}]
        ports: [{containerPort: 8080}]
        readinessProbe: {httpGet: {path: /health, port: 8080}, periodSeconds: 1}
---
apiVersion: v1
kind: Service
metadata: {name: api, namespace: %[1]s}
spec: {selector: {app: api}, ports: [{port: 80, targetPort: 8080}]}
---
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: db, namespace: %[1]s}
spec:
  serviceName: db
  selector: {matchLabels: {app: db}}
  template:
    metadata: {labels: {app: db}}
    spec:
      serviceAccountName: db
      containers:
      - name: db
        image: meshlet.local/examples:dev
        imagePullPolicy: Never
        command: [/usr/local/bin/api, -addr=0.0.0.0:8080, -id=$(POD_NAME).%[1]s]
        env: [{name: POD_NAME, valueFrom: {fieldRef: {fieldPath: metadata.name}}}]
        ports: [{containerPort: 8080}]
        readinessProbe: {httpGet: {path: /health, port: 8080}, periodSeconds: 1}
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: %[1]s}
spec: {clusterIP: None, selector: {app: db}, ports: [{port: 8080, targetPort: 8080}]}
`

// answerOf reads the api app's JSON answer from a job's log.
func answerOf(t *testing.T, e *meshkube.Env, ns, job string) map[string]string {
	t.Helper()
	logs, err := e.Cluster.Kubectl(context.Background(), "-n", ns, "logs", "job/"+job, "-c", "get")
	if err != nil {
		t.Fatalf("%v\n%s", err, logs)
	}
	var got map[string]string
	if err := json.Unmarshal([]byte(strings.TrimSpace(logs)), &got); err != nil {
		t.Fatalf("job %s printed %q: %v", job, logs, err)
	}
	return got
}

// TestNamespacesAreBoundaries: the same application in two namespaces is
// two sets of Consul services (api.ns-blue, api.ns-green), identities and
// endpoints. A client reaches its own namespace's api by its short name
// and db-0 of its own namespace exactly, each seeing the client's own
// namespaced SPIFFE ID; it reaches the other namespace's api by
// api.<namespace> only once an intention allows it.
func TestNamespacesAreBoundaries(t *testing.T) {
	e := mesh(t)
	ctx := context.Background()
	namespaces := []string{"ns-blue", "ns-green"}
	cm, err := e.Client().CoreV1().ConfigMaps(meshkube.Namespace).Get(ctx, meshkube.PoliciesConfig, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	policies := map[string]string{}
	for k, v := range cm.Data {
		policies[k] = v
	}
	for _, ns := range namespaces {
		for _, svc := range []string{"api", "db"} {
			policies[svc+"-"+ns+".yaml"] = fmt.Sprintf("apiVersion: meshlet.io/v1alpha1\nkind: ServiceDefaults\nmetadata: {name: %[1]s-%[2]s}\nspec: {service: %[1]s.%[2]s, protocol: http}\n", svc, ns)
		}
	}
	if err := e.SetPolicyData(ctx, policies); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = e.SetPolicyData(context.Background(), cm.Data) })
	roots, _, err := e.Consul.Client.Agent().ConnectCARoots(nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, ns := range namespaces {
		applyYAML(t, e, fmt.Sprintf(namespacedApp, ns))
		intention(t, e, "caller."+ns, "api."+ns)
		intention(t, e, "caller."+ns, "db."+ns)
	}
	for _, ns := range namespaces {
		appReady(t, e, ns, 3*time.Minute, "api")
		testutil.Eventually(t, 2*time.Minute, "db-0 of "+ns+" Ready", func() error { return podReady(e, ns, "db-0") })
	}
	for _, ns := range namespaces {
		entries, _, err := e.Consul.Client.Health().Service("api."+ns, "", true, nil)
		if err != nil || len(entries) != 1 {
			t.Fatalf("Consul service api.%s: %d passing instances (%v)", ns, len(entries), err)
		}
		// The policies ConfigMap reaches the control plane when the
		// kubelet syncs its volume: wait until api and db speak HTTP
		// (their public listener has an HTTP connection manager, which
		// passes the caller's identity on).
		for _, p := range []struct{ pod, svc string }{{pods(t, e, ns, "app=api")[0].Name, "api"}, {"db-0", "db"}} {
			testutil.Eventually(t, 2*time.Minute, p.svc+"."+ns+" serving HTTP", func() error {
				dump, err := sidecarAdmin(xds.ProxyID(p.pod, p.svc+"."+ns), "/config_dump")
				if err != nil {
					return err
				}
				if ok, err := servesHTTP(dump); err != nil || !ok {
					return fmt.Errorf("%s's public listener does not speak HTTP yet (%v)", p.pod, err)
				}
				return nil
			})
		}
	}

	for _, ns := range namespaces {
		apiPod := pods(t, e, ns, "app=api")[0].Name
		wantCaller := "spiffe://" + roots.TrustDomain + "/ns/default/dc/dc1/svc/caller." + ns
		for _, tc := range []struct{ url, instance string }{
			{"http://api/hello", apiPod + "." + ns},
			{"http://db-0.db:8080/hello", "db-0." + ns},
		} {
			job := runJob(t, e, ns, "short", getContainer(tc.url, 60*time.Second), true)
			got := answerOf(t, e, ns, job)
			if got["instance"] != tc.instance || got["caller"] != wantCaller {
				t.Errorf("%s from %s: answered by %q seeing caller %q; want %q seeing %q", tc.url, ns, got["instance"], got["caller"], tc.instance, wantCaller)
			}
		}
	}

	// Across namespaces: denied until an intention allows it.
	runJob(t, e, "ns-blue", "across-denied", getContainer("http://api.ns-green/hello", 10*time.Second), false)
	intention(t, e, "caller.ns-blue", "api.ns-green")
	job := runJob(t, e, "ns-blue", "across", getContainer("http://api.ns-green/hello", 60*time.Second), true)
	got := answerOf(t, e, "ns-blue", job)
	greenPod := pods(t, e, "ns-green", "app=api")[0].Name
	if want := "spiffe://" + roots.TrustDomain + "/ns/default/dc/dc1/svc/caller.ns-blue"; got["instance"] != greenPod+".ns-green" || got["caller"] != want {
		t.Errorf("api.ns-green from ns-blue: answered by %q seeing %q; want %q seeing %q", got["instance"], got["caller"], greenPod+".ns-green", want)
	}
}

// servesHTTP reports whether a sidecar's /config_dump has its public
// listener speaking HTTP (an HTTP connection manager in one of its filter
// chains): the service's protocol policy has reached it. Other listeners'
// connection managers (outbound chains to HTTP services) do not count.
func servesHTTP(dump string) (bool, error) {
	var v any
	if err := json.Unmarshal([]byte(dump), &v); err != nil {
		return false, err
	}
	var walk func(any) bool
	walk = func(v any) bool {
		switch v := v.(type) {
		case map[string]any:
			if v["name"] == xds.PublicListener {
				if _, ok := v["filterChains"]; ok {
					b, _ := json.Marshal(v)
					return strings.Contains(string(b), "HttpConnectionManager")
				}
			}
			for _, c := range v {
				if walk(c) {
					return true
				}
			}
		case []any:
			for _, c := range v {
				if walk(c) {
					return true
				}
			}
		}
		return false
	}
	return walk(v), nil
}
