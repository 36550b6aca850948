package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil/promlint"

	"github.com/meshlet/meshlet/controlplane"
	"github.com/meshlet/meshlet/controlplane/admin"
	"github.com/meshlet/meshlet/controlplane/server"
	"github.com/meshlet/meshlet/internal/testutil"
	"github.com/meshlet/meshlet/xds"
)

// startControlPlaneWithAdmin is startControlPlane (the mesh's agent, a
// free xDS port) with the admin API on a free loopback port, whose address
// it returns.
func (m *mesh) startControlPlaneWithAdmin() string {
	m.t.Helper()
	return m.runControlPlane(controlplane.Config{XDSAddress: "127.0.0.1:0", AdminAddress: "127.0.0.1:0"}, "")
}

// webCallsAPI registers web-1 (upstream api on a local bind port) and
// api-1 with their sidecars, allows web → api, and starts both sidecars.
func webCallsAPI(t *testing.T, m *mesh) (web, api *proxy, bindPort int) {
	t.Helper()
	ports := freePorts(t, 4)
	apiApp := startApp(t, "api-1")
	webSvc := svc{id: "web-1", name: "web", appPort: ports[0], sidecarPort: ports[1], upstreams: map[string]int{"api": ports[2]}}
	apiSvc := svc{id: "api-1", name: "api", appPort: apiApp.port, sidecarPort: ports[3]}
	m.register(webSvc)
	m.register(apiSvc)
	m.allow("web", "api")
	web, api = m.startSidecar(webSvc.proxyID(), ""), m.startSidecar(apiSvc.proxyID(), "")
	web.waitReady(t)
	api.waitReady(t)
	return web, api, ports[2]
}

// resiliencePolicy is a TimeoutPolicy (lines 1-6) and a RetryPolicy
// (from line 8) for api, retrying on cond.
func resiliencePolicy(cond string) string {
	return `apiVersion: meshlet.io/v1alpha1
kind: TimeoutPolicy
metadata: {name: api-timeouts}
spec:
  service: api
  request: 5s
---
apiVersion: meshlet.io/v1alpha1
kind: RetryPolicy
metadata: {name: api-retries}
spec:
  service: api
  numRetries: 2
  retryOn: [` + cond + `]
`
}

// statusCmd runs `controlplane status` with args.
func statusCmd(args ...string) (code int, stdout, stderr string) {
	var out, errb bytes.Buffer
	code = admin.StatusCommand(context.Background(), args, &out, &errb)
	return code, out.String(), errb.String()
}

// TestStatusTracesRejectedResourceToPolicyFile is the acceptance test of
// NACK provenance: a RetryPolicy with an Envoy retry condition the meshlet
// sidecar does not implement is NACKed by web's sidecar, and `controlplane
// status` shows the node, the type, the sidecar's error and the policy
// file and line the route came from; fixing the file clears it.
func TestStatusTracesRejectedResourceToPolicyFile(t *testing.T) {
	m := newMesh(t)
	m.writePolicy("api.yaml", serviceDefaults("api", "http"))
	adminAddr := m.startControlPlaneWithAdmin()
	web, _, bindPort := webCallsAPI(t, m)
	const node = "web-1-sidecar-proxy"
	testutil.Until(t, 10*time.Second, "status to report no rejections with both sidecars connected", func() bool {
		code, out, _ := statusCmd("-admin-addr", adminAddr)
		return code == admin.ExitOK && strings.Contains(out, "2 proxies, 2 connected")
	})

	m.writePolicy("resilience.yaml", resiliencePolicy("envoy-ratelimited"))
	var sidecarErr string
	testutil.Until(t, 10*time.Second, "web's sidecar to NACK the route configuration", func() bool {
		sidecarErr = web.s.ConfigDump().XDS.Rejected[xds.RouteType].Error
		return sidecarErr != ""
	})
	if !strings.Contains(sidecarErr, `route configuration "api"`) || !strings.Contains(sidecarErr, `retry_on: unsupported condition "envoy-ratelimited"`) {
		t.Fatalf("web's sidecar rejected the routes with %q, want the route and field named", sidecarErr)
	}

	var code int
	var out, errOut string
	testutil.Until(t, 5*time.Second, "controlplane status to exit 1 with the rejection", func() bool {
		code, out, errOut = statusCmd("-admin-addr", adminAddr)
		return code == admin.ExitRejections
	})
	t.Logf("controlplane status:\n%s", out)
	file := filepath.Join(m.policyDir, "resilience.yaml")
	for _, want := range []string{
		"node      " + node,
		"type      " + xds.RouteType,
		"error     " + sidecarErr,
		`resource  RouteConfiguration "api"`,
		"retry_policy.retry_on\n",
		file + ":8 (RetryPolicy api-retries)",
		file + ":1 (TimeoutPolicy api-timeouts)",
		filepath.Join(m.policyDir, "api.yaml") + ":1 (ServiceDefaults api)",
		`consul connect-proxy registration "web-1-sidecar-proxy" (upstream api)`,
	} {
		if !strings.Contains(out, want) {
			t.Errorf("status output lacks %q:\n%s%s", want, out, errOut)
		}
	}
	if !strings.Contains(out, "1 rejection") {
		t.Errorf("status summary does not count 1 rejection:\n%s", out)
	}

	// The same through -json, field by field.
	code, js, _ := statusCmd("-admin-addr", adminAddr, "-json")
	var st server.Status
	if err := json.Unmarshal([]byte(js), &st); err != nil || code != admin.ExitRejections || len(st.Rejections) != 1 {
		t.Fatalf("status -json: exit %d, %v:\n%s", code, err, js)
	}
	rej := st.Rejections[0]
	if rej.Node != node || rej.TypeURL != xds.RouteType || rej.Error != sidecarErr || !rej.Named || rej.Version == "" ||
		len(rej.Resources) != 1 || rej.Resources[0].Name != "api" {
		t.Errorf("rejection = %+v", rej)
	}
	// The sidecar named the resource and field in the NACK's details.
	if len(rej.Resources) == 1 && !strings.HasSuffix(rej.Resources[0].Field, "retry_policy.retry_on") {
		t.Errorf("rejected field = %q, want the route's retry_policy.retry_on (from the NACK's details)", rej.Resources[0].Field)
	}
	found := false
	for _, src := range rej.Sources() {
		found = found || (src.File == file && src.Line == 8 && src.Kind == "RetryPolicy" && src.Name == "api-retries")
	}
	if !found {
		t.Errorf("rejection sources %v lack %s:8 (RetryPolicy api-retries)", rej.Sources(), file)
	}
	if got := m.cpLog.WaitFor(t, time.Second, "xds: NACK"); !strings.Contains(got, file+":8 (RetryPolicy api-retries)") {
		t.Errorf("the NACK log line does not name the policy file:\n%s", got)
	}

	// The fix: a condition the sidecar implements.
	m.writePolicy("resilience.yaml", resiliencePolicy("5xx"))
	testutil.Until(t, 10*time.Second, "controlplane status to exit 0 once the fixed route is ACKed", func() bool {
		code, out, errOut = statusCmd("-admin-addr", adminAddr)
		return code == admin.ExitOK
	})
	if !strings.Contains(out, "0 rejections") || strings.Contains(out, "REJECTION") {
		t.Errorf("status after the fix:\n%s", out)
	}
	if rej := web.s.ConfigDump().XDS.Rejected[xds.RouteType]; rej.Error != "" {
		t.Errorf("web's sidecar still reports a rejected route: %+v", rej)
	}
	if a := call(fmt.Sprintf("http://127.0.0.1:%d/", bindPort)); a.err != nil || a.instance != "api-1" {
		t.Errorf("web → api after the fix: %+v", a)
	}
}

