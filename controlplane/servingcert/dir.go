package servingcert

import (
	"cmp"
	"context"
	"crypto/ecdsa"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"time"
)

// File names in a Dir (the kubernetes.io/tls Secret keys, plus the CA's).
const (
	CACertFile = "ca.crt"
	CAKeyFile  = "ca.key"
	CertFile   = "tls.crt"
	KeyFile    = "tls.key"
)

// CheckInterval is how often Dir.Run and Files look at their certificates
// again.
const CheckInterval = time.Hour

// DirConfig configures OpenDir.
type DirConfig struct {
	// Dir keeps the CA and the serving certificate; created (mode 0700)
	// when missing. Required.
	Dir string
	// Names are the serving certificate's subject alternative names; a
	// certificate whose names differ is issued again.
	Names Names
	// CAName is the CA's common name; "meshlet control plane CA" when
	// empty.
	CAName string
	// Logger defaults to slog.Default().
	Logger *slog.Logger
	// Now defaults to time.Now (tests move it).
	Now func() time.Time
}

// Dir serves with a certificate it issues itself and keeps in a
// directory: at first start a CA and a serving certificate for Names are
// made and written there (keys mode 0600), later starts reuse them, and
// each is issued again when due (Due), when missing or unreadable, or
// (the serving one) when Names change. A renewed CA stays in CACertFile
// beside the new one until it expires, so clients holding the old bundle
// keep verifying. Clients verify the server with CAFile.
type Dir struct {
	cfg  DirConfig
	log  *slog.Logger
	cert atomic.Pointer[tls.Certificate]
	mu   sync.Mutex // serialises Ensure
}

// OpenDir loads or issues the certificates of cfg.Dir. Errors: the
// directory cannot be made or written, or a certificate cannot be made.
func OpenDir(cfg DirConfig) (*Dir, error) {
	if cfg.Dir == "" {
		return nil, errors.New("servingcert: DirConfig.Dir is required")
	}
	cfg.CAName = cmp.Or(cfg.CAName, "meshlet control plane CA")
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	d := &Dir{cfg: cfg, log: cfg.Logger}
	if d.log == nil {
		d.log = slog.Default()
	}
	if err := d.Ensure(); err != nil {
		return nil, err
	}
	return d, nil
}

// CAFile is the CA bundle clients verify the server with (PEM).
func (d *Dir) CAFile() string { return filepath.Join(d.cfg.Dir, CACertFile) }

// GetCertificate is tls.Config.GetCertificate.
func (d *Dir) GetCertificate(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	return d.cert.Load(), nil
}

// Run checks the certificates every CheckInterval until ctx is done.
func (d *Dir) Run(ctx context.Context) {
	t := time.NewTicker(CheckInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			if err := d.Ensure(); err != nil {
				d.log.Warn("servingcert: certificate check failed; the current certificate is kept", "dir", d.cfg.Dir, "error", err)
			}
		}
	}
}

// Ensure issues what is missing or due, writes it, and serves the serving
// certificate.
func (d *Dir) Ensure() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := os.MkdirAll(d.cfg.Dir, 0o700); err != nil {
		return fmt.Errorf("servingcert: %w", err)
	}
	read := func(name string) []byte {
		b, _ := os.ReadFile(filepath.Join(d.cfg.Dir, name))
		return b
	}
	now := d.cfg.Now()
	caPEM, caKeyPEM := read(CACertFile), read(CAKeyFile)
	ca, caKey, bundle, caChanged, err := d.ensureCA(now, caPEM, caKeyPEM)
	if err != nil {
		return err
	}
	certPEM, keyPEM := read(CertFile), read(KeyFile)
	serving, _ := ParseCerts(certPEM)
	_, pairErr := tls.X509KeyPair(certPEM, keyPEM)
	servingChanged := caChanged || pairErr != nil || len(serving) == 0 || Due(now, serving[0]) ||
		serving[0].CheckSignatureFrom(ca) != nil || !sameNames(serving[0], d.cfg.Names)
	if servingChanged {
		if certPEM, keyPEM, err = NewServing(now, ca, caKey, d.cfg.Names); err != nil {
			return err
		}
	}
	for _, f := range []struct {
		name string
		data []byte
		mode os.FileMode
		put  bool
	}{
		{CACertFile, bundle, 0o644, caChanged}, {CAKeyFile, EncodeKey(caKey), 0o600, caChanged},
		{CertFile, certPEM, 0o644, servingChanged}, {KeyFile, keyPEM, 0o600, servingChanged},
	} {
		if f.put {
			if err := writeFile(filepath.Join(d.cfg.Dir, f.name), f.data, f.mode); err != nil {
				return err
			}
		}
	}
	cert, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		return fmt.Errorf("servingcert: %w", err)
	}
	d.cert.Store(&cert)
	if caChanged || servingChanged {
		d.log.Info("servingcert: certificate issued", "dir", d.cfg.Dir, "dns", d.cfg.Names.DNS, "ips", d.cfg.Names.IPs,
			"ca_renewed", caChanged, "ca_file", d.CAFile())
	}
	return nil
}

