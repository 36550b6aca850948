// Package traceview reads traces from Jaeger's query API (the v1 JSON API
// the Jaeger UI uses, served by jaeger-query and by the jaeger v2 binary's
// jaeger_query extension) and renders them as an indented text tree, for
// `controlplane trace <trace-id>` and for tests that check what the mesh
// reported.
package traceview

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"time"
)

// Errors Fetch, Search and WaitTrace return, wrapped in a "traceview: ..."
// error; test with errors.Is.
var (
	// ErrNotFound means Jaeger has no trace with the requested ID (yet:
	// Jaeger ingests spans asynchronously).
	ErrNotFound = errors.New("trace not found")
	// ErrBadTraceID means the trace ID is not 1 to 32 hexadecimal digits,
	// or Jaeger refused it as malformed.
	ErrBadTraceID = errors.New("bad trace id")
)

// maxResponseBytes bounds how much of a query API response is read.
const maxResponseBytes = 64 << 20

// Trace is one trace as Jaeger returned it.
type Trace struct {
	// ID is the trace ID in lowercase hex, as Jaeger prints it (leading
	// zeros dropped for 64-bit IDs).
	ID string
	// Spans are all spans of the trace ordered by start time, then span ID.
	Spans []*Span
	// Warnings are Jaeger's warnings about the trace (e.g. clock skew).
	Warnings []string
}

// Span is one span of a Trace.
type Span struct {
	// TraceID and SpanID are lowercase hex.
	TraceID, SpanID string
	// ParentID is the span this one is a child of (its CHILD_OF reference,
	// else its FOLLOWS_FROM reference, within the same trace); empty for a
	// root span. The parent may be missing from the trace.
	ParentID string
	// Operation is the span name (operationName).
	Operation string
	// Service is the service.name of the span's process (resource).
	Service string
	// Start is when the span started (microsecond precision).
	Start time.Time
	// Duration is the span's length (microsecond precision).
	Duration time.Duration
	// Kind is the span kind from the span.kind tag: "server", "client",
	// "producer", "consumer", "internal", or empty when Jaeger has none.
	Kind string
	// Tags are the span's attributes (span.kind included), in Jaeger's
	// order.
	Tags []Tag
	// Events are the span's events (Jaeger "logs"), in Jaeger's order.
	Events []Event
	// Warnings are Jaeger's warnings about this span.
	Warnings []string
}

// Tag is one attribute of a span, an event or a process.
type Tag struct {
	// Key is the attribute name.
	Key string
	// Value is a string, bool, int64 or float64 (binary values are their
	// base64 text, as Jaeger sends them).
	Value any
}

// Event is a span event (a Jaeger log entry).
type Event struct {
	// Time is when the event happened (microsecond precision).
	Time time.Time
	// Name is the event name (Jaeger's "event" field); "log" when absent.
	Name string
	// Fields are the event's other attributes.
	Fields []Tag
}

// Tag returns the value of the span's tag key and whether it has one.
func (s *Span) Tag(key string) (any, bool) {
	for _, t := range s.Tags {
		if t.Key == key {
			return t.Value, true
		}
	}
	return nil, false
}

// End returns when the span ended (Start + Duration).
func (s *Span) End() time.Time { return s.Start.Add(s.Duration) }

// Span returns the span with the given ID, or nil.
func (t *Trace) Span(id string) *Span {
	for _, s := range t.Spans {
		if s.SpanID == id {
			return s
		}
	}
	return nil
}

// Services returns the distinct service names of the trace's spans, sorted.
func (t *Trace) Services() []string {
	var out []string
	for _, s := range t.Spans {
		if !slices.Contains(out, s.Service) {
			out = append(out, s.Service)
		}
	}
	slices.Sort(out)
	return out
}

// Start returns the earliest span start; the zero time for no spans.
func (t *Trace) Start() time.Time {
	var start time.Time
	for i, s := range t.Spans {
		if i == 0 || s.Start.Before(start) {
			start = s.Start
		}
	}
	return start
}

