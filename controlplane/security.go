package controlplane

import (
	"cmp"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"time"

	"github.com/hashicorp/consul/api"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/keepalive"

	"github.com/meshlet/meshlet/controlplane/kube"
	"github.com/meshlet/meshlet/controlplane/servingcert"
	"github.com/meshlet/meshlet/controlplane/xdsauth"
	"github.com/meshlet/meshlet/xds"
)

// MaxADSConnectionAge is how long an authenticated ADS connection lives
// (gRPC MaxConnectionAge, ±10 % jitter; istiod's is 30 minutes too): the
// sidecar then reconnects, resuming from its versions, and is
// authenticated again, so a revoked token stops getting updates within it.
const MaxADSConnectionAge = 30 * time.Minute

// xdsSecurity is how ADS is served: its TLS certificate and the Guard
// that authenticates and authorizes every stream.
type xdsSecurity struct {
	serverOptions []grpc.ServerOption
	guard         *xdsauth.Guard // nil with XDSInsecure
	denials       func() []xdsauth.Denial
	// kubeCerts are the Kubernetes serving certificates (webhook and
	// ADS), made here so both serve with them.
	kubeCerts *kube.ServingCerts
	// caFile is the self-issued CA bundle sidecars verify with ("" for
	// other sources).
	caFile   string
	describe string
	// run renews the self-issued certificate; nil when nothing to do.
	run func(ctx context.Context)
}

// newXDSSecurity sets up ADS's TLS certificate (files, the Kubernetes
// self-managed one, or a self-issued one in XDSTLSDir) and authentication
// (Consul ACL tokens, and with Kube ServiceAccount tokens through
// TokenReviews), or plaintext with XDSInsecure. cc is the Consul client's
// configuration. Errors: certificates that cannot be read or made.
func newXDSSecurity(ctx context.Context, cfg Config, cc *api.Config, mayActAs func(ns, sa, svc string) bool) (*xdsSecurity, error) {
	log := cfg.Logger
	if cfg.XDSInsecure {
		log.Warn("controlplane: -xds-insecure: ADS is served in plaintext WITHOUT authentication: any process that reaches "+
			cfg.XDSAddress+" can take any service's configuration and private key (development only)", "xds", cfg.XDSAddress)
		return &xdsSecurity{describe: "off (-xds-insecure: plaintext, unauthenticated)"}, nil
	}
	sec := &xdsSecurity{}
	var getCert func(*tls.ClientHelloInfo) (*tls.Certificate, error)
	switch {
	case cfg.XDSCertFile != "" || cfg.XDSKeyFile != "":
		if cfg.XDSCertFile == "" || cfg.XDSKeyFile == "" {
			return nil, errors.New("controlplane: -xds-cert-file and -xds-key-file go together")
		}
		f, err := servingcert.NewFiles(cfg.XDSCertFile, cfg.XDSKeyFile)
		if err != nil {
			return nil, fmt.Errorf("controlplane: xDS certificate: %w", err)
		}
		getCert, sec.describe = f.GetCertificate, "certificate "+cfg.XDSCertFile
	case cfg.Kube != nil:
		kc := *cfg.Kube
		kc.Logger = log
		certs, err := kube.NewServingCerts(ctx, kc)
		if err != nil {
			return nil, err
		}
		getCert, sec.kubeCerts, sec.describe = certs.GetCertificate, certs, certs.Source
	default:
		dir, err := filepath.Abs(cmp.Or(cfg.XDSTLSDir, DefaultXDSTLSDir))
		if err != nil {
			return nil, fmt.Errorf("controlplane: -xds-tls-dir: %w", err)
		}
		d, err := servingcert.OpenDir(servingcert.DirConfig{Dir: dir, Names: servingcert.LocalNames(cfg.XDSAddress, cfg.XDSCertNames...), Logger: log})
		if err != nil {
			return nil, err
		}
		getCert, sec.run, sec.caFile = d.GetCertificate, d.Run, d.CAFile()
		sec.describe = "self-issued; sidecars verify it with -xds-ca-file " + sec.caFile
	}
	creds := credentials.NewTLS(&tls.Config{GetCertificate: getCert, MinVersion: tls.VersionTLS12})

	var guard *xdsauth.Guard
	observe := func(k xdsauth.Kind) func(string) {
		return func(result string) { guard.ObserveLookup(k)(result) }
	}
	cacheOpts := func(k xdsauth.Kind) xdsauth.CacheOptions {
		o := cfg.AuthCache
		o.Observe = observe(k)
		return o
	}
	consulAuth, err := xdsauth.NewConsulAuthenticator(*cc)
	if err != nil {
		return nil, err
	}
	tokens := xdsauth.ByTokenShape{Other: xdsauth.Cached(consulAuth, cacheOpts(xdsauth.KindConsul))}
	authorities := "Consul ACL tokens"
	switch {
	case cfg.ConsulAuthMethod != "":
		tokens.JWT = xdsauth.Cached(&xdsauth.ConsulLogin{Consul: consulAuth, AuthMethod: cfg.ConsulAuthMethod}, cacheOpts(xdsauth.KindConsul))
		authorities += ", JWTs through Consul auth method " + cfg.ConsulAuthMethod
	case cfg.Kube != nil:
		tokens.JWT = xdsauth.Cached(&xdsauth.KubeAuthenticator{Client: cfg.Kube.Client}, cacheOpts(xdsauth.KindKubernetes))
		authorities += ", Kubernetes ServiceAccount tokens (TokenReview, audience " + xds.TokenAudience + ")"
	}
	gc := xdsauth.GuardConfig{Authenticator: tokens, Consul: consulAuth, ServiceAccountMayActAs: mayActAs, Logger: log}
	if cfg.Kube != nil {
		gc.KubernetesService = cfg.Kube.Injector.Names.Kubernetes
	}
	guard = xdsauth.NewGuard(gc)
	sec.guard, sec.denials = guard, guard.Denials
	sec.serverOptions = append([]grpc.ServerOption{grpc.Creds(creds),
		grpc.KeepaliveParams(keepalive.ServerParameters{MaxConnectionAge: MaxADSConnectionAge, MaxConnectionAgeGrace: time.Minute})},
		guard.ServerOptions()...)
	sec.describe += "; streams authenticated with " + authorities
	go warnACLsDisabled(ctx, cc, cfg)
	return sec, nil
}

// warnACLsDisabled logs once when the Consul agent has ACLs off: no
// sidecar can then authenticate with a Consul token.
func warnACLsDisabled(ctx context.Context, cc *api.Config, cfg Config) {
	client, err := api.NewClient(cc)
	if err != nil {
		return
	}
	_, _, err = client.ACL().TokenReadSelf((&api.QueryOptions{}).WithContext(ctx))
	if err != nil && strings.Contains(err.Error(), "ACL support disabled") {
		msg := "controlplane: Consul has ACLs disabled, so no sidecar can authenticate with a Consul token: enable ACLs (default deny) and give each sidecar a token with its service's identity"
		if cfg.Kube != nil {
			cfg.Logger.Warn(msg + " (pods authenticate with their ServiceAccount tokens)")
			return
		}
		cfg.Logger.Error(msg)
	}
}
