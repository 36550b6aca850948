package tlsid

import (
	"crypto/tls"
	"crypto/x509"
	"net"
	"testing"
	"time"

	"github.com/meshlet/meshlet/internal/testca"
	"github.com/meshlet/meshlet/sidecar/config"
	"github.com/meshlet/meshlet/xds"
)

// handshake runs a client with clientStore's certificate requiring want
// against a server with serverStore's, returning the client's and the
// server's errors.
func handshake(t *testing.T, clientStore, serverStore *Store, want string) (error, error) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	srvErr := make(chan error, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			srvErr <- err
			return
		}
		defer c.Close()
		st := tls.Server(c, serverStore.ServerConfig(&config.DownstreamTLS{CertSecret: xds.SecretCert, RootsSecret: xds.SecretRoots,
			RequireClientCert: true, MinVersion: tls.VersionTLS13, MaxVersion: tls.VersionTLS13}))
		st.SetDeadline(time.Now().Add(5 * time.Second))
		err = st.Handshake()
		if err == nil {
			_, err = st.Read(make([]byte, 1))
		}
		srvErr <- err
	}()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ct := tls.Client(c, clientStore.ClientConfig(&config.UpstreamTLS{CertSecret: xds.SecretCert, RootsSecret: xds.SecretRoots,
		SANs: []string{want}, MinVersion: tls.VersionTLS13, MaxVersion: tls.VersionTLS13}))
	ct.SetDeadline(time.Now().Add(5 * time.Second))
	cerr := ct.Handshake()
	if cerr == nil {
		_, cerr = ct.Write([]byte{1})
	}
	c.Close()
	return cerr, <-srvErr
}

func TestVerificationAndReasons(t *testing.T) {
	ca, _ := testca.New("td.consul")
	other, _ := testca.New("td.consul")
	web, api := storeWith(t, ca, "web"), storeWith(t, ca, "api")

	if cerr, serr := handshake(t, web, api, ca.SPIFFEID("dc1", "api")); cerr != nil || serr != nil {
		t.Fatalf("valid pair: client %v, server %v", cerr, serr)
	}
	t.Run("the upstream is another service", func(t *testing.T) {
		cerr, _ := handshake(t, web, storeWith(t, ca, "payments"), ca.SPIFFEID("dc1", "api"))
		if cerr == nil || Reason(cerr) != ReasonWrongID {
			t.Errorf("client error %v (reason %s), want %s", cerr, Reason(cerr), ReasonWrongID)
		}
	})
	t.Run("the upstream's CA is not trusted", func(t *testing.T) {
		cerr, _ := handshake(t, web, storeWith(t, other, "api"), ca.SPIFFEID("dc1", "api"))
		if cerr == nil || Reason(cerr) != ReasonUnknownCA {
			t.Errorf("client error %v (reason %s), want %s", cerr, Reason(cerr), ReasonUnknownCA)
		}
	})
	t.Run("rotated roots apply to the next handshake", func(t *testing.T) {
		// api's server now holds a certificate from the other CA; once the
		// client's bundle trusts both roots, the next handshake succeeds.
		rotated := storeWith(t, other, "api")
		both := config.Secret{Name: xds.SecretRoots, Roots: append(append([]*x509.Certificate(nil), web.Get(xds.SecretRoots).Roots...), rotated.Get(xds.SecretRoots).Roots...)}
		m := map[string]*config.Secret{xds.SecretCert: web.Get(xds.SecretCert), xds.SecretRoots: &both}
		web.Set(m)
		srv := map[string]*config.Secret{xds.SecretCert: rotated.Get(xds.SecretCert), xds.SecretRoots: &both}
		rotated.Set(srv)
		if cerr, serr := handshake(t, web, rotated, ca.SPIFFEID("dc1", "api")); cerr != nil || serr != nil {
			t.Errorf("after the bundle update: client %v, server %v", cerr, serr)
		}
	})
}