// scrape returns the control plane's /metrics text.
func scrape(t *testing.T, adminAddr string) string {
	t.Helper()
	resp, err := http.Get("http://" + adminAddr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("GET /metrics: %d %v", resp.StatusCode, err)
	}
	return string(b)
}

// TestControlPlaneMetrics scrapes the control plane after known activity:
// two sidecars connected, Consul and policy changes pushed, one NACK.
// The exposition passes promlint, and promtool when it is installed.
func TestControlPlaneMetrics(t *testing.T) {
	m := newMesh(t)
	m.writePolicy("api.yaml", serviceDefaults("api", "http"))
	adminAddr := m.startControlPlaneWithAdmin()
	web, _, _ := webCallsAPI(t, m)
	const node = "web-1-sidecar-proxy"

	testutil.Until(t, 10*time.Second, "2 sidecars counted as connected", func() bool {
		return metricAt(t, "http://"+adminAddr, "meshlet_controlplane_proxies_connected", `kind="sidecar"`) == 2
	})
	if n := metricAt(t, "http://"+adminAddr, "meshlet_controlplane_proxies_connected", `kind="proxyless"`); n != 0 {
		t.Errorf("proxies_connected{kind=proxyless} = %v, want 0", n)
	}
	// The build loop observes a push's latency after the snapshot is set,
	// when a sidecar may already have it: poll rather than read once.
	testutil.Until(t, 10*time.Second, "push latency observed for Consul changes (registrations, health)", func() bool {
		return metricAt(t, "http://"+adminAddr, "meshlet_controlplane_push_latency_seconds_count", `trigger="consul"`) > 0
	})

	m.writePolicy("resilience.yaml", resiliencePolicy("envoy-ratelimited"))
	routeNACKs := []string{`node="` + node + `"`, `type="` + xds.RouteType + `"`}
	testutil.Until(t, 10*time.Second, "the NACK of web's routes counted", func() bool {
		return metricAt(t, "http://"+adminAddr, "meshlet_controlplane_xds_nacks_total", routeNACKs...) >= 1
	})
	if web.s.ConfigDump().XDS.Rejected[xds.RouteType].Error == "" {
		t.Error("the control plane counted a NACK web's sidecar does not report")
	}
	testutil.Until(t, 10*time.Second, "push latency observed for the policy change", func() bool {
		return metricAt(t, "http://"+adminAddr, "meshlet_controlplane_push_latency_seconds_count", `trigger="policy"`) > 0
	})
	for _, name := range []string{"meshlet_controlplane_xds_acks_total", "meshlet_controlplane_snapshots_set_total", "meshlet_controlplane_snapshot_build_seconds_count"} {
		if n := metricAt(t, "http://"+adminAddr, name); n == 0 {
			t.Errorf("%s = 0 after sidecars got their config", name)
		}
	}

	text := scrape(t, adminAddr)
	problems, err := promlint.New(strings.NewReader(text)).Lint()
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		t.Errorf("promlint: %s: %s", p.Metric, p.Text)
	}
	promtool, err := exec.LookPath("promtool")
	if err != nil {
		t.Log("promtool not on PATH; linted with promlint only")
		return
	}
	cmd := exec.Command(promtool, "check", "metrics")
	cmd.Stdin = strings.NewReader(text)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Errorf("promtool check metrics: %v\n%s", err, out)
	}
}
