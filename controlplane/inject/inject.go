// Package inject is meshlet's sidecar injection: a Kubernetes mutating
// admission webhook that adds the sidecar to the pods of opted-in
// namespaces as a native sidecar (an init container with restartPolicy
// Always, KEP-753), rewrites their probes to the sidecar's health port, and
// records what it decided in the pod's meshlet.io/injected annotation for
// the registration controller (controlplane/kube). The mutation itself
// (Injector.Mutate) is pure: the pod in, the pod out.
package inject

import (
	"cmp"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	"k8s.io/apimachinery/pkg/util/validation"

	"github.com/meshlet/meshlet/xds"
)

// Defaults for Config.
const (
	// DefaultMeshNamespace is where meshlet itself runs (deploy/kubernetes).
	DefaultMeshNamespace = "meshlet-system"
	// DefaultXDSAddress is the control plane's ADS Service in the mesh
	// namespace.
	DefaultXDSAddress = "meshlet-controlplane.meshlet-system.svc:18000"
	// DefaultImage is the image the dev overlay builds and imports.
	DefaultImage = "meshlet.local/meshlet:dev"
	// SidecarBinary is the sidecar's path in the image.
	SidecarBinary = "/usr/local/bin/sidecar"
	// StateDir is where the sidecar keeps its last accepted config (an
	// emptyDir: the root filesystem is read-only).
	StateDir = "/var/run/meshlet"
	// StateVolume is the emptyDir volume mounted at StateDir.
	StateVolume = "meshlet-state"
	// TokenVolume is the projected volume of the sidecar's ServiceAccount
	// token (audience xds.TokenAudience), mounted at xds.PodTokenDir;
	// CAVolume the ConfigMap volume of xds.CARootConfigMap, mounted at
	// xds.PodCADir. A pod's own volume of one of these names (or
	// StateVolume's) keeps it: the sidecar's gets a numeric suffix.
	TokenVolume = "meshlet-token"
	CAVolume    = "meshlet-xds-ca"
	// DefaultServiceAccount is the ServiceAccount of a pod that names none.
	DefaultServiceAccount = "default"
)

// DefaultResources are the sidecar's resources when no annotation sets
// them: requests 50m CPU and 64Mi (a sidecar at 1,000 req/s holds about
// 22 MB resident, README Performance), a 512Mi memory limit and no CPU
// limit (CPU limits throttle the data path; Istio's 2-CPU limit is as
// good as none on small nodes).
var DefaultResources = corev1.ResourceRequirements{
	Requests: corev1.ResourceList{corev1.ResourceCPU: resource.MustParse("50m"), corev1.ResourceMemory: resource.MustParse("64Mi")},
	Limits:   corev1.ResourceList{corev1.ResourceMemory: resource.MustParse("512Mi")},
}

// excludedNamespaces never get sidecars, whatever their labels say.
var excludedNamespaces = []string{"kube-system", "kube-public", "kube-node-lease"}

