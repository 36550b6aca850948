package xds

// RetryOn is one retry condition of RetryPolicy.retry_on (Envoy's
// x-envoy-retry-on vocabulary): the control plane writes these words, the
// sidecar reads them.
type RetryOn string

// Retry conditions meshlet's sidecar implements: HTTP ones, then gRPC
// status codes read from the headers of a trailers-only gRPC response.
const (
	RetryConnectFailure       RetryOn = "connect-failure"
	RetryRefusedStream        RetryOn = "refused-stream"
	RetryReset                RetryOn = "reset"
	Retry5xx                  RetryOn = "5xx"
	RetryGatewayError         RetryOn = "gateway-error"
	RetryRetriableStatusCodes RetryOn = "retriable-status-codes"

	RetryGRPCCancelled         RetryOn = "cancelled"
	RetryGRPCDeadlineExceeded  RetryOn = "deadline-exceeded"
	RetryGRPCInternal          RetryOn = "internal"
	RetryGRPCResourceExhausted RetryOn = "resource-exhausted"
	RetryGRPCUnavailable       RetryOn = "unavailable"
)

// Envoy retry conditions meshlet's sidecar does not implement: the control
// plane passes them through (Envoy, proxyless gRPC), a meshlet sidecar
// NACKs them.
const (
	RetryEnvoyRateLimited        RetryOn = "envoy-ratelimited"
	RetryRetriable4xx            RetryOn = "retriable-4xx"
	RetryResetBeforeRequest      RetryOn = "reset-before-request"
	RetryHTTP3PostConnectFailure RetryOn = "http3-post-connect-failure"
	RetryRetriableHeaders        RetryOn = "retriable-headers"
)

// SidecarRetryConditions are the conditions meshlet's sidecar implements,
// in a stable order.
var SidecarRetryConditions = []RetryOn{
	RetryConnectFailure, RetryRefusedStream, RetryReset, Retry5xx, RetryGatewayError, RetryRetriableStatusCodes,
	RetryGRPCCancelled, RetryGRPCDeadlineExceeded, RetryGRPCInternal, RetryGRPCResourceExhausted, RetryGRPCUnavailable,
}

// EnvoyOnlyRetryConditions are the Envoy conditions meshlet's sidecar
// rejects.
var EnvoyOnlyRetryConditions = []RetryOn{
	RetryEnvoyRateLimited, RetryRetriable4xx, RetryResetBeforeRequest, RetryHTTP3PostConnectFailure, RetryRetriableHeaders,
}

// GRPCRetryCondition returns the retry condition of a gRPC status code as
// written in the grpc-status header ("14" → unavailable), "" when the code
// has none.
func GRPCRetryCondition(grpcStatus string) RetryOn {
	switch grpcStatus {
	case "1":
		return RetryGRPCCancelled
	case "4":
		return RetryGRPCDeadlineExceeded
	case "8":
		return RetryGRPCResourceExhausted
	case "13":
		return RetryGRPCInternal
	case "14":
		return RetryGRPCUnavailable
	}
	return ""
}

// IsGRPC reports whether c is a gRPC status condition.
func (c RetryOn) IsGRPC() bool {
	switch c {
	case RetryGRPCCancelled, RetryGRPCDeadlineExceeded, RetryGRPCInternal, RetryGRPCResourceExhausted, RetryGRPCUnavailable:
		return true
	}
	return false
}
