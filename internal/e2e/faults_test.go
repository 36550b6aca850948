//go:build faults

package e2e

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/meshlet/meshlet/internal/devconsul"
	"github.com/meshlet/meshlet/internal/testutil"
)

// faultRate is the steady load of every fault test, in requests a second
// through web's sidecar to api: well within one core, so a lost request
// is the mesh's doing, not the load generator's.
const faultRate = 200

// phaseMin is how long the load runs after each fault before the next
// one, so that each line of the table counts the mesh at steady state
// after its recovery too.
const phaseMin = 3 * time.Second

// settle lets the load run until phaseMin has passed since start.
func settle(start time.Time) { time.Sleep(time.Until(start.Add(phaseMin))) }

// phase is one fault of a test: when it was injected and how long the
// mesh took to route around it.
type phase struct {
	fault    string
	at       time.Time
	recovery string
}

// reportPhases logs one table line per phase with the requests sent
// between its start and the next phase's (the last one to the end of the
// run), and fails the test on any lost request.
func reportPhases(t *testing.T, rate int, hits []hit, phases []phase) {
	t.Helper()
	for i, p := range phases {
		end := time.Now().Add(time.Hour)
		if i+1 < len(phases) {
			end = phases[i+1].at
		}
		var in []hit
		for _, h := range hits {
			if !h.at.Before(p.at) && h.at.Before(end) || i == 0 && h.at.Before(p.at) {
				in = append(in, h)
			}
		}
		faultReport(t, p.fault, rate, in, p.recovery)
	}
}

// TestFaultInstanceChurn: under load, one of four api apps is SIGKILLed,
// then another instance's sidecar, then a third is deregistered from
// Consul and stopped, then a fifth is added. No request fails: retries
// hide the dead endpoints until outlier detection ejects them (3
// consecutive failures, reviewed every second) or Consul removes them.
func TestFaultInstanceChurn(t *testing.T) {
	fm := newFaultMesh(t, 1, 4)
	addr := func(id string) string { return hostPort(fm.apis[id].svc.sidecarPort) }
	v := startVegeta(t, "http://"+hostPort(fm.webBind)+"/", faultRate, 2*time.Minute)
	warm(t, v)
	var phases []phase

	start := time.Now()
	fm.apis["api-1"].app.Kill()
	d := took(t, start, 15*time.Second, "api-1 ejected after its app was SIGKILLed", func() bool {
		return fm.apiEndpoints()[addr("api-1")] == "/failed_outlier_check"
	})
	phases = append(phases, phase{"SIGKILL one of four upstream apps", start, fmt.Sprintf("ejected (outlier detection) in %.1fs", d.Seconds())})

	settle(start)
	start = time.Now()
	fm.apis["api-2"].sidecar.p.Kill()
	d = took(t, start, 15*time.Second, "api-2 ejected after its sidecar was SIGKILLed", func() bool {
		return fm.apiEndpoints()[addr("api-2")] == "/failed_outlier_check"
	})
	phases = append(phases, phase{"SIGKILL one upstream sidecar", start, fmt.Sprintf("ejected (outlier detection) in %.1fs", d.Seconds())})

	settle(start)
	start = time.Now()
	gone := addr("api-3")
	fm.deregister("api-3")
	d = took(t, start, 15*time.Second, "api-3 removed from web's endpoints after its deregistration", func() bool {
		_, ok := fm.apiEndpoints()[gone]
		return !ok
	})
	fm.apis["api-3"].sidecar.p.Stop()
	fm.apis["api-3"].app.Stop()
	phases = append(phases, phase{"deregister one instance from Consul, then stop it", start, fmt.Sprintf("removed from callers in %.1fs", d.Seconds())})

	settle(start)
	start = time.Now()
	in := fm.addAPI("api-5")
	d = took(t, start, 20*time.Second, "api-5 a healthy endpoint of web's after it was added", func() bool {
		return fm.apiEndpoints()[hostPort(in.svc.sidecarPort)] == "healthy"
	})
	phases = append(phases, phase{"add an instance", start, fmt.Sprintf("taking traffic %.1fs after its registration", d.Seconds())})
	testutil.Until(t, 10*time.Second, "api-5 answering through the mesh", func() bool {
		return call("http://"+hostPort(fm.webBind)+"/").instance == "api-5"
	})
	settle(start)
	reportPhases(t, faultRate, v.stop(t), phases)
}

