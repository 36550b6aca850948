// Package servingcert makes and serves the control plane's own TLS
// certificates: a small CA (EC P-256) and serving certificates it signs,
// renewed when a third of their life is left (cert-manager's default
// renewBefore). The xDS server and the Kubernetes injection webhook serve
// with them; sidecars and the API server verify them against the CA
// bundle. Dir keeps them in a directory (outside Kubernetes: issued at
// first start and persisted); Files serves a certificate someone else
// issues (cert-manager, a corporate CA), read again when it changes.
package servingcert

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"time"
)

// Lifetimes of what this package issues.
const (
	// CALifetime is a CA's: ten years.
	CALifetime = 10 * 365 * 24 * time.Hour
	// ServingLifetime is a serving certificate's: one year.
	ServingLifetime = 365 * 24 * time.Hour
)

// NewCA returns a self-signed CA certificate named commonName, valid from
// a minute before now for CALifetime, and its key.
func NewCA(now time.Time, commonName string) (*x509.Certificate, *ecdsa.PrivateKey, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, fmt.Errorf("servingcert: ca key: %w", err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial(), Subject: pkix.Name{CommonName: commonName},
		NotBefore: now.Add(-time.Minute), NotAfter: now.Add(CALifetime),
		KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign, BasicConstraintsValid: true, IsCA: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, nil, fmt.Errorf("servingcert: ca certificate: %w", err)
	}
	c, err := x509.ParseCertificate(der)
	return c, key, err
}

// Names are the subject alternative names of a serving certificate; the
// first DNS name (else the first IP) is also its common name.
type Names struct {
	DNS []string
	IPs []net.IP
}

// NewServing returns a server-auth certificate for names signed by ca,
// valid from a minute before now for ServingLifetime, and its key, both
// PEM-encoded.
func NewServing(now time.Time, ca *x509.Certificate, caKey *ecdsa.PrivateKey, names Names) (certPEM, keyPEM []byte, err error) {
	if len(names.DNS) == 0 && len(names.IPs) == 0 {
		return nil, nil, errors.New("servingcert: a serving certificate needs a DNS name or an IP address")
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, fmt.Errorf("servingcert: serving key: %w", err)
	}
	cn := ""
	if len(names.DNS) > 0 {
		cn = names.DNS[0]
	} else {
		cn = names.IPs[0].String()
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial(), Subject: pkix.Name{CommonName: cn}, DNSNames: names.DNS, IPAddresses: names.IPs,
		NotBefore: now.Add(-time.Minute), NotAfter: now.Add(ServingLifetime),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
	if err != nil {
		return nil, nil, fmt.Errorf("servingcert: serving certificate: %w", err)
	}
	return EncodeCert(der), EncodeKey(key), nil
}

// Due reports whether c is missing or has less than a third of its life
// left at now.
func Due(now time.Time, c *x509.Certificate) bool {
	return c == nil || now.After(c.NotAfter.Add(-c.NotAfter.Sub(c.NotBefore)/3))
}

// EncodeCert is a certificate's DER in PEM.
func EncodeCert(der []byte) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
}

// EncodeKey is an EC key in PEM ("EC PRIVATE KEY", SEC 1).
func EncodeKey(key *ecdsa.PrivateKey) []byte {
	kb, _ := x509.MarshalECPrivateKey(key) // a P-256 key always marshals
	return pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kb})
}

// ParseCerts returns the certificates of a PEM bundle, skipping other
// blocks; the error is the first certificate that does not parse.
func ParseCerts(b []byte) ([]*x509.Certificate, error) {
	var out []*x509.Certificate
	for {
		var blk *pem.Block
		blk, b = pem.Decode(b)
		if blk == nil {
			return out, nil
		}
		if blk.Type != "CERTIFICATE" {
			continue
		}
		c, err := x509.ParseCertificate(blk.Bytes)
		if err != nil {
			return out, fmt.Errorf("servingcert: %w", err)
		}
		out = append(out, c)
	}
}

// ParseKey parses an "EC PRIVATE KEY" PEM block.
func ParseKey(b []byte) (*ecdsa.PrivateKey, error) {
	blk, _ := pem.Decode(b)
	if blk == nil {
		return nil, errors.New("servingcert: no PEM key")
	}
	return x509.ParseECPrivateKey(blk.Bytes)
}

func serial() *big.Int {
	n, _ := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	return n
}
