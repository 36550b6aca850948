package tcpproxy

import (
	"bufio"
	"context"
	"io"
	"log/slog"
	"net"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/meshlet/meshlet/internal/testutil"
	"github.com/meshlet/meshlet/sidecar/cluster"
	"github.com/meshlet/meshlet/sidecar/config"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// serve runs a TCP proxy to upstream and returns its address.
func serve(t *testing.T, upstream string) string {
	t.Helper()
	clusters := cluster.NewManager(nil, nil, nil)
	t.Cleanup(clusters.Close)
	clusters.Update(map[string]*config.Cluster{"u": {Name: "u", Type: config.ClusterStatic, ConnectTimeout: time.Second,
		Static: &config.LoadAssignment{Endpoints: []config.Endpoint{{Address: upstream, Weight: 1}}}}}, nil)
	p := New(&config.Listener{Name: "l", Chains: []*config.FilterChain{{TCP: &config.TCPProxy{Cluster: "u", MaxConnectAttempts: 1}}}}, false, clusters, slog.New(slog.NewTextHandler(io.Discard, nil)), nil)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			p.Handle(c)
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		p.Shutdown(ctx)
	})
	return ln.Addr().String()
}

// listen serves handle on a loopback port (testutil.ServeTCP).
func listen(t *testing.T, handle func(net.Conn)) string {
	t.Helper()
	return testutil.ServeTCP(t, handle)
}

func TestClientHalfCloseReachesUpstream(t *testing.T) {
	// The upstream reads until EOF, then answers: it only works if the
	// client's half-close crosses the proxy.
	up := listen(t, func(c net.Conn) {
		b, _ := io.ReadAll(c)
		_, _ = c.Write([]byte("got " + strings.ToUpper(string(b))))
	})
	conn, err := net.Dial("tcp", serve(t, up))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(5 * time.Second))
	conn.Write([]byte("hello"))
	conn.(*net.TCPConn).CloseWrite()
	reply, err := io.ReadAll(conn)
	if err != nil || string(reply) != "got HELLO" {
		t.Fatalf("reply %q, %v; want \"got HELLO\" then EOF", reply, err)
	}
}

func TestServerFirstProtocol(t *testing.T) {
	up := listen(t, func(c net.Conn) {
		c.Write([]byte("220 ready\n")) // speaks before the client does
		line, _ := bufio.NewReader(c).ReadString('\n')
		c.Write([]byte("echo " + line))
	})
	conn, err := net.Dial("tcp", serve(t, up))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(5 * time.Second))
	r := bufio.NewReader(conn)
	if banner, _ := r.ReadString('\n'); banner != "220 ready\n" {
		t.Fatalf("banner %q", banner)
	}
	conn.Write([]byte("hi\n"))
	if got, _ := r.ReadString('\n'); got != "echo hi\n" {
		t.Fatalf("got %q", got)
	}
}

func TestNoUpstreamClosesTheConnection(t *testing.T) {
	closed := func() string {
		l, _ := net.Listen("tcp", "127.0.0.1:0")
		defer l.Close()
		return l.Addr().String()
	}()
	conn, err := net.Dial("tcp", serve(t, closed))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := conn.Read(make([]byte, 1)); err != io.EOF {
		t.Fatalf("read = %v, want EOF (connect failure closes the downstream)", err)
	}
}
