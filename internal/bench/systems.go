package bench

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
)

// kind is the kind of traffic a workload sends, which picks the app and
// how each proxy is configured for it.
type kind int

const (
	kindHTTP  kind = iota // HTTP/1.1 to the nginx app
	kindGRPC              // gRPC (h2c) to the interop TestService
	kindRedis             // opaque TCP to redis-server
	kindConn              // opaque TCP to the nginx app, one connection per request
	kindTLS               // mTLS terminated by the proxy, then TCP to the nginx app
)

// System names, in the order they run within a round.
const (
	sysDirect    = "direct"
	sysSidecar   = "sidecar"
	sysPairMTLS  = "pair-mtls"
	sysPairPlain = "pair-plain"
	sysHAProxy   = "haproxy"
	sysNginx     = "nginx"
)

// systemTitles explain the systems in the table's legend.
var systemTitles = map[string]string{
	sysDirect:    "load generator straight to the app",
	sysSidecar:   "one meshlet sidecar (the client's outbound listener, plaintext to the app; mTLS-terminating inbound listener for mtls-handshake)",
	sysPairMTLS:  "two meshlet sidecars, mTLS between them (client's outbound → app's inbound with RBAC), the real mesh path",
	sysPairPlain: "two meshlet sidecars, plaintext between them (permissive inbound)",
	sysHAProxy:   "HAProxy 2.6, nbthread 1, http-reuse always",
	sysNginx:     "nginx 1.22, 1 worker, upstream keepalive",
}

// running is a system started for one run.
type running struct {
	target hostPort
	procs  []*proc // on the proxy CPU; measured
	admin  string  // a meshlet sidecar's admin URL (the single one), for profiles
}

func (r *running) stop() {
	for _, p := range r.procs {
		p.stop(5 * time.Second)
	}
}

// startSystem starts sys for traffic of kind k in dir and waits until a
// request goes through it.
func (h *harness) startSystem(ctx context.Context, sys string, k kind, dir string) (*running, error) {
	r := &running{}
	var err error
	switch sys {
	case sysDirect:
		r.target = h.apps[k]
	case sysSidecar:
		if k == kindTLS {
			// The app's sidecar terminating mTLS: the inbound half of a pair.
			err = h.startSidecars(r, dir, nodePairUp("conn"))
			r.target = loopback(h.mesh.ports.pairPublic["conn"])
		} else {
			err = h.startSidecars(r, dir, nodeSingle)
			r.target = loopback(h.mesh.ports.singleOut[serviceOf(k)])
		}
		if err == nil {
			r.admin = "http://" + h.adminAddr[r.procs[0].name]
		}
	case sysPairMTLS:
		err = h.startSidecars(r, dir, nodePairDown, nodePairUp(serviceOf(k)))
		r.target = loopback(h.mesh.ports.pairOut[serviceOf(k)])
	case sysPairPlain:
		err = h.startSidecars(r, dir, nodePlainDown, nodePlainUp(serviceOf(k)))
		r.target = loopback(h.mesh.ports.plainOut[serviceOf(k)])
	case sysHAProxy:
		r.target = loopback(h.proxyPorts[sysHAProxy])
		cfg := filepath.Join(dir, "haproxy.cfg")
		if err = os.WriteFile(cfg, []byte(haproxyConf(k, r.target.port, h.apps[k], h.tlsFiles)), 0o644); err == nil {
			var p *proc
			p, err = startProc(procSpec{name: "haproxy", cpu: h.cfg.ProxyCPU, bin: h.cfg.Tools.HAProxy, args: []string{"-db", "-f", cfg}, dir: dir})
			if err == nil {
				r.procs = append(r.procs, p)
				err = waitListening(ctx, r.target.String(), 10*time.Second, p)
			}
		}
	case sysNginx:
		r.target = loopback(h.proxyPorts[sysNginx])
		cfg := filepath.Join(dir, "nginx.conf")
		if err = os.WriteFile(cfg, []byte(nginxConf(dir, k, r.target.port, h.apps[k], h.tlsFiles)), 0o644); err == nil {
			var p *proc
			p, err = startProc(procSpec{name: "nginx", cpu: h.cfg.ProxyCPU, bin: h.cfg.Tools.Nginx, args: []string{"-e", "stderr", "-p", dir, "-c", cfg}, dir: dir})
			if err == nil {
				r.procs = append(r.procs, p)
				err = waitListening(ctx, r.target.String(), 10*time.Second, p)
			}
		}
	default:
		err = fmt.Errorf("bench: unknown system %q", sys)
	}
	if err == nil {
		err = h.waitProbe(ctx, r, k, 20*time.Second)
	}
	if err != nil {
		r.stop()
		return nil, err
	}
	return r, nil
}

func serviceOf(k kind) string {
	if k == kindTLS {
		return "conn"
	}
	for _, s := range meshServices {
		if s.kind == k {
			return s.name
		}
	}
	panic("bench: no service for kind")
}