// warm waits until the load has been flowing for a second, so a fault
// lands on a mesh at steady state.
func warm(t *testing.T, v *vegetaRun) {
	t.Helper()
	testutil.Until(t, 5*time.Second, "the load running for a second", func() bool { return time.Since(v.start) > time.Second })
}

// TestFaultControlPlane: with two control plane replicas (the documented
// HA setup: sidecars given both addresses), SIGKILL of the replica a
// sidecar streams from moves it to the other, which serves what changed
// meanwhile; with every replica dead the sidecars serve their last config;
// a replica restarted on its address takes them back, and they resume from
// their last versions (no push of what they hold). No request fails.
func TestFaultControlPlane(t *testing.T) {
	fm := newFaultMesh(t, 2, 3)
	a, b := fm.cps[0], fm.cps[1]
	all := fm.nodes()
	testutil.Until(t, 10*time.Second, "every sidecar streaming from a replica", func() bool {
		return len(a.connected())+len(b.connected()) == len(all)
	})
	v := startVegeta(t, "http://"+hostPort(fm.webBind)+"/", faultRate, 2*time.Minute)
	warm(t, v)
	var phases []phase

	// 1. One replica SIGKILLed: its sidecars move to the other, which
	// serves an instance added while the first is down.
	start := time.Now()
	a.p.Kill()
	d := took(t, start, 15*time.Second, "every sidecar streaming from the surviving replica", func() bool {
		return slices.Equal(b.connected(), all)
	})
	in := fm.addAPI("api-4")
	took(t, start, 15*time.Second, "api-4 (added with a replica down) an endpoint of web's", func() bool {
		return fm.apiEndpoints()[hostPort(in.svc.sidecarPort)] == "healthy"
	})
	all = fm.nodes()
	phases = append(phases, phase{"SIGKILL one of two control plane replicas", start, fmt.Sprintf("sidecars on the other replica in %.1fs", d.Seconds())})

	// 2. Every replica down: sidecars keep their last config.
	a = fm.startCP(a.xds)
	settle(start)
	start = time.Now()
	b.p.Kill()
	d = took(t, start, 15*time.Second, "every sidecar streaming from the restarted replica", func() bool {
		return slices.Equal(a.connected(), all)
	})
	phases = append(phases, phase{"first replica restarted, SIGKILL of the second", start, fmt.Sprintf("sidecars on the first replica in %.1fs", d.Seconds())})
	_, acks, versions := fm.web.xdsState()
	listenersStarted := fm.web.logCount("listener: started")
	settle(start)
	start = time.Now()
	a.p.Kill()
	testutil.Until(t, 10*time.Second, "web's sidecar seeing no control plane", func() bool { c, _, _ := fm.web.xdsState(); return !c })
	// The outage lasts while the load runs for 5 more seconds.
	testutil.Until(t, 10*time.Second, "5 s without a control plane", func() bool { return time.Since(start) > 5*time.Second })
	phases = append(phases, phase{"SIGKILL of every control plane replica (5 s without one)", start, "none needed: last config served"})

	// 3. A replica restarted: sidecars reconnect and resume from the
	// versions they hold (the replica's versions are content hashes).
	settle(start)
	start = time.Now()
	a = fm.startCP(a.xds)
	d = took(t, start, 20*time.Second, "every sidecar streaming from the restarted replica", func() bool {
		return slices.Equal(a.connected(), all)
	})
	testutil.Until(t, 5*time.Second, "web's sidecar connected", func() bool { c, _, _ := fm.web.xdsState(); return c })
	// A new stream gets the whole state again (SotW: the server cannot
	// know what the client holds), with the versions the sidecar holds,
	// and nothing is rebuilt.
	testutil.Until(t, 5*time.Second, "web's sidecar ACKing the restarted replica's state", func() bool {
		_, acks2, _ := fm.web.xdsState()
		return acks2 > acks
	})
	if _, _, versions2 := fm.web.xdsState(); fmt.Sprint(versions2) != fmt.Sprint(versions) {
		t.Errorf("web's sidecar's versions changed across the restart: %v → %v", versions, versions2)
	}
	if n := fm.web.logCount("listener: started"); n != listenersStarted {
		t.Errorf("web's sidecar started %d listeners again on the restarted replica's identical state", n-listenersStarted)
	}
	phases = append(phases, phase{"control plane restarted", start, fmt.Sprintf("sidecars reconnected in %.1fs, same versions, nothing rebuilt", d.Seconds())})
	settle(start)
	reportPhases(t, faultRate, v.stop(t), phases)
}

