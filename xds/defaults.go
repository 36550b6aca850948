package xds

import "time"

// DefaultConnectTimeout is the cluster connect timeout used when none is
// configured (Envoy's Cluster.connect_timeout default: 5 s).
const DefaultConnectTimeout = 5 * time.Second

// DefaultBodyBufferBytes is the size in bytes up to which a request body is
// buffered so that a retry can replay it: the value of
// Route.per_request_buffer_limit_bytes the control plane writes when a
// policy leaves bodyBufferBytes out, and the one the sidecar applies when a
// route has none (64 KiB; Envoy's per_request_buffer_limit_bytes has no
// default and buffers up to the listener's 1 MiB buffer limit, which is
// more memory per request than a sidecar should hold). Larger bodies are
// streamed and their requests not retried.
const DefaultBodyBufferBytes = 64 << 10

// The retry budget a cluster gets when no RetryPolicy sets one
// (ClusterExtras.RetryBudget): retries may be up to
// DefaultRetryBudgetRatio of the requests, plus
// DefaultRetryBudgetMinPerSecond retries per second, counted over the last
// DefaultRetryBudgetTTL. Linkerd's defaults (its retry budget: 20 %, 10 per
// second, 10 s window); Envoy's CircuitBreakers.Thresholds.retry_budget
// bounds retries in flight instead (budget_percent of active requests).
const (
	DefaultRetryBudgetRatio        = 0.2
	DefaultRetryBudgetMinPerSecond = 10
	DefaultRetryBudgetTTL          = 10 * time.Second
)
