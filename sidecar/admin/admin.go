// Package admin serves the sidecar's admin endpoints, on loopback by
// default:
//
//	GET /ready        200 "ready" once the first config is active, else 503 with what it waits for
//	GET /config_dump  accepted xDS resources as JSON: Envoy's admin ConfigDump ("configs") plus
//	                  the xDS stream state and the last rejected update per type ("xds")
//	GET /listeners    one line per active listener: name::address (Envoy's /listeners format);
//	                  ?format=json: Envoy's listener_statuses (name, local_address), plus a
//	                  capture listener's filter chains and how each is matched
//	                  ("filter_chains", the default chain last with "default": true)
//	GET /clusters     Envoy's /clusters format: per cluster cluster::upstream_rq_active::N,
//	                  ::upstream_rq_pending_active::N, ::upstream_cx_active::N; per endpoint
//	                  cluster::address::weight::N, ::rq_active::N,
//	                  ::health_flags::healthy|/failed_outlier_check, ::breaker::state
//	GET /certs        every certificate of the SDS secrets: subject, SPIFFE ID, serial,
//	                  validity, seconds and days until expiration (never a key)
//	GET /metrics      Prometheus metrics
package admin

import (
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/http/pprof"
	"slices"
	"strconv"
	"time"

	adminv3 "github.com/envoyproxy/go-control-plane/envoy/admin/v3"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/meshlet/meshlet/sidecar/config"
	"google.golang.org/protobuf/encoding/protojson"
)

// Source is what the admin endpoints show; the sidecar implements it.
type Source interface {
	// Ready reports whether the first config is active and, if not, what
	// is still awaited.
	Ready() (bool, string)
	// ConfigDump returns the accepted resources and the xDS state.
	ConfigDump() *ConfigDump
	// Listeners returns the active listeners sorted by name.
	Listeners() []Listener
	// Clusters returns the active clusters sorted by name.
	Clusters() []Cluster
	// Certs describes every certificate of every SDS secret (never keys).
	Certs() []config.CertInfo
}

// ConfigDump is the body of /config_dump.
type ConfigDump struct {
	// Envoy holds ListenersConfigDump, RoutesConfigDump,
	// ClustersConfigDump and EndpointsConfigDump, Envoy's shapes.
	Envoy *adminv3.ConfigDump
	// XDS is the ADS stream state.
	XDS XDSState
}

// XDSState describes the ADS stream for /config_dump.
type XDSState struct {
	Server    string            `json:"server"`
	Node      string            `json:"node"`
	Connected bool              `json:"connected"`
	Versions  map[string]string `json:"versions"` // last accepted version by type URL
	ACKs      uint64            `json:"acks"`
	NACKs     uint64            `json:"nacks"`
	// Rejected holds the last rejected update per type URL.
	Rejected map[string]Rejection `json:"rejected,omitempty"`
}

// Rejection is a NACKed update.
type Rejection struct {
	Version string    `json:"version"`
	Time    time.Time `json:"time"`
	Error   string    `json:"error"`
}

// Listener is one active listener.
type Listener struct {
	Name    string
	Address string
	// Chains are a capture listener's filter chains in order, then its
	// default chain; nil for another listener.
	Chains []Chain
}

// Chain is one filter chain of a capture listener and what it matches of
// a connection's original destination.
type Chain struct {
	Name string `json:"name,omitempty"`
	// DestinationPort is filter_chain_match.destination_port, 0 for any.
	DestinationPort int `json:"destination_port,omitempty"`
	// PrefixRanges are filter_chain_match.prefix_ranges as CIDRs; none
	// matches any address.
	PrefixRanges []string `json:"prefix_ranges,omitempty"`
	// TransportProtocol is filter_chain_match.transport_protocol.
	TransportProtocol string `json:"transport_protocol,omitempty"`
	// Default marks the default_filter_chain.
	Default bool `json:"default,omitempty"`
}

// Cluster is one active cluster and its endpoints.
type Cluster struct {
	Name      string
	Endpoints []Endpoint
	// Requests, Pending and Connections are in flight now.
	Requests, Pending, Connections int64
}

// Endpoint is one endpoint of a Cluster.
type Endpoint struct {
	Address string
	Weight  uint32
	Active  int64  // requests in flight
	Ejected bool   // out of rotation by outlier detection
	Breaker string // endpoint breaker state, "" without one
}

// Options are the optional admin endpoints.
type Options struct {
	// Pprof serves net/http/pprof under /debug/pprof/ (CPU and heap
	// profiles, goroutine dumps); off by default, as profiles expose
	// internals.
	Pprof bool
}

