package kube

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/meshlet/meshlet/controlplane/servingcert"
)

// Lifetimes of the self-managed webhook certificates. The serving
// certificate is renewed when a third of its life is left (as
// cert-manager's default renewBefore); the CA lives ten years and is
// renewed likewise, both CAs staying in the caBundle until the old one
// expires.
const (
	CALifetime      = servingcert.CALifetime
	ServingLifetime = servingcert.ServingLifetime
	// CertCheckInterval is how often the certificates are checked against
	// the Secret and their expiry.
	CertCheckInterval = time.Hour
)

// Keys of the webhook's TLS Secret (type kubernetes.io/tls, plus the CA).
const (
	secretCACert = "ca.crt"
	secretCAKey  = "ca.key"
)

// WebhookCertsConfig configures SelfManagedCerts.
type WebhookCertsConfig struct {
	Client kubernetes.Interface
	// Namespace holds the Secret and the webhook's Service.
	Namespace string
	// SecretName is the Secret keeping the CA and serving certificate,
	// shared by every replica.
	SecretName string
	// ServiceName is the webhook's Service: the certificate's DNS names
	// are <svc>, <svc>.<ns>, <svc>.<ns>.svc, <svc>.<ns>.svc.cluster.local.
	ServiceName string
	// WebhookConfigName is the MutatingWebhookConfiguration whose webhooks
	// pointing at ServiceName get the CA as caBundle.
	WebhookConfigName string
	Logger            *slog.Logger
	// Now defaults to time.Now (tests move it).
	Now func() time.Time
}

// SelfManagedCerts serves the webhook with a certificate it makes and
// keeps itself: a CA and a serving certificate in a Secret (created by the
// first replica, read by the others), the CA written into the webhook
// configuration's caBundle, both renewed before they expire.
type SelfManagedCerts struct {
	cfg  WebhookCertsConfig
	log  *slog.Logger
	cert atomic.Pointer[tls.Certificate]
	// bundle is the CA bundle of the Secret last loaded.
	bundle atomic.Pointer[[]byte]
	mu     sync.Mutex // serialises Ensure
}

// NewSelfManagedCerts returns the manager; call Ensure before serving.
func NewSelfManagedCerts(cfg WebhookCertsConfig) *SelfManagedCerts {
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	m := &SelfManagedCerts{cfg: cfg, log: cfg.Logger}
	if m.log == nil {
		m.log = slog.Default()
	}
	return m
}

// GetCertificate is tls.Config.GetCertificate.
func (m *SelfManagedCerts) GetCertificate(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	c := m.cert.Load()
	if c == nil {
		return nil, errors.New("kube: webhook certificate not loaded yet")
	}
	return c, nil
}

// Run checks the certificates every CertCheckInterval until ctx is done.
func (m *SelfManagedCerts) Run(ctx context.Context) {
	t := time.NewTicker(CertCheckInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			if err := m.Ensure(ctx); err != nil {
				m.log.Warn("kube: webhook certificate check failed; retrying in an hour", "error", err)
			}
		}
	}
}

// Ensure loads the Secret, creating or renewing what is missing, invalid
// or due, loads the serving certificate and makes the webhook
// configuration trust the CA. Replicas racing on the Secret settle on one
// writer (create and update conflict; the loser reads the winner's).
func (m *SelfManagedCerts) Ensure(ctx context.Context) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	for attempt := 0; attempt < 5; attempt++ {
		sec, err := m.cfg.Client.CoreV1().Secrets(m.cfg.Namespace).Get(ctx, m.cfg.SecretName, metav1.GetOptions{})
		exists := err == nil
		if err != nil && !apierrors.IsNotFound(err) {
			return fmt.Errorf("kube: webhook secret %s/%s: %w", m.cfg.Namespace, m.cfg.SecretName, err)
		}
		var data map[string][]byte
		if exists {
			data = sec.Data
		}
		next, changed, err := m.renew(data)
		if err != nil {
			return err
		}
		if changed {
			if !exists {
				sec = &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: m.cfg.SecretName, Namespace: m.cfg.Namespace,
					Labels: map[string]string{"app.kubernetes.io/managed-by": "meshlet"}}, Type: corev1.SecretTypeTLS, Data: next}
				_, err = m.cfg.Client.CoreV1().Secrets(m.cfg.Namespace).Create(ctx, sec, metav1.CreateOptions{})
			} else {
				sec = sec.DeepCopy()
				sec.Data = next
				_, err = m.cfg.Client.CoreV1().Secrets(m.cfg.Namespace).Update(ctx, sec, metav1.UpdateOptions{})
			}
			if apierrors.IsAlreadyExists(err) || apierrors.IsConflict(err) {
				continue // another replica wrote it first: use theirs
			}
			if err != nil {
				return fmt.Errorf("kube: write webhook secret: %w", err)
			}
			m.log.Info("kube: webhook certificate written", "secret", m.cfg.Namespace+"/"+m.cfg.SecretName, "dns", m.dnsNames()[2])
		}
		cert, err := tls.X509KeyPair(next[corev1.TLSCertKey], next[corev1.TLSPrivateKeyKey])
		if err != nil {
			return fmt.Errorf("kube: webhook certificate: %w", err)
		}
		m.cert.Store(&cert)
		bundle := next[secretCACert]
		m.bundle.Store(&bundle)
		return m.patchCABundle(ctx, bundle)
	}
	return errors.New("kube: webhook secret kept changing under us")
}