// Config configures an Injector.
type Config struct {
	// Image is the meshlet image (both binaries); DefaultImage when empty.
	Image string
	// ImagePullPolicy of the sidecar container; empty leaves Kubernetes'
	// default (IfNotPresent for tagged images).
	ImagePullPolicy corev1.PullPolicy
	// XDSAddress is the control plane's ADS address as pods reach it
	// (host:port); DefaultXDSAddress when empty.
	XDSAddress string
	// MeshNamespace is meshlet's own namespace, never injected;
	// DefaultMeshNamespace when empty.
	MeshNamespace string
	// NativeSidecars adds the sidecar as an init container with
	// restartPolicy Always (Kubernetes ≥ 1.29, on by default since 1.29);
	// when false it goes first in containers with a postStart hook that
	// waits for it (`sidecar wait-ready`).
	NativeSidecars bool
	// TransparentByDefault intercepts the traffic of pods that do not set
	// AnnotationTransparentProxy (an init container installs the rules).
	// False here; `controlplane serve -kube -transparent-proxy` defaults
	// to true, as consul-k8s's transparent proxy does.
	TransparentByDefault bool
	// Names is how Kubernetes Services are named in Consul;
	// NamespacedNames when empty.
	Names ServiceNames
	// XDSInsecure gives the sidecar -xds-insecure (plaintext ADS, no
	// authentication) instead of its credentials: no token nor CA volume,
	// no -token-file nor -xds-ca-file. Development only; it matches the
	// control plane's -xds-insecure, which serves ADS in plaintext and
	// trusts the node ID a stream names. False: the sidecar verifies the
	// control plane with the CA bundle of xds.CARootConfigMap and presents
	// a projected ServiceAccount token (xds/auth.go).
	XDSInsecure bool
	// ServiceAccountMayActAs reports whether a pod of namespace running
	// as serviceAccount may register as service; the control plane sets
	// it to (*policy.Set).ServiceAccountMayActAs of its current policies
	// (MeshDefaults spec.serviceAccounts). It must be safe for concurrent
	// use. Nil allows only service == serviceAccount. Mutate refuses a pod
	// it does not allow: a sidecar's identity is its ServiceAccount.
	ServiceAccountMayActAs func(namespace, serviceAccount, service string) bool
}

func (c *Config) setDefaults() {
	c.Image = cmp.Or(c.Image, DefaultImage)
	c.XDSAddress = cmp.Or(c.XDSAddress, DefaultXDSAddress)
	c.MeshNamespace = cmp.Or(c.MeshNamespace, DefaultMeshNamespace)
	c.Names = c.Names.orDefault()
}

// Record is what the webhook decided for a pod, kept as JSON in its
// AnnotationInjected: the registration controller registers the pod in
// Consul from it.
type Record struct {
	// Service is the pod's Kubernetes service name (the Service selecting
	// it, meshlet.io/service, or its workload's name).
	Service string `json:"service"`
	// ConsulService is its name in Consul (Config.Names: "<service>.<
	// namespace>" by default); "" in records of earlier versions, whose
	// Consul name is Service.
	ConsulService string `json:"consulService,omitempty"`
	// Port is the application's port; 0 for a client-only proxy.
	Port int `json:"port,omitempty"`
	// Upstreams are the explicit upstreams (AnnotationUpstreams).
	Upstreams []Upstream `json:"upstreams,omitempty"`
	// PublicPort is the sidecar's public listener port (xds.PodPublicPort).
	PublicPort int `json:"publicPort"`
	// Transparent is set when the pod's traffic is intercepted
	// (AnnotationTransparentProxy): its proxy registers in Consul's
	// transparent mode.
	Transparent bool `json:"transparent,omitempty"`
	// Exclusions are what interception leaves alone, from the exclusion
	// annotations (normalized comma lists).
	Exclusions Exclusions `json:"exclusions,omitzero"`
}

// Exclusions are a transparent pod's interception exclusions, comma lists
// as the annotations give them (spaces removed, each item validated).
type Exclusions struct {
	OutboundPorts string `json:"outboundPorts,omitempty"`
	OutboundCIDRs string `json:"outboundCIDRs,omitempty"`
	InboundPorts  string `json:"inboundPorts,omitempty"`
	UIDs          string `json:"uids,omitempty"`
}

// Upstream is one entry of AnnotationUpstreams, its service resolved to
// its Consul name (ServiceNames.Upstream).
type Upstream struct {
	Service   string `json:"service"`
	LocalPort int    `json:"localPort"`
}

// ParseRecord reads a pod's AnnotationInjected; ok is false when the pod
// has none.
func ParseRecord(pod *corev1.Pod) (r Record, ok bool, err error) {
	v, ok := pod.Annotations[AnnotationInjected]
	if !ok {
		return r, false, nil
	}
	if err := json.Unmarshal([]byte(v), &r); err != nil {
		return r, true, fmt.Errorf("inject: annotation %s: %w", AnnotationInjected, err)
	}
	if r.Service == "" {
		return r, true, fmt.Errorf("inject: annotation %s: no service", AnnotationInjected)
	}
	return r, true, nil
}

