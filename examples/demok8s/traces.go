package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/hashicorp/consul/api"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/meshlet/meshlet/controlplane/traceview"
	"github.com/meshlet/meshlet/internal/meshkube"
	"github.com/meshlet/meshlet/sidecar/tracing"
	"github.com/meshlet/meshlet/xds"
)

// tracedGet GETs u with a new sampled W3C trace, as an edge proxy or an
// instrumented client would: web forwards the trace context to api through
// its sidecar, which continues it. It returns the trace ID.
func tracedGet(ctx context.Context, client *http.Client, u string) (string, *http.Response, error) {
	var ids [24]byte
	_, _ = rand.Read(ids[:])
	traceID := hex.EncodeToString(ids[:16])
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return "", nil, err
	}
	req.Header.Set("traceparent", "00-"+traceID+"-"+hex.EncodeToString(ids[16:])+"-01")
	resp, err := client.Do(req)
	return traceID, resp, err
}

// traceReport is what the in-cluster Jaeger holds of the demo's requests.
type traceReport struct {
	queryURL       string // the query API in the cluster's network namespace
	plain, retried string // trace IDs: an /api request, and a retried one
	retriedSpans   int
	attempts       int // attempt spans of the retried request
}

func (r traceReport) verdict() string {
	switch {
	case r.retried != "":
		return fmt.Sprintf("a retried request's trace read back from the in-cluster Jaeger (%d spans of web's and api's sidecars, %d attempts)", r.retriedSpans, r.attempts)
	case r.plain != "":
		return "a request's trace read back from the in-cluster Jaeger (spans of web's and api's sidecars), no retried one"
	}
	return "no trace read back from the in-cluster Jaeger"
}

// Where the demo reads Jaeger from inside the cluster: the URL a user
// passes to `controlplane trace -jaeger-url` from a pod.
const jaegerInClusterURL = "http://" + meshkube.JaegerService + "." + meshkube.Namespace + ".svc:16686"

// traces reads an /api request's trace back from the in-cluster Jaeger,
// then adds a flaky api instance, sends traced requests until one is
// retried and prints that trace too, with `controlplane trace` run in the
// control plane's pod.
func (d *demo) traces(ctx context.Context, root string, res trafficResult) traceReport {
	var rep traceReport
	queryURL, err := d.env.JaegerQueryURL(ctx, 2*time.Minute)
	if err != nil {
		d.problem("%v", err)
		return rep
	}
	rep.queryURL = queryURL
	// The query API is reached in the cluster's network namespace, as
	// web's pod is; traceview (what make demo and `controlplane trace` use)
	// dials from this one, so through a local forward, the way kubectl
	// port-forward would on a real cluster.
	fwd, err := d.env.Forward(strings.TrimPrefix(queryURL, "http://"))
	if err != nil {
		d.problem("%v", err)
		return rep
	}
	defer fwd.Close()
	local := "http://" + fwd.Addr
	d.say("       Jaeger's query API: %s in the cluster (ClusterIP of %s), forwarded to %s here", queryURL, meshkube.JaegerService, local)

	if len(res.apiTraces) == 0 {
		d.problem("tracing: no successful /api request to look up")
		return rep
	}
	wctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	// web's outbound span, an attempt, and api's inbound span at least.
	id := res.apiTraces[len(res.apiTraces)/2]
	tr, err := traceview.WaitTrace(wctx, local, id, 3)
	if err != nil {
		d.problem("tracing: trace %s of an /api request: %v", id, err)
		return rep
	}
	d.say("       a request to /api, as one trace across web's and api's sidecars:")
	d.printTrace(tr, local)
	if err := bothSidecars(tr, 1); err != nil {
		d.problem("tracing: trace %s: %v", id, err)
		return rep
	}
	rep.plain = id

	d.retried(ctx, root, local, &rep)
	return rep
}