// Duration returns the time from the earliest span start to the latest span
// end; 0 for no spans.
func (t *Trace) Duration() time.Duration {
	if len(t.Spans) == 0 {
		return 0
	}
	end := t.Spans[0].End()
	for _, s := range t.Spans[1:] {
		if s.End().After(end) {
			end = s.End()
		}
	}
	return end.Sub(t.Start())
}

// String formats the tag as key=value, quoting strings that are empty or
// hold spaces, quotes or '='.
func (t Tag) String() string { return t.Key + "=" + formatValue(t.Value) }

func formatValue(v any) string {
	switch v := v.(type) {
	case string:
		if v == "" || strings.ContainsAny(v, " \t\n\"=") {
			return strconv.Quote(v)
		}
		return v
	case float64:
		return strconv.FormatFloat(v, 'g', -1, 64)
	default:
		return fmt.Sprint(v)
	}
}

// NormalizeTraceID checks that id is 1 to 32 hexadecimal digits and returns
// it in lowercase; otherwise the error wraps ErrBadTraceID.
func NormalizeTraceID(id string) (string, error) {
	if len(id) == 0 || len(id) > 32 {
		return "", fmt.Errorf("traceview: %w %q: want 1 to 32 hex digits", ErrBadTraceID, id)
	}
	for _, c := range id {
		if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f' || c >= 'A' && c <= 'F') {
			return "", fmt.Errorf("traceview: %w %q: want 1 to 32 hex digits", ErrBadTraceID, id)
		}
	}
	return strings.ToLower(id), nil
}

// Fetch gets one trace from the Jaeger query API at queryURL (e.g.
// "http://127.0.0.1:16686") with GET /api/traces/<traceID>. A malformed ID
// returns an error wrapping ErrBadTraceID without asking Jaeger; an unknown
// one an error wrapping ErrNotFound. ctx bounds the request.
func Fetch(ctx context.Context, queryURL, traceID string) (*Trace, error) {
	id, err := NormalizeTraceID(traceID)
	if err != nil {
		return nil, err
	}
	var resp response
	if err := get(ctx, strings.TrimRight(queryURL, "/")+"/api/traces/"+id, &resp); err != nil {
		if se, ok := errors.AsType[*statusError](err); ok {
			switch se.code {
			case http.StatusNotFound:
				err = fmt.Errorf("%w (%v)", ErrNotFound, se)
			case http.StatusBadRequest:
				err = fmt.Errorf("%w (%v)", ErrBadTraceID, se)
			}
		}
		return nil, fmt.Errorf("traceview: fetch trace %s: %w", id, err)
	}
	if len(resp.Data) == 0 {
		return nil, fmt.Errorf("traceview: fetch trace %s: %w", id, ErrNotFound)
	}
	return convert(resp.Data[0])
}

// Search returns the IDs of recent traces that have spans of service, most
// recent first, with GET /api/traces?service=<service>&limit=<limit> (Jaeger
// looks back over its default window, 2 days). limit <= 0 means Jaeger's
// default (100). A service Jaeger has not seen returns no IDs and no error.
func Search(ctx context.Context, queryURL, service string, limit int) ([]string, error) {
	if service == "" {
		return nil, errors.New("traceview: search: service is required")
	}
	q := url.Values{"service": {service}}
	if limit > 0 {
		q.Set("limit", strconv.Itoa(limit))
	}
	var resp response
	if err := get(ctx, strings.TrimRight(queryURL, "/")+"/api/traces?"+q.Encode(), &resp); err != nil {
		return nil, fmt.Errorf("traceview: search service %q: %w", service, err)
	}
	type found struct {
		id    string
		start time.Time
	}
	var traces []found
	for _, wt := range resp.Data {
		t, err := convert(wt)
		if err != nil {
			return nil, fmt.Errorf("traceview: search service %q: %w", service, err)
		}
		if !slices.ContainsFunc(traces, func(f found) bool { return f.id == t.ID }) {
			traces = append(traces, found{t.ID, t.Start()})
		}
	}
	slices.SortStableFunc(traces, func(a, b found) int { return b.start.Compare(a.start) })
	ids := make([]string, len(traces))
	for i, f := range traces {
		ids[i] = f.id
	}
	return ids, nil
}

