package httpproxy

import (
	"context"
	"net"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/interop"
	testpb "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/status"

	"github.com/meshlet/meshlet/xds"
)

// TestGRPCStreamEndedByServerWhileClientSends: a bidirectional stream the
// server ends with its status while the client's side is still open (no
// CloseSend) reaches the client at once, messages and status, through the
// proxy; request messages larger than the replay buffer stream through.
func TestGRPCStreamEndedByServerWhileClientSends(t *testing.T) {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	gs := grpc.NewServer()
	testpb.RegisterTestServiceServer(gs, interop.NewTestServer())
	go func() { _ = gs.Serve(lis) }()
	defer gs.Stop()

	conn, err := grpc.NewClient(proxy(t, xds.ProtocolGRPC, 0, lis.Addr().String()), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	tc := testpb.NewTestServiceClient(conn)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()

	stream, err := tc.FullDuplexCall(ctx)
	if err != nil {
		t.Fatal(err)
	}
	big := &testpb.Payload{Body: make([]byte, 300<<10)} // beyond the 64 KiB replay buffer
	for _, req := range []*testpb.StreamingOutputCallRequest{
		{ResponseParameters: []*testpb.ResponseParameters{{Size: 10}}, Payload: big},
		{ResponseStatus: &testpb.EchoStatus{Code: int32(codes.FailedPrecondition), Message: "done"}},
	} {
		if err := stream.Send(req); err != nil {
			t.Fatal(err)
		}
	}
	start := time.Now()
	if m, err := stream.Recv(); err != nil || len(m.GetPayload().GetBody()) != 10 {
		t.Fatalf("first message: %v %v", m, err)
	}
	_, err = stream.Recv()
	if st := status.Convert(err); st.Code() != codes.FailedPrecondition || st.Message() != "done" {
		t.Errorf("stream ended with %v after %v, want FailedPrecondition \"done\"", err, time.Since(start))
	}
}

// TestGRPCLocalRepliesAreGRPCStatuses: a gRPC request the sidecar fails
// itself is answered as gRPC clients expect (trailers-only, grpc-status),
// not with a plain-text HTTP error: UNAVAILABLE with the typed reason in
// the message when no endpoint answers, DEADLINE_EXCEEDED once the call's
// own grpc-timeout has run out.
func TestGRPCLocalRepliesAreGRPCStatuses(t *testing.T) {
	closed, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := closed.Addr().String()
	closed.Close() // connection refused
	conn, err := grpc.NewClient(proxy(t, xds.ProtocolGRPC, 0, addr), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	tc := testpb.NewTestServiceClient(conn)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_, err = tc.EmptyCall(ctx, &testpb.Empty{})
	if st := status.Convert(err); st.Code() != codes.Unavailable || st.Message() != "meshlet: "+string(xds.ReasonConnectFailure) {
		t.Errorf("refused upstream: %v, want Unavailable %q", err, "meshlet: "+xds.ReasonConnectFailure)
	}

	if code := grpcCodeFor(403); code != int(codes.PermissionDenied) {
		t.Errorf("403 → %d, want PermissionDenied", code)
	}
	for _, tc := range []struct {
		in   string
		want time.Duration
		ok   bool
	}{{"500m", 500 * time.Millisecond, true}, {"1S", time.Second, true}, {"2H", 2 * time.Hour, true}, {"x", 0, false}, {"5", 0, false}, {"123456789m", 0, false}, {"10k", 0, false}} {
		if d, ok := grpcTimeout(tc.in); d != tc.want || ok != tc.ok {
			t.Errorf("grpcTimeout(%q) = %v %v, want %v %v", tc.in, d, ok, tc.want, tc.ok)
		}
	}
}
