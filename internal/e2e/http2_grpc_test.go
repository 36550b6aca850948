package e2e

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"runtime"
	"runtime/metrics"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	testpb "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/meshlet/meshlet/internal/testutil"
)

// TestHTTP2AndGRPC is the "HTTP/2 and gRPC" row of the protocol table:
// real grpc-go clients and servers, h2load and ghz, every one through two
// sidecars (down's outbound listener → mTLS → up's inbound listener → the
// app) configured by the control plane from a real Consul agent.
func TestHTTP2AndGRPC(t *testing.T) {
	t.Run("grpc", func(t *testing.T) {
		app := startGRPCApp(t)
		p := startPair(t, pairOptions{Protocol: "grpc", AppPort: app.port})
		// grpc-go's interop client cases: unary, client, server and
		// bidirectional streaming, empty stream, timeout on a sleeping
		// server, cancellation, status codes and messages, custom metadata
		// in headers and trailers, unimplemented methods and services.
		t.Run("interop", func(t *testing.T) { runInteropCases(t, p.Addr) })
		t.Run("deadlines", func(t *testing.T) { testGRPCDeadlines(t, p, app) })
		t.Run("trailers", func(t *testing.T) { testGRPCTrailers(t, p) })
		t.Run("slow consumer", func(t *testing.T) { testGRPCSlowConsumer(t, p, app) })
		t.Run("concurrent streams", func(t *testing.T) { testGRPCConcurrentStreams(t, p) })
		t.Run("ghz", func(t *testing.T) { testGhz(t, p) })
	})
	t.Run("http2", func(t *testing.T) {
		app := startH2CApp(t)
		p := startPair(t, pairOptions{Protocol: "http2", AppPort: app})
		t.Run("trailers", func(t *testing.T) { testH2Trailers(t, p) })
		t.Run("h2load", func(t *testing.T) { testH2load(t, p) })
		t.Run("h2spec", func(t *testing.T) { testH2Spec(t, p) })
	})
}

// testGRPCDeadlines: grpc-timeout crosses both sidecars, so the server's
// deadline is the client's (plus the transit time); a call to a server that
// never answers ends with DEADLINE_EXCEEDED at the client's deadline, not
// later, and the server sees it end then; a call the client cancels ends at
// the server too (RST_STREAM through both sidecars).
func testGRPCDeadlines(t *testing.T, p *sidecarPair, app *grpcApp) {
	tc := testpb.NewTestServiceClient(dialGRPC(t, p.Addr))
	bg := context.Background()
	warm, cancel := context.WithTimeout(bg, 5*time.Second)
	if _, err := tc.EmptyCall(warm, &testpb.Empty{}); err != nil {
		t.Fatalf("warm-up call: %v", err)
	}
	cancel()

	t.Run("propagated", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(metadata.AppendToOutgoingContext(bg, probeKey, "deadline"), 3*time.Second)
		defer cancel()
		clientDL, _ := ctx.Deadline()
		if _, err := tc.UnaryCall(ctx, &testpb.SimpleRequest{ResponseSize: 10}); err != nil {
			t.Fatal(err)
		}
		pr, ok := app.probe("deadline")
		if !ok || pr.deadline.IsZero() {
			t.Fatalf("the server saw no deadline (probe %+v, seen %v)", pr, ok)
		}
		// grpc-timeout carries what is left when the request leaves the
		// client (rounded up); the server counts it from when the request
		// reaches it, so its deadline is the client's plus the time through
		// both sidecars, never earlier, never much later.
		skew := pr.deadline.Sub(clientDL)
		if skew < 0 || skew > 250*time.Millisecond {
			t.Errorf("the server's deadline is %v after the client's; want 0 to 250ms (the transit time)", skew)
		}
		t.Logf("client deadline 3s; the server's deadline is the client's + %v (the time through both sidecars)", skew.Round(time.Microsecond))
	})

	t.Run("sleeping server", func(t *testing.T) {
		const budget = 500 * time.Millisecond
		ctx, cancel := context.WithTimeout(metadata.AppendToOutgoingContext(bg, probeKey, "sleep", sleepKey, "1"), budget)
		defer cancel()
		dl, _ := ctx.Deadline()
		_, err := tc.UnaryCall(ctx, &testpb.SimpleRequest{})
		late := time.Since(dl)
		wantCode(t, "call to a sleeping server", err, codes.DeadlineExceeded)
		if late > 250*time.Millisecond {
			t.Errorf("DEADLINE_EXCEEDED %v after the client's deadline", late)
		}
		var pr probe
		testutil.Until(t, 2*time.Second, "the server to see the call end", func() bool {
			pr, _ = app.probe("sleep")
			return !pr.ended.IsZero()
		})
		if d := pr.ended.Sub(dl); d > 250*time.Millisecond {
			t.Errorf("the server's call ended %v after the client's deadline (%v)", d, pr.endErr)
		}
		t.Logf("client got %v %v after its deadline; the server's call ended (%v) %v after it", status.Code(err), late.Round(time.Microsecond), pr.endErr, pr.ended.Sub(dl).Round(time.Microsecond))
	})

	t.Run("cancelled", func(t *testing.T) {
		ctx, cancel := context.WithCancel(metadata.AppendToOutgoingContext(bg, probeKey, "cancel", sleepKey, "1"))
		errc := make(chan error, 1)
		go func() {
			_, err := tc.UnaryCall(ctx, &testpb.SimpleRequest{})
			errc <- err
		}()
		testutil.Until(t, 5*time.Second, "the call to reach the server", func() bool { _, ok := app.probe("cancel"); return ok })
		if pr, _ := app.probe("cancel"); !pr.deadline.IsZero() {
			t.Errorf("a call without deadline arrived with one, %v", pr.deadline)
		}
		at := time.Now()
		cancel()
		wantCode(t, "cancelled call", <-errc, codes.Canceled)
		var pr probe
		testutil.Until(t, 2*time.Second, "the server to see the cancellation", func() bool {
			pr, _ = app.probe("cancel")
			return !pr.ended.IsZero()
		})
		if !errors.Is(pr.endErr, context.Canceled) {
			t.Errorf("the server's call ended with %v, want context.Canceled", pr.endErr)
		}
		t.Logf("the server saw the client's cancellation %v later (RST_STREAM through both sidecars)", pr.ended.Sub(at).Round(time.Microsecond))
	})
}