// retried adds api-flaky (examples/demok8s/api-flaky.yaml), sends traced
// requests to web until Jaeger holds one web's sidecar retried, prints it
// with `controlplane trace` run in the control plane's pod, and removes
// api-flaky again.
func (d *demo) retried(ctx context.Context, root, local string, rep *traceReport) {
	manifest := filepath.Join(root, "examples/demok8s/api-flaky.yaml")
	d.say("       a flaky api instance joins (kubectl apply -f %s: 60%% of its answers are 503, like make demo's api-3)", rel(root, manifest))
	if out, err := d.env.Cluster.Kubectl(ctx, "apply", "-f", manifest); err != nil {
		d.problem("api-flaky: %v\n%s", err, out)
		return
	}
	defer func() {
		if out, err := d.env.Cluster.Kubectl(ctx, "-n", "shop", "delete", "pod", "api-flaky", "--wait=false"); err != nil {
			d.problem("api-flaky: %v\n%s", err, out)
		}
	}()
	if err := d.waitFlaky(ctx, 2*time.Minute); err != nil {
		d.problem("api-flaky: %v", err)
		return
	}
	pods, err := d.env.Client().CoreV1().Pods("shop").List(ctx, metav1.ListOptions{LabelSelector: "app=web"})
	if err != nil || len(pods.Items) == 0 {
		d.problem("no web pod: %v", err)
		return
	}
	base := "http://" + net.JoinHostPort(pods.Items[0].Status.PodIP, "8080")
	client := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DialContext: d.env.Cluster.DialContext}}
	sent := map[string]bool{}
	var ok, failed, fromFlaky int
	var found string
	deadline := time.Now().Add(45 * time.Second)
	for found == "" && time.Now().Before(deadline) {
		// A round of 20 requests, then ask Jaeger for a trace of one of
		// them in which web's sidecar retried on a 503.
		for range 20 {
			id, resp, err := tracedGet(ctx, client, base+"/api")
			if err != nil {
				failed++
				continue
			}
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			var got map[string]string
			if resp.StatusCode != http.StatusOK || json.Unmarshal(b, &got) != nil {
				failed++
				continue
			}
			ok++
			sent[strings.TrimLeft(id, "0")] = true // as Jaeger prints it
			if got["instance"] == "api-flaky" {
				fromFlaky++
			}
			time.Sleep(50 * time.Millisecond)
		}
		sctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		for range 3 { // spans reach Jaeger in batches (1 s)
			time.Sleep(time.Second)
			ids, err := searchTag(sctx, local, "web.shop", string(tracing.AttrRetryCause), string(xds.Retry5xx))
			if err != nil {
				continue
			}
			if i := slices.IndexFunc(ids, func(id string) bool { return sent[strings.TrimLeft(id, "0")] }); i >= 0 {
				found = ids[i]
				break
			}
		}
		cancel()
	}
	d.say("       %d traced requests to /api: %d answered 200 (%d of them by api-flaky), %d failed", ok+failed, ok, fromFlaky, failed)
	if found == "" {
		d.problem("tracing: no retried request in Jaeger after %d requests with api-flaky in rotation", ok+failed)
		return
	}
	// The retried request: web's outbound span, two attempts, and the
	// inbound span of each api sidecar that answered one.
	wctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	tr, err := traceview.WaitTrace(wctx, local, found, 5)
	if err != nil {
		d.problem("tracing: retried trace %s: %v", found, err)
		return
	}
	attempts := 0
	for _, s := range tr.Spans {
		if s.Service == "web.shop" && strings.HasPrefix(s.Operation, "attempt ") {
			attempts++
		}
	}
	if err := bothSidecars(tr, 2); err != nil || attempts < 2 {
		d.problem("tracing: retried trace %s: %d attempts, %v", found, attempts, err)
		return
	}
	rep.retried, rep.retriedSpans, rep.attempts = found, len(tr.Spans), attempts
	cmd := []string{"-n", meshkube.Namespace, "exec", "deploy/" + meshkube.Deployment, "-c", "controlplane", "--",
		"controlplane", "trace", "-jaeger-url", jaegerInClusterURL, found}
	d.say("       a request api-flaky failed and web's sidecar retried on another endpoint (each attempt is a span),")
	d.say("       printed by the control plane's own CLI in its pod: kubectl %s", strings.Join(cmd, " "))
	out, err := d.env.Cluster.Kubectl(ctx, cmd...)
	if err != nil {
		d.problem("controlplane trace -jaeger-url %s: %v\n%s", jaegerInClusterURL, err, out)
		return
	}
	fmt.Print(indent(out))
}

