// Command meshlet-demo runs the example application through the mesh on
// real parts and reports what happened. `make demo` builds everything and
// runs it; `make demo KEEP=1` leaves the mesh up; `make demo-stop` ends it.
//
// It starts a Consul dev agent with ACLs on (default deny), the control
// plane (policies from policies/; a least-privilege Consul token), the web, api (three instances, api-3 deliberately flaky) and
// store apps with one sidecar each, registers them in Consul as Connect
// users would, sends traffic to web (which calls api over HTTP and store
// over TCP through its sidecar), stops api-2 gracefully midway to show
// Consul health driving the endpoints, prints a summary with the retries
// and breaker openings that hid api-3's failures, stops everything it
// started, and ends with "demo: PASS ..." or "demo: FAIL ..." (exit status
// 0 or 1). Every request starts a W3C trace that the sidecars continue and
// export to a Jaeger the demo runs; the summary prints a request's trace
// tree and a retried one's, read back from Jaeger's query API.
package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/meshlet/meshlet/controlplane/servingcert"
	"github.com/meshlet/meshlet/controlplane/traceview"
	"github.com/meshlet/meshlet/internal/devconsul"
	"github.com/meshlet/meshlet/internal/devjaeger"
	"github.com/meshlet/meshlet/xds"
)

func main() {
	var d demo
	flag.StringVar(&d.binDir, "bin", "bin", "directory holding consul, controlplane, sidecar and the example apps")
	flag.StringVar(&d.policyDir, "policies", "policies", "policy directory for the control plane")
	flag.StringVar(&d.workDir, "workdir", ".work/demo", "where logs, registrations and the pid file go")
	flag.BoolVar(&d.keep, "keep", false, "leave the mesh running after the summary (stop it with -stop)")
	flag.DurationVar(&d.duration, "duration", 9*time.Second, "how long to send traffic")
	flag.IntVar(&d.rate, "rate", 40, "requests per second on each route")
	stop := flag.Bool("stop", false, "stop a mesh left running by -keep, and exit")
	flag.Parse()
	if *stop {
		if err := stopFromPIDFile(filepath.Join(d.workDir, "pids")); err != nil {
			fmt.Fprintln(os.Stderr, "demo:", err)
			os.Exit(1)
		}
		return
	}
	os.Exit(d.run())
}

type demo struct {
	binDir, policyDir, workDir string
	keep                       bool
	duration                   time.Duration
	rate                       int

	ps           *procs
	consul       *devconsul.Agent
	jaeger       *devjaeger.Jaeger
	start        time.Time
	trafficStart time.Time
	step         int
	keepLines    []string // where to look, printed with -keep
	// verdict is the last line: "PASS ..." or "FAIL ...".
	verdict string
}

const steps = 11

func (d *demo) say(format string, args ...any) {
	fmt.Printf("demo: "+format+"\n", args...)
}

func (d *demo) stepf(format string, args ...any) {
	d.step++
	fmt.Printf("demo: [%d/%d] %s\n", d.step, steps, fmt.Sprintf(format, args...))
}

// instance describes one app with its sidecar.
type instance struct {
	id, service       string
	appPort           int
	sidecarPort       int
	adminPort         int
	upstreams         map[string]int // service → local bind port
	app, sidecar      *proc
	registration      *api.AgentServiceRegistration
	healthCheckIsHTTP bool
}

func (in *instance) proxyID() string { return in.id + "-sidecar-proxy" }

func (d *demo) run() int {
	d.start = time.Now()
	logDir := filepath.Join(d.workDir, "logs")
	regDir := filepath.Join(d.workDir, "consul")
	for _, dir := range []string{logDir, regDir} {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			d.fail("cannot create %s: %v", dir, err)
			d.say("%s", d.verdict)
			return 1
		}
	}
	if _, err := os.Stat(filepath.Join(d.workDir, "pids")); err == nil {
		d.say("a kept demo may still be running; stopping it first")
		_ = stopFromPIDFile(filepath.Join(d.workDir, "pids"))
	}
	d.ps = &procs{binDir: d.binDir, logDir: logDir, keep: d.keep}
	for _, b := range []string{"consul", "jaeger", "controlplane", "sidecar", "web", "api", "store"} {
		if _, err := os.Stat(filepath.Join(d.binDir, b)); err != nil {
			d.fail("missing %s: run `make demo` (it builds everything first)", filepath.Join(d.binDir, b))
			d.say("%s", d.verdict)
			return 1
		}
	}
	code := d.runMesh()
	if d.keep && code == 0 {
		d.say("%s", d.verdict)
		return 0
	}
	d.stepf("stopping everything the demo started")
	left := d.ps.stopAll()
	if d.consul != nil {
		d.consul.Stop()
	}
	if d.jaeger != nil {
		d.jaeger.Stop()
	}
	if len(left) > 0 {
		d.say("FAIL processes still running after stop: %s (%s)", strings.Join(left, ", "), d.verdict)
		return 1
	}
	d.say("       all %d processes stopped (logs in %s)", len(d.ps.list)+2, logDir)
	d.say("%s", d.verdict)
	return code
}