// testGRPCTrailers: grpc-status, grpc-message, grpc-status-details-bin
// and custom trailing metadata (text and binary) arrive unchanged, on
// trailers-only responses, after messages, and after a stream's messages;
// a trailers-only response stays trailers-only.
func testGRPCTrailers(t *testing.T, p *sidecarPair) {
	tc := testpb.NewTestServiceClient(dialGRPC(t, p.Addr))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	bin := string([]byte{0, 1, 2, 0xfe, 0xff})

	t.Run("non-OK unary with details", func(t *testing.T) {
		var header, trailer metadata.MD
		mctx := metadata.AppendToOutgoingContext(ctx, detailsKey, "1",
			"x-grpc-test-echo-initial", "header value", "x-grpc-test-echo-trailing-bin", bin)
		_, err := tc.UnaryCall(mctx, &testpb.SimpleRequest{}, grpc.Header(&header), grpc.Trailer(&trailer))
		st := status.Convert(err)
		if st.Code() != codes.ResourceExhausted || st.Message() != detailsMessage {
			t.Errorf("status %v %q, want ResourceExhausted %q", st.Code(), st.Message(), detailsMessage)
		}
		var ri *errdetails.RetryInfo
		for _, d := range st.Details() {
			if v, ok := d.(*errdetails.RetryInfo); ok {
				ri = v
			}
		}
		if ri == nil || ri.GetRetryDelay().AsDuration() != 1500*time.Millisecond {
			t.Errorf("status details %v, want RetryInfo{retry_delay: 1.5s}", st.Details())
		}
		if got := first(trailer, "x-grpc-test-echo-trailing-bin"); got != bin {
			t.Errorf("binary trailer %q, want %q (trailer %v)", got, bin, trailer)
		}
		if got := first(header, "x-grpc-test-echo-initial"); got != "header value" {
			t.Errorf("header metadata %q, want %q", got, "header value")
		}
	})

	t.Run("messages then non-OK on a stream", func(t *testing.T) {
		var trailer metadata.MD
		stream, err := tc.FullDuplexCall(metadata.AppendToOutgoingContext(ctx, "x-grpc-test-echo-trailing-bin", bin), grpc.Trailer(&trailer))
		if err != nil {
			t.Fatal(err)
		}
		for _, req := range []*testpb.StreamingOutputCallRequest{
			{ResponseParameters: []*testpb.ResponseParameters{{Size: 100}, {Size: 200}}},
			{ResponseStatus: &testpb.EchoStatus{Code: int32(codes.FailedPrecondition), Message: "after two messages: ☺"}},
		} {
			if err := stream.Send(req); err != nil {
				t.Fatal(err)
			}
		}
		var got []int
		for {
			m, err := stream.Recv()
			if err != nil {
				st := status.Convert(err)
				if st.Code() != codes.FailedPrecondition || st.Message() != "after two messages: ☺" {
					t.Errorf("stream ended with %v %q, want FailedPrecondition %q", st.Code(), st.Message(), "after two messages: ☺")
				}
				break
			}
			got = append(got, len(m.GetPayload().GetBody()))
		}
		if fmt.Sprint(got) != "[100 200]" {
			t.Errorf("messages %v before the status, want [100 200]", got)
		}
		if v := first(trailer, "x-grpc-test-echo-trailing-bin"); v != bin {
			t.Errorf("binary trailer %q, want %q", v, bin)
		}
	})

	// On the wire, with a plain HTTP/2 client: an error before any message
	// is one HEADERS frame carrying grpc-status (trailers-only); a success
	// has grpc-status in the trailers.
	t.Run("on the wire", func(t *testing.T) {
		tr := h2cTransport()
		defer tr.CloseIdleConnections()
		h2 := &http.Client{Transport: tr, Timeout: 10 * time.Second}
		call := func(req *testpb.SimpleRequest, md ...string) (*http.Response, []byte) {
			t.Helper()
			resp, err := h2.Do(grpcRequest(t, p.Addr, "/grpc.testing.TestService/UnaryCall", req, md...))
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			body, err := io.ReadAll(resp.Body)
			if err != nil {
				t.Fatalf("body: %v", err)
			}
			return resp, body
		}
		resp, body := call(&testpb.SimpleRequest{ResponseStatus: &testpb.EchoStatus{Code: int32(codes.NotFound), Message: "no such thing"}})
		if resp.StatusCode != 200 || resp.Header.Get("Grpc-Status") != "5" || resp.Header.Get("Grpc-Message") != "no such thing" || len(body) != 0 || len(resp.Trailer) != 0 {
			t.Errorf("trailers-only response arrived as %d, headers %v, %d body bytes, trailers %v; want 200 with grpc-status 5 in the headers, no body, no trailers",
				resp.StatusCode, resp.Header, len(body), resp.Trailer)
		}
		resp, body = call(&testpb.SimpleRequest{ResponseSize: 7}, "x-grpc-test-echo-trailing-bin", "AAEC")
		if resp.Header.Get("Grpc-Status") != "" || resp.Trailer.Get("Grpc-Status") != "0" || resp.Trailer.Get("X-Grpc-Test-Echo-Trailing-Bin") != "AAEC" {
			t.Errorf("response with a message: headers %v, trailers %v; want grpc-status 0 and the echoed binary trailer in the trailers", resp.Header, resp.Trailer)
		}
		if len(body) < 5 || int(binary.BigEndian.Uint32(body[1:5])) != len(body)-5 {
			t.Errorf("response body %x is not one length-prefixed message", body)
		}
	})
}