// waitFlaky waits until api-flaky is Ready and passing in Consul, so web's
// sidecar has it among api's endpoints.
func (d *demo) waitFlaky(ctx context.Context, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		entries, _, err := d.env.Consul.Client.Health().Service("api.shop", "", true, nil)
		if err == nil && slices.ContainsFunc(entries, func(e *api.ServiceEntry) bool { return e.Service.Meta["pod-name"] == "api-flaky" }) {
			time.Sleep(2 * time.Second) // the endpoint reaches web's sidecar over xDS
			return nil
		}
		if time.Now().After(deadline) {
			out, _ := d.env.Cluster.Kubectl(ctx, "-n", "shop", "get", "pod", "api-flaky", "-o", "wide")
			return fmt.Errorf("not a passing api instance in Consul after %v (%v):\n%s", timeout, err, out)
		}
		time.Sleep(300 * time.Millisecond)
	}
}

// bothSidecars checks that tr holds spans of web's sidecar (its outbound
// client span and attempts) and at least minAPI server spans of api's
// sidecars, each the child of one of web's attempts: one trace across the
// two hops.
func bothSidecars(tr *traceview.Trace, minAPI int) error {
	var outbound bool
	attempts := map[string]bool{}
	for _, s := range tr.Spans {
		if s.Service == "web.shop" && s.Kind == "client" {
			if strings.HasPrefix(s.Operation, "attempt ") {
				attempts[s.SpanID] = true
			} else {
				outbound = true
			}
		}
	}
	n := 0
	for _, s := range tr.Spans {
		if s.Service == "api.shop" && s.Kind == "server" && attempts[s.ParentID] {
			n++
		}
	}
	if !outbound || len(attempts) == 0 || n < minAPI {
		return fmt.Errorf("want web's sidecar's outbound span and attempts and %d of api's inbound spans under them; services %v, %d spans (outbound %v, %d attempts, %d api inbound)",
			minAPI, tr.Services(), len(tr.Spans), outbound, len(attempts), n)
	}
	return nil
}

func (d *demo) printTrace(tr *traceview.Trace, local string) {
	var b strings.Builder
	if err := traceview.Render(&b, tr); err != nil {
		d.say("       (cannot render: %v)", err)
		return
	}
	fmt.Print(indent(b.String()))
	d.say("       the same from a pod: controlplane trace -jaeger-url %s %s", jaegerInClusterURL, tr.ID)
}

// searchTag returns the IDs of recent traces of service with a span tagged
// key=value (Jaeger's /api/traces?service=&tags= search).
func searchTag(ctx context.Context, queryURL, service, key, value string) ([]string, error) {
	tags, _ := json.Marshal(map[string]string{key: value})
	u := queryURL + "/api/traces?limit=20&lookback=1h&service=" + url.QueryEscape(service) + "&tags=" + url.QueryEscape(string(tags))
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return nil, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	var out struct {
		Data []struct {
			TraceID string `json:"traceID"`
		} `json:"data"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&out); err != nil {
		return nil, fmt.Errorf("jaeger search: %w", err)
	}
	if len(out.Data) == 0 {
		return nil, errors.New("jaeger search: no traces")
	}
	ids := make([]string, 0, len(out.Data))
	for _, t := range out.Data {
		ids = append(ids, t.TraceID)
	}
	return ids, nil
}

func rel(root, path string) string {
	if r, err := filepath.Rel(root, path); err == nil {
		return r
	}
	return path
}
