package kube

import (
	"cmp"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"maps"
	"net/netip"
	"strconv"
	"strings"

	"github.com/hashicorp/consul/api"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/meshlet/meshlet/controlplane/consul"
	"github.com/meshlet/meshlet/controlplane/inject"
	"github.com/meshlet/meshlet/xds"
)

// Consul names the registrar writes, consul-k8s's endpoints controller's
// own where it has one, so that Consul users find what they know.
const (
	// ManagedBy is the "managed-by" meta value of every service instance
	// the registrar owns; a resync removes those whose pod is gone.
	ManagedBy = "meshlet-kube-registrar"
	// MetaNamespace, MetaPodName, MetaPodUID and MetaManagedBy are the
	// service meta keys (consul-k8s: k8s-namespace, pod-name, pod-uid,
	// managed-by); MetaService is the Kubernetes Service of the same name,
	// when there is one.
	MetaNamespace = consul.MetaK8sNamespace
	MetaPodName   = consul.MetaPodName
	MetaPodUID    = consul.MetaPodUID
	MetaManagedBy = "managed-by"
	MetaService   = "k8s-service-name"
	// NodeSuffix makes the synthetic Consul node of a Kubernetes node:
	// "<k8s node>-virtual" (consul-k8s), with node meta synthetic-node=true.
	NodeSuffix = "-virtual"
	// MetaSyntheticNode marks those nodes.
	MetaSyntheticNode = "synthetic-node"
	// CheckType is the type of the check that follows the pod's Ready
	// condition (consul-k8s: kubernetes-readiness).
	CheckType = "kubernetes-readiness"
	// CheckName is its name.
	CheckName = "Kubernetes Readiness Check"
)

// Tagged addresses the registrar writes besides consul.VirtualTaggedAddress
// (which holds the Service's first ClusterIP, the address the translator
// matches intercepted connections on): one per IP family of the pod
// (Consul's own lan_ipv4 / lan_ipv6, as its agent writes them) and of the
// Service's ClusterIPs (dual-stack Services have one of each family). The
// service's Address is the pod's first IP, the primary family.
const (
	TaggedLANIPv4     = "lan_ipv4"
	TaggedLANIPv6     = "lan_ipv6"
	TaggedVirtualIPv4 = consul.VirtualTaggedAddress + "_ipv4"
	TaggedVirtualIPv6 = consul.VirtualTaggedAddress + "_ipv6"
)

// Registration is what the registrar writes to Consul for one pod: its
// service instance and its sidecar proxy (connect-proxy), each with the
// readiness check, on the synthetic node of its Kubernetes node.
type Registration struct {
	Instance, Proxy *api.CatalogRegistration
}

