package cluster

import (
	"errors"
	"fmt"
	"net"
	"strings"
)

// ErrorKind classifies an upstream failure.
type ErrorKind int

// Kinds of upstream failure.
const (
	// KindConnectFailure: the connection could not be opened. Nothing
	// reached the upstream.
	KindConnectFailure ErrorKind = iota
	// KindRefusedStream: the HTTP/2 stream was refused (REFUSED_STREAM).
	// Nothing reached the application.
	KindRefusedStream
	// KindReset: the connection failed after the request started, before a
	// response. Sent says whether any byte may have reached the upstream.
	KindReset
	// KindOverflow: a circuit-breaker limit (max_connections,
	// max_pending_requests) refused the request. Nothing was sent.
	KindOverflow
	// KindTimeout: the attempt's deadline passed before the response.
	KindTimeout
	// KindTLSHandshake: the mTLS handshake with the endpoint failed (wrong
	// identity, unknown CA, expired certificate...). Nothing was sent.
	KindTLSHandshake
)

// UpstreamError is a failed round trip.
type UpstreamError struct {
	Kind ErrorKind
	// Sent is false when nothing reached the upstream, so any request can
	// be sent again safely.
	Sent bool
	Err  error
}

func (e *UpstreamError) Error() string {
	names := map[ErrorKind]string{KindConnectFailure: "connect failure", KindRefusedStream: "refused stream", KindReset: "upstream reset",
		KindOverflow: "circuit breaker overflow", KindTimeout: "timeout", KindTLSHandshake: "TLS handshake failed"}
	return fmt.Sprintf("%s: %v", names[e.Kind], e.Err)
}

func (e *UpstreamError) Unwrap() error { return e.Err }

var (
	errMaxConnections = errors.New("cluster at max_connections")
	errMaxPending     = errors.New("cluster at max_pending_requests")
)

// classifyH2 turns a net/http HTTP/2 transport error into an UpstreamError.
func classifyH2(err error) *UpstreamError {
	var ue *UpstreamError
	if errors.As(err, &ue) {
		return ue
	}
	var op *net.OpError
	if errors.As(err, &op) && op.Op == "dial" {
		return &UpstreamError{Kind: KindConnectFailure, Err: err}
	}
	if errors.Is(err, errMaxConnections) {
		return &UpstreamError{Kind: KindOverflow, Err: err}
	}
	if strings.Contains(err.Error(), "REFUSED_STREAM") {
		return &UpstreamError{Kind: KindRefusedStream, Err: err}
	}
	return &UpstreamError{Kind: KindReset, Sent: true, Err: err}
}