// startSidecars starts bin/sidecar for each node, pinned to the proxy CPU
// with GOMAXPROCS=1, and waits for their admin /ready.
func (h *harness) startSidecars(r *running, dir string, nodes ...string) error {
	for _, node := range nodes {
		// The data path is measured: xDS comes from the harness's own
		// plaintext xdstest server.
		args := []string{"-node-id", node, "-xds-addr", h.mesh.srv.Addr, "-xds-insecure", "-admin-addr", h.adminAddr[node], "-drain-timeout", "1s"}
		if h.cfg.PprofDir != "" {
			args = append(args, "-admin-pprof")
		}
		p, err := startProc(procSpec{name: node, cpu: h.cfg.ProxyCPU, env: []string{"GOMAXPROCS=1"}, bin: h.cfg.Tools.Sidecar, args: args, dir: dir})
		if err != nil {
			return err
		}
		r.procs = append(r.procs, p)
	}
	for _, p := range r.procs {
		deadline := time.Now().Add(15 * time.Second)
		for {
			resp, err := http.Get("http://" + h.adminAddr[p.name] + "/ready")
			if err == nil {
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if resp.StatusCode == http.StatusOK {
					break
				}
			}
			if err := p.exited(); err != nil {
				return err
			}
			if time.Now().After(deadline) {
				return fmt.Errorf("bench: sidecar %s not ready after 15s; warnings:\n%s\nlog tail:\n%s", p.name, grepLog(p.log.Name(), "level=WARN", "level=ERROR"), tail(p.log.Name(), 5))
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	return nil
}

// waitProbe retries one request of kind k through r until it succeeds: the
// system is configured end to end (for a pair: endpoints and the intention
// reached the sidecars).
func (h *harness) waitProbe(ctx context.Context, r *running, k kind, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		err := h.probe(ctx, r.target, k)
		if err == nil {
			return nil
		}
		for _, p := range r.procs {
			if e := p.exited(); e != nil {
				return e
			}
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return fmt.Errorf("bench: no answer through %s: %w", r.target, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func (h *harness) probe(ctx context.Context, addr hostPort, k kind) error {
	ctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	switch k {
	case kindHTTP, kindConn:
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+addr.String()+"/", nil)
		req.Close = k == kindConn
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		if resp.StatusCode != http.StatusOK || len(b) != bodySize {
			return fmt.Errorf("status %d, %d bytes, reason %q", resp.StatusCode, len(b), resp.Header.Get("X-Meshlet-Reason"))
		}
		return nil
	case kindGRPC:
		cc, err := grpc.NewClient(addr.String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			return err
		}
		defer cc.Close()
		resp, err := testgrpc.NewTestServiceClient(cc).UnaryCall(ctx, &testgrpc.SimpleRequest{ResponseSize: bodySize})
		if err != nil {
			return err
		}
		if n := len(resp.GetPayload().GetBody()); n != bodySize {
			return fmt.Errorf("gRPC payload of %d bytes", n)
		}
		return nil
	case kindRedis:
		var d net.Dialer
		c, err := d.DialContext(ctx, "tcp", addr.String())
		if err != nil {
			return err
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(3 * time.Second))
		if _, err := io.WriteString(c, "GET "+redisKey+"\r\n"); err != nil {
			return err
		}
		line, err := bufio.NewReader(c).ReadString('\n')
		if err != nil {
			return err
		}
		if want := fmt.Sprintf("$%d\r\n", bodySize); line != want {
			return fmt.Errorf("redis answered %q, want %q", line, want)
		}
		return nil
	case kindTLS:
		return tlsOnce(h.tlsClient(addr), make([]byte, 4096))
	}
	return errors.New("bench: probe: unknown kind")
}

// redisKey is the key redis-benchmark's GET reads when not told to
// randomise (-r): the harness stores a 1 KiB value under it.
const redisKey = "key:__rand_int__"

// httpCloseRequest is what the mTLS client sends on each connection.
const httpCloseRequest = "GET / HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n"

// tlsClient is the mTLS client of the handshake workload: the client
// service's certificate, the app's SPIFFE certificate checked against the
// mesh root (as a sidecar checks it), X25519 key exchange for every server
// (OpenSSL 3.0 in HAProxy and nginx has no X25519MLKEM768, which Go would
// otherwise prefer with a Go server), TLS 1.3, no session resumption.
func (h *harness) tlsClient(addr hostPort) tlsClientOptions {
	cert, err := tls.X509KeyPair([]byte(h.mesh.clientLeaf.CertPEM), []byte(h.mesh.clientLeaf.KeyPEM))
	if err != nil {
		panic(fmt.Sprintf("bench: client certificate: %v", err)) // testca output is always valid
	}
	roots := x509.NewCertPool()
	roots.AddCert(h.mesh.ca.Cert)
	want := h.mesh.ca.SPIFFEID("dc1", "conn")
	cfg := &tls.Config{
		MinVersion:             tls.VersionTLS13,
		Certificates:           []tls.Certificate{cert},
		CurvePreferences:       []tls.CurveID{tls.X25519},
		SessionTicketsDisabled: true,
		InsecureSkipVerify:     true, // verified below, SPIFFE style
		VerifyConnection: func(cs tls.ConnectionState) error {
			if len(cs.PeerCertificates) == 0 {
				return errors.New("no server certificate")
			}
			leaf := cs.PeerCertificates[0]
			inter := x509.NewCertPool()
			for _, c := range cs.PeerCertificates[1:] {
				inter.AddCert(c)
			}
			if _, err := leaf.Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}); err != nil {
				return err
			}
			if len(leaf.URIs) != 1 || leaf.URIs[0].String() != want {
				return fmt.Errorf("server is %v, want %s", leaf.URIs, want)
			}
			return nil
		},
	}
	return tlsClientOptions{Addr: addr.String(), Config: cfg, Request: []byte(httpCloseRequest), MinBody: bodySize}
}

// isSidecar reports whether a process is a meshlet sidecar.
func isSidecar(name string) bool {
	return name == nodeSingle || strings.HasPrefix(name, "pair-") || strings.HasPrefix(name, "plain-")
}
