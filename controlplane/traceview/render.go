package traceview

import (
	"bufio"
	"fmt"
	"io"
	"slices"
	"strings"
	"time"
)

// isRetryTag reports whether a tag carries attempt or retry information
// (e.g. http.request.resend_count, meshlet.attempt, meshlet.retry.count).
func isRetryTag(key string) bool {
	k := strings.ToLower(key)
	return strings.Contains(k, "attempt") || strings.Contains(k, "retry") || strings.Contains(k, "resend")
}

// Render writes t as text: a header line
//
//	trace <id>: <n> spans, services <a>, <b>, duration <d>
//
// then one line per span, indented two spaces per level under its parent,
// siblings (and roots) ordered by start time:
//
//	<service> <operation>  <duration>  +<offset from trace start>  [<kind>]  <key tags>
//
// with durations in milliseconds to the microsecond ("12.345ms"). Key tags
// are the HTTP / gRPC status code, error (with otel.status_description),
// meshlet.reason and any tag naming
// an attempt or a retry. Each span's events follow it, indented one more
// level, as "event <name>  +<offset>  <fields>". A span whose parent is not
// in the trace is shown as a root with a note. It returns the first write
// error.
func Render(w io.Writer, t *Trace) error {
	bw := bufio.NewWriter(w)
	start := t.Start()
	fmt.Fprintf(bw, "trace %s: %d spans, services %s, duration %s\n",
		t.ID, len(t.Spans), strings.Join(t.Services(), ", "), ms(t.Duration()))
	for _, warn := range t.Warnings {
		fmt.Fprintf(bw, "warning: %s\n", warn)
	}

	// In start order (Fetch sorts, a hand-built Trace may not), so that
	// roots and every list of children are too.
	spans := slices.Clone(t.Spans)
	slices.SortStableFunc(spans, func(a, b *Span) int {
		if c := a.Start.Compare(b.Start); c != 0 {
			return c
		}
		return strings.Compare(a.SpanID, b.SpanID)
	})
	byID := make(map[string]*Span, len(spans))
	for _, s := range spans {
		byID[s.SpanID] = s
	}
	children := make(map[string][]*Span)
	var roots []*Span
	for _, s := range spans {
		if s.ParentID != "" && byID[s.ParentID] != nil {
			children[s.ParentID] = append(children[s.ParentID], s)
		} else {
			roots = append(roots, s)
		}
	}

	visited := make(map[*Span]bool, len(t.Spans))
	var walk func(s *Span, depth int, note string)
	walk = func(s *Span, depth int, note string) {
		if visited[s] {
			return
		}
		visited[s] = true
		renderSpan(bw, s, depth, start, note)
		for _, c := range children[s.SpanID] {
			walk(c, depth+1, "")
		}
	}
	for _, r := range roots {
		note := ""
		if r.ParentID != "" {
			note = fmt.Sprintf("(parent %s not in trace)", r.ParentID)
		}
		walk(r, 0, note)
	}
	// Spans only reachable through a parent cycle: show them as roots too.
	for _, s := range spans {
		if !visited[s] {
			walk(s, 0, fmt.Sprintf("(parent %s is in a cycle)", s.ParentID))
		}
	}
	if err := bw.Flush(); err != nil {
		return fmt.Errorf("traceview: render: %w", err)
	}
	return nil
}

func renderSpan(w io.Writer, s *Span, depth int, traceStart time.Time, note string) {
	indent := strings.Repeat("  ", depth)
	fields := []string{
		fmt.Sprintf("%s%s %s", indent, orDash(s.Service), orDash(s.Operation)),
		ms(s.Duration),
		"+" + ms(s.Start.Sub(traceStart)),
	}
	if s.Kind != "" {
		fields = append(fields, s.Kind)
	}
	// Key tags, in this order when present; then attempt/retry tags.
	keyTags := []string{
		"http.response.status_code", "http.status_code", "rpc.grpc.status_code",
		"error", "otel.status_description", "meshlet.reason",
	}
	var tags []string
	for _, k := range keyTags {
		if v, ok := s.Tag(k); ok {
			tags = append(tags, Tag{k, v}.String())
		}
	}
	for _, tag := range s.Tags {
		if isRetryTag(tag.Key) && !slices.Contains(keyTags, tag.Key) {
			tags = append(tags, tag.String())
		}
	}
	if len(tags) > 0 {
		fields = append(fields, strings.Join(tags, " "))
	}
	if note != "" {
		fields = append(fields, note)
	}
	fmt.Fprintln(w, strings.Join(fields, "  "))
	for _, e := range s.Events {
		line := fmt.Sprintf("%s  event %s  +%s", indent, e.Name, ms(e.Time.Sub(traceStart)))
		if len(e.Fields) > 0 {
			fs := make([]string, len(e.Fields))
			for i, f := range e.Fields {
				fs[i] = f.String()
			}
			line += "  " + strings.Join(fs, " ")
		}
		fmt.Fprintln(w, line)
	}
}

// ms formats d in milliseconds with three decimals ("12.345ms").
func ms(d time.Duration) string {
	return fmt.Sprintf("%.3fms", float64(d)/float64(time.Millisecond))
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}