func (m *SelfManagedCerts) dnsNames() []string {
	s, ns := m.cfg.ServiceName, m.cfg.Namespace
	return []string{s, s + "." + ns, s + "." + ns + ".svc", s + "." + ns + ".svc.cluster.local"}
}

// renew returns the Secret data to use: data itself when its CA and
// serving certificate are valid, match the Service and are not due, else
// data with what is due made again.
func (m *SelfManagedCerts) renew(data map[string][]byte) (map[string][]byte, bool, error) {
	now := m.cfg.Now()
	due := func(c *x509.Certificate) bool { return servingcert.Due(now, c) }
	caCerts, _ := servingcert.ParseCerts(data[secretCACert])
	var ca *x509.Certificate
	if len(caCerts) > 0 {
		ca = caCerts[0]
	}
	caKey, _ := servingcert.ParseKey(data[secretCAKey])
	out := map[string][]byte{}
	changed := false
	if ca == nil || caKey == nil || due(ca) || !ca.IsCA {
		var err error
		if ca, caKey, err = servingcert.NewCA(now, "meshlet webhook CA"); err != nil {
			return nil, false, err
		}
		changed = true
		bundle := servingcert.EncodeCert(ca.Raw)
		for _, old := range caCerts { // keep CAs still valid until they expire
			if now.Before(old.NotAfter) && !old.Equal(ca) {
				bundle = append(bundle, servingcert.EncodeCert(old.Raw)...)
			}
		}
		out[secretCACert] = bundle
		out[secretCAKey] = servingcert.EncodeKey(caKey)
	} else {
		out[secretCACert], out[secretCAKey] = data[secretCACert], data[secretCAKey]
	}
	serving, _ := servingcert.ParseCerts(data[corev1.TLSCertKey])
	okServing := !changed && len(serving) > 0 && !due(serving[0]) && slices.Equal(serving[0].DNSNames, m.dnsNames()) &&
		serving[0].CheckSignatureFrom(ca) == nil
	if okServing {
		if _, err := tls.X509KeyPair(data[corev1.TLSCertKey], data[corev1.TLSPrivateKeyKey]); err != nil {
			okServing = false
		}
	}
	if okServing {
		out[corev1.TLSCertKey], out[corev1.TLSPrivateKeyKey] = data[corev1.TLSCertKey], data[corev1.TLSPrivateKeyKey]
		return out, changed, nil
	}
	certPEM, keyPEM, err := servingcert.NewServing(now, ca, caKey, servingcert.Names{DNS: m.dnsNames()})
	if err != nil {
		return nil, false, err
	}
	out[corev1.TLSCertKey], out[corev1.TLSPrivateKeyKey] = certPEM, keyPEM
	return out, true, nil
}

