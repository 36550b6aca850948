// Package xdsauth authenticates and authorizes the control plane's ADS
// streams. Every stream carries a bearer token (xds.AuthorizationMetadataKey);
// an Authenticator turns it into an Identity vouched for by the platform —
// a Kubernetes projected ServiceAccount token checked with a TokenReview of
// audience xds.TokenAudience (KubeAuthenticator), or a Consul ACL token
// resolved through Consul's ACL API (ConsulAuthenticator) — and the Guard,
// a gRPC stream interceptor, lets a stream name only the nodes that
// identity may act as: the proxies of its own pod, of its own service.
// Nothing reaches the xDS server before that: no node ID, annotation or
// service name is taken on the caller's word. Istio and Linkerd bind a
// sidecar to its pod's ServiceAccount the same way; consul-dataplane's
// xDS stream carries an ACL token Consul checks for service:write.
package xdsauth

import (
	"context"
	"errors"
	"fmt"
	"time"
)

// Kind is the authority that vouched for an Identity.
type Kind string

// Kinds of identities.
const (
	// KindKubernetes: a ServiceAccount token reviewed by the Kubernetes
	// API server (TokenReview, authentication.k8s.io/v1).
	KindKubernetes Kind = "kubernetes"
	// KindConsul: a Consul ACL token (GET /v1/acl/token/self).
	KindConsul Kind = "consul"
)

// Identity is who an ADS stream authenticated as. It is immutable once
// made.
type Identity struct {
	Kind Kind
	// Kubernetes: the ServiceAccount (system:serviceaccount:<Namespace>:
	// <ServiceAccount>) and, for a token bound to a pod (projected tokens
	// are), the pod's name and UID from the token's claims
	// (authentication.kubernetes.io/pod-name, pod-uid).
	Namespace, ServiceAccount string
	PodName, PodUID           string
	// Consul: the token's accessor ID (never its secret) and description.
	AccessorID, Description string
	// Expires is when the token stops being valid (its exp claim, or the
	// Consul token's ExpirationTime); zero when it does not expire.
	Expires time.Time

	// secret is the Consul token itself, kept to ask Consul what it may
	// do (service:write); it never leaves the package or appears in
	// String.
	secret string
}

// String is the identity's display form, used in logs, `controlplane
// status` and error messages: "kubernetes:<ns>/<serviceaccount> pod
// <name>" or "consul-token:<accessor ID>".
func (id *Identity) String() string {
	if id == nil {
		return "unauthenticated"
	}
	switch id.Kind {
	case KindKubernetes:
		s := fmt.Sprintf("kubernetes:%s/%s", id.Namespace, id.ServiceAccount)
		if id.PodName != "" {
			s += " pod " + id.PodName
		}
		return s
	case KindConsul:
		return "consul-token:" + id.AccessorID
	}
	return string(id.Kind)
}

// Errors of an Authenticator, wrapped with the authority's own words.
var (
	// ErrInvalidToken: the authority refused the token (expired, wrong
	// audience, revoked, of a deleted pod, unknown).
	ErrInvalidToken = errors.New("xdsauth: invalid token")
	// ErrUnavailable: the authority could not be asked; the client should
	// retry.
	ErrUnavailable = errors.New("xdsauth: authority unavailable")
)

// Authenticator turns a bearer token into the Identity its authority
// vouches for. Errors wrap ErrInvalidToken or ErrUnavailable.
type Authenticator interface {
	Authenticate(ctx context.Context, token string) (*Identity, error)
}

type identityKey struct{}

// WithIdentity returns ctx carrying id (the Guard does this for every
// stream it admits).
func WithIdentity(ctx context.Context, id *Identity) context.Context {
	return context.WithValue(ctx, identityKey{}, id)
}

// IdentityFrom returns the Identity of the stream whose context is ctx, or
// nil when the stream was not authenticated (-xds-insecure).
func IdentityFrom(ctx context.Context) *Identity {
	id, _ := ctx.Value(identityKey{}).(*Identity)
	return id
}

// StreamIdentity is IdentityFrom's display form, "" when unauthenticated:
// the control plane's server.Config.StreamIdentity.
func StreamIdentity(ctx context.Context) string {
	if id := IdentityFrom(ctx); id != nil {
		return id.String()
	}
	return ""
}
