package kube

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	admissionv1 "k8s.io/api/admission/v1"
	admissionregistrationv1 "k8s.io/api/admissionregistration/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"

	"github.com/meshlet/meshlet/controlplane/inject"
	"github.com/meshlet/meshlet/internal/testlog"
	"github.com/meshlet/meshlet/internal/testutil"
)

// TestRunLeaderTermAfterTerm: the lease taken by another holder ends the
// term (its context is cancelled); when this replica leads again, a new
// term starts — but only once the previous one has returned — and the
// loop stops with its context, releasing the lease.
func TestRunLeaderTermAfterTerm(t *testing.T) {
	client := fake.NewClientset()
	optimisticConcurrency(client, "leases")
	le := leaderElection{client: client, namespace: "meshlet-system", name: DefaultLeaseName, identity: "me",
		timing: leaderTiming{lease: time.Second, renew: 500 * time.Millisecond, retry: 100 * time.Millisecond}}
	log, _ := testlog.New(t, "leader")
	terms := make(chan context.Context, 2)
	release := make(chan struct{})
	var active, most atomic.Int32
	term := func(ctx context.Context) {
		if n := active.Add(1); n > most.Load() {
			most.Store(n)
		}
		defer active.Add(-1)
		terms <- ctx
		<-ctx.Done()
		<-release // the test holds the first term after it ended
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		runLeader(ctx, le, log, term)
	}()
	var released atomic.Bool
	unblock := func() {
		if released.CompareAndSwap(false, true) {
			close(release)
		}
	}
	t.Cleanup(func() {
		unblock()
		cancel()
		<-done
	})
	holder := func() string {
		l, err := client.CoordinationV1().Leases(le.namespace).Get(context.Background(), le.name, metav1.GetOptions{})
		if err != nil || l.Spec.HolderIdentity == nil {
			return ""
		}
		return *l.Spec.HolderIdentity
	}

	first := <-terms
	if h := holder(); h != "me" {
		t.Fatalf("lease held by %q in the first term", h)
	}
	// Another holder takes the lease (for one second).
	l, err := client.CoordinationV1().Leases(le.namespace).Get(ctx, le.name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	intruder, now := "intruder", metav1.NewMicroTime(time.Now())
	l.Spec.HolderIdentity, l.Spec.RenewTime, l.Spec.AcquireTime, l.Spec.LeaseDurationSeconds = &intruder, &now, &now, ptrTo(int32(1))
	if _, err := client.CoordinationV1().Leases(le.namespace).Update(ctx, l, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	testutil.Until(t, 10*time.Second, "the first term ends", func() bool { return first.Err() != nil })
	// The intruder does not renew: this replica leads again, but the
	// next term waits for the first to return.
	testutil.Until(t, 10*time.Second, "leading again", func() bool { return holder() == "me" })
	select {
	case <-terms:
		t.Fatal("a second term started while the first was still running")
	default:
	}
	unblock()
	var second context.Context
	testutil.Until(t, 10*time.Second, "the second term starts", func() bool {
		select {
		case second = <-terms:
			return true
		default:
			return false
		}
	})
	if second.Err() != nil || most.Load() != 1 {
		t.Errorf("second term: ctx err %v, at most %d terms at once", second.Err(), most.Load())
	}
	cancel()
	<-done
	if second.Err() == nil {
		t.Error("the term outlived runLeader")
	}
	if h := holder(); h != "" {
		t.Errorf("lease still held by %q after runLeader returned", h)
	}
}

// optimisticConcurrency makes the fake API server keep resourceVersions
// of resource and refuse an update of a stale one (409 Conflict), as the
// real one does: the leader elector renews optimistically, and would
// otherwise overwrite a lease another holder took.
func optimisticConcurrency(client *fake.Clientset, resource string) {
	var mu sync.Mutex // serializes the compare and the write
	next := 0
	client.PrependReactor("*", resource, func(a k8stesting.Action) (bool, runtime.Object, error) {
		// CreateAction and UpdateAction have the same method set: tell
		// them apart by verb.
		wa, ok := a.(interface{ GetObject() runtime.Object })
		if !ok || a.GetVerb() != "create" && a.GetVerb() != "update" {
			return false, nil, nil
		}
		obj := wa.GetObject()
		mu.Lock()
		defer mu.Unlock()
		m, err := meta.Accessor(obj)
		if err != nil {
			return true, nil, err
		}
		if a.GetVerb() == "update" {
			cur, err := client.Tracker().Get(a.GetResource(), a.GetNamespace(), m.GetName())
			if err != nil {
				return true, nil, err
			}
			if cm, _ := meta.Accessor(cur); cm.GetResourceVersion() != m.GetResourceVersion() {
				return true, nil, apierrors.NewConflict(a.GetResource().GroupResource(), m.GetName(),
					fmt.Errorf("resourceVersion %q, stored %q", m.GetResourceVersion(), cm.GetResourceVersion()))
			}
		}
		next++
		m.SetResourceVersion(strconv.Itoa(next))
		return false, nil, nil // on to the tracker, which stores obj
	})
}

// TestCacheGate: before the caches sync, an admission waits up to its
// bound and is then answered 500 with Retry-After and the reason; one
// whose wait sees the caches sync is served; readiness says what it waits
// for.
func TestCacheGate(t *testing.T) {
	var synced atomic.Bool
	g := newCacheGate("the test's cache", synced.Load)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		g.run(ctx)
	}()
	t.Cleanup(func() {
		cancel()
		<-done
	})
	served := http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { io.WriteString(w, "served") })
	coreReady := atomic.Bool{}
	ready := readiness{caches: g, ready: func() (bool, string) { return coreReady.Load(), "waiting for the first Consul catalog" }}
	call := func(h http.Handler) (int, http.Header, string) {
		rec := &recorder{header: http.Header{}}
		h.ServeHTTP(rec, &http.Request{Method: http.MethodPost})
		return rec.code, rec.header, rec.body.String()
	}

	start := time.Now()
	code, h, body := call(g.gate(served, 100*time.Millisecond))
	if code != http.StatusInternalServerError || h.Get("Retry-After") != "1" || !strings.Contains(body, "caches not synced: the test's cache") {
		t.Errorf("before sync: %d %v %q", code, h, body)
	}
	if waited := time.Since(start); waited < 100*time.Millisecond {
		t.Errorf("answered after %v, before its bound", waited)
	}
	for _, tc := range []struct {
		name     string
		synced   bool
		core     bool
		code     int
		contains string
	}{
		{"nothing ready", false, false, http.StatusServiceUnavailable, "waiting for the test's cache to sync; waiting for the first Consul catalog"},
		{"the control plane ready, caches not", false, true, http.StatusServiceUnavailable, "not ready: waiting for the test's cache to sync"},
	} {
		coreReady.Store(tc.core)
		if code, _, body := call(ready); code != tc.code || !strings.Contains(body, tc.contains) {
			t.Errorf("%s: readyz %d %q", tc.name, code, body)
		}
	}

	// A request waiting while the caches sync is served.
	answered := make(chan string, 1)
	go func() {
		_, _, body := call(g.gate(served, time.Minute))
		answered <- body
	}()
	synced.Store(true)
	if body := <-answered; body != "served" {
		t.Errorf("after sync: %q", body)
	}
	for _, tc := range []struct {
		name string
		core bool
		code int
	}{
		{"caches synced, no catalog yet", false, http.StatusServiceUnavailable},
		{"both ready", true, http.StatusOK},
	} {
		coreReady.Store(tc.core)
		if code, _, body := call(ready); code != tc.code {
			t.Errorf("%s: readyz %d %q", tc.name, code, body)
		}
	}
}

