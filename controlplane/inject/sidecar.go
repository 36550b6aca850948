package inject

import (
	"encoding/json"
	"fmt"
	"maps"
	"net/netip"
	"path"
	"slices"
	"strconv"
	"strings"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/meshlet/meshlet/xds"
)

// volumes returns the volumes injection adds to pod and the sidecar's
// mounts of them: its state (an in-memory emptyDir) and, unless
// Config.XDSInsecure, its ADS credentials: the projected ServiceAccount
// token (audience xds.TokenAudience, xds.TokenExpirationSeconds) and the
// CA bundle of xds.CARootConfigMap, both read-only (Istio's istio-token and
// istio-ca-root-cert). Each takes its name, or the name with the first
// numeric suffix the pod does not use.
func (in *Injector) volumes(pod *corev1.Pod) ([]corev1.Volume, []corev1.VolumeMount) {
	used := map[string]bool{}
	for _, v := range pod.Spec.Volumes {
		used[v.Name] = true
	}
	var vols []corev1.Volume
	var mounts []corev1.VolumeMount
	add := func(name, dir string, readOnly bool, src corev1.VolumeSource) {
		free := name
		for i := 1; used[free]; i++ {
			free = name + "-" + strconv.Itoa(i)
		}
		used[free] = true
		vols = append(vols, corev1.Volume{Name: free, VolumeSource: src})
		mounts = append(mounts, corev1.VolumeMount{Name: free, MountPath: dir, ReadOnly: readOnly})
	}
	add(StateVolume, StateDir, false, corev1.VolumeSource{EmptyDir: &corev1.EmptyDirVolumeSource{Medium: corev1.StorageMediumMemory}})
	if in.cfg.XDSInsecure {
		return vols, mounts
	}
	expiration := int64(xds.TokenExpirationSeconds)
	add(TokenVolume, xds.PodTokenDir, true, corev1.VolumeSource{Projected: &corev1.ProjectedVolumeSource{
		Sources: []corev1.VolumeProjection{{ServiceAccountToken: &corev1.ServiceAccountTokenProjection{
			Audience: xds.TokenAudience, ExpirationSeconds: &expiration, Path: path.Base(xds.PodTokenFile),
		}}},
	}})
	// Not optional: without the bundle the sidecar cannot verify the
	// control plane, and the kubelet reports the missing ConfigMap on the
	// pod until the control plane creates it.
	add(CAVolume, xds.PodCADir, true, corev1.VolumeSource{ConfigMap: &corev1.ConfigMapVolumeSource{
		LocalObjectReference: corev1.LocalObjectReference{Name: xds.CARootConfigMap},
		Items:                []corev1.KeyToPath{{Key: xds.CARootKey, Path: path.Base(xds.PodCAFile)}},
	}})
	return vols, mounts
}

// sidecar returns the sidecar container for a pod of rec, mounting mounts.
func (in *Injector) sidecar(rec Record, probes xds.AppProbes, res corev1.ResourceRequirements, logLevel string, mounts []corev1.VolumeMount) corev1.Container {
	env := []corev1.EnvVar{
		{Name: xds.EnvPodName, ValueFrom: &corev1.EnvVarSource{FieldRef: &corev1.ObjectFieldSelector{FieldPath: "metadata.name"}}},
		{Name: xds.EnvPodNamespace, ValueFrom: &corev1.EnvVarSource{FieldRef: &corev1.ObjectFieldSelector{FieldPath: "metadata.namespace"}}},
	}
	if len(probes) > 0 {
		b, _ := json.Marshal(probes) // map keys sorted: stable output
		env = append(env, corev1.EnvVar{Name: xds.EnvAppProbes, Value: string(b)})
	}
	ready := &corev1.Probe{
		ProbeHandler: corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Path: xds.ReadyPath, Port: intstr.FromInt32(xds.PodHealthPort)}},
	}
	startup := ready.DeepCopy()
	// Up to two minutes for the first config (registration in Consul,
	// then a leaf certificate), polled every second so the application
	// starts as soon as the sidecar serves.
	startup.PeriodSeconds, startup.FailureThreshold = 1, 120
	ready.PeriodSeconds = 5
	uid := int64(xds.SidecarUID)
	yes, no := true, false
	args := []string{
		// The pod's name is known only once it is created
		// (generateName): the kubelet expands $(MESHLET_POD_NAME).
		"-node-id=" + xds.ProxyID("$("+xds.EnvPodName+")", rec.ConsulService),
		"-service=" + rec.ConsulService,
		"-xds-addr=" + in.cfg.XDSAddress,
	}
	if in.cfg.XDSInsecure {
		args = append(args, "-xds-insecure")
	} else {
		args = append(args, "-xds-ca-file="+xds.PodCAFile, "-token-file="+xds.PodTokenFile)
	}
	args = append(args,
		"-health-addr=:"+strconv.Itoa(xds.PodHealthPort),
		"-state-dir="+StateDir,
		"-log-level="+logLevel,
	)
	return corev1.Container{
		Name:            SidecarContainer,
		Image:           in.cfg.Image,
		ImagePullPolicy: in.cfg.ImagePullPolicy,
		Command:         []string{SidecarBinary},
		Args:            args,
		Env:             env,
		Ports: []corev1.ContainerPort{
			{Name: "meshlet-public", ContainerPort: int32(rec.PublicPort), Protocol: corev1.ProtocolTCP},
			{Name: "meshlet-health", ContainerPort: xds.PodHealthPort, Protocol: corev1.ProtocolTCP},
		},
		Resources:      res,
		StartupProbe:   startup,
		ReadinessProbe: ready,
		VolumeMounts:   mounts,
		SecurityContext: &corev1.SecurityContext{
			RunAsUser:                &uid,
			RunAsGroup:               &uid,
			RunAsNonRoot:             &yes,
			ReadOnlyRootFilesystem:   &yes,
			AllowPrivilegeEscalation: &no,
			Privileged:               &no,
			Capabilities:             &corev1.Capabilities{Drop: []corev1.Capability{"ALL"}},
			SeccompProfile:           &corev1.SeccompProfile{Type: corev1.SeccompProfileTypeRuntimeDefault},
		},
		TerminationMessagePolicy: corev1.TerminationMessageFallbackToLogsOnError,
	}
}

