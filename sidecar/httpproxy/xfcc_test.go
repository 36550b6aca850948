package httpproxy

import (
	"bufio"
	"cmp"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"slices"
	"sync"
	"testing"
	"time"

	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"

	"github.com/meshlet/meshlet/internal/testca"
	"github.com/meshlet/meshlet/sidecar/cluster"
	"github.com/meshlet/meshlet/sidecar/config"
	"github.com/meshlet/meshlet/xds"
)

// TestXFCC: x-forwarded-client-cert as Envoy's forward_client_cert_details
// asks, on both wires. Over mTLS with a client certificate whose URI SAN is
// a SPIFFE ID, SANITIZE_SET (with set_current_client_cert_details uri, as
// the inbound listener's mTLS chain has it) gives the upstream exactly
// "By=<this sidecar's ID>;Hash=<hex SHA-256 of the client's DER
// certificate>;URI=<the client's ID>", without uri no URI field; SANITIZE,
// and SANITIZE_SET without a client certificate (plaintext, the permissive
// chain), give it none. Whatever x-forwarded-client-cert the client sends
// (Envoy would append to it only under APPEND_FORWARD, which the sidecar
// does not accept) never reaches the upstream, on every request of a
// keep-alive connection.
func TestXFCC(t *testing.T) {
	ca, err := testca.New("11111111-2222-3333-4444-555555555555.consul")
	if err != nil {
		t.Fatal(err)
	}
	serverLeaf, clientLeaf := ca.MustIssue("dc1", "api"), ca.MustIssue("dc1", "web")
	serverCert, err := tls.X509KeyPair([]byte(serverLeaf.CertPEM), []byte(serverLeaf.KeyPEM))
	if err != nil {
		t.Fatal(err)
	}
	clientCert, err := tls.X509KeyPair([]byte(clientLeaf.CertPEM), []byte(clientLeaf.KeyPEM))
	if err != nil {
		t.Fatal(err)
	}
	block, _ := pem.Decode([]byte(clientLeaf.CertPEM))
	sum := sha256.Sum256(block.Bytes)
	hash := hex.EncodeToString(sum[:])
	roots := x509.NewCertPool()
	roots.AddCert(ca.Cert)
	serverTLS := &tls.Config{Certificates: []tls.Certificate{serverCert}, ClientAuth: tls.RequireAndVerifyClientCert, ClientCAs: roots, NextProtos: []string{"http/1.1"}}
	// The client checks the server's chain, not a host name: a SPIFFE
	// certificate has none (the sidecar's upstream side checks the ID).
	clientTLS := &tls.Config{Certificates: []tls.Certificate{clientCert}, RootCAs: roots, NextProtos: []string{"http/1.1"},
		InsecureSkipVerify: true, VerifyPeerCertificate: func(raw [][]byte, _ [][]*x509.Certificate) error {
			c, err := x509.ParseCertificate(raw[0])
			if err != nil {
				return err
			}
			_, err = c.Verify(x509.VerifyOptions{Roots: roots})
			return err
		}}

	var mu sync.Mutex
	var seen [][]string // each request's x-forwarded-client-cert values
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		seen = append(seen, r.Header.Values("X-Forwarded-Client-Cert"))
		mu.Unlock()
	}))
	t.Cleanup(up.Close)

	by := serverLeaf.SPIFFEID
	full := "By=" + by + ";Hash=" + hash + ";URI=" + clientLeaf.SPIFFEID
	tests := []struct {
		name    string
		mode    hcmv3.HttpConnectionManager_ForwardClientCertDetails
		uri     bool        // set_current_client_cert_details.uri
		client  *tls.Config // nil: plaintext
		want    []string    // what the upstream sees
		forged  string      // the client's own header lines
		localID string
		second  string // the second request's target; "": "/"
	}{
		{name: "SANITIZE_SET mTLS", mode: hcmv3.HttpConnectionManager_SANITIZE_SET, uri: true, client: clientTLS, localID: by, want: []string{full}},
		{name: "SANITIZE_SET mTLS forged", mode: hcmv3.HttpConnectionManager_SANITIZE_SET, uri: true, client: clientTLS, localID: by, want: []string{full},
			forged: "X-Forwarded-Client-Cert: By=spiffe://forged;URI=spiffe://admin\r\nx-forwarded-client-cert: Hash=00\r\n"},
		// A target the fast path does not serve hands the connection to
		// net/http after the first exchange: the peer goes with it.
		{name: "SANITIZE_SET mTLS handed to net/http", mode: hcmv3.HttpConnectionManager_SANITIZE_SET, uri: true, client: clientTLS, localID: by, want: []string{full},
			forged: "X-Forwarded-Client-Cert: By=spiffe://forged;URI=spiffe://admin\r\n", second: "/a%2Fb"},
		{name: "SANITIZE_SET mTLS without uri", mode: hcmv3.HttpConnectionManager_SANITIZE_SET, client: clientTLS, localID: by, want: []string{"By=" + by + ";Hash=" + hash},
			forged: "X-Forwarded-Client-Cert: URI=spiffe://admin\r\n"},
		{name: "SANITIZE_SET mTLS no local ID", mode: hcmv3.HttpConnectionManager_SANITIZE_SET, uri: true, client: clientTLS, want: []string{"Hash=" + hash + ";URI=" + clientLeaf.SPIFFEID}},
		{name: "SANITIZE_SET plaintext forged", mode: hcmv3.HttpConnectionManager_SANITIZE_SET, uri: true, localID: by,
			forged: "X-Forwarded-Client-Cert: By=spiffe://forged;URI=spiffe://admin\r\n"},
		{name: "SANITIZE mTLS forged", mode: hcmv3.HttpConnectionManager_SANITIZE, client: clientTLS, localID: by,
			forged: "X-Forwarded-Client-Cert: By=spiffe://forged;URI=spiffe://admin\r\n"},
	}
	for _, p := range paths {
		t.Run(p.name, func(t *testing.T) {
			for _, tc := range tests {
				t.Run(tc.name, func(t *testing.T) {
					mu.Lock()
					seen = nil
					mu.Unlock()
					var srvTLS *tls.Config
					if tc.client != nil {
						srvTLS = serverTLS
					}
					addr := startXFCCProxy(t, xfccChain(t, tc.mode, tc.uri), up.Listener.Addr().String(), srvTLS, tc.localID, p.netHTTPOnly)
					raw, err := net.Dial("tcp", addr)
					if err != nil {
						t.Fatal(err)
					}
					t.Cleanup(func() { raw.Close() })
					_ = raw.SetDeadline(time.Now().Add(5 * time.Second))
					c := raw
					if tc.client != nil {
						tlsc := tls.Client(raw, tc.client)
						if err := tlsc.Handshake(); err != nil {
							t.Fatalf("TLS handshake: %v", err)
						}
						c = tlsc
					}
					br := bufio.NewReader(c)
					targets := []string{"/", cmp.Or(tc.second, "/")} // the second on the kept-alive connection
					for _, target := range targets {
						write(t, c, "GET "+target+" HTTP/1.1\r\nHost: api.internal\r\n"+tc.forged+"\r\n")
						if resp, body := readResp(t, br, http.MethodGet); resp.StatusCode != 200 {
							t.Fatalf("got %d %s=%q %q", resp.StatusCode, ReasonHeader, resp.Header.Get(ReasonHeader), body)
						}
					}
					mu.Lock()
					defer mu.Unlock()
					if len(seen) != len(targets) {
						t.Fatalf("upstream saw %d requests, want %d", len(seen), len(targets))
					}
					for i, got := range seen {
						if !slices.Equal(got, tc.want) {
							t.Errorf("request %d: upstream saw x-forwarded-client-cert %q, want %q", i, got, tc.want)
						}
					}
				})
			}
		})
	}
}

