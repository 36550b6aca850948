package inject

import (
	"bytes"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"

	jsonpatchv5 "github.com/evanphx/json-patch/v5"
	"github.com/prometheus/client_golang/prometheus"
	admissionv1 "k8s.io/api/admission/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"sigs.k8s.io/yaml"

	"github.com/meshlet/meshlet/controlplane/policy"
	"github.com/meshlet/meshlet/internal/golden"
	"github.com/meshlet/meshlet/xds"
)

// testCase is one testdata/*.yaml file: a pod as the API server sends it
// for admission, its namespace, and the Services that select it; native
// (default true) and insecure set Config.NativeSidecars and
// Config.XDSInsecure, and policy, a policy file, gives
// Config.ServiceAccountMayActAs (name equality only without it).
type testCase struct {
	Namespace string          `json:"namespace"`
	Services  []string        `json:"services"`
	Headless  []string        `json:"headless"`
	Native    *bool           `json:"native"`
	Insecure  bool            `json:"insecure"`
	Policy    string          `json:"policy"`
	Pod       json.RawMessage `json:"pod"`
}

type fixedServices []SelectingService

func (f fixedServices) SelectingServices(string, map[string]string) ([]SelectingService, error) {
	return f, nil
}

// selectingServices are a test case's Services, those listed in headless
// headless.
func selectingServices(names, headless []string) fixedServices {
	var out fixedServices
	for _, n := range names {
		out = append(out, SelectingService{Name: n, Headless: slices.Contains(headless, n)})
	}
	return out
}

type events struct {
	mu  sync.Mutex
	got []string
}

func (e *events) Skipped(ref *corev1.ObjectReference, reason Skip, msg string) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.got = append(e.got, ref.Kind+"/"+ref.Name+": "+string(reason)+": "+msg)
}

// review sends pod to a webhook as the API server would and returns the
// response.
func review(t *testing.T, h http.Handler, ns string, pod []byte) *admissionv1.AdmissionResponse {
	t.Helper()
	in := admissionv1.AdmissionReview{
		TypeMeta: metav1.TypeMeta{APIVersion: "admission.k8s.io/v1", Kind: "AdmissionReview"},
		Request: &admissionv1.AdmissionRequest{
			UID:       "4f6a0a5e-0000-4000-8000-000000000001",
			Kind:      metav1.GroupVersionKind{Version: "v1", Kind: "Pod"},
			Resource:  metav1.GroupVersionResource{Version: "v1", Resource: "pods"},
			Namespace: ns,
			Operation: admissionv1.Create,
			Object:    runtime.RawExtension{Raw: pod},
		},
	}
	b, _ := json.Marshal(in)
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest(http.MethodPost, Path, bytes.NewReader(b)))
	if rec.Code != 200 {
		t.Fatalf("webhook answered %d: %s", rec.Code, rec.Body)
	}
	var out admissionv1.AdmissionReview
	if err := json.Unmarshal(rec.Body.Bytes(), &out); err != nil {
		t.Fatal(err)
	}
	if out.Response == nil || out.Response.UID != in.Request.UID || out.APIVersion != "admission.k8s.io/v1" || out.Kind != "AdmissionReview" {
		t.Fatalf("response %+v does not answer the request", out)
	}
	return out.Response
}