// Probe kinds as they appear in health port paths.
const (
	probeLiveness  = "livez"
	probeReadiness = "readyz"
	probeStartup   = "startupz"
)

// rewriteProbes points the HTTP, TCP and gRPC probes of pod's containers
// at the sidecar's health port, and returns what the sidecar must run for
// each and the original probes by container and field name. Exec probes
// and probes of another host are left alone.
func rewriteProbes(pod *corev1.Pod) (xds.AppProbes, map[string]map[string]*corev1.Probe, error) {
	probes := xds.AppProbes{}
	original := map[string]map[string]*corev1.Probe{}
	for i := range pod.Spec.Containers {
		c := &pod.Spec.Containers[i]
		for _, p := range []struct {
			field, kind string
			probe       **corev1.Probe
		}{
			{"livenessProbe", probeLiveness, &c.LivenessProbe},
			{"readinessProbe", probeReadiness, &c.ReadinessProbe},
			{"startupProbe", probeStartup, &c.StartupProbe},
		} {
			pr := *p.probe
			if pr == nil {
				continue
			}
			ap, ok, err := appProbe(c, pr)
			if err != nil {
				return nil, nil, fmt.Errorf("%w: container %s %s: %v", ErrRefused, c.Name, p.field, err)
			}
			if !ok {
				continue
			}
			if original[c.Name] == nil {
				original[c.Name] = map[string]*corev1.Probe{}
			}
			original[c.Name][p.field] = pr.DeepCopy()
			path := xds.AppHealthPath(c.Name, p.kind)
			probes[path] = ap
			np := pr.DeepCopy()
			np.ProbeHandler = corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Path: path, Port: intstr.FromInt32(xds.PodHealthPort), Scheme: corev1.URISchemeHTTP}}
			*p.probe = np
		}
	}
	if len(probes) == 0 {
		return nil, nil, nil
	}
	return probes, original, nil
}

// appProbe describes pr for the sidecar; ok is false for a probe that is
// not rewritten.
func appProbe(c *corev1.Container, pr *corev1.Probe) (xds.AppProbe, bool, error) {
	ap := xds.AppProbe{TimeoutSeconds: pr.TimeoutSeconds}
	switch h := pr.ProbeHandler; {
	case h.HTTPGet != nil:
		if h.HTTPGet.Host != "" {
			return ap, false, nil // the kubelet probes another host: not the app's port
		}
		port, err := containerPort(c, h.HTTPGet.Port)
		if err != nil {
			return ap, false, err
		}
		g := &xds.HTTPGetProbe{Port: port, Path: h.HTTPGet.Path, Scheme: string(h.HTTPGet.Scheme)}
		for _, hd := range h.HTTPGet.HTTPHeaders {
			g.Headers = append(g.Headers, xds.HTTPHeader{Name: hd.Name, Value: hd.Value})
		}
		ap.HTTPGet = g
	case h.TCPSocket != nil:
		if h.TCPSocket.Host != "" {
			return ap, false, nil
		}
		port, err := containerPort(c, h.TCPSocket.Port)
		if err != nil {
			return ap, false, err
		}
		ap.TCPSocket = &xds.PortProbe{Port: port}
	case h.GRPC != nil:
		ap.GRPC = &xds.GRPCProbe{Port: int(h.GRPC.Port)}
		if h.GRPC.Service != nil {
			ap.GRPC.Service = *h.GRPC.Service
		}
	default:
		return ap, false, nil // exec probes run in the container: nothing to rewrite
	}
	return ap, true, nil
}

