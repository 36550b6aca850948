// Command web is the demo's HTTP frontend. It reaches its upstreams only
// through its sidecar's outbound listeners: api over HTTP at -api-url and
// store over TCP at -store-addr.
//
//	GET /api     calls api GET /hello; answers {"route":"api","instance":"api-2",...}
//	GET /store   SET then GET a key on store; answers {"route":"store","value":"..."}
//	GET /health  200 "ok"
//
// Upstream failures answer 502 with the error, so the demo can count them.
// Trace context headers (W3C traceparent/tracestate, B3) of a request are
// copied onto the calls it makes, as a mesh asks of every application, so
// the sidecars' spans of all hops join one trace.
package main

import (
	"bufio"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync/atomic"
	"time"
)

func main() {
	addr := flag.String("addr", "127.0.0.1:9000", "listen address")
	apiURL := flag.String("api-url", "http://127.0.0.1:9191", "api upstream: the sidecar's outbound listener for api")
	storeAddr := flag.String("store-addr", "127.0.0.1:9192", "store upstream: the sidecar's outbound listener for store")
	flag.Parse()
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	client := &http.Client{Timeout: 5 * time.Second}
	var seq atomic.Int64

	mux := http.NewServeMux()
	mux.HandleFunc("GET /api", func(w http.ResponseWriter, r *http.Request) {
		req, _ := http.NewRequestWithContext(r.Context(), http.MethodGet, *apiURL+"/hello", nil)
		forwardTraceHeaders(r.Header, req.Header)
		resp, err := client.Do(req)
		if err != nil {
			writeJSON(w, http.StatusBadGateway, map[string]string{"route": "api", "error": err.Error()})
			return
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		if resp.StatusCode != http.StatusOK {
			writeJSON(w, http.StatusBadGateway, map[string]string{"route": "api", "error": fmt.Sprintf("api answered %s: %s (x-meshlet-reason: %s)",
				resp.Status, strings.TrimSpace(string(body)), resp.Header.Get("X-Meshlet-Reason"))})
			return
		}
		var hello map[string]string
		if err := json.Unmarshal(body, &hello); err != nil {
			writeJSON(w, http.StatusBadGateway, map[string]string{"route": "api", "error": "bad JSON from api: " + err.Error()})
			return
		}
		writeJSON(w, http.StatusOK, map[string]string{"route": "api", "instance": hello["instance"], "message": hello["message"],
			"via": hello["via"], "caller": hello["caller"]})
	})
	mux.HandleFunc("GET /store", func(w http.ResponseWriter, r *http.Request) {
		key := "k" + strconv.FormatInt(seq.Add(1), 10)
		val := "v" + strconv.FormatInt(time.Now().UnixNano(), 36)
		got, instance, err := setGet(*storeAddr, key, val)
		if err != nil {
			writeJSON(w, http.StatusBadGateway, map[string]string{"route": "store", "error": err.Error()})
			return
		}
		if got != val {
			writeJSON(w, http.StatusBadGateway, map[string]string{"route": "store", "error": fmt.Sprintf("GET %s = %q, want %q", key, got, val)})
			return
		}
		writeJSON(w, http.StatusOK, map[string]string{"route": "store", "instance": instance, "key": key, "value": got})
	})
	mux.HandleFunc("GET /health", func(w http.ResponseWriter, _ *http.Request) { w.Write([]byte("ok\n")) })

	log.Info("web: listening", "addr", *addr, "api", *apiURL, "store", *storeAddr)
	srv := &http.Server{Addr: *addr, Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	if err := srv.ListenAndServe(); err != nil {
		log.Error("web: serve", "error", err)
		os.Exit(1)
	}
}

// setGet stores key=val on the store service, reads it back and asks which
// instance answered, over one TCP connection through the sidecar.
func setGet(addr, key, val string) (value, instance string, err error) {
	conn, err := net.DialTimeout("tcp", addr, 2*time.Second)
	if err != nil {
		return "", "", err
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := fmt.Fprintf(conn, "SET %s %s\nGET %s\nWHO\n", key, val, key); err != nil {
		return "", "", err
	}
	r := bufio.NewReader(conn)
	answer := func(cmd, prefix string) (string, error) {
		line, err := r.ReadString('\n')
		if err != nil {
			return "", fmt.Errorf("store: reading %s answer: %w", cmd, err)
		}
		v, ok := strings.CutPrefix(strings.TrimSpace(line), prefix)
		if !ok {
			return "", fmt.Errorf("store: %s answered %q", cmd, strings.TrimSpace(line))
		}
		return v, nil
	}
	if _, err := answer("SET", "OK"); err != nil {
		return "", "", err
	}
	if value, err = answer("GET", "VALUE "); err != nil {
		return "", "", err
	}
	if instance, err = answer("WHO", "ID "); err != nil {
		return "", "", err
	}
	return value, instance, nil
}

// traceHeaders are the trace context headers an application forwards:
// W3C Trace Context and Zipkin B3 (single and multi header).
var traceHeaders = []string{"Traceparent", "Tracestate", "B3", "X-B3-Traceid", "X-B3-Spanid", "X-B3-Parentspanid", "X-B3-Sampled", "X-B3-Flags"}

func forwardTraceHeaders(from, to http.Header) {
	for _, k := range traceHeaders {
		if v := from.Values(k); len(v) > 0 {
			to[k] = v
		}
	}
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}
