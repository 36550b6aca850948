package server

import (
	"cmp"
	"errors"
	"maps"
	"net/netip"
	"slices"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	"google.golang.org/genproto/googleapis/rpc/status"

	"github.com/meshlet/meshlet/controlplane/explain"
	"github.com/meshlet/meshlet/controlplane/model"
	"github.com/meshlet/meshlet/controlplane/translate"
	"github.com/meshlet/meshlet/controlplane/xdsauth"
	"github.com/meshlet/meshlet/xds"
)

// Status is what the control plane knows of its proxies at one moment: the
// body of the admin endpoint's /status (JSON) and what `controlplane
// status` prints.
type Status struct {
	// Time is when the status was taken.
	Time time.Time `json:"time"`
	// Ready is Server.Ready; Waiting says what it still waits for.
	Ready   bool   `json:"ready"`
	Waiting string `json:"waiting,omitempty"`
	// Proxies lists every sidecar registered in the Consul catalog and
	// every node with an open ADS stream, sorted by node ID.
	Proxies []ProxyStatus `json:"proxies"`
	// Rejections lists the NACKs not yet followed by an ACK of the same
	// type from the same node, sorted by node and type URL.
	Rejections []Rejection `json:"rejections"`
	// Denials lists the ADS streams refused by authentication or
	// authorization (Config.AuthDenials), each distinct peer, identity,
	// node and reason once with its count, oldest first.
	Denials []xdsauth.Denial `json:"denials,omitempty"`
}

// ProxyStatus is one node in Status.
type ProxyStatus struct {
	// Node is the xDS node ID (a sidecar's proxy service ID in Consul).
	Node string `json:"node"`
	// Kind is KindSidecar or KindProxyless.
	Kind string `json:"kind"`
	// Service is the service a sidecar fronts ("" when not registered, and
	// for proxyless clients).
	Service string `json:"service,omitempty"`
	// Registered is true for a sidecar in the Consul catalog (a
	// connect-proxy registration with this ID).
	Registered bool `json:"registered"`
	// Connected is true while the node has an open ADS stream; Streams
	// counts them and ConnectedSince is when the newest one sent its first
	// request.
	Connected      bool       `json:"connected"`
	Streams        int        `json:"streams,omitempty"`
	ConnectedSince *time.Time `json:"connectedSince,omitempty"`
	// Identity is the authenticated identity of the node's newest stream
	// (Config.StreamIdentity), e.g. "consul-token:<accessor>"; "" when it
	// is not authenticated or the node is not connected.
	Identity string `json:"identity,omitempty"`
	// HeldBack is why the node's latest build was not published (it keeps
	// its last snapshot), e.g. "not ready: waiting for the leaf
	// certificate of service \"web\""; "" when its snapshot is current.
	// Always "" for proxyless clients, whose resources are consistent by
	// construction and need no certificates.
	HeldBack string `json:"heldBack,omitempty"`
	// Snapshot is the version of each type in the node's current snapshot
	// (by type URL). For a proxyless client, which is sent a new version
	// only when a resource it names changes, it is, for each type sent to
	// it, the version it would hold if up to date: the version last sent
	// when none of the resources it names changed since, else the type's
	// current version.
	Snapshot map[string]string `json:"snapshot,omitempty"`
	// Sent and ACKed are, by type URL, the version last sent to the node
	// and the version it last acknowledged (on its newest stream).
	Sent  map[string]string `json:"sent,omitempty"`
	ACKed map[string]string `json:"acked,omitempty"`
	// Subscribed lists, by type URL, the resource names the node's newest
	// stream last asked for (an empty list: every resource of the type).
	Subscribed map[string][]string `json:"subscribed,omitempty"`
}