// runMesh does steps 1-7 and returns the exit code.
func (d *demo) runMesh() int {
	ctx := context.Background()
	ports, err := devconsul.FreePorts(20)
	if err != nil {
		return d.fail("%v", err)
	}
	next := func() int { p := ports[0]; ports = ports[1:]; return p }

	// 1. Consul.
	d.stepf("starting Consul dev agent (%s/consul)", d.binDir)
	consulLog, err := os.Create(filepath.Join(d.workDir, "logs", "consul.log"))
	if err != nil {
		return d.fail("%v", err)
	}
	agentDir := filepath.Join(d.workDir, "consul", "agent") // its ACL configuration
	if err := os.MkdirAll(agentDir, 0o700); err != nil {
		return d.fail("%v", err)
	}
	d.consul, err = devconsul.Start(ctx, devconsul.Options{Binary: filepath.Join(d.binDir, "consul"), Log: consulLog, Detached: d.keep, Dir: agentDir})
	if err != nil {
		return d.fail("Consul did not start: %v (log: %s)", err, consulLog.Name())
	}
	d.say("       Consul is up: http://%s (UI at /ui)", d.consul.HTTPAddr)
	tokenDir := filepath.Join(d.workDir, "consul", "tokens")
	if err := os.MkdirAll(tokenDir, 0o700); err != nil {
		return d.fail("%v", err)
	}
	mgmtFile := filepath.Join(tokenDir, "management")
	if err := os.WriteFile(mgmtFile, []byte(d.consul.ManagementToken+"\n"), 0o600); err != nil {
		return d.fail("%v", err)
	}
	cpToken, err := d.consul.ControlPlaneToken(ctx, false)
	if err != nil {
		return d.fail("control plane's Consul token: %v", err)
	}
	var services []string
	for _, svc := range []string{"web", "api", "store"} {
		tok, err := d.consul.ServiceToken(ctx, svc)
		if err != nil {
			return d.fail("%s's Consul token: %v", svc, err)
		}
		if err := os.WriteFile(filepath.Join(tokenDir, svc), []byte(tok+"\n"), 0o600); err != nil {
			return d.fail("%v", err)
		}
		services = append(services, svc)
	}
	d.say("       ACLs on, default deny: registrations and intentions are written with the management token (%s);", mgmtFile)
	d.say("       the control plane reads with a token of policy %s only (least privilege, README \"Consul ACLs\");", devconsul.ControlPlanePolicy)
	d.say("       each service has a token for its sidecars (service identity %s): %s/", strings.Join(services, ", "), tokenDir)

	// 2. Jaeger, where the sidecars send their spans.
	d.stepf("starting Jaeger (%s/jaeger: OTLP in, query API out, memory storage)", d.binDir)
	jaegerLog, err := os.Create(filepath.Join(d.workDir, "logs", "jaeger.log"))
	if err != nil {
		return d.fail("%v", err)
	}
	d.jaeger, err = devjaeger.Start(ctx, devjaeger.Options{Binary: filepath.Join(d.binDir, "jaeger"), Log: jaegerLog, Detached: d.keep})
	if err != nil {
		return d.fail("Jaeger did not start: %v (log: %s)", err, jaegerLog.Name())
	}
	d.say("       Jaeger is up: OTLP/gRPC on %s, query API at %s/api/traces/<trace-id>", d.jaeger.OTLPGRPCAddr, d.jaeger.QueryURL)

	// 3. Control plane.
	xdsAddr := "127.0.0.1:" + strconv.Itoa(next())
	cpAdmin := "127.0.0.1:" + strconv.Itoa(next())
	d.stepf("starting the control plane (ADS on %s, policies from %s/, spans to Jaeger at %s)", xdsAddr, d.policyDir, d.jaeger.OTLPGRPCAddr)
	xdsTLSDir := filepath.Join(d.workDir, "xds-tls")
	caFile := filepath.Join(xdsTLSDir, servingcert.CACertFile)
	cp, err := d.ps.startWithEnv("controlplane", "controlplane", []string{"CONSUL_HTTP_TOKEN=" + cpToken},
		"-consul-addr", d.consul.HTTPAddr, "-xds-addr", xdsAddr, "-xds-tls-dir", xdsTLSDir, "-policy-dir", d.policyDir,
		"-otlp-endpoint", d.jaeger.OTLPGRPCAddr, "-admin-addr", cpAdmin)
	if err != nil {
		return d.fail("%v", err)
	}
	if err := waitFor(10*time.Second, func() error { return dialOK(xdsAddr) }); err != nil {
		return d.fail("control plane not serving on %s: %v\n%s", xdsAddr, err, cp.tail(20))
	}
	d.say("       ADS over TLS with a certificate the control plane issued itself (CA: %s); every stream must present a token", caFile)
	d.keepLines = append(d.keepLines, fmt.Sprintf("%-26s bin/controlplane status -admin-addr %s   (http://%s/status /metrics)", "control plane:", cpAdmin, cpAdmin))

	// 3. Registrations.
	insts := []*instance{
		{id: "web-1", service: "web", healthCheckIsHTTP: true},
		{id: "api-1", service: "api", healthCheckIsHTTP: true},
		{id: "api-2", service: "api", healthCheckIsHTTP: true},
		{id: "api-3", service: "api", healthCheckIsHTTP: true},
		{id: "store-1", service: "store"},
	}
	for _, in := range insts {
		in.appPort, in.sidecarPort, in.adminPort = next(), next(), next()
	}
	web, api1, api2, api3, store := insts[0], insts[1], insts[2], insts[3], insts[4]
	web.upstreams = map[string]int{"api": next(), "store": next()}
	d.stepf("registering web-1, api-1, api-2, api-3, store-1 in Consul, each with a Connect sidecar")
	for _, in := range insts {
		in.registration = registration(in)
		b, _ := json.MarshalIndent(in.registration, "", "  ")
		path := filepath.Join(d.workDir, "consul", in.id+".json")
		if err := os.WriteFile(path, b, 0o644); err != nil {
			return d.fail("%v", err)
		}
		if err := d.consul.Client.Agent().ServiceRegister(in.registration); err != nil {
			return d.fail("register %s: %v", in.id, err)
		}
	}
	// Intentions: with mTLS strict and default-deny authorization, callers
	// need one. This is what `consul config write` of a service-intentions
	// entry does.
	for _, in := range []*api.ServiceIntentionsConfigEntry{
		{Kind: api.ServiceIntentions, Name: "api", Sources: []*api.SourceIntention{{Name: "web", Action: api.IntentionActionAllow}}},
		{Kind: api.ServiceIntentions, Name: "store", Sources: []*api.SourceIntention{{Name: "web", Action: api.IntentionActionAllow}}},
	} {
		if _, _, err := d.consul.Client.ConfigEntries().Set(in, nil); err != nil {
			return d.fail("write intentions for %s: %v", in.Name, err)
		}
		b, _ := json.MarshalIndent(in, "", "  ")
		if err := os.WriteFile(filepath.Join(d.workDir, "consul", "intentions-"+in.Name+".json"), b, 0o644); err != nil {
			return d.fail("%v", err)
		}
	}
	d.say("       registrations and intentions (web → api, web → store) as sent to Consul: %s/*.json", filepath.Join(d.workDir, "consul"))

	// 4. Apps.
	d.stepf("starting the apps: web-1 (HTTP), api-1..3 (HTTP/JSON; api-3 answers 60%% of requests with 503 on purpose), store-1 (TCP)")
	hostPort := func(p int) string { return "127.0.0.1:" + strconv.Itoa(p) }
	web.app, err = d.ps.start("web-1", "web", "-addr", hostPort(web.appPort),
		"-api-url", "http://"+hostPort(web.upstreams["api"]), "-store-addr", hostPort(web.upstreams["store"]))
	if err != nil {
		return d.fail("%v", err)
	}
	for _, in := range []*instance{api1, api2, api3} {
		args := []string{"-addr", hostPort(in.appPort), "-id", in.id}
		if in == api3 {
			args = append(args, "-fail-rate", "0.6")
		}
		if in.app, err = d.ps.start(in.id, "api", args...); err != nil {
			return d.fail("%v", err)
		}
	}
	if store.app, err = d.ps.start("store-1", "store", "-addr", hostPort(store.appPort), "-id", store.id); err != nil {
		return d.fail("%v", err)
	}
	for _, in := range insts {
		if err := waitFor(10*time.Second, func() error { return dialOK(hostPort(in.appPort)) }); err != nil {
			return d.fail("%s did not start: %v\n%s", in.id, err, in.app.tail(20))
		}
	}

	// 5. Sidecars.
	d.stepf("starting one sidecar per app; waiting for their first config and for Consul health checks")
	t0 := time.Now()
	for _, in := range insts {
		in.sidecar, err = d.ps.start(in.proxyID(), "sidecar", "-node-id", in.proxyID(), "-service", in.service,
			"-xds-addr", xdsAddr, "-xds-ca-file", caFile, "-token-file", filepath.Join(tokenDir, in.service),
			"-admin-addr", hostPort(in.adminPort), "-drain-timeout", "5s")
		if err != nil {
			return d.fail("%v", err)
		}
	}
	for _, in := range insts {
		if err := waitFor(20*time.Second, func() error { return httpOK("http://" + hostPort(in.adminPort) + "/ready") }); err != nil {
			return d.fail("sidecar %s not ready: %v\n%s", in.proxyID(), err, in.sidecar.tail(20))
		}
	}
	webAdmin := "http://" + hostPort(web.adminPort)
	want := map[string][]string{"api": {hostPort(api1.sidecarPort), hostPort(api2.sidecarPort), hostPort(api3.sidecarPort)}, "store": {hostPort(store.sidecarPort)}}
	sort.Strings(want["api"])
	if err := waitFor(30*time.Second, func() error {
		got, err := clusterEndpoints(webAdmin)
		if err != nil {
			return err
		}
		for c, eps := range want {
			if !slices.Equal(got[c], eps) {
				return fmt.Errorf("cluster %s has endpoints %v, want %v", c, got[c], eps)
			}
		}
		return nil
	}); err != nil {
		return d.fail("web's sidecar never saw all healthy endpoints: %v\ncontrol plane log:\n%s", err, cp.tail(20))
	}
	d.say("       all %d sidecars ready and all instances passing in %.1fs", len(insts), time.Since(t0).Seconds())
	d.say("       web's sidecar: api -> %v (api-1..3 sidecars), store -> %v", want["api"], want["store"])
	d.say("       policies: retries on 5xx (2, to another endpoint), a breaker per api endpoint (3 failures in a row open it for 2s)")
	d.keepLines = append(d.keepLines,
		fmt.Sprintf("%-26s curl http://%s/api   curl http://%s/store", "web (the frontend):", hostPort(web.appPort), hostPort(web.appPort)))
	for _, in := range insts {
		if in != api2 { // api-2 is stopped during the traffic step
			d.keepLines = append(d.keepLines, fmt.Sprintf("%-26s http://%s/ready /config_dump /listeners /clusters", in.proxyID()+" admin:", hostPort(in.adminPort)))
		}
	}

	// 6. Trust: what a process without api's credentials gets.
	d.stepf("trying to take api-1's configuration and key without api's credentials (xdsclient.Probe, as `sidecar xds-check`)")
	if err := d.checkTrust(ctx, xdsAddr, caFile, tokenDir, api1.proxyID()); err != nil {
		return d.fail("%v", err)
	}

	// 7. Traffic, with api-2 stopped midway.
	stopAt := d.duration / 3
	d.stepf("sending traffic to web for %v at %d req/s per route (/api -> api over HTTP, /store -> store over TCP); api-2 stops at t=%v",
		d.duration, d.rate, stopAt)
	res := d.traffic(ctx, "http://"+hostPort(web.appPort), stopAt, func() *stopReport {
		return d.stopAPI2(api2, webAdmin, hostPort(api2.sidecarPort))
	})

	// 8. Traces.
	d.stepf("reading traces back from Jaeger")
	res.traces = d.traces(res)

	// 9. Summary.
	d.stepf("summary")
	res.resilience = d.resilienceStats(webAdmin, hostPort(api3.sidecarPort))
	return d.summarize(res)
}

