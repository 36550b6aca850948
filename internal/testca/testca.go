// Package testca issues certificates shaped like Consul Connect's, for
// tests: an EC P-256 root, and leaves with a single SPIFFE URI SAN
// (spiffe://<trust-domain>/ns/default/dc/<dc>/svc/<service>). It also
// issues plain TLS serving certificates (IssueServer), e.g. for a dev
// Consul agent's HTTPS API.
package testca

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"net/url"
	"time"
)

// CA is a root certificate and its key.
type CA struct {
	TrustDomain string
	Cert        *x509.Certificate
	Key         *ecdsa.PrivateKey
	// CertPEM is the root certificate in PEM.
	CertPEM string
}

// New returns a CA for trustDomain, valid for a year.
func New(trustDomain string) (*CA, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	uri, _ := url.Parse("spiffe://" + trustDomain)
	tmpl := &x509.Certificate{
		SerialNumber:          serial(),
		Subject:               pkix.Name{CommonName: "meshlet test CA " + trustDomain},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(365 * 24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		URIs:                  []*url.URL{uri},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, err
	}
	cert, _ := x509.ParseCertificate(der)
	return &CA{TrustDomain: trustDomain, Cert: cert, Key: key, CertPEM: encode("CERTIFICATE", der)}, nil
}

// KeyPEM returns the CA's private key in PEM (for Consul's CA config).
func (ca *CA) KeyPEM() string {
	der, _ := x509.MarshalECPrivateKey(ca.Key)
	return encode("EC PRIVATE KEY", der)
}

// Leaf is an issued certificate.
type Leaf struct {
	SPIFFEID string
	CertPEM  string
	KeyPEM   string
}

// SPIFFEID returns Consul's SPIFFE ID of service in dc.
func (ca *CA) SPIFFEID(dc, service string) string {
	return fmt.Sprintf("spiffe://%s/ns/default/dc/%s/svc/%s", ca.TrustDomain, dc, service)
}

// Issue returns a leaf for service in dc valid from notBefore to notAfter.
func (ca *CA) Issue(dc, service string, notBefore, notAfter time.Time) (*Leaf, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	id := ca.SPIFFEID(dc, service)
	uri, _ := url.Parse(id)
	tmpl := &x509.Certificate{
		SerialNumber: serial(),
		Subject:      pkix.Name{CommonName: service},
		NotBefore:    notBefore,
		NotAfter:     notAfter,
		KeyUsage:     x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment | x509.KeyUsageKeyAgreement,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		URIs:         []*url.URL{uri},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Cert, &key.PublicKey, ca.Key)
	if err != nil {
		return nil, err
	}
	kder, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return nil, err
	}
	return &Leaf{SPIFFEID: id, CertPEM: encode("CERTIFICATE", der), KeyPEM: encode("EC PRIVATE KEY", kder)}, nil
}

// MustIssue is Issue valid from an hour ago for a day, panicking on error.
func (ca *CA) MustIssue(dc, service string) *Leaf {
	l, err := ca.Issue(dc, service, time.Now().Add(-time.Hour), time.Now().Add(24*time.Hour))
	if err != nil {
		panic(err)
	}
	return l
}

// IssueServer returns a TLS serving certificate (server and client auth,
// valid from an hour ago for a year) for hosts: each an IP address (an IP
// SAN) or a DNS name (a DNS SAN); the first is its common name. Its
// SPIFFEID is empty.
func (ca *CA) IssueServer(hosts ...string) (*Leaf, error) {
	if len(hosts) == 0 {
		return nil, fmt.Errorf("testca: IssueServer needs at least one host")
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial(),
		Subject:      pkix.Name{CommonName: hosts[0]},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(365 * 24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	}
	for _, h := range hosts {
		if ip := net.ParseIP(h); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		} else {
			tmpl.DNSNames = append(tmpl.DNSNames, h)
		}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Cert, &key.PublicKey, ca.Key)
	if err != nil {
		return nil, err
	}
	kder, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return nil, err
	}
	return &Leaf{CertPEM: encode("CERTIFICATE", der), KeyPEM: encode("EC PRIVATE KEY", kder)}, nil
}

func serial() *big.Int {
	n, _ := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 62))
	return n
}

func encode(typ string, der []byte) string {
	return string(pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}))
}