// Metadata making the app's unary interceptor fail with rich details.
const (
	detailsKey     = "x-status-details"
	detailsMessage = "slow down"
)

// detailsError is the error the app returns for detailsKey.
func detailsError() error {
	st, err := status.New(codes.ResourceExhausted, detailsMessage).WithDetails(&errdetails.RetryInfo{RetryDelay: durationpb.New(1500 * time.Millisecond)})
	if err != nil {
		panic(err)
	}
	return st.Err()
}

// grpcRequest is a gRPC call as an HTTP/2 request: one length-prefixed
// message, the headers gRPC requires, and md as extra headers.
func grpcRequest(t *testing.T, addr, path string, m proto.Message, md ...string) *http.Request {
	t.Helper()
	b, err := proto.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	frame := make([]byte, 5, 5+len(b))
	binary.BigEndian.PutUint32(frame[1:], uint32(len(b)))
	frame = append(frame, b...)
	req, err := http.NewRequest(http.MethodPost, "http://"+addr+path, bytes.NewReader(frame))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/grpc")
	req.Header.Set("Te", "trailers")
	for i := 0; i+1 < len(md); i += 2 {
		req.Header.Add(md[i], md[i+1])
	}
	return req
}

// h2cTransport speaks HTTP/2 with prior knowledge over plaintext.
func h2cTransport() *http.Transport {
	tr := &http.Transport{DisableCompression: true}
	tr.Protocols = new(http.Protocols)
	tr.Protocols.SetUnencryptedHTTP2(true)
	return tr
}