// traceReport is what Jaeger holds of the demo's requests.
type traceReport struct {
	plain, retried string // trace IDs: an /api request, and one that was retried
	err            error
}

// traces finds an /api request's trace and a retried one in Jaeger and
// prints their trees.
func (d *demo) traces(t *trafficResult) traceReport {
	var rep traceReport
	var id string
	for _, r := range t.results {
		if r.route == "api" && r.ok && r.traceID != "" {
			id = r.traceID
			break
		}
	}
	if id == "" {
		rep.err = errors.New("no successful /api request to look up")
		return rep
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	// web's outbound span, an attempt, and api's inbound span at least.
	tr, err := traceview.WaitTrace(ctx, d.jaeger.QueryURL, id, 3)
	if err != nil {
		rep.err = fmt.Errorf("trace %s of an /api request: %w", id, err)
		return rep
	}
	rep.plain = id
	d.say("       a request to /api, as one trace across web's and api's sidecars:")
	d.printTrace(tr)
	ids, err := searchTag(ctx, d.jaeger.QueryURL, "web", "meshlet.retry_cause", string(xds.Retry5xx))
	if err == nil && len(ids) > 0 {
		if tr, err := traceview.Fetch(ctx, d.jaeger.QueryURL, ids[0]); err == nil {
			rep.retried = ids[0]
			d.say("       a request api-3 failed and web's sidecar retried on another endpoint (each attempt is a span):")
			d.printTrace(tr)
		}
	}
	d.keepLines = append(d.keepLines, fmt.Sprintf("%-26s %s/api/traces/%s   (bin/controlplane trace -jaeger-url %s %s)",
		"Jaeger query API:", d.jaeger.QueryURL, id, d.jaeger.QueryURL, id))
	return rep
}

func (d *demo) printTrace(tr *traceview.Trace) {
	var b strings.Builder
	if err := traceview.Render(&b, tr); err != nil {
		d.say("       (cannot render: %v)", err)
		return
	}
	for line := range strings.Lines(b.String()) {
		fmt.Print("         " + line)
	}
	d.say("       query: curl %s/api/traces/%s   or: bin/controlplane trace -jaeger-url %s %s", d.jaeger.QueryURL, tr.ID, d.jaeger.QueryURL, tr.ID)
}

// searchTag returns the IDs of recent traces of service with a span tagged
// key=value (Jaeger's /api/traces?service=&tags= search).
func searchTag(ctx context.Context, queryURL, service, key, value string) ([]string, error) {
	tags, _ := json.Marshal(map[string]string{key: value})
	u := queryURL + "/api/traces?limit=5&lookback=1h&service=" + url.QueryEscape(service) + "&tags=" + url.QueryEscape(string(tags))
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
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
	ids := make([]string, 0, len(out.Data))
	for _, t := range out.Data {
		ids = append(ids, t.TraceID)
	}
	return ids, nil
}

// resilienceStats reads what web's sidecar did to hide api-3's failures.
func (d *demo) resilienceStats(webAdmin, api3Sidecar string) resilience {
	m, err := scrape(webAdmin + "/metrics")
	if err != nil {
		return resilience{err: err}
	}
	var r resilience
	for _, s := range m {
		switch {
		case s.name == "meshlet_sidecar_upstream_retries_total" && s.labels["cluster"] == "api":
			r.retries += int(s.value)
		case s.name == "meshlet_sidecar_upstream_retries_denied_total" && s.labels["cluster"] == "api":
			r.denied += int(s.value)
		case s.name == "meshlet_sidecar_endpoint_breaker_transitions_total" && s.labels["endpoint"] == api3Sidecar && s.labels["state"] == "open":
			r.api3Opened += int(s.value)
		case s.name == "meshlet_sidecar_requests_total" && s.labels["reason"] != "":
			r.sidecarFailed += int(s.value)
		}
	}
	return r
}

// resilience is what web's sidecar metrics say about the run.
type resilience struct {
	retries, denied, api3Opened, sidecarFailed int
	err                                        error
}

type sample struct {
	name   string
	labels map[string]string
	value  float64
}

// scrape reads a Prometheus text exposition (simple label values only).
func scrape(url string) ([]sample, error) {
	resp, err := http.Get(url)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, err
	}
	var out []sample
	for line := range strings.Lines(string(b)) {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		s := sample{labels: map[string]string{}}
		rest := line
		if i := strings.IndexByte(line, '{'); i >= 0 {
			j := strings.LastIndexByte(line, '}')
			s.name, rest = line[:i], strings.TrimSpace(line[j+1:])
			for kv := range strings.SplitSeq(line[i+1:j], ",") {
				if k, v, ok := strings.Cut(kv, "="); ok {
					s.labels[k] = strings.Trim(v, `"`)
				}
			}
		} else {
			f := strings.Fields(line)
			s.name, rest = f[0], f[len(f)-1]
		}
		s.value, _ = strconv.ParseFloat(strings.Fields(rest)[0], 64)
		out = append(out, s)
	}
	return out, nil
}

