// Command meshlet-demo-k8s runs the example application on Kubernetes with
// meshlet, the way a platform team would: a real one-node cluster
// (internal/devkube) with Consul beside it, meshlet installed with
// `kubectl apply -k deploy/kubernetes/overlays/dev`, the policy files in
// the meshlet-policies ConfigMap, then the example app as ordinary
// Deployments and Services (examples/kubernetes) in a namespace labelled
// meshlet.io/inject=enabled. It shows the pods injected and registered in
// Consul, sends traffic to web (which calls api over HTTP and store over TCP
// through its sidecar, mTLS between sidecars; each request starts a W3C
// trace), reads traces back from the Jaeger the dev overlay runs in the
// cluster (deploy/kubernetes/components/jaeger): a request's, and a retried
// one's once a flaky api instance joins (api-flaky.yaml), prints a summary,
// stops everything and ends with "demo-k8s: PASS ..." or "demo-k8s: FAIL
// ..." (exit status 0 or 1). `make demo-k8s` builds what it needs and runs
// it; KEEP=1 leaves it running; `make demo-k8s-stop` ends it.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/hashicorp/consul/api"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/meshlet/meshlet/controlplane/inject"
	"github.com/meshlet/meshlet/internal/meshkube"
	"github.com/meshlet/meshlet/xds"
)

const steps = 8

type demo struct {
	root, workDir string
	keep          bool
	duration      time.Duration
	rate          int
	step          int
	env           *meshkube.Env
	problems      []string
}

func main() {
	var d demo
	flag.StringVar(&d.root, "root", ".", "the repository (deploy/kubernetes, examples/kubernetes, policies)")
	flag.StringVar(&d.workDir, "workdir", ".work/demo-k8s", "where the kept cluster's state goes")
	flag.BoolVar(&d.keep, "keep", false, "leave the cluster running after the summary (stop it with -stop)")
	flag.DurationVar(&d.duration, "duration", 8*time.Second, "how long to send traffic")
	flag.IntVar(&d.rate, "rate", 20, "requests per second on each route")
	stop := flag.Bool("stop", false, "stop a cluster left running by -keep, and exit")
	flag.Parse()
	state := filepath.Join(d.workDir, "state.json")
	if *stop {
		if err := meshkube.StopSaved(state, nil); err != nil {
			fmt.Fprintln(os.Stderr, "demo-k8s:", err)
			os.Exit(1)
		}
		fmt.Println("demo-k8s: stopped")
		return
	}
	if err := meshkube.StopSaved(state, nil); err != nil {
		fmt.Fprintln(os.Stderr, "demo-k8s: a kept cluster could not be stopped:", err)
	}
	os.Exit(d.run(state))
}

func (d *demo) say(format string, args ...any) { fmt.Printf("demo-k8s: "+format+"\n", args...) }

func (d *demo) stepf(format string, args ...any) {
	d.step++
	fmt.Printf("demo-k8s: [%d/%d] %s\n", d.step, steps, fmt.Sprintf(format, args...))
}

func (d *demo) problem(format string, args ...any) {
	msg := fmt.Sprintf(format, args...)
	d.problems = append(d.problems, msg)
	d.say("PROBLEM: %s", msg)
}

