package xds

import (
	"strconv"
	"strings"
)

// Transparent proxying: what the control plane and a sidecar whose pod's
// traffic is intercepted (iptables REDIRECT) agree on. The shapes follow
// Consul's transparent proxy on Envoy: an outbound listener with the
// original_dst listener filter and a filter chain per upstream matched on
// the upstream's virtual IPs and port, and a pass-through cluster of type
// ORIGINAL_DST.
const (
	// OutboundCapturePort is where intercepted outbound connections are
	// redirected (Consul's and Istio's 15001).
	OutboundCapturePort = 15001
	// InboundCapturePort is where intercepted inbound connections are
	// redirected (Istio's 15006).
	InboundCapturePort = 15006
	// OutboundCaptureListener and InboundCaptureListener name the two
	// capture listeners (Consul: "outbound_listener:127.0.0.1:15001";
	// meshlet keeps the name without the address).
	OutboundCaptureListener = "outbound_listener"
	InboundCaptureListener  = "inbound_listener"
	// PassthroughCluster is the ORIGINAL_DST cluster (lb_policy
	// CLUSTER_PROVIDED) a capture listener's default filter chain sends
	// connections to: the address they were going to (Consul:
	// "original-destination").
	PassthroughCluster = "original-destination"
	// OriginalDstFilter is Envoy's original_dst listener filter: the
	// connection's destination is its original one (SO_ORIGINAL_DST,
	// IP6T_SO_ORIGINAL_DST), which filter chains match on.
	OriginalDstFilter = "envoy.filters.listener.original_dst"
	// PassthroughChain names a capture listener's default filter chain.
	PassthroughChain = "passthrough"
	// directChainPrefix and directClusterPrefix prefix the names of the
	// chains and clusters of headless services (DirectChain,
	// DirectCluster).
	directChainPrefix   = "direct:"
	directClusterPrefix = "passthrough~"
)

// DirectChain returns the name of the outbound capture listener's filter
// chain for the instances of a headless service (a Kubernetes Service with
// clusterIP None, registered without a virtual address), which its callers
// dial by pod IP: "direct:<service>" (with ":<port>" appended by the
// translator when the instances listen on several ports). It follows
// Consul's service-defaults TransparentProxy.DialedDirectly.
func DirectChain(service string) string { return directChainPrefix + service }

// DirectService returns the service of a chain name made by DirectChain
// (without a ":<port>" suffix), and false for any other name.
func DirectService(chainName string) (string, bool) {
	s, ok := strings.CutPrefix(chainName, directChainPrefix)
	s, _, _ = strings.Cut(s, ":")
	return s, ok
}

// DirectCluster returns the name of the ORIGINAL_DST cluster
// (xdsbuild.NewDirectCluster) that a headless service's DirectChain sends connections to:
// "passthrough~<service>", Consul's "passthrough~<sni>" for the upstreams
// it dials directly, with the service name where Consul puts the SNI, as
// meshlet's other clusters are named by service.
func DirectCluster(service string) string { return directClusterPrefix + service }

// DirectClusterService returns the service of a cluster name made by
// DirectCluster, and false for any other name.
func DirectClusterService(clusterName string) (string, bool) {
	return strings.CutPrefix(clusterName, directClusterPrefix)
}

// Several ports of one service (a Kubernetes Service with several ports):
// its callers' transparent proxies match each port's virtual address and
// dial the port's target port on the instance's own address, in the
// service's mTLS; the callee's inbound capture listener terminates that
// mTLS on the target port (original destination) and hands the connection
// to the app on that port. The service's own port (the instance's Port,
// behind the public listener) keeps its usual path.
const (
	// MetaServicePorts is the service instance meta key listing the
	// Kubernetes Service's TCP ports as "<port>:<targetPort>" pairs joined
	// by commas, in the Service's order ("80:8080,9090:9090"): port is the
	// Service port (paired with the instance's virtual address), targetPort
	// the pod's port it maps to, resolved to a number (Kubernetes
	// ServicePort.port and targetPort). Written by the Kubernetes
	// registrar; absent means one port, the instance's own.
	MetaServicePorts = "service-ports"
	// MetaDialedDirectly is the service instance meta key whose value
	// "true" says callers also dial the instance's own address (a headless
	// Kubernetes Service selects its pod besides the Service it registers
	// as: a StatefulSet pod's DNS name): their transparent proxies get
	// chains matching the instance's address on its ports, in the
	// service's mTLS, as for a headless service's instances (Consul's
	// service-defaults TransparentProxy.DialedDirectly, per instance).
	// Written by the Kubernetes registrar.
	MetaDialedDirectly = "dialed-directly"
	// MetaDirectPorts lists, with MetaDialedDirectly, the target ports
	// (numbers, joined by commas) of the headless Services selecting the
	// instance's pod beyond its own Service's (a StatefulSet's peer ports:
	// ZooKeeper's 2888 and 3888, Elasticsearch's 9300): callers match the
	// instance's address on them too, and its sidecar terminates their mTLS.
	MetaDirectPorts = "direct-ports"
	// portSeparator joins a service or local app cluster's name and a port.
	portSeparator = ":"
)

// ServicePortCluster returns the name of the cluster (and load assignment)
// of a service's other target port targetPort, dialled on its instances'
// own addresses: "<service>:<targetPort>".
func ServicePortCluster(service string, targetPort int) string {
	return service + portSeparator + strconv.Itoa(targetPort)
}

// LocalAppPortCluster returns the name of the static cluster of the local
// app's other port port (a Service's other target port):
// "local_app:<port>".
func LocalAppPortCluster(port int) string {
	return LocalAppCluster + portSeparator + strconv.Itoa(port)
}