// testGRPCSlowConsumer streams 64 MiB from the server to a client that
// first stops reading, then reads slowly: flow control must hold the
// server back through both sidecars (neither sidecar buffers the stream),
// no byte may be lost, the process's heap must stay bounded, and other
// calls on the same connection keep flowing.
func testGRPCSlowConsumer(t *testing.T, p *sidecarPair, app *grpcApp) {
	const (
		msgSize  = 32 << 10
		messages = 2048 // 64 MiB
	)
	cc := dialGRPC(t, p.Addr)
	tc := testpb.NewTestServiceClient(cc)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if _, err := tc.EmptyCall(ctx, &testpb.Empty{}); err != nil {
		t.Fatal(err)
	}
	params := make([]*testpb.ResponseParameters, messages)
	for i := range params {
		params[i] = &testpb.ResponseParameters{Size: msgSize}
	}

	// Heap in use (what the process holds, garbage included) and the live
	// heap as of the last GC (what is still referenced), sampled all along.
	live := []metrics.Sample{{Name: "/gc/heap/live:bytes"}}
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	metrics.Read(live)
	base, baseLive := ms.HeapInuse, live[0].Value.Uint64()
	var peak, peakLive atomic.Uint64
	// Two helpers run along the stream until finish: the heap sampler, and
	// other calls on the same client connection.
	var others, othersFailed, slowest atomic.Int64
	stop := make(chan struct{})
	var helpers sync.WaitGroup
	finish := sync.OnceFunc(func() { close(stop); helpers.Wait() })
	defer finish()
	helpers.Go(func() {
		tick := time.NewTicker(25 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-stop:
				return
			case <-tick.C:
			}
			var ms runtime.MemStats
			runtime.ReadMemStats(&ms)
			metrics.Read(live)
			if ms.HeapInuse > peak.Load() {
				peak.Store(ms.HeapInuse)
			}
			if v := live[0].Value.Uint64(); v > peakLive.Load() {
				peakLive.Store(v)
			}
		}
	})
	helpers.Go(func() {
		for {
			select {
			case <-stop:
				return
			case <-time.After(10 * time.Millisecond):
			}
			start := time.Now()
			cctx, ccancel := context.WithTimeout(ctx, 5*time.Second)
			_, err := tc.UnaryCall(cctx, &testpb.SimpleRequest{ResponseSize: 1024, Payload: &testpb.Payload{Body: make([]byte, 1024)}})
			ccancel()
			others.Add(1)
			if err != nil {
				othersFailed.Add(1)
				t.Errorf("a unary call during the slow stream: %v", err)
			}
			if d := int64(time.Since(start)); d > slowest.Load() {
				slowest.Store(d)
			}
		}
	})

	stream, err := tc.StreamingOutputCall(metadata.AppendToOutgoingContext(ctx, probeKey, "slow"),
		&testpb.StreamingOutputCallRequest{ResponseType: testpb.PayloadType_COMPRESSABLE, ResponseParameters: params})
	if err != nil {
		t.Fatal(err)
	}
	// Stalled consumer: read nothing and see the server stop, its count
	// of sent messages unchanged for 300ms.
	var stalled int64
	stalledAt := time.Now()
	for last, since := int64(-1), time.Now(); ; time.Sleep(50 * time.Millisecond) {
		n := app.sent("slow")
		if n != last {
			last, since = n, time.Now()
		}
		if time.Since(since) >= 300*time.Millisecond && n > 0 {
			stalled = n
			break
		}
		if time.Since(stalledAt) > 10*time.Second {
			t.Fatalf("the server kept sending to a client that reads nothing: %d messages (%d MiB) after 10s", n, n*msgSize>>20)
		}
	}
	if stalled*msgSize > 32<<20 {
		t.Errorf("the server sent %d MiB to a client that reads nothing: flow control does not reach it", stalled*msgSize>>20)
	}
	// Slow consumer: about 16 MiB/s, while the server could go faster.
	received, maxAhead := int64(0), int64(0)
	for {
		m, err := stream.Recv()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatalf("after %d messages: %v", received, err)
		}
		if n := len(m.GetPayload().GetBody()); n != msgSize {
			t.Fatalf("message %d has %d bytes, want %d", received, n, msgSize)
		}
		received++
		if ahead := app.sent("slow") - received; ahead > maxAhead {
			maxAhead = ahead
		}
		if received%8 == 0 {
			time.Sleep(15 * time.Millisecond)
		}
	}
	finish()
	if received != messages {
		t.Errorf("received %d messages, want %d", received, messages)
	}
	growth := int64(peak.Load()) - int64(base)
	if growth > 64<<20 {
		t.Errorf("heap in use grew by %d MiB while streaming 64 MiB to a slow consumer (bound 64 MiB)", growth>>20)
	}
	if maxAhead*msgSize > 32<<20 {
		t.Errorf("the server ran up to %d MiB ahead of the slow client", maxAhead*msgSize>>20)
	}
	if others.Load() < 20 || othersFailed.Load() > 0 || time.Duration(slowest.Load()) > 2*time.Second {
		t.Errorf("other calls on the connection: %d, %d failed, slowest %v", others.Load(), othersFailed.Load(), time.Duration(slowest.Load()))
	}
	mib := func(b int64) float64 { return float64(b) / (1 << 20) }
	t.Logf("64 MiB streamed in %d messages of 32 KiB, none lost; stalled client: the server stopped after %d messages (%.1f MiB in flight through both sidecars); slow client: at most %.1f MiB ahead; heap in use grew by at most %.1f MiB (base %.1f MiB), live heap by at most %.1f MiB (base %.1f MiB); %d other unary calls on the same connection meanwhile, slowest %v",
		received, stalled, mib(stalled*msgSize), mib(maxAhead*msgSize), mib(growth), mib(int64(base)), mib(int64(peakLive.Load())-int64(baseLive)), mib(int64(baseLive)),
		others.Load(), time.Duration(slowest.Load()).Round(time.Millisecond))
}

