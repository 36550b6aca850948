package xdsbuild

import (
	"bytes"
	"time"

	cluster "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	route "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	previoushosts "github.com/envoyproxy/go-control-plane/envoy/extensions/retry/host/previous_hosts/v3"
	matcher "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/meshlet/meshlet/xds"
)

// RetrySpec is a retry policy for RouteSpec (Envoy RetryPolicy fields).
type RetrySpec struct {
	RetryOn              []xds.RetryOn // retry_on, joined with ","
	NumRetries           int           // num_retries
	PerTryTimeout        time.Duration // per_try_timeout; 0 = none
	BackoffBase          time.Duration // retry_back_off.base_interval
	BackoffMax           time.Duration // retry_back_off.max_interval
	RetriableStatusCodes []uint32      // retriable_status_codes
	NonIdempotent        string        // xds.RouteExtras.NonIdempotent
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
				Name:       xds.PreviousHostsPredicate,
				ConfigType: &route.RetryPolicy_RetryHostPredicate_TypedConfig{TypedConfig: xds.MustAny(&previoushosts.PreviousHostsPredicate{})},
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
			r.Metadata = xds.ExtrasMetadata(xds.RouteExtras{NonIdempotent: rs.NonIdempotent})
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
		c.Metadata = xds.ExtrasMetadata(o.Extras)
	}
}
