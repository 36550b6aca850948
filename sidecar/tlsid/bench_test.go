package tlsid

import (
	"crypto/tls"
	"net"
	"testing"
	"time"

	"github.com/meshlet/meshlet/controlplane/xdsbuild"
	"github.com/meshlet/meshlet/internal/testca"
	"github.com/meshlet/meshlet/sidecar/config"
	"github.com/meshlet/meshlet/xds"
)

func storeWith(tb testing.TB, ca *testca.CA, service string) *Store {
	tb.Helper()
	leaf := ca.MustIssue("dc1", service)
	certSec, err := config.DecodeSecret(xds.MustAny(xdsbuild.NewCertSecret(leaf.CertPEM, leaf.KeyPEM)))
	if err != nil {
		tb.Fatal(err)
	}
	roots, err := config.DecodeSecret(xds.MustAny(xdsbuild.NewRootsSecret([]string{ca.CertPEM})))
	if err != nil {
		tb.Fatal(err)
	}
	s := NewStore()
	s.Set(map[string]*config.Secret{xds.SecretCert: certSec, xds.SecretRoots: roots})
	return s
}

// BenchmarkHandshake measures one mutual TLS 1.3 handshake between a
// sidecar's client and server configs (both ends in this process, ECDSA
// P-256 SVIDs, SPIFFE verification on both sides): "full" without session
// resumption, "resumed" with it. Run with -cpu 1 for handshakes per core.
func BenchmarkHandshake(b *testing.B) {
	ca, err := testca.New("bench.consul")
	if err != nil {
		b.Fatal(err)
	}
	server := storeWith(b, ca, "api").ServerConfig(&config.DownstreamTLS{CertSecret: xds.SecretCert, RootsSecret: xds.SecretRoots,
		RequireClientCert: true, MinVersion: tls.VersionTLS13, MaxVersion: tls.VersionTLS13})
	for _, mode := range []string{"full", "resumed"} {
		b.Run(mode, func(b *testing.B) {
			client := storeWith(b, ca, "web").ClientConfig(&config.UpstreamTLS{CertSecret: xds.SecretCert, RootsSecret: xds.SecretRoots,
				SANs: []string{ca.SPIFFEID("dc1", "api")}, MinVersion: tls.VersionTLS13, MaxVersion: tls.VersionTLS13})
			if mode == "full" {
				client.ClientSessionCache = nil
			}
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				b.Fatal(err)
			}
			defer ln.Close()
			resumed := 0
			handshake := func() {
				done := make(chan error, 1)
				go func() {
					s, err := ln.Accept()
					if err != nil {
						done <- err
						return
					}
					defer s.Close()
					st := tls.Server(s, server)
					if err = st.Handshake(); err == nil {
						// TLS 1.3 sends tickets after the handshake; this byte
						// makes the client read them.
						_, err = st.Write([]byte{1})
					}
					done <- err
				}()
				c, err := net.Dial("tcp", ln.Addr().String())
				if err != nil {
					b.Fatal(err)
				}
				defer c.Close()
				ct := tls.Client(c, client)
				if err := ct.Handshake(); err != nil {
					b.Fatal(err)
				}
				ct.SetReadDeadline(time.Now().Add(5 * time.Second))
				if _, err := ct.Read(make([]byte, 1)); err != nil {
					b.Fatal(err)
				}
				if err := <-done; err != nil {
					b.Fatal(err)
				}
				if ct.ConnectionState().DidResume {
					resumed++
				}
			}
			handshake() // prime the session cache
			resumed = 0
			b.ResetTimer()
			for range b.N {
				handshake()
			}
			b.StopTimer()
			if want := mode == "resumed"; (resumed == b.N) != want {
				b.Fatalf("%d of %d handshakes resumed in %s mode", resumed, b.N, mode)
			}
		})
	}
}
