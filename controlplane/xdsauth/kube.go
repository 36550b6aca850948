package xdsauth

import (
	"cmp"
	"context"
	"fmt"
	"slices"
	"strings"

	authnv1 "k8s.io/api/authentication/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/meshlet/meshlet/xds"
)

// Extra keys of a TokenReview's user info for a token bound to a pod
// (kube-apiserver's ServiceAccount token authenticator).
const (
	extraPodName = "authentication.kubernetes.io/pod-name"
	extraPodUID  = "authentication.kubernetes.io/pod-uid"
)

// KubeAuthenticator checks Kubernetes ServiceAccount tokens with a
// TokenReview (authentication.k8s.io/v1) asking for Audience: the API
// server verifies the signature, expiry, audience and that the objects
// the token is bound to (its pod) still exist with the same UID. The
// control plane's ServiceAccount needs `create` on tokenreviews
// (ClusterRole system:auth-delegator has it).
type KubeAuthenticator struct {
	// Client talks to the API server. Required.
	Client kubernetes.Interface
	// Audience is the audience the token must carry; xds.TokenAudience
	// when empty.
	Audience string
}

var _ Authenticator = (*KubeAuthenticator)(nil)

// Authenticate implements Authenticator. A refusal wraps ErrInvalidToken
// with the API server's reason; an API server that cannot be reached,
// ErrUnavailable.
func (k *KubeAuthenticator) Authenticate(ctx context.Context, token string) (*Identity, error) {
	aud := cmp.Or(k.Audience, xds.TokenAudience)
	tr, err := k.Client.AuthenticationV1().TokenReviews().Create(ctx, &authnv1.TokenReview{
		Spec: authnv1.TokenReviewSpec{Token: token, Audiences: []string{aud}},
	}, metav1.CreateOptions{})
	if err != nil {
		return nil, fmt.Errorf("%w: kubernetes TokenReview: %v", ErrUnavailable, err)
	}
	st := tr.Status
	if !st.Authenticated {
		return nil, fmt.Errorf("%w: kubernetes TokenReview: %s", ErrInvalidToken, cmp.Or(st.Error, "not authenticated"))
	}
	if !slices.Contains(st.Audiences, aud) {
		return nil, fmt.Errorf("%w: kubernetes TokenReview: the token's audiences %q do not include %q", ErrInvalidToken, st.Audiences, aud)
	}
	ns, sa, ok := parseServiceAccount(st.User.Username)
	if !ok {
		return nil, fmt.Errorf("%w: kubernetes TokenReview: %q is not a ServiceAccount", ErrInvalidToken, st.User.Username)
	}
	id := &Identity{Kind: KindKubernetes, Namespace: ns, ServiceAccount: sa, Expires: jwtExpiry(token)}
	if v := st.User.Extra[extraPodName]; len(v) == 1 {
		id.PodName = v[0]
	}
	if v := st.User.Extra[extraPodUID]; len(v) == 1 {
		id.PodUID = v[0]
	}
	return id, nil
}

// parseServiceAccount splits "system:serviceaccount:<ns>:<name>".
func parseServiceAccount(user string) (ns, name string, ok bool) {
	rest, ok := strings.CutPrefix(user, "system:serviceaccount:")
	if !ok {
		return "", "", false
	}
	ns, name, ok = strings.Cut(rest, ":")
	return ns, name, ok && ns != "" && name != "" && !strings.Contains(name, ":")
}
