package xdsclient

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"os"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/meshlet/meshlet/xds"
)

// Credentials say how the client verifies the control plane and proves
// who it is: TLS verified against CAFile, and the bearer token of
// TokenFile on every stream (xds.AuthorizationMetadataKey). Insecure
// instead dials in plaintext and sends no token, for development only.
type Credentials struct {
	// CAFile is a PEM bundle the control plane's serving certificate must
	// chain to (on Kubernetes xds.PodCAFile, the CA root ConfigMap
	// injection mounts; outside, the control plane's ca.crt). It is read
	// again when it changes, checked at each handshake.
	CAFile string
	// ServerName is the name the certificate must carry; the host of the
	// server address when empty (a DNS name or an IP address SAN).
	ServerName string
	// TokenFile holds the token (a Kubernetes projected ServiceAccount
	// token of audience xds.TokenAudience, or a Consul ACL token's
	// secret). It is read at the start of every stream, so a token the
	// kubelet rotates is used from the next stream on.
	TokenFile string
	// Insecure dials without TLS and without a token (the control plane
	// must run with -xds-insecure too).
	Insecure bool
}

// Validate reports incomplete credentials: CAFile and TokenFile are both
// required unless Insecure, and unset when it is.
func (c Credentials) Validate() error {
	if c.Insecure {
		if c.CAFile != "" || c.TokenFile != "" {
			return errors.New("xdsclient: -xds-insecure sends no token and verifies no certificate: drop -xds-ca-file and -token-file, or -xds-insecure")
		}
		return nil
	}
	switch {
	case c.CAFile == "" && c.TokenFile == "":
		return errors.New("xdsclient: ADS runs over TLS with a token: set -xds-ca-file (the CA bundle of the control plane's certificate) and -token-file (a projected ServiceAccount token of audience " + xds.TokenAudience + ", or a Consul ACL token); -xds-insecure dials in plaintext for development")
	case c.CAFile == "":
		return errors.New("xdsclient: -xds-ca-file is required: the CA bundle the control plane's serving certificate chains to")
	case c.TokenFile == "":
		return errors.New("xdsclient: -token-file is required: a projected ServiceAccount token of audience " + xds.TokenAudience + ", or a Consul ACL token")
	}
	return nil
}

// DialOptions returns the gRPC dial options for c. Errors: the CA file
// cannot be read or holds no certificate, the token file cannot be read
// or is empty.
func (c Credentials) DialOptions() ([]grpc.DialOption, error) {
	if err := c.Validate(); err != nil {
		return nil, err
	}
	if c.Insecure {
		return []grpc.DialOption{grpc.WithTransportCredentials(insecure.NewCredentials())}, nil
	}
	roots := &caFile{path: c.CAFile}
	if _, err := roots.pool(); err != nil {
		return nil, err
	}
	tok := TokenFile(c.TokenFile)
	if _, err := tok.read(); err != nil {
		return nil, err
	}
	return []grpc.DialOption{
		grpc.WithTransportCredentials(&tlsCreds{TransportCredentials: credentials.NewTLS(roots.tlsConfig(c.ServerName)), ca: roots, serverName: c.ServerName}),
		grpc.WithPerRPCCredentials(tok),
	}, nil
}

// TokenFile is gRPC per-RPC credentials carrying the token in the file
// as "authorization: Bearer <token>", read at every stream's start.
type TokenFile string

var _ credentials.PerRPCCredentials = TokenFile("")

// GetRequestMetadata implements credentials.PerRPCCredentials.
func (t TokenFile) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	tok, err := t.read()
	if err != nil {
		return nil, err
	}
	return map[string]string{xds.AuthorizationMetadataKey: xds.BearerPrefix + tok}, nil
}

// RequireTransportSecurity implements credentials.PerRPCCredentials: a
// token is never sent in plaintext.
func (TokenFile) RequireTransportSecurity() bool { return true }

func (t TokenFile) read() (string, error) {
	b, err := os.ReadFile(string(t))
	if err != nil {
		return "", fmt.Errorf("xdsclient: token file: %w", err)
	}
	tok := strings.TrimSpace(string(b))
	if tok == "" {
		return "", fmt.Errorf("xdsclient: token file %s is empty", t)
	}
	return tok, nil
}

// caFile is a CA bundle read again when its modification time or size
// changes.
type caFile struct {
	path string

	mu      sync.Mutex // guards the fields below
	roots   *x509.CertPool
	modTime time.Time
	size    int64
}

func (f *caFile) pool() (*x509.CertPool, error) {
	st, err := os.Stat(f.path)
	f.mu.Lock()
	defer f.mu.Unlock()
	if err != nil {
		if f.roots != nil {
			return f.roots, nil // a ConfigMap update in flight: keep the last good bundle
		}
		return nil, fmt.Errorf("xdsclient: CA file: %w", err)
	}
	if f.roots != nil && st.ModTime().Equal(f.modTime) && st.Size() == f.size {
		return f.roots, nil
	}
	b, err := os.ReadFile(f.path)
	if err != nil {
		if f.roots != nil {
			return f.roots, nil
		}
		return nil, fmt.Errorf("xdsclient: CA file: %w", err)
	}
	p := x509.NewCertPool()
	if !p.AppendCertsFromPEM(b) {
		if f.roots != nil {
			return f.roots, nil
		}
		return nil, fmt.Errorf("xdsclient: CA file %s holds no PEM certificate", f.path)
	}
	f.roots, f.modTime, f.size = p, st.ModTime(), st.Size()
	return p, nil
}

// tlsCreds is TLS whose handshake verifies the server against the CA
// bundle of the moment and the name dialled (or ServerName).
type tlsCreds struct {
	credentials.TransportCredentials
	ca         *caFile
	serverName string
}

// ClientHandshake implements credentials.TransportCredentials.
func (t *tlsCreds) ClientHandshake(ctx context.Context, authority string, conn net.Conn) (net.Conn, credentials.AuthInfo, error) {
	name := t.serverName
	if name == "" {
		name = authority
		if h, _, err := net.SplitHostPort(authority); err == nil {
			name = h
		}
	}
	return credentials.NewTLS(t.ca.tlsConfig(name)).ClientHandshake(ctx, authority, conn)
}

// Clone implements credentials.TransportCredentials.
func (t *tlsCreds) Clone() credentials.TransportCredentials {
	return &tlsCreds{TransportCredentials: t.TransportCredentials.Clone(), ca: t.ca, serverName: t.serverName}
}

// tlsConfig verifies the server's chain against the current bundle and
// its certificate against name (a DNS name or an IP address SAN), TLS
// 1.2 or later. Go's own verification is replaced only to read the bundle
// at each handshake.
func (f *caFile) tlsConfig(name string) *tls.Config {
	return &tls.Config{
		MinVersion:         tls.VersionTLS12,
		ServerName:         name,
		InsecureSkipVerify: true, // verified below, against the bundle of the moment
		VerifyConnection: func(cs tls.ConnectionState) error {
			if len(cs.PeerCertificates) == 0 {
				return errors.New("xdsclient: the control plane presented no certificate")
			}
			roots, err := f.pool()
			if err != nil {
				return err
			}
			inter := x509.NewCertPool()
			for _, c := range cs.PeerCertificates[1:] {
				inter.AddCert(c)
			}
			leaf := cs.PeerCertificates[0]
			if _, err := leaf.Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, DNSName: name}); err != nil {
				return fmt.Errorf("xdsclient: the control plane's certificate (subject %q) does not verify against %s for %q: %w", leaf.Subject.CommonName, f.path, name, err)
			}
			return nil
		},
	}
}
