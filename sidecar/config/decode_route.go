package config

import (
	"errors"
	"fmt"
	"net/http"
	"strings"
	"time"

	route "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	previoushosts "github.com/envoyproxy/go-control-plane/envoy/extensions/retry/host/previous_hosts/v3"
	matcher "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/meshlet/meshlet/xds"
)

// DecodeRouteConfig decodes and validates an Any holding a
// RouteConfiguration.
func DecodeRouteConfig(a *anypb.Any) (*RouteConfig, error) {
	var rc route.RouteConfiguration
	if err := unpack(a, &rc, xds.KindRouteConfiguration); err != nil {
		return nil, err
	}
	return decodeRouteConfig(&rc)
}

func decodeRouteConfig(rc *route.RouteConfiguration) (*RouteConfig, error) {
	kind, name := xds.KindRouteConfiguration, rc.GetName()
	if err := rc.ValidateAll(); err != nil {
		return nil, fieldErr(kind, name, "", "%v", err)
	}
	if rc.GetVhds() != nil {
		return nil, fieldErr(kind, name, "vhds", "not supported")
	}
	out := &RouteConfig{Name: name}
	domains := map[string]string{}
	for i, vh := range rc.GetVirtualHosts() {
		vf := fmt.Sprintf("virtual_hosts[%d]", i)
		v := &VirtualHost{Name: vh.GetName()}
		for j, d := range vh.GetDomains() {
			d = strings.ToLower(d)
			if prev, ok := domains[d]; ok {
				return nil, fieldErr(kind, name, fmt.Sprintf("%s.domains[%d]", vf, j), "domain %q is also in virtual host %q", d, prev)
			}
			if strings.Count(d, "*") > 1 || (strings.Contains(d, "*") && d != "*" && !strings.HasPrefix(d, "*") && !strings.HasSuffix(d, "*")) {
				return nil, fieldErr(kind, name, fmt.Sprintf("%s.domains[%d]", vf, j), "wildcard only as a whole prefix or suffix: %q", d)
			}
			domains[d] = vh.GetName()
			v.Domains = append(v.Domains, d)
		}
		if vh.GetRequireTls() != route.VirtualHost_NONE {
			return nil, fieldErr(kind, name, vf+".require_tls", "not supported")
		}
		for j, r := range vh.GetRoutes() {
			rt, err := decodeRoute(r)
			if err != nil {
				return nil, fieldErrAt(kind, name, fmt.Sprintf("%s.routes[%d]", vf, j), err)
			}
			v.Routes = append(v.Routes, rt)
		}
		out.VirtualHosts = append(out.VirtualHosts, v)
	}
	return out, nil
}

func decodeRoute(r *route.Route) (*Route, error) {
	out := &Route{Name: r.GetName(), CaseSensitive: true, BodyBufferBytes: DefaultBodyBufferBytes}
	m := r.GetMatch()
	if cs := m.GetCaseSensitive(); cs != nil {
		out.CaseSensitive = cs.GetValue()
	}
	switch p := m.GetPathSpecifier().(type) {
	case *route.RouteMatch_Prefix:
		out.Match, out.Path = MatchPrefix, p.Prefix
	case *route.RouteMatch_Path:
		out.Match, out.Path = MatchPath, p.Path
	default:
		return nil, fmt.Errorf("match: only prefix and path matches are supported")
	}
	if len(m.GetQueryParameters()) > 0 || m.GetGrpc() != nil || m.GetRuntimeFraction() != nil ||
		m.GetTlsContext() != nil || len(m.GetDynamicMetadata()) > 0 || len(m.GetFilterState()) > 0 {
		return nil, fmt.Errorf("match: only the path and headers are supported (query parameters and others are not)")
	}
	for i, h := range m.GetHeaders() {
		hm, err := decodeHeaderMatch(h)
		if err != nil {
			return nil, &xds.FieldError{Field: fmt.Sprintf("match.headers[%d]", i), Err: err}
		}
		out.Headers = append(out.Headers, hm)
	}
	if !out.CaseSensitive {
		out.Path = strings.ToLower(out.Path)
	}
	ra, ok := r.GetAction().(*route.Route_Route)
	if !ok {
		return nil, fmt.Errorf("action: only route actions are supported (not redirect, direct_response or others)")
	}
	a := ra.Route
	c := a.GetCluster()
	if c == "" {
		return nil, fmt.Errorf("route.cluster: required (cluster_header and weighted_clusters are not supported)")
	}
	out.Cluster = c
	out.Timeout = DefaultRouteTimeout
	if t := a.GetTimeout(); t != nil {
		out.Timeout = t.AsDuration()
	}
	out.IdleTimeout = a.GetIdleTimeout().AsDuration()
	out.MaxStreamDuration = a.GetMaxStreamDuration().GetMaxStreamDuration().AsDuration()
	for name, d := range map[string]time.Duration{"route.timeout": out.Timeout, "route.idle_timeout": out.IdleTimeout, "route.max_stream_duration": out.MaxStreamDuration} {
		if d < 0 {
			return nil, &xds.FieldError{Field: name, Err: errors.New("must not be negative")}
		}
	}
	for i, hp := range a.GetHashPolicy() {
		h := hp.GetHeader()
		if h == nil || i > 0 {
			return nil, fmt.Errorf("route.hash_policy: only one header hash policy is supported")
		}
		out.HashHeader = h.GetHeaderName()
	}
	//lint:ignore SA1019 Envoy still accepts it; we decode what control planes send
	if b := r.GetPerRequestBufferLimitBytes(); b != nil {
		out.BodyBufferBytes = int(b.GetValue())
	}
	if rp := a.GetRetryPolicy(); rp != nil {
		p, err := decodeRetryPolicy(rp)
		if err != nil {
			return nil, &xds.FieldError{Field: "route.retry_policy", Err: err}
		}
		var extras xds.RouteExtras
		if err := xds.DecodeExtras(r.GetMetadata(), &extras); err != nil {
			return nil, &xds.FieldError{Field: fmt.Sprintf("metadata.filter_metadata[%q]", xds.MetadataNamespace), Err: err}
		}
		switch extras.NonIdempotent {
		case "", "safe":
		case "retry":
			p.NonIdempotentRetry = true
		default:
			return nil, fmt.Errorf("metadata.filter_metadata[%q].nonIdempotent: %q is not safe or retry", xds.MetadataNamespace, extras.NonIdempotent)
		}
		out.Retry = p
	}
	for i, u := range a.GetUpgradeConfigs() {
		if u.GetConnectConfig() != nil {
			return nil, fmt.Errorf("route.upgrade_configs[%d].connect_config: CONNECT termination is not supported", i)
		}
		if out.Upgrades == nil {
			out.Upgrades = map[string]bool{}
		}
		out.Upgrades[strings.ToLower(u.GetUpgradeType())] = u.GetEnabled() == nil || u.GetEnabled().GetValue()
	}
	return out, nil
}

