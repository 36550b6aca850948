package e2e

import (
	"encoding/json"
	"errors"
	"net"
	"net/http"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/meshlet/meshlet/internal/testutil"
)

// Issue 6, row "Protocol declaration, not sniffing": the protocol of a
// service comes from Consul service meta "protocol" or a ServiceDefaults
// policy (which wins), never from looking at the traffic, so a server-first
// protocol declared tcp gets its greeting at once.

// listenerView is what the tests read of a listener in /config_dump.
type listenerView struct {
	Name            string `json:"name"`
	ListenerFilters []struct {
		Name string `json:"name"`
	} `json:"listenerFilters"`
	ListenerFiltersTimeout           string `json:"listenerFiltersTimeout"`
	ContinueOnListenerFiltersTimeout bool   `json:"continueOnListenerFiltersTimeout"`
	FilterChains                     []struct {
		FilterChainMatch struct {
			TransportProtocol string `json:"transportProtocol"`
		} `json:"filterChainMatch"`
		Filters []struct {
			Name string `json:"name"`
		} `json:"filters"`
	} `json:"filterChains"`
}

// chains returns, per filter chain, "<transport protocol>:" followed by the
// network filter names joined by ",".
func (l listenerView) chains() []string {
	var out []string
	for _, c := range l.FilterChains {
		var names []string
		for _, f := range c.Filters {
			names = append(names, f.Name)
		}
		out = append(out, c.FilterChainMatch.TransportProtocol+":"+strings.Join(names, ","))
	}
	return out
}

