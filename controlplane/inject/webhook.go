package inject

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"regexp"
	"slices"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"gomodules.xyz/jsonpatch/v2"
	admissionv1 "k8s.io/api/admission/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// Path is where the webhook serves AdmissionReviews (the
// MutatingWebhookConfiguration's clientConfig.service.path).
const Path = "/inject"

// maxReviewBytes bounds an AdmissionReview body (the API server sends at
// most a few MB: an object is limited to 1.5 MiB in etcd).
const maxReviewBytes = 8 << 20

// ServiceSelector finds the Kubernetes Services of a namespace whose
// selector matches a pod's labels (from an informer's cache).
type ServiceSelector interface {
	SelectingServices(namespace string, podLabels map[string]string) ([]SelectingService, error)
}

// SelectingService is a Kubernetes Service whose selector matches a pod:
// its name, and whether it is headless (clusterIP: None, no virtual
// address: its clients dial the pods' own addresses).
type SelectingService struct {
	Name     string
	Headless bool
}

// EventRecorder reports a pod that asked for a sidecar and was skipped,
// on its controller (ReplicaSet, Job...) or its namespace: at admission the
// pod has no UID an Event could refer to.
type EventRecorder interface {
	Skipped(ref *corev1.ObjectReference, reason Skip, message string)
}

// WebhookOptions configures NewWebhook.
type WebhookOptions struct {
	// Services finds Services selecting a pod; nil finds none (the
	// service name comes from the annotation or the workload).
	Services ServiceSelector
	// Events reports skipped pods; nil reports nothing.
	Events EventRecorder
	// Logger defaults to slog.Default().
	Logger *slog.Logger
	// Registerer takes the webhook's metrics
	// (meshlet_controlplane_admission_seconds{result}); nil registers none.
	Registerer prometheus.Registerer
}

// Webhook is the admission webhook's HTTP handler: AdmissionReview
// (admission.k8s.io/v1) in, a JSON patch (RFC 6902) out.
type Webhook struct {
	inj      *Injector
	opts     WebhookOptions
	log      *slog.Logger
	duration *prometheus.HistogramVec
}

// NewWebhook returns the handler for inj.
func NewWebhook(inj *Injector, opts WebhookOptions) *Webhook {
	w := &Webhook{inj: inj, opts: opts, log: opts.Logger}
	if w.log == nil {
		w.log = slog.Default()
	}
	w.duration = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name:    "meshlet_controlplane_admission_seconds",
		Help:    "Time to answer a pod AdmissionReview, by result: injected, skipped, refused, error.",
		Buckets: []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, 1},
	}, []string{"result"})
	if opts.Registerer != nil {
		opts.Registerer.MustRegister(w.duration)
	}
	return w
}

// ServeHTTP answers one AdmissionReview. A request that is not one gets
// 400; a pod that cannot be injected is refused (allowed false, code 400)
// with a message naming the annotation or field.
func (w *Webhook) ServeHTTP(rw http.ResponseWriter, r *http.Request) {
	start := time.Now()
	if r.Method != http.MethodPost {
		http.Error(rw, "inject: POST an AdmissionReview", http.StatusMethodNotAllowed)
		return
	}
	body, err := io.ReadAll(io.LimitReader(r.Body, maxReviewBytes+1))
	if err != nil || len(body) > maxReviewBytes {
		http.Error(rw, "inject: AdmissionReview unreadable or over 8 MiB", http.StatusBadRequest)
		return
	}
	var review admissionv1.AdmissionReview
	if err := json.Unmarshal(body, &review); err != nil || review.Request == nil {
		http.Error(rw, fmt.Sprintf("inject: not an AdmissionReview: %v", err), http.StatusBadRequest)
		return
	}
	resp, result := w.review(review.Request)
	resp.UID = review.Request.UID
	out := admissionv1.AdmissionReview{TypeMeta: review.TypeMeta, Response: resp}
	if out.APIVersion == "" {
		out.APIVersion, out.Kind = "admission.k8s.io/v1", "AdmissionReview"
	}
	rw.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(rw).Encode(&out)
	w.duration.WithLabelValues(result).Observe(time.Since(start).Seconds())
}

