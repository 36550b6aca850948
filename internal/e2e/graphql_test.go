package e2e

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	genql "github.com/Khan/genqlient/graphql"
	graphqlgo "github.com/graph-gophers/graphql-go"
	"github.com/graph-gophers/graphql-go/relay"

	"github.com/meshlet/meshlet/internal/testutil"
)

// TestGraphQLPostsAreNotReplayed is the "GraphQL and SOAP" row of the
// protocol table, GraphQL half: a graph-gophers/graphql-go server (relay
// handler) as the app behind two sidecars with mTLS, and genqlient's
// client, whose operations are POSTs of JSON bodies. A mutation that ran
// and whose response was lost (a 503 after the body was read, a reset, a
// hang past the per-try timeout) must not be run a second time by the
// mesh: under the built-in policy (/graphql) those failures are no retry
// condition at all, and under a RetryPolicy that lists them (/retry/graphql)
// the retry is denied as non_idempotent. Both opt-ins still work: an
// Idempotency-Key header, and a failure where nothing reached the app.
func TestGraphQLPostsAreNotReplayed(t *testing.T) {
	app := startGraphQLApp(t)
	p := startPair(t, pairOptions{Protocol: "http", AppPort: app.port, Policies: []string{
		"apiVersion: meshlet.io/v1alpha1\nkind: RetryPolicy\nmetadata: {name: up-graphql-retry}\nspec:\n  service: up\n" +
			"  match: {pathPrefix: /retry/}\n  retryOn: [5xx, reset, gateway-error]\n  numRetries: 2\n  perTryTimeout: 300ms\n" +
			"  backoff: {baseInterval: 5ms, maxInterval: 20ms}\n",
	}})
	plain := newGraphQLClient("http://" + p.Addr + "/graphql")
	retrying := newGraphQLClient("http://" + p.Addr + "/retry/graphql")
	denied := func() float64 {
		return p.Down.metric(t, "meshlet_sidecar_upstream_retries_denied_total", `cluster="up"`, `reason="non_idempotent"`)
	}
	// retries counts down's retries to up, of one cause ("" for all).
	retries := func(cause string) float64 {
		labels := []string{`cluster="up"`}
		if cause != "" {
			labels = append(labels, `cause="`+cause+`"`)
		}
		return p.Down.metric(t, "meshlet_sidecar_upstream_retries_total", labels...)
	}

	t.Run("query and mutation through the pair", func(t *testing.T) {
		o, c := placeOrder(t, plain, "ok-1", "NONE", 0, "", 5*time.Second)
		if c.err != nil || o.Execution != 1 || o.Key != "ok-1" {
			t.Fatalf("placeOrder = %+v, %v; want execution 1 of ok-1", o, c.err)
		}
		if n, err := executions(plain, "ok-1"); err != nil || n != 1 {
			t.Fatalf("query executions(ok-1) = %d, %v; want 1", n, err)
		}
		via := app.lastVia()
		if !strings.Contains(via, "down-1-sidecar-proxy") || !strings.Contains(via, "up-1-sidecar-proxy") {
			t.Errorf("the app saw Via %q, want both sidecars", via)
		}
	})

	// The app runs the mutation (counted), then loses the response.
	failures := []struct {
		name, mode string
		// wantStatus and wantReason are what the client sees; 0 when it
		// gives up itself.
		plainStatus int
		plainReason string
		retryStatus int
		retryReason string
	}{
		{"503 after reading the body", "STATUS_503", 503, "", 503, ""},
		{"reset after reading the body", "RESET", 503, "upstream_reset", 503, "upstream_reset"},
		{"hang past the per-try timeout", "HANG", 0, "", 504, "upstream_timeout"},
	}
	for _, tc := range failures {
		t.Run(tc.name, func(t *testing.T) {
			t.Run("built-in policy", func(t *testing.T) {
				key := "plain-" + tc.mode
				d0, posts0 := denied(), app.posts.Load()
				// No RetryPolicy means no per-try timeout: the client's own
				// deadline ends a hanging call.
				_, c := placeOrder(t, plain, key, tc.mode, 1, "", 700*time.Millisecond)
				checkFailure(t, c, tc.plainStatus, tc.plainReason)
				app.waitExecutions(t, key, 1)
				if n := app.posts.Load() - posts0; n != 1 {
					t.Errorf("the app received %d POSTs, want 1", n)
				}
				// Nothing to deny: 503, reset and timeouts are not retry
				// conditions of the built-in policy.
				if d := denied() - d0; d != 0 {
					t.Errorf("non_idempotent denials went up by %v, want 0", d)
				}
			})
			t.Run("RetryPolicy 5xx, reset, gateway-error", func(t *testing.T) {
				key := "retry-" + tc.mode
				d0, posts0 := denied(), app.posts.Load()
				_, c := placeOrder(t, retrying, key, tc.mode, 1, "", 5*time.Second)
				checkFailure(t, c, tc.retryStatus, tc.retryReason)
				app.waitExecutions(t, key, 1)
				if n := app.posts.Load() - posts0; n != 1 {
					t.Errorf("the app received %d POSTs, want 1", n)
				}
				if d := denied() - d0; d != 1 {
					t.Errorf("non_idempotent denials went up by %v, want 1", d)
				}
			})
			// The hung handler is released once an attempt is abandoned.
			testutil.Until(t, 5*time.Second, "hung requests released", func() bool { return app.hanging.Load() == 0 })
		})
	}

	t.Run("an Idempotency-Key opts the mutation in", func(t *testing.T) {
		for _, mode := range []string{"STATUS_503", "RESET"} {
			key := "keyed-" + mode
			r0 := retries("")
			o, c := placeOrder(t, retrying, key, mode, 1, "order-"+key, 5*time.Second)
			if c.err != nil || c.status != 200 || o.Execution != 2 {
				t.Errorf("%s: placeOrder = %+v, status %d, %v; want 200 from the second execution", mode, o, c.status, c.err)
			}
			app.waitExecutions(t, key, 2)
			if n := retries("") - r0; n != 1 {
				t.Errorf("%s: retries went up by %v, want 1", mode, n)
			}
		}
	})

	t.Run("a failure before anything reached the app is retried", func(t *testing.T) {
		// A second instance of up, up-2, with no app behind it. First its
		// sidecar is not running either: down's connection is refused.
		// Then it runs, and answers 503 connect_failure, which tells
		// down's sidecar that the POST never reached an app. Either way
		// the built-in policy sends the POST on to up-1, which runs it once.
		ports := freePorts(t, 2)
		p.m.register(svc{id: "up-2", name: "up", appPort: ports[0], sidecarPort: ports[1]})
		testutil.Until(t, 10*time.Second, "down's sidecar seeing up-2", func() bool { return len(p.Down.endpoints("up")) == 2 })
		retriedUntil := func(what string, done func() bool) {
			t.Helper()
			for i := 0; !done(); i++ {
				if i == 8 {
					t.Fatalf("%s: no POST went to up-2 in 8 calls", what)
				}
				key := fmt.Sprintf("%s-%d", what, i)
				o, c := placeOrder(t, plain, key, "NONE", 0, "", 5*time.Second)
				if c.err != nil || o.Execution != 1 {
					t.Fatalf("placeOrder %s = %+v, %v; want execution 1", key, o, c.err)
				}
				app.waitExecutions(t, key, 1)
			}
		}
		r0 := retries("connect-failure")
		retriedUntil("refused", func() bool { return retries("connect-failure") > r0 })

		up2 := p.m.startSidecar("up-2-sidecar-proxy", "")
		up2.waitReady(t)
		r0 = retries("connect-failure")
		retriedUntil("no-app", func() bool {
			return up2.metric(t, "meshlet_sidecar_requests_total", `reason="connect_failure"`) > 0 && retries("connect-failure") > r0
		})
	})
}