// TestGolden: AdmissionReview in → allowed/refused, patch and events out,
// for real pod specs (testdata/*.yaml → testdata/*.golden.json). The patch
// applied to the pod gives a pod the webhook leaves alone (idempotent).
func TestGolden(t *testing.T) {
	files, _ := filepath.Glob("testdata/*.yaml")
	if len(files) == 0 {
		t.Fatal("no test cases")
	}
	for _, f := range files {
		name := strings.TrimSuffix(filepath.Base(f), ".yaml")
		t.Run(name, func(t *testing.T) {
			raw, err := os.ReadFile(f)
			if err != nil {
				t.Fatal(err)
			}
			var tc testCase
			if err := yaml.UnmarshalStrict(raw, &tc); err != nil {
				t.Fatal(err)
			}
			podJSON, err := yaml.YAMLToJSON(tc.Pod)
			if err != nil {
				t.Fatal(err)
			}
			native := tc.Native == nil || *tc.Native
			cfg := Config{NativeSidecars: native, ImagePullPolicy: corev1.PullNever, TransparentByDefault: true, XDSInsecure: tc.Insecure}
			if tc.Policy != "" {
				set, err := policy.Parse(map[string][]byte{"policy.yaml": []byte(tc.Policy)})
				if err != nil {
					t.Fatal(err)
				}
				cfg.ServiceAccountMayActAs = set.ServiceAccountMayActAs
			}
			ev := &events{}
			wh := NewWebhook(New(cfg), WebhookOptions{Services: selectingServices(tc.Services, tc.Headless), Events: ev, Registerer: prometheus.NewRegistry()})
			resp := review(t, wh, tc.Namespace, podJSON)

			got := map[string]any{"allowed": resp.Allowed}
			if resp.Result != nil {
				got["result"] = map[string]any{"code": resp.Result.Code, "message": resp.Result.Message}
			}
			if len(resp.Patch) > 0 {
				if resp.PatchType == nil || *resp.PatchType != admissionv1.PatchTypeJSONPatch {
					t.Errorf("patch type %v, want JSONPatch", resp.PatchType)
				}
				var ops []any
				if err := json.Unmarshal(resp.Patch, &ops); err != nil {
					t.Fatal(err)
				}
				got["patch"] = ops
			}
			if len(ev.got) > 0 {
				got["events"] = ev.got
			}
			out, _ := json.MarshalIndent(got, "", "  ")
			golden.Check(t, name+".golden.json", append(out, '\n'))

			if len(resp.Patch) == 0 {
				return
			}
			// The patch applies, and the result is left alone.
			p, err := jsonpatchv5.DecodePatch(resp.Patch)
			if err != nil {
				t.Fatal(err)
			}
			patched, err := p.Apply(podJSON)
			if err != nil {
				t.Fatalf("patch does not apply: %v", err)
			}
			var pod corev1.Pod
			if err := json.Unmarshal(patched, &pod); err != nil {
				t.Fatal(err)
			}
			checkInjected(t, &pod, tc.Namespace, New(cfg))
			if again := review(t, wh, tc.Namespace, patched); !again.Allowed || len(again.Patch) != 0 {
				t.Errorf("re-submitting the injected pod: allowed %v, patch %s; want it unchanged", again.Allowed, again.Patch)
			}
		})
	}
}

// checkInjected checks what every pod in injects must have.
func checkInjected(t *testing.T, pod *corev1.Pod, ns string, in *Injector) {
	t.Helper()
	rec, ok, err := ParseRecord(pod)
	if !ok || err != nil {
		t.Fatalf("record: %v %v", ok, err)
	}
	inits := pod.Spec.InitContainers
	if rec.Transparent {
		// The interception rules go first, as root with NET_ADMIN and
		// NET_RAW: nothing else in the pod gets capabilities.
		if len(inits) == 0 || inits[0].Name != InitContainer {
			t.Fatalf("transparent pod: first init container is not %s", InitContainer)
		}
		s := inits[0].SecurityContext
		if s == nil || s.Capabilities == nil || !slices.Equal(s.Capabilities.Add, []corev1.Capability{"NET_ADMIN", "NET_RAW"}) || *s.AllowPrivilegeEscalation {
			t.Errorf("init container security context %+v", s)
		}
		inits = inits[1:]
	}
	var sc *corev1.Container
	if in.cfg.NativeSidecars {
		sc = &inits[0]
		if sc.RestartPolicy == nil || *sc.RestartPolicy != corev1.ContainerRestartPolicyAlways {
			t.Errorf("native sidecar restartPolicy = %v, want Always", sc.RestartPolicy)
		}
	} else {
		sc = &pod.Spec.Containers[0]
		if sc.Lifecycle == nil || sc.Lifecycle.PostStart == nil {
			t.Error("sidecar without native sidecars has no postStart hook")
		}
	}
	if sc.Name != SidecarContainer {
		t.Fatalf("first container %q, want the sidecar", sc.Name)
	}
	s := sc.SecurityContext
	if s == nil || *s.RunAsUser != xds.SidecarUID || !*s.RunAsNonRoot || !*s.ReadOnlyRootFilesystem || *s.AllowPrivilegeEscalation || len(s.Capabilities.Add) != 0 {
		t.Errorf("sidecar security context %+v: want non-root, read-only root, no capabilities", s)
	}
	if sc.StartupProbe == nil || sc.StartupProbe.HTTPGet == nil || sc.StartupProbe.HTTPGet.Path != xds.ReadyPath {
		t.Errorf("startup probe %+v, want %s", sc.StartupProbe, xds.ReadyPath)
	}
	if !strings.Contains(strings.Join(sc.Args, " "), "-node-id=$("+xds.EnvPodName+")-"+rec.ConsulService+"-sidecar-proxy") {
		t.Errorf("args %v: node ID is not the proxy's Consul service ID", sc.Args)
	}
	if pod.Labels[LabelInjected] != "true" {
		t.Errorf("label %s missing", LabelInjected)
	}
	if sa := PodServiceAccount(pod); !in.serviceAccountMayActAs(ns, sa, rec.Service) {
		t.Errorf("pod of ServiceAccount %q injected as service %q", sa, rec.Service)
	}
	checkCredentials(t, pod, sc, in.cfg.XDSInsecure)
}

