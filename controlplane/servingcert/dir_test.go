package servingcert

import (
	"crypto/x509"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"
)

func quiet() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

func readCerts(t *testing.T, path string) []*x509.Certificate {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	c, err := ParseCerts(b)
	if err != nil || len(c) == 0 {
		t.Fatalf("%s: %v (%d certificates)", path, err, len(c))
	}
	return c
}

// TestDirIssuesOnceAndRenews: the first open issues a CA and a serving
// certificate (keys 0600) that verifies for its names; a reopen reuses
// both; new names reissue only the serving certificate; a CA past two
// thirds of its life is renewed, the old one kept in the bundle.
func TestDirIssuesOnceAndRenews(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "tls")
	now := time.Now()
	clock := func() time.Time { return now }
	names := LocalNames("127.0.0.1:18000", "cp.example.internal")
	d, err := OpenDir(DirConfig{Dir: dir, Names: names, Logger: quiet(), Now: clock})
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{CAKeyFile, KeyFile} {
		if st, err := os.Stat(filepath.Join(dir, f)); err != nil || st.Mode().Perm() != 0o600 {
			t.Fatalf("%s: %v mode %v, want 0600", f, err, st.Mode())
		}
	}
	ca := readCerts(t, d.CAFile())
	serving := readCerts(t, filepath.Join(dir, CertFile))[0]
	roots := x509.NewCertPool()
	roots.AddCert(ca[0])
	for _, name := range []string{"localhost", "127.0.0.1", "cp.example.internal"} {
		if _, err := serving.Verify(x509.VerifyOptions{Roots: roots, DNSName: name}); err != nil {
			t.Fatalf("serving certificate for %s: %v", name, err)
		}
	}
	if _, err := serving.Verify(x509.VerifyOptions{Roots: roots, DNSName: "elsewhere.example"}); err == nil {
		t.Fatal("the serving certificate verifies for a name it was not issued for")
	}

	if _, err := OpenDir(DirConfig{Dir: dir, Names: names, Logger: quiet(), Now: clock}); err != nil {
		t.Fatal(err)
	}
	if again := readCerts(t, filepath.Join(dir, CertFile))[0]; !again.Equal(serving) {
		t.Fatal("a reopen issued a new serving certificate")
	}

	names.IPs = append(names.IPs, net.ParseIP("10.0.0.7").To4())
	if _, err := OpenDir(DirConfig{Dir: dir, Names: names, Logger: quiet(), Now: clock}); err != nil {
		t.Fatal(err)
	}
	if again := readCerts(t, filepath.Join(dir, CertFile))[0]; again.Equal(serving) || !readCerts(t, d.CAFile())[0].Equal(ca[0]) {
		t.Fatal("new names: want a new serving certificate from the same CA")
	}

	now = now.Add(CALifetime * 2 / 3).Add(time.Hour)
	if _, err := OpenDir(DirConfig{Dir: dir, Names: names, Logger: quiet(), Now: clock}); err != nil {
		t.Fatal(err)
	}
	bundle := readCerts(t, d.CAFile())
	if len(bundle) != 2 || bundle[0].Equal(ca[0]) || !bundle[1].Equal(ca[0]) {
		t.Fatalf("after the CA's renewal the bundle holds %d certificates; want the new CA then the old", len(bundle))
	}
	fresh := readCerts(t, filepath.Join(dir, CertFile))[0]
	if err := fresh.CheckSignatureFrom(bundle[0]); err != nil {
		t.Fatalf("the serving certificate is not signed by the new CA: %v", err)
	}
}