// testGRPCConcurrentStreams holds 200 bidirectional streams open from 4
// client connections while 50 workers make 500 unary calls, and checks
// that all of it rides on few pooled upstream connections.
func testGRPCConcurrentStreams(t *testing.T, p *sidecarPair) {
	const (
		conns, streamsPerConn = 4, 50
		workers, callsEach    = 50, 10
	)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	clients := make([]testpb.TestServiceClient, conns)
	for i := range clients {
		clients[i] = testpb.NewTestServiceClient(dialGRPC(t, p.Addr))
		if _, err := clients[i].EmptyCall(ctx, &testpb.Empty{}); err != nil {
			t.Fatal(err)
		}
	}
	ping := &testpb.StreamingOutputCallRequest{ResponseParameters: []*testpb.ResponseParameters{{Size: 1024}}, Payload: &testpb.Payload{Body: make([]byte, 512)}}

	var open, release sync.WaitGroup
	open.Add(conns * streamsPerConn)
	release.Add(1)
	errs := make(chan error, conns*streamsPerConn+workers)
	var streamsDone sync.WaitGroup
	for i := range conns * streamsPerConn {
		streamsDone.Add(1)
		go func() {
			defer streamsDone.Done()
			opened := false
			defer func() {
				if !opened {
					open.Done()
				}
			}()
			stream, err := clients[i%conns].FullDuplexCall(ctx)
			if err != nil {
				errs <- err
				return
			}
			for round := range 2 {
				if err := stream.Send(ping); err != nil {
					errs <- fmt.Errorf("stream %d send %d: %w", i, round, err)
					return
				}
				m, err := stream.Recv()
				if err != nil || len(m.GetPayload().GetBody()) != 1024 {
					errs <- fmt.Errorf("stream %d recv %d: %v (%d bytes)", i, round, err, len(m.GetPayload().GetBody()))
					return
				}
				if round == 0 {
					opened = true
					open.Done()
					release.Wait() // every stream open at once
				}
			}
			if err := stream.CloseSend(); err != nil {
				errs <- err
				return
			}
			if _, err := stream.Recv(); err != io.EOF {
				errs <- fmt.Errorf("stream %d end: %v", i, err)
			}
		}()
	}
	open.Wait()

	var calls sync.WaitGroup
	var unaryOK atomic.Int64
	for w := range workers {
		calls.Add(1)
		go func() {
			defer calls.Done()
			for range callsEach {
				if _, err := clients[w%conns].UnaryCall(ctx, &testpb.SimpleRequest{ResponseSize: 2048, Payload: &testpb.Payload{Body: make([]byte, 2048)}}); err != nil {
					errs <- fmt.Errorf("unary: %w", err)
					return
				}
				unaryOK.Add(1)
			}
		}()
	}
	// While the streams are open and the unary calls run.
	inFlight := p.Down.metric(t, "meshlet_sidecar_upstream_requests_active", `cluster="up"`)
	downUp := p.Down.metric(t, "meshlet_sidecar_upstream_connections_active", `cluster="up"`)
	upApp := p.Up.metric(t, "meshlet_sidecar_upstream_connections_active", `cluster="local_app"`)
	downstream := p.Down.metric(t, "meshlet_sidecar_downstream_connections_active", `listener="upstream:up"`)
	calls.Wait()
	release.Done()
	streamsDone.Wait()
	close(errs)
	failed := 0
	for err := range errs {
		failed++
		if failed <= 5 {
			t.Error(err)
		}
	}
	if failed > 0 {
		t.Errorf("%d of %d streams and workers failed", failed, conns*streamsPerConn+workers)
	}
	if inFlight < conns*streamsPerConn {
		t.Errorf("down's sidecar had %v requests in flight to up, want at least %d (the open streams)", inFlight, conns*streamsPerConn)
	}
	if downUp < 1 || downUp > 2 || upApp < 1 || upApp > 2 {
		t.Errorf("upstream connections while %v streams were in flight: down → up %v, up → app %v; want 1 or 2 each", inFlight, downUp, upApp)
	}
	if downstream < conns {
		t.Errorf("down's sidecar had %v downstream connections, want at least %d", downstream, conns)
	}
	t.Logf("%d bidirectional streams open at once plus %d unary calls (%d workers): %v requests in flight at down's sidecar from %v downstream connections, multiplexed on %v connection(s) down → up and %v up → app",
		conns*streamsPerConn, unaryOK.Load(), workers, inFlight, downstream, downUp, upApp)
}

