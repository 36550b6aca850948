package cluster

import (
	"log/slog"
	"sync/atomic"
	"time"

	"github.com/meshlet/meshlet/sidecar/config"
)

// Outcome is what one attempt on an endpoint came to, for outlier detection
// and the endpoint breaker.
type Outcome int

// Outcomes.
const (
	// OutcomeSuccess is any response that is not a 5xx.
	OutcomeSuccess Outcome = iota
	// Outcome5xx is a 5xx response other than 502, 503, 504.
	Outcome5xx
	// OutcomeGatewayError is a 502, 503 or 504 response.
	OutcomeGatewayError
	// OutcomeLocalFailure is a failure that produced no response: connect
	// failure, reset, per-try timeout (Envoy's local-origin errors).
	OutcomeLocalFailure
	// OutcomeCancelled is a request the client gave up: not counted.
	OutcomeCancelled
)

// OutcomeForStatus classifies a response status.
func OutcomeForStatus(code int) Outcome {
	switch {
	case code == 502 || code == 503 || code == 504:
		return OutcomeGatewayError
	case code >= 500:
		return Outcome5xx
	}
	return OutcomeSuccess
}

// outlierState is an endpoint's outlier-detection state.
type outlierState struct {
	consecutive5xx, consecutiveGateway, consecutiveLocal atomic.Int32
	// ejectedUntil is the UnixNano time the current ejection ends, 0 when
	// not ejected.
	ejectedUntil atomic.Int64
	// ejections counts ejections, decayed while the endpoint stays healthy
	// (the multiplier of base_ejection_time).
	ejections  atomic.Int32
	readmitted atomic.Int64 // UnixNano of the last re-admission
}

// outlierDetector applies a cluster's OutlierDetection to its endpoints.
type outlierDetector struct {
	cfg     config.OutlierDetection
	cluster string
	log     *slog.Logger
	ejected atomic.Int32 // endpoints currently ejected
	events  Events
}

// record updates e's counters with an outcome and ejects it when a
// detector's threshold is reached and the ejection cap allows.
func (d *outlierDetector) record(e *Endpoint, o Outcome, hosts int) {
	st := &e.outlier
	local := o == OutcomeLocalFailure
	if local && !d.cfg.SplitLocalOrigin {
		o = OutcomeGatewayError // counted as a 503, as Envoy does without the split
	}
	var reason string
	switch o {
	case OutcomeSuccess:
		st.consecutive5xx.Store(0)
		st.consecutiveGateway.Store(0)
		st.consecutiveLocal.Store(0)
		return
	case OutcomeCancelled:
		return
	case OutcomeLocalFailure:
		if n := st.consecutiveLocal.Add(1); d.cfg.ConsecutiveLocalOriginFailures > 0 && int(n) >= d.cfg.ConsecutiveLocalOriginFailures {
			reason = "consecutive_local_origin_failure"
		}
	case OutcomeGatewayError:
		if n := st.consecutiveGateway.Add(1); d.cfg.ConsecutiveGatewayErrors > 0 && int(n) >= d.cfg.ConsecutiveGatewayErrors {
			reason = "consecutive_gateway_failure"
		}
		fallthrough
	case Outcome5xx:
		if n := st.consecutive5xx.Add(1); d.cfg.Consecutive5xx > 0 && int(n) >= d.cfg.Consecutive5xx && reason == "" {
			reason = "consecutive_5xx"
		}
	}
	if reason != "" {
		d.eject(e, reason, hosts)
	}
}

// eject takes e out of rotation for base_ejection_time × (times ejected),
// capped at max_ejection_time, unless max_ejection_percent of hosts are
// already out (one is always allowed, as in Envoy).
func (d *outlierDetector) eject(e *Endpoint, reason string, hosts int) {
	st := &e.outlier
	now := time.Now()
	if st.ejectedUntil.Load() != 0 {
		return
	}
	limit := max(hosts*d.cfg.MaxEjectionPercent/100, 1)
	if int(d.ejected.Load()) >= limit {
		return
	}
	// Decay the multiplier by one per interval spent healthy since the last
	// re-admission.
	n := st.ejections.Load()
	if last := st.readmitted.Load(); last != 0 && d.cfg.Interval > 0 {
		n = max(n-int32(now.Sub(time.Unix(0, last))/d.cfg.Interval), 0)
	}
	n++
	st.ejections.Store(n)
	dur := min(d.cfg.BaseEjectionTime*time.Duration(n), max(d.cfg.MaxEjectionTime, d.cfg.BaseEjectionTime))
	if !st.ejectedUntil.CompareAndSwap(0, now.Add(dur).UnixNano()) {
		return
	}
	d.ejected.Add(1)
	st.consecutive5xx.Store(0)
	st.consecutiveGateway.Store(0)
	st.consecutiveLocal.Store(0)
	d.log.Warn("outlier detection: endpoint ejected", "cluster", d.cluster, "endpoint", e.Address, "reason", reason, "for", dur, "ejections", n)
	d.events.Ejected(d.cluster, e.Address, reason)
}

// available reports whether e is not ejected, re-admitting it when its
// ejection has run out.
func (d *outlierDetector) available(e *Endpoint, now int64) bool {
	until := e.outlier.ejectedUntil.Load()
	if until == 0 {
		return true
	}
	if now < until {
		return false
	}
	if e.outlier.ejectedUntil.CompareAndSwap(until, 0) {
		d.ejected.Add(-1)
		e.outlier.readmitted.Store(now)
		d.log.Info("outlier detection: endpoint re-admitted", "cluster", d.cluster, "endpoint", e.Address)
	}
	return true
}
