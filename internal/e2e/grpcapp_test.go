package e2e

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/interop"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/reflection"
	"google.golang.org/grpc/status"
)

// interopClientEnv makes the test binary run grpc-go's interop client
// cases (google.golang.org/grpc/interop) against the address it names, one
// line "ok <case>" per case that passed. The helpers end the process on a
// failure (grpclog Fatal), hence a process of their own.
const interopClientEnv = "MESHLET_E2E_INTEROP_CLIENT"

// interopCases are grpc-go's interop test cases that need no credentials
// or load balancing, in the order of the interop test descriptions.
var interopCases = []struct {
	name string
	run  func(ctx context.Context, tc testgrpc.TestServiceClient, cc *grpc.ClientConn)
}{
	{"empty_unary", func(ctx context.Context, tc testgrpc.TestServiceClient, _ *grpc.ClientConn) {
		interop.DoEmptyUnaryCall(ctx, tc)
	}},
	{"large_unary", func(ctx context.Context, tc testgrpc.TestServiceClient, _ *grpc.ClientConn) {
		interop.DoLargeUnaryCall(ctx, tc)
	}},
	{"client_streaming", func(ctx context.Context, tc testgrpc.TestServiceClient, _ *grpc.ClientConn) {
		interop.DoClientStreaming(ctx, tc)
	}},
	{"server_streaming", func(ctx context.Context, tc testgrpc.TestServiceClient, _ *grpc.ClientConn) {
		interop.DoServerStreaming(ctx, tc)
	}},
	{"ping_pong", func(ctx context.Context, tc testgrpc.TestServiceClient, _ *grpc.ClientConn) {
		interop.DoPingPong(ctx, tc)
	}},
	{"empty_stream", func(ctx context.Context, tc testgrpc.TestServiceClient, _ *grpc.ClientConn) {
		interop.DoEmptyStream(ctx, tc)
	}},
	{"timeout_on_sleeping_server", func(ctx context.Context, tc testgrpc.TestServiceClient, _ *grpc.ClientConn) {
		interop.DoTimeoutOnSleepingServer(ctx, tc)
	}},
	{"cancel_after_begin", func(ctx context.Context, tc testgrpc.TestServiceClient, _ *grpc.ClientConn) {
		interop.DoCancelAfterBegin(ctx, tc)
	}},
	{"cancel_after_first_response", func(ctx context.Context, tc testgrpc.TestServiceClient, _ *grpc.ClientConn) {
		interop.DoCancelAfterFirstResponse(ctx, tc)
	}},
	{"status_code_and_message", func(ctx context.Context, tc testgrpc.TestServiceClient, _ *grpc.ClientConn) {
		interop.DoStatusCodeAndMessage(ctx, tc)
	}},
	{"special_status_message", func(ctx context.Context, tc testgrpc.TestServiceClient, _ *grpc.ClientConn) {
		interop.DoSpecialStatusMessage(ctx, tc)
	}},
	{"custom_metadata", func(ctx context.Context, tc testgrpc.TestServiceClient, _ *grpc.ClientConn) {
		interop.DoCustomMetadata(ctx, tc)
	}},
	{"unimplemented_method", func(ctx context.Context, _ testgrpc.TestServiceClient, cc *grpc.ClientConn) {
		interop.DoUnimplementedMethod(ctx, cc)
	}},
	{"unimplemented_service", func(ctx context.Context, _ testgrpc.TestServiceClient, cc *grpc.ClientConn) {
		interop.DoUnimplementedService(ctx, testgrpc.NewUnimplementedServiceClient(cc))
	}},
}

// runInteropClient runs every interop case against addr on one
// connection, as grpc-go's interop client does.
func runInteropClient(addr string) int {
	cc, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		fmt.Println("error", err)
		return 1
	}
	defer cc.Close()
	tc := testgrpc.NewTestServiceClient(cc)
	for _, c := range interopCases {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		c.run(ctx, tc, cc)
		cancel()
		fmt.Println("ok", c.name)
	}
	return 0
}

// runInteropCases runs grpc-go's interop client cases against addr in a
// child process and fails t with the case that failed.
func runInteropCases(t *testing.T, addr string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), interopClientEnv+"="+addr)
	out, err := cmd.CombinedOutput()
	passed := map[string]bool{}
	for line := range strings.Lines(string(out)) {
		if f := strings.Fields(line); len(f) == 2 && f[0] == "ok" {
			passed[f[1]] = true
		}
	}
	for _, c := range interopCases {
		if !passed[c.name] {
			t.Errorf("interop case %s did not pass (client: %v):\n%s", c.name, err, out)
			return
		}
	}
	if err != nil {
		t.Errorf("interop client: %v\n%s", err, out)
	}
}

