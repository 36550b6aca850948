package xds

import (
	"errors"
	"fmt"
	"slices"
	"testing"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/protobuf/types/known/anypb"
)

func TestNACKStatusRoundTrip(t *testing.T) {
	details := []NACKDetail{
		{TypeURL: RouteType, Name: "api", Field: "virtual_hosts[0].routes[0].route.retry_policy.retry_on", Reason: NACKInvalidResource},
		{TypeURL: ListenerType, Name: "upstream:api", Field: "address", Reason: NACKBindFailed},
		{TypeURL: ClusterType, Reason: NACKInvalidResource}, // no name: not decoded far enough
	}
	st := NewNACKStatus("the message", details...)
	if st.GetCode() != 3 || st.GetMessage() != "the message" || len(st.GetDetails()) != len(details) {
		t.Fatalf("status = %v", st)
	}
	var info errdetails.ErrorInfo
	if err := st.GetDetails()[0].UnmarshalTo(&info); err != nil {
		t.Fatal(err)
	}
	if info.GetDomain() != NACKDomain || info.GetReason() != "INVALID_RESOURCE" ||
		info.GetMetadata()["typeUrl"] != RouteType || info.GetMetadata()["name"] != "api" {
		t.Errorf("ErrorInfo = %v", &info)
	}
	if got := ParseNACKDetails(st); !slices.Equal(got, details) {
		t.Errorf("ParseNACKDetails = %+v, want %+v", got, details)
	}
	// The reason defaults to NACKInvalidResource.
	if got := ParseNACKDetails(NewNACKStatus("m", NACKDetail{TypeURL: SecretType, Name: "default"})); len(got) != 1 || got[0].Reason != NACKInvalidResource {
		t.Errorf("default reason: %+v", got)
	}
}

func TestParseNACKDetailsSkipsOthers(t *testing.T) {
	foreign, err := anypb.New(&errdetails.ErrorInfo{Domain: "example.com", Reason: "X", Metadata: map[string]string{"name": "api"}})
	if err != nil {
		t.Fatal(err)
	}
	other, err := anypb.New(&errdetails.DebugInfo{Detail: "x"})
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name string
		st   *status.Status
	}{
		{name: "nil", st: nil},
		{name: "prose only (grpc-go, Envoy)", st: &status.Status{Code: 3, Message: `cluster "api": bad`}},
		{name: "other domains and types", st: &status.Status{Code: 3, Details: []*anypb.Any{foreign, other}}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := ParseNACKDetails(tc.st); got != nil {
				t.Errorf("ParseNACKDetails = %+v, want nil", got)
			}
		})
	}
}

func TestResourceErrorAndNACKDetailsOf(t *testing.T) {
	base := errors.New("unsupported")
	re := &ResourceError{Kind: KindRouteConfiguration, Name: "api", Field: "virtual_hosts[0]", Err: base}
	if got, want := re.Error(), `route configuration "api": virtual_hosts[0]: unsupported`; got != want {
		t.Errorf("Error() = %q, want %q", got, want)
	}
	if got, want := (&ResourceError{Kind: KindSecret, Name: "default", Err: base}).Error(), `secret "default": unsupported`; got != want {
		t.Errorf("Error() without field = %q, want %q", got, want)
	}
	if !errors.Is(re, base) {
		t.Error("ResourceError does not unwrap to Err")
	}
	nested := &ResourceError{Kind: KindRouteConfiguration, Name: "api", Field: "virtual_hosts[0].routes[0]",
		Err: &FieldError{Field: "route.retry_policy", Err: &FieldError{Field: "retry_on", Err: base}}}
	if got, want := nested.Error(), `route configuration "api": virtual_hosts[0].routes[0]: route.retry_policy: retry_on: unsupported`; got != want {
		t.Errorf("Error() with FieldErrors = %q, want %q", got, want)
	}
	if got := nested.NACKDetails(); len(got) != 1 || got[0].Field != "virtual_hosts[0].routes[0].route.retry_policy.retry_on" {
		t.Errorf("NACKDetails with FieldErrors = %+v", got)
	}
	other := &ResourceError{Kind: KindCluster, Name: "store", Reason: NACKDuplicateName, Err: base}
	tests := []struct {
		name string
		err  error
		want []NACKDetail
	}{
		{name: "nil", err: nil, want: nil},
		{name: "plain", err: base, want: nil},
		{name: "wrapped", err: fmt.Errorf("resources[2]: %w", re),
			want: []NACKDetail{{TypeURL: RouteType, Name: "api", Field: "virtual_hosts[0]", Reason: NACKInvalidResource}}},
		{name: "joined", err: errors.Join(base, fmt.Errorf("x: %w", other), re),
			want: []NACKDetail{{TypeURL: ClusterType, Name: "store", Reason: NACKDuplicateName},
				{TypeURL: RouteType, Name: "api", Field: "virtual_hosts[0]", Reason: NACKInvalidResource}}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := NACKDetailsOf(tc.err); !slices.Equal(got, tc.want) {
				t.Errorf("NACKDetailsOf = %+v, want %+v", got, tc.want)
			}
		})
	}
}

func TestResourceKinds(t *testing.T) {
	for _, k := range ResourceKinds {
		if KindOf(k.TypeURL()) != k {
			t.Errorf("KindOf(%q.TypeURL()) = %q", k, KindOf(k.TypeURL()))
		}
	}
	if KindOf("type.googleapis.com/google.protobuf.Empty") != "" || ResourceKind("route").TypeURL() != "" {
		t.Error("unknown types and kinds must map to \"\"")
	}
}