// testGhz runs ghz (gRPC load) with server reflection through the pair.
func testGhz(t *testing.T, p *sidecarPair) {
	ghz := lookTool(t, "ghz", "go install github.com/bojand/ghz/cmd/ghz@v0.120.0")
	const n = 5000
	out := runTool(t, 90*time.Second, ghz, "--insecure", "--call", "grpc.testing.TestService/UnaryCall",
		"-d", `{"response_size": 1024, "payload": {"body": "`+base64Zeros(1024)+`"}}`,
		"-n", strconv.Itoa(n), "-c", "20", "--connections", "2", "--cpus", "1", "-t", "10s", "-O", "json", p.Addr)
	r, err := parseGhz(out)
	if err != nil {
		t.Fatal(err)
	}
	if r.Count != n || r.StatusCodeDistribution["OK"] != n || len(r.ErrorDistribution) != 0 {
		t.Errorf("ghz: %d calls, status codes %v, errors %v; want %d OK", r.Count, r.StatusCodeDistribution, r.ErrorDistribution, n)
	}
	t.Logf("ghz unary: %d calls, %d OK (%.0f%%), %d errors, %.0f calls/s, average %v, p99 %v",
		r.Count, r.StatusCodeDistribution["OK"], 100*float64(r.StatusCodeDistribution["OK"])/float64(max(r.Count, 1)), len(r.ErrorDistribution), r.Rps, r.Average, r.percentile(99))

	// Bidirectional streams: 500 calls of 10 messages each.
	out = runTool(t, 90*time.Second, ghz, "--insecure", "--call", "grpc.testing.TestService/FullDuplexCall",
		"-d", `{"response_parameters": [{"size": 512}]}`, "--stream-call-count", "10",
		"-n", "500", "-c", "20", "--cpus", "1", "-t", "10s", "-O", "json", p.Addr)
	r, err = parseGhz(out)
	if err != nil {
		t.Fatal(err)
	}
	if r.Count != 500 || r.StatusCodeDistribution["OK"] != 500 || len(r.ErrorDistribution) != 0 {
		t.Errorf("ghz streams: %d calls, status codes %v, errors %v; want 500 OK", r.Count, r.StatusCodeDistribution, r.ErrorDistribution)
	}
	t.Logf("ghz bidirectional streaming: %d calls of 10 messages, %d OK, %d errors, %.0f calls/s", r.Count, r.StatusCodeDistribution["OK"], len(r.ErrorDistribution), r.Rps)
}

