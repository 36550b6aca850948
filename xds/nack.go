package xds

import (
	"errors"
	"fmt"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/types/known/anypb"
)

// ResourceKind is the word a NACK's message puts before the quoted name of
// a rejected resource (`route configuration "api": virtual_hosts[0]...`):
// the resource's proto message name in words, one per type URL. The words
// are for people; programs read the type URL of NACKDetail.
type ResourceKind string

// Resource kinds of the types served over ADS.
const (
	KindListener           ResourceKind = "listener"                // ListenerType: envoy.config.listener.v3.Listener
	KindRouteConfiguration ResourceKind = "route configuration"     // RouteType: envoy.config.route.v3.RouteConfiguration
	KindCluster            ResourceKind = "cluster"                 // ClusterType: envoy.config.cluster.v3.Cluster
	KindLoadAssignment     ResourceKind = "cluster load assignment" // EndpointType: envoy.config.endpoint.v3.ClusterLoadAssignment
	KindSecret             ResourceKind = "secret"                  // SecretType: envoy.extensions.transport_sockets.tls.v3.Secret
)

// kindTypeURLs pairs each resource kind with its type URL.
var kindTypeURLs = [...]struct {
	kind    ResourceKind
	typeURL string
}{
	{KindListener, ListenerType},
	{KindRouteConfiguration, RouteType},
	{KindCluster, ClusterType},
	{KindLoadAssignment, EndpointType},
	{KindSecret, SecretType},
}

// ResourceKinds are the kinds of the types served over ADS, in the order
// listener, route configuration, cluster, cluster load assignment, secret.
var ResourceKinds = func() []ResourceKind {
	ks := make([]ResourceKind, len(kindTypeURLs))
	for i, p := range kindTypeURLs {
		ks[i] = p.kind
	}
	return ks
}()

// KindOf returns the kind of the resources of typeURL, "" for a type not
// served over ADS.
func KindOf(typeURL string) ResourceKind {
	for _, p := range kindTypeURLs {
		if p.typeURL == typeURL {
			return p.kind
		}
	}
	return ""
}

// TypeURL returns the type URL of the resources of kind k, "" for an
// unknown kind.
func (k ResourceKind) TypeURL() string {
	for _, p := range kindTypeURLs {
		if p.kind == k {
			return p.typeURL
		}
	}
	return ""
}

// NACKDomain is the google.rpc.ErrorInfo.domain of the details meshlet's
// sidecar puts in a NACK (google.rpc API: the product that generates the
// error). Details of other domains are not meshlet's and are ignored.
const NACKDomain = "meshlet.io"

// NACKReason is the google.rpc.ErrorInfo.reason of one rejected resource
// in a NACK: UPPER_SNAKE_CASE, at most 63 characters, as the google.rpc
// API asks; unique within NACKDomain.
type NACKReason string

// Reasons a sidecar rejects a resource.
const (
	// NACKInvalidResource: the resource, or the field NACKDetail.Field
	// names, is malformed or asks for what the sidecar does not implement.
	// The default.
	NACKInvalidResource NACKReason = "INVALID_RESOURCE"
	// NACKDuplicateName: the response holds two resources of this name.
	NACKDuplicateName NACKReason = "DUPLICATE_NAME"
	// NACKAddressConflict: the listener's address is another listener's
	// of the same protocol in the same response.
	NACKAddressConflict NACKReason = "ADDRESS_CONFLICT"
	// NACKBindFailed: the sidecar could not bind the listener's address
	// (in use, not local, not permitted).
	NACKBindFailed NACKReason = "BIND_FAILED"
)

// ErrorInfo.metadata keys of a NACKDetail (lowerCamelCase, as the
// google.rpc API asks).
const (
	nackKeyTypeURL = "typeUrl"
	nackKeyName    = "name"
	nackKeyField   = "field"
)

// NACKDetail names one resource a NACK rejects, in the stable form the
// control plane reads instead of the NACK's prose. On the wire it is one
// google.rpc.ErrorInfo in DiscoveryRequest.error_detail.details
// (google.rpc.Status): domain NACKDomain, reason Reason, metadata
// {"typeUrl": TypeURL, "name": Name, "field": Field} (empty values left
// out).
type NACKDetail struct {
	// TypeURL is the rejected resource's type URL (ListenerType...).
	TypeURL string
	// Name is the resource's name (a ClusterLoadAssignment's
	// cluster_name); "" when the resource could not be decoded far enough
	// to read it.
	Name string
	// Field is the path of the field at fault, with proto field names and
	// indexes (`virtual_hosts[0].routes[1].route.retry_policy.retry_on`);
	// "" for the resource as a whole.
	Field string
	// Reason is why; "" reads as NACKInvalidResource.
	Reason NACKReason
}