// WaitTrace polls Fetch (every 50 ms, backing off to 500 ms) until the trace
// has at least minSpans spans and returns it. Jaeger stores spans
// asynchronously after the exporter has sent them, so a trace may be absent
// or partial for a moment. A malformed ID fails at once; other errors (not
// found yet, Jaeger unreachable) are retried until ctx is done, when the
// error names the last result.
func WaitTrace(ctx context.Context, queryURL, traceID string, minSpans int) (*Trace, error) {
	delay := 50 * time.Millisecond
	timer := time.NewTimer(0)
	defer timer.Stop()
	var last error
	for {
		select {
		case <-ctx.Done():
			if last == nil {
				last = ctx.Err()
			}
			return nil, fmt.Errorf("traceview: wait for trace %s (%d spans): %w (%w)", traceID, minSpans, ctx.Err(), last)
		case <-timer.C:
		}
		t, err := Fetch(ctx, queryURL, traceID)
		switch {
		case errors.Is(err, ErrBadTraceID):
			return nil, err
		case err != nil:
			if ctx.Err() == nil || last == nil { // keep the cause, not the cut-off
				last = err
			}
		case len(t.Spans) >= minSpans:
			return t, nil
		default:
			last = fmt.Errorf("traceview: trace %s has %d spans", t.ID, len(t.Spans))
		}
		timer.Reset(delay)
		delay = min(delay*2, 500*time.Millisecond)
	}
}

// statusError is a query API answer other than 200 OK.
type statusError struct {
	code int    // HTTP status code
	msg  string // status line and Jaeger's first error message
}

func (e *statusError) Error() string { return "jaeger query API: " + e.msg }

// get fetches u and decodes Jaeger's {"data":..., "errors":[...]} envelope
// into resp. A status other than 200 returns a *statusError.
func get(ctx context.Context, u string, resp *response) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return err
	}
	req.Header.Set("Accept", "application/json")
	r, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	defer r.Body.Close()
	body, err := io.ReadAll(io.LimitReader(r.Body, maxResponseBytes))
	if err != nil {
		return fmt.Errorf("read response: %w", err)
	}
	if r.StatusCode != http.StatusOK {
		msg := r.Status
		var e response
		if json.Unmarshal(body, &e) == nil && len(e.Errors) > 0 {
			msg = fmt.Sprintf("%s: %s", r.Status, e.Errors[0].Msg)
		}
		return &statusError{code: r.StatusCode, msg: msg}
	}
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.UseNumber()
	if err := dec.Decode(resp); err != nil {
		return fmt.Errorf("decode response: %w", err)
	}
	if len(resp.Errors) > 0 {
		return fmt.Errorf("jaeger query API: %s", resp.Errors[0].Msg)
	}
	return nil
}

// The wire format of Jaeger's v1 JSON API (jaeger internal/uimodel).
type (
	response struct {
		Data   []wireTrace `json:"data"`
		Errors []struct {
			Code int    `json:"code"`
			Msg  string `json:"msg"`
		} `json:"errors"`
	}
	wireTrace struct {
		TraceID   string                 `json:"traceID"`
		Spans     []wireSpan             `json:"spans"`
		Processes map[string]wireProcess `json:"processes"`
		Warnings  []string               `json:"warnings"`
	}
	wireSpan struct {
		TraceID       string          `json:"traceID"`
		SpanID        string          `json:"spanID"`
		ParentSpanID  string          `json:"parentSpanID"`
		OperationName string          `json:"operationName"`
		References    []wireReference `json:"references"`
		StartTime     int64           `json:"startTime"` // µs since the Unix epoch
		Duration      int64           `json:"duration"`  // µs
		Tags          []wireKeyValue  `json:"tags"`
		Logs          []wireLog       `json:"logs"`
		ProcessID     string          `json:"processID"`
		Process       *wireProcess    `json:"process"`
		Warnings      []string        `json:"warnings"`
	}
	wireReference struct {
		RefType string `json:"refType"`
		TraceID string `json:"traceID"`
		SpanID  string `json:"spanID"`
	}
	wireProcess struct {
		ServiceName string         `json:"serviceName"`
		Tags        []wireKeyValue `json:"tags"`
	}
	wireLog struct {
		Timestamp int64          `json:"timestamp"` // µs since the Unix epoch
		Fields    []wireKeyValue `json:"fields"`
	}
	wireKeyValue struct {
		Key   string `json:"key"`
		Type  string `json:"type"`
		Value any    `json:"value"`
	}
)