func (d *demo) run(state string) int {
	start := time.Now()
	root, err := filepath.Abs(d.root)
	if err != nil {
		d.say("FAIL %v", err)
		return 1
	}
	ctx := context.Background()
	d.stepf("starting a one-node Kubernetes cluster (its own network namespace) and Consul beside it, then installing meshlet with kubectl apply -k %s", meshkube.Overlay)
	log := slog.New(slog.NewTextHandler(os.Stdout, &slog.HandlerOptions{Level: slog.LevelInfo, ReplaceAttr: func(_ []string, a slog.Attr) slog.Attr {
		if a.Key == slog.TimeKey || a.Key == slog.LevelKey {
			return slog.Attr{}
		}
		return a
	}}))
	upCtx, cancel := context.WithTimeout(ctx, 8*time.Minute)
	d.env, err = meshkube.Up(upCtx, meshkube.Options{Root: root, PolicyDir: filepath.Join(root, meshkube.ExamplePolicies), Log: log,
		Images: []string{meshkube.ExamplesImage}, Detached: d.keep})
	cancel()
	if err != nil {
		d.say("FAIL meshlet did not come up: %v", err)
		return 1
	}
	d.say("       Consul: ACLs on (default deny), HTTPS only (%s); the control plane reads it with its least-privilege token from Secret %s/%s",
		d.env.Consul.URL(), meshkube.Namespace, meshkube.ConsulSecret)
	if d.keep {
		if err := d.env.Save(state); err != nil {
			d.problem("cannot record the kept cluster: %v", err)
		}
	}
	// Every way out stops what the demo started (but with -keep).
	stopped := false
	stopAll := func() {
		if d.keep || stopped {
			return
		}
		stopped = true
		d.stepf("stopping everything the demo started")
		if err := d.env.Stop(); err != nil {
			d.problem("stop: %v", err)
		}
	}
	defer stopAll()
	out, _ := d.env.Cluster.Kubectl(ctx, "-n", meshkube.Namespace, "get", "deploy,svc,mutatingwebhookconfiguration")
	fmt.Print(indent(out))

	d.stepf("writing the intentions web.shop → api.shop and web.shop → store.shop to Consul (authorization is default-deny; a Kubernetes Service is <service>.<namespace> in Consul)")
	for _, dst := range []string{"api.shop", "store.shop"} {
		entry := &api.ServiceIntentionsConfigEntry{Kind: api.ServiceIntentions, Name: dst,
			Sources: []*api.SourceIntention{{Name: "web.shop", Action: api.IntentionActionAllow}}}
		if _, _, err := d.env.Consul.Client.ConfigEntries().Set(entry, nil); err != nil {
			d.problem("intention web → %s: %v", dst, err)
		}
	}

	d.stepf("deploying the example app: kubectl apply -k examples/kubernetes (namespace shop, labelled %s=%s)", inject.LabelInject, inject.NamespaceEnabled)
	applied := time.Now()
	if out, err := d.env.Cluster.Kubectl(ctx, "apply", "-k", filepath.Join(root, "examples/kubernetes")); err != nil {
		d.say("FAIL %v\n%s", err, out)
		return 1
	}
	if err := d.waitReady(ctx, 3*time.Minute, "web", "api", "store"); err != nil {
		d.say("FAIL %v", err)
		return 1
	}
	readyIn := time.Since(applied)
	out, _ = d.env.Cluster.Kubectl(ctx, "-n", "shop", "get", "pods", "-o", "wide")
	fmt.Print(indent(out))
	d.say("       every pod Ready %.1fs after kubectl apply (READY counts the native sidecar)", readyIn.Seconds())

	d.stepf("what injection and registration did")
	d.showInjection(ctx)

	d.stepf("sending traffic to web for %v (web → api over HTTP, web → store over TCP, through web's sidecar)", d.duration)
	res := d.traffic(ctx)

	d.stepf("reading traces back from the in-cluster Jaeger (Service %s/%s; every sidecar exports its spans to it over OTLP)", meshkube.Namespace, meshkube.JaegerService)
	tr := d.traces(ctx, root, res)

	d.stepf("summary")
	d.summarize(res)
	if d.keep {
		d.step++ // no stop step
		d.printKeep(state, tr)
	}
	verdict := fmt.Sprintf("%d requests, %d ok, %d failed; 5 pods injected and registered in Consul, Ready %.1fs after kubectl apply; api saw web as %s; %s",
		res.sent, res.ok, res.sent-res.ok, readyIn.Seconds(), res.caller, tr.verdict())
	stopAll()
	if len(d.problems) > 0 || res.ok != res.sent || res.sent == 0 {
		d.say("FAIL %s; problems: %s", verdict, strings.Join(d.problems, "; "))
		return 1
	}
	d.say("PASS %s (%.0fs in all)", verdict, time.Since(start).Seconds())
	return 0
}

