package config

import (
	"fmt"
	"strings"
	"testing"
	"time"

	cluster "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listener "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	route "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	hcm "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/meshlet/meshlet/controlplane/model"
	"github.com/meshlet/meshlet/controlplane/policy"
	"github.com/meshlet/meshlet/controlplane/translate"
	"github.com/meshlet/meshlet/controlplane/xdsbuild"
	"github.com/meshlet/meshlet/internal/testca"
	"github.com/meshlet/meshlet/xds"
)

func TestDecodeValidResources(t *testing.T) {
	l, err := DecodeListener(xds.MustAny(xdsbuild.NewHTTPListener("upstream:api", "127.0.0.1", 9191, xdsbuild.HTTPListenerOptions{RouteConfigName: "api", Via: "p"})))
	if err != nil {
		t.Fatal(err)
	}
	if h := l.Chains[0].HTTP; l.Address != "127.0.0.1:9191" || h == nil || h.RouteConfigName != "api" || h.Via != "p" || h.Codec != CodecAuto {
		t.Errorf("listener = %+v / %+v", l, h)
	}
	tl, err := DecodeListener(xds.MustAny(xdsbuild.NewTCPProxyListener("upstream:store", "::1", 9192, "store", xdsbuild.TCPProxyOptions{})))
	if err != nil || tl.Chains[0].TCP.Cluster != "store" || tl.Address != "[::1]:9192" {
		t.Errorf("tcp listener = %+v, %v", tl, err)
	}
	rc, err := DecodeRouteConfig(xds.MustAny(xdsbuild.NewRouteConfig("api", "api", xdsbuild.RouteOptions{Timeout: 3 * time.Second})))
	if err != nil || rc.VirtualHosts[0].Routes[0].Timeout != 3*time.Second || rc.VirtualHosts[0].Routes[0].Match != MatchPrefix {
		t.Errorf("route = %+v, %v", rc, err)
	}
	noTimeout := xdsbuild.NewRouteConfig("x", "x", xdsbuild.RouteOptions{})
	noTimeout.VirtualHosts[0].Routes[0].GetRoute().Timeout = nil
	if rc, _ := DecodeRouteConfig(xds.MustAny(noTimeout)); rc.VirtualHosts[0].Routes[0].Timeout != DefaultRouteTimeout {
		t.Errorf("absent timeout = %v, want Envoy's default %v", rc.VirtualHosts[0].Routes[0].Timeout, DefaultRouteTimeout)
	}
	c, err := DecodeCluster(xds.MustAny(xdsbuild.NewEDSCluster("api", xdsbuild.ClusterOptions{Protocol: xds.ProtocolGRPC})))
	if err != nil || c.Type != ClusterEDS || c.EDSServiceName != "api" || c.Protocol != xds.ProtocolHTTP2 || c.ConnectTimeout != xds.DefaultConnectTimeout {
		t.Errorf("cluster = %+v, %v", c, err)
	}
	la := xdsbuild.NewLoadAssignment("api", []xdsbuild.Endpoint{{Host: "10.0.0.1", Port: 1, Weight: 2}, {Host: "10.0.0.2", Port: 2}})
	la.Endpoints[0].LbEndpoints[1].HealthStatus = core.HealthStatus_DRAINING
	got, err := DecodeLoadAssignment(xds.MustAny(la))
	if err != nil || len(got.Endpoints) != 1 || got.Endpoints[0] != (Endpoint{Address: "10.0.0.1:1", Weight: 2}) {
		t.Errorf("load assignment = %+v, %v (draining endpoints take no traffic)", got, err)
	}
}

