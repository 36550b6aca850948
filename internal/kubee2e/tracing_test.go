package kubee2e

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/meshlet/meshlet/controlplane/traceview"
	"github.com/meshlet/meshlet/internal/meshkube"
	"github.com/meshlet/meshlet/internal/testutil"
	"github.com/meshlet/meshlet/sidecar/tracing"
)

// TestSpansOfBothSidecarsInClusterJaeger: with the dev overlay's
// components/jaeger, one request web → api (a sampled W3C trace that web
// forwards) arrives in the in-cluster Jaeger as one trace holding web's
// sidecar's spans (outbound, attempt) and api's sidecar's inbound span
// under the attempt, carrying web's SPIFFE ID; and `controlplane trace
// -jaeger-url http://meshlet-jaeger.meshlet-system.svc:16686` (the URL the
// README gives for a pod) prints it from the control plane's pod.
func TestSpansOfBothSidecarsInClusterJaeger(t *testing.T) {
	e := mesh(t)
	ctx := context.Background()
	intention(t, e, "web.shop", "api.shop")
	kubectl(t, e, "apply", "-k", filepath.Join(e.Root, "examples/kubernetes"))
	appReady(t, e, "shop", 3*time.Minute, "web", "api")
	queryURL, err := e.JaegerQueryURL(ctx, 2*time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	fwd, err := e.Forward(strings.TrimPrefix(queryURL, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	defer fwd.Close()

	web := pods(t, e, "shop", "app=web")[0]
	webURL := "http://" + net.JoinHostPort(web.Status.PodIP, "8080") + "/api"
	client := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{DialContext: e.Cluster.DialContext, DisableKeepAlives: true}}
	var traceID string
	testutil.Eventually(t, 60*time.Second, "web → api answers 200", func() error {
		var ids [24]byte
		_, _ = rand.Read(ids[:])
		id := hex.EncodeToString(ids[:16])
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, webURL, nil)
		req.Header.Set("traceparent", "00-"+id+"-"+hex.EncodeToString(ids[16:])+"-01")
		resp, err := client.Do(req)
		if err != nil {
			return err
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("%s: %s", resp.Status, b)
		}
		traceID = id
		return nil
	})

	wctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	tr, err := traceview.WaitTrace(wctx, "http://"+fwd.Addr, traceID, 3)
	if err != nil {
		t.Fatalf("trace %s in the in-cluster Jaeger: %v", traceID, err)
	}
	var rendered strings.Builder
	_ = traceview.Render(&rendered, tr)
	t.Logf("trace read back from the in-cluster Jaeger (%s):\n%s", queryURL, rendered.String())

	var outbound, attempt, inbound *traceview.Span
	for _, s := range tr.Spans {
		switch {
		case s.Service == "web.shop" && s.Kind == "client" && strings.HasPrefix(s.Operation, "attempt "):
			attempt = s
		case s.Service == "web.shop" && s.Kind == "client" && strings.HasPrefix(s.Operation, "outbound "):
			outbound = s
		case s.Service == "api.shop" && s.Kind == "server" && strings.HasPrefix(s.Operation, "inbound "):
			inbound = s
		}
	}
	switch {
	case outbound == nil || attempt == nil:
		t.Fatalf("no outbound span and attempt of web's sidecar in the trace")
	case inbound == nil:
		t.Fatalf("no inbound span of api's sidecar in the trace")
	case attempt.ParentID != outbound.SpanID:
		t.Errorf("web's attempt %s is not under its outbound span %s", attempt.SpanID, outbound.SpanID)
	case inbound.ParentID != attempt.SpanID:
		t.Errorf("api's inbound span has parent %s, want web's attempt %s: the trace context did not cross the hop", inbound.ParentID, attempt.SpanID)
	}
	if v, _ := inbound.Tag(string(tracing.AttrPeerSPIFFEID)); !strings.HasSuffix(fmt.Sprint(v), "/svc/web.shop") {
		t.Errorf("api's inbound span: %s = %v, want web's SPIFFE ID", tracing.AttrPeerSPIFFEID, v)
	}
	if v, _ := inbound.Tag("http.response.status_code"); fmt.Sprint(v) != "200" {
		t.Errorf("api's inbound span: status %v, want 200", v)
	}

	// The CLI, from inside the cluster, with the URL the README gives.
	inCluster := "http://" + meshkube.JaegerService + "." + meshkube.Namespace + ".svc:16686"
	out := kubectl(t, e, "-n", meshkube.Namespace, "exec", "deploy/"+meshkube.Deployment, "-c", "controlplane", "--",
		"controlplane", "trace", "-jaeger-url", inCluster, "-wait-spans", "3", traceID)
	if !strings.Contains(out, "trace "+tr.ID+":") || !strings.Contains(out, "services api.shop, web.shop") {
		t.Errorf("controlplane trace -jaeger-url %s %s printed:\n%s", inCluster, traceID, out)
	}
}
