package xds

import (
	"encoding/json"
	"fmt"
	"strings"
)

// What the control plane's Kubernetes side (the injection webhook and the
// registration controller) and a sidecar injected into a pod agree on: the
// ports the sidecar opens in the pod, the environment the webhook gives
// it, and how an application probe rewritten by the webhook is described
// to the sidecar. Istio's pilot-agent takes the same roles (ports 15020,
// 15021, ISTIO_KUBE_APP_PROBERS).
const (
	// PodPublicPort is the port of an injected sidecar's public listener
	// (the connect-proxy service's port in Consul): 20000, Consul's first
	// sidecar port.
	PodPublicPort = 20000
	// PodHealthPort is the sidecar's health port in a pod, on every
	// address: /ready (the sidecar has its first config and serves) and
	// /app-health/<container>/<probe> (the application's rewritten probes,
	// see AppProbe). Istio uses 15020/15021 for the same.
	PodHealthPort = 15020
	// SidecarUID is the user and group ID an injected sidecar runs as
	// (non-root; Istio's 1337), which transparent interception excludes.
	SidecarUID = 1337
	// ReadyPath is the sidecar's readiness path, on its admin endpoint and
	// its health port.
	ReadyPath = "/ready"
	// AppHealthPrefix prefixes the paths of rewritten application probes:
	// AppHealthPrefix + "<container>/<kind>", kind being livez, readyz or
	// startupz.
	AppHealthPrefix = "/app-health/"
	// EnvAppProbes is the sidecar's environment variable holding its
	// AppProbes as JSON.
	EnvAppProbes = "MESHLET_APP_PROBES"
	// EnvPodName and EnvPodNamespace carry the pod's name and namespace
	// (downward API) to the sidecar, which builds its node ID from them.
	EnvPodName      = "MESHLET_POD_NAME"
	EnvPodNamespace = "MESHLET_POD_NAMESPACE"
)

// ProxyID returns the Consul service ID of the sidecar proxy of a pod's
// service instance and its xDS node ID: "<pod>-<service>-sidecar-proxy",
// the shape consul-k8s gives it.
func ProxyID(pod, service string) string { return InstanceID(pod, service) + "-sidecar-proxy" }

// InstanceID returns the Consul service ID of a pod's service instance:
// "<pod>-<service>" (consul-k8s).
func InstanceID(pod, service string) string { return pod + "-" + service }

// AppHealthPath returns the health port path of a container's rewritten
// probe; kind is livez, readyz or startupz.
func AppHealthPath(container, kind string) string { return AppHealthPrefix + container + "/" + kind }

// AppProbes maps a health port path (AppHealthPath) to the probe the
// sidecar runs against the application on loopback when the kubelet asks
// for that path. It travels as JSON in EnvAppProbes.
type AppProbes map[string]AppProbe

// AppProbe is one application probe as the pod spec declared it, with the
// port resolved to a number: exactly one of HTTPGet, TCPSocket and GRPC is
// set (the Kubernetes core/v1 Probe handlers).
type AppProbe struct {
	HTTPGet   *HTTPGetProbe `json:"httpGet,omitempty"`
	TCPSocket *PortProbe    `json:"tcpSocket,omitempty"`
	GRPC      *GRPCProbe    `json:"grpc,omitempty"`
	// TimeoutSeconds is the probe's timeoutSeconds (Kubernetes default 1).
	TimeoutSeconds int32 `json:"timeoutSeconds,omitempty"`
}

// HTTPGetProbe is an HTTP GET probe: status 200-399 passes (kubelet).
type HTTPGetProbe struct {
	Port   int    `json:"port"`
	Path   string `json:"path,omitempty"`
	Scheme string `json:"scheme,omitempty"` // HTTP (default) or HTTPS, certificate not verified
	// Host is the Host header (the probe's host field, or a Host entry of
	// httpHeaders); the connection always goes to loopback.
	Host    string       `json:"host,omitempty"`
	Headers []HTTPHeader `json:"headers,omitempty"`
}

// HTTPHeader is one header of an HTTP probe.
type HTTPHeader struct {
	Name  string `json:"name"`
	Value string `json:"value"`
}

// PortProbe is a TCP probe: a connection that opens passes.
type PortProbe struct {
	Port int `json:"port"`
}

// GRPCProbe is a gRPC health probe (grpc.health.v1.Health/Check): SERVING
// passes. Service is the service name asked about ("" for the server).
type GRPCProbe struct {
	Port    int    `json:"port"`
	Service string `json:"service,omitempty"`
}

// ParseAppProbes decodes the EnvAppProbes value; "" is no probes. Errors
// name the path at fault.
func ParseAppProbes(s string) (AppProbes, error) {
	if strings.TrimSpace(s) == "" {
		return nil, nil
	}
	var p AppProbes
	if err := json.Unmarshal([]byte(s), &p); err != nil {
		return nil, fmt.Errorf("xds: %s: %w", EnvAppProbes, err)
	}
	for path, pr := range p {
		if !strings.HasPrefix(path, AppHealthPrefix) {
			return nil, fmt.Errorf("xds: %s: path %q does not start with %s", EnvAppProbes, path, AppHealthPrefix)
		}
		n, port := 0, 0
		if pr.HTTPGet != nil {
			n, port = n+1, pr.HTTPGet.Port
		}
		if pr.TCPSocket != nil {
			n, port = n+1, pr.TCPSocket.Port
		}
		if pr.GRPC != nil {
			n, port = n+1, pr.GRPC.Port
		}
		if n != 1 {
			return nil, fmt.Errorf("xds: %s: %s: want exactly one of httpGet, tcpSocket, grpc", EnvAppProbes, path)
		}
		if port < 1 || port > 65535 {
			return nil, fmt.Errorf("xds: %s: %s: port %d out of range", EnvAppProbes, path, port)
		}
	}
	return p, nil
}
