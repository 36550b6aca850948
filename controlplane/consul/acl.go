package consul

import (
	"errors"
	"fmt"
	"net/http"
	"regexp"
	"strings"

	"github.com/hashicorp/consul/api"
)

// ControlPlaneACLRules is the least a Consul ACL token must allow for the
// control plane to watch an agent whose ACLs default to deny (Consul
// 1.19's ACL rules, HCL): a policy with these rules, and a token with the
// policy, given to the control plane (-consul-token or CONSUL_HTTP_TOKEN).
// Each rule says which of the Watcher's queries needs it; they were found
// by running the Watcher with a token of these rules only against an agent
// with ACLs on (TestWatcherWithControlPlaneACLRules): without any one of
// them a query fails (403) or Consul filters its answer, and the Watcher
// logs which permission is missing.
//
// /v1/agent/connect/ca/roots (the Connect CA roots) needs no permission.
//
// Beware when checking rules by hand: Consul 1.19's agent keeps the leaf
// certificates it fetched (for the sidecars registered with it, or for an
// earlier caller) and answers /v1/agent/connect/ca/leaf/<service> from
// that cache without checking the caller's token, so a token without
// service:write gets a leaf (and its private key) the agent already holds.
// The control plane still needs service:write: the agent signs a leaf it
// does not hold yet only for a token that may write the service (services
// registered through the catalog, as on Kubernetes, or with other agents).
const ControlPlaneACLRules = `# meshlet control plane (controlplane/consul.ControlPlaneACLRules)
service_prefix "" {
  # read:  /v1/catalog/services (the service list) and
  #        /v1/health/service/<name> (every instance and sidecar proxy, with
  #        its health); Consul leaves out the services a token cannot read.
  # write: /v1/agent/connect/ca/leaf/<service>, the leaf certificate of
  #        every service with a proxy (Connect signs a service's certificate
  #        only for a token that may write that service).
  policy = "write"
  # /v1/config/service-intentions (the service-intentions config entries,
  # the only config entries the control plane reads): Consul leaves out the
  # entries of the destinations a token cannot read intentions of. (A
  # service rule of read or write implies it; written out as it is needed.)
  intentions = "read"
}
node_prefix "" {
  # /v1/health/service/<name>: Consul leaves out the instances on nodes a
  # token cannot read.
  policy = "read"
}
`

// KubeControlPlaneACLRules is ControlPlaneACLRules for a control plane that
// also runs the Kubernetes registrar (controlplane -kube, controlplane/kube):
// it registers each injected pod through /v1/catalog/register (its service
// instance and its sidecar proxy, each with a readiness check, on the
// synthetic node "<kubernetes node>-virtual", created by the first
// registration), deregisters them through /v1/catalog/deregister, and lists
// the synthetic nodes (/v1/catalog/nodes) and their services
// (/v1/catalog/node-services/<node>) to remove stale registrations. The
// service writes are already allowed by ControlPlaneACLRules' service
// policy; the node writes need node:write on every synthetic node, and
// Consul's node rules match names by prefix only, so on every node.
const KubeControlPlaneACLRules = `# meshlet control plane with -kube (controlplane/consul.KubeControlPlaneACLRules)
service_prefix "" {
  # read:  /v1/catalog/services and /v1/health/service/<name> (the watcher),
  #        /v1/catalog/node-services/<node> (the registrar's resync).
  # write: /v1/agent/connect/ca/leaf/<service> (leaf certificates), and the
  #        registrar's /v1/catalog/register and /v1/catalog/deregister of
  #        pods' service instances, sidecar proxies and their checks.
  policy = "write"
  # /v1/config/service-intentions (the watcher).
  intentions = "read"
}
node_prefix "" {
  # read:  /v1/health/service/<name> (the watcher), /v1/catalog/nodes and
  #        /v1/catalog/node-services/<node> (the registrar's resync).
  # write: /v1/catalog/register creating and updating the synthetic nodes
  #        "<kubernetes node>-virtual" the registrar puts pods on.
  policy = "write"
}
`

// ErrACLDenied is wrapped by the errors of requests Consul refused for the
// ACL token's lack of a permission (HTTP 403).
var ErrACLDenied = errors.New("consul: ACL permission denied")

// ACLError is a request Consul refused with HTTP 403 for its ACL token.
// Its Error names the missing permission and what needed it, e.g.
// "consul: ACL token lacks service:write on api (needed for the leaf
// certificate of api)".
type ACLError struct {
	// For is what the refused request was for, e.g. "the leaf certificate
	// of api".
	For string
	// Permission is the missing permission ("service:write"), Resource what
	// it was missing on ("api"); both empty when Consul's answer does not
	// name them (TokenNotFound then tells whether the token is unknown).
	Permission, Resource string
	// Anonymous is set when the request carried no token (Consul used the
	// anonymous token).
	Anonymous bool
	// TokenNotFound is set when Consul does not know the token ("ACL not
	// found": a wrong secret, or a deleted or expired token).
	TokenNotFound bool
	// Body is Consul's answer.
	Body string
}

func (e *ACLError) Error() string {
	var b strings.Builder
	switch {
	case e.TokenNotFound:
		b.WriteString("consul: ACL token not found (Consul does not know it: a wrong secret, or a deleted or expired token)")
	case e.Permission != "" && e.Anonymous:
		fmt.Fprintf(&b, "consul: no ACL token given, and the anonymous token lacks %s", e.Permission)
	case e.Permission != "":
		fmt.Fprintf(&b, "consul: ACL token lacks %s", e.Permission)
	default:
		fmt.Fprintf(&b, "consul: ACL permission denied (%s)", strings.TrimSpace(e.Body))
	}
	if e.Resource != "" {
		fmt.Fprintf(&b, " on %s", e.Resource)
	}
	if e.For != "" && !e.TokenNotFound {
		fmt.Fprintf(&b, " (needed for %s)", e.For)
	}
	return b.String()
}

// Unwrap makes errors.Is(err, ErrACLDenied) true.
func (e *ACLError) Unwrap() error { return ErrACLDenied }

// lacksPermission matches Consul's acl.PermissionDeniedError text:
// "Permission denied: token with AccessorID '…' lacks permission
// 'service:write' on \"api\"" (or "anonymous token lacks …").
var lacksPermission = regexp.MustCompile(`lacks permission '([^']+)'(?: on "([^"]*)")?`)

// ACLErrorOf returns err as an *ACLError when it is Consul's HTTP 403 (an
// api.StatusError), with what the request was for ("the leaf certificate
// of api"); nil otherwise.
func ACLErrorOf(err error, what string) error {
	if e := aclError(err, what); e != nil {
		return e
	}
	return nil
}

// aclError is ACLErrorOf's *ACLError.
func aclError(err error, what string) *ACLError {
	var se api.StatusError
	if !errors.As(err, &se) || se.Code != http.StatusForbidden {
		return nil
	}
	e := &ACLError{For: what, Body: se.Body, TokenNotFound: strings.Contains(se.Body, "ACL not found"),
		Anonymous: strings.Contains(se.Body, "anonymous token")}
	if m := lacksPermission.FindStringSubmatch(se.Body); m != nil {
		e.Permission, e.Resource = m[1], m[2]
	}
	return e
}
