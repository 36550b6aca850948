package xdsclient

import (
	"context"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"

	"github.com/meshlet/meshlet/xds"
)

// ProbeResult is what one ADS stream was served for a node.
type ProbeResult struct {
	// Secrets are the names of the SDS secrets received.
	Secrets []string
	// SPIFFEID is the URI SAN of the workload certificate received
	// (xds.SecretCert), "" when none came.
	SPIFFEID string
	// PrivateKey reports that a private key came with it.
	PrivateKey bool
}

// Probe opens one ADS stream to server as node, asks for its secrets
// (xds.SecretCert and xds.SecretRoots) and returns what the first
// response holds, or the error that ended the stream (the control plane's
// refusal: a gRPC status, PermissionDenied or Unauthenticated, naming the
// reason; or a TLS failure). Unlike a Client it allows credentials
// without a token (TokenFile ""), to show what an unauthenticated
// process gets. ctx bounds the wait. `sidecar xds-check` runs it.
func Probe(ctx context.Context, server string, c Credentials, node *core.Node) (*ProbeResult, error) {
	var opts []grpc.DialOption
	switch {
	case c.Insecure:
		var err error
		if opts, err = c.DialOptions(); err != nil {
			return nil, err
		}
	case c.CAFile == "":
		return nil, errors.New("xdsclient: probe: -xds-ca-file is required (or -xds-insecure)")
	default:
		roots := &caFile{path: c.CAFile}
		if _, err := roots.pool(); err != nil {
			return nil, err
		}
		opts = append(opts, grpc.WithTransportCredentials(&tlsCreds{TransportCredentials: credentials.NewTLS(roots.tlsConfig(c.ServerName)),
			ca: roots, serverName: c.ServerName}))
		if c.TokenFile != "" {
			tok := TokenFile(c.TokenFile)
			if _, err := tok.read(); err != nil {
				return nil, err
			}
			opts = append(opts, grpc.WithPerRPCCredentials(tok))
		}
	}
	conn, err := grpc.NewClient(server, opts...)
	if err != nil {
		return nil, fmt.Errorf("xdsclient: %s: %w", server, err)
	}
	defer conn.Close()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stream, err := discovery.NewAggregatedDiscoveryServiceClient(conn).StreamAggregatedResources(ctx, grpc.WaitForReady(false))
	if err != nil {
		return nil, err
	}
	if node.GetUserAgentName() == "" {
		node.UserAgentName = xds.UserAgentName
	}
	if err := stream.Send(&discovery.DiscoveryRequest{Node: node, TypeUrl: xds.SecretType,
		ResourceNames: []string{xds.SecretCert, xds.SecretRoots}}); err != nil {
		if _, rerr := stream.Recv(); rerr != nil {
			return nil, rerr
		}
		return nil, err
	}
	resp, err := stream.Recv()
	if err != nil {
		return nil, err
	}
	out := &ProbeResult{}
	for _, a := range resp.GetResources() {
		var sec tlsv3.Secret
		if err := a.UnmarshalTo(&sec); err != nil {
			return nil, fmt.Errorf("xdsclient: probe: secret: %w", err)
		}
		out.Secrets = append(out.Secrets, sec.GetName())
		tc := sec.GetTlsCertificate()
		if tc == nil {
			continue
		}
		out.PrivateKey = out.PrivateKey || len(tc.GetPrivateKey().GetInlineString()) > 0 || len(tc.GetPrivateKey().GetInlineBytes()) > 0
		chain := tc.GetCertificateChain().GetInlineString()
		if chain == "" {
			chain = string(tc.GetCertificateChain().GetInlineBytes())
		}
		if blk, _ := pem.Decode([]byte(chain)); blk != nil {
			if cert, err := x509.ParseCertificate(blk.Bytes); err == nil && len(cert.URIs) > 0 {
				out.SPIFFEID = cert.URIs[0].String()
			}
		}
	}
	return out, nil
}
