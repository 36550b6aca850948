package inject

// Labels and annotations users put on namespaces and pods, and those the
// webhook writes. Their shapes follow Istio's (sidecar.istio.io/inject) and
// consul-k8s's (consul.hashicorp.com/connect-*), under meshlet.io/.
const (
	// LabelInject opts in: "enabled" on a namespace injects every new pod
	// of it (the webhook's namespaceSelector); "true" or "false" on a pod
	// overrides its namespace (the webhooks' objectSelectors).
	LabelInject = "meshlet.io/inject"
	// NamespaceEnabled is LabelInject's value on a namespace that opts in.
	NamespaceEnabled = "enabled"

	// AnnotationService names the pod's service in Consul (a DNS-1123
	// label). Default: the one Kubernetes Service selecting the pod; of
	// several, the only one that is not headless, else (all headless) the
	// one named like the pod's ServiceAccount; with none, the workload's
	// name (Deployment, StatefulSet, Job...).
	AnnotationService = "meshlet.io/service"
	// AnnotationPort is the application's port: a number or the name of a
	// container port. Default: the first container port of the first
	// container; a pod without one is a client-only proxy.
	AnnotationPort = "meshlet.io/port"
	// AnnotationUpstreams lists upstreams as "<service>:<local port>,...":
	// the application reaches each at 127.0.0.1:<local port> (consul-k8s's
	// connect-service-upstreams without transparent proxy).
	AnnotationUpstreams = "meshlet.io/upstreams"
	// AnnotationRewriteProbes "false" keeps the pod's probes as they are
	// (default true: HTTP, TCP and gRPC probes go through the sidecar's
	// health port, which probes the application on loopback).
	AnnotationRewriteProbes = "meshlet.io/rewrite-probes"
	// AnnotationCPURequest, AnnotationCPULimit, AnnotationMemoryRequest and
	// AnnotationMemoryLimit set the sidecar container's resources
	// (Kubernetes quantities; defaults in DefaultResources). "0" leaves
	// that one unset.
	AnnotationCPURequest    = "meshlet.io/sidecar-cpu-request"
	AnnotationCPULimit      = "meshlet.io/sidecar-cpu-limit"
	AnnotationMemoryRequest = "meshlet.io/sidecar-memory-request"
	AnnotationMemoryLimit   = "meshlet.io/sidecar-memory-limit"
	// AnnotationLogLevel is the sidecar's -log-level (debug, info, warn,
	// error; default info).
	AnnotationLogLevel = "meshlet.io/sidecar-log-level"

	// AnnotationTransparentProxy "false" turns transparent interception
	// off for the pod (default true: an init container redirects its TCP
	// traffic to the sidecar, which routes connections to mesh services by
	// their virtual IPs; consul-k8s's default too).
	AnnotationTransparentProxy = "meshlet.io/transparent-proxy"
	// AnnotationExcludeOutboundPorts, AnnotationExcludeOutboundCIDRs,
	// AnnotationExcludeInboundPorts and AnnotationExcludeUIDs list what
	// interception leaves alone: "5432,6379", "10.0.0.0/8,fd00::/8",
	// "9100", "1000,1001" (consul-k8s's transparent-proxy-exclude-*).
	AnnotationExcludeOutboundPorts = "meshlet.io/exclude-outbound-ports"
	AnnotationExcludeOutboundCIDRs = "meshlet.io/exclude-outbound-cidrs"
	AnnotationExcludeInboundPorts  = "meshlet.io/exclude-inbound-ports"
	AnnotationExcludeUIDs          = "meshlet.io/exclude-uids"

	// AnnotationInjected is written by the webhook: what it decided, as
	// JSON (Record). The registration controller reads it, and its presence
	// makes injection idempotent.
	AnnotationInjected = "meshlet.io/injected"
	// LabelInjected ("true") marks injected pods, so the registration
	// controller watches only those.
	LabelInjected = "meshlet.io/injected"
	// AnnotationOriginalProbes is written by the webhook when it rewrote
	// probes: the original probes by container, as JSON
	// ({"app": {"readinessProbe": {...}}}).
	AnnotationOriginalProbes = "meshlet.io/original-probes"
)

// SidecarContainer is the name of the injected container, InitContainer
// the one that installs the interception rules (transparent proxy).
const (
	SidecarContainer = "meshlet-sidecar"
	InitContainer    = "meshlet-init"
)