// graphqlSchema is the app's schema: placeOrder counts its executions per
// key and, for its first `times` executions, loses its response in the
// way `fail` names.
const graphqlSchema = `
schema { query: Query mutation: Mutation }
type Query { executions(key: String!): Int! }
type Mutation { placeOrder(key: String!, item: String!, fail: Failure = NONE, times: Int = 1): Order! }
enum Failure { NONE STATUS_503 RESET HANG }
type Order { key: String! item: String! execution: Int! }
`

// graphqlApp is the GraphQL server the pair fronts.
type graphqlApp struct {
	port    int
	posts   atomic.Int64 // POSTs received
	hanging atomic.Int64 // requests held open by HANG
	srv     *http.Server
	done    chan struct{}
	closing chan struct{}
	stopped sync.Once

	mu   sync.Mutex
	runs map[string]int32 // placeOrder executions by key
	via  string           // Via of the last request
}

type graphqlFailKey struct{}

// graphqlResolver implements graphqlSchema.
type graphqlResolver struct{ a *graphqlApp }

type graphqlOrder struct {
	key, item string
	n         int32
}

func (o graphqlOrder) Key() string      { return o.key }
func (o graphqlOrder) Item() string     { return o.item }
func (o graphqlOrder) Execution() int32 { return o.n }

