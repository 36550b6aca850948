package traceview

import (
	"strings"
	"testing"
	"time"
)

func TestRenderHandBuilt(t *testing.T) {
	t0 := time.Date(2025, 1, 2, 3, 4, 5, 0, time.UTC)
	at := func(us int) time.Time { return t0.Add(time.Duration(us) * time.Microsecond) }
	us := func(n int) time.Duration { return time.Duration(n) * time.Microsecond }
	tr := &Trace{
		ID: "4bf92f3577b34da6a3ce929d0e0e4736",
		// Deliberately not in start order: Render orders siblings itself.
		Spans: []*Span{
			{SpanID: "b2", ParentID: "a1", Service: "web", Operation: "GET store", Start: at(9000), Duration: us(1500), Kind: "client",
				Tags: []Tag{{"http.response.status_code", int64(200)}}},
			{SpanID: "a1", Service: "web", Operation: "GET /checkout", Start: at(0), Duration: us(12345), Kind: "server",
				Tags: []Tag{{"span.kind", "server"}, {"http.response.status_code", int64(200)}, {"net.peer.port", int64(1234)}}},
			{SpanID: "b1", ParentID: "a1", Service: "web", Operation: "GET api", Start: at(1000), Duration: us(7000), Kind: "client",
				Tags: []Tag{{"http.request.resend_count", int64(1)}, {"http.response.status_code", int64(503)}}},
			{SpanID: "c1", ParentID: "b1", Service: "api", Operation: "GET /items", Start: at(1500), Duration: us(2250), Kind: "server",
				Tags: []Tag{{"error", true}, {"meshlet.reason", "upstream_timeout"}, {"meshlet.attempt", int64(1)}},
				Events: []Event{
					{Time: at(2000), Name: "retry", Fields: []Tag{{"attempt", int64(2)}, {"reason", "upstream reset"}}},
					{Time: at(3000), Name: "log"},
				}},
			{SpanID: "d1", ParentID: "ffff", Service: "worker", Operation: "consume", Start: at(10000), Duration: us(100)},
			{SpanID: "e1", ParentID: "e2", Service: "loop", Operation: "x", Start: at(11000), Duration: us(1)},
			{SpanID: "e2", ParentID: "e1", Service: "loop", Operation: "y", Start: at(11001), Duration: us(1)},
		},
		Warnings: []string{"clock skew adjusted"},
	}
	want := `trace 4bf92f3577b34da6a3ce929d0e0e4736: 7 spans, services api, loop, web, worker, duration 12.345ms
warning: clock skew adjusted
web GET /checkout  12.345ms  +0.000ms  server  http.response.status_code=200
  web GET api  7.000ms  +1.000ms  client  http.response.status_code=503 http.request.resend_count=1
    api GET /items  2.250ms  +1.500ms  server  error=true meshlet.reason=upstream_timeout meshlet.attempt=1
      event retry  +2.000ms  attempt=2 reason="upstream reset"
      event log  +3.000ms
  web GET store  1.500ms  +9.000ms  client  http.response.status_code=200
worker consume  0.100ms  +10.000ms  (parent ffff not in trace)
loop x  0.001ms  +11.000ms  (parent e2 is in a cycle)
  loop y  0.001ms  +11.001ms
`
	var b strings.Builder
	if err := Render(&b, tr); err != nil {
		t.Fatal(err)
	}
	if got := b.String(); got != want {
		t.Errorf("Render:\n%s\nwant:\n%s", got, want)
	}
}

func TestNormalizeTraceID(t *testing.T) {
	tests := []struct {
		name, in, want string
		wantErr        bool
	}{
		{name: "128-bit", in: "4BF92F3577B34DA6A3CE929D0E0E4736", want: "4bf92f3577b34da6a3ce929d0e0e4736"},
		{name: "64-bit short", in: "abc", want: "abc"},
		{name: "empty", in: "", wantErr: true},
		{name: "not hex", in: "xyz", wantErr: true},
		{name: "too long", in: strings.Repeat("a", 33), wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := NormalizeTraceID(tt.in)
			if (err != nil) != tt.wantErr || got != tt.want {
				t.Errorf("NormalizeTraceID(%q) = %q, %v", tt.in, got, err)
			}
		})
	}
}

func TestConvertWire(t *testing.T) {
	wt := wireTrace{
		TraceID: "ABC",
		Spans: []wireSpan{
			{SpanID: "2", StartTime: 2000, Duration: 5, ProcessID: "p2",
				References: []wireReference{{RefType: "FOLLOWS_FROM", SpanID: "9"}, {RefType: "CHILD_OF", TraceID: "abc", SpanID: "1"}}},
			{SpanID: "1", StartTime: 1000, Duration: 1500, ProcessID: "p1", ParentSpanID: "1",
				Tags: []wireKeyValue{{Key: "span.kind", Type: "string", Value: "server"}}},
		},
		Processes: map[string]wireProcess{"p1": {ServiceName: "web"}, "p2": {ServiceName: "api"}},
	}
	tr, err := convert(wt)
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name string
		got  any
		want any
	}{
		{"trace id lowercased", tr.ID, "abc"},
		{"sorted by start", tr.Spans[0].SpanID, "1"},
		{"self parent is root", tr.Spans[0].ParentID, ""},
		{"CHILD_OF wins", tr.Spans[1].ParentID, "1"},
		{"service from process", tr.Spans[1].Service, "api"},
		{"kind", tr.Spans[0].Kind, "server"},
		{"duration µs", tr.Spans[0].Duration, 1500 * time.Microsecond},
		{"trace duration", tr.Duration(), 1500 * time.Microsecond},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if tt.got != tt.want {
				t.Errorf("got %v, want %v", tt.got, tt.want)
			}
		})
	}
}