func base64Zeros(n int) string { return base64.StdEncoding.EncodeToString(make([]byte, n)) }

// startH2CApp serves HTTP/2 with prior knowledge (h2c) only: GET / answers
// 1 KiB; /trailers answers with declared and undeclared trailers.
func startH2CApp(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	body := bytes.Repeat([]byte("x"), 1024)
	mux := http.NewServeMux()
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		if r.ProtoMajor != 2 {
			http.Error(w, "HTTP/2 only", http.StatusHTTPVersionNotSupported)
			return
		}
		w.Header().Set("Content-Type", "application/octet-stream")
		w.Write(body)
	})
	mux.HandleFunc("/trailers", func(w http.ResponseWriter, r *http.Request) {
		n, _ := io.Copy(io.Discard, r.Body)
		w.Header().Set("Trailer", "X-Declared")
		w.Header().Set("Content-Type", "text/plain")
		w.WriteHeader(http.StatusOK)
		fmt.Fprintf(w, "read %d bytes, request trailer %q\n", n, r.Trailer.Get("X-Request-Trailer"))
		w.(http.Flusher).Flush()
		w.Header().Set("X-Declared", "declared value")
		w.Header().Set(http.TrailerPrefix+"X-Undeclared", "undeclared value")
	})
	srv := &http.Server{Handler: mux, Protocols: new(http.Protocols)}
	srv.Protocols.SetUnencryptedHTTP2(true)
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = srv.Serve(l)
	}()
	t.Cleanup(func() {
		srv.Close()
		<-done
	})
	return l.Addr().(*net.TCPAddr).Port
}

// testH2Trailers: request and response trailers, declared and not, cross
// both sidecars over HTTP/2.
func testH2Trailers(t *testing.T, p *sidecarPair) {
	tr := h2cTransport()
	defer tr.CloseIdleConnections()
	c := &http.Client{Transport: tr, Timeout: 10 * time.Second}
	pr, pw := io.Pipe()
	req, err := http.NewRequest(http.MethodPost, "http://"+p.Addr+"/trailers", pr)
	if err != nil {
		t.Fatal(err)
	}
	req.Trailer = http.Header{"X-Request-Trailer": nil}
	go func() {
		pw.Write(bytes.Repeat([]byte("y"), 100_000))
		req.Trailer.Set("X-Request-Trailer", "from the client")
		pw.Close()
	}()
	resp, err := c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	if want := "read 100000 bytes, request trailer \"from the client\"\n"; string(b) != want {
		t.Errorf("body %q, want %q", b, want)
	}
	if resp.ProtoMajor != 2 || resp.Trailer.Get("X-Declared") != "declared value" || resp.Trailer.Get("X-Undeclared") != "undeclared value" {
		t.Errorf("HTTP/%d response trailers %v, want X-Declared and X-Undeclared", resp.ProtoMajor, resp.Trailer)
	}
}

// testH2load runs h2load against the h2c app through the pair.
func testH2load(t *testing.T, p *sidecarPair) {
	h2load := lookTool(t, "h2load", "install Debian package nghttp2-client (.ci/run does)")
	const n = 10000
	out := runTool(t, 90*time.Second, h2load, "-n", strconv.Itoa(n), "-c", "10", "-m", "10", "-t", "1", "http://"+p.Addr+"/")
	r, err := parseH2load(out)
	if err != nil {
		t.Fatal(err)
	}
	if r.Total != n || r.Succeeded != n || r.Failed != 0 || r.Errored != 0 || r.Timeout != 0 || r.Status2xx != n {
		t.Errorf("h2load: %+v; want %d requests, all succeeded with 2xx\n%s", r, n, out)
	}
	upConns := p.Down.metric(t, "meshlet_sidecar_upstream_connections_active", `cluster="up"`)
	if upConns < 1 || upConns > 2 {
		t.Errorf("down's sidecar has %v connections to up after h2load's 10 connections, want 1 or 2", upConns)
	}
	t.Logf("h2load -n %d -c 10 -m 10: %d succeeded (%.1f%%), %d failed, %d errored, %d 2xx, %.0f req/s; down → up connections %v",
		n, r.Succeeded, 100*float64(r.Succeeded)/float64(max(r.Total, 1)), r.Failed, r.Errored, r.Status2xx, r.ReqPerSec, upConns)
}