// Register builds the Registration of an injected pod, with the Service
// of the same name as rec.Service when svc is not nil, and that Service's
// EndpointSlices (those listing the pod say what Kubernetes makes of its
// endpoint). The IDs are xds.InstanceID and xds.ProxyID of the pod's name
// and service. The synthetic node's address is the pod's host IP.
//
// A pod without an IP yet, finished, or terminating has none (ok false:
// deregistered). Terminating follows Kubernetes: the pod's deletion
// timestamp, or an EndpointSlice marking its endpoint terminating: true,
// whichever is seen first. Like consul-k8s, a terminating pod leaves
// Consul at once, even while its endpoint is still serving: callers stop
// choosing it while it drains, as kube-proxy stops choosing a terminating
// endpoint while a ready one is left.
//
// The kubernetes-readiness checks pass when the pod is Ready and no
// EndpointSlice marks its endpoint serving: false (an unset serving
// condition defers to ready); otherwise they are critical, their output
// saying which. A Service's publishNotReadyAddresses (its slices call
// every endpoint ready) does not make an unready pod pass.
func Register(pod *corev1.Pod, rec inject.Record, svc *corev1.Service, slices []discoveryv1.EndpointSlice) (Registration, bool) {
	podIPs := ips(pod.Status.PodIP, pod.Status.PodIPs, func(ip corev1.PodIP) string { return ip.IP })
	ep := endpointOf(pod, slices)
	if len(podIPs) == 0 || pod.DeletionTimestamp != nil || ep.terminating != "" || pod.Spec.NodeName == "" ||
		pod.Status.Phase == corev1.PodSucceeded || pod.Status.Phase == corev1.PodFailed {
		return Registration{}, false
	}
	node := pod.Spec.NodeName + NodeSuffix
	meta := map[string]string{
		MetaNamespace: pod.Namespace,
		MetaPodName:   pod.Name,
		MetaPodUID:    string(pod.UID),
		MetaManagedBy: ManagedBy,
	}
	virtual := map[string]api.ServiceAddress{}
	instanceMeta := maps.Clone(meta)
	if svc != nil {
		meta[MetaService] = svc.Name
		instanceMeta[MetaService] = svc.Name
		if v := servicePorts(svc, pod); v != "" {
			instanceMeta[xds.MetaServicePorts] = v
		}
		if len(svc.Spec.Ports) > 0 {
			port := int(svc.Spec.Ports[0].Port)
			for i, ip := range ips(svc.Spec.ClusterIP, svc.Spec.ClusterIPs, func(s string) string { return s }) {
				if ip == corev1.ClusterIPNone {
					break // headless
				}
				if i == 0 {
					virtual[consul.VirtualTaggedAddress] = api.ServiceAddress{Address: ip, Port: port}
				}
				if k := familyKey(ip, TaggedVirtualIPv4, TaggedVirtualIPv6); k != "" {
					virtual[k] = api.ServiceAddress{Address: ip, Port: port}
				}
			}
		}
	}
	tagged := func(port int) map[string]api.ServiceAddress {
		m := maps.Clone(virtual)
		for _, ip := range podIPs {
			if k := familyKey(ip, TaggedLANIPv4, TaggedLANIPv6); k != "" {
				if _, dup := m[k]; !dup {
					m[k] = api.ServiceAddress{Address: ip, Port: port}
				}
			}
		}
		return m
	}
	proxyMeta := maps.Clone(meta)
	for key, v := range map[string]string{
		consul.MetaExcludeOutboundPorts: rec.Exclusions.OutboundPorts, consul.MetaExcludeOutboundCIDRs: rec.Exclusions.OutboundCIDRs,
		consul.MetaExcludeInboundPorts: rec.Exclusions.InboundPorts, consul.MetaExcludeUIDs: rec.Exclusions.UIDs,
	} {
		if v != "" {
			proxyMeta[key] = v
		}
	}
	status, output := api.HealthCritical, "Pod is not Ready"
	for _, c := range pod.Status.Conditions {
		if c.Type == corev1.PodReady && c.Status == corev1.ConditionTrue {
			status, output = api.HealthPassing, "Kubernetes health checks passing"
		} else if c.Type == corev1.PodReady && c.Message != "" {
			output = "Pod is not Ready: " + c.Message
		}
	}
	if status == api.HealthPassing && ep.notServing != "" {
		status, output = api.HealthCritical, "EndpointSlice "+pod.Namespace+"/"+ep.notServing+" marks the endpoint not serving"
	}
	name := cmp.Or(rec.ConsulService, rec.Service) // records before namespaced names had only Service
	instanceID, proxyID := xds.InstanceID(pod.Name, name), xds.ProxyID(pod.Name, name)
	check := func(serviceID string) *api.AgentCheck {
		return &api.AgentCheck{
			Node: node, CheckID: pod.Namespace + "/" + serviceID, Name: CheckName, Type: CheckType,
			Status: status, ServiceID: serviceID, Output: output,
		}
	}
	nodeMeta := map[string]string{MetaSyntheticNode: "true"}
	hostIPs := ips(pod.Status.HostIP, pod.Status.HostIPs, func(ip corev1.HostIP) string { return ip.IP })
	nodeAddress := "127.0.0.1"
	nodeTagged := map[string]string{}
	for i, ip := range hostIPs {
		if i == 0 {
			nodeAddress = ip
		}
		if k := familyKey(ip, TaggedLANIPv4, TaggedLANIPv6); k != "" && nodeTagged[k] == "" {
			nodeTagged[k] = ip
		}
	}
	var ups []api.Upstream
	for _, u := range rec.Upstreams {
		ups = append(ups, api.Upstream{DestinationType: api.UpstreamDestTypeService, DestinationName: u.Service,
			LocalBindAddress: "127.0.0.1", LocalBindPort: u.LocalPort})
	}
	return Registration{
		Instance: &api.CatalogRegistration{
			Node: node, Address: nodeAddress, TaggedAddresses: nodeTagged, NodeMeta: nodeMeta, SkipNodeUpdate: true,
			Service: &api.AgentService{
				ID: instanceID, Service: name, Address: podIPs[0], Port: rec.Port,
				Meta: instanceMeta, TaggedAddresses: tagged(rec.Port),
			},
			Check: check(instanceID),
		},
		Proxy: &api.CatalogRegistration{
			Node: node, Address: nodeAddress, TaggedAddresses: maps.Clone(nodeTagged), NodeMeta: nodeMeta, SkipNodeUpdate: true,
			Service: &api.AgentService{
				Kind: api.ServiceKindConnectProxy, ID: proxyID, Service: name + "-sidecar-proxy",
				Address: podIPs[0], Port: rec.PublicPort, Meta: proxyMeta, TaggedAddresses: tagged(rec.PublicPort),
				Proxy: proxyConfig(rec, instanceID, ups),
			},
			Check: check(proxyID),
		},
	}, true
}