// TestFaultConsul: the mesh's Consul is a production-shaped datacenter
// (three servers, Raft; the control plane and the registrations on a
// client agent). Under load the client agent is frozen for 10 s (SIGSTOP:
// the servers mark its node's serfHealth critical, and the control plane
// keeps the sidecars as endpoints: catalogBuilder.build), then SIGKILLed
// and restarted (it restores its services' TTL checks as critical until
// their next update, a second later here: the control plane holds the
// sidecars through its recovery grace), then the Raft leader is SIGKILLed
// (and restarted once a new one leads). No request fails; after each
// fault the control plane follows a change made in Consul (it kept its
// last catalog meanwhile and resumed its blocking queries).
func TestFaultConsul(t *testing.T) {
	skipShort(t, "a Consul cluster")
	cl := devconsul.StartClusterForTest(t, devconsul.ClusterOptions{})
	m := meshWithoutConsul(t)
	m.consul = cl.Client
	fm := newFaultMeshOn(t, m, 1, 3)
	fm.heartbeat(time.Second)
	v := startVegeta(t, "http://"+hostPort(fm.webBind)+"/", faultRate, 3*time.Minute)
	warm(t, v)
	var phases []phase
	// follows reports how long web's sidecar takes to see a new instance
	// registered now.
	follows := func(id string) time.Duration {
		t.Helper()
		start := time.Now()
		in := fm.addAPI(id)
		return took(t, start, 30*time.Second, id+" an endpoint of web's", func() bool {
			return fm.apiEndpoints()[hostPort(in.svc.sidecarPort)] == "healthy"
		})
	}

	start := time.Now()
	if err := cl.Client.Freeze(); err != nil {
		t.Fatal(err)
	}
	time.Sleep(10 * time.Second) // the fault itself: 10 s frozen
	if err := cl.Client.Thaw(); err != nil {
		t.Fatal(err)
	}
	d := follows("api-4")
	phases = append(phases, phase{"Consul client agent frozen 10 s (SIGSTOP)", start, fmt.Sprintf("a registration after the thaw reached callers in %.1fs", d.Seconds())})

	settle(start)
	start = time.Now()
	if err := cl.Client.Restart(context.Background(), 30*time.Second); err != nil {
		t.Fatal(err)
	}
	back := time.Since(start)
	d = follows("api-5")
	phases = append(phases, phase{"Consul client agent SIGKILLed and restarted", start, fmt.Sprintf("answering in %.1fs, a registration reached callers %.1fs later", back.Seconds(), d.Seconds())})

	settle(start)
	start = time.Now()
	leader, err := cl.Leader()
	if err != nil {
		t.Fatal(err)
	}
	cl.Servers[leader].Kill()
	elected := took(t, start, 30*time.Second, "a new Raft leader", func() bool { l, err := cl.Leader(); return err == nil && l != leader })
	d = follows("api-6")
	if err := cl.Servers[leader].Restart(context.Background(), 30*time.Second); err != nil {
		t.Fatal(err)
	}
	phases = append(phases, phase{"Consul leader SIGKILLed (3 servers), restarted", start, fmt.Sprintf("new leader in %.1fs, a registration reached callers %.1fs later", elected.Seconds(), d.Seconds())})
	settle(start)
	reportPhases(t, faultRate, v.stop(t), phases)
}

