package xdsauth

import (
	"bytes"
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"time"

	"github.com/hashicorp/consul/api"
	"github.com/hashicorp/go-cleanhttp"
)

// ConsulAuthenticator checks Consul ACL tokens, as consul-dataplane's
// static credentials are checked by Consul's own xDS server: the token
// must exist (GET /v1/acl/token/self, which any token may read of itself)
// and, to act as a proxy of service S, hold service:write on S (asked with
// POST /v1/internal/acl/authorize, the same check Consul's xDS server and
// its HTTP API apply; ServiceIdentities grant it). The answers are the
// agent's, so a token deleted in Consul stops working as soon as the
// cached review expires.
type ConsulAuthenticator struct {
	config api.Config
	client *api.Client
	http   *http.Client
	base   string // scheme://host:port
}

var _ Authenticator = (*ConsulAuthenticator)(nil)

// ConsulConnections bounds the connections the token reviews open to the
// agent (requests beyond wait for one): a reconnect storm of 1,000
// sidecars must not take the agent's per-client connection limit
// (limits.http_max_conns_per_client, 200 by default), which the control
// plane's blocking queries already use most of.
const ConsulConnections = 16

// NewConsulAuthenticator returns an authenticator asking the agent cfg
// points at (its Address, Scheme and TLSConfig; its Token is not used:
// every question is asked with the presented token), over a pool of its
// own of at most ConsulConnections connections. Errors: cfg cannot make a
// client.
func NewConsulAuthenticator(cfg api.Config) (*ConsulAuthenticator, error) {
	cfg.Token, cfg.TokenFile = "", ""
	// A transport of its own: cfg's may be the watcher's, whose blocking
	// queries must not wait behind reviews, nor reviews behind them.
	tr := cleanhttp.DefaultPooledTransport()
	if cfg.Transport != nil {
		tr = cfg.Transport.Clone()
	}
	tr.MaxConnsPerHost = ConsulConnections
	hc, err := api.NewHttpClient(tr, cfg.TLSConfig)
	if err != nil {
		return nil, fmt.Errorf("xdsauth: consul http client: %w", err)
	}
	cfg.Transport, cfg.HttpClient = tr, hc
	client, err := api.NewClient(&cfg)
	if err != nil {
		return nil, fmt.Errorf("xdsauth: consul client: %w", err)
	}
	addr, scheme := cfg.Address, cmp.Or(cfg.Scheme, "http")
	if s, rest, ok := strings.Cut(addr, "://"); ok {
		scheme, addr = s, rest
	}
	return &ConsulAuthenticator{config: cfg, client: client, http: hc, base: scheme + "://" + addr}, nil
}

// Authenticate implements Authenticator: the token's accessor ID,
// description and expiry. An unknown or expired token wraps
// ErrInvalidToken; an agent with ACLs disabled too, saying so (no token
// can be checked there: enable ACLs, or run both sides with
// -xds-insecure); an agent that cannot be reached, ErrUnavailable.
func (c *ConsulAuthenticator) Authenticate(ctx context.Context, token string) (*Identity, error) {
	tok, _, err := c.client.ACL().TokenReadSelf((&api.QueryOptions{Token: token}).WithContext(ctx))
	if err != nil {
		return nil, consulError("read token", err)
	}
	id := &Identity{Kind: KindConsul, AccessorID: tok.AccessorID, Description: tok.Description, secret: token}
	if tok.ExpirationTime != nil {
		id.Expires = *tok.ExpirationTime
	}
	return id, nil
}

// consulError classifies an error of the agent's ACL API.
func consulError(what string, err error) error {
	var se api.StatusError
	if errors.As(err, &se) {
		switch {
		case strings.Contains(se.Body, "ACL support disabled"):
			return fmt.Errorf("%w: consul: %s: the agent has ACLs disabled, so no token can be checked (enable ACLs, or run the control plane and its sidecars with -xds-insecure)", ErrInvalidToken, what)
		case se.Code == http.StatusForbidden || se.Code == http.StatusUnauthorized || se.Code == http.StatusNotFound || se.Code == http.StatusBadRequest:
			return fmt.Errorf("%w: consul: %s: %s", ErrInvalidToken, what, strings.TrimSpace(se.Body))
		}
	}
	return fmt.Errorf("%w: consul: %s: %v", ErrUnavailable, what, err)
}

// MayActAs reports whether the Consul token of id holds service:write on
// service. Errors wrap ErrUnavailable (the agent could not be asked) or
// ErrInvalidToken (the token went away).
func (c *ConsulAuthenticator) MayActAs(ctx context.Context, id *Identity, service string) (bool, error) {
	type authz struct {
		Resource string
		Segment  string
		Access   string
		Allow    bool `json:",omitempty"`
	}
	body, _ := json.Marshal([]authz{{Resource: "service", Segment: service, Access: "write"}})
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, c.base+"/v1/internal/acl/authorize", bytes.NewReader(body))
	if err != nil {
		return false, fmt.Errorf("xdsauth: consul authorize: %w", err)
	}
	req.Header.Set("X-Consul-Token", id.secret)
	req.Header.Set("Content-Type", "application/json")
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	resp, err := c.http.Do(req.WithContext(ctx))
	if err != nil {
		return false, fmt.Errorf("%w: consul: authorize: %v", ErrUnavailable, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	if resp.StatusCode != http.StatusOK {
		return false, consulError("authorize", api.StatusError{Code: resp.StatusCode, Body: string(b)})
	}
	var out []authz
	if err := json.Unmarshal(b, &out); err != nil || len(out) != 1 {
		return false, fmt.Errorf("%w: consul: authorize: unexpected answer %q", ErrUnavailable, b)
	}
	return out[0].Allow, nil
}

// ConsulLogin turns a JWT into a Consul ACL token by logging in with a
// Consul auth method (POST /v1/acl/login; a "jwt" method validating the
// issuer's keys, or a "kubernetes" one), as consul-dataplane's login
// credentials do: the method's binding rules decide which service
// identities the token gets, and that token's service:write decides what
// the stream may act as (ConsulAuthenticator.MayActAs). Give the method a
// MaxTokenTTL (e.g. 10m): every JWT the control plane has not seen logs in
// again, and the tokens made expire instead of accumulating.
type ConsulLogin struct {
	// Consul is the authenticator asking the same agent. Required.
	Consul *ConsulAuthenticator
	// AuthMethod names the Consul auth method. Required.
	AuthMethod string
}

var _ Authenticator = (*ConsulLogin)(nil)

// Authenticate implements Authenticator: the identity of the token the
// login made, expiring with the sooner of the JWT and the token. A JWT the
// method refuses wraps ErrInvalidToken with Consul's reason.
func (l *ConsulLogin) Authenticate(ctx context.Context, jwt string) (*Identity, error) {
	tok, _, err := l.Consul.client.ACL().Login(&api.ACLLoginParams{AuthMethod: l.AuthMethod, BearerToken: jwt,
		Meta: map[string]string{"meshlet": "xds"}}, (&api.WriteOptions{}).WithContext(ctx))
	if err != nil {
		return nil, consulError("login with auth method "+l.AuthMethod, err)
	}
	id := &Identity{Kind: KindConsul, AccessorID: tok.AccessorID, Description: "login with " + l.AuthMethod, secret: tok.SecretID,
		Expires: jwtExpiry(jwt)}
	if tok.ExpirationTime != nil && (id.Expires.IsZero() || tok.ExpirationTime.Before(id.Expires)) {
		id.Expires = *tok.ExpirationTime
	}
	return id, nil
}