// Handler returns the admin endpoints for src, with the metrics of reg:
// /ready, /config_dump, /certs, /listeners, /clusters, /metrics, and
// /debug/pprof/ with o.Pprof.
func Handler(src Source, reg *prometheus.Registry, o Options) http.Handler {
	mux := http.NewServeMux()
	if o.Pprof {
		mux.HandleFunc("GET /debug/pprof/", pprof.Index)
		mux.HandleFunc("GET /debug/pprof/cmdline", pprof.Cmdline)
		mux.HandleFunc("GET /debug/pprof/profile", pprof.Profile)
		mux.HandleFunc("GET /debug/pprof/symbol", pprof.Symbol)
		mux.HandleFunc("GET /debug/pprof/trace", pprof.Trace)
	}
	mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	mux.HandleFunc("GET /ready", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		ok, why := src.Ready()
		if !ok {
			w.WriteHeader(http.StatusServiceUnavailable)
			fmt.Fprintf(w, "initializing: %s\n", why)
			return
		}
		fmt.Fprintln(w, "ready")
	})
	mux.HandleFunc("GET /config_dump", func(w http.ResponseWriter, _ *http.Request) {
		d := src.ConfigDump()
		envoy, err := protojson.MarshalOptions{Multiline: false}.Marshal(d.Envoy)
		if err != nil {
			http.Error(w, "admin: marshal config dump: "+err.Error(), http.StatusInternalServerError)
			return
		}
		var configs struct {
			Configs json.RawMessage `json:"configs"`
		}
		if err := json.Unmarshal(envoy, &configs); err != nil {
			http.Error(w, "admin: "+err.Error(), http.StatusInternalServerError)
			return
		}
		if configs.Configs == nil {
			configs.Configs = json.RawMessage("[]")
		}
		w.Header().Set("Content-Type", "application/json")
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		_ = enc.Encode(struct {
			Configs json.RawMessage `json:"configs"`
			XDS     XDSState        `json:"xds"`
		}{configs.Configs, d.XDS})
	})
	mux.HandleFunc("GET /certs", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		certs := src.Certs()
		if certs == nil {
			certs = []config.CertInfo{}
		}
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		_ = enc.Encode(struct {
			Certificates []config.CertInfo `json:"certificates"`
		}{certs})
	})
	mux.HandleFunc("GET /listeners", func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Query().Get("format") == "json" {
			writeListenersJSON(w, src.Listeners())
			return
		}
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		for _, l := range src.Listeners() {
			fmt.Fprintf(w, "%s::%s\n", l.Name, l.Address)
		}
	})
	mux.HandleFunc("GET /clusters", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		for _, c := range src.Clusters() {
			fmt.Fprintf(w, "%s::upstream_rq_active::%d\n%s::upstream_rq_pending_active::%d\n%s::upstream_cx_active::%d\n",
				c.Name, c.Requests, c.Name, c.Pending, c.Name, c.Connections)
			eps := slices.Clone(c.Endpoints)
			for _, e := range eps {
				health := "healthy"
				if e.Ejected {
					health = "/failed_outlier_check"
				}
				fmt.Fprintf(w, "%s::%s::weight::%d\n", c.Name, e.Address, e.Weight)
				fmt.Fprintf(w, "%s::%s::rq_active::%d\n", c.Name, e.Address, e.Active)
				fmt.Fprintf(w, "%s::%s::health_flags::%s\n", c.Name, e.Address, health)
				if e.Breaker != "" {
					fmt.Fprintf(w, "%s::%s::breaker::%s\n", c.Name, e.Address, e.Breaker)
				}
			}
			if len(eps) == 0 {
				fmt.Fprintf(w, "%s::no_endpoints\n", c.Name)
			}
		}
	})
	return mux
}

// writeListenersJSON writes Envoy's /listeners?format=json shape
// (listener_statuses with name and local_address) with meshlet's
// filter_chains of capture listeners.
func writeListenersJSON(w http.ResponseWriter, listeners []Listener) {
	type socketAddress struct {
		Address   string `json:"address"`
		PortValue int    `json:"port_value"`
	}
	type status struct {
		Name         string `json:"name"`
		LocalAddress struct {
			SocketAddress socketAddress `json:"socket_address"`
		} `json:"local_address"`
		FilterChains []Chain `json:"filter_chains,omitempty"`
	}
	out := struct {
		ListenerStatuses []status `json:"listener_statuses"`
	}{ListenerStatuses: []status{}}
	for _, l := range listeners {
		st := status{Name: l.Name, FilterChains: l.Chains}
		if host, port, err := net.SplitHostPort(l.Address); err == nil {
			st.LocalAddress.SocketAddress.Address = host
			st.LocalAddress.SocketAddress.PortValue, _ = strconv.Atoi(port)
		}
		out.ListenerStatuses = append(out.ListenerStatuses, st)
	}
	w.Header().Set("Content-Type", "application/json")
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(out)
}