// checkCredentials checks the sidecar's ADS credentials: the projected
// token and the CA bundle mounted read-only where its flags say, or
// neither with -xds-insecure; and that no volume name is used twice.
func checkCredentials(t *testing.T, pod *corev1.Pod, sc *corev1.Container, insecure bool) {
	t.Helper()
	vols := map[string]corev1.Volume{}
	for _, v := range pod.Spec.Volumes {
		if _, dup := vols[v.Name]; dup {
			t.Errorf("volume %q twice in the pod", v.Name)
		}
		vols[v.Name] = v
	}
	mounts := map[string]corev1.VolumeMount{}
	for _, m := range sc.VolumeMounts {
		if _, ok := vols[m.Name]; !ok {
			t.Errorf("sidecar mounts %q, which is not a volume of the pod", m.Name)
		}
		mounts[m.MountPath] = m
	}
	args := strings.Join(sc.Args, " ")
	if insecure {
		if !slices.Contains(sc.Args, "-xds-insecure") || strings.Contains(args, "-token-file") || strings.Contains(args, "-xds-ca-file") {
			t.Errorf("insecure sidecar args %v: want -xds-insecure and no credentials", sc.Args)
		}
		if _, ok := mounts[xds.PodTokenDir]; ok {
			t.Errorf("insecure sidecar mounts a token")
		}
		if _, ok := mounts[xds.PodCADir]; ok {
			t.Errorf("insecure sidecar mounts a CA bundle")
		}
		return
	}
	if !slices.Contains(sc.Args, "-xds-ca-file="+xds.PodCAFile) || !slices.Contains(sc.Args, "-token-file="+xds.PodTokenFile) || strings.Contains(args, "-xds-insecure") {
		t.Errorf("sidecar args %v: want -xds-ca-file=%s and -token-file=%s", sc.Args, xds.PodCAFile, xds.PodTokenFile)
	}
	tm, ok := mounts[xds.PodTokenDir]
	if !ok || !tm.ReadOnly {
		t.Fatalf("sidecar mount of %s: %+v, want read-only", xds.PodTokenDir, tm)
	}
	if p := vols[tm.Name].Projected; p == nil || len(p.Sources) != 1 || p.Sources[0].ServiceAccountToken == nil ||
		p.Sources[0].ServiceAccountToken.Audience != xds.TokenAudience || *p.Sources[0].ServiceAccountToken.ExpirationSeconds != xds.TokenExpirationSeconds ||
		xds.PodTokenDir+"/"+p.Sources[0].ServiceAccountToken.Path != xds.PodTokenFile {
		t.Errorf("token volume %+v: want one ServiceAccount token of audience %s", vols[tm.Name], xds.TokenAudience)
	}
	cm, ok := mounts[xds.PodCADir]
	if !ok || !cm.ReadOnly {
		t.Fatalf("sidecar mount of %s: %+v, want read-only", xds.PodCADir, cm)
	}
	if c := vols[cm.Name].ConfigMap; c == nil || c.Name != xds.CARootConfigMap || len(c.Items) != 1 || c.Items[0].Key != xds.CARootKey ||
		xds.PodCADir+"/"+c.Items[0].Path != xds.PodCAFile {
		t.Errorf("CA volume %+v: want ConfigMap %s key %s", vols[cm.Name], xds.CARootConfigMap, xds.CARootKey)
	}
	for _, c := range append(slices.Clone(pod.Spec.Containers), pod.Spec.InitContainers...) {
		if c.Name == SidecarContainer {
			continue
		}
		for _, m := range c.VolumeMounts {
			if m.Name == tm.Name || m.Name == cm.Name {
				t.Errorf("container %s mounts the sidecar's credentials (%s)", c.Name, m.Name)
			}
		}
	}
}

