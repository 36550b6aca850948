package kube

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"testing"
	"time"

	admissionregistrationv1 "k8s.io/api/admissionregistration/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"
)

// TestSelfManagedCerts: the first replica creates the Secret and fills
// caBundle; a second replica serves the same certificate; a serving
// certificate past two thirds of its life is renewed under the same CA, and
// the handshake verifies against caBundle for the Service's DNS name.
func TestSelfManagedCerts(t *testing.T) {
	ctx := context.Background()
	wc := &admissionregistrationv1.MutatingWebhookConfiguration{
		ObjectMeta: metav1.ObjectMeta{Name: DefaultWebhookConfigName},
		Webhooks: []admissionregistrationv1.MutatingWebhook{
			{Name: "a.inject.meshlet.io", ClientConfig: admissionregistrationv1.WebhookClientConfig{Service: &admissionregistrationv1.ServiceReference{Name: DefaultServiceName, Namespace: "meshlet-system"}}},
			{Name: "other.example.com", ClientConfig: admissionregistrationv1.WebhookClientConfig{Service: &admissionregistrationv1.ServiceReference{Name: "other", Namespace: "x"}}},
		},
	}
	client := fake.NewClientset(wc)
	now := time.Now()
	cfg := WebhookCertsConfig{Client: client, Namespace: "meshlet-system", SecretName: DefaultSecretName, ServiceName: DefaultServiceName,
		WebhookConfigName: DefaultWebhookConfigName, Now: func() time.Time { return now }}
	a, b := NewSelfManagedCerts(cfg), NewSelfManagedCerts(cfg)
	if err := a.Ensure(ctx); err != nil {
		t.Fatal(err)
	}
	if err := b.Ensure(ctx); err != nil {
		t.Fatal(err)
	}
	ca, cb := leaf(t, a), leaf(t, b)
	if !ca.Equal(cb) {
		t.Error("two replicas serve different certificates")
	}
	got, _ := client.AdmissionregistrationV1().MutatingWebhookConfigurations().Get(ctx, DefaultWebhookConfigName, metav1.GetOptions{})
	bundle := got.Webhooks[0].ClientConfig.CABundle
	if len(bundle) == 0 || len(got.Webhooks[1].ClientConfig.CABundle) != 0 {
		t.Fatalf("caBundle: ours %d bytes, the other webhook's %d (want set, untouched)", len(bundle), len(got.Webhooks[1].ClientConfig.CABundle))
	}
	verify := func(c *x509.Certificate) {
		t.Helper()
		pool := x509.NewCertPool()
		pool.AppendCertsFromPEM(bundle)
		if _, err := c.Verify(x509.VerifyOptions{Roots: pool, DNSName: "meshlet-controlplane.meshlet-system.svc", CurrentTime: now}); err != nil {
			t.Errorf("serving certificate does not verify against caBundle: %v", err)
		}
	}
	verify(ca)

	// Nothing due: nothing changes.
	sec1, _ := client.CoreV1().Secrets("meshlet-system").Get(ctx, DefaultSecretName, metav1.GetOptions{})
	if err := a.Ensure(ctx); err != nil {
		t.Fatal(err)
	}
	sec2, _ := client.CoreV1().Secrets("meshlet-system").Get(ctx, DefaultSecretName, metav1.GetOptions{})
	if !bytes.Equal(sec1.Data[corev1.TLSCertKey], sec2.Data[corev1.TLSCertKey]) {
		t.Error("a valid certificate was replaced")
	}

	// Past two thirds of its year: renewed, same CA, caBundle unchanged.
	now = now.Add(ServingLifetime * 2 / 3).Add(time.Hour)
	if err := a.Ensure(ctx); err != nil {
		t.Fatal(err)
	}
	renewed := leaf(t, a)
	if renewed.Equal(ca) || !renewed.NotAfter.After(ca.NotAfter) {
		t.Errorf("serving certificate not renewed: %v → %v", ca.NotAfter, renewed.NotAfter)
	}
	got, _ = client.AdmissionregistrationV1().MutatingWebhookConfigurations().Get(ctx, DefaultWebhookConfigName, metav1.GetOptions{})
	if !bytes.Equal(got.Webhooks[0].ClientConfig.CABundle, bundle) {
		t.Error("caBundle changed on a serving certificate renewal")
	}
	verify(renewed)
	if err := b.Ensure(ctx); err != nil {
		t.Fatal(err)
	}
	if !leaf(t, b).Equal(renewed) {
		t.Error("the other replica did not pick up the renewal")
	}
}

func leaf(t *testing.T, m *SelfManagedCerts) *x509.Certificate {
	t.Helper()
	c, err := m.GetCertificate(&tls.ClientHelloInfo{})
	if err != nil {
		t.Fatal(err)
	}
	x, err := x509.ParseCertificate(c.Certificate[0])
	if err != nil {
		t.Fatal(err)
	}
	return x
}