func TestDecodeRejectsWithResourceAndField(t *testing.T) {
	httpL := func(mut func(*listener.Listener, *hcm.HttpConnectionManager)) *listener.Listener {
		l := xdsbuild.NewHTTPListener("l", "127.0.0.1", 80, xdsbuild.HTTPListenerOptions{RouteConfigName: "r"})
		var m hcm.HttpConnectionManager
		_ = l.FilterChains[0].Filters[0].GetTypedConfig().UnmarshalTo(&m)
		mut(l, &m)
		l.FilterChains[0].Filters[0].ConfigType = &listener.Filter_TypedConfig{TypedConfig: xds.MustAny(&m)}
		return l
	}
	tests := []struct {
		name   string
		decode func() error
		want   string
	}{
		{"listener port 0", func() error {
			_, err := DecodeListener(xds.MustAny(xdsbuild.NewTCPProxyListener("l", "127.0.0.1", 0, "c", xdsbuild.TCPProxyOptions{})))
			return err
		}, `listener "l": address: port 0 out of range 1-65535`},
		{"listener without chains", func() error {
			l := xdsbuild.NewTCPProxyListener("l", "127.0.0.1", 80, "c", xdsbuild.TCPProxyOptions{})
			l.FilterChains = nil
			_, err := DecodeListener(xds.MustAny(l))
			return err
		}, `listener "l": filter_chains: at least one filter chain is required`},
		{"unsupported network filter", func() error {
			l := xdsbuild.NewTCPProxyListener("l", "127.0.0.1", 80, "c", xdsbuild.TCPProxyOptions{})
			l.FilterChains[0].Filters[0] = &listener.Filter{Name: "envoy.filters.network.redis_proxy",
				ConfigType: &listener.Filter_TypedConfig{TypedConfig: xds.MustAny(&route.RouteConfiguration{})}}
			_, err := DecodeListener(xds.MustAny(l))
			return err
		}, `listener "l": filter_chains[0].filters[0]: unsupported network filter "envoy.filters.network.redis_proxy"`},
		{"api listener sent to a sidecar", func() error {
			_, err := DecodeListener(xds.MustAny(xdsbuild.NewAPIListener("api", xdsbuild.NewRouteConfig("api", "api", xdsbuild.RouteOptions{}))))
			return err
		}, `listener "api": api_listener: API listeners are for proxyless gRPC clients`},
		{"http filter after the router", func() error {
			l := httpL(func(_ *listener.Listener, m *hcm.HttpConnectionManager) {
				m.HttpFilters = append(m.HttpFilters, &hcm.HttpFilter{Name: "envoy.filters.http.cors"})
			})
			_, err := DecodeListener(xds.MustAny(l))
			return err
		}, `http_filters[0]: envoy.filters.http.router must be the last HTTP filter`},
		{"rds from a non-ADS source", func() error {
			l := httpL(func(_ *listener.Listener, m *hcm.HttpConnectionManager) {
				//lint:ignore SA1019 Envoy still accepts it; the test sends what a control plane may send, which the decoder must refuse (not ADS)
				m.GetRds().ConfigSource = &core.ConfigSource{ConfigSourceSpecifier: &core.ConfigSource_Path{Path: "/etc/r.yaml"}}
			})
			_, err := DecodeListener(xds.MustAny(l))
			return err
		}, `typed_config.rds.config_source: only ADS is supported`},
		{"regex route", func() error {
			rc := xdsbuild.NewRouteConfig("r", "c", xdsbuild.RouteOptions{})
			rc.VirtualHosts[0].Routes[0].Match.PathSpecifier = &route.RouteMatch_SafeRegex{}
			_, err := DecodeRouteConfig(xds.MustAny(rc))
			return err
		}, `route configuration "r"`},
		{"header match", func() error {
			rc := xdsbuild.NewRouteConfig("r", "c", xdsbuild.RouteOptions{})
			rc.VirtualHosts[0].Routes[0].Match.Headers = []*route.HeaderMatcher{{Name: "x-canary"}}
			_, err := DecodeRouteConfig(xds.MustAny(rc))
			return err
		}, `virtual_hosts[0].routes[0]: match.headers[0]: only exact and present header matches are supported`},
		{"redirect action", func() error {
			rc := xdsbuild.NewRouteConfig("r", "c", xdsbuild.RouteOptions{})
			rc.VirtualHosts[0].Routes[0].Action = &route.Route_Redirect{Redirect: &route.RedirectAction{}}
			_, err := DecodeRouteConfig(xds.MustAny(rc))
			return err
		}, `virtual_hosts[0].routes[0]: action: only route actions are supported`},
		{"duplicate domain", func() error {
			rc := xdsbuild.NewRouteConfig("r", "c", xdsbuild.RouteOptions{})
			rc.VirtualHosts = append(rc.VirtualHosts, &route.VirtualHost{Name: "again", Domains: []string{"*"}})
			_, err := DecodeRouteConfig(xds.MustAny(rc))
			return err
		}, `route configuration "r": virtual_hosts[1].domains[0]: domain "*" is also in virtual host "r"`},
		{"unsupported lb policy", func() error {
			c := xdsbuild.NewEDSCluster("c", xdsbuild.ClusterOptions{})
			c.LbPolicy = cluster.Cluster_MAGLEV
			_, err := DecodeCluster(xds.MustAny(c))
			return err
		}, `cluster "c": lb_policy: unsupported MAGLEV (supported: ROUND_ROBIN, LEAST_REQUEST, RING_HASH)`},
		{"negative connect timeout (proto rule)", func() error {
			c := xdsbuild.NewEDSCluster("c", xdsbuild.ClusterOptions{})
			c.ConnectTimeout = durationpb.New(-time.Second)
			_, err := DecodeCluster(xds.MustAny(c))
			return err
		}, `cluster "c": invalid Cluster.ConnectTimeout`},
		{"endpoint without address", func() error {
			la := xdsbuild.NewLoadAssignment("c", []xdsbuild.Endpoint{{Host: "", Port: 80}})
			_, err := DecodeLoadAssignment(xds.MustAny(la))
			return err
		}, `invalid SocketAddress.Address: value length must be at least 1 runes`},
		{"second priority", func() error {
			la := xdsbuild.NewLoadAssignment("c", []xdsbuild.Endpoint{{Host: "10.0.0.1", Port: 80}})
			la.Endpoints[0].Priority = 1
			la.Endpoints[0].LoadBalancingWeight = wrapperspb.UInt32(1)
			_, err := DecodeLoadAssignment(xds.MustAny(la))
			return err
		}, `endpoints[0].priority: only priority 0 is supported`},
		{"wrong type in the Any", func() error {
			_, err := DecodeCluster(xds.MustAny(xdsbuild.NewRouteConfig("r", "c", xdsbuild.RouteOptions{})))
			return err
		}, `cluster "": cannot decode type.googleapis.com/envoy.config.route.v3.RouteConfiguration`},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.decode()
			if err == nil {
				t.Fatalf("accepted; want an error containing %q", tc.want)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error = %q\nwant it to contain %q", err, tc.want)
			}
		})
	}
}

