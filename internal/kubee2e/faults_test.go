package kubee2e

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/csv"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/meshlet/meshlet/internal/meshkube"
	"github.com/meshlet/meshlet/internal/testutil"
	"github.com/meshlet/meshlet/xds"
)

// rolloutApp is web (one replica, its port open to the node as an
// ingress's would be) calling api (three replicas, the example app: on
// SIGTERM it fails its readiness and keeps serving for 2 s) by its Service
// name, in namespace rollout.
const rolloutApp = `
apiVersion: v1
kind: Namespace
metadata: {name: rollout, labels: {meshlet.io/inject: enabled}}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: web, namespace: rollout}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: api, namespace: rollout}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: rollout}
spec:
  selector: {matchLabels: {app: web}}
  template:
    metadata:
      labels: {app: web}
      annotations: {meshlet.io/exclude-inbound-ports: "8080"}
    spec:
      serviceAccountName: web
      containers:
      - name: web
        image: meshlet.local/examples:dev
        imagePullPolicy: Never
        command: [/usr/local/bin/web, -addr=0.0.0.0:8080, -api-url=http://api.rollout.svc.cluster.local, -store-addr=127.0.0.1:1]
        ports: [{containerPort: 8080}]
        readinessProbe: {httpGet: {path: /health, port: 8080}, periodSeconds: 1}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: rollout}
spec: {selector: {app: web}, ports: [{port: 80, targetPort: 8080}]}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: api, namespace: rollout}
spec:
  replicas: 3
  selector: {matchLabels: {app: api}}
  template:
    metadata: {labels: {app: api}}
    spec:
      serviceAccountName: api
      containers:
      - name: api
        image: meshlet.local/examples:dev
        imagePullPolicy: Never
        command: [/usr/local/bin/api, -addr=0.0.0.0:8080, -id=$(POD_NAME), -drain=2s]
        env: [{name: POD_NAME, valueFrom: {fieldRef: {fieldPath: metadata.name}}}]
        ports: [{containerPort: 8080}]
        readinessProbe: {httpGet: {path: /health, port: 8080}, periodSeconds: 1}
---
apiVersion: v1
kind: Service
metadata: {name: api, namespace: rollout}
spec: {selector: {app: api}, ports: [{port: 80, targetPort: 8080}]}
`

