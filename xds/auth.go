package xds

// What a sidecar (or a proxyless gRPC client) and the control plane agree
// on to authenticate an ADS stream: ADS runs over TLS, the client verifies
// the control plane's serving certificate against a CA bundle it is given,
// and proves who it is with a bearer token sent as gRPC per-RPC metadata
// (the "authorization" header of every stream, RFC 6750). The token is a
// Kubernetes projected ServiceAccount token of audience TokenAudience
// (checked with a TokenReview) or a Consul ACL token (resolved through
// Consul's ACL API); the control plane then serves a stream only the
// nodes that identity may act as. Istio (istio-token, audience
// istio-ca, istio-ca-root-cert) and consul-dataplane (-credential-type
// login / static) work the same way.
const (
	// AuthorizationMetadataKey is the gRPC metadata key carrying the
	// token: "authorization", value BearerPrefix + token (gRFC A97's JWT
	// call credentials send the same).
	AuthorizationMetadataKey = "authorization"
	// BearerPrefix prefixes the token in AuthorizationMetadataKey.
	BearerPrefix = "Bearer "
	// TokenAudience is the audience of the projected ServiceAccount tokens
	// sidecars present on Kubernetes; the control plane's TokenReview asks
	// for it, so a token minted for the API server (the default
	// ServiceAccount token) or for another audience is refused.
	TokenAudience = "meshlet"
	// TokenExpirationSeconds is the lifetime the injection webhook asks
	// for the projected token (1 h; the kubelet rotates it at 80 % of its
	// life, and the API server's minimum is 10 minutes).
	TokenExpirationSeconds = 3600
	// CARootConfigMap is the ConfigMap the control plane keeps in every
	// injected namespace with the CA bundle that signs its xDS serving
	// certificate (key CARootKey); injection mounts it into the sidecar.
	// Istio's istio-ca-root-cert.
	CARootConfigMap = "meshlet-ca-root-cert"
	// CARootKey is the key of the bundle (PEM) in CARootConfigMap.
	CARootKey = "ca.crt"
	// PodTokenDir is where injection mounts the projected token in the
	// sidecar (file PodTokenFile).
	PodTokenDir = "/var/run/secrets/meshlet.io/serviceaccount"
	// PodTokenFile is the sidecar's -token-file in a pod.
	PodTokenFile = PodTokenDir + "/token"
	// PodCADir is where injection mounts CARootConfigMap in the sidecar.
	PodCADir = "/var/run/meshlet.io/xds-ca"
	// PodCAFile is the sidecar's -xds-ca-file in a pod.
	PodCAFile = PodCADir + "/" + CARootKey
)

// The sidecar's environment variables for its ADS credentials, read as
// defaults of its flags (-xds-ca-file, -token-file, -xds-insecure,
// -xds-server-name).
const (
	EnvXDSCAFile     = "MESHLET_XDS_CA_FILE"
	EnvTokenFile     = "MESHLET_TOKEN_FILE"
	EnvXDSInsecure   = "MESHLET_XDS_INSECURE"
	EnvXDSServerName = "MESHLET_XDS_SERVER_NAME"
)

// AuthDenial is why the control plane refused an ADS stream: the reason
// label of meshlet_controlplane_xds_auth_denied_total, the reason in
// `controlplane status`, and a word of the PermissionDenied or
// Unauthenticated status message the client sees.
type AuthDenial string

// Reasons of a refused ADS stream.
const (
	// DenyNoCredential: the stream carried no bearer token
	// (Unauthenticated).
	DenyNoCredential AuthDenial = "no_credential"
	// DenyInvalidToken: the token was refused by the authority behind it:
	// expired, wrong audience, of a deleted pod, an unknown or revoked
	// Consul token (Unauthenticated).
	DenyInvalidToken AuthDenial = "invalid_token"
	// DenyWrongNode: the node ID named belongs to another pod or service
	// than the token's (PermissionDenied).
	DenyWrongNode AuthDenial = "wrong_node"
	// DenyUnregisteredNode: no proxy of that node ID is registered in
	// Consul, so nothing vouches for whom it belongs to (PermissionDenied;
	// a sidecar started before its registration retries with backoff).
	DenyUnregisteredNode AuthDenial = "unregistered_node"
	// DenyNodeChanged: a stream named one node and then another
	// (PermissionDenied).
	DenyNodeChanged AuthDenial = "node_changed"
	// DenyRevoked: an open stream's node came to belong to another
	// identity (a registration replaced), so the stream was closed
	// (PermissionDenied).
	DenyRevoked AuthDenial = "revoked"
	// DenyUnavailable: the authority could not be asked (the Kubernetes
	// API server or Consul unreachable), or the control plane has no
	// catalog yet (Unavailable: the client retries).
	DenyUnavailable AuthDenial = "unavailable"
)

// AuthDenials lists every AuthDenial.
var AuthDenials = []AuthDenial{DenyNoCredential, DenyInvalidToken, DenyWrongNode, DenyUnregisteredNode,
	DenyNodeChanged, DenyRevoked, DenyUnavailable}
