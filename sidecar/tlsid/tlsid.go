// Package tlsid is the sidecar's mTLS: it keeps the SDS secrets (the
// workload's X.509 SVID and the trust bundle), builds crypto/tls configs
// that read them at each handshake (so a rotated certificate or bundle
// takes effect for new handshakes without touching live connections),
// verifies peers as SPIFFE identities with go-spiffe, and names the reason
// a handshake failed.
package tlsid

import (
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"slices"
	"strings"
	"sync/atomic"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/meshlet/meshlet/sidecar/config"
)

// Store holds the accepted secrets. Reads are lock-free.
type Store struct {
	secrets atomic.Pointer[map[string]*config.Secret]
}

// NewStore returns an empty Store.
func NewStore() *Store {
	s := &Store{}
	empty := map[string]*config.Secret{}
	s.secrets.Store(&empty)
	return s
}

// Set replaces the secrets (the map must not be modified afterwards).
func (s *Store) Set(m map[string]*config.Secret) { s.secrets.Store(&m) }

// Get returns the secret name, or nil.
func (s *Store) Get(name string) *config.Secret { return (*s.secrets.Load())[name] }

// All returns every secret by name (do not modify).
func (s *Store) All() map[string]*config.Secret { return *s.secrets.Load() }

// Errors a handshake can fail with.
var (
	// ErrNoCertificate: the secret to present is missing.
	ErrNoCertificate = errors.New("tlsid: no certificate to present (secret missing)")
	// ErrNoBundle: the trust bundle secret is missing.
	ErrNoBundle = errors.New("tlsid: no trust bundle (secret missing)")
	// ErrNoPeerCertificate: the peer presented no certificate.
	ErrNoPeerCertificate = errors.New("tlsid: peer presented no certificate")
)

// WrongIDError is a peer whose SPIFFE ID is not the one required.
type WrongIDError struct {
	Got  string
	Want []string
}

func (e *WrongIDError) Error() string {
	return fmt.Sprintf("tlsid: peer is %s, want %s", e.Got, strings.Join(e.Want, " or "))
}

// Verify checks a peer chain against the trust bundle secret roots: a valid
// X.509 SVID chaining to a root, not expired, and, when sans is set, with one
// of those SPIFFE IDs. It returns the peer's SPIFFE ID.
func (s *Store) Verify(roots string, chain []*x509.Certificate, sans []string) (string, error) {
	if len(chain) == 0 {
		return "", ErrNoPeerCertificate
	}
	b := s.Get(roots)
	if b == nil || len(b.Roots) == 0 {
		return "", ErrNoBundle
	}
	id, _, err := x509svid.Verify(chain, bundleFor(b.Roots))
	if err != nil {
		return "", err
	}
	if len(sans) > 0 && !slices.Contains(sans, id.String()) {
		return id.String(), &WrongIDError{Got: id.String(), Want: sans}
	}
	return id.String(), nil
}

// bundleFor trusts roots for whatever trust domain the peer claims; only
// certificates those roots signed verify.
type bundleFor []*x509.Certificate

func (r bundleFor) GetX509BundleForTrustDomain(td spiffeid.TrustDomain) (*x509bundle.Bundle, error) {
	return x509bundle.FromX509Authorities(td, r), nil
}

// ServerConfig returns the tls.Config of an inbound mTLS filter chain.
func (s *Store) ServerConfig(t *config.DownstreamTLS) *tls.Config {
	cfg := &tls.Config{
		MinVersion: t.MinVersion,
		MaxVersion: t.MaxVersion,
		NextProtos: t.ALPN,
		GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) {
			if sec := s.Get(t.CertSecret); sec != nil && sec.Cert != nil {
				return sec.Cert, nil
			}
			return nil, ErrNoCertificate
		},
		ClientAuth: tls.RequestClientCert,
		// Verification is ours (SPIFFE rules, current bundle), also on
		// resumed sessions, whose certificates VerifyConnection sees too.
		VerifyConnection: func(cs tls.ConnectionState) error {
			if len(cs.PeerCertificates) == 0 && !t.RequireClientCert {
				return nil
			}
			_, err := s.Verify(t.RootsSecret, cs.PeerCertificates, t.SANs)
			return err
		},
	}
	if t.RequireClientCert {
		cfg.ClientAuth = tls.RequireAnyClientCert
	}
	return cfg
}