type recorder struct {
	code   int
	header http.Header
	body   bytes.Buffer
}

func (r *recorder) Header() http.Header { return r.header }
func (r *recorder) Write(b []byte) (int, error) {
	if r.code == 0 {
		r.code = http.StatusOK
	}
	return r.body.Write(b)
}
func (r *recorder) WriteHeader(code int) { r.code = code }

// TestRunWaitsForCaches runs the webhook server (Run, over a fake API
// server) whose Service list hangs, as after a control plane start:
// /healthz answers, /readyz does not, and an admission that arrives then is
// not answered from the empty cache — it waits, and once the list comes,
// the pod is named after the Service selecting it. /readyz passes once
// Config.Ready does too.
func TestRunWaitsForCaches(t *testing.T) {
	svc := &corev1.Service{ObjectMeta: metav1.ObjectMeta{Name: "api", Namespace: "shop"},
		Spec: corev1.ServiceSpec{Selector: map[string]string{"app": "api"}, ClusterIP: "10.96.0.7", Ports: []corev1.ServicePort{{Port: 80}}}}
	wc := &admissionregistrationv1.MutatingWebhookConfiguration{ObjectMeta: metav1.ObjectMeta{Name: DefaultWebhookConfigName}}
	client := fake.NewClientset(svc, wc)
	listed := make(chan struct{})
	client.PrependReactor("list", "services", func(k8stesting.Action) (bool, runtime.Object, error) {
		<-listed
		return false, nil, nil // on to the fake's own answer
	})
	var coreReady atomic.Bool
	addr := make(chan net.Addr, 1)
	log, _ := testlog.New(t, "kube")
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- Run(ctx, Config{Client: client, Namespace: "meshlet-system", NativeSidecars: "true",
			Injector: inject.Config{Image: "meshlet.local/meshlet:test"}, WebhookAddress: "127.0.0.1:0", Identity: "cp-0",
			Logger: log, WebhookReady: func(a net.Addr) { addr <- a }, Ready: func() (bool, string) {
				return coreReady.Load(), "waiting for the first Consul catalog"
			}})
	}()
	var once atomic.Bool
	release := func() {
		if once.CompareAndSwap(false, true) {
			close(listed)
		}
	}
	t.Cleanup(func() {
		release()
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	})
	base := "https://" + (<-addr).String()
	// What the webhook's TLS proves is tested with its certificates
	// (certs_test.go); this test is about what it answers.
	hc := &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}}
	get := func(path string) (int, string) {
		t.Helper()
		resp, err := hc.Get(base + path)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	if code, _ := get(HealthPath); code != http.StatusOK {
		t.Errorf("%s = %d before the caches synced, want 200 (liveness)", HealthPath, code)
	}
	if code, body := get(ReadyPath); code != http.StatusServiceUnavailable || !strings.Contains(body, "Service cache") {
		t.Errorf("%s = %d %q before the caches synced", ReadyPath, code, body)
	}

	pod := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{GenerateName: "api-", Namespace: "shop", Labels: map[string]string{"app": "api"}},
		Spec: corev1.PodSpec{ServiceAccountName: "api", Containers: []corev1.Container{{Name: "app", Image: "app",
			Ports: []corev1.ContainerPort{{ContainerPort: 8080}}}}}}
	raw, _ := json.Marshal(pod)
	review, _ := json.Marshal(admissionv1.AdmissionReview{
		TypeMeta: metav1.TypeMeta{APIVersion: "admission.k8s.io/v1", Kind: "AdmissionReview"},
		Request: &admissionv1.AdmissionRequest{UID: types.UID("r1"), Kind: metav1.GroupVersionKind{Version: "v1", Kind: "Pod"},
			Operation: admissionv1.Create, Namespace: "shop", Object: runtime.RawExtension{Raw: raw}},
	})
	admit := func() (int, http.Header, string) {
		resp, err := hc.Post(base+inject.Path, "application/json", bytes.NewReader(review))
		if err != nil {
			return 0, nil, err.Error()
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, resp.Header, string(b)
	}
	// Unsynced for longer than WebhookCacheWait: a retriable refusal.
	code, h, body := admit()
	if code != http.StatusInternalServerError || h.Get("Retry-After") != "1" || !strings.Contains(body, "caches not synced") {
		t.Fatalf("admission before the caches synced: %d %v %q", code, h, body)
	}
	t.Logf("before the caches synced: %d %q", code, strings.TrimSpace(body))
	// The list comes while an admission waits: it is answered from the
	// synced cache.
	answered := make(chan string, 1)
	go func() {
		code, _, body := admit()
		answered <- fmt.Sprintf("%d %s", code, body)
	}()
	release()
	got := <-answered
	var out admissionv1.AdmissionReview
	if !strings.HasPrefix(got, "200 ") || json.Unmarshal([]byte(strings.TrimPrefix(got, "200 ")), &out) != nil || out.Response == nil || !out.Response.Allowed {
		t.Fatalf("admission after the caches synced: %s", got)
	}
	if !strings.Contains(string(out.Response.Patch), `\"service\":\"api\"`) {
		t.Errorf("the pod is not named after the Service selecting it: patch %s", out.Response.Patch)
	}
	if code, body := get(ReadyPath); code != http.StatusServiceUnavailable || !strings.Contains(body, "Consul catalog") || strings.Contains(body, "Service cache") {
		t.Errorf("%s = %d %q with the caches synced, no catalog yet", ReadyPath, code, body)
	}
	coreReady.Store(true)
	if code, body := get(ReadyPath); code != http.StatusOK {
		t.Errorf("%s = %d %q, want ready", ReadyPath, code, body)
	}
}