// dumpedListeners returns the active listeners in p's /config_dump by name.
func dumpedListeners(t *testing.T, p *proxy) map[string]listenerView {
	t.Helper()
	resp, err := http.Get(p.admin + "/config_dump")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var dump struct {
		Configs []struct {
			Type             string `json:"@type"`
			DynamicListeners []struct {
				ActiveState struct {
					Listener listenerView `json:"listener"`
				} `json:"activeState"`
			} `json:"dynamicListeners"`
		} `json:"configs"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&dump); err != nil {
		t.Fatal(err)
	}
	out := map[string]listenerView{}
	for _, c := range dump.Configs {
		for _, d := range c.DynamicListeners {
			out[d.ActiveState.Listener.Name] = d.ActiveState.Listener
		}
	}
	return out
}

const (
	hcmFilter = "envoy.filters.network.http_connection_manager"
	tcpFilter = "envoy.filters.network.tcp_proxy"
	rbacNet   = "envoy.filters.network.rbac"
)

// waitChains waits until listener of p has exactly the chains want.
func waitChains(t *testing.T, p *proxy, listener string, want ...string) listenerView {
	t.Helper()
	var got listenerView
	testutil.Until(t, 15*time.Second, listener+" with chains "+strings.Join(want, " | "), func() bool {
		got = dumpedListeners(t, p)[listener]
		return slices.Equal(got.chains(), want)
	})
	return got
}

// TestProtocolDeclaredNotSniffed: three services declare their protocol
// only in Consul service meta (no policy file): web "http" gets the HTTP
// connection manager on both sidecars (requests carry Via), db "tcp"
// (MariaDB, server-first) and legacy (no meta) get the TCP proxy, and the
// MariaDB greeting arrives through the mesh in milliseconds. A
// ServiceDefaults policy then overrides web's meta (tcp). In permissive
// mTLS mode the inbound listener tells TLS from plaintext by the first byte
// (tls_inspector); a plaintext client of a server-first protocol sends
// nothing, so after listener_filters_timeout it gets the plaintext chain
// (continue_on_listener_filters_timeout) and the greeting, while strict mode
// never falls back to plaintext.
func TestProtocolDeclaredNotSniffed(t *testing.T) {
	client := debTool(t, "mariadb", "mariadb-client")
	dbPort := startMariaDB(t)
	web := startApp(t, "web-1")
	m := newMesh(t)
	ports := freePorts(t, 7)
	clientSidecar, webSidecar, dbSidecar, webBind, dbBind, legacyBind, clientApp := ports[0], ports[1], ports[2], ports[3], ports[4], ports[5], ports[6]
	m.startControlPlane("", "") // no policy file: protocols from Consul only
	m.register(svc{id: "web-1", name: "web", appPort: web.port, sidecarPort: webSidecar, meta: map[string]string{"protocol": "http"}})
	m.register(svc{id: "db-1", name: "db", appPort: dbPort, sidecarPort: dbSidecar, meta: map[string]string{"protocol": "tcp"}})
	m.register(svc{id: "legacy-1", name: "legacy", appPort: freePorts(t, 1)[0], sidecarPort: freePorts(t, 1)[0]})
	m.register(svc{id: "client-1", name: "client", appPort: clientApp, sidecarPort: clientSidecar,
		upstreams: map[string]int{"web": webBind, "db": dbBind, "legacy": legacyBind}})
	m.allow("client", "web")
	m.allow("client", "db")
	cp := m.startSidecar("client-1-sidecar-proxy", "")
	wp := m.startSidecar("web-1-sidecar-proxy", "")
	dp := m.startSidecar("db-1-sidecar-proxy", "")
	for _, p := range []*proxy{cp, wp, dp} {
		p.waitReady(t)
	}
	testutil.Until(t, 10*time.Second, "client's sidecar reaching web's and db's", func() bool {
		return slices.Equal(cp.endpoints("web"), []string{hostPort(webSidecar)}) && slices.Equal(cp.endpoints("db"), []string{hostPort(dbSidecar)})
	})

	// Declared in Consul meta: http → HTTP connection manager on both
	// sides, tcp and undeclared → TCP proxy.
	waitChains(t, cp, "upstream:web", ":"+hcmFilter)
	waitChains(t, cp, "upstream:db", ":"+tcpFilter)
	waitChains(t, cp, "upstream:legacy", ":"+tcpFilter)
	waitChains(t, wp, "public_listener", ":"+hcmFilter)
	waitChains(t, dp, "public_listener", ":"+rbacNet+","+tcpFilter)
	a := call("http://" + hostPort(webBind) + "/")
	if a.err != nil || a.via == "" {
		t.Fatalf("HTTP through web's declared-http path: %+v (want 200 with Via from the sidecars)", a)
	}

	// The server-first protocol declared tcp: the greeting crosses both
	// sidecars at once, no wait for a client byte.
	viaMesh := greetingTimes(t, hostPort(dbBind), 10)
	t.Logf("MariaDB greeting through the mesh (declared tcp in Consul meta): median %v, max %v", viaMesh[5], viaMesh[9])
	if viaMesh[9] >= time.Second || viaMesh[5] >= 250*time.Millisecond {
		t.Fatalf("greeting through the mesh took median %v, max %v", viaMesh[5], viaMesh[9])
	}
	if out := runProg(t, 30*time.Second, nil, client, mariaDBArgs(dbBind, "SELECT 6*7")...); strings.TrimSpace(out) != "42" {
		t.Fatalf("mariadb through the mesh: %q", out)
	}

	// Strict mTLS (the default): a plaintext client that waits for the
	// server to speak first gets nothing from the app, however long it waits.
	c, err := net.Dial("tcp", hostPort(dbSidecar))
	if err != nil {
		t.Fatal(err)
	}
	_ = c.SetReadDeadline(time.Now().Add(1500 * time.Millisecond))
	if n, err := c.Read(make([]byte, 64)); n > 0 || !isTimeout(err) {
		t.Fatalf("strict listener: plaintext client read %d bytes (%v); want nothing (no fallback to plaintext)", n, err)
	}
	c.Close()

	// A policy file wins over the meta: web declared tcp there.
	m.writePolicy("protocols.yaml", serviceDefaults("web", "tcp"))
	waitChains(t, cp, "upstream:web", ":"+tcpFilter)
	waitChains(t, wp, "public_listener", ":"+rbacNet+","+tcpFilter)
	testutil.Until(t, 10*time.Second, "HTTP through web's now-opaque path", func() bool {
		a = call("http://" + hostPort(webBind) + "/")
		return a.err == nil && a.via == ""
	})
	if a.instance != "web-1" {
		t.Fatalf("HTTP through the TCP proxy: %+v", a)
	}

	// Permissive mode for db (protocol still from its meta).
	m.writePolicy("protocols.yaml", serviceDefaults("web", "tcp")+"---\n"+
		"apiVersion: meshlet.io/v1alpha1\nkind: ServiceDefaults\nmetadata:\n  name: db\nspec:\n  service: db\n  mtlsMode: permissive\n")
	l := waitChains(t, dp, "public_listener", "tls:"+rbacNet+","+tcpFilter, "raw_buffer:"+tcpFilter)
	if len(l.ListenerFilters) != 1 || l.ListenerFilters[0].Name != "envoy.filters.listener.tls_inspector" || !l.ContinueOnListenerFiltersTimeout || l.ListenerFiltersTimeout == "" {
		t.Fatalf("permissive listener: %+v; want tls_inspector with listener_filters_timeout and continue_on_listener_filters_timeout", l)
	}
	timeout, err := time.ParseDuration(l.ListenerFiltersTimeout)
	if err != nil {
		t.Fatal(err)
	}
	// A plaintext server-first client: greeting after the inspector's
	// timeout, from the plaintext chain.
	plain := greetingTimes(t, hostPort(dbSidecar), 5)
	t.Logf("permissive listener, plaintext MariaDB client (sends nothing first): greeting after median %v, max %v (listener_filters_timeout %v)",
		plain[2], plain[4], timeout)
	if plain[0] < timeout || plain[2] >= timeout+250*time.Millisecond || plain[4] >= time.Second {
		t.Fatalf("plaintext greeting in permissive mode after %v..%v (median %v); want just over listener_filters_timeout %v, all under 1s",
			plain[0], plain[4], plain[2], timeout)
	}
	if out := runProg(t, 30*time.Second, nil, client, mariaDBArgs(dbSidecar, "SELECT 'plaintext ok'")...); strings.TrimSpace(out) != "plaintext ok" {
		t.Fatalf("mariadb in plaintext to the permissive listener: %q", out)
	}
	// The mesh (mTLS) path is not delayed: the client's sidecar sends its
	// ClientHello first.
	viaMesh = greetingTimes(t, hostPort(dbBind), 10)
	t.Logf("permissive listener, through the mesh: median %v, max %v", viaMesh[5], viaMesh[9])
	if viaMesh[5] >= timeout {
		t.Fatalf("greeting through the mesh in permissive mode: median %v, as slow as the plaintext fallback", viaMesh[5])
	}
}

func isTimeout(err error) bool { return errors.Is(err, os.ErrDeadlineExceeded) }