// portPair is a Service port and the pod port it targets.
type portPair struct{ port, target int }

// resolvePorts are svc's TCP ports for pod, in the Service's order, each
// with its target port: a named one resolved to the pod's container port
// of that name (a name the pod does not have leaves the port out, as
// kube-proxy has no endpoint for it), an unset one the port itself.
func resolvePorts(svc *corev1.Service, pod *corev1.Pod) []portPair {
	var out []portPair
	for _, sp := range svc.Spec.Ports {
		if sp.Protocol != "" && sp.Protocol != corev1.ProtocolTCP {
			continue
		}
		target := int(sp.Port)
		switch {
		case sp.TargetPort.Type == intstr.String:
			target = 0
			for _, c := range pod.Spec.Containers {
				for _, cp := range c.Ports {
					if cp.Name == sp.TargetPort.StrVal && (cp.Protocol == "" || cp.Protocol == corev1.ProtocolTCP) {
						target = int(cp.ContainerPort)
					}
				}
			}
		case sp.TargetPort.IntVal != 0:
			target = int(sp.TargetPort.IntVal)
		}
		if target != 0 {
			out = append(out, portPair{int(sp.Port), target})
		}
	}
	return out
}

// servicePorts is xds.MetaServicePorts of svc's ports for pod
// (resolvePorts): "<port>:<targetPort>,..."; "" when none is left.
func servicePorts(svc *corev1.Service, pod *corev1.Pod) string {
	pairs := make([]string, 0, len(svc.Spec.Ports))
	for _, p := range resolvePorts(svc, pod) {
		pairs = append(pairs, fmt.Sprintf("%d:%d", p.port, p.target))
	}
	return strings.Join(pairs, ",")
}

// SetDialedDirectly marks the instance as dialled on its own address
// (meta xds.MetaDialedDirectly: "true"): a headless Service other than the
// one it registers as selects its pod, whose clients resolve the pod's DNS
// name and dial it. extra are those Services' target ports beyond the
// instance's own (meta xds.MetaDirectPorts; none: no meta).
func (r Registration) SetDialedDirectly(extra []int) {
	m := r.Instance.Service.Meta
	m[xds.MetaDialedDirectly] = "true"
	if len(extra) > 0 {
		ports := make([]string, len(extra))
		for i, p := range extra {
			ports[i] = strconv.Itoa(p)
		}
		m[xds.MetaDirectPorts] = strings.Join(ports, ",")
	}
}