func (d *demo) waitReady(ctx context.Context, timeout time.Duration, names ...string) error {
	deadline := time.Now().Add(timeout)
	next := time.Now().Add(10 * time.Second)
	for {
		var waiting []string
		for _, n := range names {
			dep, err := d.env.Client().AppsV1().Deployments("shop").Get(ctx, n, metav1.GetOptions{})
			if err != nil || dep.Spec.Replicas == nil || dep.Status.ReadyReplicas != *dep.Spec.Replicas || dep.Status.Replicas != *dep.Spec.Replicas {
				waiting = append(waiting, n)
			}
		}
		if len(waiting) == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			out, _ := d.env.Cluster.Kubectl(ctx, "-n", "shop", "get", "pods", "-o", "wide")
			return fmt.Errorf("deployments %v not ready after %v:\n%s", waiting, timeout, out)
		}
		if time.Now().After(next) {
			d.say("       waiting for %v", waiting)
			next = time.Now().Add(10 * time.Second)
		}
		time.Sleep(300 * time.Millisecond)
	}
}

func (d *demo) showInjection(ctx context.Context) {
	pods, err := d.env.Client().CoreV1().Pods("shop").List(ctx, metav1.ListOptions{})
	if err != nil {
		d.problem("list pods: %v", err)
		return
	}
	for _, p := range pods.Items {
		if p.Labels["app"] != "web" {
			continue
		}
		var init, main []string
		for _, c := range p.Spec.InitContainers {
			rp := ""
			if c.RestartPolicy != nil {
				rp = " (restartPolicy " + string(*c.RestartPolicy) + ": a native sidecar)"
			}
			init = append(init, c.Name+rp)
		}
		for _, c := range p.Spec.Containers {
			main = append(main, c.Name)
		}
		d.say("       pod %s: init containers %v, containers %v", p.Name, init, main)
		d.say("       its %s annotation: %s", inject.AnnotationInjected, p.Annotations[inject.AnnotationInjected])
		if sc := inject.NativeSidecar(&p.Spec); sc != nil {
			var creds []string
			for _, a := range sc.Args {
				if strings.HasPrefix(a, "-xds-ca-file=") || strings.HasPrefix(a, "-token-file=") || a == "-xds-insecure" {
					creds = append(creds, a)
				}
			}
			if len(creds) != 2 {
				d.problem("the sidecar's ADS credentials are %v, want -xds-ca-file and -token-file", creds)
			}
			d.say("       its sidecar dials ADS over TLS as pod %s (ServiceAccount %s): %s", p.Name, p.Spec.ServiceAccountName, strings.Join(creds, " "))
			d.say("       (the projected token of audience %s, checked by a TokenReview; the CA from ConfigMap %s)", xds.TokenAudience, xds.CARootConfigMap)
		}
	}
	injected := 0
	for _, p := range pods.Items {
		if inject.NativeSidecar(&p.Spec) != nil {
			injected++
		}
	}
	if injected != len(pods.Items) || injected != 5 {
		d.problem("%d of %d pods injected, want 5 of 5", injected, len(pods.Items))
	}
	d.say("       in Consul (registered by the control plane's registrar, on the synthetic node of the Kubernetes node):")
	for _, svc := range []string{"web", "api", "store"} {
		entries, _, err := d.env.Consul.Client.Health().Service(svc+".shop", "", false, nil)
		if err != nil {
			d.problem("consul %s: %v", svc, err)
			continue
		}
		for _, e := range entries {
			st := e.Checks.AggregatedStatus()
			d.say("         %-6s %-36s %s:%d  node %s  pod %s  check %s", svc, e.Service.ID, e.Service.Address, e.Service.Port,
				e.Node.Node, e.Service.Meta["pod-name"], st)
			if st != api.HealthPassing {
				d.problem("%s is %s in Consul", e.Service.ID, st)
			}
		}
		want := 1
		if svc == "api" {
			want = 3
		}
		if len(entries) != want {
			d.problem("%d %s instances in Consul, want %d", len(entries), svc, want)
		}
	}
}

type trafficResult struct {
	sent, ok  int
	byRoute   map[string]map[string]int // route → instance → count
	failures  map[string]int
	caller    string
	apiTraces []string // the W3C trace IDs of the /api requests that succeeded
}

