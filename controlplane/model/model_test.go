package model

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"reflect"
	"slices"
	"testing"
)

// mutate changes field i of the struct v points at to a different value.
func mutate(t *testing.T, v reflect.Value, i int) {
	t.Helper()
	f := v.Elem().Field(i)
	switch f.Kind() {
	case reflect.String:
		f.SetString(f.String() + "x")
	case reflect.Int:
		f.SetInt(f.Int() + 1)
	case reflect.Bool:
		f.SetBool(!f.Bool())
	case reflect.Map:
		m := reflect.MakeMap(f.Type())
		m.SetMapIndex(reflect.ValueOf("k"), reflect.ValueOf("v"))
		f.Set(m)
	case reflect.Slice:
		f.Set(reflect.Append(f, reflect.New(f.Type().Elem()).Elem()))
	case reflect.Struct:
		switch f.Type() {
		case reflect.TypeFor[netip.AddrPort]():
			f.Set(reflect.ValueOf(netip.MustParseAddrPort("10.96.0.1:80")))
		case reflect.TypeFor[Exclusions]():
			f.Set(reflect.ValueOf(Exclusions{UIDs: []int{1000}}))
		case reflect.TypeFor[PodRef]():
			f.Set(reflect.ValueOf(PodRef{Namespace: "shop", Name: "web-0", UID: "u1"}))
		default:
			t.Fatalf("field %s of type %s: teach mutate", v.Elem().Type().Field(i).Name, f.Type())
		}
	default:
		t.Fatalf("field %s of kind %s: teach mutate", v.Elem().Type().Field(i).Name, f.Kind())
	}
}

// TestEqualCoversEveryField guards the Consul watcher's reuse of unchanged
// values: a field Equal ignores would let a changed proxy or instance keep
// its old value, and the build loop would not rebuild its sidecars.
func TestEqualCoversEveryField(t *testing.T) {
	proxy := func() *Proxy {
		return &Proxy{ID: "p", Node: "n", Datacenter: "dc1", Service: "web", ServiceID: "web-1", Address: "10.0.0.1", Port: 21000,
			ListenAddress: "0.0.0.0", ListenPort: 21001, LocalAppAddress: "127.0.0.1", LocalAppPort: 8080,
			Upstreams: []Upstream{{Service: "api", BindAddress: "127.0.0.1", BindPort: 9191}}, Weight: 1, Healthy: true}
	}
	for i := range reflect.TypeFor[Proxy]().NumField() {
		a, b := proxy(), proxy()
		if !a.Equal(b) {
			t.Fatal("equal proxies are not Equal")
		}
		mutate(t, reflect.ValueOf(b), i)
		if a.Equal(b) {
			t.Errorf("Proxy.Equal ignores field %s", reflect.TypeFor[Proxy]().Field(i).Name)
		}
	}
	instance := func() *Instance {
		return &Instance{ID: "i", Node: "n", Datacenter: "dc1", Address: "10.0.0.1", Port: 8080, Meta: map[string]string{"a": "b"}, Weight: 1, Healthy: true}
	}
	for i := range reflect.TypeFor[Instance]().NumField() {
		a, b := instance(), instance()
		mutate(t, reflect.ValueOf(b), i)
		if a.Equal(*b) {
			t.Errorf("Instance.Equal ignores field %s", reflect.TypeFor[Instance]().Field(i).Name)
		}
	}
	service := func() *Service { return &Service{Name: "api", Protocol: "http", Instances: []Instance{*instance()}} }
	for i := range reflect.TypeFor[Service]().NumField() {
		a, b := service(), service()
		mutate(t, reflect.ValueOf(b), i)
		if a.Equal(b) {
			t.Errorf("Service.Equal ignores field %s", reflect.TypeFor[Service]().Field(i).Name)
		}
	}
}

// randomCatalog returns a catalog of n services, each with one proxy whose
// upstreams are up to three other services (sometimes its own, sometimes
// twice the same, sometimes one with no proxy), leaves and intentions for
// some.
func randomCatalog(rng *rand.Rand, n int) *Catalog {
	services := map[string]*Service{}
	proxies := map[string]*Proxy{}
	for i := range n {
		name := fmt.Sprintf("s%d", i)
		if rng.IntN(5) > 0 {
			services[name] = &Service{Name: name}
		}
		if rng.IntN(4) == 0 {
			continue // a service without a proxy
		}
		p := &Proxy{ID: name + "-proxy", Service: name}
		for range rng.IntN(4) {
			p.Upstreams = append(p.Upstreams, Upstream{Service: fmt.Sprintf("s%d", rng.IntN(n+2))})
		}
		proxies[p.ID] = p
	}
	c := NewCatalog(services, proxies)
	c.CA = &CA{TrustDomain: "td"}
	for i := range n {
		name := fmt.Sprintf("s%d", i)
		if rng.IntN(3) > 0 {
			c.Leaves[name] = &Leaf{Service: name}
		}
		if rng.IntN(3) == 0 {
			c.Intentions[name] = &Intentions{Destination: name}
		}
	}
	return c
}