// Rejection is a NACK: a proxy rejected a response and keeps its last
// accepted config of that type.
type Rejection struct {
	// Node is the rejecting node's ID; TypeURL the rejected type.
	Node    string `json:"node"`
	TypeURL string `json:"typeUrl"`
	// Version is the rejected version ("" when the NACK did not answer the
	// last response sent on its stream); AcceptedVersion is the version the
	// proxy keeps ("" when it has accepted none).
	Version         string `json:"version"`
	AcceptedVersion string `json:"acceptedVersion"`
	// Error is the NACK's error_detail message.
	Error string `json:"error"`
	// Time is when the latest NACK of this version arrived, FirstTime the
	// first, Count how many arrived.
	Time      time.Time `json:"time"`
	FirstTime time.Time `json:"firstTime"`
	Count     int       `json:"count"`
	// Named is true when the NACK named the resources below: in its
	// structured details (meshlet's sidecar, xds.ParseNACKDetails), else
	// in Error (see NACKResources); false when it names none, and every
	// resource of the type in the rejected snapshot is listed (for a
	// proxyless client, every one it names).
	Named bool `json:"named"`
	// Resources are the rejected resources with the inputs they were built
	// from (translate.ProxySources); empty when the rejected version is no
	// longer known.
	Resources []RejectedResource `json:"resources"`
}

// RejectedResource is one resource blamed by a Rejection.
type RejectedResource struct {
	Name string `json:"name"`
	// Field is the path of the field at fault the NACK's details give
	// (xds.NACKDetail.Field, e.g. "virtual_hosts[0].routes[0].route.retry_policy.retry_on");
	// "" when they give none or the NACK has no details.
	Field   string             `json:"field,omitempty"`
	Sources []translate.Source `json:"sources"`
}

// Sources returns the inputs of every resource of r, merged, sorted and
// without duplicates.
func (r Rejection) Sources() []translate.Source {
	byName := map[string][]translate.Source{}
	names := make([]string, 0, len(r.Resources))
	for _, res := range r.Resources {
		byName[res.Name] = append(byName[res.Name], res.Sources...)
		names = append(names, res.Name)
	}
	return translate.SourceMap{r.TypeURL: byName}.For(r.TypeURL, names...)
}

func proxyKind(node *core.Node) string {
	if xds.IsProxylessGRPC(node) {
		return KindProxyless
	}
	return KindSidecar
}

// proxylessCurrentLocked returns, by type sent on st (a proxyless
// client's stream), the version the client would hold if up to date (see
// ProxyStatus.Snapshot). s.mu must be held.
func (s *Server) proxylessCurrentLocked(st *streamState) map[string]string {
	out := map[string]string{}
	for typ, ts := range st.types {
		lt := s.linear[typ]
		if lt == nil || ts.sentVersion == "" {
			continue
		}
		if sent, ok := parseLinearVersion(s.versionPrefix, ts.sentVersion); ok && !lt.changedSince(ts.subscribed, sent) {
			out[typ] = ts.sentVersion
		} else {
			out[typ] = linearVersion(s.versionPrefix, lt.version)
		}
	}
	return out
}

// Ready reports whether the server has built snapshots: true once the
// first Consul catalog has arrived; otherwise false and what it waits for.
func (s *Server) Ready() (bool, string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.catalog == nil {
		return false, "waiting for the first Consul catalog"
	}
	return true, ""
}

// Status returns what the server knows of every proxy now (see Status).
func (s *Server) Status() *Status {
	out := &Status{Time: time.Now(), Proxies: []ProxyStatus{}, Rejections: []Rejection{}}
	out.Ready, out.Waiting = s.Ready()

	s.mu.Lock()
	defer s.mu.Unlock()
	var registered map[string]*model.Proxy
	if s.catalog != nil {
		registered = s.catalog.Proxies
	}
	for id, p := range registered {
		if s.nodes[id] == nil {
			out.Proxies = append(out.Proxies, ProxyStatus{Node: id, Kind: KindSidecar, Service: p.Service, Registered: true})
		}
	}
	for id, n := range s.nodes {
		if ps, shown := s.proxyStatusLocked(id, n, registered[id]); shown {
			out.Proxies = append(out.Proxies, ps)
		}
		for _, t := range n.types {
			if t.rejection != nil {
				out.Rejections = append(out.Rejections, *t.rejection)
			}
		}
	}
	slices.SortFunc(out.Proxies, func(a, b ProxyStatus) int { return cmp.Compare(a.Node, b.Node) })
	slices.SortFunc(out.Rejections, func(a, b Rejection) int {
		return cmp.Or(cmp.Compare(a.Node, b.Node), cmp.Compare(a.TypeURL, b.TypeURL))
	})
	if s.denials != nil {
		out.Denials = s.denials()
	}
	return out
}