// ips is the list form of a dual-stack field (PodIPs, HostIPs,
// ClusterIPs), or the single field when the list is empty (an older API
// server, a fake).
func ips[T any](single string, list []T, ip func(T) string) []string {
	out := make([]string, 0, max(len(list), 1))
	for _, v := range list {
		if s := ip(v); s != "" {
			out = append(out, s)
		}
	}
	if len(out) == 0 && single != "" {
		out = append(out, single)
	}
	return out
}

// familyKey is v4 or v6 by ip's family; empty when ip is not an IP.
func familyKey(ip, v4, v6 string) string {
	a, err := netip.ParseAddr(ip)
	switch {
	case err != nil:
		return ""
	case a.Unmap().Is4():
		return v4
	}
	return v6
}

// endpointState is what the EndpointSlices listing a pod say of its
// endpoint: the name of a slice marking it terminating, of one marking it
// not serving (empty when none does).
type endpointState struct {
	terminating, notServing string
}

// endpointOf reads pod's endpoint conditions in slices (the endpoint whose
// targetRef is the pod: same name, and same UID when the slice has one).
func endpointOf(pod *corev1.Pod, slices []discoveryv1.EndpointSlice) endpointState {
	var st endpointState
	for _, es := range slices {
		if es.Namespace != "" && es.Namespace != pod.Namespace {
			continue
		}
		for _, ep := range es.Endpoints {
			ref := ep.TargetRef
			if ref == nil || ref.Kind != "Pod" || ref.Name != pod.Name || ref.UID != "" && ref.UID != pod.UID {
				continue
			}
			c := ep.Conditions
			if c.Terminating != nil && *c.Terminating {
				st.terminating = es.Name
			}
			serving := c.Serving
			if serving == nil {
				serving = c.Ready
			}
			if serving != nil && !*serving {
				st.notServing = es.Name
			}
		}
	}
	return st
}

// proxyConfig is the connect-proxy's Proxy block: its destination, the app
// on loopback, the explicit upstreams, and Consul's transparent mode
// (outbound listener port xds.OutboundCapturePort) when the pod's traffic is
// intercepted.
func proxyConfig(rec inject.Record, instanceID string, ups []api.Upstream) *api.AgentServiceConnectProxyConfig {
	pc := &api.AgentServiceConnectProxyConfig{
		DestinationServiceName: cmp.Or(rec.ConsulService, rec.Service), DestinationServiceID: instanceID,
		LocalServiceAddress: "127.0.0.1", LocalServicePort: rec.Port, Upstreams: ups,
	}
	if rec.Transparent {
		pc.Mode = api.ProxyModeTransparent
		pc.TransparentProxy = &api.TransparentProxyConfig{OutboundListenerPort: xds.OutboundCapturePort}
	}
	return pc
}

// ConsulCatalog is the part of Consul's catalog API the registrar uses
// (*api.Catalog).
type ConsulCatalog interface {
	Register(reg *api.CatalogRegistration, q *api.WriteOptions) (*api.WriteMeta, error)
	Deregister(dereg *api.CatalogDeregistration, q *api.WriteOptions) (*api.WriteMeta, error)
	Nodes(q *api.QueryOptions) ([]*api.Node, *api.QueryMeta, error)
	NodeServiceList(node string, q *api.QueryOptions) (*api.CatalogNodeServiceList, *api.QueryMeta, error)
}

var _ ConsulCatalog = (*api.Catalog)(nil)

// aclNamed is err, or when Consul refused it for the ACL token (HTTP 403)
// an error naming the permission missing and what needed it (the rules the
// registrar needs: consul.KubeControlPlaneACLRules).
func aclNamed(err error, what string) error {
	if aerr := consul.ACLErrorOf(err, what); aerr != nil {
		return fmt.Errorf("%w (the control plane's token needs the rules of consul.KubeControlPlaneACLRules)", aerr)
	}
	return err
}

func hash(reg Registration) string {
	b, _ := json.Marshal(reg)
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}