func (d *demo) traffic(ctx context.Context) trafficResult {
	res := trafficResult{byRoute: map[string]map[string]int{"api": {}, "store": {}}, failures: map[string]int{}}
	pods, err := d.env.Client().CoreV1().Pods("shop").List(ctx, metav1.ListOptions{LabelSelector: "app=web"})
	if err != nil || len(pods.Items) == 0 {
		d.problem("no web pod: %v", err)
		return res
	}
	base := "http://" + net.JoinHostPort(pods.Items[0].Status.PodIP, "8080")
	d.say("       web's pod answers at %s (reached from the node, as an ingress would)", base)
	client := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DialContext: d.env.Cluster.DialContext}}
	tick := time.NewTicker(time.Second / time.Duration(d.rate))
	defer tick.Stop()
	end := time.Now().Add(d.duration)
	for time.Now().Before(end) {
		<-tick.C
		for _, route := range []string{"api", "store"} {
			res.sent++
			traceID, resp, err := tracedGet(ctx, client, base+"/"+route)
			if err != nil {
				res.failures[err.Error()]++
				continue
			}
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			var got map[string]string
			if resp.StatusCode != 200 || json.Unmarshal(b, &got) != nil {
				res.failures[fmt.Sprintf("%d %s", resp.StatusCode, strings.TrimSpace(string(b)))]++
				continue
			}
			res.ok++
			res.byRoute[route][got["instance"]]++
			if route == "api" {
				res.caller = got["caller"]
				res.apiTraces = append(res.apiTraces, traceID)
			}
		}
	}
	return res
}

func (d *demo) summarize(res trafficResult) {
	fmt.Printf("\n  route     sent     ok  answered by\n")
	for _, route := range []string{"api", "store"} {
		n := 0
		var parts []string
		for _, in := range slices.Sorted(mapKeys(res.byRoute[route])) {
			n += res.byRoute[route][in]
			parts = append(parts, fmt.Sprintf("%s: %d", in, res.byRoute[route][in]))
		}
		fmt.Printf("  /%-7s %5d  %5d  %s\n", route, res.sent/2, n, strings.Join(parts, ", "))
	}
	for f, n := range res.failures {
		fmt.Printf("  failed %d×: %s\n", n, f)
	}
	roots, _, err := d.env.Consul.Client.Agent().ConnectCARoots(nil)
	if err == nil {
		want := "spiffe://" + roots.TrustDomain + "/ns/default/dc/dc1/svc/web.shop"
		fmt.Printf("  mTLS: api saw its caller as %s (SPIFFE ID from web's certificate, issued by Consul's Connect CA)\n", res.caller)
		if res.caller != want {
			d.problem("api saw caller %q, want %q", res.caller, want)
		}
	}
	if len(res.byRoute["api"]) != 3 {
		d.problem("api answered from %d pods, want all 3", len(res.byRoute["api"]))
	}
	fmt.Println()
}

func (d *demo) printKeep(state string, tr traceReport) {
	c := d.env.Cluster
	d.say("the cluster keeps running (KEEP=1); look around with:")
	fmt.Printf("    ip netns exec %s %s %s get pods -A\n", filepath.Base(c.Netns()), filepath.Join(d.root, "bin/kubectl"), strings.Join(c.KubectlFlags(), " "))
	fmt.Printf("    ip netns exec %s curl -s http://%s/v1/catalog/services   (Consul)\n", filepath.Base(c.Netns()), d.env.Consul.HTTPAddr)
	if tr.queryURL != "" && tr.plain != "" {
		fmt.Printf("    ip netns exec %s %s trace -jaeger-url %s %s   (Jaeger; make build first)\n", filepath.Base(c.Netns()),
			filepath.Join(d.root, "bin/controlplane"), tr.queryURL, tr.plain)
	}
	fmt.Printf("    make demo-k8s-stop   (or: go run ./examples/demok8s -stop; state in %s)\n", state)
}

func mapKeys(m map[string]int) func(func(string) bool) {
	return func(yield func(string) bool) {
		for k := range m {
			if !yield(k) {
				return
			}
		}
	}
}

func indent(s string) string {
	var b strings.Builder
	for line := range strings.Lines(s) {
		b.WriteString("         " + line)
	}
	return b.String()
}