// TestTranslatorOutputDecodes is the contract between the control plane
// and the sidecar: every resource the translator emits for the policies of
// its golden tests decodes, with the policy values intact.
func TestTranslatorOutputDecodes(t *testing.T) {
	pol, err := policy.Load("../../controlplane/translate/testdata/policies")
	if err != nil {
		t.Fatal(err)
	}
	cat := model.NewCatalog(map[string]*model.Service{"api": {Name: "api"}, "store": {Name: "store"}, "sessions": {Name: "sessions"}},
		map[string]*model.Proxy{"web": {ID: "web", Service: "web", Address: "127.0.0.1", Port: 21000, LocalAppAddress: "127.0.0.1", LocalAppPort: 9000,
			Upstreams: []model.Upstream{{Service: "api", BindAddress: "127.0.0.1", BindPort: 9191}, {Service: "store", BindAddress: "127.0.0.1", BindPort: 9192},
				{Service: "sessions", BindAddress: "127.0.0.1", BindPort: 9193}}}})
	ca, err := testca.New("test.consul")
	if err != nil {
		t.Fatal(err)
	}
	cat.CA = &model.CA{TrustDomain: ca.TrustDomain, Roots: []model.Root{{ID: "r", CertPEM: ca.CertPEM, Active: true}}}
	for _, svc := range []string{"web", "api", "store", "sessions"} {
		l := ca.MustIssue("dc1", svc)
		cat.Leaves[svc] = &model.Leaf{Service: svc, CertPEM: l.CertPEM, KeyPEM: l.KeyPEM, SPIFFEID: l.SPIFFEID}
	}
	cat.Intentions["web"] = &model.Intentions{Destination: "web", Sources: []model.IntentionSource{{Name: "lb", Action: "allow", Origin: "consul intention lb => web"}}}
	res, err := translate.Proxy(cat, pol, cat.Proxies["web"])
	if err != nil {
		t.Fatal(err)
	}
	for _, sec := range res.Secrets {
		ds, err := DecodeSecret(xds.MustAny(sec))
		if err != nil {
			t.Fatalf("secret: %v", err)
		}
		if ds.Name == xds.SecretCert && ds.SPIFFEID != ca.SPIFFEID("dc1", "web") {
			t.Errorf("cert secret identity %q", ds.SPIFFEID)
		}
	}
	for _, l := range res.Listeners {
		dl, err := DecodeListener(xds.MustAny(l))
		if err != nil {
			t.Fatalf("listener: %v", err)
		}
		if dl.Name == "upstream:store" && dl.Chains[0].TCP.MaxConnectAttempts != 5 {
			t.Errorf("store connect attempts = %d, want 5 (numRetries 4)", dl.Chains[0].TCP.MaxConnectAttempts)
		}
		if dl.Name == xds.PublicListener {
			c := dl.Chain(true)
			if c == nil || c.TLS == nil || !c.TLS.RequireClientCert || c.TLS.CertSecret != xds.SecretCert || c.RBAC == nil {
				t.Fatalf("public listener chain = %+v", c)
			}
			lb := ca.SPIFFEID("dc2", "lb")
			if ok, _ := c.RBAC.Decide(&RBACRequest{Principal: lb}); !ok {
				t.Errorf("lb (allowed by intention) denied")
			}
			if ok, rule := c.RBAC.Decide(&RBACRequest{Principal: ca.SPIFFEID("dc1", "api")}); ok || rule != DefaultDenyRule {
				t.Errorf("api (no intention) allowed=%v rule=%q, want default deny", ok, rule)
			}
		}
	}
	routes := map[string]*Route{}
	for _, rc := range res.Routes {
		d, err := DecodeRouteConfig(xds.MustAny(rc))
		if err != nil {
			t.Fatalf("route configuration: %v", err)
		}
		for _, r := range d.VirtualHosts[0].Routes {
			routes[d.Name+"/"+r.Name] = r
		}
	}
	def := routes["api/default"]
	if def == nil || def.Timeout != 5*time.Second || def.IdleTimeout != time.Minute || def.Retry == nil ||
		def.Retry.NumRetries != 3 || def.Retry.PerTry != 300*time.Millisecond || !def.Retry.OtherHost ||
		def.Retry.On != RetryOn(Retry5xx|RetryConnectFailure|RetryReset|RetryGRPCUnavailable) || def.Retry.BackoffMax != 100*time.Millisecond {
		t.Errorf("api default route = %+v retry %+v", def, def.Retry)
	}
	orders := routes["api/prefix:/orders/|POST"]
	if orders == nil || len(orders.Headers) != 1 || orders.Headers[0].Exact != "POST" || !orders.Retry.NonIdempotentRetry ||
		orders.BodyBufferBytes != 1<<20 || fmt.Sprint(orders.Retry.StatusCodes) != "[409 503]" {
		t.Errorf("orders route = %+v retry %+v", orders, orders.Retry)
	}
	if r := routes["sessions/default"]; r == nil || r.HashHeader != "x-user-id" {
		t.Errorf("sessions route = %+v, want hash on x-user-id", r)
	}
	for _, c := range res.Clusters {
		dc, err := DecodeCluster(xds.MustAny(c))
		if err != nil {
			t.Fatalf("cluster: %v", err)
		}
		if dc.Name != xds.LocalAppCluster && (dc.TLS == nil || len(dc.TLS.SANs) != 1 || dc.TLS.SANs[0] != ca.SPIFFEID("dc1", dc.Name)) {
			t.Errorf("cluster %s TLS = %+v, want the upstream's SPIFFE ID", dc.Name, dc.TLS)
		}
		switch dc.Name {
		case "api":
			if dc.ConnectTimeout != time.Second || dc.Thresholds != (Thresholds{100, 50, 200, 10}) || dc.Outlier == nil ||
				dc.Outlier.Consecutive5xx != 4 || dc.Outlier.ConsecutiveGatewayErrors != 2 || dc.Outlier.MaxEjectionPercent != 50 ||
				dc.EndpointBreaker == nil || dc.EndpointBreaker.ConsecutiveFailures != 3 || dc.RetryBudget.Ratio != 0.25 {
				t.Errorf("api cluster = %+v outlier %+v breaker %+v budget %+v", dc, dc.Outlier, dc.EndpointBreaker, dc.RetryBudget)
			}
		case "sessions":
			if dc.LB != LBRingHash {
				t.Errorf("sessions LB = %v, want ring hash", dc.LB)
			}
		}
	}
}

