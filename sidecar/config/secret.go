package config

import (
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"strings"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/meshlet/meshlet/xds"
)

// Secret is a decoded envoy.extensions.transport_sockets.tls.v3.Secret:
// either a certificate with its key (an X.509 SVID) or a trust bundle.
type Secret struct {
	Name string
	// Cert is set for a TlsCertificate secret: the parsed chain and key.
	Cert *tls.Certificate
	// SPIFFEID is the certificate's identity (its single URI SAN).
	SPIFFEID string
	// Roots is set for a ValidationContext secret.
	Roots []*x509.Certificate
}

// CertInfo describes a certificate for /certs and metrics; it never holds
// key material.
type CertInfo struct {
	Secret  string `json:"secret"`
	Kind    string `json:"kind"` // "certificate" or "root"
	Subject string `json:"subject"`
	Issuer  string `json:"issuer"`
	// AuthorityKeyID is the hex key ID of the issuing CA: during a CA
	// rotation it tells which root signed the certificate.
	AuthorityKeyID string    `json:"authority_key_id,omitempty"`
	SPIFFEID       string    `json:"spiffe_id,omitempty"`
	Serial         string    `json:"serial_number"`
	NotBefore      time.Time `json:"valid_from"`
	NotAfter       time.Time `json:"expiration_time"`
	SHA256         string    `json:"sha256"`
	SecondsLeft    int64     `json:"seconds_until_expiration"`
	DaysLeft       int64     `json:"days_until_expiration"`
}

// Infos returns one entry per certificate of the secret (the leaf, or each
// root), at now.
func (s *Secret) Infos(now time.Time) []CertInfo {
	var certs []*x509.Certificate
	kind := "root"
	if s.Cert != nil {
		kind = "certificate"
		if s.Cert.Leaf != nil {
			certs = []*x509.Certificate{s.Cert.Leaf}
		}
	} else {
		certs = s.Roots
	}
	out := make([]CertInfo, 0, len(certs))
	for _, c := range certs {
		sum := sha256.Sum256(c.Raw)
		left := c.NotAfter.Sub(now)
		info := CertInfo{Secret: s.Name, Kind: kind, Subject: c.Subject.String(), Issuer: c.Issuer.String(),
			AuthorityKeyID: hex.EncodeToString(c.AuthorityKeyId), Serial: c.SerialNumber.Text(16),
			NotBefore: c.NotBefore, NotAfter: c.NotAfter, SHA256: hex.EncodeToString(sum[:]),
			SecondsLeft: int64(left.Seconds()), DaysLeft: int64(left.Hours() / 24)}
		if len(c.URIs) == 1 {
			info.SPIFFEID = c.URIs[0].String()
		}
		out = append(out, info)
	}
	return out
}

// DecodeSecret decodes and validates an Any holding a Secret. A
// certificate must be a valid X.509 SVID (one SPIFFE URI SAN, a leaf, its
// key matching); a trust bundle must hold at least one CA certificate. Only
// inline data sources are supported. Errors never include key material.
func DecodeSecret(a *anypb.Any) (*Secret, error) {
	var sec tlsv3.Secret
	if err := unpack(a, &sec, xds.KindSecret); err != nil {
		return nil, err
	}
	kind, name := xds.KindSecret, sec.GetName()
	if name == "" {
		return nil, fieldErr(kind, name, "name", "required")
	}
	out := &Secret{Name: name}
	switch t := sec.GetType().(type) {
	case *tlsv3.Secret_TlsCertificate:
		certPEM, err := inline(t.TlsCertificate.GetCertificateChain())
		if err != nil {
			return nil, fieldErr(kind, name, "tls_certificate.certificate_chain", "%v", err)
		}
		keyPEM, err := inline(t.TlsCertificate.GetPrivateKey())
		if err != nil {
			return nil, fieldErr(kind, name, "tls_certificate.private_key", "%v", err)
		}
		// Any key encoding (Consul issues SEC1 "EC PRIVATE KEY").
		cert, err := tls.X509KeyPair(certPEM, keyPEM)
		if err != nil {
			return nil, fieldErr(kind, name, "tls_certificate", "certificate and key do not form a pair: %s", pairError(err))
		}
		leaf, err := x509.ParseCertificate(cert.Certificate[0])
		if err != nil {
			return nil, fieldErr(kind, name, "tls_certificate.certificate_chain", "%v", err)
		}
		id, err := x509svid.IDFromCert(leaf)
		if err != nil || leaf.IsCA {
			return nil, fieldErr(kind, name, "tls_certificate", "not an X.509 SVID: a leaf with exactly one SPIFFE URI SAN is required (%v)", err)
		}
		cert.Leaf = leaf
		out.Cert, out.SPIFFEID = &cert, id.String()
	case *tlsv3.Secret_ValidationContext:
		data, err := inline(t.ValidationContext.GetTrustedCa())
		if err != nil {
			return nil, fieldErr(kind, name, "validation_context.trusted_ca", "%v", err)
		}
		for len(data) > 0 {
			var b *pem.Block
			b, data = pem.Decode(data)
			if b == nil {
				break
			}
			c, err := x509.ParseCertificate(b.Bytes)
			if err != nil {
				return nil, fieldErr(kind, name, "validation_context.trusted_ca", "bad certificate: %v", err)
			}
			if !c.IsCA {
				return nil, fieldErr(kind, name, "validation_context.trusted_ca", "certificate %q is not a CA", c.Subject)
			}
			out.Roots = append(out.Roots, c)
		}
		if len(out.Roots) == 0 {
			return nil, fieldErr(kind, name, "validation_context.trusted_ca", "no PEM certificate")
		}
	default:
		return nil, fieldErr(kind, name, "type", "only tls_certificate and validation_context secrets are supported")
	}
	return out, nil
}

// pairError keeps crypto/tls's explanation without echoing key material.
func pairError(err error) string {
	msg := err.Error()
	if i := strings.Index(msg, "tls: "); i >= 0 {
		msg = msg[i:]
	}
	return msg
}

func inline(ds *corev3.DataSource) ([]byte, error) {
	switch s := ds.GetSpecifier().(type) {
	case *corev3.DataSource_InlineString:
		return []byte(s.InlineString), nil
	case *corev3.DataSource_InlineBytes:
		return s.InlineBytes, nil
	case nil:
		return nil, errors.New("required")
	}
	return nil, fmt.Errorf("only inline data is supported (not files or environment variables)")
}
