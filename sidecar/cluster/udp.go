package cluster

import (
	"context"
	"net"
	"sync"
)

// UDPConn is a connected UDP socket to an endpoint, holding one of its
// cluster's connection slots (max_connections) until closed: a UDP
// session counts as a connection, as in Envoy's udp_proxy.
type UDPConn struct {
	*net.UDPConn
	c    *Cluster
	once sync.Once
}

// Close closes the socket and frees its connection slot; it is idempotent.
func (u *UDPConn) Close() error {
	err := u.UDPConn.Close()
	u.once.Do(u.c.releaseConn)
	return err
}

// DialUDP opens a connected UDP socket to the endpoint, within the
// cluster's max_connections; it fails with an *UpstreamError of
// KindOverflow when the cluster is at its limit, KindConnectFailure when
// no socket could be made (a UDP connect sends nothing). The cluster's TLS,
// if any, does not apply: there is no TLS for UDP.
func (e *Endpoint) DialUDP(ctx context.Context) (*UDPConn, error) {
	c := e.cluster
	if !c.acquireConn() {
		return nil, &UpstreamError{Kind: KindOverflow, Err: errMaxConnections}
	}
	raw, err := c.dialer.DialContext(ctx, "udp", e.Address)
	if err != nil {
		c.releaseConn()
		return nil, &UpstreamError{Kind: KindConnectFailure, Err: err}
	}
	return &UDPConn{UDPConn: raw.(*net.UDPConn), c: c}, nil
}