// registration is the Consul registration a user would write for in: the
// app with a health check, and a Connect sidecar with a TCP check on its
// public listener and the app's upstreams.
func registration(in *instance) *api.AgentServiceRegistration {
	check := &api.AgentServiceCheck{
		Name: in.id + " TCP", TCP: "127.0.0.1:" + strconv.Itoa(in.appPort), Interval: "1s", Timeout: "1s",
	}
	if in.healthCheckIsHTTP {
		check = &api.AgentServiceCheck{
			Name: in.id + " /health", HTTP: "http://127.0.0.1:" + strconv.Itoa(in.appPort) + "/health", Interval: "1s", Timeout: "1s",
		}
	}
	var ups []api.Upstream
	names := make([]string, 0, len(in.upstreams))
	for s := range in.upstreams {
		names = append(names, s)
	}
	sort.Strings(names)
	for _, s := range names {
		ups = append(ups, api.Upstream{DestinationName: s, LocalBindAddress: "127.0.0.1", LocalBindPort: in.upstreams[s]})
	}
	return &api.AgentServiceRegistration{
		ID: in.id, Name: in.service, Address: "127.0.0.1", Port: in.appPort,
		Check: check,
		Connect: &api.AgentServiceConnect{SidecarService: &api.AgentServiceRegistration{
			Port: in.sidecarPort,
			Checks: api.AgentServiceChecks{{
				Name: "sidecar public listener", TCP: "127.0.0.1:" + strconv.Itoa(in.sidecarPort), Interval: "1s", Timeout: "1s",
			}},
			Proxy: &api.AgentServiceConnectProxyConfig{Upstreams: ups},
		}},
	}
}

