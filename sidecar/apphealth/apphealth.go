// Package apphealth serves an injected sidecar's health port (xds.PodHealthPort)
// in a Kubernetes pod: the sidecar's own readiness, and the application's
// liveness, readiness and startup probes, which the injection webhook
// rewrote to point here so that they keep working when the application's
// port only takes mTLS from other sidecars. Each rewritten probe is run
// against the application on loopback, as the pod spec declared it, when
// the kubelet asks; Istio's pilot-agent does the same on port 15020.
package apphealth

import (
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/meshlet/meshlet/xds"
)

// DefaultTimeout is a probe's timeout when the pod spec gives none
// (Kubernetes' timeoutSeconds default of 1 s).
const DefaultTimeout = time.Second

// AppHost is where the application is probed: loopback, since the sidecar
// shares the pod's network namespace and the probe must not go through
// the mesh.
const AppHost = "127.0.0.1"

// Handler serves xds.ReadyPath (200 when ready reports true, else 503) and
// the paths of probes: 200 when the application's probe passes; when it
// fails, the application's own HTTP status (an HTTP probe answered outside
// 200-399) or 503 with the reason in the body. Other paths are 404.
func Handler(ready func() bool, probes xds.AppProbes) http.Handler {
	h := &handler{ready: ready, probes: probes,
		client: &http.Client{
			Transport: &http.Transport{
				TLSClientConfig:   &tls.Config{InsecureSkipVerify: true}, // the kubelet does not verify HTTPS probes either
				DisableKeepAlives: true,
			},
			// The kubelet follows redirects; so does this client, which
			// stays on loopback for relative ones.
		}}
	return h
}

type handler struct {
	ready  func() bool
	probes xds.AppProbes
	client *http.Client
}

func (h *handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.URL.Path == xds.ReadyPath {
		if h.ready() {
			io.WriteString(w, "ready\n")
			return
		}
		http.Error(w, "not ready: no configuration from the control plane yet", http.StatusServiceUnavailable)
		return
	}
	p, ok := h.probes[r.URL.Path]
	if !ok {
		http.NotFound(w, r)
		return
	}
	timeout := DefaultTimeout
	if p.TimeoutSeconds > 0 {
		timeout = time.Duration(p.TimeoutSeconds) * time.Second
	}
	ctx, cancel := context.WithTimeout(r.Context(), timeout)
	defer cancel()
	code, err := h.run(ctx, p)
	if err != nil {
		http.Error(w, err.Error(), code)
		return
	}
	w.WriteHeader(code)
}

// run runs p and returns the status to answer and, when p failed, why.
func (h *handler) run(ctx context.Context, p xds.AppProbe) (int, error) {
	switch {
	case p.HTTPGet != nil:
		return h.httpGet(ctx, p.HTTPGet)
	case p.TCPSocket != nil:
		var d net.Dialer
		c, err := d.DialContext(ctx, "tcp", net.JoinHostPort(AppHost, strconv.Itoa(p.TCPSocket.Port)))
		if err != nil {
			return http.StatusServiceUnavailable, fmt.Errorf("apphealth: tcp probe: %w", err)
		}
		c.Close()
		return http.StatusOK, nil
	case p.GRPC != nil:
		return grpcCheck(ctx, p.GRPC)
	}
	return http.StatusInternalServerError, fmt.Errorf("apphealth: probe has no handler")
}

func (h *handler) httpGet(ctx context.Context, g *xds.HTTPGetProbe) (int, error) {
	scheme := "http"
	if g.Scheme == "HTTPS" {
		scheme = "https"
	}
	path := g.Path
	if path == "" || path[0] != '/' {
		path = "/" + path
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, scheme+"://"+net.JoinHostPort(AppHost, strconv.Itoa(g.Port))+path, nil)
	if err != nil {
		return http.StatusInternalServerError, fmt.Errorf("apphealth: http probe: %w", err)
	}
	req.Header.Set("User-Agent", "kube-probe/meshlet")
	for _, hd := range g.Headers {
		if http.CanonicalHeaderKey(hd.Name) == "Host" {
			req.Host = hd.Value
			continue
		}
		req.Header.Add(hd.Name, hd.Value)
	}
	if g.Host != "" {
		req.Host = g.Host
	}
	resp, err := h.client.Do(req)
	if err != nil {
		return http.StatusServiceUnavailable, fmt.Errorf("apphealth: http probe: %w", err)
	}
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 10<<10))
	resp.Body.Close()
	if resp.StatusCode >= 200 && resp.StatusCode < 400 {
		return http.StatusOK, nil
	}
	return resp.StatusCode, fmt.Errorf("apphealth: http probe: application answered %s", resp.Status)
}

func grpcCheck(ctx context.Context, g *xds.GRPCProbe) (int, error) {
	conn, err := grpc.NewClient(net.JoinHostPort(AppHost, strconv.Itoa(g.Port)), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return http.StatusInternalServerError, fmt.Errorf("apphealth: grpc probe: %w", err)
	}
	defer conn.Close()
	resp, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{Service: g.Service})
	if err != nil {
		return http.StatusServiceUnavailable, fmt.Errorf("apphealth: grpc probe: %w", err)
	}
	if resp.GetStatus() != healthpb.HealthCheckResponse_SERVING {
		return http.StatusServiceUnavailable, fmt.Errorf("apphealth: grpc probe: status %s", resp.GetStatus())
	}
	return http.StatusOK, nil
}