func (r *graphqlResolver) Executions(args struct{ Key string }) int32 {
	r.a.mu.Lock()
	defer r.a.mu.Unlock()
	return r.a.runs[args.Key]
}

func (r *graphqlResolver) PlaceOrder(ctx context.Context, args struct {
	Key, Item, Fail string
	Times           int32
}) graphqlOrder {
	r.a.mu.Lock()
	r.a.runs[args.Key]++
	n := r.a.runs[args.Key]
	r.a.mu.Unlock()
	if args.Fail != "NONE" && n <= args.Times {
		*ctx.Value(graphqlFailKey{}).(*string) = args.Fail
	}
	return graphqlOrder{args.Key, args.Item, n}
}

func startGraphQLApp(t *testing.T) *graphqlApp {
	t.Helper()
	a := &graphqlApp{runs: map[string]int32{}, done: make(chan struct{}), closing: make(chan struct{})}
	h := &relay.Handler{Schema: graphqlgo.MustParseSchema(graphqlSchema, &graphqlResolver{a})}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	a.port = l.Addr().(*net.TCPAddr).Port
	a.srv = &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		a.serve(h, w, r)
	})}
	go func() {
		defer close(a.done)
		_ = a.srv.Serve(l)
	}()
	t.Cleanup(a.stop)
	return a
}

// serve runs the GraphQL request to completion, then answers, or loses the
// answer as the mutation asked.
func (a *graphqlApp) serve(h http.Handler, w http.ResponseWriter, r *http.Request) {
	if r.Method == http.MethodPost {
		a.posts.Add(1)
	}
	a.mu.Lock()
	a.via = strings.Join(r.Header.Values("Via"), ", ")
	a.mu.Unlock()
	fail := ""
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, r.WithContext(context.WithValue(r.Context(), graphqlFailKey{}, &fail)))
	_, _ = io.Copy(io.Discard, r.Body)
	switch fail {
	case "STATUS_503":
		http.Error(w, "graphql app failing on purpose", http.StatusServiceUnavailable)
	case "RESET":
		conn, _, err := w.(http.Hijacker).Hijack()
		if err != nil {
			panic(err)
		}
		_ = conn.(*net.TCPConn).SetLinger(0)
		_ = conn.Close()
	case "HANG":
		a.hanging.Add(1)
		defer a.hanging.Add(-1)
		select {
		case <-r.Context().Done():
		case <-a.closing:
		}
	default:
		for k, v := range rec.Header() {
			w.Header()[k] = v
		}
		w.WriteHeader(rec.Code)
		_, _ = w.Write(rec.Body.Bytes())
	}
}

func (a *graphqlApp) stop() {
	a.stopped.Do(func() {
		close(a.closing)
		_ = a.srv.Close()
		<-a.done
	})
}

func (a *graphqlApp) lastVia() string {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.via
}