// stopReport is what happened when api-2 was stopped.
type stopReport struct {
	sigterm   time.Time
	removedAt time.Time // when web's sidecar stopped listing api-2's sidecar; zero if never
	exitedAt  time.Time
	err       error
}

// stopAPI2 stops api-2 the graceful way and watches web's sidecar until
// api-2's sidecar leaves the api cluster.
func (d *demo) stopAPI2(api2 *instance, webAdmin, api2Sidecar string) *stopReport {
	r := &stopReport{sigterm: time.Now()}
	d.say("       t=%4.1fs  stopping api-2 gracefully: SIGTERM -> it fails its /health check and drains for 3s", time.Since(d.trafficStart).Seconds())
	exited := make(chan struct{})
	go func() {
		api2.app.terminate(15 * time.Second)
		close(exited)
	}()
	err := waitFor(10*time.Second, func() error {
		eps, err := clusterEndpoints(webAdmin)
		if err != nil {
			return err
		}
		if slices.Contains(eps["api"], api2Sidecar) {
			return errors.New("api-2's sidecar is still an endpoint of api at web's sidecar")
		}
		return nil
	})
	if err != nil {
		r.err = err
	} else {
		r.removedAt = time.Now()
		d.say("       t=%4.1fs  Consul marked api-2 critical; web's sidecar dropped it from api's endpoints %.2fs after SIGTERM",
			time.Since(d.trafficStart).Seconds(), r.removedAt.Sub(r.sigterm).Seconds())
	}
	<-exited
	r.exitedAt = time.Now()
	if err := d.consul.Client.Agent().ServiceDeregister(api2.id); err != nil && r.err == nil {
		r.err = fmt.Errorf("deregister api-2: %w", err)
	}
	api2.sidecar.terminate(10 * time.Second)
	d.say("       t=%4.1fs  api-2 exited after draining; deregistered from Consul; its sidecar stopped", time.Since(d.trafficStart).Seconds())
	return r
}

