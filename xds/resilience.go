package xds

import (
	"bytes"
	"encoding/json"
	"fmt"
	"time"

	cluster "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	route "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	previoushosts "github.com/envoyproxy/go-control-plane/envoy/extensions/retry/host/previous_hosts/v3"
	matcher "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/structpb"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// MetadataNamespace is the filter_metadata key under which meshlet carries
// settings that have no Envoy field (ClusterExtras on clusters, RouteExtras
// on routes). Other xDS clients ignore it.
const MetadataNamespace = "meshlet"

// PreviousHostsPredicate is the retry host predicate that makes a retry
// prefer an endpoint not tried yet (Envoy
// envoy.retry_host_predicates.previous_hosts).
const PreviousHostsPredicate = "envoy.retry_host_predicates.previous_hosts"

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
// ClusterExtras or RouteExtras). Unknown fields are an error. A missing
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

// RetrySpec is a retry policy for RouteSpec (Envoy RetryPolicy fields).
type RetrySpec struct {
	RetryOn              []RetryOn     // retry_on, joined with ","
	NumRetries           int           // num_retries
	PerTryTimeout        time.Duration // per_try_timeout; 0 = none
	BackoffBase          time.Duration // retry_back_off.base_interval
	BackoffMax           time.Duration // retry_back_off.max_interval
	RetriableStatusCodes []uint32      // retriable_status_codes
	NonIdempotent        string        // RouteExtras.NonIdempotent
	BodyBufferBytes      uint32        // Route.per_request_buffer_limit_bytes
}

// RouteSpec describes one route for NewRoute.
type RouteSpec struct {
	Name string
	// Match: Path (exact) or PathPrefix ("/" when both are empty), and an
	// optional exact :method.
	Path, PathPrefix, Method string
	Cluster                  string
	// Timeout is RouteAction.timeout, always set explicitly (0 = none).
	Timeout           time.Duration
	IdleTimeout       time.Duration // RouteAction.idle_timeout; 0 = unset
	MaxStreamDuration time.Duration // RouteAction.max_stream_duration; 0 = unset
	Retry             *RetrySpec
	// HashHeader adds RouteAction.hash_policy on that header (ring hash).
	HashHeader string
}

// NewRoute builds the route described by s.
func NewRoute(s RouteSpec) *route.Route {
	m := &route.RouteMatch{}
	switch {
	case s.Path != "":
		m.PathSpecifier = &route.RouteMatch_Path{Path: s.Path}
	case s.PathPrefix != "":
		m.PathSpecifier = &route.RouteMatch_Prefix{Prefix: s.PathPrefix}
	default:
		m.PathSpecifier = &route.RouteMatch_Prefix{Prefix: "/"}
	}
	if s.Method != "" {
		m.Headers = []*route.HeaderMatcher{{
			Name: ":method",
			HeaderMatchSpecifier: &route.HeaderMatcher_StringMatch{StringMatch: &matcher.StringMatcher{
				MatchPattern: &matcher.StringMatcher_Exact{Exact: s.Method},
			}},
		}}
	}
	a := &route.RouteAction{
		ClusterSpecifier: &route.RouteAction_Cluster{Cluster: s.Cluster},
		Timeout:          durationpb.New(s.Timeout),
	}
	if s.IdleTimeout > 0 {
		a.IdleTimeout = durationpb.New(s.IdleTimeout)
	}
	if s.MaxStreamDuration > 0 {
		a.MaxStreamDuration = &route.RouteAction_MaxStreamDuration{MaxStreamDuration: durationpb.New(s.MaxStreamDuration)}
	}
	if s.HashHeader != "" {
		a.HashPolicy = []*route.RouteAction_HashPolicy{{
			PolicySpecifier: &route.RouteAction_HashPolicy_Header_{Header: &route.RouteAction_HashPolicy_Header{HeaderName: s.HashHeader}},
		}}
	}
	r := &route.Route{Name: s.Name, Match: m}
	if rs := s.Retry; rs != nil {
		rp := &route.RetryPolicy{
			RetryOn:              joinComma(rs.RetryOn),
			NumRetries:           wrapperspb.UInt32(uint32(rs.NumRetries)),
			RetriableStatusCodes: rs.RetriableStatusCodes,
			RetryHostPredicate: []*route.RetryPolicy_RetryHostPredicate{{
				Name:       PreviousHostsPredicate,
				ConfigType: &route.RetryPolicy_RetryHostPredicate_TypedConfig{TypedConfig: MustAny(&previoushosts.PreviousHostsPredicate{})},
			}},
			HostSelectionRetryMaxAttempts: 3,
		}
		if rs.PerTryTimeout > 0 {
			rp.PerTryTimeout = durationpb.New(rs.PerTryTimeout)
		}
		if rs.BackoffBase > 0 {
			rp.RetryBackOff = &route.RetryPolicy_RetryBackOff{BaseInterval: durationpb.New(rs.BackoffBase)}
			if rs.BackoffMax > 0 {
				rp.RetryBackOff.MaxInterval = durationpb.New(rs.BackoffMax)
			}
		}
		a.RetryPolicy = rp
		if rs.BodyBufferBytes > 0 {
			// Envoy's replacement, Route.request_body_buffer_limit
			// (UInt64Value, not capped by the listener's connection
			// limit), is not read by the sidecar's decoder
			// (sidecar/config) yet: switch both sides together.
			//lint:ignore SA1019 the sidecar decoder reads this field; request_body_buffer_limit replaces it on both sides at once
			r.PerRequestBufferLimitBytes = wrapperspb.UInt32(rs.BodyBufferBytes)
		}
		if rs.NonIdempotent != "" {
			r.Metadata = ExtrasMetadata(RouteExtras{NonIdempotent: rs.NonIdempotent})
		}
	}
	r.Action = &route.Route_Route{Route: a}
	return r
}

func joinComma[S ~string](ss []S) string {
	var b bytes.Buffer
	for i, s := range ss {
		if i > 0 {
			b.WriteByte(',')
		}
		b.WriteString(string(s))
	}
	return b.String()
}

// NewRouteConfigRoutes returns a route configuration with one virtual host
// matching every authority ("*") holding routes, in order (first match
// wins).
func NewRouteConfigRoutes(name string, routes []*route.Route) *route.RouteConfiguration {
	return &route.RouteConfiguration{
		Name:         name,
		VirtualHosts: []*route.VirtualHost{{Name: name, Domains: []string{"*"}, Routes: routes}},
	}
}

// LBPolicy is a cluster's load-balancing algorithm.
type LBPolicy int

// Load-balancing algorithms (Cluster.lb_policy).
const (
	LBRoundRobin   LBPolicy = iota // ROUND_ROBIN, weighted
	LBLeastRequest                 // LEAST_REQUEST, choice_count 2
	LBRingHash                     // RING_HASH on the route's hash_policy
)

// Thresholds are connection-pool limits (Envoy CircuitBreakers.Thresholds,
// priority DEFAULT). Envoy's defaults are 1024, 1024, 1024 and 3.
type Thresholds struct {
	MaxConnections, MaxPendingRequests, MaxRequests, MaxRetries uint32
}

// OutlierSpec configures outlier detection (Envoy OutlierDetection). A
// consecutive count of 0 turns that detector off (its enforcing_* is 0).
type OutlierSpec struct {
	Consecutive5xx, ConsecutiveGatewayErrors, ConsecutiveLocalOriginFailures uint32
	Interval, BaseEjectionTime, MaxEjectionTime                              time.Duration
	MaxEjectionPercent                                                       uint32
}

func enforcing(n uint32) (*wrapperspb.UInt32Value, *wrapperspb.UInt32Value) {
	if n == 0 {
		return nil, wrapperspb.UInt32(0)
	}
	return wrapperspb.UInt32(n), wrapperspb.UInt32(100)
}

// applyResilience sets the LB policy, thresholds, outlier detection and
// extras of o on c.
func applyResilience(c *cluster.Cluster, o ClusterOptions) {
	switch o.LB {
	case LBLeastRequest:
		c.LbPolicy = cluster.Cluster_LEAST_REQUEST
		c.LbConfig = &cluster.Cluster_LeastRequestLbConfig_{LeastRequestLbConfig: &cluster.Cluster_LeastRequestLbConfig{ChoiceCount: wrapperspb.UInt32(2)}}
	case LBRingHash:
		c.LbPolicy = cluster.Cluster_RING_HASH
		c.LbConfig = &cluster.Cluster_RingHashLbConfig_{RingHashLbConfig: &cluster.Cluster_RingHashLbConfig{
			MinimumRingSize: wrapperspb.UInt64(1024), HashFunction: cluster.Cluster_RingHashLbConfig_XX_HASH,
		}}
	}
	if t := o.Thresholds; t != nil {
		c.CircuitBreakers = &cluster.CircuitBreakers{Thresholds: []*cluster.CircuitBreakers_Thresholds{{
			Priority:           core.RoutingPriority_DEFAULT,
			MaxConnections:     wrapperspb.UInt32(t.MaxConnections),
			MaxPendingRequests: wrapperspb.UInt32(t.MaxPendingRequests),
			MaxRequests:        wrapperspb.UInt32(t.MaxRequests),
			MaxRetries:         wrapperspb.UInt32(t.MaxRetries),
		}}}
	}
	if od := o.Outlier; od != nil {
		c5, e5 := enforcing(od.Consecutive5xx)
		cg, eg := enforcing(od.ConsecutiveGatewayErrors)
		cl, el := enforcing(od.ConsecutiveLocalOriginFailures)
		c.OutlierDetection = &cluster.OutlierDetection{
			Consecutive_5Xx: c5, EnforcingConsecutive_5Xx: e5,
			ConsecutiveGatewayFailure: cg, EnforcingConsecutiveGatewayFailure: eg,
			SplitExternalLocalOriginErrors: true,
			ConsecutiveLocalOriginFailure:  cl, EnforcingConsecutiveLocalOriginFailure: el,
			EnforcingSuccessRate:            wrapperspb.UInt32(0),
			EnforcingLocalOriginSuccessRate: wrapperspb.UInt32(0),
			Interval:                        durationpb.New(od.Interval),
			BaseEjectionTime:                durationpb.New(od.BaseEjectionTime),
			MaxEjectionTime:                 durationpb.New(od.MaxEjectionTime),
			MaxEjectionPercent:              wrapperspb.UInt32(od.MaxEjectionPercent),
		}
	}
	if o.Extras != nil {
		c.Metadata = ExtrasMetadata(o.Extras)
	}
}
