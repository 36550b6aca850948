package e2e

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"os"
	"path/filepath"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/meshlet/meshlet/controlplane"
	"github.com/meshlet/meshlet/xds"
)

// jwtAuthMethod is the Consul auth method of type jwt that the mesh's
// control plane logs JWTs in with (controlplane.Config.ConsulAuthMethod),
// trusting the ES256 key it signs with; its binding rule gives a JWT's
// "service" claim as the token's service identity.
const jwtAuthMethod = "meshlet-jwt"

// jwtIssuer signs JWTs the mesh's Consul accepts.
type jwtIssuer struct {
	key *ecdsa.PrivateKey
	dir string
}

// trustJWTs sets up jwtAuthMethod in the mesh's Consul and has the control
// plane started next use it; it returns the issuer of the JWTs it accepts.
func (m *mesh) trustJWTs() *jwtIssuer {
	m.t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		m.t.Fatal(err)
	}
	der, err := x509.MarshalPKIXPublicKey(&key.PublicKey)
	if err != nil {
		m.t.Fatal(err)
	}
	pub := string(pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}))
	acl := m.consul.Client.ACL()
	if _, _, err := acl.AuthMethodCreate(&api.ACLAuthMethod{Name: jwtAuthMethod, Type: "jwt", MaxTokenTTL: 10 * time.Minute,
		Config: map[string]any{
			"JWTValidationPubKeys": []string{pub},
			"JWTSupportedAlgs":     []string{"ES256"},
			"BoundAudiences":       []string{xds.TokenAudience},
			"ClaimMappings":        map[string]string{"service": "service"},
		}}, nil); err != nil {
		m.t.Fatal(err)
	}
	if _, _, err := acl.BindingRuleCreate(&api.ACLBindingRule{AuthMethod: jwtAuthMethod, BindType: api.BindingRuleBindTypeService,
		BindName: "${value.service}"}, nil); err != nil {
		m.t.Fatal(err)
	}
	prev := m.cpConfig
	m.cpConfig = func(c *controlplane.Config) {
		if prev != nil {
			prev(c)
		}
		c.ConsulAuthMethod = jwtAuthMethod
	}
	return &jwtIssuer{key: key, dir: m.t.TempDir()}
}

// tokenFile writes a JWT for service (audience meshlet, an hour's life)
// into a file and returns its path.
func (j *jwtIssuer) tokenFile(m *mesh, service string) string {
	m.t.Helper()
	b64 := func(v any) string {
		b, _ := json.Marshal(v)
		return base64.RawURLEncoding.EncodeToString(b)
	}
	now := time.Now()
	signing := b64(map[string]string{"alg": "ES256", "typ": "JWT"}) + "." +
		b64(map[string]any{"sub": service, "aud": xds.TokenAudience, "service": service, "iat": now.Unix(), "nbf": now.Add(-time.Minute).Unix(),
			"exp": now.Add(time.Hour).Unix()})
	sum := sha256.Sum256([]byte(signing))
	r, s, err := ecdsa.Sign(rand.Reader, j.key, sum[:])
	if err != nil {
		m.t.Fatal(err)
	}
	sig := make([]byte, 64) // JWS ES256: R and S, 32 bytes each (RFC 7518 §3.4)
	r.FillBytes(sig[:32])
	s.FillBytes(sig[32:])
	path := filepath.Join(j.dir, service+".jwt")
	if err := os.WriteFile(path, []byte(signing+"."+base64.RawURLEncoding.EncodeToString(sig)), 0o600); err != nil {
		m.t.Fatal(err)
	}
	return path
}
