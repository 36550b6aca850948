package e2e

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"

	"hash"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// restApp is the HTTP/1.1 app behind the sidecars:
//
//	/echo     any method: answers JSON with what arrived (method, host,
//	          body size and SHA-256, headers, trailers); its response names
//	          X-Resp-Hop in Connection (a hop-by-hop header to drop)
//	/stream   ?size=N: N pseudo-random bytes, chunked (no Content-Length),
//	          with the SHA-256 in the trailer X-Checksum
//	/reject   413 at once, without reading the request body
type echoed struct {
	Method   string              `json:"method"`
	Host     string              `json:"host"`
	Bytes    int64               `json:"bytes"`
	SHA256   string              `json:"sha256"`
	Headers  map[string][]string `json:"headers"`
	Trailers map[string][]string `json:"trailers"`
	Chunked  bool                `json:"chunked"`
}

func restApp(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/echo", func(w http.ResponseWriter, r *http.Request) {
		h := sha256.New()
		n, _ := io.Copy(h, r.Body)
		w.Header().Set("Connection", "X-Resp-Hop")
		w.Header().Set("X-Resp-Hop", "drop me")
		w.Header().Set("Keep-Alive", "timeout=1")
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(echoed{Method: r.Method, Host: r.Host, Bytes: n, SHA256: hex.EncodeToString(h.Sum(nil)),
			Headers: r.Header, Trailers: r.Trailer, Chunked: len(r.TransferEncoding) > 0})
	})
	mux.HandleFunc("/stream", func(w http.ResponseWriter, r *http.Request) {
		size, _ := strconv.ParseInt(r.URL.Query().Get("size"), 10, 64)
		w.Header().Set("Trailer", "X-Checksum")
		h := sha256.New()
		_, _ = io.Copy(io.MultiWriter(w, h), io.LimitReader(newPattern(7), size))
		w.Header().Set("X-Checksum", hex.EncodeToString(h.Sum(nil)))
	})
	mux.HandleFunc("/reject", func(w http.ResponseWriter, _ *http.Request) {
		http.Error(w, "too large", http.StatusRequestEntityTooLarge)
	})
	srv := &http.Server{Handler: mux}
	done := make(chan struct{})
	go func() { defer close(done); _ = srv.Serve(l) }()
	t.Cleanup(func() { _ = srv.Close(); <-done })
	return l.Addr().(*net.TCPAddr).Port
}

// pattern is a cheap deterministic byte stream.
type pattern struct{ r *rand.ChaCha8 }

func newPattern(seed byte) *pattern {
	var s [32]byte
	s[0] = seed
	return &pattern{rand.NewChaCha8(s)}
}

func (p *pattern) Read(b []byte) (int, error) { return p.r.Read(b) }

func sumOf(seed byte, size int64) string {
	h := sha256.New()
	_, _ = io.Copy(h, io.LimitReader(newPattern(seed), size))
	return hex.EncodeToString(h.Sum(nil))
}

// curl runs the real curl client; it fails the test when curl is missing.
func curl(t *testing.T, stdin io.Reader, stdout io.Writer, args ...string) (stderr string) {
	t.Helper()
	bin, err := exec.LookPath("curl")
	if err != nil {
		t.Fatal("curl not found: install the Debian package curl (.ci/run does)")
	}
	cmd := exec.Command(bin, append([]string{"-sS", "--max-time", "120"}, args...)...)
	cmd.Stdin, cmd.Stdout = stdin, stdout
	var eb bytes.Buffer
	cmd.Stderr = &eb
	if err := cmd.Run(); err != nil {
		t.Fatalf("curl %s: %v\n%s", strings.Join(args, " "), err, eb.String())
	}
	return eb.String()
}

func curlJSON(t *testing.T, args ...string) echoed {
	t.Helper()
	var out bytes.Buffer
	curl(t, nil, &out, args...)
	var e echoed
	if err := json.Unmarshal(out.Bytes(), &e); err != nil {
		t.Fatalf("curl %v: %v: %q", args, err, out.String())
	}
	return e
}

