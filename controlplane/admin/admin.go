// Package admin is the control plane's admin HTTP API, served on loopback
// by default (controlplane.Config.AdminAddress, flag -admin-addr):
//
//	GET /ready         200 "ready" once the first Consul catalog has arrived, else 503
//	                   "initializing: <what it waits for>"
//	GET /status        JSON server.Status: every proxy (registered in Consul or connected),
//	                   its versions sent, acknowledged and in its snapshot per type URL, and
//	                   every rejection (NACK) not yet followed by an ACK, with the
//	                   resources it blames and the policy documents and Consul entries
//	                   they were built from
//	GET /why?proxy=P&dst=IP:PORT
//	                   JSON explain.Report: the decisions for a connection from proxy P's
//	                   application (a proxy service ID or a pod name) to IP:PORT
//	GET /metrics       Prometheus metrics (text exposition format)
//	GET /debug/pprof/  Go profiles, only with Options.Pprof (flag -admin-pprof)
//
// It also holds the client side: Fetch reads /status, WriteText prints it
// for people, and StatusCommand is the `controlplane status` subcommand.
package admin

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/http/pprof"
	"net/netip"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/meshlet/meshlet/controlplane/explain"
	"github.com/meshlet/meshlet/controlplane/server"
)

// Source is what the admin endpoints show; *server.Server implements it.
type Source interface {
	// Ready reports whether the control plane serves snapshots and, if
	// not, what it still waits for.
	Ready() (bool, string)
	// Status describes every proxy and every unresolved rejection now.
	Status() *server.Status
	// Why explains a connection from a proxy's application to an address
	// (server.Server.Why).
	Why(proxy string, dst netip.AddrPort, o explain.Options) (*explain.Report, error)
}

var _ Source = (*server.Server)(nil)

// Options are the optional admin endpoints.
type Options struct {
	// Pprof serves net/http/pprof under /debug/pprof/ (CPU and heap
	// profiles, goroutine dumps); off by default, as profiles expose
	// internals.
	Pprof bool
	// Explain is what /why needs that the catalog does not say (the
	// Kubernetes API server's address).
	Explain explain.Options
}

// Handler returns the admin endpoints for src, with the metrics gathered
// from g: /ready, /status, /metrics, and /debug/pprof/ with o.Pprof.
func Handler(src Source, g prometheus.Gatherer, o Options) http.Handler {
	mux := http.NewServeMux()
	if o.Pprof {
		mux.HandleFunc("GET /debug/pprof/", pprof.Index)
		mux.HandleFunc("GET /debug/pprof/cmdline", pprof.Cmdline)
		mux.HandleFunc("GET /debug/pprof/profile", pprof.Profile)
		mux.HandleFunc("GET /debug/pprof/symbol", pprof.Symbol)
		mux.HandleFunc("GET /debug/pprof/trace", pprof.Trace)
	}
	mux.Handle("GET /metrics", promhttp.HandlerFor(g, promhttp.HandlerOpts{}))
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
	mux.HandleFunc("GET /why", func(w http.ResponseWriter, r *http.Request) {
		dst, err := netip.ParseAddrPort(r.URL.Query().Get("dst"))
		if err != nil {
			http.Error(w, fmt.Sprintf("dst: want ip:port (%v)", err), http.StatusBadRequest)
			return
		}
		rep, err := src.Why(r.URL.Query().Get("proxy"), dst, o.Explain)
		switch {
		case errors.Is(err, explain.ErrUnknownProxy):
			http.Error(w, err.Error(), http.StatusNotFound)
			return
		case errors.Is(err, server.ErrNoCatalog):
			http.Error(w, err.Error(), http.StatusServiceUnavailable)
			return
		case err != nil:
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		_ = enc.Encode(rep)
	})
	mux.HandleFunc("GET /status", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		_ = enc.Encode(src.Status())
	})
	return mux
}
