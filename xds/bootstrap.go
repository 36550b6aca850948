package xds

import (
	"encoding/json"
	"errors"
)

// EnvGRPCCallCreds must be "true" in a grpc-go client's environment for it
// to use a bootstrap's call_creds (grpc-go 1.85 keeps gRFC A97 behind it).
const EnvGRPCCallCreds = "GRPC_EXPERIMENTAL_XDS_BOOTSTRAP_CALL_CREDS"

// GRPCBootstrap describes the xDS bootstrap of a proxyless gRPC client
// (GRPC_XDS_BOOTSTRAP or GRPC_XDS_BOOTSTRAP_CONFIG; gRFC A27).
type GRPCBootstrap struct {
	// Server is the control plane's ADS address, host:port; the
	// certificate must carry its host.
	Server string
	// NodeID is the client's xDS node ID (any name; proxyless clients are
	// not registered in Consul).
	NodeID string
	// CAFile verifies the control plane: TLS channel credentials
	// (gRFC A65, "tls" with ca_certificate_file). Required unless
	// Insecure.
	CAFile string
	// TokenFile holds the client's JWT, sent on every stream by the JWT
	// call credentials (gRFC A97, "jwt_token_file"; set EnvGRPCCallCreds):
	// a projected ServiceAccount token of audience TokenAudience on
	// Kubernetes, or a JWT of the issuer the control plane's Consul auth
	// method trusts (-consul-auth-method). Required unless Insecure.
	TokenFile string
	// Insecure writes plaintext channel credentials and no token, for a
	// control plane run with -xds-insecure.
	Insecure bool
}

type bootstrapCreds struct {
	Type   string         `json:"type"`
	Config map[string]any `json:"config,omitempty"`
}

// JSON returns the bootstrap document. Errors: a field missing.
func (b GRPCBootstrap) JSON() ([]byte, error) {
	if b.Server == "" || b.NodeID == "" {
		return nil, errors.New("xds: a gRPC bootstrap needs the server address and a node ID")
	}
	server := map[string]any{"server_uri": b.Server, "server_features": []string{"xds_v3"}}
	if b.Insecure {
		server["channel_creds"] = []bootstrapCreds{{Type: "insecure"}}
	} else {
		if b.CAFile == "" || b.TokenFile == "" {
			return nil, errors.New("xds: a gRPC bootstrap needs the CA file that verifies the control plane and the client's token file (or Insecure)")
		}
		server["channel_creds"] = []bootstrapCreds{{Type: "tls", Config: map[string]any{"ca_certificate_file": b.CAFile}}}
		server["call_creds"] = []bootstrapCreds{{Type: "jwt_token_file", Config: map[string]any{"jwt_token_file": b.TokenFile}}}
	}
	return json.MarshalIndent(map[string]any{
		"xds_servers": []any{server},
		"node":        map[string]any{"id": b.NodeID},
	}, "", "  ")
}