// ClientConfig returns the tls.Config of an upstream mTLS cluster, with a
// session cache so reconnections resume.
func (s *Store) ClientConfig(t *config.UpstreamTLS) *tls.Config {
	return &tls.Config{
		MinVersion:         t.MinVersion,
		MaxVersion:         t.MaxVersion,
		NextProtos:         t.ALPN,
		ServerName:         t.SNI,
		InsecureSkipVerify: true, // verified by VerifyConnection against the SPIFFE ID
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			if sec := s.Get(t.CertSecret); sec != nil && sec.Cert != nil {
				return sec.Cert, nil
			}
			return nil, ErrNoCertificate
		},
		VerifyConnection: func(cs tls.ConnectionState) error {
			_, err := s.Verify(t.RootsSecret, cs.PeerCertificates, t.SANs)
			return err
		},
		ClientSessionCache: tls.NewLRUClientSessionCache(256),
	}
}

// Peer is the authenticated identity of a TLS peer.
type Peer struct {
	// SPIFFEID is the peer's URI SAN, "" when it presented no certificate.
	SPIFFEID string
	// Hash is the hex SHA-256 of the peer's leaf certificate (DER), as in
	// x-forwarded-client-cert.
	Hash string
}

// PeerOf returns the identity of the peer of an established connection.
func PeerOf(cs tls.ConnectionState) Peer {
	if len(cs.PeerCertificates) == 0 {
		return Peer{}
	}
	leaf := cs.PeerCertificates[0]
	p := Peer{}
	if len(leaf.URIs) == 1 {
		p.SPIFFEID = leaf.URIs[0].String()
	}
	sum := sha256.Sum256(leaf.Raw)
	p.Hash = hex.EncodeToString(sum[:])
	return p
}

// Handshake failure reasons (metric label and log field).
const (
	ReasonPlaintext     = "plaintext"             // not TLS on a strict mTLS listener
	ReasonNotTLS        = "not_tls"               // bytes that are not a TLS handshake
	ReasonExpired       = "expired"               // the peer's certificate is expired or not yet valid
	ReasonUnknownCA     = "unknown_ca"            // the peer's chain does not lead to a trusted root
	ReasonWrongID       = "wrong_spiffe_id"       // the upstream is not the expected service
	ReasonInvalidSVID   = "invalid_svid"          // not a SPIFFE X.509 SVID (no or several URI SANs, a CA...)
	ReasonNoClientCert  = "no_client_certificate" // the client presented no certificate
	ReasonTimeout       = "timeout"               // the handshake did not finish in time
	ReasonPeerClosed    = "peer_closed"           // the peer closed during the handshake
	ReasonNoCertificate = "no_certificate"        // this sidecar has no certificate to present yet
	ReasonTLS           = "tls_error"             // any other TLS failure (versions, ciphers, alerts)
)

// Reason classifies a handshake error.
func Reason(err error) string {
	var inv x509.CertificateInvalidError
	var unknown x509.UnknownAuthorityError
	var wrong *WrongIDError
	var rec tls.RecordHeaderError
	var ne net.Error
	msg := err.Error()
	switch {
	case errors.As(err, &wrong):
		return ReasonWrongID
	case (errors.As(err, &inv) && inv.Reason == x509.Expired) || strings.Contains(msg, "expired or is not yet valid"):
		return ReasonExpired
	case errors.As(err, &unknown) || strings.Contains(msg, "unknown authority"):
		return ReasonUnknownCA
	case errors.Is(err, ErrNoPeerCertificate) || strings.Contains(msg, "didn't provide a certificate") || strings.Contains(msg, "certificate required"):
		return ReasonNoClientCert
	case errors.Is(err, ErrNoCertificate) || errors.Is(err, ErrNoBundle):
		return ReasonNoCertificate
	case errors.As(err, &rec):
		return ReasonNotTLS
	case strings.Contains(msg, "x509svid") || strings.Contains(msg, "spiffeid"):
		return ReasonInvalidSVID
	case errors.Is(err, os.ErrDeadlineExceeded) || (errors.As(err, &ne) && ne.Timeout()):
		return ReasonTimeout
	case errors.Is(err, io.EOF) || errors.Is(err, net.ErrClosed) || strings.Contains(msg, "connection reset"):
		return ReasonPeerClosed
	}
	return ReasonTLS
}