// Review answers one admission request for a pod; the second result is the
// metric's label.
func (w *Webhook) review(req *admissionv1.AdmissionRequest) (*admissionv1.AdmissionResponse, string) {
	allow := &admissionv1.AdmissionResponse{Allowed: true}
	if req.Kind.Kind != "Pod" || req.Operation != admissionv1.Create || req.SubResource != "" {
		return allow, "skipped"
	}
	var pod corev1.Pod
	if err := json.Unmarshal(req.Object.Raw, &pod); err != nil {
		return refuse(fmt.Sprintf("inject: pod: %v", err)), "error"
	}
	ns := req.Namespace
	if pod.Namespace != "" {
		ns = pod.Namespace
	}
	var selecting []SelectingService
	if w.opts.Services != nil && pod.Annotations[AnnotationService] == "" {
		var err error
		if selecting, err = w.opts.Services.SelectingServices(ns, pod.Labels); err != nil {
			w.log.Warn("inject: cannot list the Services selecting a pod; naming it by its workload", "namespace", ns, "error", err)
		}
	}
	out, skip, err := w.inj.Mutate(&pod, ns, selecting)
	name := podName(&pod)
	if err != nil {
		w.log.Info("inject: refused a pod", "namespace", ns, "pod", name, "error", err)
		if errors.Is(err, ErrRefused) {
			return refuse(err.Error()), "refused"
		}
		return refuse(err.Error()), "error"
	}
	if skip != SkipNone {
		if skip != SkipInjected && skip != SkipOptedOut && w.opts.Events != nil {
			msg := fmt.Sprintf("meshlet did not inject a sidecar into pod %s: %s", name, skipMessage(skip))
			w.opts.Events.Skipped(eventRef(&pod, ns), skip, msg)
		}
		w.log.Debug("inject: skipped a pod", "namespace", ns, "pod", name, "reason", skip)
		return allow, "skipped"
	}
	patch, err := Patch(req.Object.Raw, out)
	if err != nil {
		return refuse(err.Error()), "error"
	}
	b, err := json.Marshal(patch)
	if err != nil {
		return refuse(err.Error()), "error"
	}
	pt := admissionv1.PatchTypeJSONPatch
	rec, _, _ := ParseRecord(out)
	w.log.Info("inject: injected a sidecar", "namespace", ns, "pod", name, "service", rec.Service, "port", rec.Port, "upstreams", len(rec.Upstreams))
	return &admissionv1.AdmissionResponse{Allowed: true, Patch: b, PatchType: &pt}, "injected"
}

func refuse(msg string) *admissionv1.AdmissionResponse {
	return &admissionv1.AdmissionResponse{Allowed: false, Result: &metav1.Status{
		Status: metav1.StatusFailure, Code: http.StatusBadRequest, Reason: metav1.StatusReasonBadRequest, Message: msg,
	}}
}

func skipMessage(s Skip) string {
	switch s {
	case SkipHostNetwork:
		return "it uses the host's network (hostNetwork: true), which a sidecar cannot serve"
	case SkipMeshNamespace:
		return "its namespace is never injected (kube-system, kube-public, kube-node-lease and meshlet's own)"
	}
	return string(s)
}

// eventRef is the object a skip Event is about: the pod's controller, else
// its namespace.
func eventRef(pod *corev1.Pod, ns string) *corev1.ObjectReference {
	for _, o := range pod.OwnerReferences {
		if o.Controller != nil && *o.Controller {
			return &corev1.ObjectReference{APIVersion: o.APIVersion, Kind: o.Kind, Name: o.Name, UID: o.UID, Namespace: ns}
		}
	}
	return &corev1.ObjectReference{APIVersion: "v1", Kind: "Namespace", Name: ns}
}

func podName(pod *corev1.Pod) string {
	if pod.Name != "" {
		return pod.Name
	}
	return pod.GenerateName + "*"
}

// arrayIndex matches the array indexes of a JSON pointer.
var arrayIndex = regexp.MustCompile(`/[0-9]+(/|$)`)

// Patch returns the JSON patch (RFC 6902) from raw, the pod exactly as
// the API server sent it (the patch applies to that document, not to a
// re-encoding of it: as controller-runtime's PatchResponseFromRaw), to out,
// built by gomodules.xyz/jsonpatch and put in a stable order: by path with
// array indexes left out, so operations on one array keep their relative
// order (removals before additions) and the rest is sorted (jsonpatch
// walks maps in random order).
func Patch(raw []byte, out *corev1.Pod) ([]jsonpatch.Operation, error) {
	a := raw
	b, err := json.Marshal(out)
	if err != nil {
		return nil, fmt.Errorf("inject: %w", err)
	}
	ops, err := jsonpatch.CreatePatch(a, b)
	if err != nil {
		return nil, fmt.Errorf("inject: patch: %w", err)
	}
	key := func(p string) string { return arrayIndex.ReplaceAllString(p, "/#$1") }
	slices.SortStableFunc(ops, func(x, y jsonpatch.Operation) int {
		kx, ky := key(x.Path), key(y.Path)
		switch {
		case kx < ky:
			return -1
		case kx > ky:
			return 1
		}
		return 0
	})
	return ops, nil
}