// patchCABundle sets caBundle on every webhook of the configuration that
// calls our Service.
func (m *SelfManagedCerts) patchCABundle(ctx context.Context, bundle []byte) error {
	api := m.cfg.Client.AdmissionregistrationV1().MutatingWebhookConfigurations()
	for attempt := 0; attempt < 5; attempt++ {
		wc, err := api.Get(ctx, m.cfg.WebhookConfigName, metav1.GetOptions{})
		if err != nil {
			return fmt.Errorf("kube: webhook configuration %s: %w", m.cfg.WebhookConfigName, err)
		}
		wc = wc.DeepCopy()
		changed := false
		for i := range wc.Webhooks {
			s := wc.Webhooks[i].ClientConfig.Service
			if s == nil || s.Name != m.cfg.ServiceName || s.Namespace != m.cfg.Namespace {
				continue
			}
			if !bytes.Equal(wc.Webhooks[i].ClientConfig.CABundle, bundle) {
				wc.Webhooks[i].ClientConfig.CABundle = bundle
				changed = true
			}
		}
		if !changed {
			return nil
		}
		_, err = api.Update(ctx, wc, metav1.UpdateOptions{})
		if apierrors.IsConflict(err) {
			continue
		}
		if err != nil {
			return fmt.Errorf("kube: patch caBundle of %s: %w", m.cfg.WebhookConfigName, err)
		}
		m.log.Info("kube: webhook configuration trusts the webhook's CA", "configuration", m.cfg.WebhookConfigName)
		return nil
	}
	return fmt.Errorf("kube: webhook configuration %s kept changing", m.cfg.WebhookConfigName)
}

// NewFileCerts serves the webhook with tls.crt and tls.key from a
// directory, a Secret mounted from cert-manager (whose CA injector fills
// caBundle), read again when they change (servingcert.Files).
func NewFileCerts(dir string) (*servingcert.Files, error) {
	f, err := servingcert.NewFiles(filepath.Join(dir, corev1.TLSCertKey), filepath.Join(dir, corev1.TLSPrivateKeyKey))
	if err != nil {
		return nil, fmt.Errorf("kube: webhook certificate: %w", err)
	}
	return f, nil
}

// ServingCerts are the control plane's serving certificate on Kubernetes,
// for its webhook and its xDS server alike (one certificate for the
// Service's DNS names), and the CA bundle that verifies it: the API
// server gets it as the webhook's caBundle, sidecars from the CA root
// ConfigMap (xds.CARootConfigMap) in their namespace.
type ServingCerts struct {
	// GetCertificate is tls.Config.GetCertificate.
	GetCertificate func(*tls.ClientHelloInfo) (*tls.Certificate, error)
	// CABundle returns the current CA bundle (PEM); nil when unknown.
	CABundle func() []byte
	// Source says where they come from, for logs.
	Source string
	// run keeps them current until ctx is done; nil when nothing to do.
	run func(ctx context.Context)
}

// NewServingCerts returns cfg's certificates: tls.crt, tls.key and ca.crt
// of cfg.CertDir (cert-manager) when set, else self-managed ones in the
// cfg.SecretName Secret (SelfManagedCerts, made or loaded now). Errors:
// the files or the Secret cannot be read or written.
func NewServingCerts(ctx context.Context, cfg Config) (*ServingCerts, error) {
	cfg.setDefaults()
	if cfg.CertDir != "" {
		fc, err := NewFileCerts(cfg.CertDir)
		if err != nil {
			return nil, err
		}
		caFile := filepath.Join(cfg.CertDir, secretCACert)
		return &ServingCerts{GetCertificate: fc.GetCertificate, Source: cfg.CertDir, CABundle: func() []byte {
			b, _ := os.ReadFile(caFile)
			return b
		}}, nil
	}
	m := NewSelfManagedCerts(WebhookCertsConfig{Client: cfg.Client, Namespace: cfg.Namespace, SecretName: cfg.SecretName,
		ServiceName: cfg.ServiceName, WebhookConfigName: cfg.WebhookConfigName, Logger: cfg.Logger})
	if err := m.Ensure(ctx); err != nil {
		return nil, err
	}
	return &ServingCerts{GetCertificate: m.GetCertificate, CABundle: m.CABundle, run: m.Run,
		Source: "self-managed in secret " + cfg.Namespace + "/" + cfg.SecretName}, nil
}

// CABundle returns the CA bundle of the Secret last loaded (PEM).
func (m *SelfManagedCerts) CABundle() []byte {
	if b := m.bundle.Load(); b != nil {
		return *b
	}
	return nil
}
