package xdsclient

import (
	"fmt"
	"net"
	"strings"

	"google.golang.org/grpc"
	"google.golang.org/grpc/resolver"
	"google.golang.org/grpc/resolver/manual"
)

// serversScheme is the gRPC resolver scheme of a Server naming several
// control plane replicas.
const serversScheme = "meshlet-xds-servers"

// serversServiceConfig spreads clients over the replicas: pick_first over
// the addresses in a random order (gRFC A62), one connection at a time,
// the next address when it fails.
const serversServiceConfig = `{"loadBalancingConfig":[{"pick_first":{"shuffleAddressList":true}}]}`

// serverTarget returns the gRPC target dialled for server and the options
// it needs: server itself (gRPC's DNS resolver) for one address, a static
// resolver over every address for a comma-separated list, each address's
// host being the name its certificate is verified against (unless
// Credentials.ServerName says otherwise). Errors name an address that is
// not host:port, or an empty list entry.
func serverTarget(server string) (string, []grpc.DialOption, error) {
	if !strings.Contains(server, ",") {
		return server, nil, nil
	}
	var addrs []resolver.Address
	for a := range strings.SplitSeq(server, ",") {
		a = strings.TrimSpace(a)
		host, _, err := net.SplitHostPort(a)
		if err != nil || host == "" {
			return "", nil, fmt.Errorf("xdsclient: control plane address %q in %q: want host:port, several separated by commas", a, server)
		}
		addrs = append(addrs, resolver.Address{Addr: a, ServerName: host})
	}
	r := manual.NewBuilderWithScheme(serversScheme)
	r.InitialState(resolver.State{Addresses: addrs})
	return serversScheme + ":///replicas", []grpc.DialOption{grpc.WithResolvers(r), grpc.WithDefaultServiceConfig(serversServiceConfig)}, nil
}
