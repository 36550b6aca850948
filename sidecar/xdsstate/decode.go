package xdsstate

import (
	"errors"
	"fmt"

	"google.golang.org/protobuf/types/known/anypb"

	"github.com/meshlet/meshlet/sidecar/config"
	"github.com/meshlet/meshlet/xds"
)

// decodeAll decodes and validates every resource of one response, returning
// them by name, or the first error (which becomes the NACK detail).
func decodeAll(typeURL string, resources []*anypb.Any) (map[string]any, map[string]*anypb.Any, error) {
	decoded := make(map[string]any, len(resources))
	raw := make(map[string]*anypb.Any, len(resources))
	for i, a := range resources {
		var (
			name string
			v    any
			err  error
		)
		switch typeURL {
		case xds.ListenerType:
			var l *config.Listener
			if l, err = config.DecodeListener(a); err == nil {
				name, v = l.Name, l
			}
		case xds.RouteType:
			var rc *config.RouteConfig
			if rc, err = config.DecodeRouteConfig(a); err == nil {
				name, v = rc.Name, rc
			}
		case xds.ClusterType:
			var c *config.Cluster
			if c, err = config.DecodeCluster(a); err == nil {
				name, v = c.Name, c
			}
		case xds.EndpointType:
			var la *config.LoadAssignment
			if la, err = config.DecodeLoadAssignment(a); err == nil {
				name, v = la.ClusterName, la
			}
		case xds.SecretType:
			var sec *config.Secret
			if sec, err = config.DecodeSecret(a); err == nil {
				name, v = sec.Name, sec
			}
		default:
			return nil, nil, fmt.Errorf("unsupported resource type %s", typeURL)
		}
		if err != nil {
			return nil, nil, fmt.Errorf("resources[%d]: %w", i, err)
		}
		if _, dup := decoded[name]; dup {
			return nil, nil, fmt.Errorf("resources[%d]: %w", i, &xds.ResourceError{Kind: xds.KindOf(typeURL), Name: name,
				Reason: xds.NACKDuplicateName, Err: errors.New("duplicate resource name")})
		}
		decoded[name] = v
		raw[name] = a
	}
	if typeURL == xds.ListenerType {
		// A TCP and a UDP listener may share an address (a udp service's
		// public listeners); two of one protocol may not.
		type sock struct {
			udp  bool
			addr string
		}
		byAddr := map[sock]string{}
		for name, v := range decoded {
			l := v.(*config.Listener)
			k := sock{udp: l.UDP != nil, addr: l.Address}
			if other, dup := byAddr[k]; dup {
				a, b := min(name, other), max(name, other)
				proto := "tcp"
				if k.udp {
					proto = "udp"
				}
				return nil, nil, &addressConflict{a: a, b: b, addr: l.Address, proto: proto}
			}
			byAddr[k] = name
		}
	}
	return decoded, raw, nil
}

// addressConflict rejects two listeners of one protocol on one address; the
// NACK blames both.
type addressConflict struct{ a, b, addr, proto string }

func (e *addressConflict) Error() string {
	return fmt.Sprintf("listeners %q and %q both listen on %s/%s", e.a, e.b, e.addr, e.proto)
}

// NACKDetails names both listeners (see xds.NACKDetailsOf).
func (e *addressConflict) NACKDetails() []xds.NACKDetail {
	d := xds.NACKDetail{TypeURL: xds.ListenerType, Field: "address", Reason: xds.NACKAddressConflict}
	a, b := d, d
	a.Name, b.Name = e.a, e.b
	return []xds.NACKDetail{a, b}
}