// Skip is why a pod was left as it is (Mutate's second result).
type Skip string

// Reasons Mutate leaves a pod alone. SkipInjected and SkipOptedOut are
// silent; the others are reported as Events when the pod asked for a
// sidecar.
const (
	SkipNone          Skip = ""
	SkipInjected      Skip = "AlreadyInjected"
	SkipOptedOut      Skip = "OptedOut"
	SkipHostNetwork   Skip = "HostNetwork"
	SkipMeshNamespace Skip = "ExcludedNamespace"
)

// ErrRefused wraps every error Mutate returns for a pod that cannot be
// injected as it is (a malformed annotation, a probe naming no port, several
// Services and no meshlet.io/service, a service its ServiceAccount may not
// act as); the webhook refuses such a pod with the message, which names the
// annotation and its value or the field.
var ErrRefused = errors.New("inject: refused")

// Injector mutates pods. It is safe for concurrent use.
type Injector struct {
	cfg Config
}

// New returns an Injector for cfg.
func New(cfg Config) *Injector {
	cfg.setDefaults()
	return &Injector{cfg: cfg}
}

// Config returns the injector's configuration with its defaults applied.
func (in *Injector) Config() Config { return in.cfg }

// Mutate returns a copy of pod with the sidecar injected, or pod itself
// and why it was skipped. selecting are the Kubernetes Services whose
// selector matches the pod (they give the service name when no annotation
// does: record). Errors wrap ErrRefused.
func (in *Injector) Mutate(pod *corev1.Pod, namespace string, selecting []SelectingService) (*corev1.Pod, Skip, error) {
	switch {
	case pod.Annotations[AnnotationInjected] != "" || hasContainer(pod, SidecarContainer):
		return pod, SkipInjected, nil
	case pod.Labels[LabelInject] == "false":
		return pod, SkipOptedOut, nil
	case namespace == in.cfg.MeshNamespace || slices.Contains(excludedNamespaces, namespace):
		return pod, SkipMeshNamespace, nil
	case pod.Spec.HostNetwork:
		return pod, SkipHostNetwork, nil
	}
	rec, err := in.record(pod, namespace, selecting)
	if err != nil {
		return nil, SkipNone, err
	}
	if err := in.checkIdentity(pod, namespace, rec); err != nil {
		return nil, SkipNone, err
	}
	res, err := resources(pod.Annotations)
	if err != nil {
		return nil, SkipNone, err
	}
	logLevel := cmp.Or(pod.Annotations[AnnotationLogLevel], "info")
	if !slices.Contains([]string{"debug", "info", "warn", "error"}, logLevel) {
		return nil, SkipNone, annotationErr(AnnotationLogLevel, logLevel, "want debug, info, warn or error")
	}

	out := pod.DeepCopy()
	if out.Annotations == nil {
		out.Annotations = map[string]string{}
	}
	if out.Labels == nil {
		out.Labels = map[string]string{}
	}
	out.Labels[LabelInjected] = "true"
	b, _ := json.Marshal(rec)
	out.Annotations[AnnotationInjected] = string(b)

	var probes xds.AppProbes
	if pod.Annotations[AnnotationRewriteProbes] != "false" {
		var original map[string]map[string]*corev1.Probe
		probes, original, err = rewriteProbes(out)
		if err != nil {
			return nil, SkipNone, err
		}
		if len(original) > 0 {
			b, _ := json.Marshal(original)
			out.Annotations[AnnotationOriginalProbes] = string(b)
		}
	} else if v := pod.Annotations[AnnotationRewriteProbes]; v != "false" && v != "true" {
		return nil, SkipNone, annotationErr(AnnotationRewriteProbes, v, "want true or false")
	}

	vols, mounts := in.volumes(out)
	sc := in.sidecar(rec, probes, res, logLevel, mounts)
	var initC *corev1.Container
	if rec.Transparent {
		initC = in.interceptContainer(rec.Exclusions)
	}
	out.Spec.Volumes = append(out.Spec.Volumes, vols...)
	if in.cfg.NativeSidecars {
		always := corev1.ContainerRestartPolicyAlways
		sc.RestartPolicy = &always
		// First among init containers: the pod's own init containers can
		// use the mesh too.
		out.Spec.InitContainers = append([]corev1.Container{sc}, out.Spec.InitContainers...)
	} else {
		sc.Lifecycle = &corev1.Lifecycle{PostStart: &corev1.LifecycleHandler{Exec: &corev1.ExecAction{
			Command: []string{SidecarBinary, "wait-ready", "-timeout", "2m"},
		}}}
		out.Spec.Containers = append([]corev1.Container{sc}, out.Spec.Containers...)
	}
	if initC != nil {
		// Before everything: the rules are in place before the sidecar and
		// the pod's own containers start.
		out.Spec.InitContainers = append([]corev1.Container{*initC}, out.Spec.InitContainers...)
	}
	return out, SkipNone, nil
}

