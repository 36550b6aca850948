package model

import "time"

// CA is the Connect CA as Consul reports it (/v1/agent/connect/ca/roots).
type CA struct {
	// TrustDomain is the SPIFFE trust domain, e.g.
	// "11111111-2222-3333-4444-555555555555.consul".
	TrustDomain string
	// Roots are every trusted root, the active one first. During a CA
	// rotation there are two.
	Roots []Root
}

// Root is one CA root certificate.
type Root struct {
	ID      string
	CertPEM string
	Active  bool
}

// Leaf is a service's leaf certificate from the Connect CA
// (/v1/agent/connect/ca/leaf/<service>).
type Leaf struct {
	Service string
	// CertPEM is the certificate chain (leaf first, then intermediates).
	CertPEM string
	// KeyPEM is the private key. It must never be logged.
	KeyPEM string
	// SPIFFEID is the leaf's identity, e.g.
	// spiffe://<trust-domain>/ns/default/dc/dc1/svc/web.
	SPIFFEID                string
	ValidAfter, ValidBefore time.Time
	Serial                  string
}

// Intentions are the authorization rules of one destination service, from
// a Consul service-intentions config entry and AuthorizationPolicy files.
type Intentions struct {
	Destination string
	Sources     []IntentionSource
}

// IntentionSource is the rule for one source: an L4 Action, or L7
// Permissions evaluated in order.
type IntentionSource struct {
	// Name is a service name or "*".
	Name string
	// Action is "allow" or "deny" for an L4 rule, "" for an L7 one.
	Action      string
	Permissions []IntentionPermission
	// Origin names where the rule came from, for NACK and denial reports:
	// "consul intention web => api" or "policies/authz.yaml:12".
	Origin string
}

// IntentionPermission is one L7 permission: Action applies to requests
// HTTP matches.
type IntentionPermission struct {
	Action string
	HTTP   HTTPMatch
}

// HTTPMatch matches requests: path (exact, prefix or regex), methods (any
// of), and headers (all of).
type HTTPMatch struct {
	PathExact, PathPrefix, PathRegex string
	Methods                          []string
	Headers                          []HeaderMatch
}

// HeaderMatch matches one header by exactly one of Exact, Prefix, Suffix,
// Regex or Present, negated by Invert.
type HeaderMatch struct {
	Name                         string
	Exact, Prefix, Suffix, Regex string
	Present, Invert              bool
}
