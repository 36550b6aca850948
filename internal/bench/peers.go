package bench

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/interop"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/reflection"
)

// bodySize is the size of every response body: 1 KiB.
const bodySize = 1024

// nginxStreamModule is where Debian's libnginx-mod-stream puts the stream
// module (nginx's TCP proxy), which Debian builds as a dynamic module.
const nginxStreamModule = "/usr/lib/nginx/modules/ngx_stream_module.so"

// appNginxConf is the HTTP app behind every proxy: nginx answering every
// request with 1 KiB from memory, one worker, keep-alive without limits.
// It shares the load generator's CPU, so it must be cheap: nginx returning
// a constant costs a few µs per request, leaving that CPU's ceiling far
// above what one proxy core can forward (a Go net/http app would cap it
// below HAProxy's rate, hiding the proxies' differences).
func appNginxConf(dir string, port int) string {
	return fmt.Sprintf(`worker_processes 1;
daemon off;
pid %[1]s/nginx.pid;
error_log %[1]s/error.log warn;
events { worker_connections 8192; }
http {
    access_log off;
    keepalive_timeout 300s;
    keepalive_requests 100000000;
    default_type application/octet-stream;
    server {
        listen 127.0.0.1:%[2]d backlog=4096;
        location / { return 200 "%[3]s"; }
    }
}
`, dir, port, strings.Repeat("x", bodySize))
}

// haproxyConf is HAProxy 2.6 configured like for like with one sidecar:
// one thread, keep-alive both sides, idle upstream connections shared
// (http-reuse always), no logging.
func haproxyConf(k kind, port int, app hostPort, tlsFiles tlsPaths) string {
	head := `global
    nbthread 1
    maxconn 4000
defaults
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 60s
`
	switch k {
	case kindHTTP:
		return head + fmt.Sprintf(`frontend fe
    mode http
    bind 127.0.0.1:%d
    default_backend be
backend be
    mode http
    http-reuse always
    server app %s
`, port, app)
	case kindGRPC:
		return head + fmt.Sprintf(`frontend fe
    mode http
    bind 127.0.0.1:%d proto h2
    default_backend be
backend be
    mode http
    http-reuse always
    server app %s proto h2
`, port, app)
	case kindRedis, kindConn:
		return head + fmt.Sprintf(`frontend fe
    mode tcp
    bind 127.0.0.1:%d
    default_backend be
backend be
    mode tcp
    server app %s
`, port, app)
	case kindTLS:
		return head + fmt.Sprintf(`frontend fe
    mode tcp
    bind 127.0.0.1:%d ssl crt %s ca-file %s verify required ssl-min-ver TLSv1.3
    default_backend be
backend be
    mode tcp
    server app %s
`, port, tlsFiles.certKey, tlsFiles.roots, app)
	}
	panic("bench: haproxy: unknown kind")
}

// nginxConf is nginx 1.22 configured like for like: one worker, upstream
// keep-alive (HTTP/1.1 and gRPC), no access log.
func nginxConf(dir string, k kind, port int, app hostPort, tlsFiles tlsPaths) string {
	var b strings.Builder
	if k == kindRedis || k == kindConn || k == kindTLS {
		fmt.Fprintf(&b, "load_module %s;\n", nginxStreamModule)
	}
	fmt.Fprintf(&b, `worker_processes 1;
daemon off;
pid %[1]s/nginx.pid;
error_log %[1]s/error.log warn;
events { worker_connections 8192; }
`, dir)
	switch k {
	case kindHTTP:
		fmt.Fprintf(&b, `http {
    access_log off;
    keepalive_timeout 300s;
    keepalive_requests 100000000;
    upstream app {
        server %s;
        keepalive 64;
        keepalive_requests 100000000;
        keepalive_timeout 300s;
    }
    server {
        listen 127.0.0.1:%d backlog=4096;
        location / {
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
`, app, port)
	case kindGRPC:
		fmt.Fprintf(&b, `http {
    access_log off;
    keepalive_timeout 300s;
    keepalive_requests 100000000;
    upstream app {
        server %s;
        keepalive 64;
        keepalive_requests 100000000;
        keepalive_timeout 300s;
    }
    server {
        listen 127.0.0.1:%d http2 backlog=4096;
        location / { grpc_pass grpc://app; }
    }
}
`, app, port)
	case kindRedis, kindConn:
		fmt.Fprintf(&b, `stream {
    server {
        listen 127.0.0.1:%d backlog=4096;
        proxy_pass %s;
    }
}
`, port, app)
	case kindTLS:
		fmt.Fprintf(&b, `stream {
    server {
        listen 127.0.0.1:%d ssl backlog=4096;
        ssl_protocols TLSv1.3;
        ssl_certificate %s;
        ssl_certificate_key %s;
        ssl_client_certificate %s;
        ssl_verify_client on;
        proxy_pass %s;
    }
}
`, port, tlsFiles.cert, tlsFiles.key, tlsFiles.roots, app)
	default:
		panic("bench: nginx: unknown kind")
	}
	return b.String()
}

// tlsPaths are the PEM files HAProxy and nginx terminate mTLS with: the
// conn service's certificate, as up's sidecar presents it.
type tlsPaths struct {
	cert, key, certKey, roots string
}

func writeTLSFiles(dir string, m *mesh) (tlsPaths, error) {
	p := tlsPaths{
		cert:    filepath.Join(dir, "conn.crt"),
		key:     filepath.Join(dir, "conn.key"),
		certKey: filepath.Join(dir, "conn.pem"),
		roots:   filepath.Join(dir, "roots.pem"),
	}
	for path, data := range map[string]string{
		p.cert: m.appLeaf.CertPEM, p.key: m.appLeaf.KeyPEM,
		p.certKey: m.appLeaf.CertPEM + m.appLeaf.KeyPEM, p.roots: m.ca.CertPEM,
	} {
		if err := os.WriteFile(path, []byte(data), 0o600); err != nil {
			return p, err
		}
	}
	return p, nil
}

// ServeGRPCUpstream serves grpc-go's interop TestService (with server
// reflection, which ghz uses) on addr until ctx ends: the gRPC app behind
// the proxies. The harness runs it as a child process pinned next to the
// load generator.
func ServeGRPCUpstream(ctx context.Context, addr string) error {
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	s := grpc.NewServer()
	testgrpc.RegisterTestServiceServer(s, interop.NewTestServer())
	reflection.Register(s)
	go func() {
		<-ctx.Done()
		s.Stop()
	}()
	return s.Serve(l)
}

// waitListening waits until something accepts TCP connections on addr.
func waitListening(ctx context.Context, addr string, timeout time.Duration, p *proc) error {
	deadline := time.Now().Add(timeout)
	for {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			c.Close()
			return nil
		}
		if p != nil {
			if err := p.exited(); err != nil {
				return err
			}
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return fmt.Errorf("bench: nothing listening on %s after %v: %w", addr, timeout, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// hostPort is a loopback TCP address.
type hostPort struct {
	host string
	port int
}

func (h hostPort) String() string { return net.JoinHostPort(h.host, strconv.Itoa(h.port)) }

func loopback(port int) hostPort { return hostPort{"127.0.0.1", port} }
