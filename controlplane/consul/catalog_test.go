package consul

import (
	"fmt"
	"testing"

	"github.com/hashicorp/consul/api"
)

func entry(node, addr string, svc *api.AgentService, status string) *api.ServiceEntry {
	return &api.ServiceEntry{
		Node:    &api.Node{Node: node, Address: addr},
		Service: svc,
		Checks:  api.HealthChecks{{Status: status, ServiceID: svc.ID, CheckID: "service:" + svc.ID}},
	}
}

func TestBuildCatalog(t *testing.T) {
	sidecar := func(id, dest, destID string, port int, cfg map[string]any, ups ...api.Upstream) *api.AgentService {
		return &api.AgentService{
			Kind: api.ServiceKindConnectProxy, ID: id, Service: dest + "-sidecar-proxy", Port: port,
			Proxy: &api.AgentServiceConnectProxyConfig{
				DestinationServiceName: dest, DestinationServiceID: destID, LocalServicePort: port - 1000,
				Config: cfg, Upstreams: ups,
			},
		}
	}
	entries := map[string][]*api.ServiceEntry{
		"api": {
			entry("n1", "10.0.0.1", &api.AgentService{ID: "api-1", Service: "api", Port: 9001, Meta: map[string]string{"protocol": "http"}}, api.HealthPassing),
			entry("n1", "10.0.0.1", &api.AgentService{ID: "api-2", Service: "api", Address: "10.0.0.9", Port: 9002, Weights: api.AgentWeights{Passing: 5}}, api.HealthCritical),
		},
		"api-sidecar-proxy": {
			entry("n1", "10.0.0.1", sidecar("api-1-sidecar-proxy", "api", "api-1", 21001, nil), api.HealthPassing),
			// Its own checks pass but its app's fail: not an endpoint.
			entry("n1", "10.0.0.1", sidecar("api-2-sidecar-proxy", "api", "api-2", 21002, map[string]any{"bind_address": "0.0.0.0", "bind_port": float64(31002)}), api.HealthPassing),
		},
		"web-sidecar-proxy": {
			entry("n2", "10.0.0.2", sidecar("web-1-sidecar-proxy", "web", "web-1", 21000, nil,
				api.Upstream{DestinationName: "store", LocalBindPort: 9192},
				api.Upstream{DestinationName: "api", LocalBindAddress: "127.0.0.2", LocalBindPort: 9191},
				api.Upstream{DestinationType: api.UpstreamDestTypePreparedQuery, DestinationName: "q", LocalBindPort: 9193},
			), api.HealthWarning),
		},
		"gw": {entry("n1", "10.0.0.1", &api.AgentService{Kind: api.ServiceKindMeshGateway, ID: "gw", Service: "gw"}, api.HealthPassing)},
	}
	cat := BuildCatalog(entries)

	if _, ok := cat.Services["gw"]; ok {
		t.Error("mesh gateway became a service")
	}
	apiSvc := cat.Services["api"]
	if apiSvc == nil || len(apiSvc.Instances) != 2 || apiSvc.Protocol != "http" {
		t.Fatalf("api = %+v, want 2 instances with protocol http", apiSvc)
	}
	if in := apiSvc.Instances[1]; in.ID != "api-2" || in.Address != "10.0.0.9" || in.Weight != 5 || in.Healthy {
		t.Errorf("api-2 = %+v, want own address, weight 5, unhealthy", in)
	}
	if in := apiSvc.Instances[0]; in.Address != "10.0.0.1" || in.Weight != 1 || !in.Healthy {
		t.Errorf("api-1 = %+v, want node address, weight 1, healthy", in)
	}

	p1, p2 := cat.Proxies["api-1-sidecar-proxy"], cat.Proxies["api-2-sidecar-proxy"]
	if !p1.Healthy || p1.LocalAppAddress != DefaultLocalAddress || p1.LocalAppPort != 20001 {
		t.Errorf("api-1 proxy = %+v", p1)
	}
	if p2.Healthy {
		t.Error("api-2's sidecar is healthy although api-2 fails its checks")
	}
	if p2.BindAddress() != "0.0.0.0" || p2.BindPort() != 31002 || p2.HostPort() != "10.0.0.1:21002" {
		t.Errorf("api-2 proxy binds %s:%d, registered at %s", p2.BindAddress(), p2.BindPort(), p2.HostPort())
	}
	if got := cat.ProxiesFor("api"); len(got) != 2 || got[0].ID != "api-1-sidecar-proxy" {
		t.Errorf("ProxiesFor(api) = %v", got)
	}

	web := cat.Proxies["web-1-sidecar-proxy"]
	if web.Healthy {
		t.Error("a proxy with a warning check counts as healthy (Consul's ?passing excludes warnings)")
	}
	if len(web.Upstreams) != 2 || web.Upstreams[0].Service != "api" || web.Upstreams[0].BindAddress != "127.0.0.2" ||
		web.Upstreams[1].Service != "store" || web.Upstreams[1].BindAddress != DefaultLocalAddress {
		t.Errorf("web upstreams = %+v, want api@127.0.0.2 then store@127.0.0.1, prepared query dropped", web.Upstreams)
	}
}

// TestServicePortsMeta: an instance's xds.MetaServicePorts becomes its
// Ports; malformed pairs are left out, not fatal.
func TestServicePortsMeta(t *testing.T) {
	for v, want := range map[string]string{
		"":                               "[]",
		"80:8080,9090:9090":              "[{80 8080} {9090 9090}]",
		" 80:8080 , x:1,70000:1,1:0,443": "[{80 8080}]",
		"53:53":                          "[{53 53}]",
	} {
		if got := fmt.Sprint(servicePorts(v)); got != want {
			t.Errorf("servicePorts(%q) = %s, want %s", v, got, want)
		}
	}
}

// TestDirectPortsMeta: an instance's xds.MetaDirectPorts becomes its
// DirectPorts, sorted, deduplicated, out-of-range items left out.
func TestDirectPortsMeta(t *testing.T) {
	for v, want := range map[string]string{"": "[]", "9300,2888, 3888,2888": "[2888 3888 9300]", "x,0,70000,53": "[53]"} {
		if got := fmt.Sprint(portList(v)); got != want {
			t.Errorf("portList(%q) = %s, want %s", v, got, want)
		}
	}
}
