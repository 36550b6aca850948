package httpproxy

import (
	"net"
	"net/http"
	"strings"

	"github.com/meshlet/meshlet/sidecar/config"
)

// routeTable is a RouteConfig prepared for matching, plus the listener's
// Via value. It is immutable; the server swaps whole tables.
type routeTable struct {
	name     string
	exact    map[string]*config.VirtualHost
	suffixes []wildcardHost // "*.example.com": suffix ".example.com", longest first
	prefixes []wildcardHost // "foo.*": prefix "foo.", longest first
	any      *config.VirtualHost
	via      string // received-by for the Via header, "" for none
}

type wildcardHost struct {
	part string
	vh   *config.VirtualHost
}

func newRouteTable(rc *config.RouteConfig, via string) *routeTable {
	t := &routeTable{exact: map[string]*config.VirtualHost{}, via: via}
	if rc == nil {
		return t
	}
	t.name = rc.Name
	for _, vh := range rc.VirtualHosts {
		for _, d := range vh.Domains {
			switch {
			case d == "*":
				t.any = vh
			case strings.HasPrefix(d, "*"):
				t.suffixes = insertByLength(t.suffixes, wildcardHost{d[1:], vh})
			case strings.HasSuffix(d, "*"):
				t.prefixes = insertByLength(t.prefixes, wildcardHost{d[:len(d)-1], vh})
			default:
				t.exact[d] = vh
			}
		}
	}
	return t
}

func insertByLength(list []wildcardHost, w wildcardHost) []wildcardHost {
	i := 0
	for i < len(list) && len(list[i].part) >= len(w.part) {
		i++
	}
	list = append(list, wildcardHost{})
	copy(list[i+1:], list[i:])
	list[i] = w
	return list
}

// virtualHost selects the virtual host for an authority, Envoy's order:
// exact, longest suffix wildcard, longest prefix wildcard, then "*". The
// port is ignored unless a domain names it.
func (t *routeTable) virtualHost(authority string) *config.VirtualHost {
	host := strings.ToLower(authority)
	if vh, ok := t.exact[host]; ok {
		return vh
	}
	if h, _, err := net.SplitHostPort(host); err == nil {
		host = h
		if vh, ok := t.exact[host]; ok {
			return vh
		}
	}
	for _, w := range t.suffixes {
		if strings.HasSuffix(host, w.part) && len(host) > len(w.part) {
			return w.vh
		}
	}
	for _, w := range t.prefixes {
		if strings.HasPrefix(host, w.part) && len(host) > len(w.part) {
			return w.vh
		}
	}
	return t.any
}

// route returns the first route of the matching virtual host whose path
// and header matches accept the request, or nil.
func (t *routeTable) route(r *http.Request) *config.Route {
	return t.routeFor(r.Host, r.URL.Path, r.Method, stdHeader(r.Header))
}

// headerLookup finds the first value of a request header by its canonical
// name (case-insensitively).
type headerLookup interface {
	lookup(name string) (string, bool)
}

// stdHeader is an http.Header as a headerLookup.
type stdHeader http.Header

func (h stdHeader) lookup(name string) (string, bool) {
	if vs := h[name]; len(vs) > 0 {
		return vs[0], true
	}
	return "", false
}

func (t *routeTable) routeFor(authority, path, method string, h headerLookup) *config.Route {
	vh := t.virtualHost(authority)
	if vh == nil {
		return nil
	}
	if i := strings.IndexByte(path, '?'); i >= 0 {
		path = path[:i]
	}
	var lower string
	for _, r := range vh.Routes {
		p := path
		if !r.CaseSensitive {
			if lower == "" {
				lower = strings.ToLower(path)
			}
			p = lower
		}
		switch r.Match {
		case config.MatchPrefix:
			if !strings.HasPrefix(p, r.Path) {
				continue
			}
		case config.MatchPath:
			if p != r.Path {
				continue
			}
		}
		if headersMatch(r.Headers, method, h) {
			return r
		}
	}
	return nil
}

// headersMatch applies RouteMatch.headers; ":method" reads the method.
func headersMatch(ms []config.HeaderMatch, method string, h headerLookup) bool {
	for _, m := range ms {
		var v string
		var present bool
		if m.Name == ":method" {
			v, present = method, true
		} else if h != nil {
			v, present = h.lookup(m.Name)
		}
		ok := present && (m.Present || v == m.Exact)
		if ok == m.Invert {
			return false
		}
	}
	return true
}
