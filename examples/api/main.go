// Command api is the demo's HTTP/JSON service. Each instance answers with its
// own ID so the demo can show which instance served a request.
//
//	GET /hello   {"service":"api","instance":"api-1","message":"hello from api-1",
//	             "caller":"spiffe://<trust-domain>/ns/default/dc/dc1/svc/web"}
//	             (503 for a share of requests with -fail-rate, to play a flaky instance)
//	GET /health  200 "ok", or 503 "draining" once SIGTERM was received
//
// On SIGTERM it fails its health check first, keeps serving for -drain (so
// Consul marks it critical and the mesh stops sending it traffic), then shuts
// down gracefully: the way a pod leaves a Kubernetes service.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"log/slog"
	"math/rand/v2"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"sync/atomic"
	"syscall"
	"time"
)

// callerID returns the URI (the caller's SPIFFE ID) of the
// x-forwarded-client-cert header its sidecar sets, "" without one.
func callerID(xfcc string) string {
	for part := range strings.SplitSeq(xfcc, ";") {
		if v, ok := strings.CutPrefix(part, "URI="); ok {
			return v
		}
	}
	return ""
}

func main() {
	addr := flag.String("addr", "127.0.0.1:9001", "listen address")
	id := flag.String("id", "api-1", "instance ID reported in answers")
	drain := flag.Duration("drain", 3*time.Second, "after SIGTERM, how long to keep serving with a failing health check")
	failRate := flag.Float64("fail-rate", 0, "share of /hello requests answered 503 on purpose (0-1)")
	flag.Parse()
	log := slog.New(slog.NewTextHandler(os.Stderr, nil)).With("instance", *id)

	var draining atomic.Bool
	var served, failed atomic.Int64
	mux := http.NewServeMux()
	mux.HandleFunc("GET /hello", func(w http.ResponseWriter, r *http.Request) {
		if rand.Float64() < *failRate {
			failed.Add(1)
			http.Error(w, *id+": failing on purpose", http.StatusServiceUnavailable)
			return
		}
		served.Add(1)
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(map[string]string{
			"service":  "api",
			"instance": *id,
			"message":  "hello from " + *id,
			"via":      strings.Join(r.Header.Values("Via"), ", "),
			"caller":   callerID(r.Header.Get("X-Forwarded-Client-Cert")),
		})
	})
	mux.HandleFunc("GET /health", func(w http.ResponseWriter, _ *http.Request) {
		if draining.Load() {
			http.Error(w, "draining", http.StatusServiceUnavailable)
			return
		}
		w.Write([]byte("ok\n"))
	})
	srv := &http.Server{Addr: *addr, Handler: mux, ReadHeaderTimeout: 10 * time.Second}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	go func() {
		<-ctx.Done()
		log.Info("api: SIGTERM: failing health checks, draining", "drain", *drain)
		draining.Store(true)
		time.Sleep(*drain)
		sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_ = srv.Shutdown(sctx)
	}()
	log.Info("api: listening", "addr", *addr)
	if err := srv.ListenAndServe(); err != http.ErrServerClosed {
		log.Error("api: serve", "error", err)
		os.Exit(1)
	}
	log.Info("api: stopped", "served", served.Load(), "failedOnPurpose", failed.Load())
}