// containerPort resolves a probe's port, a number or a named port of c.
func containerPort(c *corev1.Container, p intstr.IntOrString) (int, error) {
	if p.Type == intstr.Int {
		return p.IntValue(), nil
	}
	for _, cp := range c.Ports {
		if cp.Name == p.StrVal {
			return int(cp.ContainerPort), nil
		}
	}
	names := slices.Sorted(maps.Keys(portNames(c)))
	return 0, fmt.Errorf("port %q is not a named port of the container (named: %v)", p.StrVal, names)
}

func portNames(c *corev1.Container) map[string]bool {
	m := map[string]bool{}
	for _, cp := range c.Ports {
		if cp.Name != "" {
			m[cp.Name] = true
		}
	}
	return m
}

// exclusions reads the exclusion annotations, each item validated; a
// malformed one is refused naming the annotation and the item.
func exclusions(ann map[string]string) (Exclusions, error) {
	var ex Exclusions
	for _, a := range []struct {
		annotation string
		dst        *string
		check      func(string) error
	}{
		{AnnotationExcludeOutboundPorts, &ex.OutboundPorts, checkPort},
		{AnnotationExcludeOutboundCIDRs, &ex.OutboundCIDRs, checkCIDR},
		{AnnotationExcludeInboundPorts, &ex.InboundPorts, checkPort},
		{AnnotationExcludeUIDs, &ex.UIDs, checkUID},
	} {
		v, ok := ann[a.annotation]
		if !ok {
			continue
		}
		var items []string
		for item := range strings.SplitSeq(v, ",") {
			if item = strings.TrimSpace(item); item == "" {
				continue
			}
			if err := a.check(item); err != nil {
				return ex, annotationErr(a.annotation, v, fmt.Sprintf("%q: %v", item, err))
			}
			items = append(items, item)
		}
		*a.dst = strings.Join(items, ",")
	}
	return ex, nil
}

// interceptContainer is the init container that installs the interception
// rules (`sidecar intercept`, sidecar/intercept) with the pod's exclusions:
// root with NET_ADMIN and NET_RAW only, which nothing else in the pod gets.
func (in *Injector) interceptContainer(ex Exclusions) *corev1.Container {
	args := []string{"intercept", "-proxy-uid=" + strconv.Itoa(xds.SidecarUID),
		"-outbound-port=" + strconv.Itoa(xds.OutboundCapturePort), "-inbound-port=" + strconv.Itoa(xds.InboundCapturePort)}
	for _, f := range []struct{ flag, value string }{
		{"-exclude-outbound-ports", ex.OutboundPorts}, {"-exclude-outbound-cidrs", ex.OutboundCIDRs},
		{"-exclude-inbound-ports", ex.InboundPorts}, {"-exclude-uids", ex.UIDs},
	} {
		if f.value != "" {
			args = append(args, f.flag+"="+f.value)
		}
	}
	root := int64(0)
	no, yes := false, true
	return &corev1.Container{
		Name:            InitContainer,
		Image:           in.cfg.Image,
		ImagePullPolicy: in.cfg.ImagePullPolicy,
		Command:         []string{SidecarBinary},
		Args:            args,
		Resources: corev1.ResourceRequirements{
			Requests: corev1.ResourceList{corev1.ResourceCPU: resource.MustParse("10m"), corev1.ResourceMemory: resource.MustParse("16Mi")},
			Limits:   corev1.ResourceList{corev1.ResourceMemory: resource.MustParse("64Mi")},
		},
		SecurityContext: &corev1.SecurityContext{
			RunAsUser:                &root,
			RunAsNonRoot:             &no,
			ReadOnlyRootFilesystem:   &yes,
			AllowPrivilegeEscalation: &no,
			Privileged:               &no,
			Capabilities:             &corev1.Capabilities{Add: []corev1.Capability{"NET_ADMIN", "NET_RAW"}, Drop: []corev1.Capability{"ALL"}},
		},
		TerminationMessagePolicy: corev1.TerminationMessageFallbackToLogsOnError,
	}
}

func checkPort(s string) error {
	n, err := strconv.Atoi(s)
	if err != nil || n < 1 || n > 65535 {
		return fmt.Errorf("not a port (1-65535)")
	}
	return nil
}

func checkCIDR(s string) error {
	if _, err := netip.ParsePrefix(s); err != nil {
		return fmt.Errorf("not a CIDR (10.0.0.0/8, fd00::/8)")
	}
	return nil
}

func checkUID(s string) error {
	if n, err := strconv.Atoi(s); err != nil || n < 0 {
		return fmt.Errorf("not a user ID")
	}
	return nil
}