// result is one request the demo sent to web.
type result struct {
	route    string
	started  time.Time
	ok       bool
	instance string
	caller   string // the caller identity api saw (mTLS, via its sidecar)
	err      string
	traceID  string // the W3C trace the request started
}

type trafficResult struct {
	results    []result
	stop       *stopReport
	resilience resilience
	traces     traceReport
}

func (d *demo) traffic(ctx context.Context, webURL string, stopAt time.Duration, stop func() *stopReport) *trafficResult {
	client := &http.Client{Timeout: 10 * time.Second}
	var mu sync.Mutex
	var out trafficResult
	record := func(r result) {
		mu.Lock()
		out.results = append(out.results, r)
		mu.Unlock()
	}
	d.trafficStart = time.Now()
	end := d.trafficStart.Add(d.duration)
	var wg sync.WaitGroup
	for _, route := range []string{"api", "store"} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			tick := time.NewTicker(time.Second / time.Duration(d.rate))
			defer tick.Stop()
			for now := range tick.C {
				if now.After(end) {
					return
				}
				record(get(ctx, client, webURL+"/"+route, route))
			}
		}()
	}
	stopDone := make(chan struct{})
	go func() {
		defer close(stopDone)
		time.Sleep(stopAt)
		out.stop = stop()
	}()
	progress := time.NewTicker(time.Second)
	defer progress.Stop()
	done := make(chan struct{})
	go func() {
		wg.Wait()
		close(done)
	}()
	for {
		select {
		case <-progress.C:
			mu.Lock()
			line := progressLine(out.results)
			mu.Unlock()
			d.say("       t=%4.1fs  %s", time.Since(d.trafficStart).Seconds(), line)
		case <-done:
			<-stopDone
			return &out
		}
	}
}

func progressLine(rs []result) string {
	counts := map[string][2]int{}
	for _, r := range rs {
		c := counts[r.route]
		if r.ok {
			c[0]++
		} else {
			c[1]++
		}
		counts[r.route] = c
	}
	return fmt.Sprintf("/api %d ok %d failed | /store %d ok %d failed", counts["api"][0], counts["api"][1], counts["store"][0], counts["store"][1])
}

