package config

import (
	"errors"
	"fmt"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpoint "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/meshlet/meshlet/xds"
)

// DecodeLoadAssignment decodes and validates an Any holding a
// ClusterLoadAssignment.
func DecodeLoadAssignment(a *anypb.Any) (*LoadAssignment, error) {
	var la endpoint.ClusterLoadAssignment
	if err := unpack(a, &la, xds.KindLoadAssignment); err != nil {
		return nil, err
	}
	out, err := decodeLoadAssignment(&la)
	if err != nil {
		return nil, fieldErr(xds.KindLoadAssignment, la.GetClusterName(), "", "%v", err)
	}
	return out, nil
}

func decodeLoadAssignment(la *endpoint.ClusterLoadAssignment) (*LoadAssignment, error) {
	if la == nil {
		return nil, errors.New("required")
	}
	out := &LoadAssignment{ClusterName: la.GetClusterName()}
	for i, loc := range la.GetEndpoints() {
		if loc.GetPriority() != 0 {
			return nil, fmt.Errorf("endpoints[%d].priority: only priority 0 is supported", i)
		}
		for j, lbe := range loc.GetLbEndpoints() {
			f := fmt.Sprintf("endpoints[%d].lb_endpoints[%d]", i, j)
			ep := lbe.GetEndpoint()
			if ep == nil {
				return nil, fmt.Errorf("%s.endpoint: required (named endpoints are not supported)", f)
			}
			// TCP or UDP: a UDP cluster's datagrams go to the same host:port.
			addr, _, err := socketAddressUDP(ep.GetAddress(), false)
			if err != nil {
				return nil, fmt.Errorf("%s.endpoint.address: %w", f, err)
			}
			switch lbe.GetHealthStatus() {
			case core.HealthStatus_UNKNOWN, core.HealthStatus_HEALTHY:
			default:
				continue // UNHEALTHY, DRAINING, TIMEOUT, DEGRADED take no new traffic
			}
			w := uint32(1)
			if lw := lbe.GetLoadBalancingWeight(); lw != nil {
				w = lw.GetValue()
			}
			out.Endpoints = append(out.Endpoints, Endpoint{Address: addr, Weight: w})
		}
	}
	return out, nil
}