// TestFaultKubernetesRollouts: under steady load through web → api (HTTP,
// mTLS), api is rolled out (kubectl rollout restart), one of its pods is
// deleted gracefully, one is force-deleted (grace 0), it is scaled out to
// five and in to two, and a control plane pod is deleted. No request
// fails: a pod leaves callers' endpoints (the registrar deregisters it as
// soon as it terminates) before its app stops, and its sidecar keeps
// taking connections until callers moved on (the failure to avoid is
// Istio's rolling-update 503s, istio/istio#7136).
func TestFaultKubernetesRollouts(t *testing.T) {
	e := mesh(t)
	ctx := context.Background()
	intention(t, e, "web.rollout", "api.rollout")
	cm, err := e.Client().CoreV1().ConfigMaps(meshkube.Namespace).Get(ctx, meshkube.PoliciesConfig, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	policies := map[string]string{}
	for k, v := range cm.Data {
		policies[k] = v
	}
	policies["rollout.yaml"] = `apiVersion: meshlet.io/v1alpha1
kind: ServiceDefaults
metadata: {name: api-rollout}
spec: {service: api.rollout, protocol: http}
---
apiVersion: meshlet.io/v1alpha1
kind: ServiceDefaults
metadata: {name: web-rollout}
spec: {service: web.rollout, protocol: http}
---
apiVersion: meshlet.io/v1alpha1
kind: RetryPolicy
metadata: {name: api-rollout-retries}
spec:
  service: api.rollout
  retryOn: [5xx, connect-failure, reset]
  numRetries: 2
  backoff: {baseInterval: 10ms, maxInterval: 100ms}
`
	if err := e.SetPolicyData(ctx, policies); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = e.SetPolicyData(context.Background(), cm.Data) })
	applyYAML(t, e, rolloutApp)
	t.Cleanup(func() {
		_, _ = e.Cluster.Kubectl(context.Background(), "delete", "namespace", "rollout", "--wait=false")
	})
	appReady(t, e, "rollout", 3*time.Minute, "web", "api")
	webPods := pods(t, e, "rollout", "app=web")
	if len(webPods) != 1 {
		t.Fatalf("%d web pods", len(webPods))
	}
	webID := xds.ProxyID(webPods[0].Name, "web.rollout")
	testutil.Eventually(t, 3*time.Minute, "web's sidecar speaking HTTP to api (the policies ConfigMap synced)", func() error {
		dump, err := sidecarAdmin(webID, "/config_dump")
		if err != nil {
			return err
		}
		if !retryOn5xx.MatchString(dump) {
			i := strings.Index(dump, `"retryPolicy"`)
			return fmt.Errorf("web's sidecar has no retry policy on 5xx for api yet (%.300s); control plane: %s", dump[max(i, 0):], grepLines(controlPlaneLogs(e), "polic"))
		}
		return nil
	})
	url := "http://" + webPods[0].Status.PodIP + ":8080/api"
	if code, body, err := httpGet(e, url); err != nil || code != 200 {
		t.Fatalf("GET %s: %d %s %v", url, code, body, err)
	}

	const rate = 50
	v := startClusterVegeta(t, e, url, rate, 6*time.Minute)
	type phase struct {
		fault string
		at    time.Time
		took  time.Duration
	}
	var phases []phase
	step := func(fault string, do func()) {
		t.Helper()
		start := time.Now()
		do()
		phases = append(phases, phase{fault, start, time.Since(start)})
		t.Logf("%s: done in %v", fault, time.Since(start).Round(100*time.Millisecond))
	}
	apiAvailable := func(n int) {
		t.Helper()
		testutil.Eventually(t, 3*time.Minute, fmt.Sprintf("api with %d available pods and no other", n), func() error {
			all, err := e.Client().CoreV1().Pods("rollout").List(ctx, metav1.ListOptions{LabelSelector: "app=api"})
			if err != nil {
				return err
			}
			ready := 0
			for _, p := range all.Items {
				for _, c := range p.Status.Conditions {
					if c.Type == "Ready" && c.Status == "True" && p.DeletionTimestamp == nil {
						ready++
					}
				}
			}
			if ready != n || len(all.Items) != n {
				return fmt.Errorf("%d ready of %d pods", ready, len(all.Items))
			}
			return nil
		})
	}
	firstAPI := func() string {
		t.Helper()
		ps := pods(t, e, "rollout", "app=api")
		if len(ps) == 0 {
			t.Fatal("no api pod")
		}
		return ps[0].Name
	}
	time.Sleep(2 * time.Second) // the load at steady state before the first fault
	step("kubectl rollout restart of api (3 pods)", func() {
		kubectl(t, e, "-n", "rollout", "rollout", "restart", "deployment/api")
		kubectl(t, e, "-n", "rollout", "rollout", "status", "deployment/api", "--timeout=180s")
		apiAvailable(3)
	})
	step("graceful delete of an api pod", func() {
		kubectl(t, e, "-n", "rollout", "delete", "pod", firstAPI())
		apiAvailable(3)
	})
	step("forced delete of an api pod (grace 0)", func() {
		kubectl(t, e, "-n", "rollout", "delete", "pod", firstAPI(), "--grace-period=0", "--force")
		apiAvailable(3)
	})
	step("scale api out to 5, then in to 2", func() {
		kubectl(t, e, "-n", "rollout", "scale", "deployment/api", "--replicas=5")
		apiAvailable(5)
		kubectl(t, e, "-n", "rollout", "scale", "deployment/api", "--replicas=2")
		apiAvailable(2)
	})
	step("delete a control plane pod", func() {
		cps := pods(t, e, meshkube.Namespace, "app.kubernetes.io/name=meshlet-controlplane")
		if len(cps) == 0 {
			t.Fatal("no control plane pod")
		}
		kubectl(t, e, "-n", meshkube.Namespace, "delete", "pod", cps[0].Name)
		kubectl(t, e, "-n", meshkube.Namespace, "rollout", "status", "deployment/meshlet-controlplane", "--timeout=180s")
	})
	time.Sleep(2 * time.Second) // and at steady state after the last
	hits := v.stop(t)
	for i, p := range phases {
		end := time.Now().Add(time.Hour)
		if i+1 < len(phases) {
			end = phases[i+1].at
		}
		sent, lost := 0, 0
		var sample []string
		for _, h := range hits {
			if h.at.Before(p.at) && i > 0 || !h.at.Before(end) {
				continue
			}
			sent++
			if h.code != 200 || h.err != "" {
				lost++
				if len(sample) < 5 {
					sample = append(sample, fmt.Sprintf("%s: %d %s %s", h.at.Format("15:04:05.000"), h.code, h.err, h.body))
				}
			}
		}
		t.Logf("FAULT | %s | %d | %d | %d | done in %.1fs", p.fault, rate, sent, lost, p.took.Seconds())
		if lost > 0 {
			t.Errorf("%s: %d of %d requests failed, e.g.:\n%s", p.fault, lost, sent, strings.Join(sample, "\n"))
		}
	}
}

