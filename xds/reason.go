package xds

// FailureReason is the typed cause of a request, connection or datagram the
// sidecar failed itself: the value of ReasonHeader on an HTTP answer, a span
// event attribute (meshlet.reason), a metric label ("reason") and a log
// field, the same word for HTTP, TCP and UDP. Words are lower_snake_case,
// in the spirit of Envoy's response flags spelled out (UH is
// no_healthy_upstream, UO overflow, URX retry limit, UT upstream_timeout).
// The control plane's explanations (controlplane/explain) name these words
// too. Converting one to string costs nothing on the hot path.
type FailureReason string

// ReasonHeader carries the FailureReason on HTTP responses the sidecar
// itself answers (and relays from an upstream sidecar).
const ReasonHeader = "X-Meshlet-Reason"

// Failure reasons shared by HTTP, TCP and UDP.
const (
	ReasonNoCluster         FailureReason = "no_cluster"          // the route's or listener's cluster is not configured
	ReasonNoHealthyUpstream FailureReason = "no_healthy_upstream" // no endpoint, or all ejected
	ReasonCircuitOpen       FailureReason = "circuit_open"        // every endpoint's breaker is open
	ReasonOverflow          FailureReason = "overflow"            // a circuit-breaker threshold was reached
	ReasonConnectFailure    FailureReason = "connect_failure"     // connecting to the endpoint failed
)

// HTTP failure reasons (with the status the sidecar answers).
const (
	ReasonNoRoute              FailureReason = "no_route"               // 404: no virtual host or route matched
	ReasonUpstreamReset        FailureReason = "upstream_reset"         // 503: the upstream closed, reset or refused the stream before answering
	ReasonUpstreamTimeout      FailureReason = "upstream_timeout"       // 504: the route or per-try timeout expired
	ReasonRetryBudgetExhausted FailureReason = "retry_budget_exhausted" // a retry was due but the budget had none left
	ReasonTLSHandshakeFailed   FailureReason = "tls_handshake_failed"   // 503: the mTLS handshake with the upstream failed
	ReasonAuthzDenied          FailureReason = "authz_denied"           // 403: an RBAC rule denied the request (TCP: the connection is closed)
	ReasonUpgradeNotAllowed    FailureReason = "upgrade_not_allowed"    // 403: the route does not allow the protocol upgrade asked for
	// ReasonDownstreamProtocolError: 400, the request's body is malformed
	// (a chunk size that is not one, or overflows); the upstream exchange
	// is aborted at once (Envoy's response flag DPE).
	ReasonDownstreamProtocolError FailureReason = "downstream_protocol_error"
	// ReasonRequestHeadersTooLarge: 431, the request has more header
	// fields than the connection manager's max_headers_count (a head over
	// max_request_headers_kb is answered 431 by the HTTP server itself).
	ReasonRequestHeadersTooLarge FailureReason = "request_headers_too_large"
)

// TCP failure reasons.
const (
	// ReasonNoOriginalDst: a connection to an ORIGINAL_DST cluster without
	// an original destination.
	ReasonNoOriginalDst FailureReason = "no_original_destination"
)

// ReasonIdleTimeout: a TCP proxy connection or a UDP session was closed
// because no byte moved either way for its idle timeout
// (TcpProxy.idle_timeout, UdpProxyConfig.idle_timeout).
const ReasonIdleTimeout FailureReason = "idle_timeout"

// UDP failure reasons of a datagram the sidecar drops (besides the shared
// ones: no_cluster, no_healthy_upstream, circuit_open, overflow,
// connect_failure).
const (
	ReasonTooLarge            FailureReason = "too_large"             // larger than the socket's max_rx_datagram_size
	ReasonUpstreamSendError   FailureReason = "upstream_send_error"   // writing it to the upstream endpoint failed
	ReasonDownstreamSendError FailureReason = "downstream_send_error" // writing the answer back to the downstream failed
)
