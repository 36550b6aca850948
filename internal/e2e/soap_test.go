package e2e

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/meshlet/meshlet/internal/testlog"
)

// TestSOAPPostsAreNotReplayed is the "GraphQL and SOAP" row of the protocol
// table, SOAP half: a spyne SOAP 1.1 service as the app behind two sidecars
// with mTLS, called by zeep, which loads the WSDL through the pair too.
// Under a RetryPolicy with retryOn [5xx, reset], a SOAP Fault (HTTP 500)
// and a connection reset after the order ran are not replayed: the service
// runs each order once and zeep sees the Fault with its faultstring intact,
// or the sidecar's 503 upstream_reset. With an Idempotency-Key header the
// faulted call is sent again.
func TestSOAPPostsAreNotReplayed(t *testing.T) {
	py := soapPython(t)
	port := freePorts(t, 1)[0]
	app := startSOAPApp(t, py, port)
	p := startPair(t, pairOptions{Protocol: "http", AppPort: port, Policies: []string{
		"apiVersion: meshlet.io/v1alpha1\nkind: RetryPolicy\nmetadata: {name: up-retry}\nspec:\n  service: up\n" +
			"  retryOn: [5xx, reset]\n  numRetries: 2\n  backoff: {baseInterval: 5ms, maxInterval: 20ms}\n",
	}})
	app.waitReady(t)
	denied := func() float64 {
		return p.Down.metric(t, "meshlet_sidecar_upstream_retries_denied_total", `cluster="up"`, `reason="non_idempotent"`)
	}
	retries := func() float64 {
		return p.Down.metric(t, "meshlet_sidecar_upstream_retries_total", `cluster="up"`)
	}
	d0, r0 := denied(), retries()

	address, results := runZeep(t, py, "http://"+p.Addr+"/?wsdl", []soapCall{
		{Key: "ok", Item: "book"},
		{Key: "fault", Item: "pen", Fail: "fault"},
		{Key: "reset", Item: "ink", Fail: "reset"},
		{Key: "keyed", Item: "cup", Fail: "fault", IdempotencyKey: "order-keyed"},
	})
	if want := "http://" + p.Addr + "/"; address != want {
		t.Errorf("the WSDL names the service at %q, want the pair's %q", address, want)
	}
	want := []soapResult{
		{Result: 1, Status: 200},
		{Fault: &soapFault{Code: "soap11env:Server.OutOfStock", Message: "order fault: pen is out of stock"}, Status: 500},
		{TransportError: "503 Server returned response (503) with invalid XML", Status: 503, Reason: "upstream_reset"},
		{Result: 2, Status: 200}, // the second execution answered
	}
	for i, w := range want {
		got := results[i]
		got.TransportError, _, _ = strings.Cut(got.TransportError, ":") // drop the quoted body
		t.Logf("call %d (%s): %s", i, []string{"ok", "fault", "reset", "keyed"}[i], got)
		if got.String() != w.String() {
			t.Errorf("call %d: zeep saw %s, want %s", i, got, w)
		}
	}

	time.Sleep(50 * time.Millisecond) // time for a replay in flight to arrive
	c := app.counts(t)
	for key, n := range map[string]int{"ok": 1, "fault": 1, "reset": 1, "keyed": 2} {
		if c.Calls[key] != n {
			t.Errorf("PlaceOrder(%s) ran %d times at the service, want %d", key, c.Calls[key], n)
		}
	}
	if c.Posts != 5 {
		t.Errorf("the service received %d POSTs, want 5", c.Posts)
	}
	// Every request, the WSDL's GET included, came through both sidecars.
	if len(c.Via) != 6 {
		t.Errorf("the service received %d requests, want 6 (the WSDL and 5 POSTs)", len(c.Via))
	}
	for _, via := range c.Via {
		if !strings.Contains(via, "down-1-sidecar-proxy") || !strings.Contains(via, "up-1-sidecar-proxy") {
			t.Errorf("a request reached the service with Via %q, want both sidecars", via)
		}
	}
	if d := denied() - d0; d != 2 {
		t.Errorf("non_idempotent denials went up by %v, want 2 (the Fault and the reset)", d)
	}
	if r := retries() - r0; r != 1 {
		t.Errorf("retries went up by %v, want 1 (the call with an Idempotency-Key)", r)
	}
}

// soapPython returns a python3 that has zeep and spyne, failing the test
// when there is none: Debian's python3 first, as the packages install there.
func soapPython(t *testing.T) string {
	t.Helper()
	skipShort(t, "a Python SOAP service and client (zeep, spyne)")
	var tried []string
	for _, name := range []string{"/usr/bin/python3", "python3"} {
		path, err := exec.LookPath(name)
		if err != nil {
			tried = append(tried, name+": not found")
			continue
		}
		out, err := exec.Command(path, "-c", "import spyne, zeep").CombinedOutput()
		if err == nil {
			return path
		}
		lines := strings.Split(strings.TrimSpace(string(out)), "\n")
		tried = append(tried, fmt.Sprintf("%s: %s", path, lines[len(lines)-1]))
	}
	t.Fatalf("the SOAP test needs python3 with zeep (client) and spyne (server): "+
		"apt-get install -y python3-zeep python3-spyne (tried %s)", strings.Join(tried, "; "))
	return ""
}

