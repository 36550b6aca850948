// Package intercept is transparent interception on the pod side: the
// iptables rules that redirect a pod's TCP traffic to its sidecar's capture
// listeners, and reading a redirected connection's original destination.
package intercept

import (
	"errors"
)

// ErrNoOriginalDst is returned by OriginalDst for a connection that was not
// redirected by netfilter (its original destination is its own local
// address) or whose socket cannot be asked.
var ErrNoOriginalDst = errors.New("intercept: no original destination")
