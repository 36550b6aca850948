package e2e

import (
	"context"
	"io"
	"net"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/meshlet/meshlet/controlplane/model"
	"github.com/meshlet/meshlet/controlplane/policy"
	"github.com/meshlet/meshlet/controlplane/translate"
	"github.com/meshlet/meshlet/internal/testca"
	"github.com/meshlet/meshlet/internal/testlog"
	"github.com/meshlet/meshlet/internal/testutil"
	"github.com/meshlet/meshlet/sidecar"
	"github.com/meshlet/meshlet/sidecar/xdsclient"
	"github.com/meshlet/meshlet/xds/xdstest"
)

// pair runs a's and b's sidecars (config from the translator, served by a
// go-control-plane server) in front of an app answering 1 KiB; it returns
// the URL of a's outbound listener for b.
func pair(b *testing.B, mtls bool) string {
	b.Helper()
	payload := strings.Repeat("x", 1024)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	app := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { io.WriteString(w, payload) })}
	go app.Serve(l)
	b.Cleanup(func() { app.Close() })
	appPort := l.Addr().(*net.TCPAddr).Port

	docs := "apiVersion: meshlet.io/v1alpha1\nkind: ServiceDefaults\nmetadata: {name: b}\nspec: {service: b, protocol: http}\n"
	if !mtls {
		docs += "---\napiVersion: meshlet.io/v1alpha1\nkind: MeshDefaults\nmetadata: {name: mesh}\nspec: {mtls: {mode: permissive}}\n"
	}
	pol, err := policy.Parse(map[string][]byte{"bench.yaml": []byte(docs)})
	if err != nil {
		b.Fatal(err)
	}
	ports, err := freePortsB(4)
	if err != nil {
		b.Fatal(err)
	}
	cat := model.NewCatalog(map[string]*model.Service{"b": {Name: "b"}}, map[string]*model.Proxy{
		"a": {ID: "a", Service: "a", Address: "127.0.0.1", Port: ports[0], LocalAppAddress: "127.0.0.1", LocalAppPort: 1,
			Upstreams: []model.Upstream{{Service: "b", BindAddress: "127.0.0.1", BindPort: ports[1]}}, Healthy: true},
		"b": {ID: "b", Service: "b", Address: "127.0.0.1", Port: ports[2], LocalAppAddress: "127.0.0.1", LocalAppPort: appPort, Healthy: true, Weight: 1},
	})
	ca, err := testca.New("bench.consul")
	if err != nil {
		b.Fatal(err)
	}
	cat.CA = &model.CA{TrustDomain: ca.TrustDomain, Roots: []model.Root{{ID: "r", CertPEM: ca.CertPEM, Active: true}}}
	for _, s := range []string{"a", "b"} {
		leaf := ca.MustIssue("dc1", s)
		cat.Leaves[s] = &model.Leaf{Service: s, CertPEM: leaf.CertPEM, KeyPEM: leaf.KeyPEM, SPIFFEID: leaf.SPIFFEID}
	}
	cat.Intentions["b"] = &model.Intentions{Destination: "b", Sources: []model.IntentionSource{{Name: "a", Action: "allow", Origin: "a => b"}}}
	srv := xdstest.Start(b)
	for _, node := range []string{"a", "b"} {
		res, err := translate.Proxy(cat, pol, cat.Proxies[node])
		if err != nil {
			b.Fatal(err)
		}
		if !mtls {
			for _, c := range res.Clusters {
				c.TransportSocket = nil // plaintext to b's permissive listener
			}
		}
		r := served(res)
		srv.Set(b, node, "v1", r)
		logger, _ := testlog.New(b, node)
		// xDS from the benchmark's own plaintext xdstest server.
		s, err := sidecar.New(sidecar.Config{NodeID: node, XDSAddress: srv.Addr, XDSCredentials: xdsclient.Credentials{Insecure: true},
			AdminAddress: "127.0.0.1:0", Logger: logger})
		if err != nil {
			b.Fatal(err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan struct{})
		go func() { defer close(done); _ = s.Run(ctx) }()
		b.Cleanup(func() { cancel(); <-done })
		testutil.Until(b, 5*time.Second, node+" ready", s.IsReady)
	}
	return "http://127.0.0.1:" + strconv.Itoa(ports[1]) + "/"
}

func freePortsB(n int) ([]int, error) {
	var ls []net.Listener
	defer func() {
		for _, l := range ls {
			l.Close()
		}
	}()
	var out []int
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, err
		}
		ls = append(ls, l)
		out = append(out, l.Addr().(*net.TCPAddr).Port)
	}
	return out, nil
}

// BenchmarkSidecarPair measures keep-alive HTTP/1.1 requests (1 KiB
// answers) through a pair of sidecars, a's outbound then b's inbound, with
// mTLS between them or plaintext, everything in this process on loopback. It
// reports requests per second and the p99 latency; compare the two cases as
// a ratio.
func BenchmarkSidecarPair(b *testing.B) {
	for _, mode := range []string{"plaintext", "mtls"} {
		b.Run(mode, func(b *testing.B) {
			url := pair(b, mode == "mtls")
			client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 8}}
			get := func() {
				resp, err := client.Get(url)
				if err != nil {
					b.Fatal(err)
				}
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if resp.StatusCode != 200 {
					b.Fatalf("status %d", resp.StatusCode)
				}
			}
			for range 100 {
				get() // warm pools and sessions
			}
			lat := make([]time.Duration, 0, b.N)
			b.ReportAllocs()
			b.ResetTimer()
			start := time.Now()
			for range b.N {
				t0 := time.Now()
				get()
				lat = append(lat, time.Since(t0))
			}
			elapsed := time.Since(start)
			b.StopTimer()
			slices.Sort(lat)
			b.ReportMetric(float64(b.N)/elapsed.Seconds(), "req/s")
			b.ReportMetric(float64(lat[len(lat)*99/100].Microseconds()), "p99-µs")
		})
	}
}
