package sidecar

import (
	"slices"
	"strings"
	"time"

	adminv3 "github.com/envoyproxy/go-control-plane/envoy/admin/v3"
	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/meshlet/meshlet/sidecar/admin"
	"github.com/meshlet/meshlet/sidecar/config"
	"github.com/meshlet/meshlet/sidecar/telemetry"
	"github.com/meshlet/meshlet/xds"
)

// Ready implements admin.Source.
func (s *Sidecar) Ready() (bool, string) {
	if s.ready.Load() {
		return true, ""
	}
	missing := s.xds.Accepted().Missing
	if !s.xds.Status().Connected {
		missing = append([]string{"control plane at " + s.cfg.XDSAddress + " (not connected)"}, missing...)
	}
	return false, "waiting for " + strings.Join(missing, ", ")
}

// ConfigDump implements admin.Source.
func (s *Sidecar) ConfigDump() *admin.ConfigDump {
	st := s.xds.Status()
	accepted := s.xds.Accepted()
	dump := &adminv3.ConfigDump{}
	version := func(t string) (string, *timestamppb.Timestamp, map[string]*anypb.Any) {
		ts, ok := accepted.Types[t]
		if !ok {
			return "", nil, nil
		}
		return ts.Version, timestamppb.New(ts.Updated), ts.Resources
	}
	{
		v, ts, raw := version(xds.ListenerType)
		d := &adminv3.ListenersConfigDump{VersionInfo: v}
		for _, n := range sortedNames(raw) {
			d.DynamicListeners = append(d.DynamicListeners, &adminv3.ListenersConfigDump_DynamicListener{
				Name:        n,
				ActiveState: &adminv3.ListenersConfigDump_DynamicListenerState{VersionInfo: v, Listener: raw[n], LastUpdated: ts},
			})
		}
		dump.Configs = append(dump.Configs, xds.MustAny(d))
	}
	{
		v, ts, raw := version(xds.ClusterType)
		d := &adminv3.ClustersConfigDump{VersionInfo: v}
		for _, n := range sortedNames(raw) {
			d.DynamicActiveClusters = append(d.DynamicActiveClusters, &adminv3.ClustersConfigDump_DynamicCluster{VersionInfo: v, Cluster: raw[n], LastUpdated: ts})
		}
		dump.Configs = append(dump.Configs, xds.MustAny(d))
	}
	{
		v, ts, raw := version(xds.RouteType)
		d := &adminv3.RoutesConfigDump{}
		for _, n := range sortedNames(raw) {
			d.DynamicRouteConfigs = append(d.DynamicRouteConfigs, &adminv3.RoutesConfigDump_DynamicRouteConfig{VersionInfo: v, RouteConfig: raw[n], LastUpdated: ts})
		}
		dump.Configs = append(dump.Configs, xds.MustAny(d))
	}
	{
		v, ts, raw := version(xds.EndpointType)
		d := &adminv3.EndpointsConfigDump{}
		for _, n := range sortedNames(raw) {
			d.DynamicEndpointConfigs = append(d.DynamicEndpointConfigs, &adminv3.EndpointsConfigDump_DynamicEndpointConfig{VersionInfo: v, EndpointConfig: raw[n], LastUpdated: ts})
		}
		dump.Configs = append(dump.Configs, xds.MustAny(d))
	}
	{
		v, ts, raw := version(xds.SecretType)
		d := &adminv3.SecretsConfigDump{}
		for _, n := range sortedNames(raw) {
			d.DynamicActiveSecrets = append(d.DynamicActiveSecrets, &adminv3.SecretsConfigDump_DynamicSecret{
				Name: n, VersionInfo: v, LastUpdated: ts, Secret: redact(raw[n]),
			})
		}
		dump.Configs = append(dump.Configs, xds.MustAny(d))
	}
	rejected := s.xds.Rejected()
	rej := make(map[string]admin.Rejection, len(rejected))
	for k, v := range rejected {
		rej[k] = admin.Rejection{Version: v.Version, Time: v.Time, Error: v.Error}
	}
	return &admin.ConfigDump{Envoy: dump, XDS: admin.XDSState{
		Server: s.cfg.XDSAddress, Node: s.cfg.NodeID, Connected: st.Connected,
		Versions: st.Versions, ACKs: st.ACKs, NACKs: st.NACKs, Rejected: rej,
	}}
}

// redact returns a secret with its private key replaced, as Envoy's
// config_dump does; anything else is returned as is.
func redact(a *anypb.Any) *anypb.Any {
	var sec tlsv3.Secret
	if a.UnmarshalTo(&sec) != nil {
		return a
	}
	if c := sec.GetTlsCertificate(); c != nil && c.GetPrivateKey() != nil {
		c.PrivateKey = &core.DataSource{Specifier: &core.DataSource_InlineString{InlineString: "[redacted]"}}
	}
	return xds.MustAny(&sec)
}

// Certs implements admin.Source.
func (s *Sidecar) Certs() []config.CertInfo {
	all := s.tls.All()
	var out []config.CertInfo
	now := time.Now()
	for _, n := range sortedNames(all) {
		out = append(out, all[n].Infos(now)...)
	}
	return out
}

func sortedNames[T any](m map[string]T) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}

// clusterStats returns the live counters of every cluster, for metrics.
func (s *Sidecar) clusterStats() map[string]telemetry.ClusterStats {
	all := s.clusters.All()
	out := make(map[string]telemetry.ClusterStats, len(all))
	for n, c := range all {
		st := c.Stats()
		out[n] = telemetry.ClusterStats{Connections: st.Connections, Requests: st.Requests, Pending: st.Pending}
	}
	return out
}

// Listeners implements admin.Source.
func (s *Sidecar) Listeners() []admin.Listener {
	addrs := s.listeners.Addresses()
	s.mu.Lock()
	var active map[string]*config.Listener
	if s.active != nil {
		active = s.active.Config.Listeners
	}
	s.mu.Unlock()
	out := make([]admin.Listener, 0, len(addrs))
	for _, n := range sortedNames(addrs) {
		al := admin.Listener{Name: n, Address: addrs[n]}
		if l := active[n]; l != nil && l.OriginalDst {
			al.Chains = captureChains(l)
		}
		out = append(out, al)
	}
	return out
}

// captureChains describes the chains of the capture listener l for the
// admin endpoint.
func captureChains(l *config.Listener) []admin.Chain {
	out := make([]admin.Chain, 0, len(l.Chains)+1)
	for _, c := range l.AllChains() {
		ac := admin.Chain{Name: c.Name, DestinationPort: c.Match.Port, TransportProtocol: c.TransportProtocol, Default: c == l.Default}
		for _, p := range c.Match.Prefixes {
			ac.PrefixRanges = append(ac.PrefixRanges, p.String())
		}
		out = append(out, ac)
	}
	return out
}

// Clusters implements admin.Source.
func (s *Sidecar) Clusters() []admin.Cluster {
	all := s.clusters.All()
	out := make([]admin.Cluster, 0, len(all))
	for _, n := range sortedNames(all) {
		st := all[n].Stats()
		c := admin.Cluster{Name: n, Requests: st.Requests, Pending: st.Pending, Connections: st.Connections}
		for _, e := range all[n].Endpoints() {
			c.Endpoints = append(c.Endpoints, admin.Endpoint{Address: e.Address, Weight: e.Weight(),
				Active: e.Active(), Ejected: e.Ejected(), Breaker: e.BreakerState()})
		}
		out = append(out, c)
	}
	return out
}