// soapApp is testdata/soap/server.py, running.
type soapApp struct {
	port  int
	ready chan error
}

// startSOAPApp starts the spyne service on 127.0.0.1:port; it stops when
// the test ends (its stdin closes).
func startSOAPApp(t *testing.T, py string, port int) *soapApp {
	t.Helper()
	cmd := exec.Command(py, "testdata/soap/server.py", strconv.Itoa(port))
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	stderr := &testlog.Buffer{}
	cmd.Stderr = stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	a := &soapApp{port: port, ready: make(chan error, 1)}
	go func() {
		line, err := bufio.NewReader(stdout).ReadString('\n')
		if err == nil && strings.TrimSpace(line) != "ready" {
			err = fmt.Errorf("unexpected output %q", line)
		}
		a.ready <- err
		_, _ = io.Copy(io.Discard, stdout)
		exited <- cmd.Wait()
	}()
	t.Cleanup(func() {
		_ = stdin.Close()
		select {
		case err := <-exited:
			if err != nil {
				t.Errorf("SOAP service: %v", err)
			}
		case <-time.After(5 * time.Second):
			_ = cmd.Process.Kill()
			<-exited
			t.Errorf("SOAP service still running 5s after its stdin closed: killed")
		}
		if t.Failed() && stderr.String() != "" {
			t.Logf("SOAP service stderr:\n%s", stderr)
		}
	})
	return a
}

func (a *soapApp) waitReady(t *testing.T) {
	t.Helper()
	select {
	case err := <-a.ready:
		if err != nil {
			t.Fatalf("SOAP service did not start: %v", err)
		}
	case <-time.After(15 * time.Second):
		t.Fatal("SOAP service not ready after 15s")
	}
}

type soapCounts struct {
	Posts int            `json:"posts"`
	Calls map[string]int `json:"calls"`
	Via   []string       `json:"via"`
}

// counts reads the service's counters directly, not through the mesh.
func (a *soapApp) counts(t *testing.T) soapCounts {
	t.Helper()
	resp, err := http.Get("http://" + hostPort(a.port) + "/_counts")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var c soapCounts
	if err := json.NewDecoder(resp.Body).Decode(&c); err != nil {
		t.Fatal(err)
	}
	return c
}

// soapCall is one PlaceOrder call of testdata/soap/client.py.
type soapCall struct {
	Key            string `json:"key"`
	Item           string `json:"item"`
	Fail           string `json:"fail,omitempty"`
	Times          int    `json:"times,omitempty"`
	IdempotencyKey string `json:"idempotencyKey,omitempty"`
}

type soapFault struct {
	Code    string `json:"code"`
	Message string `json:"message"`
}

// soapResult is what zeep saw of one call.
type soapResult struct {
	Result          int        `json:"result"`
	Fault           *soapFault `json:"fault"`
	TransportError  string     `json:"transportError"`
	ConnectionError string     `json:"connectionError"`
	Status          int        `json:"status"`
	Reason          string     `json:"reason"`
}

func (r soapResult) String() string {
	s := fmt.Sprintf("status %d reason %q", r.Status, r.Reason)
	switch {
	case r.Fault != nil:
		s += fmt.Sprintf(", Fault %s %q", r.Fault.Code, r.Fault.Message)
	case r.TransportError != "":
		s += ", TransportError " + r.TransportError
	case r.ConnectionError != "":
		s += ", connection error " + r.ConnectionError
	default:
		s += fmt.Sprintf(", result %d", r.Result)
	}
	return s
}

// runZeep runs testdata/soap/client.py: it loads the WSDL from wsdl and
// makes the calls, returning the service address the WSDL names and one
// result per call.
func runZeep(t *testing.T, py, wsdl string, calls []soapCall) (string, []soapResult) {
	t.Helper()
	arg, err := json.Marshal(calls)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, py, "testdata/soap/client.py", wsdl, string(arg))
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("zeep client: %v\nstdout:\n%s\nstderr:\n%s", err, out, stderr.String())
	}
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	if len(lines) != len(calls)+1 {
		t.Fatalf("zeep client printed %d lines, want %d:\n%s\nstderr:\n%s", len(lines), len(calls)+1, out, stderr.String())
	}
	var head struct {
		Address string `json:"address"`
	}
	if err := json.Unmarshal([]byte(lines[0]), &head); err != nil {
		t.Fatalf("zeep client: %q: %v", lines[0], err)
	}
	results := make([]soapResult, len(calls))
	for i, line := range lines[1:] {
		if err := json.Unmarshal([]byte(line), &results[i]); err != nil {
			t.Fatalf("zeep client: %q: %v", line, err)
		}
	}
	return head.Address, results
}