// grpcApp is the app under test behind the sidecars: grpc-go's interop
// TestService (with server reflection, for ghz) and interceptors that let
// a test see what the server saw of each call tagged "x-probe: <id>".
type grpcApp struct {
	port int

	mu     sync.Mutex // guards probes
	probes map[string]probe

	// streamed counts messages sent by StreamingOutputCall streams tagged
	// with a probe id, by id.
	streamed sync.Map // id → *atomic.Int64
}

// probe is what the server saw of a tagged call.
type probe struct {
	deadline time.Time // the call's deadline at the server; zero without one
	ended    time.Time // when the server saw the call's context end (sleep calls)
	endErr   error
	arrived  time.Time
}

// Metadata keys the interceptors understand.
const (
	probeKey = "x-probe"
	// sleepKey makes the server hold the call until its context ends.
	sleepKey = "x-sleep"
)

func startGRPCApp(t *testing.T) *grpcApp {
	t.Helper()
	a := &grpcApp{probes: map[string]probe{}}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	a.port = l.Addr().(*net.TCPAddr).Port
	s := grpc.NewServer(grpc.UnaryInterceptor(a.unary), grpc.StreamInterceptor(a.stream))
	testgrpc.RegisterTestServiceServer(s, interop.NewTestServer())
	reflection.Register(s)
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = s.Serve(l)
	}()
	t.Cleanup(func() {
		s.Stop()
		<-done
	})
	return a
}

func (a *grpcApp) record(ctx context.Context) (string, metadata.MD) {
	md, _ := metadata.FromIncomingContext(ctx)
	id := first(md, probeKey)
	if id == "" {
		return "", md
	}
	p := probe{arrived: time.Now()}
	p.deadline, _ = ctx.Deadline()
	a.mu.Lock()
	a.probes[id] = p
	a.mu.Unlock()
	return id, md
}

func (a *grpcApp) unary(ctx context.Context, req any, _ *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
	id, md := a.record(ctx)
	if id != "" && first(md, sleepKey) != "" {
		<-ctx.Done()
		a.mu.Lock()
		p := a.probes[id]
		p.ended, p.endErr = time.Now(), ctx.Err()
		a.probes[id] = p
		a.mu.Unlock()
		return nil, status.FromContextError(ctx.Err()).Err()
	}
	if first(md, detailsKey) != "" {
		// The interop handler sends the echoed header and sets the echoed
		// trailer; the call then fails with rich status details.
		if _, err := h(ctx, req); err != nil {
			return nil, err
		}
		return nil, detailsError()
	}
	return h(ctx, req)
}

func (a *grpcApp) stream(srv any, ss grpc.ServerStream, _ *grpc.StreamServerInfo, h grpc.StreamHandler) error {
	id, _ := a.record(ss.Context())
	if id == "" {
		return h(srv, ss)
	}
	n, _ := a.streamed.LoadOrStore(id, new(atomic.Int64))
	return h(srv, &countingStream{ServerStream: ss, n: n.(*atomic.Int64)})
}

func (a *grpcApp) probe(id string) (probe, bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	p, ok := a.probes[id]
	return p, ok
}

// sent returns the messages the server has sent on the stream tagged id.
func (a *grpcApp) sent(id string) int64 {
	if n, ok := a.streamed.Load(id); ok {
		return n.(*atomic.Int64).Load()
	}
	return 0
}

// countingStream counts the messages the server sends.
type countingStream struct {
	grpc.ServerStream
	n *atomic.Int64
}

func (s *countingStream) SendMsg(m any) error {
	err := s.ServerStream.SendMsg(m)
	if err == nil {
		s.n.Add(1)
	}
	return err
}

func first(md metadata.MD, key string) string {
	if v := md.Get(key); len(v) > 0 {
		return v[0]
	}
	return ""
}

// dialGRPC opens a grpc-go client connection to addr (plaintext h2c, as an
// app in the mesh talks to its sidecar).
func dialGRPC(t *testing.T, addr string) *grpc.ClientConn {
	t.Helper()
	cc, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	return cc
}

// wantCode fails t unless err has the gRPC status code want.
func wantCode(t *testing.T, what string, err error, want codes.Code) {
	t.Helper()
	if got := status.Code(err); got != want {
		t.Errorf("%s: status %v (%v), want %v", what, got, err, want)
	}
}
