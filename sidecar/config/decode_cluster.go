package config

import (
	"errors"
	"fmt"
	"time"

	cluster "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	upstreamhttp "github.com/envoyproxy/go-control-plane/envoy/extensions/upstreams/http/v3"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/meshlet/meshlet/xds"
)

// DecodeCluster decodes and validates an Any holding a Cluster.
func DecodeCluster(a *anypb.Any) (*Cluster, error) {
	var c cluster.Cluster
	if err := unpack(a, &c, xds.KindCluster); err != nil {
		return nil, err
	}
	kind, name := xds.KindCluster, c.GetName()
	if name == "" {
		return nil, fieldErr(kind, name, "name", "required")
	}
	out := &Cluster{Name: name, ConnectTimeout: xds.DefaultConnectTimeout, Protocol: xds.ProtocolTCP}
	if ct := c.GetConnectTimeout(); ct != nil {
		out.ConnectTimeout = ct.AsDuration()
	}
	switch c.GetType() {
	case cluster.Cluster_EDS:
		out.Type = ClusterEDS
		if !isADS(c.GetEdsClusterConfig().GetEdsConfig()) {
			return nil, fieldErr(kind, name, "eds_cluster_config.eds_config", "only ADS is supported")
		}
		out.EDSServiceName = c.GetEdsClusterConfig().GetServiceName()
		if out.EDSServiceName == "" {
			out.EDSServiceName = name
		}
	case cluster.Cluster_STATIC:
		out.Type = ClusterStatic
		la, err := decodeLoadAssignment(c.GetLoadAssignment())
		if err != nil {
			return nil, fieldErr(kind, name, "load_assignment", "%v", err)
		}
		out.Static = la
	case cluster.Cluster_ORIGINAL_DST:
		if err := decodeOriginalDstCluster(&c, out); err != nil {
			return nil, err
		}
		return out, nil
	default:
		if c.GetClusterType() != nil {
			return nil, fieldErr(kind, name, "cluster_type", "custom cluster types are not supported")
		}
		return nil, fieldErr(kind, name, "type", "unsupported discovery type %s (supported: STATIC, EDS, ORIGINAL_DST)", c.GetType())
	}
	switch c.GetLbPolicy() {
	case cluster.Cluster_CLUSTER_PROVIDED:
		return nil, fieldErr(kind, name, "lb_policy", "CLUSTER_PROVIDED is only for type ORIGINAL_DST (this cluster is %s)", c.GetType())
	case cluster.Cluster_ROUND_ROBIN:
		out.LB = LBRoundRobin
	case cluster.Cluster_LEAST_REQUEST:
		out.LB, out.ChoiceCount = LBLeastRequest, 2
		if n := c.GetLeastRequestLbConfig().GetChoiceCount(); n != nil {
			out.ChoiceCount = int(n.GetValue())
		}
	case cluster.Cluster_RING_HASH:
		out.LB, out.RingSize = LBRingHash, 1024
		if n := c.GetRingHashLbConfig().GetMinimumRingSize(); n != nil {
			out.RingSize = int(min(n.GetValue(), 1<<20))
		}
	default:
		return nil, fieldErr(kind, name, "lb_policy", "unsupported %s (supported: ROUND_ROBIN, LEAST_REQUEST, RING_HASH)", c.GetLbPolicy())
	}
	if c.GetOriginalDstLbConfig() != nil {
		return nil, fieldErr(kind, name, "original_dst_lb_config", "only for type ORIGINAL_DST")
	}
	return out, decodeClusterCommon(&c, out)
}

