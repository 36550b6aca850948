package devkube

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"time"
)

// pki is the cluster's certificates, generated per cluster with crypto/x509
// (ECDSA P-256), in the roles kubeadm gives them (see its "PKI certificates
// and requirements" page): one CA signs every serving and client
// certificate.
type pki struct {
	dir string // where the PEM files are

	caCert *x509.Certificate
	caKey  crypto.Signer
}

// Paths of the PEM files under pki.dir.
func (p *pki) path(name string) string { return filepath.Join(p.dir, name) }

// certSpec is one leaf certificate.
type certSpec struct {
	file   string // base name: file.crt and file.key
	cn     string
	orgs   []string
	dns    []string
	ips    []net.IP
	server bool
	client bool
}

// generatePKI writes into dir: ca.crt/ca.key; apiserver (serving, SANs
// localhost, kubernetes.default.svc..., 127.0.0.1, the kubernetes Service IP
// and the node IP); admin (O=system:masters); kubelet (CN=system:node:<node>,
// O=system:nodes, serving and client); apiserver-kubelet-client
// (O=system:masters); and the service-account key pair sa.key/sa.pub. All
// valid for a year from an hour ago.
func generatePKI(dir string) (*pki, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("devkube: pki: %w", err)
	}
	p := &pki{dir: dir}
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("devkube: pki: ca key: %w", err)
	}
	now := time.Now()
	caTmpl := &x509.Certificate{
		SerialNumber:          serial(),
		Subject:               pkix.Name{CommonName: "meshlet-devkube-ca"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(365 * 24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, caKey.Public(), caKey)
	if err != nil {
		return nil, fmt.Errorf("devkube: pki: ca: %w", err)
	}
	if p.caCert, err = x509.ParseCertificate(der); err != nil {
		return nil, fmt.Errorf("devkube: pki: ca: %w", err)
	}
	p.caKey = caKey
	if err := writePEM(p.path("ca.crt"), "CERTIFICATE", der); err != nil {
		return nil, err
	}
	if err := writeKey(p.path("ca.key"), caKey); err != nil {
		return nil, err
	}

	loopback := net.ParseIP("127.0.0.1")
	leaves := []certSpec{
		{file: "apiserver", cn: "kube-apiserver", server: true,
			dns: []string{"localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
				"kubernetes.default.svc." + ClusterDomain},
			ips: []net.IP{loopback, net.ParseIP(APIServiceIP), net.ParseIP(NodeIP)}},
		{file: "admin", cn: "meshlet-devkube-admin", orgs: []string{"system:masters"}, client: true},
		{file: "kubelet", cn: "system:node:" + NodeName, orgs: []string{"system:nodes"}, server: true, client: true,
			dns: []string{NodeName}, ips: []net.IP{loopback, net.ParseIP(NodeIP)}},
		{file: "apiserver-kubelet-client", cn: "kube-apiserver-kubelet-client", orgs: []string{"system:masters"}, client: true},
	}
	for _, l := range leaves {
		if err := p.issue(l, now); err != nil {
			return nil, err
		}
	}

	saKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("devkube: pki: sa key: %w", err)
	}
	if err := writeKey(p.path("sa.key"), saKey); err != nil {
		return nil, err
	}
	pub, err := x509.MarshalPKIXPublicKey(saKey.Public())
	if err != nil {
		return nil, fmt.Errorf("devkube: pki: sa.pub: %w", err)
	}
	if err := writePEM(p.path("sa.pub"), "PUBLIC KEY", pub); err != nil {
		return nil, err
	}
	return p, nil
}

func (p *pki) issue(s certSpec, now time.Time) error {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return fmt.Errorf("devkube: pki: %s key: %w", s.file, err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial(),
		Subject:      pkix.Name{CommonName: s.cn, Organization: s.orgs},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.Add(365 * 24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		DNSNames:     s.dns,
		IPAddresses:  s.ips,
	}
	if s.server {
		tmpl.ExtKeyUsage = append(tmpl.ExtKeyUsage, x509.ExtKeyUsageServerAuth)
	}
	if s.client {
		tmpl.ExtKeyUsage = append(tmpl.ExtKeyUsage, x509.ExtKeyUsageClientAuth)
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, p.caCert, key.Public(), p.caKey)
	if err != nil {
		return fmt.Errorf("devkube: pki: %s: %w", s.file, err)
	}
	if err := writePEM(p.path(s.file+".crt"), "CERTIFICATE", der); err != nil {
		return err
	}
	return writeKey(p.path(s.file+".key"), key)
}

// serial returns a random 128-bit certificate serial number.
func serial() *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 128))
	if err != nil {
		panic(err) // crypto/rand does not fail on Linux
	}
	return n
}

func writeKey(path string, key *ecdsa.PrivateKey) error {
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return fmt.Errorf("devkube: pki: %s: %w", filepath.Base(path), err)
	}
	return writePEM(path, "PRIVATE KEY", der)
}

func writePEM(path, typ string, der []byte) error {
	b := pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der})
	if err := os.WriteFile(path, b, 0o600); err != nil {
		return fmt.Errorf("devkube: pki: %w", err)
	}
	return nil
}

// pem reads one of the PEM files.
func (p *pki) read(name string) ([]byte, error) {
	b, err := os.ReadFile(p.path(name))
	if err != nil {
		return nil, fmt.Errorf("devkube: pki: %w", err)
	}
	return b, nil
}
