package xds

import (
	"bytes"
	"encoding/json"
	"fmt"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/types/known/structpb"
)

// MetadataNamespace is the filter_metadata key under which meshlet carries
// settings that have no Envoy field (ClusterExtras on clusters, RouteExtras
// on routes, ListenerExtras on listeners). Other xDS clients ignore it.
const MetadataNamespace = "meshlet"

// ClusterExtras are a cluster's meshlet-only settings, in
// Cluster.metadata.filter_metadata["meshlet"] as JSON-shaped fields:
//
//	{"retryBudget": {"ratio": 0.2, "minRetriesPerSecond": 10, "ttl": "10s"},
//	 "endpointBreaker": {"consecutiveFailures": 5, "openInterval": "30s", ...}}
type ClusterExtras struct {
	RetryBudget     *RetryBudget     `json:"retryBudget,omitempty"`
	EndpointBreaker *EndpointBreaker `json:"endpointBreaker,omitempty"`
}

// RetryBudget bounds retries to a cluster: retries may use Ratio of the
// requests seen over TTL plus MinRetriesPerSecond × TTL (Linkerd's budget).
type RetryBudget struct {
	Ratio               float64  `json:"ratio"`
	MinRetriesPerSecond int      `json:"minRetriesPerSecond"`
	TTL                 Duration `json:"ttl"`
}

// EndpointBreaker configures a github.com/sony/gobreaker breaker per
// endpoint. It trips after ConsecutiveFailures failures in a row, or when
// FailureRatio (if > 0) of at least MinRequests requests failed within
// Interval; it stays open OpenInterval, then lets HalfOpenRequests probes
// through.
type EndpointBreaker struct {
	ConsecutiveFailures uint32   `json:"consecutiveFailures"`
	FailureRatio        float64  `json:"failureRatio,omitempty"`
	MinRequests         uint32   `json:"minRequests,omitempty"`
	Interval            Duration `json:"interval"`
	OpenInterval        Duration `json:"openInterval"`
	HalfOpenRequests    uint32   `json:"halfOpenRequests"`
}

// RouteExtras are a route's meshlet-only settings, in
// Route.metadata.filter_metadata["meshlet"]:
//
//	{"nonIdempotent": "retry"}
type RouteExtras struct {
	// NonIdempotent is "safe" (default: POST, PATCH and bodies of unknown
	// length are retried only when nothing reached the upstream or with an
	// Idempotency-Key header) or "retry".
	NonIdempotent string `json:"nonIdempotent,omitempty"`
}

// ListenerExtras are a listener's meshlet-only settings, in
// Listener.metadata.filter_metadata["meshlet"]:
//
//	{"tracePropagation": ["tracecontext", "b3multi"]}
type ListenerExtras struct {
	// TracePropagation lists the trace context formats the listener's HTTP
	// connection managers extract and inject; empty means tracecontext.
	TracePropagation []string `json:"tracePropagation,omitempty"`
}

// Duration is a time.Duration written as a Go duration string in JSON.
type Duration time.Duration

// MarshalJSON writes "1.5s" style strings.
func (d Duration) MarshalJSON() ([]byte, error) { return json.Marshal(time.Duration(d).String()) }

// UnmarshalJSON reads "1.5s" style strings.
func (d *Duration) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err != nil {
		return fmt.Errorf("duration must be a string like \"10s\": %w", err)
	}
	v, err := time.ParseDuration(s)
	if err != nil {
		return err
	}
	*d = Duration(v)
	return nil
}

// ExtrasMetadata returns core.Metadata holding v under MetadataNamespace, or
// nil when v is nil.
func ExtrasMetadata(v any) *core.Metadata {
	b, err := json.Marshal(v)
	if err != nil {
		panic(fmt.Sprintf("xds: marshal %T: %v", v, err)) // plain structs always marshal
	}
	if string(b) == "null" || string(b) == "{}" {
		return nil
	}
	var st structpb.Struct
	if err := protojson.Unmarshal(b, &st); err != nil {
		panic(fmt.Sprintf("xds: %T as Struct: %v", v, err))
	}
	return &core.Metadata{FilterMetadata: map[string]*structpb.Struct{MetadataNamespace: &st}}
}

// DecodeExtras reads the MetadataNamespace entry of md into out (a pointer to
// ClusterExtras, RouteExtras or ListenerExtras). Unknown fields are an error. A missing
// entry leaves out unchanged.
func DecodeExtras(md *core.Metadata, out any) error {
	st := md.GetFilterMetadata()[MetadataNamespace]
	if st == nil {
		return nil
	}
	b, err := protojson.Marshal(st)
	if err != nil {
		return err
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	return dec.Decode(out)
}
