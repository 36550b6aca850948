package xdsclient

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/meshlet/meshlet/controlplane/servingcert"
	"github.com/meshlet/meshlet/internal/testutil"
	"github.com/meshlet/meshlet/xds"
)

// tokenServer is an ADS server over TLS that records the authorization
// metadata of every stream and refuses each (PermissionDenied), so the
// client opens the next one.
type tokenServer struct {
	discovery.UnimplementedAggregatedDiscoveryServiceServer
	addr, caFile string

	mu     sync.Mutex
	tokens []string
}

func (s *tokenServer) StreamAggregatedResources(stream discovery.AggregatedDiscoveryService_StreamAggregatedResourcesServer) error {
	md, _ := metadata.FromIncomingContext(stream.Context())
	s.mu.Lock()
	s.tokens = append(s.tokens, strings.Join(md.Get(xds.AuthorizationMetadataKey), ","))
	s.mu.Unlock()
	return status.Error(codes.PermissionDenied, "meshlet: xDS stream refused (wrong_node): a test refuses every stream")
}

func (s *tokenServer) seen() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string(nil), s.tokens...)
}

func startTokenServer(t *testing.T) *tokenServer {
	t.Helper()
	dir, err := servingcert.OpenDir(servingcert.DirConfig{Dir: t.TempDir(), Names: servingcert.LocalNames("127.0.0.1:0"),
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &tokenServer{addr: lis.Addr().String(), caFile: dir.CAFile()}
	g := grpc.NewServer(grpc.Creds(credentials.NewTLS(&tls.Config{GetCertificate: dir.GetCertificate})))
	discovery.RegisterAggregatedDiscoveryServiceServer(g, s)
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = g.Serve(lis)
	}()
	t.Cleanup(func() {
		g.Stop()
		<-done
	})
	return s
}

func writeFile(t *testing.T, path, content string) {
	t.Helper()
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil { // as the kubelet swaps a projected token
		t.Fatal(err)
	}
}

// runClient runs a client with creds against srv until the test ends; its
// log goes to logs.
func runClient(t *testing.T, addr string, creds Credentials, logs io.Writer) {
	t.Helper()
	c, err := New(Config{Server: addr, Node: &core.Node{Id: "n1"}, Handler: newRecorder(), Credentials: creds,
		Logger: slog.New(slog.NewTextHandler(logs, nil)), MinBackoff: 10 * time.Millisecond, MaxBackoff: 50 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- c.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; !errors.Is(err, context.Canceled) {
			t.Errorf("Run: %v", err)
		}
	})
}

// syncBuffer is a log sink safe for the client's goroutine and the test's.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}

// TestTokenRotatedIsSentOnTheNextStream: the token file is read at every
// stream, so the kubelet's rotation is used without a restart; the
// refusal's reason is logged.
func TestTokenRotatedIsSentOnTheNextStream(t *testing.T) {
	srv := startTokenServer(t)
	tokenFile := filepath.Join(t.TempDir(), "token")
	writeFile(t, tokenFile, "first-token\n")
	var logs syncBuffer
	runClient(t, srv.addr, Credentials{CAFile: srv.caFile, TokenFile: tokenFile}, &logs)
	has := func(tok string) func() bool {
		return func() bool {
			for _, s := range srv.seen() {
				if s == xds.BearerPrefix+tok {
					return true
				}
			}
			return false
		}
	}
	testutil.Until(t, 10*time.Second, "a stream with the first token", has("first-token"))
	writeFile(t, tokenFile, "rotated-token")
	testutil.Until(t, 10*time.Second, "a stream with the rotated token", has("rotated-token"))
	testutil.Until(t, 10*time.Second, "the refusal logged", func() bool {
		return strings.Contains(logs.String(), "refused this proxy's stream") && strings.Contains(logs.String(), "wrong_node")
	})
}

// TestWrongCARefusesTheControlPlane: a sidecar given another CA bundle
// never opens a stream (so never sends its token) and says why.
func TestWrongCARefusesTheControlPlane(t *testing.T) {
	srv := startTokenServer(t)
	other := startTokenServer(t) // its CA did not sign srv's certificate
	tokenFile := filepath.Join(t.TempDir(), "token")
	writeFile(t, tokenFile, "secret-token")
	var logs syncBuffer
	runClient(t, srv.addr, Credentials{CAFile: other.caFile, TokenFile: tokenFile}, &logs)
	testutil.Until(t, 10*time.Second, "the certificate refused in the log", func() bool {
		return strings.Contains(logs.String(), "does not verify against "+other.caFile)
	})
	if s := srv.seen(); len(s) != 0 {
		t.Fatalf("the server got streams (tokens %q) though its certificate does not verify", s)
	}
}

// TestServerNameChecked: the certificate must carry the name dialled
// (here a name it does not have).
func TestServerNameChecked(t *testing.T) {
	srv := startTokenServer(t)
	tokenFile := filepath.Join(t.TempDir(), "token")
	writeFile(t, tokenFile, "secret-token")
	var logs syncBuffer
	runClient(t, srv.addr, Credentials{CAFile: srv.caFile, TokenFile: tokenFile, ServerName: "meshlet-controlplane.elsewhere.svc"}, &logs)
	testutil.Until(t, 10*time.Second, "the name refused in the log", func() bool {
		return strings.Contains(logs.String(), "not meshlet-controlplane.elsewhere.svc") && strings.Contains(logs.String(), "does not verify")
	})
	if s := srv.seen(); len(s) != 0 {
		t.Fatalf("the server got streams %q", s)
	}
}

func TestCredentialsValidate(t *testing.T) {
	for _, tc := range []struct {
		name  string
		c     Credentials
		error string
	}{
		{name: "nothing", c: Credentials{}, error: "ADS runs over TLS with a token"},
		{name: "no token", c: Credentials{CAFile: "ca.crt"}, error: "-token-file is required"},
		{name: "no CA", c: Credentials{TokenFile: "token"}, error: "-xds-ca-file is required"},
		{name: "insecure with a token", c: Credentials{Insecure: true, TokenFile: "token"}, error: "sends no token"},
		{name: "complete", c: Credentials{CAFile: "ca.crt", TokenFile: "token"}},
		{name: "insecure", c: Credentials{Insecure: true}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.c.Validate()
			if tc.error == "" && err != nil || tc.error != "" && (err == nil || !strings.Contains(err.Error(), tc.error)) {
				t.Fatalf("Validate() = %v, want %q", err, tc.error)
			}
		})
	}
	dir := t.TempDir()
	empty := filepath.Join(dir, "empty")
	writeFile(t, empty, "  \n")
	if _, err := (Credentials{CAFile: filepath.Join(dir, "missing"), TokenFile: empty}).DialOptions(); err == nil || !strings.Contains(err.Error(), "CA file") {
		t.Fatalf("missing CA file: %v", err)
	}
}

// TestProbeReportsTheRefusal: Probe returns the control plane's refusal
// (its gRPC status and reason), with or without a token.
func TestProbeReportsTheRefusal(t *testing.T) {
	srv := startTokenServer(t)
	tokenFile := filepath.Join(t.TempDir(), "token")
	writeFile(t, tokenFile, "some-token")
	for _, tok := range []string{"", tokenFile} {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		res, err := Probe(ctx, srv.addr, Credentials{CAFile: srv.caFile, TokenFile: tok}, &core.Node{Id: "api-1-sidecar-proxy"})
		cancel()
		if status.Code(err) != codes.PermissionDenied || !strings.Contains(err.Error(), "wrong_node") || res != nil {
			t.Fatalf("token file %q: %v %v, want the refusal", tok, res, err)
		}
	}
	if got := srv.seen(); len(got) != 2 || got[0] != "" || got[1] != xds.BearerPrefix+"some-token" {
		t.Fatalf("tokens seen %q", got)
	}
}