// NewNACKStatus returns the error_detail of a NACK (xDS
// DiscoveryRequest.error_detail, a google.rpc.Status): code
// INVALID_ARGUMENT (what Envoy sends), message msg (the human text, kept
// for people and for clients that read only it) and one
// google.rpc.ErrorInfo per detail, in order (see NACKDetail).
func NewNACKStatus(msg string, details ...NACKDetail) *status.Status {
	st := &status.Status{Code: int32(codes.InvalidArgument), Message: msg}
	for _, d := range details {
		md := map[string]string{}
		for k, v := range map[string]string{nackKeyTypeURL: d.TypeURL, nackKeyName: d.Name, nackKeyField: d.Field} {
			if v != "" {
				md[k] = v
			}
		}
		reason := d.Reason
		if reason == "" {
			reason = NACKInvalidResource
		}
		a, err := anypb.New(&errdetails.ErrorInfo{Reason: string(reason), Domain: NACKDomain, Metadata: md})
		if err != nil {
			continue // marshalling an ErrorInfo of strings cannot fail
		}
		st.Details = append(st.Details, a)
	}
	return st
}

// ParseNACKDetails returns the NACKDetails of st in order: its ErrorInfo
// details of domain NACKDomain. Other details are skipped; nil when there
// is none (a NACK from a client other than meshlet's sidecar, whose
// message is all there is).
func ParseNACKDetails(st *status.Status) []NACKDetail {
	var out []NACKDetail
	for _, a := range st.GetDetails() {
		var info errdetails.ErrorInfo
		if !a.MessageIs(&info) || a.UnmarshalTo(&info) != nil || info.GetDomain() != NACKDomain {
			continue
		}
		md := info.GetMetadata()
		out = append(out, NACKDetail{TypeURL: md[nackKeyTypeURL], Name: md[nackKeyName], Field: md[nackKeyField],
			Reason: NACKReason(info.GetReason())})
	}
	return out
}

// ResourceError is an error about one resource of a response: what the
// sidecar's decoders return, and what a NACK is made of. Its text is the
// NACK prose `<kind> "<name>": <field>: <Err>` (without the field part when
// Field is ""); NACKDetails gives its structured form.
type ResourceError struct {
	// Kind and Name identify the resource (Name "" when unknown).
	Kind ResourceKind
	Name string
	// Field is the path of the field at fault (see NACKDetail.Field).
	Field string
	// Reason is why ("" reads as NACKInvalidResource).
	Reason NACKReason
	// Err is what is wrong, for people; it is unwrapped.
	Err error
}

// Error returns `<kind> "<name>": <field>: <err>`.
func (e *ResourceError) Error() string {
	if e.Field == "" {
		return fmt.Sprintf("%s %q: %v", e.Kind, e.Name, e.Err)
	}
	return fmt.Sprintf("%s %q: %s: %v", e.Kind, e.Name, e.Field, e.Err)
}

// Unwrap returns Err.
func (e *ResourceError) Unwrap() error { return e.Err }

// NACKDetails returns e's structured form: one NACKDetail (Reason
// NACKInvalidResource when e.Reason is ""). Its Field is e.Field followed
// by the fields of the *FieldError chain in e.Err
// ("virtual_hosts[0].routes[0]" then "route.retry_policy" then "retry_on").
func (e *ResourceError) NACKDetails() []NACKDetail {
	r := e.Reason
	if r == "" {
		r = NACKInvalidResource
	}
	field := e.Field
	var fe *FieldError
	for err := e.Err; errors.As(err, &fe); err = fe.Err {
		if field != "" {
			field += "."
		}
		field += fe.Field
	}
	return []NACKDetail{{TypeURL: e.Kind.TypeURL(), Name: e.Name, Field: field, Reason: r}}
}

// FieldError is an error at a field below the one its enclosing error
// names, so nested decoders can say where without knowing the resource:
// its text is `<field>: <err>`, and a ResourceError holding it extends
// its NACKDetail.Field with Field.
type FieldError struct {
	// Field is the path, relative to the enclosing error's, with proto
	// field names (`route.retry_policy`, `match.headers[0]`).
	Field string
	// Err is what is wrong there; it is unwrapped.
	Err error
}

// Error returns `<field>: <err>`.
func (e *FieldError) Error() string { return e.Field + ": " + e.Err.Error() }

// Unwrap returns Err.
func (e *FieldError) Unwrap() error { return e.Err }

// nackDetailer is an error that names the resources it rejects.
type nackDetailer interface {
	NACKDetails() []NACKDetail
}

// NACKDetailsOf returns the details of every error in err's tree (Unwrap()
// error and Unwrap() []error, depth first, as errors.As walks it) that has
// a method NACKDetails() []NACKDetail, such as *ResourceError; the search
// does not descend into such an error. Nil when there is none.
func NACKDetailsOf(err error) []NACKDetail {
	if err == nil {
		return nil
	}
	if d, ok := err.(nackDetailer); ok {
		return d.NACKDetails()
	}
	switch u := err.(type) {
	case interface{ Unwrap() error }:
		return NACKDetailsOf(u.Unwrap())
	case interface{ Unwrap() []error }:
		var out []NACKDetail
		for _, e := range u.Unwrap() {
			out = append(out, NACKDetailsOf(e)...)
		}
		return out
	}
	return nil
}
