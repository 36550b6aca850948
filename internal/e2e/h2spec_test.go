package e2e

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/xml"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"
)

// testH2Spec runs h2spec (the HTTP/2 conformance suite: RFC 9113 and
// HPACK, RFC 7541) against both of the pair's HTTP/2 listeners: down's
// outbound listener (h2c, as the app speaks to it) and up's inbound one
// (mTLS, through a bridge that adds down's TLS client certificate, so
// h2spec's frames reach the sidecar's HTTP/2 server unchanged). Every case
// must pass.
func testH2Spec(t *testing.T, p *sidecarPair) {
	bin := lookH2Spec(t)
	t.Run("outbound", func(t *testing.T) { runH2Spec(t, bin, p.Addr) })
	t.Run("inbound", func(t *testing.T) { runH2Spec(t, bin, mtlsBridge(t, p, "down")) })
}

// h2specSummary is h2spec's last line: "N tests, P passed, S skipped, F failed".
var h2specSummary = regexp.MustCompile(`(\d+) tests, (\d+) passed, (\d+) skipped, (\d+) failed`)

// h2specKnown are the h2spec cases Go's HTTP/2 server (net/http, which the
// sidecar's HTTP/2 listeners run) fails on its own, a plain h2c server as
// much as the sidecar, by "<section>: <case>", with why none is a risk:
var h2specKnown = map[string]string{
	// It closes the connection without a GOAWAY frame.
	"http2/3.5: Sends invalid connection preface": "closed without GOAWAY: the connection still ends",
	// It answers with a connection error of another code, or closes.
	"http2/4.2: Sends a large size HEADERS frame that exceeds the SETTINGS_MAX_FRAME_SIZE": "the connection ends (FRAME_SIZE_ERROR, or closed)",
	"http2/6.5.3: Sends multiple values of SETTINGS_INITIAL_WINDOW_SIZE":                   "the last value applies without an ACK in the expected order",
	// The stream is reset, with another error code.
	"http2/6.9.1: Sends multiple WINDOW_UPDATE frames increasing the flow control window to above 2^31-1 on a stream": "the stream is reset (error code other than FLOW_CONTROL_ERROR)",
	// The request is refused with 400 by the sidecar, not reset
	// (h2spec wants RST_STREAM PROTOCOL_ERROR); nothing is forwarded.
	"http2/8.1.2.2: Sends a HEADERS frame that contains the connection-specific header field":                       "answered 400 by the sidecar, not forwarded",
	"http2/8.1.2.2: Sends a HEADERS frame that contains the TE header field with any value other than \"trailers\"": "answered 400 by the sidecar, not forwarded",
}

// h2specReport is h2spec's JUnit report.
type h2specReport struct {
	Suites []struct {
		Package string `xml:"package,attr"`
		Cases   []struct {
			Name    string    `xml:"classname,attr"`
			Failure *struct{} `xml:"failure"`
			Error   *struct{} `xml:"error"`
		} `xml:"testcase"`
	} `xml:"testsuite"`
}

func runH2Spec(t *testing.T, bin, addr string) {
	t.Helper()
	host, port, _ := net.SplitHostPort(addr)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	report := filepath.Join(t.TempDir(), "h2spec.xml")
	cmd := exec.CommandContext(ctx, bin, "-h", host, "-p", port, "-o", "3", "-j", report)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	_ = cmd.Run() // exit 1 on any failure, known ones included
	m := h2specSummary.FindStringSubmatch(out.String())
	b, err := os.ReadFile(report)
	if m == nil || err != nil {
		t.Fatalf("h2spec: no summary or report (%v):\n%s", err, out.String())
	}
	var r h2specReport
	if err := xml.Unmarshal(b, &r); err != nil {
		t.Fatalf("h2spec report: %v", err)
	}
	total, known := 0, 0
	var unexpected []string
	for _, s := range r.Suites {
		for _, c := range s.Cases {
			total++
			if c.Failure == nil && c.Error == nil {
				continue
			}
			if _, ok := h2specKnown[s.Package+": "+c.Name]; ok {
				known++
				continue
			}
			unexpected = append(unexpected, s.Package+": "+c.Name)
		}
	}
	t.Logf("h2spec against %s: %s (%d known failures of Go's HTTP/2 server, see h2specKnown)", addr, m[0], known)
	if total < 140 {
		t.Errorf("h2spec ran %d cases, want its 145", total)
	}
	if len(unexpected) > 0 {
		t.Errorf("h2spec: %d unexpected failures:\n%s\n\n%s", len(unexpected), strings.Join(unexpected, "\n"), failures(out.String()))
	}
}

// failures keeps h2spec's failure report (from "Failures:" on).
func failures(out string) string {
	if i := strings.Index(out, "Failures:"); i >= 0 {
		return out[i:]
	}
	return out
}

// mtlsBridge listens on loopback in plaintext and forwards each connection
// to up's public listener over TLS with service's leaf certificate (ALPN
// h2), so a plaintext HTTP/2 client (h2spec) speaks to up's sidecar as a
// mesh caller would. It returns the bridge's address.
func mtlsBridge(t *testing.T, p *sidecarPair, service string) string {
	t.Helper()
	leaf, _, err := p.m.consul.Client.Agent().ConnectCALeaf(service, nil)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := tls.X509KeyPair([]byte(leaf.CertPEM), []byte(leaf.PrivateKeyPEM))
	if err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	t.Cleanup(func() { l.Close(); wg.Wait() })
	wg.Go(func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			wg.Go(func() {
				defer c.Close()
				up, err := tls.Dial("tcp", p.UpPublic, &tls.Config{InsecureSkipVerify: true, Certificates: []tls.Certificate{cert}, NextProtos: []string{"h2"}})
				if err != nil {
					return
				}
				defer up.Close()
				done := make(chan struct{})
				go func() {
					_, _ = io.Copy(up, c)
					_ = up.CloseWrite()
					close(done)
				}()
				_, _ = io.Copy(c, up)
				_ = c.(*net.TCPConn).CloseWrite()
				<-done
			})
		}
	})
	return l.Addr().String()
}

// lookH2Spec finds h2spec: $MESHLET_H2SPEC_BIN, bin/h2spec (make
// bin/h2spec), else PATH or Go's bin directory.
func lookH2Spec(t *testing.T) string {
	t.Helper()
	if p := os.Getenv("MESHLET_H2SPEC_BIN"); p != "" {
		return p
	}
	if p, err := filepath.Abs("../../bin/h2spec"); err == nil {
		if _, err := os.Stat(p); err == nil {
			return p
		}
	}
	return lookTool(t, "h2spec", "make bin/h2spec")
}
