package e2e

import (
	"bufio"
	"bytes"
	"crypto/tls"
	"encoding/hex"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/meshlet/meshlet/internal/testca"
	"github.com/meshlet/meshlet/internal/testutil"
)

// tap forwards connections to target, keeping every byte each way.
type tap struct {
	addr     string
	mu       sync.Mutex
	toTarget bytes.Buffer
	toClient bytes.Buffer
}

func startTap(t *testing.T, port int, target string) *tap {
	t.Helper()
	l, err := net.Listen("tcp", hostPort(port))
	if err != nil {
		t.Fatal(err)
	}
	tp := &tap{addr: l.Addr().String()}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				u, err := net.Dial("tcp", target)
				if err != nil {
					return
				}
				defer u.Close()
				done := make(chan struct{})
				go func() {
					io.Copy(io.MultiWriter(u, tp.writer(&tp.toTarget)), c)
					u.(*net.TCPConn).CloseWrite()
					close(done)
				}()
				io.Copy(io.MultiWriter(c, tp.writer(&tp.toClient)), u)
				<-done
			}()
		}
	}()
	return tp
}

type lockedWriter struct {
	mu *sync.Mutex
	b  *bytes.Buffer
}

func (w lockedWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.b.Write(p)
}

func (tp *tap) writer(b *bytes.Buffer) io.Writer { return lockedWriter{&tp.mu, b} }

func (tp *tap) captured() (toTarget, toClient []byte) {
	tp.mu.Lock()
	defer tp.mu.Unlock()
	return bytes.Clone(tp.toTarget.Bytes()), bytes.Clone(tp.toClient.Bytes())
}

func trustDomain(t *testing.T, m *mesh) string {
	t.Helper()
	roots, _, err := m.consul.Client.Agent().ConnectCARoots(nil)
	if err != nil {
		t.Fatal(err)
	}
	return roots.TrustDomain
}

func TestMTLSBetweenSidecarsCarriesIdentityAndNoCleartext(t *testing.T) {
	m := newMesh(t)
	m.writePolicy("b.yaml", serviceDefaults("b", "http"))
	m.startControlPlane("", "")
	ports := freePorts(t, 6)
	bApp := startApp(t, "b-1")
	// Other sidecars dial b's sidecar at ports[3], a tap that forwards to
	// where the sidecar really listens (ports[4]) and keeps the bytes.
	tp := startTap(t, ports[3], hostPort(ports[4]))
	aSvc := svc{id: "a-1", name: "a", appPort: ports[0], sidecarPort: ports[1], upstreams: map[string]int{"b": ports[2]}}
	bSvc := svc{id: "b-1", name: "b", appPort: bApp.port, sidecarPort: ports[3], sidecarBind: ports[4]}
	m.register(aSvc)
	m.register(bSvc)
	m.allow("a", "b")
	aProxy, bProxy := m.startSidecar(aSvc.proxyID(), ""), m.startSidecar(bSvc.proxyID(), "")
	aProxy.waitReady(t)
	bProxy.waitReady(t)

	req, _ := http.NewRequest(http.MethodPost, fmt.Sprintf("http://127.0.0.1:%d/secret-path-4242", ports[2]), strings.NewReader("cleartext-body-marker"))
	req.Header.Set("X-Secret", "cleartext-header-marker")
	var got answer
	testutil.Until(t, 5*time.Second, "a request through both sidecars", func() bool {
		resp, err := client.Do(req.Clone(req.Context()))
		if err != nil {
			return false
		}
		defer resp.Body.Close()
		got = answer{status: resp.StatusCode}
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode == 200 && bytes.Contains(b, []byte(`"xfcc"`)) && func() bool {
			got.xfcc = string(b)
			return true
		}()
	})
	td := trustDomain(t, m)
	aID := "spiffe://" + td + "/ns/default/dc/dc1/svc/a"
	bID := "spiffe://" + td + "/ns/default/dc/dc1/svc/b"
	if !strings.Contains(got.xfcc, "URI="+aID) || !strings.Contains(got.xfcc, "By="+bID) {
		t.Errorf("b's app saw x-forwarded-client-cert %s; want By=%s and URI=%s", got.xfcc, bID, aID)
	}

	toB, toA := tp.captured()
	if len(toB) == 0 || toB[0] != 0x16 {
		t.Fatalf("the sidecar-to-sidecar connection does not start with a TLS handshake record (first bytes %x)", toB[:min(len(toB), 8)])
	}
	for _, marker := range []string{"secret-path-4242", "cleartext-body-marker", "cleartext-header-marker"} {
		if bytes.Contains(toB, []byte(marker)) {
			t.Errorf("%q crossed between the sidecars in cleartext", marker)
		}
	}
	if bytes.Contains(toA, []byte("b-1")) {
		t.Error("b's answer crossed between the sidecars in cleartext")
	}

	// A plaintext client on b's public listener is refused, with a log line
	// and a counter.
	conn, err := net.Dial("tcp", hostPort(ports[4]))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(5 * time.Second))
	fmt.Fprint(conn, "GET / HTTP/1.1\r\nHost: b\r\n\r\n")
	if resp, err := http.ReadResponse(bufio.NewReader(conn), nil); err == nil {
		t.Errorf("plaintext request answered: %s", resp.Status)
	}
	bProxy.log.WaitFor(t, 2*time.Second, "plaintext on a strict mTLS listener")
	if n := bProxy.metric(t, "meshlet_sidecar_tls_handshakes_total", `side="inbound"`, `result="plaintext"`); n != 1 {
		t.Errorf("plaintext handshake failures counted %v, want 1", n)
	}
}