// TestMaxRetriesWithRetryBudget: a cluster with a retry budget and no
// explicit max_retries does not cap retries in flight at Envoy's default of
// 3 (Envoy ignores max_retries when a retry budget is set); an explicit
// max_retries still applies, and without a budget Envoy's default stays.
func TestMaxRetriesWithRetryBudget(t *testing.T) {
	budget := &xds.ClusterExtras{RetryBudget: &xds.RetryBudget{Ratio: 0.2, MinRetriesPerSecond: 10, TTL: xds.Duration(10 * time.Second)}}
	for _, tc := range []struct {
		name       string
		opts       xdsbuild.ClusterOptions
		maxRetries int
	}{
		{"budget, no circuit breakers", xdsbuild.ClusterOptions{Extras: budget}, UnlimitedRetries},
		{"budget, thresholds without max_retries", xdsbuild.ClusterOptions{Extras: budget}, UnlimitedRetries},
		{"budget, explicit max_retries", xdsbuild.ClusterOptions{Extras: budget, Thresholds: &xdsbuild.Thresholds{MaxConnections: 1, MaxPendingRequests: 1, MaxRequests: 1, MaxRetries: 7}}, 7},
		{"no budget", xdsbuild.ClusterOptions{}, 3},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := xdsbuild.NewEDSCluster("api", tc.opts)
			if tc.name == "budget, thresholds without max_retries" {
				c.CircuitBreakers = &cluster.CircuitBreakers{Thresholds: []*cluster.CircuitBreakers_Thresholds{{MaxConnections: wrapperspb.UInt32(9)}}}
			}
			got, err := DecodeCluster(xds.MustAny(c))
			if err != nil {
				t.Fatal(err)
			}
			if got.Thresholds.MaxRetries != tc.maxRetries {
				t.Errorf("MaxRetries = %d, want %d", got.Thresholds.MaxRetries, tc.maxRetries)
			}
		})
	}
}
