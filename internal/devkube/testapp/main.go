// Command testapp is the small program internal/devkube's tests run in pods
// (image meshlet.local/devkube-testapp:dev, built static). The image has no
// shell, so the client side of the tests is subcommands of the same binary:
//
//	testapp serve ADDR            HTTP on ADDR: GET / answers "hello from <hostname> to <client addr>"
//	testapp get [-timeout D] URL  GET URL, retrying until it answers 200 or D (default 30s) passes;
//	                              prints the body; exit 1 on failure
//	testapp lookup NAME           resolve NAME with the pod's resolv.conf (Go's resolver);
//	                              prints one address a line; exit 1 on failure
//	testapp serve-grpc ADDR       gRPC on ADDR (h2c): the standard health service (grpc.health.v1),
//	                              SERVING for "" and for the service named by the pod's hostname
//	testapp grpc-check [-timeout D] [-service S] ADDR
//	                              call grpc.health.v1.Health/Check on ADDR (h2c), retrying until it
//	                              answers SERVING or D (default 30s) passes; prints the status;
//	                              exit 1 on failure
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: testapp serve ADDR | get [-timeout D] URL | lookup NAME | serve-grpc ADDR | grpc-check [-timeout D] [-service S] ADDR")
		os.Exit(2)
	}
	var err error
	switch os.Args[1] {
	case "serve":
		err = serve(os.Args[2:])
	case "get":
		err = get(os.Args[2:])
	case "lookup":
		err = lookup(os.Args[2:])
	case "serve-grpc":
		err = serveGRPC(os.Args[2:])
	case "grpc-check":
		err = grpcCheck(os.Args[2:])
	default:
		err = fmt.Errorf("unknown command %q", os.Args[1])
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "testapp:", err)
		os.Exit(1)
	}
}

func serve(args []string) error {
	if len(args) != 1 {
		return errors.New("serve: want ADDR")
	}
	host, _ := os.Hostname()
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	mux := http.NewServeMux()
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "hello from %s to %s\n", host, r.RemoteAddr)
	})
	srv := &http.Server{Addr: args[0], Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	errc := make(chan error, 1)
	go func() { errc <- srv.ListenAndServe() }()
	log.Info("testapp: serving", "addr", args[0], "host", host)
	select {
	case err := <-errc:
		return fmt.Errorf("serve: %w", err)
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	return srv.Shutdown(sctx)
}

func get(args []string) error {
	fl := flag.NewFlagSet("get", flag.ContinueOnError)
	timeout := fl.Duration("timeout", 30*time.Second, "give up after this long")
	if err := fl.Parse(args); err != nil {
		return err
	}
	if fl.NArg() != 1 {
		return errors.New("get: want URL")
	}
	url := fl.Arg(0)
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	client := &http.Client{Timeout: 5 * time.Second}
	var lastErr error
	for {
		body, err := getOnce(ctx, client, url)
		if err == nil {
			fmt.Print(body)
			return nil
		}
		lastErr = err
		select {
		case <-ctx.Done():
			return fmt.Errorf("get %s: %w", url, lastErr)
		case <-time.After(500 * time.Millisecond):
		}
	}
}

func getOnce(ctx context.Context, client *http.Client, url string) (string, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return "", err
	}
	resp, err := client.Do(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return "", err
	}
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("status %s", resp.Status)
	}
	return string(b), nil
}

func lookup(args []string) error {
	if len(args) != 1 {
		return errors.New("lookup: want NAME")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	addrs, err := net.DefaultResolver.LookupHost(ctx, args[0])
	if err != nil {
		return fmt.Errorf("lookup %s: %w", args[0], err)
	}
	for _, a := range addrs {
		fmt.Println(a)
	}
	return nil
}

func serveGRPC(args []string) error {
	if len(args) != 1 {
		return errors.New("serve-grpc: want ADDR")
	}
	host, _ := os.Hostname()
	l, err := net.Listen("tcp", args[0])
	if err != nil {
		return fmt.Errorf("serve-grpc: %w", err)
	}
	srv := grpc.NewServer()
	hs := health.NewServer()
	hs.SetServingStatus("", healthpb.HealthCheckResponse_SERVING)
	hs.SetServingStatus(host, healthpb.HealthCheckResponse_SERVING)
	healthpb.RegisterHealthServer(srv, hs)
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	go func() {
		<-ctx.Done()
		srv.GracefulStop()
	}()
	slog.Info("testapp: serving gRPC", "addr", args[0], "host", host)
	return srv.Serve(l)
}

func grpcCheck(args []string) error {
	fl := flag.NewFlagSet("grpc-check", flag.ContinueOnError)
	timeout := fl.Duration("timeout", 30*time.Second, "give up after this long")
	service := fl.String("service", "", "the health service to check")
	if err := fl.Parse(args); err != nil {
		return err
	}
	if fl.NArg() != 1 {
		return errors.New("grpc-check: want ADDR")
	}
	conn, err := grpc.NewClient("passthrough:///"+fl.Arg(0), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return err
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	client := healthpb.NewHealthClient(conn)
	var lastErr error
	for {
		cctx, ccancel := context.WithTimeout(ctx, 5*time.Second)
		resp, err := client.Check(cctx, &healthpb.HealthCheckRequest{Service: *service})
		ccancel()
		if err == nil && resp.GetStatus() == healthpb.HealthCheckResponse_SERVING {
			fmt.Println(resp.GetStatus())
			return nil
		}
		lastErr = err
		if err == nil {
			lastErr = fmt.Errorf("status %s", resp.GetStatus())
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("grpc-check %s: %w", fl.Arg(0), lastErr)
		case <-time.After(500 * time.Millisecond):
		}
	}
}