// change returns a copy of c (sharing values) with one thing replaced by a
// new value: a service, a proxy, a leaf, an intention, the CA, or one of
// them removed.
func change(rng *rand.Rand, c *Catalog) *Catalog {
	services := map[string]*Service{}
	for k, v := range c.Services {
		services[k] = v
	}
	proxies := map[string]*Proxy{}
	for k, v := range c.Proxies {
		proxies[k] = v
	}
	leaves := map[string]*Leaf{}
	for k, v := range c.Leaves {
		leaves[k] = v
	}
	intentions := map[string]*Intentions{}
	for k, v := range c.Intentions {
		intentions[k] = v
	}
	name := fmt.Sprintf("s%d", rng.IntN(len(c.Services)+3))
	ca := c.CA
	switch rng.IntN(9) {
	case 0:
		services[name] = &Service{Name: name}
	case 1:
		delete(services, name)
	case 2:
		if p := proxies[name+"-proxy"]; p != nil {
			cp := *p
			cp.Healthy = !cp.Healthy
			proxies[cp.ID] = &cp
		}
	case 3:
		delete(proxies, name+"-proxy")
	case 4:
		proxies[name+"-proxy2"] = &Proxy{ID: name + "-proxy2", Service: name}
	case 5:
		leaves[name] = &Leaf{Service: name}
	case 6:
		delete(leaves, name)
	case 7:
		intentions[name] = &Intentions{Destination: name}
	case 8:
		ca = &CA{TrustDomain: "td"}
	}
	out := NewCatalog(services, proxies)
	out.CA, out.Leaves, out.Intentions = ca, leaves, intentions
	return out
}

func TestIsScopeOfAgreesWithScopeSame(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	changed, kept := 0, 0
	for range 200 {
		old := randomCatalog(rng, 8)
		cur := change(rng, old)
		for _, p := range old.Proxies {
			scope := old.Scope(p)
			if !scope.IsScopeOf(old, p) || !scope.Same(old.Scope(p)) {
				t.Fatalf("a scope is not the scope of its own catalog (proxy %s)", p.ID)
			}
			q := cur.Proxies[p.ID]
			if q == nil {
				continue
			}
			want := scope.Same(cur.Scope(q))
			if got := scope.IsScopeOf(cur, q); got != want {
				t.Fatalf("IsScopeOf = %v, Scope().Same() = %v for proxy %+v", got, want, q)
			}
			if want {
				kept++
			} else {
				changed++
			}
		}
	}
	if changed == 0 || kept == 0 {
		t.Fatalf("the random changes exercise one outcome only (changed %d, kept %d)", changed, kept)
	}
}

// TestScopeHoldsWhatTranslateReads pins the content of a scope; the
// translate package checks that it builds the same resources from it.
func TestScopeHoldsWhatTranslateReads(t *testing.T) {
	api1 := &Proxy{ID: "api-1", Service: "api"}
	api2 := &Proxy{ID: "api-2", Service: "api"}
	web := &Proxy{ID: "web-1", Service: "web", Upstreams: []Upstream{{Service: "api"}, {Service: "db"}, {Service: "api"}}}
	c := NewCatalog(map[string]*Service{"api": {Name: "api"}, "web": {Name: "web"}, "db": {Name: "db"}, "other": {Name: "other"}},
		map[string]*Proxy{"api-1": api1, "api-2": api2, "web-1": web})
	c.CA = &CA{TrustDomain: "td"}
	for _, s := range []string{"api", "web", "other"} {
		c.Leaves[s] = &Leaf{Service: s}
		c.Intentions[s] = &Intentions{Destination: s}
	}
	s := c.Scope(web)
	if len(s.Services) != 3 || s.Services["other"] != nil || s.Services["db"] != c.Services["db"] {
		t.Errorf("services = %v, want web, api, db", s.Services)
	}
	if len(s.Leaves) != 2 || s.Leaves["web"] != c.Leaves["web"] || s.Leaves["api"] != c.Leaves["api"] {
		t.Errorf("leaves = %v, want web and api", s.Leaves)
	}
	if len(s.Intentions) != 1 || s.Intentions["web"] != c.Intentions["web"] {
		t.Errorf("intentions = %v, want web's only", s.Intentions)
	}
	if got := s.ProxiesFor("api"); len(got) != 2 || got[0] != api1 || got[1] != api2 {
		t.Errorf("ProxiesFor(api) = %v", got)
	}
	if len(s.Proxies) != 1 || s.Proxies["web-1"] != web || s.CA != c.CA {
		t.Errorf("proxies = %v, CA %v", s.Proxies, s.CA)
	}
}

// TestUpstreamNamesOfATransparentProxy: services with a virtual address
// and headless services with sidecars, not a headless service without
// one, nor a service without instances; a direct-mode proxy has its
// explicit upstreams only.
func TestUpstreamNamesOfATransparentProxy(t *testing.T) {
	web := &Proxy{ID: "web-1", Service: "web", Mode: ModeTransparent, Upstreams: []Upstream{{Service: "store"}}}
	db0 := &Proxy{ID: "db-0", Service: "db", ServiceID: "db-0-db", Mode: ModeTransparent}
	c := NewCatalog(map[string]*Service{
		"api":   {Name: "api", Instances: []Instance{{ID: "api-1", Virtual: netip.MustParseAddrPort("10.96.0.20:80")}}},
		"db":    {Name: "db", Instances: []Instance{{ID: "db-0-db", Address: "10.244.0.12", Port: 7000}}},
		"batch": {Name: "batch", Instances: []Instance{{ID: "batch-1", Address: "10.244.0.11"}}},
		"empty": {Name: "empty"},
		"store": {Name: "store"},
	}, map[string]*Proxy{"web-1": web, "db-0": db0})
	if !c.Services["db"].Headless() || c.Services["api"].Headless() || c.Services["empty"].Headless() {
		t.Error("Headless: want db only")
	}
	if got, want := c.UpstreamNames(web), []string{"store", "api", "db"}; !slices.Equal(got, want) {
		t.Errorf("transparent: UpstreamNames = %v, want %v", got, want)
	}
	web.Mode = ModeDirect
	if got, want := c.UpstreamNames(web), []string{"store"}; !slices.Equal(got, want) {
		t.Errorf("direct: UpstreamNames = %v, want %v", got, want)
	}
}