// decodeOriginalDstCluster decodes the ORIGINAL_DST specifics: lb_policy
// CLUSTER_PROVIDED, no endpoints, of original_dst_lb_config only
// upstream_port_override, and no per-host health state (its hosts last one
// connection: outlier detection and endpoint breakers would never see a
// second one). cleanup_interval is accepted: meshlet keeps no host beyond
// its connection.
func decodeOriginalDstCluster(c *cluster.Cluster, out *Cluster) error {
	kind, name := xds.KindCluster, out.Name
	out.Type, out.LB = ClusterOriginalDst, LBClusterProvided
	if c.GetLbPolicy() != cluster.Cluster_CLUSTER_PROVIDED {
		return fieldErr(kind, name, "lb_policy", "an ORIGINAL_DST cluster needs CLUSTER_PROVIDED (got %s)", c.GetLbPolicy())
	}
	if c.GetLoadAssignment() != nil {
		return fieldErr(kind, name, "load_assignment", "an ORIGINAL_DST cluster has no endpoints: each connection goes to its original destination")
	}
	if c.GetEdsClusterConfig() != nil {
		return fieldErr(kind, name, "eds_cluster_config", "an ORIGINAL_DST cluster has no endpoints")
	}
	switch lc := c.GetLbConfig().(type) {
	case nil:
	case *cluster.Cluster_OriginalDstLbConfig_:
		od := lc.OriginalDstLbConfig
		if f := unsupportedField(od, "upstream_port_override"); f != "" {
			return fieldErr(kind, name, "original_dst_lb_config."+f, "not supported (supported: upstream_port_override): the destination is the connection's original one")
		}
		if p := od.GetUpstreamPortOverride(); p != nil {
			if p.GetValue() < 1 || p.GetValue() > 65535 {
				return fieldErr(kind, name, "original_dst_lb_config.upstream_port_override", "%d out of range 1-65535", p.GetValue())
			}
			out.PortOverride = int(p.GetValue())
		}
	default:
		return fieldErr(kind, name, "lb_config", "only original_dst_lb_config goes with ORIGINAL_DST")
	}
	if c.GetOutlierDetection() != nil {
		return fieldErr(kind, name, "outlier_detection", "not supported on ORIGINAL_DST: each host serves one connection")
	}
	if err := decodeClusterCommon(c, out); err != nil {
		return err
	}
	if out.EndpointBreaker != nil {
		return fieldErr(kind, name, "metadata.filter_metadata[\""+xds.MetadataNamespace+"\"].endpointBreaker", "not supported on ORIGINAL_DST: each host serves one connection")
	}
	return nil
}

// decodeClusterCommon decodes what every cluster type has: circuit
// breakers, outlier detection, meshlet's extras, upstream TLS and HTTP
// protocol options.
func decodeClusterCommon(c *cluster.Cluster, out *Cluster) error {
	kind, name := xds.KindCluster, out.Name
	out.Thresholds = DefaultThresholds
	maxRetriesSet := false
	for i, t := range c.GetCircuitBreakers().GetThresholds() {
		if t.GetPriority() != core.RoutingPriority_DEFAULT {
			continue // no route asks for HIGH priority
		}
		if t.GetRetryBudget() != nil {
			return fieldErr(kind, name, fmt.Sprintf("circuit_breakers.thresholds[%d].retry_budget", i),
				"not supported: meshlet's retry budget is metadata.filter_metadata[%q].retryBudget", xds.MetadataNamespace)
		}
		maxRetriesSet = maxRetriesSet || t.GetMaxRetries() != nil
		for _, f := range []struct {
			dst *int
			v   *wrapperspb.UInt32Value
		}{
			{&out.Thresholds.MaxConnections, t.GetMaxConnections()}, {&out.Thresholds.MaxPendingRequests, t.GetMaxPendingRequests()},
			{&out.Thresholds.MaxRequests, t.GetMaxRequests()}, {&out.Thresholds.MaxRetries, t.GetMaxRetries()},
		} {
			if f.v != nil {
				*f.dst = int(f.v.GetValue())
			}
		}
	}
	if od := c.GetOutlierDetection(); od != nil {
		o, err := decodeOutlier(od)
		if err != nil {
			return fieldErr(kind, name, "outlier_detection", "%v", err)
		}
		out.Outlier = o
	}
	var extras xds.ClusterExtras
	if err := xds.DecodeExtras(c.GetMetadata(), &extras); err != nil {
		return fieldErr(kind, name, "metadata.filter_metadata[\""+xds.MetadataNamespace+"\"]", "%v", err)
	}
	if b := extras.RetryBudget; b != nil && (b.Ratio < 0 || b.Ratio > 1 || b.MinRetriesPerSecond < 0 || b.TTL <= 0) {
		return fieldErr(kind, name, "metadata.filter_metadata[\""+xds.MetadataNamespace+"\"].retryBudget", "ratio must be 0-1, minRetriesPerSecond ≥ 0, ttl > 0")
	}
	if b := extras.EndpointBreaker; b != nil && (b.ConsecutiveFailures == 0 && b.FailureRatio == 0 || b.OpenInterval <= 0 || b.FailureRatio < 0 || b.FailureRatio > 1) {
		return fieldErr(kind, name, "metadata.filter_metadata[\""+xds.MetadataNamespace+"\"].endpointBreaker", "needs consecutiveFailures or failureRatio (0-1), and openInterval > 0")
	}
	out.RetryBudget, out.EndpointBreaker = extras.RetryBudget, extras.EndpointBreaker
	if out.RetryBudget != nil && !maxRetriesSet {
		// A retry budget bounds retries; Envoy ignores max_retries when
		// CircuitBreakers.Thresholds.retry_budget is set, and Istio sets it
		// to the maximum for the same reason. Only an explicit max_retries
		// still caps the retries in flight.
		out.Thresholds.MaxRetries = UnlimitedRetries
	}
	if ts := c.GetTransportSocket(); ts != nil {
		var u tlsv3.UpstreamTlsContext
		if err := ts.GetTypedConfig().UnmarshalTo(&u); err != nil {
			return fieldErr(kind, name, "transport_socket", "only %s with an UpstreamTlsContext is supported: %v", xds.TLSTransportSocket, err)
		}
		t, err := decodeUpstreamTLS(&u)
		if err != nil {
			return fieldErr(kind, name, "transport_socket", "%v", err)
		}
		out.TLS = t
	}
	for key, opts := range c.GetTypedExtensionProtocolOptions() {
		if key != xds.HTTPProtocolOptionsKey {
			return fieldErr(kind, name, "typed_extension_protocol_options", "unsupported key %q", key)
		}
		var po upstreamhttp.HttpProtocolOptions
		if err := opts.UnmarshalTo(&po); err != nil {
			return fieldErr(kind, name, "typed_extension_protocol_options["+key+"]", "%v", err)
		}
		switch {
		case po.GetExplicitHttpConfig().GetHttp2ProtocolOptions() != nil:
			out.Protocol = xds.ProtocolHTTP2
		case po.GetExplicitHttpConfig().GetHttpProtocolOptions() != nil:
			out.Protocol = xds.ProtocolHTTP
		default:
			return fieldErr(kind, name, "typed_extension_protocol_options["+key+"]", "only explicit_http_config with HTTP/1.1 or HTTP/2 is supported")
		}
	}
	return nil
}

