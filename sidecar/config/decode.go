package config

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strconv"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/meshlet/meshlet/xds"
)

// ErrInvalid is wrapped by every error a Decode function returns.
var ErrInvalid = errors.New("invalid resource")

// invalid is the message of a ResourceError from a decoder; it unwraps to
// ErrInvalid.
type invalid string

func (e invalid) Error() string { return string(e) }
func (e invalid) Unwrap() error { return ErrInvalid }

// fieldErr returns the error of one field of one resource: an
// *xds.ResourceError (the NACK names the resource and field in its
// details) wrapping ErrInvalid. An empty field blames the whole resource.
func fieldErr(kind xds.ResourceKind, name, field, format string, args ...any) error {
	return &xds.ResourceError{Kind: kind, Name: name, Field: field, Err: invalid(fmt.Sprintf(format, args...))}
}

// invalidCause is the cause of a ResourceError from a decoder when it is
// an error of its own (its *xds.FieldError path extends the field): it
// unwraps to ErrInvalid and to the cause.
type invalidCause struct{ err error }

func (e invalidCause) Error() string   { return e.err.Error() }
func (e invalidCause) Unwrap() []error { return []error{ErrInvalid, e.err} }

// fieldErrAt is fieldErr with an error as the message: the path of any
// *xds.FieldError in err continues field in the NACK's details.
func fieldErrAt(kind xds.ResourceKind, name, field string, err error) error {
	return &xds.ResourceError{Kind: kind, Name: name, Field: field, Err: invalidCause{err}}
}

type validatable interface {
	proto.Message
	ValidateAll() error
}

// unpack unmarshals a into m (checking the type URL) and runs m's generated
// validation.
func unpack(a *anypb.Any, m validatable, kind xds.ResourceKind) error {
	if a == nil {
		return fieldErr(kind, "", "", "empty resource")
	}
	if err := a.UnmarshalTo(m); err != nil {
		return fieldErr(kind, "", "", "cannot decode %s: %v", a.GetTypeUrl(), err)
	}
	if err := m.ValidateAll(); err != nil {
		name := ""
		if n, ok := m.(interface{ GetName() string }); ok {
			name = n.GetName()
		} else if n, ok := m.(interface{ GetClusterName() string }); ok {
			name = n.GetClusterName()
		}
		return fieldErr(kind, name, "", "%v", err)
	}
	return nil
}

// unsupportedField returns the name of the first field set in m that is
// not among supported (proto field names), or "" when there is none, so a
// NACK can name a field the sidecar would otherwise silently ignore.
func unsupportedField(m proto.Message, supported ...string) string {
	var found protoreflect.FieldDescriptor
	m.ProtoReflect().Range(func(fd protoreflect.FieldDescriptor, _ protoreflect.Value) bool {
		if !slices.Contains(supported, string(fd.Name())) && (found == nil || fd.Number() < found.Number()) {
			found = fd // the lowest field number, for a stable message
		}
		return true
	})
	if found == nil {
		return ""
	}
	return string(found.Name())
}

// socketAddressUDP returns "host:port" of a TCP or UDP socket address, and
// whether it is UDP. For listeners the host must be an IP address and port
// 0 is refused.
func socketAddressUDP(a *core.Address, forListener bool) (string, bool, error) {
	addr, err := socketHostPort(a, forListener)
	return addr, a.GetSocketAddress().GetProtocol() == core.SocketAddress_UDP, err
}

func socketHostPort(a *core.Address, forListener bool) (string, error) {
	sa := a.GetSocketAddress()
	if sa == nil {
		return "", errors.New("a socket_address is required (pipes and internal addresses are not supported)")
	}
	if p := sa.GetProtocol(); p != core.SocketAddress_TCP && p != core.SocketAddress_UDP {
		return "", fmt.Errorf("protocol %s is not supported", p)
	}
	pv, ok := sa.GetPortSpecifier().(*core.SocketAddress_PortValue)
	if !ok {
		return "", errors.New("port_value is required (named ports are not supported)")
	}
	if pv.PortValue == 0 || pv.PortValue > 65535 {
		return "", fmt.Errorf("port %d out of range 1-65535", pv.PortValue)
	}
	host := sa.GetAddress()
	if forListener {
		if _, err := netip.ParseAddr(host); err != nil {
			return "", fmt.Errorf("listener address %q is not an IP address", host)
		}
	} else if host == "" {
		return "", errors.New("address is required")
	}
	return net.JoinHostPort(host, strconv.Itoa(int(pv.PortValue))), nil
}

func isADS(cs *core.ConfigSource) bool {
	return cs != nil && cs.GetAds() != nil
}

func sortedKeys(set map[string]bool) []string {
	out := make([]string, 0, len(set))
	for k := range set {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}