// retryOn5xx finds a retry policy on 5xx in a sidecar's /config_dump.
var retryOn5xx = regexp.MustCompile(`"retryOn":\s*"5xx`)

// clusterHit is one request of a vegeta run inside the cluster.
type clusterHit struct {
	at   time.Time
	code int
	err  string
	body string
}

// clusterVegeta is vegeta attacking from the cluster's network namespace.
type clusterVegeta struct {
	cmd  *exec.Cmd
	out  string
	bin  string
	done chan error
	log  bytes.Buffer
}

// startClusterVegeta runs vegeta (MESHLET_VEGETA_BIN, else bin/vegeta)
// in the cluster's network namespace (nsenter), sending GET url at rate
// requests a second for at most d, or until stop.
func startClusterVegeta(t *testing.T, e *meshkube.Env, url string, rate int, d time.Duration) *clusterVegeta {
	t.Helper()
	bin := os.Getenv("MESHLET_VEGETA_BIN")
	if bin == "" {
		bin = filepath.Join(e.Root, "bin", "vegeta")
	}
	if _, err := os.Stat(bin); err != nil {
		t.Fatalf("vegeta: %v (make bin/vegeta, or set MESHLET_VEGETA_BIN)", err)
	}
	v := &clusterVegeta{out: filepath.Join(t.TempDir(), "vegeta.bin"), bin: bin, done: make(chan error, 1)}
	v.cmd = exec.Command("nsenter", "--net="+e.Cluster.Netns(), "--", bin, "attack", "-rate", fmt.Sprintf("%d/1s", rate),
		"-duration", d.String(), "-timeout", "10s", "-output", v.out)
	v.cmd.Stdin = strings.NewReader("GET " + url + "\n")
	v.cmd.Stdout, v.cmd.Stderr = &v.log, &v.log
	v.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := v.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { v.done <- v.cmd.Wait() }()
	t.Cleanup(func() {
		_ = v.cmd.Process.Kill()
	})
	return v
}

// stop ends the run (SIGINT) and returns every request's result.
func (v *clusterVegeta) stop(t *testing.T) []clusterHit {
	t.Helper()
	_ = v.cmd.Process.Signal(os.Interrupt)
	if err := <-v.done; err != nil {
		t.Fatalf("vegeta attack: %v\n%s", err, v.log.String())
	}
	out, err := exec.Command(v.bin, "encode", "-to", "csv", v.out).Output()
	if err != nil {
		t.Fatalf("vegeta encode: %v", err)
	}
	cr := csv.NewReader(bytes.NewReader(out))
	cr.FieldsPerRecord = -1
	var hits []clusterHit
	for {
		rec, err := cr.Read()
		if err == io.EOF {
			break
		}
		if err != nil || len(rec) < 7 {
			t.Fatalf("vegeta csv: %v %q", err, rec)
		}
		ns, _ := strconv.ParseInt(rec[0], 10, 64)
		code, _ := strconv.Atoi(rec[1])
		h := clusterHit{at: time.Unix(0, ns), code: code, err: rec[5]}
		if code != 200 {
			h.body = decodeBody(rec[6])
		}
		hits = append(hits, h)
	}
	if len(hits) == 0 {
		t.Fatal("vegeta sent no request")
	}
	return hits
}

// decodeBody is vegeta's base64 body, cut to 200 bytes.
func decodeBody(b64 string) string {
	b, err := base64.StdEncoding.DecodeString(b64)
	if err != nil {
		return ""
	}
	return string(b[:min(len(b), 200)])
}