func decodeHeaderMatch(h *route.HeaderMatcher) (HeaderMatch, error) {
	out := HeaderMatch{Name: h.GetName(), Invert: h.GetInvertMatch()}
	if !strings.HasPrefix(out.Name, ":") {
		out.Name = http.CanonicalHeaderKey(out.Name)
	}
	switch spec := h.GetHeaderMatchSpecifier().(type) {
	case *route.HeaderMatcher_PresentMatch:
		out.Present = true
		if !spec.PresentMatch {
			out.Invert = !out.Invert
		}
	case *route.HeaderMatcher_ExactMatch:
		//lint:ignore SA1019 Envoy still accepts it; we decode what control planes send
		out.Exact = spec.ExactMatch
	case *route.HeaderMatcher_StringMatch:
		e, ok := spec.StringMatch.GetMatchPattern().(*matcher.StringMatcher_Exact)
		if !ok || spec.StringMatch.GetIgnoreCase() {
			return out, errors.New("only exact string matches are supported")
		}
		out.Exact = e.Exact
	default:
		return out, errors.New("only exact and present header matches are supported")
	}
	return out, nil
}

func decodeRetryPolicy(rp *route.RetryPolicy) (*RetryPolicy, error) {
	p := &RetryPolicy{NumRetries: 1, BackoffBase: 25 * time.Millisecond}
	for tok := range strings.SplitSeq(rp.GetRetryOn(), ",") {
		tok = strings.TrimSpace(tok)
		if tok == "" {
			continue
		}
		c, ok := RetryConditions[xds.RetryOn(tok)]
		if !ok {
			return nil, &xds.FieldError{Field: "retry_on", Err: fmt.Errorf("unsupported condition %q", tok)}
		}
		p.On |= c
	}
	if n := rp.GetNumRetries(); n != nil {
		p.NumRetries = int(n.GetValue())
	}
	p.PerTry = rp.GetPerTryTimeout().AsDuration()
	if b := rp.GetRetryBackOff(); b != nil {
		p.BackoffBase = b.GetBaseInterval().AsDuration()
		p.BackoffMax = b.GetMaxInterval().AsDuration()
	}
	if p.BackoffMax == 0 {
		p.BackoffMax = 10 * p.BackoffBase
	}
	for _, c := range rp.GetRetriableStatusCodes() {
		p.StatusCodes = append(p.StatusCodes, int(c))
	}
	for i, hp := range rp.GetRetryHostPredicate() {
		if hp.GetName() != xds.PreviousHostsPredicate && !hp.GetTypedConfig().MessageIs(&previoushosts.PreviousHostsPredicate{}) {
			return nil, fmt.Errorf("retry_host_predicate[%d]: unsupported %q (supported: %s)", i, hp.GetName(), xds.PreviousHostsPredicate)
		}
		p.OtherHost = true
	}
	if rp.GetRetryPriority() != nil || len(rp.GetRetryOptionsPredicates()) > 0 || len(rp.GetRetriableHeaders()) > 0 ||
		len(rp.GetRetriableRequestHeaders()) > 0 || rp.GetRateLimitedRetryBackOff() != nil || rp.GetPerTryIdleTimeout() != nil {
		return nil, errors.New("only retry_on, num_retries, per_try_timeout, retry_back_off, retriable_status_codes and the previous_hosts predicate are supported")
	}
	return p, nil
}