// record decides the pod's service, port and upstreams.
func (in *Injector) record(pod *corev1.Pod, namespace string, selecting []SelectingService) (Record, error) {
	rec := Record{PublicPort: xds.PodPublicPort}
	switch v, ok := pod.Annotations[AnnotationService]; {
	case ok:
		if errs := validation.IsDNS1123Label(v); len(errs) > 0 {
			return rec, annotationErr(AnnotationService, v, strings.Join(errs, "; "))
		}
		rec.Service = v
	case len(selecting) > 0:
		name, err := identityService(pod, selecting)
		if err != nil {
			return rec, err
		}
		rec.Service = name
	default:
		rec.Service = workloadName(pod)
		if errs := validation.IsDNS1123Label(rec.Service); rec.Service == "" || len(errs) > 0 {
			return rec, fmt.Errorf("%w: no Service selects this pod and its workload name %q is not a service name: set %s", ErrRefused, rec.Service, AnnotationService)
		}
	}
	rec.ConsulService = in.cfg.Names.Consul(namespace, rec.Service)
	port, err := appPort(pod)
	if err != nil {
		return rec, err
	}
	switch v := pod.Annotations[AnnotationTransparentProxy]; v {
	case "":
		rec.Transparent = in.cfg.TransparentByDefault
	case "true":
		rec.Transparent = true
	case "false":
	default:
		return rec, annotationErr(AnnotationTransparentProxy, v, "want true or false")
	}
	if rec.Transparent {
		if rec.Exclusions, err = exclusions(pod.Annotations); err != nil {
			return rec, err
		}
	}
	rec.Port = port
	if rec.Upstreams, err = in.parseUpstreams(namespace, pod.Annotations[AnnotationUpstreams]); err != nil {
		return rec, err
	}
	for _, u := range rec.Upstreams {
		if u.LocalPort == rec.Port || u.LocalPort == xds.PodPublicPort || u.LocalPort == xds.PodHealthPort {
			return rec, annotationErr(AnnotationUpstreams, pod.Annotations[AnnotationUpstreams],
				fmt.Sprintf("local port %d of %s is taken (application %d, sidecar %d and %d)", u.LocalPort, u.Service, rec.Port, xds.PodPublicPort, xds.PodHealthPort))
		}
	}
	return rec, nil
}