func get(ctx context.Context, client *http.Client, url, route string) result {
	r := result{route: route, started: time.Now()}
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	// Each request starts a sampled W3C trace, as an edge proxy or an
	// instrumented client would; web forwards it, its sidecar continues it.
	var ids [24]byte
	_, _ = rand.Read(ids[:])
	r.traceID = hex.EncodeToString(ids[:16])
	req.Header.Set("traceparent", "00-"+r.traceID+"-"+hex.EncodeToString(ids[16:])+"-01")
	resp, err := client.Do(req)
	if err != nil {
		r.err = err.Error()
		return r
	}
	defer resp.Body.Close()
	var body map[string]string
	b, _ := io.ReadAll(resp.Body)
	_ = json.Unmarshal(b, &body)
	if resp.StatusCode != http.StatusOK {
		r.err = fmt.Sprintf("%s: %s", resp.Status, body["error"])
		return r
	}
	r.ok, r.instance, r.caller = true, body["instance"], body["caller"]
	return r
}

func (d *demo) summarize(t *trafficResult) int {
	type routeStats struct {
		sent, ok, failed int
		by               map[string]int
		byAfterRemoval   map[string]int
		errors           map[string]int
	}
	stats := map[string]*routeStats{}
	for _, route := range []string{"api", "store"} {
		stats[route] = &routeStats{by: map[string]int{}, byAfterRemoval: map[string]int{}, errors: map[string]int{}}
	}
	removed := time.Time{}
	if t.stop != nil {
		removed = t.stop.removedAt
	}
	for _, r := range t.results {
		s := stats[r.route]
		s.sent++
		if !r.ok {
			s.failed++
			s.errors[r.err]++
			continue
		}
		s.ok++
		s.by[r.instance]++
		if !removed.IsZero() && r.started.After(removed) {
			s.byAfterRemoval[r.instance]++
		}
	}
	fmt.Println()
	fmt.Printf("  %-7s %6s %6s %7s   %s\n", "route", "sent", "ok", "failed", "answered by")
	for _, route := range []string{"api", "store"} {
		s := stats[route]
		fmt.Printf("  %-7s %6d %6d %7d   %s\n", "/"+route, s.sent, s.ok, s.failed, formatCounts(s.by))
		if route == "api" && !removed.IsZero() {
			fmt.Printf("  %-7s %6s %6s %7s   after api-2 left the endpoints: %s\n", "", "", "", "", formatCounts(s.byAfterRemoval))
		}
		for e, n := range s.errors {
			fmt.Printf("          %d x %s\n", n, e)
		}
	}
	callers := map[string]bool{}
	for _, r := range t.results {
		if r.route == "api" && r.ok {
			callers[r.caller] = true
		}
	}
	var seen []string
	for c := range callers {
		seen = append(seen, c)
	}
	sort.Strings(seen)
	fmt.Printf("  mTLS: api saw its caller as %s (SPIFFE ID from web's certificate, issued by Consul's Connect CA)\n", strings.Join(seen, ", "))
	rs := t.resilience
	if tr := t.traces; tr.err == nil {
		fmt.Printf("  tracing: every request is one trace in Jaeger, e.g. %s", tr.plain)
		if tr.retried != "" {
			fmt.Printf("; a retried one: %s", tr.retried)
		}
		fmt.Println()
	}
	if rs.err == nil {
		fmt.Printf("  resilience at web's sidecar: %d retries sent (%d denied), api-3's breaker opened %d times, %d requests failed by the sidecar\n",
			rs.retries, rs.denied, rs.api3Opened, rs.sidecarFailed)
	}
	fmt.Println()

	var problems []string
	if len(seen) != 1 || !strings.HasPrefix(seen[0], "spiffe://") || !strings.HasSuffix(seen[0], "/svc/web") {
		problems = append(problems, fmt.Sprintf("api should see web's SPIFFE ID as the caller of every request, saw %v", seen))
	}
	if t.traces.err != nil {
		problems = append(problems, "tracing: "+t.traces.err.Error())
	}
	switch {
	case rs.err != nil:
		problems = append(problems, "reading web's sidecar metrics: "+rs.err.Error())
	case rs.retries == 0:
		problems = append(problems, "no retries: the flaky api-3 should have needed some")
	case rs.api3Opened == 0:
		problems = append(problems, "api-3's endpoint breaker never opened")
	}
	// The control plane's least-privilege token was enough: it never said
	// it lacked a permission (controlplane/consul logs "consul: ACL ...").
	if b, err := os.ReadFile(filepath.Join(d.workDir, "logs", "controlplane.log")); err == nil {
		for line := range strings.Lines(string(b)) {
			if strings.Contains(line, "consul: ACL") || strings.Contains(line, "gives no ACL token") {
				problems = append(problems, "the control plane's Consul token: "+strings.TrimSpace(line))
				break
			}
		}
	}
	total, ok, failed := 0, 0, 0
	for _, s := range stats {
		total, ok, failed = total+s.sent, ok+s.ok, failed+s.failed
	}
	if failed > 0 {
		problems = append(problems, fmt.Sprintf("%d requests failed", failed))
	}
	if stats["api"].by["api-1"] == 0 || stats["api"].by["api-2"] == 0 {
		problems = append(problems, "both api instances should have answered before api-2 stopped")
	}
	if stats["store"].by["store-1"] != stats["store"].ok {
		problems = append(problems, "store answers should all come from store-1")
	}
	var removal string
	switch {
	case t.stop == nil:
		problems = append(problems, "api-2 was never stopped")
	case t.stop.err != nil:
		problems = append(problems, "stopping api-2: "+t.stop.err.Error())
	default:
		if n := stats["api"].byAfterRemoval["api-2"]; n > 0 {
			problems = append(problems, fmt.Sprintf("%d requests reached api-2 after its endpoint was removed", n))
		}
		removal = fmt.Sprintf("; api-2 left web's endpoints %.2fs after SIGTERM", t.stop.removedAt.Sub(t.stop.sigterm).Seconds())
	}
	if d.keep && len(problems) == 0 {
		d.printKeep()
	}
	if len(problems) > 0 {
		d.verdict = fmt.Sprintf("FAIL %d requests, %d ok, %d failed: %s", total, ok, failed, strings.Join(problems, "; "))
		return 1
	}
	d.verdict = fmt.Sprintf("PASS %d requests, %d ok, %d failed%s; %d retries and %d breaker openings hid api-3's failures",
		total, ok, failed, removal, rs.retries, rs.api3Opened)
	return 0
}