// proxyStatusLocked returns the status of node id from its record n and
// its registration p (nil when it is not registered); shown is false for
// a node neither registered nor connected (its record is about to be
// pruned). s.mu must be held.
func (s *Server) proxyStatusLocked(id string, n *nodeInfo, p *model.Proxy) (ps ProxyStatus, shown bool) {
	newest := n.newest()
	if p == nil && newest == nil {
		return ps, false
	}
	ps = ProxyStatus{Node: id, Kind: KindSidecar, Connected: newest != nil, Streams: len(n.streams)}
	if p != nil {
		ps.Service, ps.Registered = p.Service, true
	} else {
		ps.Kind = proxyKind(newest.node)
	}
	if newest != nil {
		s.showStreamLocked(&ps, newest)
	}
	if ps.Kind == KindSidecar {
		if len(n.published) > 0 {
			ps.Snapshot = maps.Clone(n.published[len(n.published)-1].versions)
		}
		ps.HeldBack = n.heldBack
	}
	return ps, true
}

// showStreamLocked sets in ps the identity and the exchange of st, the
// node's newest stream. s.mu must be held.
func (s *Server) showStreamLocked(ps *ProxyStatus, st *streamState) {
	since := st.opened
	ps.ConnectedSince, ps.Identity = &since, st.identity
	if ps.Kind == KindProxyless {
		ps.Snapshot = s.proxylessCurrentLocked(st)
	}
	for typ, ts := range st.types {
		if ps.Subscribed == nil {
			ps.Subscribed = map[string][]string{}
		}
		ps.Subscribed[typ] = slices.Clone(ts.subscribed)
		if ts.sentVersion != "" {
			if ps.Sent == nil {
				ps.Sent = map[string]string{}
			}
			ps.Sent[typ] = ts.sentVersion
		}
		if ts.ackedNonce != "" {
			if ps.ACKed == nil {
				ps.ACKed = map[string]string{}
			}
			ps.ACKed[typ] = ts.ackedVersion
		}
	}
}

// blame returns the resources of typeURL a NACK's error_detail blames in the
// snapshot snap of node (cache key key), with their sources. For the
// proxyless group, whose clients are sent only the resources they name,
// the candidates are those of subscribed (the NACK's resource names; all
// when empty). It runs without the lock: snap's inputs are immutable.
func blame(key, node string, snap *published, typeURL string, detail *status.Status, subscribed []string) (res []RejectedResource, named bool) {
	if snap == nil {
		return []RejectedResource{}, false
	}
	names := snap.names[typeURL]
	if key == ProxylessGroup && len(subscribed) > 0 && !slices.Contains(subscribed, "*") {
		names = slices.DeleteFunc(slices.Clone(names), func(n string) bool { return !slices.Contains(subscribed, n) })
	}
	blamed, named := NACKResources(typeURL, detail, names)
	var sm translate.SourceMap
	if key == ProxylessGroup {
		sm = translate.ProxylessSources(snap.cat, snap.pol)
	} else if p := snap.cat.Proxies[node]; p != nil {
		sm, _ = translate.ProxySources(snap.cat, snap.pol, p)
	}
	fields := map[string]string{}
	for _, d := range xds.ParseNACKDetails(detail) {
		if _, seen := fields[d.Name]; d.TypeURL == typeURL && !seen {
			fields[d.Name] = d.Field
		}
	}
	res = make([]RejectedResource, 0, len(blamed))
	for _, n := range blamed {
		res = append(res, RejectedResource{Name: n, Field: fields[n], Sources: sm.For(typeURL, n)})
	}
	return res, named
}

// ErrNoCatalog is returned by Why before the first Consul catalog arrived.
var ErrNoCatalog = errors.New("server: no Consul catalog yet")

// Why explains a connection from the application of the proxy named proxy
// (a proxy service ID or a pod name) to dst on the latest catalog and
// policies (explain.Why). Errors wrap ErrNoCatalog or
// explain.ErrUnknownProxy.
func (s *Server) Why(proxy string, dst netip.AddrPort, o explain.Options) (*explain.Report, error) {
	s.mu.Lock()
	cat, pol := s.catalog, s.policies
	s.mu.Unlock()
	if cat == nil {
		return nil, ErrNoCatalog
	}
	p, err := explain.Find(cat, proxy)
	if err != nil {
		return nil, err
	}
	return explain.Why(cat, pol, p, dst, o)
}
