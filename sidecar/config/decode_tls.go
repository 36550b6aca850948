package config

import (
	"crypto/tls"
	"errors"
	"fmt"

	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	matcher "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
)

func tlsVersion(v tlsv3.TlsParameters_TlsProtocol, def uint16) (uint16, error) {
	switch v {
	case tlsv3.TlsParameters_TLS_AUTO:
		return def, nil
	case tlsv3.TlsParameters_TLSv1_2:
		return tls.VersionTLS12, nil
	case tlsv3.TlsParameters_TLSv1_3:
		return tls.VersionTLS13, nil
	}
	return 0, fmt.Errorf("TLS version %s is not supported (1.2 or 1.3)", v)
}

// decodeCommonTLS reads the SDS secret names, TLS versions, ALPN and URI SAN
// matchers of a CommonTlsContext.
func decodeCommonTLS(c *tlsv3.CommonTlsContext) (cert, roots string, minV, maxV uint16, alpn, sans []string, err error) {
	if len(c.GetTlsCertificates()) > 0 {
		return "", "", 0, 0, nil, nil, errors.New("common_tls_context.tls_certificates: inline certificates are not supported; use SDS")
	}
	sds := c.GetTlsCertificateSdsSecretConfigs()
	if len(sds) != 1 || !isADS(sds[0].GetSdsConfig()) {
		return "", "", 0, 0, nil, nil, errors.New("common_tls_context.tls_certificate_sds_secret_configs: exactly one, over ADS")
	}
	cert = sds[0].GetName()
	cvc := c.GetCombinedValidationContext()
	if cvc == nil || !isADS(cvc.GetValidationContextSdsSecretConfig().GetSdsConfig()) {
		return "", "", 0, 0, nil, nil, errors.New("common_tls_context.combined_validation_context: required, with its SDS secret over ADS")
	}
	roots = cvc.GetValidationContextSdsSecretConfig().GetName()
	for i, m := range cvc.GetDefaultValidationContext().GetMatchTypedSubjectAltNames() {
		e, ok := m.GetMatcher().GetMatchPattern().(*matcher.StringMatcher_Exact)
		if m.GetSanType() != tlsv3.SubjectAltNameMatcher_URI || !ok {
			return "", "", 0, 0, nil, nil, fmt.Errorf("match_typed_subject_alt_names[%d]: only exact URI matches are supported", i)
		}
		sans = append(sans, e.Exact)
	}
	if minV, err = tlsVersion(c.GetTlsParams().GetTlsMinimumProtocolVersion(), tls.VersionTLS12); err != nil {
		return
	}
	if maxV, err = tlsVersion(c.GetTlsParams().GetTlsMaximumProtocolVersion(), tls.VersionTLS13); err != nil {
		return
	}
	if minV > maxV {
		err = errors.New("tls_params: minimum above maximum")
	}
	return cert, roots, minV, maxV, c.GetAlpnProtocols(), sans, err
}

func decodeDownstreamTLS(d *tlsv3.DownstreamTlsContext) (*DownstreamTLS, error) {
	if err := d.ValidateAll(); err != nil {
		return nil, err
	}
	cert, roots, minV, maxV, alpn, sans, err := decodeCommonTLS(d.GetCommonTlsContext())
	if err != nil {
		return nil, err
	}
	return &DownstreamTLS{CertSecret: cert, RootsSecret: roots, RequireClientCert: d.GetRequireClientCertificate().GetValue(),
		MinVersion: minV, MaxVersion: maxV, ALPN: alpn, SANs: sans}, nil
}

func decodeUpstreamTLS(u *tlsv3.UpstreamTlsContext) (*UpstreamTLS, error) {
	if err := u.ValidateAll(); err != nil {
		return nil, err
	}
	cert, roots, minV, maxV, alpn, sans, err := decodeCommonTLS(u.GetCommonTlsContext())
	if err != nil {
		return nil, err
	}
	if len(sans) == 0 {
		return nil, errors.New("common_tls_context.combined_validation_context.default_validation_context.match_typed_subject_alt_names: required: the upstream's SPIFFE ID")
	}
	return &UpstreamTLS{CertSecret: cert, RootsSecret: roots, SNI: u.GetSni(), MinVersion: minV, MaxVersion: maxV, ALPN: alpn, SANs: sans}, nil
}
