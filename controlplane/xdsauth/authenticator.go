package xdsauth

import (
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"

	"golang.org/x/sync/singleflight"
	"k8s.io/apimachinery/pkg/util/cache"

	"github.com/meshlet/meshlet/xds"
)

// ByTokenShape sends a JWT (three base64url parts joined by dots, as
// Kubernetes ServiceAccount tokens are) to JWT and any other token (a
// Consul ACL token's UUID secret) to Other. A nil one refuses its tokens
// with ErrInvalidToken naming what is not configured.
type ByTokenShape struct {
	JWT, Other Authenticator
}

var _ Authenticator = ByTokenShape{}

// Authenticate implements Authenticator.
func (b ByTokenShape) Authenticate(ctx context.Context, token string) (*Identity, error) {
	if IsJWT(token) {
		if b.JWT == nil {
			return nil, fmt.Errorf("%w: a JWT was presented, but this control plane checks no JWTs (Kubernetes ServiceAccount tokens need `controlplane serve -kube`)", ErrInvalidToken)
		}
		return b.JWT.Authenticate(ctx, token)
	}
	if b.Other == nil {
		return nil, fmt.Errorf("%w: a token that is not a JWT was presented, but this control plane checks no Consul ACL tokens", ErrInvalidToken)
	}
	return b.Other.Authenticate(ctx, token)
}

// IsJWT reports whether token has a JWT's shape: three non-empty
// base64url parts joined by dots (RFC 7519 §7.2, compact serialization).
// Nothing is verified.
func IsJWT(token string) bool {
	parts := strings.Split(token, ".")
	if len(parts) != 3 {
		return false
	}
	for _, p := range parts {
		if p == "" || strings.ContainsFunc(p, func(r rune) bool {
			return !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-' || r == '_')
		}) {
			return false
		}
	}
	return true
}

// jwtExpiry returns the exp claim of a JWT already verified by its
// authority (RFC 7519 §4.1.4), zero when it has none or cannot be read.
func jwtExpiry(token string) time.Time {
	parts := strings.Split(token, ".")
	if len(parts) != 3 {
		return time.Time{}
	}
	b, err := base64.RawURLEncoding.DecodeString(parts[1])
	if err != nil {
		return time.Time{}
	}
	var claims struct {
		Exp json.Number `json:"exp"`
	}
	if json.Unmarshal(b, &claims) != nil {
		return time.Time{}
	}
	n, err := claims.Exp.Int64()
	if err != nil || n <= 0 {
		return time.Time{}
	}
	return time.Unix(n, 0)
}

// Results of a token lookup, the result label of
// meshlet_controlplane_xds_auth_lookups_total (CacheOptions.Observe).
const (
	// LookupOK: the authority vouched for the token.
	LookupOK = "ok"
	// LookupInvalid: the authority refused it.
	LookupInvalid = "invalid"
	// LookupUnavailable: the authority could not be asked.
	LookupUnavailable = string(xds.DenyUnavailable)
	// LookupCached: answered from the cache, the authority not asked.
	LookupCached = "cached"
)

// Defaults of CacheOptions.
const (
	// DefaultCacheEntries bounds the cached reviews (about 1 KiB each).
	DefaultCacheEntries = 10000
	// DefaultCacheTTL is the longest a positive review is kept (shorter
	// when the token expires sooner): a Consul token deleted, or a
	// ServiceAccount removed, stops working within this long.
	DefaultCacheTTL = 5 * time.Minute
	// DefaultNegativeTTL is how long a refusal is kept, so a client
	// retrying a bad token costs its authority one lookup per period.
	DefaultNegativeTTL = 10 * time.Second
)

// CacheOptions configure Cached.
type CacheOptions struct {
	// MaxEntries bounds the cache (least recently used go first);
	// DefaultCacheEntries when 0.
	MaxEntries int
	// TTL bounds how long a positive review is kept; DefaultCacheTTL when
	// 0. A review is never kept past its token's expiry.
	TTL time.Duration
	// NegativeTTL is how long a refusal (ErrInvalidToken) is kept;
	// DefaultNegativeTTL when 0. ErrUnavailable is never kept.
	NegativeTTL time.Duration
	// Now defaults to time.Now.
	Now func() time.Time
	// Observe, if set, is told of every lookup the wrapped authenticator
	// made (LookupOK, LookupInvalid, LookupUnavailable) and of every
	// answer from the cache (LookupCached).
	Observe func(result string)
}

// Cached wraps next with a bounded cache of its answers keyed by the
// token's SHA-256, and lets concurrent lookups of one token share one
// call, so a reconnect storm costs next at most one lookup per token.
func Cached(next Authenticator, o CacheOptions) Authenticator {
	if o.MaxEntries <= 0 {
		o.MaxEntries = DefaultCacheEntries
	}
	if o.TTL <= 0 {
		o.TTL = DefaultCacheTTL
	}
	if o.NegativeTTL <= 0 {
		o.NegativeTTL = DefaultNegativeTTL
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.Observe == nil {
		o.Observe = func(string) {}
	}
	return &cached{next: next, o: o, lru: cache.NewLRUExpireCache(o.MaxEntries)}
}

type cached struct {
	next Authenticator
	o    CacheOptions
	lru  *cache.LRUExpireCache // token hash → cacheEntry; safe for concurrent use
	sf   singleflight.Group
}

type cacheEntry struct {
	id  *Identity
	err error
}

func (c *cached) Authenticate(ctx context.Context, token string) (*Identity, error) {
	sum := sha256.Sum256([]byte(token))
	key := string(sum[:])
	if v, ok := c.lru.Get(key); ok {
		e := v.(cacheEntry)
		if e.id == nil || e.id.Expires.IsZero() || c.o.Now().Before(e.id.Expires) {
			c.o.Observe(LookupCached)
			return e.id, e.err
		}
	}
	// The lookup runs detached from any one caller's context, so a caller
	// that leaves does not fail the others sharing it; it is bounded by
	// its own timeout.
	v, _, _ := c.sf.Do(key, func() (any, error) {
		lctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
		defer cancel()
		id, err := c.next.Authenticate(lctx, token)
		e := cacheEntry{id: id, err: err}
		switch {
		case err == nil:
			c.o.Observe(LookupOK)
			ttl := c.o.TTL
			if !id.Expires.IsZero() {
				ttl = min(ttl, id.Expires.Sub(c.o.Now()))
			}
			if ttl > 0 {
				c.lru.Add(key, e, ttl)
			}
		case errors.Is(err, ErrInvalidToken):
			c.o.Observe(LookupInvalid)
			c.lru.Add(key, e, c.o.NegativeTTL)
		default:
			c.o.Observe(LookupUnavailable)
		}
		return e, nil
	})
	e := v.(cacheEntry)
	return e.id, e.err
}