func TestIntentionsTakeEffectWithin2s(t *testing.T) {
	t.Run("http", func(t *testing.T) {
		m := newMesh(t)
		m.writePolicy("b.yaml", serviceDefaults("b", "http"))
		m.startControlPlane("", "")
		_, bProxy, _, bindPort, _ := twoServices(t, m)
		load := startLoad(fmt.Sprintf("http://127.0.0.1:%d/", bindPort))
		defer load.finish()
		testutil.Until(t, 5*time.Second, "traffic allowed", func() bool {
			as := load.snapshot()
			return len(as) > 0 && as[len(as)-1].status == 200
		})

		at := time.Now()
		m.intention("a", "b", api.IntentionActionDeny)
		testutil.Until(t, 2*time.Second, "the deny to take effect", func() bool {
			as := load.snapshot()
			last := as[len(as)-1]
			return last.start.After(at) && last.status == http.StatusForbidden
		})
		t.Logf("deny in force after %v", time.Since(at).Round(time.Millisecond))
		as := load.snapshot()
		last := as[len(as)-1]
		if last.reason != "authz_denied" || last.rule != "consul intention a => b" {
			t.Errorf("denied with reason %q rule %q, want authz_denied and the intention", last.reason, last.rule)
		}
		if n := bProxy.metric(t, "meshlet_sidecar_authz_denied_total", `rule="consul intention a => b"`); n < 1 {
			t.Errorf("denials counted %v", n)
		}
		bProxy.log.WaitFor(t, time.Second, "authz: request denied")

		at = time.Now()
		m.intention("a", "b", api.IntentionActionAllow)
		testutil.Until(t, 2*time.Second, "the allow to take effect", func() bool {
			as := load.snapshot()
			last := as[len(as)-1]
			return last.start.After(at) && last.status == 200
		})
		t.Logf("allow in force after %v", time.Since(at).Round(time.Millisecond))
	})
	t.Run("tcp", func(t *testing.T) {
		m := newMesh(t) // b is tcp: no policy
		m.startControlPlane("", "")
		_, bProxy, _, bindPort, _ := twoServices(t, m)
		// Authorization of a TCP service applies when a connection opens
		// (as Envoy's network RBAC): each try uses a new connection.
		fresh := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
		works := func() bool {
			resp, err := fresh.Get(fmt.Sprintf("http://127.0.0.1:%d/", bindPort)) // HTTP carried as opaque TCP
			if err != nil {
				return false
			}
			resp.Body.Close()
			return resp.StatusCode == 200
		}
		testutil.Until(t, 5*time.Second, "tcp traffic allowed", works)
		at := time.Now()
		m.intention("a", "b", api.IntentionActionDeny)
		testutil.Until(t, 2*time.Second, "connections refused", func() bool { return !works() })
		t.Logf("deny in force after %v", time.Since(at).Round(time.Millisecond))
		bProxy.log.WaitFor(t, time.Second, "authz: connection denied")
		m.intention("a", "b", api.IntentionActionAllow)
		testutil.Until(t, 2*time.Second, "connections allowed again", works)
	})
}

