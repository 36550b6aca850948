package httpproxy

import (
	"context"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/meshlet/meshlet/sidecar/cluster"
	"github.com/meshlet/meshlet/sidecar/config"
	"github.com/meshlet/meshlet/sidecar/tracing"
	"github.com/meshlet/meshlet/xds"
)

// BenchmarkProxy measures one keep-alive HTTP/1.1 request with a 1 KiB
// response through the proxy over loopback (client, proxy and upstream in
// this process), without and with the resilience layer on the happy path:
// "bare" has no retry policy, outlier detection or endpoint breaker;
// "resilience" has a retry policy with a per-try timeout, the retry budget,
// outlier detection and an endpoint breaker. The difference is the layer's
// cost per request. "bare_nethttp" is "bare" served by net/http's server
// instead of the HTTP/1.1 fast path.
func BenchmarkProxy(b *testing.B) {
	payload := strings.Repeat("x", 1024)
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { io.WriteString(w, payload) }))
	defer up.Close()

	retry := &config.RetryPolicy{
		On: config.Retry5xx | config.RetryConnectFailure | config.RetryReset, NumRetries: 2, PerTry: time.Second,
		BackoffBase: 25 * time.Millisecond, BackoffMax: 250 * time.Millisecond, OtherHost: true,
	}
	cases := []struct {
		name    string
		retry   *config.RetryPolicy
		cluster config.Cluster
		netHTTP bool // Options.NetHTTPOnly: the same request on net/http's server
	}{
		{name: "bare"},
		{name: "bare_nethttp", netHTTP: true},
		{name: "resilience", retry: retry, cluster: config.Cluster{
			Outlier: &config.OutlierDetection{Consecutive5xx: 5, ConsecutiveLocalOriginFailures: 5, SplitLocalOrigin: true,
				Interval: 10 * time.Second, BaseEjectionTime: 30 * time.Second, MaxEjectionTime: 300 * time.Second, MaxEjectionPercent: 10},
			EndpointBreaker: &xds.EndpointBreaker{ConsecutiveFailures: 5, Interval: xds.Duration(10 * time.Second), OpenInterval: xds.Duration(30 * time.Second), HalfOpenRequests: 1},
			RetryBudget:     &xds.RetryBudget{Ratio: 0.2, MinRetriesPerSecond: 10, TTL: xds.Duration(10 * time.Second)},
		}},
	}
	for _, tc := range cases {
		b.Run(tc.name, func(b *testing.B) {
			clusters := cluster.NewManager(slog.New(slog.NewTextHandler(io.Discard, nil)), nil, nil)
			defer clusters.Close()
			cc := tc.cluster
			cc.Name, cc.Type, cc.ConnectTimeout, cc.Protocol = "c", config.ClusterStatic, time.Second, xds.ProtocolHTTP
			cc.Static = &config.LoadAssignment{Endpoints: []config.Endpoint{{Address: up.Listener.Addr().String(), Weight: 1}}}
			clusters.Update(map[string]*config.Cluster{"c": &cc}, nil)
			l := &config.Listener{Name: "l", Chains: []*config.FilterChain{{HTTP: &config.HTTPConnectionManager{RouteConfig: &config.RouteConfig{Name: "rc",
				VirtualHosts: []*config.VirtualHost{{Name: "vh", Domains: []string{"*"}, Routes: []*config.Route{{
					Match: config.MatchPrefix, Path: "/", CaseSensitive: true, Cluster: "c", Retry: tc.retry, BodyBufferBytes: config.DefaultBodyBufferBytes,
				}}}}}}}}}
			addr := serve(b, NewServer(l, &config.Snapshot{}, clusters, slog.New(slog.NewTextHandler(io.Discard, nil)), Options{NetHTTPOnly: tc.netHTTP}))
			client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 4}}
			url := "http://" + addr + "/"
			get := func() {
				resp, err := client.Get(url)
				if err != nil {
					b.Fatal(err)
				}
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if resp.StatusCode != 200 {
					b.Fatalf("status %d", resp.StatusCode)
				}
			}
			get()
			b.ReportAllocs()
			b.ResetTimer()
			for range b.N {
				get()
			}
		})
	}
}

// BenchmarkTracing measures the same request as BenchmarkProxy/bare on an
// outbound listener with tracing off, and on with 1% and 100% of requests
// sampled (a client span per request and one per attempt, W3C and B3
// headers injected, spans exported over OTLP/HTTP to a collector on
// loopback that reads and discards them). The ratios to "off" are the
// tracing overhead.
func BenchmarkTracing(b *testing.B) {
	payload := strings.Repeat("x", 1024)
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { io.WriteString(w, payload) }))
	defer up.Close()
	collector := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		w.Header().Set("Content-Type", "application/x-protobuf")
	}))
	defer collector.Close()
	log := slog.New(slog.NewTextHandler(io.Discard, nil))

	for _, tc := range []struct {
		name    string
		percent float64 // -1: tracing off
	}{{"off", -1}, {"sampled_1pct", 1}, {"sampled_100pct", 100}} {
		b.Run(tc.name, func(b *testing.B) {
			clusters := cluster.NewManager(log, nil, nil)
			defer clusters.Close()
			cc := config.Cluster{Name: "c", Type: config.ClusterStatic, ConnectTimeout: time.Second, Protocol: xds.ProtocolHTTP,
				Static: &config.LoadAssignment{Endpoints: []config.Endpoint{{Address: up.Listener.Addr().String(), Weight: 1}}}}
			clusters.Update(map[string]*config.Cluster{"c": &cc}, nil)
			hc := &config.HTTPConnectionManager{RouteConfig: &config.RouteConfig{Name: "rc",
				VirtualHosts: []*config.VirtualHost{{Name: "vh", Domains: []string{"*"}, Routes: []*config.Route{{
					Name: "default", Match: config.MatchPrefix, Path: "/", CaseSensitive: true, Cluster: "c", BodyBufferBytes: config.DefaultBodyBufferBytes,
				}}}}}}
			tm := tracing.NewManager(log, nil, "bench")
			defer tm.Close(context.Background())
			if tc.percent >= 0 {
				p := config.TraceProvider{ServiceName: "bench", Protocol: xds.OTLPHTTP, Endpoint: collector.URL + "/v1/traces", MaxQueue: config.DefaultTraceQueue}
				tm.Sync([]config.TraceProvider{p})
				hc.Tracing = &config.Tracing{Provider: p, SamplingPercent: tc.percent, SpawnUpstreamSpan: true, Outbound: true,
					Propagation: []string{config.PropagationTraceContext, config.PropagationB3Multi}}
			}
			l := &config.Listener{Name: "upstream:c", Chains: []*config.FilterChain{{HTTP: hc}}}
			addr := serve(b, NewServer(l, &config.Snapshot{}, clusters, log, Options{Tracing: tm.HTTP}))
			client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 4}}
			url := "http://" + addr + "/"
			get := func() {
				resp, err := client.Get(url)
				if err != nil {
					b.Fatal(err)
				}
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if resp.StatusCode != 200 {
					b.Fatalf("status %d", resp.StatusCode)
				}
			}
			get()
			b.ReportAllocs()
			b.ResetTimer()
			for range b.N {
				get()
			}
		})
	}
}