// TestHTTP11RESTThroughSidecars: curl and Go's client through two sidecar
// processes with mTLS to an HTTP/1.1 app: every method, chunked bodies
// both ways, Expect: 100-continue (accepted and refused), trailers both
// ways, hop-by-hop headers dropped (RFC 9110 §7.6.1), Host and
// X-Forwarded-* kept, and 100 MB uploads and downloads streamed intact with
// the sidecars' peak memory bounded.
func TestHTTP11RESTThroughSidecars(t *testing.T) {
	p := startPair(t, pairOptions{Protocol: "http", AppPort: restApp(t), Processes: true})
	base := "http://" + p.Addr

	t.Run("methods", func(t *testing.T) {
		for _, m := range []string{"GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"} {
			args := []string{"-X", m, base + "/echo"}
			if m != "GET" {
				args = append(args, "--data-binary", "body of "+m)
			}
			e := curlJSON(t, args...)
			if e.Method != m || (m != "GET" && e.Bytes != int64(len("body of "+m))) {
				t.Errorf("%s: app saw %s with %d bytes", m, e.Method, e.Bytes)
			}
		}
		var head bytes.Buffer
		curl(t, nil, &head, "-I", base+"/echo")
		if !strings.HasPrefix(head.String(), "HTTP/1.1 200") || !strings.Contains(head.String(), "Content-Type: application/json") {
			t.Errorf("HEAD: %q", head.String())
		}
	})

	t.Run("chunked bodies", func(t *testing.T) {
		body := bytes.Repeat([]byte("chunk-"), 200_000) // 1.2 MB
		file := filepath.Join(t.TempDir(), "body")
		if err := os.WriteFile(file, body, 0o644); err != nil {
			t.Fatal(err)
		}
		e := curlJSON(t, "-H", "Transfer-Encoding: chunked", "--data-binary", "@"+file, base+"/echo")
		sum := sha256.Sum256(body)
		if !e.Chunked || e.Bytes != int64(len(body)) || e.SHA256 != hex.EncodeToString(sum[:]) {
			t.Errorf("chunked upload: app saw chunked=%v, %d bytes, sha %s", e.Chunked, e.Bytes, e.SHA256)
		}
		var out bytes.Buffer
		curl(t, nil, &out, base+"/stream?size=3000000")
		got := sha256.Sum256(out.Bytes())
		if out.Len() != 3_000_000 || hex.EncodeToString(got[:]) != sumOf(7, 3_000_000) {
			t.Errorf("chunked download: %d bytes", out.Len())
		}
	})

	t.Run("expect 100-continue", func(t *testing.T) {
		body := bytes.Repeat([]byte("e"), 2<<20)
		file := filepath.Join(t.TempDir(), "body")
		if err := os.WriteFile(file, body, 0o644); err != nil {
			t.Fatal(err)
		}
		// curl waits up to 10 s for the 100 before sending the body anyway.
		var out bytes.Buffer
		start := time.Now()
		verbose := curl(t, nil, &out, "-v", "-H", "Expect: 100-continue", "--expect100-timeout", "10", "--data-binary", "@"+file, base+"/echo")
		took := time.Since(start)
		var e echoed
		_ = json.Unmarshal(out.Bytes(), &e)
		if !strings.Contains(verbose, "HTTP/1.1 100 Continue") || took > 5*time.Second || e.Bytes != int64(len(body)) {
			t.Errorf("100-continue: took %v, app got %d bytes, curl saw a 100: %v", took, e.Bytes, strings.Contains(verbose, "100 Continue"))
		}
		if _, ok := e.Headers["Expect"]; ok {
			t.Errorf("the app got Expect %v: the sidecar answers it", e.Headers["Expect"])
		}
		// An app that refuses before reading: the client gets its 413, not a reset.
		big := filepath.Join(t.TempDir(), "big")
		if err := os.WriteFile(big, bytes.Repeat([]byte("r"), 8<<20), 0o644); err != nil {
			t.Fatal(err)
		}
		out.Reset()
		curl(t, nil, &out, "-o", "/dev/null", "-w", "%{http_code}", "-H", "Expect: 100-continue", "--data-binary", "@"+big, base+"/reject")
		if out.String() != "413" {
			t.Errorf("refused upload: status %s, want the app's 413", out.String())
		}
	})

	t.Run("trailers", func(t *testing.T) {
		pr, pw := io.Pipe()
		req, _ := http.NewRequest(http.MethodPost, base+"/echo", pr)
		req.Trailer = http.Header{"X-Req-Trailer": nil}
		go func() {
			_, _ = pw.Write([]byte("streamed body"))
			req.Trailer.Set("X-Req-Trailer", "sent after the body")
			pw.Close()
		}()
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		var e echoed
		_ = json.NewDecoder(resp.Body).Decode(&e)
		resp.Body.Close()
		if got := e.Trailers["X-Req-Trailer"]; len(got) != 1 || got[0] != "sent after the body" {
			t.Errorf("request trailer at the app: %v", e.Trailers)
		}
		resp, err = http.Get(base + "/stream?size=100000")
		if err != nil {
			t.Fatal(err)
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if got := resp.Trailer.Get("X-Checksum"); got != sumOf(7, 100000) {
			t.Errorf("response trailer X-Checksum %q, want the app's", got)
		}
	})

	t.Run("hop-by-hop headers", func(t *testing.T) {
		var hdrs bytes.Buffer
		var body bytes.Buffer
		file := filepath.Join(t.TempDir(), "headers")
		curl(t, nil, &body, "-D", file, "-H", "Connection: keep-alive, X-Hop", "-H", "X-Hop: secret", "-H", "Keep-Alive: timeout=9",
			"-H", "Proxy-Authorization: Basic Zm9vOmJhcg==", "-H", "X-End-To-End: kept", base+"/echo")
		b, _ := os.ReadFile(file)
		hdrs.Write(b)
		var e echoed
		_ = json.Unmarshal(body.Bytes(), &e)
		for _, h := range []string{"X-Hop", "Keep-Alive", "Proxy-Authorization", "Connection"} {
			if v, ok := e.Headers[h]; ok {
				t.Errorf("the app got hop-by-hop %s: %v", h, v)
			}
		}
		if e.Headers["X-End-To-End"] == nil {
			t.Errorf("an end-to-end header was dropped")
		}
		for _, h := range []string{"X-Resp-Hop:", "Keep-Alive:"} {
			if strings.Contains(strings.ToLower(hdrs.String()), strings.ToLower(h)) {
				t.Errorf("the client got hop-by-hop %s in:\n%s", h, hdrs.String())
			}
		}
	})

	t.Run("host and x-forwarded", func(t *testing.T) {
		e := curlJSON(t, "-H", "Host: orders.example", "-H", "X-Forwarded-For: 203.0.113.7", "-H", "X-Forwarded-Host: shop.example", base+"/echo")
		checks := map[string]string{"host": e.Host, "X-Forwarded-For": strings.Join(e.Headers["X-Forwarded-For"], ","),
			"X-Forwarded-Host": strings.Join(e.Headers["X-Forwarded-Host"], ","), "X-Forwarded-Proto": strings.Join(e.Headers["X-Forwarded-Proto"], ",")}
		want := map[string]string{"host": "orders.example", "X-Forwarded-For": "203.0.113.7", "X-Forwarded-Host": "shop.example", "X-Forwarded-Proto": "http"}
		for k, v := range want {
			if checks[k] != v {
				t.Errorf("%s at the app = %q, want %q", k, checks[k], v)
			}
		}
		if e := curlJSON(t, "-H", "X-Forwarded-Proto: https", base+"/echo"); strings.Join(e.Headers["X-Forwarded-Proto"], ",") != "https" {
			t.Errorf("a client's X-Forwarded-Proto was replaced: %v", e.Headers["X-Forwarded-Proto"])
		}
	})

	t.Run("100 MB both ways with bounded memory", func(t *testing.T) {
		const size = 100 << 20
		mib := func(b int64) float64 { return float64(b) / (1 << 20) }
		procs := map[string]*sidecarProc{"down": p.DownProc, "up": p.UpProc}
		before := map[string]int64{}
		for name, sp := range procs {
			before[name], _ = sp.memory(t)
			sp.resetPeak(t)
		}
		// Upload: curl streams stdin (chunked, with Expect: 100-continue).
		var out bytes.Buffer
		curl(t, io.LimitReader(newPattern(3), size), &out, "-T", "-", "-X", "POST", base+"/echo")
		var e echoed
		if err := json.Unmarshal(out.Bytes(), &e); err != nil || e.Bytes != size || e.SHA256 != sumOf(3, size) {
			t.Fatalf("100 MB upload: app got %d bytes (sha ok: %v): %v", e.Bytes, e.SHA256 == sumOf(3, size), err)
		}
		// Download: curl's output hashed as it arrives.
		h := sha256.New()
		cw := &countWriter{w: h}
		curl(t, nil, cw, base+"/stream?size="+strconv.Itoa(size))
		if cw.n != size || hex.EncodeToString(h.Sum(nil)) != sumOf(7, size) {
			t.Fatalf("100 MB download: %d bytes", cw.n)
		}
		for name, sp := range procs {
			_, peak := sp.memory(t)
			t.Logf("%s's sidecar: peak RSS %.1f MiB while streaming 100 MB up and down (%.1f MiB before)", name, mib(peak), mib(before[name]))
			if peak > before[name]+32<<20 {
				t.Errorf("%s's sidecar peaked at %.1f MiB streaming 100 MB, from %.1f MiB: more than 32 MiB for a streamed body", name, mib(peak), mib(before[name]))
			}
		}
	})
}

type countWriter struct {
	w hash.Hash
	n int64
}

func (c *countWriter) Write(p []byte) (int, error) {
	c.n += int64(len(p))
	return c.w.Write(p)
}