// identityService chooses the service a pod selected by the Services
// selecting registers as (its identity): the one Service; else the only
// one with a virtual address, the others being headless (a StatefulSet's
// governing headless Service beside its client Service: the pods' own
// addresses, dialled by their DNS names, reach the same identity, see
// xds.MetaDialedDirectly); else, all headless, the one named like the
// pod's ServiceAccount (a sidecar's identity is its ServiceAccount:
// checkIdentity). Several Services with virtual addresses are refused:
// only one of them would reach the pod through the mesh, and which is the
// user's to say (AnnotationService).
func identityService(pod *corev1.Pod, selecting []SelectingService) (string, error) {
	if len(selecting) == 1 {
		return selecting[0].Name, nil
	}
	sa := PodServiceAccount(pod)
	var names, virtual []string
	named := ""
	for _, s := range selecting {
		names = append(names, s.Name)
		if !s.Headless {
			virtual = append(virtual, s.Name)
		} else if s.Name == sa {
			named = s.Name
		}
	}
	slices.Sort(names)
	switch {
	case len(virtual) == 1:
		return virtual[0], nil
	case len(virtual) == 0 && named != "":
		return named, nil
	case len(virtual) == 0:
		return "", fmt.Errorf("%w: headless Services %s all select this pod and none is named like its ServiceAccount %q: set %s to the one it serves",
			ErrRefused, strings.Join(names, ", "), sa, AnnotationService)
	}
	slices.Sort(virtual)
	return "", fmt.Errorf("%w: Services %s all select this pod and %s have cluster IPs: only one can reach it through the mesh; set %s to the one it serves",
		ErrRefused, strings.Join(names, ", "), strings.Join(virtual, ", "), AnnotationService)
}

// PodServiceAccount is the ServiceAccount pod runs as:
// spec.serviceAccountName, else DefaultServiceAccount (the API server's
// ServiceAccount admission sets it before webhooks run; the fallback is
// for pods read elsewhere).
func PodServiceAccount(pod *corev1.Pod) string {
	return cmp.Or(pod.Spec.ServiceAccountName, pod.Spec.DeprecatedServiceAccount, DefaultServiceAccount)
}

// checkIdentity refuses a pod registering as a service its ServiceAccount
// may not act as (Config.ServiceAccountMayActAs): the control plane hands
// a sidecar the identity, and the private key, of the service its token's
// ServiceAccount vouches for. A pod registers as one service,
// rec.Service (its instance and its proxy both carry that name); a Record
// that grows more must check each.
func (in *Injector) checkIdentity(pod *corev1.Pod, namespace string, rec Record) error {
	sa, svc := PodServiceAccount(pod), rec.Service
	if in.serviceAccountMayActAs(namespace, sa, svc) {
		return nil
	}
	return fmt.Errorf("%w: pod's ServiceAccount %q may not act as service %q: a sidecar's identity is its ServiceAccount; "+
		"run the pod as ServiceAccount %q, or allow it in MeshDefaults spec.serviceAccounts (serviceAccount: %s, namespace: %s, services: [%s])",
		ErrRefused, sa, svc, svc, sa, namespace, svc)
}

func (in *Injector) serviceAccountMayActAs(namespace, sa, service string) bool {
	if in.cfg.ServiceAccountMayActAs == nil {
		return sa == service
	}
	return in.cfg.ServiceAccountMayActAs(namespace, sa, service)
}

func annotationErr(name, value, why string) error {
	return fmt.Errorf("%w %s=%q: %s", ErrRefused, name, value, why)
}

// appPort is AnnotationPort resolved, or the first container port.
func appPort(pod *corev1.Pod) (int, error) {
	v, ok := pod.Annotations[AnnotationPort]
	if !ok {
		for _, c := range pod.Spec.Containers {
			for _, p := range c.Ports {
				if p.Protocol == "" || p.Protocol == corev1.ProtocolTCP {
					return int(p.ContainerPort), nil
				}
			}
		}
		return 0, nil
	}
	if n, err := strconv.Atoi(v); err == nil {
		if n < 1 || n > 65535 {
			return 0, annotationErr(AnnotationPort, v, "port out of range 1-65535")
		}
		return n, nil
	}
	for _, c := range pod.Spec.Containers {
		for _, p := range c.Ports {
			if p.Name == v {
				return int(p.ContainerPort), nil
			}
		}
	}
	return 0, annotationErr(AnnotationPort, v, "not a number nor the name of a container port")
}