func decodeOutlier(od *cluster.OutlierDetection) (*OutlierDetection, error) {
	u32 := func(v *wrapperspb.UInt32Value, def uint32) int {
		if v == nil {
			return int(def)
		}
		return int(v.GetValue())
	}
	dur := func(d *durationpb.Duration, def time.Duration) time.Duration {
		if d == nil {
			return def
		}
		return d.AsDuration()
	}
	o := &OutlierDetection{
		SplitLocalOrigin:   od.GetSplitExternalLocalOriginErrors(),
		Interval:           dur(od.GetInterval(), 10*time.Second),
		BaseEjectionTime:   dur(od.GetBaseEjectionTime(), 30*time.Second),
		MaxEjectionTime:    dur(od.GetMaxEjectionTime(), 300*time.Second),
		MaxEjectionPercent: u32(od.GetMaxEjectionPercent(), 10),
	}
	// A detector runs when its enforcing percentage is above 0 (Envoy's
	// defaults: 100 for consecutive 5xx and local-origin, 0 for gateway).
	if u32(od.GetEnforcingConsecutive_5Xx(), 100) > 0 {
		o.Consecutive5xx = u32(od.GetConsecutive_5Xx(), 5)
	}
	if u32(od.GetEnforcingConsecutiveGatewayFailure(), 0) > 0 {
		o.ConsecutiveGatewayErrors = u32(od.GetConsecutiveGatewayFailure(), 5)
	}
	if o.SplitLocalOrigin && u32(od.GetEnforcingConsecutiveLocalOriginFailure(), 100) > 0 {
		o.ConsecutiveLocalOriginFailures = u32(od.GetConsecutiveLocalOriginFailure(), 5)
	}
	if v := od.GetEnforcingSuccessRate(); v != nil && v.GetValue() > 0 {
		return nil, errors.New("enforcing_success_rate: success-rate ejection is not supported (set it to 0)")
	}
	if v := od.GetEnforcingFailurePercentage(); v.GetValue() > 0 {
		return nil, errors.New("enforcing_failure_percentage: failure-percentage ejection is not supported")
	}
	if o.MaxEjectionPercent > 100 {
		return nil, fmt.Errorf("max_ejection_percent: %d is above 100", o.MaxEjectionPercent)
	}
	return o, nil
}