// TestFaultGracefulShutdown: SIGTERM to an api sidecar under load, with
// slow requests (1.5 s) and streamed responses (2 s) in flight through it.
// Its /ready fails at once (its Consul check is an HTTP check of /ready,
// as the demo's), it keeps accepting and sheds keep-alive connections
// until web's sidecar stopped opening new ones, then closes its listeners
// and drains: the requests in flight finish, and no request fails.
func TestFaultGracefulShutdown(t *testing.T) {
	fm := newFaultMeshWith(t, &faultMesh{mesh: newMesh(t), readyChecks: true}, 1, 3)
	base := "http://" + hostPort(fm.webBind)
	v := startVegeta(t, base+"/", faultRate, 2*time.Minute)
	warm(t, v)

	// In flight through every instance: 30 slow requests (1.5 s, within the
	// retry policy's per-try timeout) and 6 streams.
	type result struct {
		status int
		body   string
		err    error
	}
	results := make(chan result, 36)
	long := &http.Client{Timeout: 20 * time.Second}
	get := func(path string) {
		resp, err := long.Get(base + path)
		if err != nil {
			results <- result{err: err}
			return
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		results <- result{status: resp.StatusCode, body: string(b), err: err}
	}
	for range 30 {
		go get("/slow?ms=1500")
	}
	for range 6 {
		go get("/stream?n=20")
	}
	testutil.Until(t, 5*time.Second, "36 requests in flight through web's sidecar", func() bool { return fm.activeRequests() >= 36 })

	victim := fm.apis["api-1"]
	addr := hostPort(victim.svc.sidecarPort)
	retries := metricAt(t, fm.web.admin, "meshlet_sidecar_upstream_retries_total")
	start := time.Now()
	exited := make(chan time.Duration, 1)
	go func() { victim.sidecar.p.Stop(); exited <- time.Since(start) }()
	left := took(t, start, 15*time.Second, "api-1 gone from web's endpoints after its sidecar's SIGTERM", func() bool {
		_, ok := fm.apiEndpoints()[addr]
		return !ok
	})
	var exit time.Duration
	select {
	case exit = <-exited:
	case <-time.After(30 * time.Second):
		t.Fatal("api-1's sidecar still running 30 s after SIGTERM")
	}
	// Nothing was refused or reset: web's sidecar retried nothing (a
	// sidecar closing its listeners at SIGTERM is hidden from clients by
	// connect-failure retries, not from this count).
	if n := metricAt(t, fm.web.admin, "meshlet_sidecar_upstream_retries_total") - retries; n != 0 {
		t.Errorf("web's sidecar retried %v times while api-1's sidecar stopped: it refused or reset connections before callers moved on", n)
	}
	throughVictim := 0
	for range 36 {
		r := <-results
		switch {
		case r.err != nil || r.status != 200:
			t.Errorf("a request in flight at SIGTERM: %d %v %.80q", r.status, r.err, r.body)
		case strings.Contains(r.body, `"api-1"`) || strings.Contains(r.body, "of api-1\n"):
			throughVictim++
		}
	}
	if throughVictim == 0 {
		t.Error("no request in flight went through api-1's sidecar: the test proved nothing")
	}
	settle(start)
	reportPhases(t, faultRate, v.stop(t), []phase{{"SIGTERM one upstream sidecar (30 slow requests and 6 streams in flight)", start,
		fmt.Sprintf("left callers' endpoints in %.1fs, exited in %.1fs; %d requests in flight through it finished", left.Seconds(), exit.Seconds(), throughVictim)}})
}

// TestFaultConfigChanges: under load, web's resilience policies are
// edited, an intention of another caller of api flips, a listener is added
// to web's sidecar (an upstream) and removed with a stream in flight on
// it, and api's instances are all replaced. No request meant to succeed
// fails; the stream on the removed listener finishes (drain).
func TestFaultConfigChanges(t *testing.T) {
	fm := newFaultMesh(t, 1, 3)
	v := startVegeta(t, "http://"+hostPort(fm.webBind)+"/", faultRate, 3*time.Minute)
	warm(t, v)
	var phases []phase
	_, _, versions := fm.web.xdsState()
	pushed := func(what string) time.Duration {
		t.Helper()
		start := time.Now()
		return took(t, start, 10*time.Second, what+" pushed to web's sidecar", func() bool {
			_, _, now := fm.web.xdsState()
			changed := fmt.Sprint(now) != fmt.Sprint(versions)
			if changed {
				versions = now
			}
			return changed
		})
	}

	// 1. Policy edits: retries, timeouts, the breaker, twice.
	start := time.Now()
	fm.writePolicy("resilience.yaml", strings.Replace(faultPolicies, "numRetries: 2", "numRetries: 3", 1)+`---
apiVersion: meshlet.io/v1alpha1
kind: TimeoutPolicy
metadata: {name: api-timeouts}
spec: {service: api, request: 5s, connect: 1s}
---
apiVersion: meshlet.io/v1alpha1
kind: CircuitBreakerPolicy
metadata: {name: api-breaker}
spec:
  service: api
  maxRequests: 500
  endpoint: {consecutiveFailures: 5, openInterval: 2s, halfOpenRequests: 1}
`)
	d := pushed("the retry, timeout and breaker edit")
	fm.writePolicy("resilience.yaml", faultPolicies)
	d2 := pushed("the policies back")
	phases = append(phases, phase{"policy edits (retry, timeout, breaker) and back", start, fmt.Sprintf("applied in %.1fs and %.1fs", d.Seconds(), d2.Seconds())})

	// 2. An intention of another caller flips, twice: api's sidecars
	// rebuild their authorization with web's traffic flowing.
	settle(start)
	start = time.Now()
	api1 := fm.apis["api-1"].sidecar
	_, _, apiVersions := api1.xdsState()
	for _, action := range []api.IntentionAction{api.IntentionActionAllow, api.IntentionActionDeny} {
		fm.intention("batch", "api", action)
		testutil.Until(t, 10*time.Second, "api-1's sidecar given the intention batch → api "+string(action), func() bool {
			_, _, now := api1.xdsState()
			changed := fmt.Sprint(now) != fmt.Sprint(apiVersions)
			if changed {
				apiVersions = now
			}
			return changed
		})
	}
	phases = append(phases, phase{"an intention of another caller flipped (allow, deny)", start, "api's sidecars rebuilt their authorization twice"})

	// 3. A listener added (an upstream of web's), a stream opened through
	// it, the listener removed: the stream finishes.
	settle(start)
	start = time.Now()
	legacyBind := freePorts(t, 1)[0]
	fm.writePolicy("legacy.yaml", serviceDefaults("api-legacy", "http"))
	fm.allow("web", "api-legacy")
	fm.addInstance("api-legacy", "api-legacy-1")
	web := fm.webSvc
	web.upstreams = map[string]int{"api": fm.webBind, "api-legacy": legacyBind}
	fm.register(web)
	streamed := make(chan string, 1)
	testutil.Until(t, 10*time.Second, "web's listener for api-legacy serving", func() bool {
		resp, err := http.Get("http://" + hostPort(legacyBind) + "/")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == 200
	})
	go func() {
		resp, err := (&http.Client{Timeout: 20 * time.Second}).Get("http://" + hostPort(legacyBind) + "/stream?n=20")
		if err != nil {
			streamed <- err.Error()
			return
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		if err != nil {
			streamed <- err.Error()
			return
		}
		streamed <- fmt.Sprintf("%d chunks", strings.Count(string(b), "chunk "))
	}()
	testutil.Until(t, 5*time.Second, "the stream in flight", func() bool { return fm.activeRequestsTo("api-legacy") > 0 })
	fm.register(fm.webSvc) // the upstream gone: its listener is removed
	testutil.Until(t, 10*time.Second, "web's listener for api-legacy removed", func() bool { return fm.web.logCount("listener: removed") > 0 })
	select {
	case got := <-streamed:
		if got != "20 chunks" {
			t.Errorf("the stream on the removed listener: %s, want 20 chunks", got)
		}
	case <-time.After(15 * time.Second):
		t.Error("the stream on the removed listener did not finish")
	}
	phases = append(phases, phase{"a listener added, then removed with a stream in flight", start, "the stream finished (drain)"})

	// 4. Every api instance replaced: two new ones, the three old ones
	// deregistered, then stopped.
	settle(start)
	start = time.Now()
	old := []string{"api-1", "api-2", "api-3"}
	fm.addAPI("api-4")
	fm.addAPI("api-5")
	var stopping []*apiInstance
	for _, id := range old {
		fm.deregister(id)
		stopping = append(stopping, fm.apis[id])
		delete(fm.apis, id)
	}
	d = took(t, start, 15*time.Second, "web's endpoints only api-4 and api-5", func() bool { return fm.apisMatch() == nil })
	for _, in := range stopping {
		in.sidecar.p.Stop()
		in.app.Stop()
	}
	phases = append(phases, phase{"every api instance replaced (2 added, 3 deregistered, then stopped)", start, fmt.Sprintf("endpoints swapped in %.1fs", d.Seconds())})
	settle(start)
	reportPhases(t, faultRate, v.stop(t), phases)
}

// TestFaultFileDescriptorsExhausted: web's sidecar runs with an open-files
// limit of 64 (prlimit) and 200 connections are opened to its outbound
// listener: it runs out of file descriptors. It does not fall over: a
// client on an established keep-alive connection keeps being served, each
// failed accept is counted (meshlet_sidecar_downstream_accept_errors_total
// {reason="fd_exhausted"}) and logged once, not per failure, and once the
// flood's connections close, the connections waiting in the backlog are
// served.
func TestFaultFileDescriptorsExhausted(t *testing.T) {
	fm := newFaultMeshWith(t, &faultMesh{mesh: newMesh(t), webNoFile: 64}, 1, 2)
	url := "http://" + hostPort(fm.webBind) + "/"
	// The established client: one keep-alive connection, a request every
	// 50 ms.
	tr := &http.Transport{MaxConnsPerHost: 1, MaxIdleConnsPerHost: 1}
	defer tr.CloseIdleConnections()
	client := &http.Client{Transport: tr, Timeout: 5 * time.Second}
	get := func() error {
		resp, err := client.Get(url)
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		_, _ = io.Copy(io.Discard, resp.Body)
		if resp.StatusCode != 200 {
			return fmt.Errorf("%s", resp.Status)
		}
		return nil
	}
	if err := get(); err != nil {
		t.Fatal(err)
	}
	stop, done := make(chan struct{}), make(chan struct{})
	var sent, lost int
	var firstErr error
	go func() {
		defer close(done)
		for {
			select {
			case <-stop:
				return
			case <-time.After(50 * time.Millisecond):
			}
			sent++
			if err := get(); err != nil {
				lost++
				if firstErr == nil {
					firstErr = err
				}
			}
		}
	}()

	// The flood: 200 connections, held open.
	var flood []net.Conn
	for range 200 {
		c, err := net.DialTimeout("tcp", hostPort(fm.webBind), 2*time.Second)
		if err != nil {
			break // the backlog is full: refused is fine too
		}
		flood = append(flood, c)
	}
	testutil.Until(t, 10*time.Second, "web's sidecar out of file descriptors", func() bool {
		return fm.web.logCount("out of file descriptors") > 0
	})
	// The established client keeps working for 2 s meanwhile.
	time.Sleep(2 * time.Second)
	for _, c := range flood {
		c.Close()
	}
	recovered := took(t, time.Now(), 20*time.Second, "a new connection served once the flood closed", func() bool {
		resp, err := (&http.Client{Timeout: 2 * time.Second}).Get(url)
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == 200
	})
	close(stop)
	<-done
	if lost > 0 {
		t.Errorf("the established client lost %d of %d requests, first: %v", lost, sent, firstErr)
	}
	if fm.web.p.State() != nil {
		t.Fatal("web's sidecar exited")
	}
	failures := metricAt(t, fm.web.admin, "meshlet_sidecar_downstream_accept_errors_total", `reason="fd_exhausted"`)
	if failures == 0 {
		t.Error("no fd_exhausted accept error counted")
	}
	if n := fm.web.logCount("out of file descriptors"); n != 1 {
		t.Errorf("out of file descriptors logged %d times, want once (at most once a minute)", n)
	}
	t.Logf("FAULT | file descriptors exhausted (RLIMIT_NOFILE 64, %d connections opened) | %d | %d | %d | %v failed accepts counted, logged once; new connections served %.1fs after the flood closed",
		len(flood), 20, sent, lost, failures, recovered.Seconds())
}

// TestFaultTLSGarbage: under load through api's sidecars, api-1's mTLS
// listener gets 40 connections each of: random bytes, a plaintext HTTP
// request, half a ClientHello then silence, and a TLS handshake without a
// client certificate. Each ends (closed, never answered 200) within the
// handshake timeout; mesh traffic loses nothing; the sidecar's goroutines
// come back to where they were (no leak).
func TestFaultTLSGarbage(t *testing.T) {
	fm := newFaultMesh(t, 1, 3)
	target := hostPort(fm.apis["api-1"].sidecar.publicPort(fm))
	goroutines := func() float64 { return metricAt(t, fm.apis["api-1"].sidecar.admin, "go_goroutines") }
	before := goroutines()
	v := startVegeta(t, "http://"+hostPort(fm.webBind)+"/", faultRate, 2*time.Minute)
	warm(t, v)
	start := time.Now()

	hello := clientHello(t)
	kinds := []struct {
		name string
		send []byte
		tls  bool // a full TLS handshake without a client certificate
	}{
		{"random bytes", randomBytes(t, 4096), false},
		{"plaintext HTTP", []byte("GET / HTTP/1.1\r\nHost: api\r\n\r\n"), false},
		{"half a ClientHello", hello[:len(hello)/2], false},
		{"TLS without a client certificate", nil, true},
	}
	type outcome struct {
		kind string
		err  string // "" when it ended as it should
	}
	outcomes := make(chan outcome, 160)
	for _, k := range kinds {
		for range 40 {
			go func() {
				c, err := net.DialTimeout("tcp", target, 2*time.Second)
				if err != nil {
					outcomes <- outcome{k.name, "dial: " + err.Error()}
					return
				}
				defer c.Close()
				_ = c.SetDeadline(time.Now().Add(sidecarHandshakeBound))
				if k.tls {
					tc := tls.Client(c, &tls.Config{InsecureSkipVerify: true, NextProtos: []string{"http/1.1"}})
					if err := tc.Handshake(); err == nil {
						// TLS 1.3: the refusal of the missing certificate
						// comes on the first read.
						_, _ = tc.Write([]byte("GET / HTTP/1.1\r\nHost: api\r\n\r\n"))
						buf := make([]byte, 64)
						if n, err := tc.Read(buf); err == nil {
							outcomes <- outcome{k.name, fmt.Sprintf("answered without a client certificate: %q", buf[:n])}
							return
						}
					}
					outcomes <- outcome{k.name, ""}
					return
				}
				_, _ = c.Write(k.send)
				buf := make([]byte, 512)
				for {
					n, err := c.Read(buf)
					if err != nil {
						var ne net.Error
						if errors.As(err, &ne) && ne.Timeout() {
							outcomes <- outcome{k.name, "still open after " + sidecarHandshakeBound.String()}
						} else {
							outcomes <- outcome{k.name, ""}
						}
						return
					}
					if strings.Contains(string(buf[:n]), " 200 ") {
						outcomes <- outcome{k.name, fmt.Sprintf("answered: %q", buf[:n])}
						return
					}
				}
			}()
		}
	}
	bad := map[string]int{}
	for range 160 {
		o := <-outcomes
		if o.err != "" {
			bad[o.kind]++
			if bad[o.kind] == 1 {
				t.Errorf("%s: %s", o.kind, o.err)
			}
		}
	}
	ended := time.Since(start)
	settle(start)
	hits := v.stop(t)
	var after float64
	testutil.Until(t, 20*time.Second, "api-1's sidecar's goroutines back to where they were", func() bool {
		after = goroutines()
		return after <= before+5
	})
	reportPhases(t, faultRate, hits, []phase{{"160 garbage connections on an mTLS listener (random bytes, plaintext, half a ClientHello, no client certificate)", start,
		fmt.Sprintf("all ended in %.1fs; goroutines %v before, %v after", ended.Seconds(), before, after)}})
}

// sidecarHandshakeBound is how long a test waits for a sidecar to end a
// connection that never completes its TLS handshake: the sidecar's
// HandshakeTimeout (10 s) and some.
const sidecarHandshakeBound = 15 * time.Second

// clientHello returns the bytes of a TLS ClientHello as crypto/tls sends it.
func clientHello(t *testing.T) []byte {
	t.Helper()
	a, b := net.Pipe()
	defer a.Close()
	go func() {
		_ = tls.Client(b, &tls.Config{InsecureSkipVerify: true}).Handshake()
		b.Close()
	}()
	buf := make([]byte, 4096)
	_ = a.SetReadDeadline(time.Now().Add(5 * time.Second))
	n, err := a.Read(buf)
	if err != nil || n < 50 || buf[0] != 0x16 {
		t.Fatalf("no ClientHello: %d bytes, %v", n, err)
	}
	return buf[:n]
}