// waitExecutions checks that key ran exactly want times, after giving a
// replay that would be in flight time to arrive.
func (a *graphqlApp) waitExecutions(t *testing.T, key string, want int32) {
	t.Helper()
	time.Sleep(50 * time.Millisecond)
	a.mu.Lock()
	got := a.runs[key]
	a.mu.Unlock()
	if got != want {
		t.Errorf("placeOrder(%s) ran %d times at the app, want %d", key, got, want)
	}
}

// graphqlCall is what the client saw of one call.
type graphqlCall struct {
	status int    // HTTP status, 0 without a response
	reason string // x-meshlet-reason
	err    error
}

type graphqlCallKey struct{}

// graphqlDoer is genqlient's HTTP client: it sets the call's
// Idempotency-Key and records the response's status and typed reason.
type graphqlDoer struct{ c *http.Client }

type graphqlCallInfo struct {
	idempotencyKey string
	call           *graphqlCall
}

func (d graphqlDoer) Do(r *http.Request) (*http.Response, error) {
	info, _ := r.Context().Value(graphqlCallKey{}).(graphqlCallInfo)
	if info.idempotencyKey != "" {
		r.Header.Set("Idempotency-Key", info.idempotencyKey)
	}
	resp, err := d.c.Do(r)
	if resp != nil && info.call != nil {
		info.call.status, info.call.reason = resp.StatusCode, resp.Header.Get("X-Meshlet-Reason")
	}
	return resp, err
}

func newGraphQLClient(endpoint string) genql.Client {
	return genql.NewClient(endpoint, graphqlDoer{&http.Client{}})
}

type graphqlOrderData struct {
	Key       string `json:"key"`
	Item      string `json:"item"`
	Execution int32  `json:"execution"`
}

// placeOrder runs the placeOrder mutation with genqlient.
func placeOrder(t *testing.T, c genql.Client, key, fail string, times int, idempotencyKey string, timeout time.Duration) (graphqlOrderData, graphqlCall) {
	t.Helper()
	var call graphqlCall
	ctx, cancel := context.WithTimeout(context.WithValue(context.Background(), graphqlCallKey{}, graphqlCallInfo{idempotencyKey, &call}), timeout)
	defer cancel()
	var data struct {
		PlaceOrder graphqlOrderData `json:"placeOrder"`
	}
	call.err = c.MakeRequest(ctx, &genql.Request{
		OpName: "PlaceOrder",
		Query: `mutation PlaceOrder($key: String!, $item: String!, $fail: Failure!, $times: Int!) {
  placeOrder(key: $key, item: $item, fail: $fail, times: $times) { key item execution }
}`,
		Variables: map[string]any{"key": key, "item": "book", "fail": fail, "times": times},
	}, &genql.Response{Data: &data})
	return data.PlaceOrder, call
}

// executions runs the executions query with genqlient.
func executions(c genql.Client, key string) (int32, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	var data struct {
		Executions int32 `json:"executions"`
	}
	err := c.MakeRequest(ctx, &genql.Request{
		OpName:    "Executions",
		Query:     `query Executions($key: String!) { executions(key: $key) }`,
		Variables: map[string]any{"key": key},
	}, &genql.Response{Data: &data})
	return data.Executions, err
}

// checkFailure checks that the client saw the failure: the status and
// x-meshlet-reason, or (status 0) its own deadline.
func checkFailure(t *testing.T, c graphqlCall, status int, reason string) {
	t.Helper()
	if status == 0 {
		if !errors.Is(c.err, context.DeadlineExceeded) {
			t.Errorf("got %v (status %d), want the client's own deadline", c.err, c.status)
		}
		return
	}
	var he *genql.HTTPError
	if !errors.As(c.err, &he) || he.StatusCode != status {
		t.Errorf("got error %v, want genqlient's HTTPError %d", c.err, status)
	}
	if c.status != status || c.reason != reason {
		t.Errorf("response %d x-meshlet-reason %q, want %d %q", c.status, c.reason, status, reason)
	}
}