// xfccChain returns the HTTP connection manager of a listener with
// forward_client_cert_details mode (and set_current_client_cert_details
// uri when uri) routing everything to cluster "c", decoded as the xDS
// client decodes it.
func xfccChain(t *testing.T, mode hcmv3.HttpConnectionManager_ForwardClientCertDetails, uri bool) *config.HTTPConnectionManager {
	t.Helper()
	return decodeHCM(t, func(m *hcmv3.HttpConnectionManager) {
		m.ForwardClientCertDetails = mode
		if uri {
			m.SetCurrentClientCertDetails = &hcmv3.HttpConnectionManager_SetCurrentClientCertDetails{Uri: true}
		}
	})
}

// startXFCCProxy runs a Server of chain hc, whose cluster "c" is endpoint,
// with this sidecar's SPIFFE ID localID ("": unknown). With srvTLS it
// terminates TLS first, as the sidecar's inbound listener does (the
// handshake done before Handle); otherwise connections are plaintext. It
// returns the Server's address.
func startXFCCProxy(t *testing.T, hc *config.HTTPConnectionManager, endpoint string, srvTLS *tls.Config, localID string, netHTTPOnly bool) string {
	t.Helper()
	clusters := cluster.NewManager(nil, nil, nil)
	t.Cleanup(clusters.Close)
	clusters.Update(map[string]*config.Cluster{
		"c": {Name: "c", Type: config.ClusterStatic, ConnectTimeout: time.Second, Protocol: xds.ProtocolHTTP,
			Static: &config.LoadAssignment{ClusterName: "c", Endpoints: []config.Endpoint{{Address: endpoint, Weight: 1}}}},
	}, nil)
	l := &config.Listener{Name: "l", Chains: []*config.FilterChain{{HTTP: hc}}}
	o := Options{Secure: srvTLS != nil, NetHTTPOnly: netHTTPOnly}
	if localID != "" {
		o.LocalID = func() string { return localID }
	}
	return serveTLS(t, NewServer(l, &config.Snapshot{}, clusters, slog.New(slog.DiscardHandler), o), srvTLS)
}