func convert(wt wireTrace) (*Trace, error) {
	t := &Trace{ID: strings.ToLower(wt.TraceID), Warnings: wt.Warnings}
	for _, ws := range wt.Spans {
		s := &Span{
			TraceID:   strings.ToLower(ws.TraceID),
			SpanID:    strings.ToLower(ws.SpanID),
			Operation: ws.OperationName,
			Start:     time.UnixMicro(ws.StartTime),
			Duration:  time.Duration(ws.Duration) * time.Microsecond,
			Warnings:  ws.Warnings,
		}
		if s.TraceID == "" {
			s.TraceID = t.ID
		}
		s.ParentID = parentOf(ws, s.TraceID)
		if s.ParentID == s.SpanID {
			s.ParentID = ""
		}
		switch p, ok := wt.Processes[ws.ProcessID]; {
		case ok:
			s.Service = p.ServiceName
		case ws.Process != nil:
			s.Service = ws.Process.ServiceName
		}
		var err error
		if s.Tags, err = convertTags(ws.Tags); err != nil {
			return nil, fmt.Errorf("traceview: span %s: %w", s.SpanID, err)
		}
		if k, ok := s.Tag("span.kind"); ok {
			s.Kind, _ = k.(string)
		}
		for _, l := range ws.Logs {
			fields, err := convertTags(l.Fields)
			if err != nil {
				return nil, fmt.Errorf("traceview: span %s: %w", s.SpanID, err)
			}
			e := Event{Time: time.UnixMicro(l.Timestamp), Name: "log"}
			for _, f := range fields {
				if f.Key == "event" {
					e.Name = fmt.Sprint(f.Value)
					continue
				}
				e.Fields = append(e.Fields, f)
			}
			s.Events = append(s.Events, e)
		}
		t.Spans = append(t.Spans, s)
	}
	slices.SortStableFunc(t.Spans, func(a, b *Span) int {
		if c := a.Start.Compare(b.Start); c != 0 {
			return c
		}
		return strings.Compare(a.SpanID, b.SpanID)
	})
	return t, nil
}

// parentOf returns the span's CHILD_OF parent in trace traceID, else its
// FOLLOWS_FROM one, else the deprecated parentSpanID field.
func parentOf(ws wireSpan, traceID string) string {
	for _, refType := range []string{"CHILD_OF", "FOLLOWS_FROM"} {
		for _, r := range ws.References {
			if r.RefType == refType && (r.TraceID == "" || strings.EqualFold(r.TraceID, traceID)) {
				return strings.ToLower(r.SpanID)
			}
		}
	}
	return strings.ToLower(ws.ParentSpanID)
}

func convertTags(kvs []wireKeyValue) ([]Tag, error) {
	tags := make([]Tag, 0, len(kvs))
	for _, kv := range kvs {
		v := kv.Value
		if n, ok := v.(json.Number); ok {
			var err error
			if kv.Type == "float64" || strings.ContainsAny(string(n), ".eE") {
				v, err = n.Float64()
			} else {
				v, err = n.Int64()
			}
			if err != nil {
				return nil, fmt.Errorf("tag %s: %w", kv.Key, err)
			}
		}
		tags = append(tags, Tag{Key: kv.Key, Value: v})
	}
	return tags, nil
}