// useOwnCA switches the Connect CA of the mesh's Consul to a root the test
// holds, so it can mint certificates Consul's CA never would.
func useOwnCA(t *testing.T, m *mesh) *testca.CA {
	t.Helper()
	ca, err := testca.New(trustDomain(t, m))
	if err != nil {
		t.Fatal(err)
	}
	_, err = m.consul.Client.Connect().CASetConfig(&api.CAConfig{Provider: "consul", Config: map[string]any{
		"PrivateKey": ca.KeyPEM(), "RootCert": ca.CertPEM,
	}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	testutil.Until(t, 10*time.Second, "the test CA to be active", func() bool {
		roots, _, err := m.consul.Client.Agent().ConnectCARoots(nil)
		if err != nil {
			return false
		}
		for _, r := range roots.Roots {
			if r.ID == roots.ActiveRootID && strings.TrimSpace(r.RootCertPEM) == strings.TrimSpace(ca.CertPEM) {
				return true
			}
		}
		return false
	})
	return ca
}

func TestRefusedHandshakesAreLoggedCountedAndHarmless(t *testing.T) {
	m := newMesh(t)
	ca := useOwnCA(t, m)
	m.writePolicy("b.yaml", serviceDefaults("b", "http"))
	m.startControlPlane("", "")
	_, bProxy, _, bindPort, bSvc := twoServices(t, m)
	load := startLoad(fmt.Sprintf("http://127.0.0.1:%d/", bindPort))
	public := hostPort(bSvc.sidecarPort)

	other, err := testca.New(ca.TrustDomain) // same trust domain, another key
	if err != nil {
		t.Fatal(err)
	}
	expired, err := ca.Issue("dc1", "a", time.Now().Add(-2*time.Hour), time.Now().Add(-time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	dialTLS := func(l *testca.Leaf) (*http.Response, error) {
		cfg := &tls.Config{InsecureSkipVerify: true, NextProtos: []string{"http/1.1"}}
		if l != nil {
			cert, err := tls.X509KeyPair([]byte(l.CertPEM), []byte(l.KeyPEM))
			if err != nil {
				t.Fatal(err)
			}
			cfg.Certificates = []tls.Certificate{cert}
		}
		c := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{TLSClientConfig: cfg, DisableKeepAlives: true}}
		return c.Get("https://" + public + "/")
	}
	tests := []struct {
		name   string
		try    func() error
		reason string
	}{
		{"plaintext", func() error { _, err := http.Get("http://" + public + "/"); return err }, "plaintext"},
		{"client certificate from another CA", func() error { _, err := dialTLS(other.MustIssue("dc1", "a")); return err }, "unknown_ca"},
		{"expired client certificate", func() error { _, err := dialTLS(expired); return err }, "expired"},
		{"no client certificate", func() error { _, err := dialTLS(nil); return err }, "no_client_certificate"},
		{"TLS garbage", func() error {
			c, err := net.Dial("tcp", public)
			if err != nil {
				return err
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(5 * time.Second))
			c.Write([]byte{0x16, 0x03, 0x01, 0x00, 0x10, 'n', 'o', 't', ' ', 'a', ' ', 'h', 'e', 'l', 'l', 'o', '!', '!', '!', '!', '!'})
			got, _ := io.ReadAll(c) // a TLS alert at most, then the close
			if bytes.HasPrefix(got, []byte("HTTP/")) {
				return nil
			}
			return fmt.Errorf("refused (%d bytes back)", len(got))
		}, "tls_error"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if err := tc.try(); err == nil {
				t.Fatal("the connection was accepted")
			}
			line := bProxy.log.WaitFor(t, 2*time.Second, "reason="+tc.reason)
			if !strings.Contains(line, "remote=127.0.0.1:") {
				t.Errorf("log line does not name the peer: %s", line)
			}
			if n := bProxy.metric(t, "meshlet_sidecar_tls_handshakes_total", `side="inbound"`, `result="`+tc.reason+`"`); n < 1 {
				t.Errorf("no counter for reason %s", tc.reason)
			}
			// The listener goes on serving a, on a new connection too.
			fresh := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
			resp, err := fresh.Get(fmt.Sprintf("http://127.0.0.1:%d/", bindPort))
			if err != nil || resp.StatusCode != 200 {
				t.Errorf("a's request after the refusal: %v %v", resp, err)
			} else {
				resp.Body.Close()
			}
		})
	}
	t.Run("valid certificate of a service no rule allows", func(t *testing.T) {
		resp, err := dialTLS(ca.MustIssue("dc1", "intruder"))
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusForbidden || resp.Header.Get("X-Meshlet-Reason") != "authz_denied" ||
			resp.Header.Get("X-Meshlet-Authz-Rule") != "default deny" {
			t.Errorf("intruder got %s reason %q rule %q, want 403 authz_denied by the default deny",
				resp.Status, resp.Header.Get("X-Meshlet-Reason"), resp.Header.Get("X-Meshlet-Authz-Rule"))
		}
		line := bProxy.log.WaitFor(t, time.Second, "svc/intruder")
		if !strings.Contains(line, "authz: request denied") {
			t.Errorf("denial log line: %s", line)
		}
	})

	answers := load.finish()
	for _, a := range answers {
		if a.err != nil {
			t.Errorf("a's traffic failed while b's listener refused others: %v", a.err)
			break
		}
	}
	t.Logf("%d requests from a kept flowing", len(answers))
}

func TestCARotationUnderLoadLosesNothing(t *testing.T) {
	m := newMesh(t)
	m.writePolicy("b.yaml", serviceDefaults("b", "http"))
	m.startControlPlane("", "")
	aProxy, bProxy, _, bindPort, bSvc := twoServices(t, m)
	load := startLoad(fmt.Sprintf("http://127.0.0.1:%d/", bindPort))
	testutil.Until(t, 5*time.Second, "traffic", func() bool { return len(load.snapshot()) > 10 })

	start := time.Now()
	ca := useOwnCA(t, m) // `consul connect ca set-config` to a new key
	newRoot := ca.Cert
	newKeyID := hex.EncodeToString(newRoot.SubjectKeyId)
	signedByNew := func(p *proxy) bool {
		for _, c := range p.s.Certs() {
			if c.Secret == "default" && c.Kind == "certificate" {
				return c.AuthorityKeyID == newKeyID
			}
		}
		return false
	}
	testutil.Until(t, 90*time.Second, "both sidecars to hold leaves from the new CA", func() bool { return signedByNew(aProxy) && signedByNew(bProxy) })
	t.Logf("leaves rotated %v after the CA change", time.Since(start).Round(time.Second))
	time.Sleep(500 * time.Millisecond) // keep the load running on the new certificates
	answers := load.finish()
	failed := 0
	for _, a := range answers {
		if a.err != nil || a.status != 200 {
			failed++
		}
	}
	if failed > 0 {
		t.Errorf("%d of %d requests failed during the rotation", failed, len(answers))
	}
	t.Logf("%d requests during the rotation, %d failed", len(answers), failed)

	// A new handshake with b's sidecar now presents a chain from the new root.
	aLeaf, _, err := m.consul.Client.Agent().ConnectCALeaf("a", nil)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := tls.X509KeyPair([]byte(aLeaf.CertPEM), []byte(aLeaf.PrivateKeyPEM))
	if err != nil {
		t.Fatal(err)
	}
	conn, err := tls.Dial("tcp", hostPort(bSvc.sidecarPort), &tls.Config{InsecureSkipVerify: true, Certificates: []tls.Certificate{cert}, NextProtos: []string{"http/1.1"}})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	chain := conn.ConnectionState().PeerCertificates
	if chain[len(chain)-1].CheckSignatureFrom(newRoot) != nil && chain[0].CheckSignatureFrom(newRoot) != nil {
		t.Errorf("b's sidecar still presents a chain from the old root (issuer %s)", chain[0].Issuer)
	}
}

func TestPermissiveModeAndCertificateHealth(t *testing.T) {
	m := newMesh(t)
	m.writePolicy("b.yaml", "apiVersion: meshlet.io/v1alpha1\nkind: ServiceDefaults\nmetadata: {name: b}\nspec: {service: b, protocol: http, mtlsMode: permissive}\n")
	m.startControlPlane("", "")
	_, bProxy, _, bindPort, bSvc := twoServices(t, m)
	td := trustDomain(t, m)

	// Through the mesh: mTLS, with the caller's identity.
	var viaMesh answer
	testutil.Until(t, 5*time.Second, "a mesh request", func() bool {
		viaMesh = call(fmt.Sprintf("http://127.0.0.1:%d/", bindPort))
		return viaMesh.err == nil
	})
	if !strings.Contains(viaMesh.xfcc, "URI=spiffe://"+td+"/ns/default/dc/dc1/svc/a") {
		t.Errorf("mesh request xfcc %q", viaMesh.xfcc)
	}
	// Directly in plaintext: accepted in permissive mode, with no identity.
	direct := call("http://" + hostPort(bSvc.sidecarPort) + "/")
	if direct.err != nil || direct.instance != "b-1" || direct.xfcc != "" {
		t.Errorf("plaintext request in permissive mode: %+v", direct)
	}

	// Certificate health.
	resp, err := http.Get(bProxy.admin + "/certs")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if !bytes.Contains(body, []byte(`"spiffe_id": "spiffe://`+td+`/ns/default/dc/dc1/svc/b"`)) || bytes.Contains(body, []byte("PRIVATE KEY")) {
		t.Errorf("/certs:\n%s", body)
	}
	if left := bProxy.metric(t, "meshlet_sidecar_certificate_expiry_seconds", `secret="default"`); left < 3600 {
		t.Errorf("certificate expiry metric %v s, want a leaf valid for hours", left)
	}
	dump, err := http.Get(bProxy.admin + "/config_dump")
	if err != nil {
		t.Fatal(err)
	}
	db, _ := io.ReadAll(dump.Body)
	dump.Body.Close()
	if bytes.Contains(db, []byte("PRIVATE KEY")) || !bytes.Contains(db, []byte("[redacted]")) {
		t.Error("config_dump shows a private key or does not redact it")
	}
}
