package consul

import (
	"encoding/json"
	"strings"
	"testing"

	"github.com/hashicorp/consul/api"

	"github.com/meshlet/meshlet/controlplane/model"
	"github.com/meshlet/meshlet/controlplane/translate"
	"github.com/meshlet/meshlet/sidecar/config"
	"github.com/meshlet/meshlet/xds"
)

// FuzzIntentionsTranslate: a service-intentions config entry of any shape
// (JSON, as Consul's API returns it) for api, a service of fuzzCatalog,
// is converted and translated into api's sidecar's resources
// without panicking, and the sidecar accepts every resource built from it:
// the control plane must not send what a sidecar NACKs (what Consul lets
// through, an unusable regex or method, is dropped or refused by the
// translator with the entry named). Seeds: testdata/fuzz and the entries
// below.
func FuzzIntentionsTranslate(f *testing.F) {
	for _, s := range []string{
		`{"Kind":"service-intentions","Name":"api","Sources":[{"Name":"web","Action":"allow"}]}`,
		`{"Kind":"service-intentions","Name":"api","Sources":[{"Name":"*","Action":"deny"},{"Name":"web","Permissions":[{"Action":"allow","HTTP":{"PathPrefix":"/v1","Methods":["GET"]}}]}]}`,
		`{"Kind":"service-intentions","Name":"api","Sources":[{"Name":"web","Permissions":[{"Action":"allow","HTTP":{"PathRegex":"/a/[0-9]+","Header":[{"Name":"x-user","Regex":"^a.*"}]}}]}]}`,
		`{"Kind":"service-intentions","Name":"api","Sources":[{"Name":"web","Permissions":[{"Action":"deny","HTTP":{"PathExact":"/admin","Header":[{"Name":"x","Present":true,"Invert":true}]}}]}]}`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		var e api.ServiceIntentionsConfigEntry
		if json.Unmarshal(b, &e) != nil {
			return
		}
		e.Name = "api"
		cat := fuzzCatalog()
		cat.Intentions["api"], _ = convertIntentions(&e)
		p := cat.Proxies["api-1-api-sidecar-proxy"]
		if p == nil {
			t.Fatal("no proxy api-1-api-sidecar-proxy")
		}
		r, err := translate.Proxy(cat, nil, p)
		if err != nil {
			return // refused, naming the entry
		}
		for _, l := range r.Listeners {
			if _, err := config.DecodeListener(xds.MustAny(l)); err != nil {
				t.Fatalf("the sidecar NACKs listener %s built from %s: %v", l.GetName(), b, err)
			}
		}
		for _, rc := range r.Routes {
			if _, err := config.DecodeRouteConfig(xds.MustAny(rc)); err != nil {
				t.Fatalf("the sidecar NACKs route %s built from %s: %v", rc.GetName(), b, err)
			}
		}
	})
}

// fuzzCatalog is web and api (HTTP), each one instance behind a
// transparent sidecar, with the CA and leaves known.
func fuzzCatalog() *model.Catalog {
	entry := func(svc *api.AgentService) *api.ServiceEntry {
		return &api.ServiceEntry{Node: &api.Node{Node: "n", Address: "10.0.0.1", Datacenter: "dc1"}, Service: svc,
			Checks: api.HealthChecks{{Status: api.HealthPassing}}}
	}
	instance := func(name, ip, virtual string) *api.ServiceEntry {
		return entry(&api.AgentService{ID: name + "-1", Service: name, Address: ip, Port: 8080, Meta: map[string]string{"protocol": "http"},
			TaggedAddresses: map[string]api.ServiceAddress{VirtualTaggedAddress: {Address: virtual, Port: 80}}})
	}
	proxy := func(name, ip string) *api.ServiceEntry {
		return entry(&api.AgentService{Kind: api.ServiceKindConnectProxy, ID: name + "-1-" + name + "-sidecar-proxy", Service: name + "-sidecar-proxy",
			Address: ip, Port: xds.PodPublicPort, Proxy: &api.AgentServiceConnectProxyConfig{
				DestinationServiceName: name, DestinationServiceID: name + "-1", LocalServicePort: 8080, Mode: api.ProxyModeTransparent,
			}})
	}
	cat := BuildCatalog(map[string][]*api.ServiceEntry{
		"web": {instance("web", "10.244.0.5", "10.96.0.10")}, "web-sidecar-proxy": {proxy("web", "10.244.0.5")},
		"api": {instance("api", "10.244.0.6", "10.96.0.20")}, "api-sidecar-proxy": {proxy("api", "10.244.0.6")},
	})
	cat.CA = &model.CA{TrustDomain: "t.consul", Roots: []model.Root{{ID: "r", CertPEM: "ROOT", Active: true}}}
	for _, s := range []string{"web", "api"} {
		cat.Leaves[s] = &model.Leaf{Service: s, CertPEM: "LEAF", KeyPEM: "KEY", SPIFFEID: "spiffe://t.consul/ns/default/dc/dc1/svc/" + s}
	}
	return cat
}

// TestIntentionsThatCannotBeEnforcedFailClosed: what FuzzIntentionsTranslate
// found. An allow whose header match is unusable is left out; such a deny
// denies every request of its source; a nameless source is left out; each
// is reported with its field.
func TestIntentionsThatCannotBeEnforcedFailClosed(t *testing.T) {
	e := &api.ServiceIntentionsConfigEntry{Kind: api.ServiceIntentions, Name: "api", Sources: []*api.SourceIntention{
		{Name: "web", Permissions: []*api.IntentionPermission{
			{Action: api.IntentionActionAllow, HTTP: &api.IntentionHTTPPermission{PathPrefix: "/v1", Header: []api.IntentionHTTPHeaderPermission{{Name: ""}}}},
			{Action: api.IntentionActionAllow, HTTP: &api.IntentionHTTPPermission{PathPrefix: "/v2"}},
		}},
		{Name: "ops", Permissions: []*api.IntentionPermission{
			{Action: api.IntentionActionDeny, HTTP: &api.IntentionHTTPPermission{PathRegex: "(", Methods: []string{"DELETE"}}},
		}},
		{Name: "", Action: api.IntentionActionAllow},
	}}
	in, problems := convertIntentions(e)
	if len(in.Sources) != 2 {
		t.Fatalf("sources %+v, want web and ops", in.Sources)
	}
	web, ops := in.Sources[0], in.Sources[1]
	if len(web.Permissions) != 1 || web.Permissions[0].HTTP.PathPrefix != "/v2" {
		t.Errorf("web's permissions %+v, want only the usable allow (/v2)", web.Permissions)
	}
	if len(ops.Permissions) != 1 || ops.Permissions[0].Action != "deny" || ops.Permissions[0].HTTP.PathRegex != "" || len(ops.Permissions[0].HTTP.Methods) != 0 {
		t.Errorf("ops's permissions %+v, want a deny of every request", ops.Permissions)
	}
	want := []string{"Sources[0].Permissions[0].HTTP.Header[0].Name: required", "Sources[1].Permissions[0].HTTP.PathRegex", "Sources[2].Name: required"}
	if len(problems) != len(want) {
		t.Fatalf("problems %q, want %d", problems, len(want))
	}
	for i, w := range want {
		if !strings.HasPrefix(problems[i], w) {
			t.Errorf("problem %d = %q, want it to start with %q", i, problems[i], w)
		}
	}
}