// parseUpstreams reads "<service>:<port>,..." (spaces allowed).
// parseUpstreams reads AnnotationUpstreams of a pod of namespace, each
// service resolved to its Consul name.
func (in *Injector) parseUpstreams(namespace, v string) ([]Upstream, error) {
	if strings.TrimSpace(v) == "" {
		return nil, nil
	}
	var out []Upstream
	ports := map[int]string{}
	for item := range strings.SplitSeq(v, ",") {
		item = strings.TrimSpace(item)
		name, portStr, ok := strings.Cut(item, ":")
		if !ok {
			return nil, annotationErr(AnnotationUpstreams, v, fmt.Sprintf("%q: want <service>:<local port>", item))
		}
		consul, err := in.cfg.Names.Upstream(namespace, name)
		if err != nil {
			return nil, annotationErr(AnnotationUpstreams, v, fmt.Sprintf("%q: service name %s", item, err))
		}
		port, err := strconv.Atoi(portStr)
		if err != nil || port < 1 || port > 65535 {
			return nil, annotationErr(AnnotationUpstreams, v, fmt.Sprintf("%q: %q is not a port (1-65535)", item, portStr))
		}
		if prev, dup := ports[port]; dup {
			return nil, annotationErr(AnnotationUpstreams, v, fmt.Sprintf("local port %d given to both %s and %s", port, prev, name))
		}
		ports[port] = name
		out = append(out, Upstream{Service: consul, LocalPort: port})
	}
	return out, nil
}

// workloadName is the name of the pod's controller: a Deployment's (its
// ReplicaSet's name without the pod-template-hash), a Job's, a
// StatefulSet's, or the pod's own (generateName without its dash).
func workloadName(pod *corev1.Pod) string {
	for _, o := range pod.OwnerReferences {
		if o.Controller == nil || !*o.Controller {
			continue
		}
		if o.Kind == "ReplicaSet" {
			if h := pod.Labels["pod-template-hash"]; h != "" {
				return strings.TrimSuffix(o.Name, "-"+h)
			}
		}
		return o.Name
	}
	if pod.Name != "" {
		return pod.Name
	}
	return strings.TrimSuffix(pod.GenerateName, "-")
}

// resources reads the resource annotations over DefaultResources.
func resources(ann map[string]string) (corev1.ResourceRequirements, error) {
	r := *DefaultResources.DeepCopy()
	for _, a := range []struct {
		name string
		list corev1.ResourceList
		key  corev1.ResourceName
	}{
		{AnnotationCPURequest, r.Requests, corev1.ResourceCPU},
		{AnnotationCPULimit, r.Limits, corev1.ResourceCPU},
		{AnnotationMemoryRequest, r.Requests, corev1.ResourceMemory},
		{AnnotationMemoryLimit, r.Limits, corev1.ResourceMemory},
	} {
		v, ok := ann[a.name]
		if !ok {
			continue
		}
		q, err := resource.ParseQuantity(v)
		if err != nil {
			return r, annotationErr(a.name, v, "not a Kubernetes quantity")
		}
		if q.IsZero() {
			delete(a.list, a.key)
			continue
		}
		a.list[a.key] = q
	}
	for k, lim := range r.Limits {
		if req, ok := r.Requests[k]; ok && req.Cmp(lim) > 0 {
			return r, fmt.Errorf("%w: sidecar %s request %s is above its limit %s", ErrRefused, k, req.String(), lim.String())
		}
	}
	return r, nil
}

func hasContainer(pod *corev1.Pod, name string) bool {
	for _, cs := range [][]corev1.Container{pod.Spec.InitContainers, pod.Spec.Containers} {
		for _, c := range cs {
			if c.Name == name {
				return true
			}
		}
	}
	return false
}

// NativeSidecar returns the injected sidecar when spec has it as a native
// sidecar (an init container named SidecarContainer with restartPolicy
// Always), wherever it is among the init containers (meshlet-init comes
// before it in transparent mode); nil otherwise.
func NativeSidecar(spec *corev1.PodSpec) *corev1.Container {
	for i := range spec.InitContainers {
		c := &spec.InitContainers[i]
		if c.Name == SidecarContainer && c.RestartPolicy != nil && *c.RestartPolicy == corev1.ContainerRestartPolicyAlways {
			return c
		}
	}
	return nil
}