func TestParseUpstreams(t *testing.T) {
	for _, tc := range []struct {
		name  string
		names ServiceNames
		in    string
		err   string
		want  []string // Consul names
	}{
		{name: "none", in: ""},
		{name: "own namespace", in: "api:9191", want: []string{"api.shop"}},
		{name: "two, spaces", in: " api:9191 , store:9192 ", want: []string{"api.shop", "store.shop"}},
		{name: "another namespace", in: "api.other:9191", want: []string{"api.other"}},
		{name: "another namespace, DNS forms", in: "api.other.svc:9191,db.data.svc.cluster.local:9192", want: []string{"api.other", "db.data"}},
		{name: "flat", names: FlatNames, in: "api:9191", want: []string{"api"}},
		{name: "flat, another namespace", names: FlatNames, in: "api.other:9191", err: "names another namespace, but Consul names are flat"},
		{name: "not a port", in: "api:notaport", err: `meshlet.io/upstreams="api:notaport": "api:notaport": "notaport" is not a port`},
		{name: "no port", in: "api", err: "want <service>:<local port>"},
		{name: "port 0", in: "api:0", err: "is not a port"},
		{name: "bad name", in: "Api_x:80", err: "service name"},
		{name: "too many dots", in: "a.b.c:80", err: "want <service>, <service>.<namespace>"},
		{name: "a port twice", in: "api:80,store:80", err: "local port 80 given to both api and store"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			in := New(Config{Names: tc.names})
			ups, err := in.parseUpstreams("shop", tc.in)
			if (err == nil) != (tc.err == "") || err != nil && !strings.Contains(err.Error(), tc.err) {
				t.Fatalf("err %v, want %q", err, tc.err)
			}
			var got []string
			for _, u := range ups {
				got = append(got, u.Service)
			}
			if !slices.Equal(got, tc.want) {
				t.Fatalf("upstreams %v, want %v", got, tc.want)
			}
		})
	}
}

func TestNotAReview(t *testing.T) {
	wh := NewWebhook(New(Config{}), WebhookOptions{})
	for _, body := range []string{"", "{", `{"kind":"AdmissionReview"}`} {
		rec := httptest.NewRecorder()
		wh.ServeHTTP(rec, httptest.NewRequest(http.MethodPost, Path, strings.NewReader(body)))
		if rec.Code != http.StatusBadRequest {
			t.Errorf("%q: %d, want 400", body, rec.Code)
		}
	}
	rec := httptest.NewRecorder()
	wh.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, Path, nil))
	if rec.Code != http.StatusMethodNotAllowed {
		t.Errorf("GET: %d, want 405", rec.Code)
	}
}

// TestServiceAccountIdentity: Mutate injects a pod only as a service its
// ServiceAccount may act as, and says which setting would allow the rest.
func TestServiceAccountIdentity(t *testing.T) {
	shopLegacy := func(ns, sa, svc string) bool { return sa == svc || ns == "shop" && sa == "legacy" && svc == "api" }
	tests := []struct {
		name      string
		sa        string // spec.serviceAccountName
		deprecSA  string // spec.serviceAccount (deprecated)
		service   string // meshlet.io/service
		namespace string
		mayActAs  func(namespace, serviceAccount, service string) bool
		err       string // "" when injected
	}{
		{name: "named like its service", sa: "api", service: "api", namespace: "shop"},
		{name: "no ServiceAccount is default", service: "api", namespace: "shop",
			err: `inject: refused: pod's ServiceAccount "default" may not act as service "api": a sidecar's identity is its ServiceAccount; run the pod as ServiceAccount "api", or allow it in MeshDefaults spec.serviceAccounts (serviceAccount: default, namespace: shop, services: [api])`},
		{name: "deprecated serviceAccount field", deprecSA: "api", service: "api", namespace: "shop"},
		{name: "another service", sa: "web", service: "api", namespace: "shop", err: `pod's ServiceAccount "web" may not act as service "api"`},
		{name: "bound by the policy", sa: "legacy", service: "api", namespace: "shop", mayActAs: shopLegacy},
		{name: "bound in another namespace", sa: "legacy", service: "api", namespace: "dev", mayActAs: shopLegacy,
			err: `allow it in MeshDefaults spec.serviceAccounts (serviceAccount: legacy, namespace: dev, services: [api])`},
		{name: "the policy decides, not equality", sa: "api", service: "api", namespace: "shop", mayActAs: func(string, string, string) bool { return false },
			err: `pod's ServiceAccount "api" may not act as service "api"`},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			pod := &corev1.Pod{
				ObjectMeta: metav1.ObjectMeta{Name: "p", Annotations: map[string]string{AnnotationService: tc.service}},
				Spec: corev1.PodSpec{ServiceAccountName: tc.sa, DeprecatedServiceAccount: tc.deprecSA,
					Containers: []corev1.Container{{Name: "app", Image: "example/app:1"}}},
			}
			out, skip, err := New(Config{ServiceAccountMayActAs: tc.mayActAs}).Mutate(pod, tc.namespace, nil)
			if tc.err == "" {
				if err != nil || skip != SkipNone || !hasContainer(out, SidecarContainer) {
					t.Fatalf("Mutate: skip %q, err %v; want the sidecar injected", skip, err)
				}
				return
			}
			if err == nil || !errors.Is(err, ErrRefused) || !strings.Contains(err.Error(), tc.err) {
				t.Fatalf("Mutate: err %v; want ErrRefused with %q", err, tc.err)
			}
		})
	}
}