// ensureCA returns the CA to sign with, its key, the bundle to write and
// whether it is new.
func (d *Dir) ensureCA(now time.Time, caPEM, caKeyPEM []byte) (*x509.Certificate, *ecdsa.PrivateKey, []byte, bool, error) {
	cas, _ := ParseCerts(caPEM)
	key, _ := ParseKey(caKeyPEM)
	if len(cas) > 0 && key != nil && cas[0].IsCA && !Due(now, cas[0]) && key.PublicKey.Equal(cas[0].PublicKey) {
		return cas[0], key, caPEM, false, nil
	}
	ca, key, err := NewCA(now, d.cfg.CAName)
	if err != nil {
		return nil, nil, nil, false, err
	}
	bundle := EncodeCert(ca.Raw)
	for _, old := range cas { // keep CAs still valid until they expire
		if now.Before(old.NotAfter) {
			bundle = append(bundle, EncodeCert(old.Raw)...)
		}
	}
	return ca, key, bundle, true, nil
}

func sameNames(c *x509.Certificate, n Names) bool {
	if !slices.Equal(c.DNSNames, n.DNS) || len(c.IPAddresses) != len(n.IPs) {
		return false
	}
	for i, ip := range c.IPAddresses {
		if !ip.Equal(n.IPs[i]) {
			return false
		}
	}
	return true
}

// writeFile replaces path atomically (a temporary file renamed over it).
func writeFile(path string, data []byte, mode os.FileMode) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".*")
	if err != nil {
		return fmt.Errorf("servingcert: %w", err)
	}
	defer os.Remove(tmp.Name())
	if err := tmp.Chmod(mode); err != nil {
		tmp.Close()
		return fmt.Errorf("servingcert: %w", err)
	}
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return fmt.Errorf("servingcert: write %s: %w", path, err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("servingcert: write %s: %w", path, err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("servingcert: %w", err)
	}
	return nil
}

// LocalNames are the names a control plane serving on addr is reached by
// on its own machine: localhost, the host name, 127.0.0.1 and ::1, and
// addr's host when it is a specific address or name; extra are added
// (DNS names, or IP addresses in text form).
func LocalNames(addr string, extra ...string) Names {
	n := Names{DNS: []string{"localhost"}, IPs: []net.IP{net.IPv4(127, 0, 0, 1).To4(), net.IPv6loopback}}
	if h, err := os.Hostname(); err == nil && h != "" && h != "localhost" {
		n.DNS = append(n.DNS, h)
	}
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		host = addr
	}
	add := func(s string) {
		if s == "" {
			return
		}
		if ip := net.ParseIP(s); ip != nil {
			if ip.IsUnspecified() || slices.ContainsFunc(n.IPs, ip.Equal) {
				return
			}
			if v4 := ip.To4(); v4 != nil {
				ip = v4
			}
			n.IPs = append(n.IPs, ip)
			return
		}
		if !slices.Contains(n.DNS, s) {
			n.DNS = append(n.DNS, s)
		}
	}
	add(host)
	for _, e := range extra {
		add(e)
	}
	return n
}

// Files serves a certificate and key read from files (a cert-manager
// Secret mounted in the pod, or an operator's), read again when the
// certificate file's modification time changes (looked at most every 10
// s); a half-written rotation keeps the last good pair.
type Files struct {
	certFile, keyFile string

	mu      sync.Mutex // guards the fields below
	cert    *tls.Certificate
	modTime time.Time
	checked time.Time
}

// NewFiles loads the pair, or returns the error.
func NewFiles(certFile, keyFile string) (*Files, error) {
	f := &Files{certFile: certFile, keyFile: keyFile}
	if _, err := f.GetCertificate(nil); err != nil {
		return nil, err
	}
	return f, nil
}

// GetCertificate is tls.Config.GetCertificate.
func (f *Files) GetCertificate(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	now := time.Now()
	if f.cert != nil && now.Sub(f.checked) < 10*time.Second {
		return f.cert, nil
	}
	f.checked = now
	st, err := os.Stat(f.certFile)
	if err != nil {
		if f.cert != nil {
			return f.cert, nil
		}
		return nil, fmt.Errorf("servingcert: %w", err)
	}
	if f.cert != nil && st.ModTime().Equal(f.modTime) {
		return f.cert, nil
	}
	c, err := tls.LoadX509KeyPair(f.certFile, f.keyFile)
	if err != nil {
		if f.cert != nil {
			return f.cert, nil
		}
		return nil, fmt.Errorf("servingcert: %w", err)
	}
	f.cert, f.modTime = &c, st.ModTime()
	return f.cert, nil
}