func formatCounts(m map[string]int) string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	parts := make([]string, 0, len(keys))
	for _, k := range keys {
		parts = append(parts, fmt.Sprintf("%s: %d", k, m[k]))
	}
	if len(parts) == 0 {
		return "-"
	}
	return strings.Join(parts, ", ")
}

func (d *demo) printKeep() {
	pids := map[string]int{"consul": d.consul.Pid(), "jaeger": d.jaeger.PID()}
	for _, p := range d.ps.list {
		if p.alive() {
			pids[p.name] = p.cmd.Process.Pid
		}
	}
	pidFile := filepath.Join(d.workDir, "pids")
	if err := writePIDFile(pidFile, pids); err != nil {
		d.say("cannot write %s: %v", pidFile, err)
	}
	d.consul.Release()
	d.jaeger.Release()
	d.say("KEEP=1: the mesh stays up. Where to look:")
	for _, l := range d.keepLines {
		fmt.Println("    " + l)
	}
	fmt.Printf("    %-26s http://%s/ui   (ACLs on: log in with the token in %s/consul/tokens/management)\n", "Consul UI and API:", d.consul.HTTPAddr, d.workDir)
	fmt.Printf("    %-26s %s/logs/\n", "logs:", d.workDir)
	fmt.Printf("    %-26s %s/consul/\n", "registrations:", d.workDir)
	fmt.Printf("    %-26s make demo-stop\n", "stop it:")
}

// fail reports a set-up problem now and makes it the verdict.
func (d *demo) fail(format string, args ...any) int {
	msg := fmt.Sprintf(format, args...)
	d.say("error: %s", msg)
	first, _, _ := strings.Cut(msg, "\n")
	d.verdict = "FAIL " + first
	return 1
}

func waitFor(timeout time.Duration, cond func() error) error {
	deadline := time.Now().Add(timeout)
	for {
		err := cond()
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return err
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func dialOK(addr string) error {
	c, err := net.DialTimeout("tcp", addr, time.Second)
	if err != nil {
		return err
	}
	return c.Close()
}

func httpOK(url string) error {
	resp, err := http.Get(url)
	if err != nil {
		return err
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("%s: %s %s", url, resp.Status, strings.TrimSpace(string(b)))
	}
	return nil
}

// clusterEndpoints reads a sidecar's /clusters: cluster → endpoint
// addresses, sorted.
func clusterEndpoints(adminURL string) (map[string][]string, error) {
	resp, err := http.Get(adminURL + "/clusters")
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, err
	}
	out := map[string][]string{}
	for line := range strings.Lines(string(b)) {
		f := strings.Split(strings.TrimSpace(line), "::")
		if len(f) == 4 && f[2] == "weight" {
			out[f[0]] = append(out[f[0]], f[1])
		}
	}
	for _, eps := range out {
		sort.Strings(eps)
	}
	return out, nil
}
