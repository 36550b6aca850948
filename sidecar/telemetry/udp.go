package telemetry

import (
	"sync"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/meshlet/meshlet/sidecar/udpproxy"
	"github.com/meshlet/meshlet/xds"
)

// udpVecs are the UDP proxy metrics.
type udpVecs struct {
	active    *prometheus.GaugeVec
	opened    *prometheus.CounterVec
	closed    *prometheus.CounterVec
	datagrams *prometheus.CounterVec
	bytes     *prometheus.CounterVec
	dropped   *prometheus.CounterVec

	meters sync.Map // listener → *udpMeter
}

func newUDPVecs(reg *prometheus.Registry) *udpVecs {
	v := &udpVecs{
		active: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "meshlet_sidecar_udp_sessions_active", Help: "Open UDP sessions (one per downstream address), by listener.",
		}, []string{"listener"}),
		opened: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "meshlet_sidecar_udp_sessions_total", Help: "UDP sessions opened, by listener.",
		}, []string{"listener"}),
		closed: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "meshlet_sidecar_udp_sessions_closed_total", Help: "UDP sessions ended, by listener and reason (idle_timeout, endpoint_gone, upstream_refused, upstream_error, shutdown).",
		}, []string{"listener", "reason"}),
		datagrams: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "meshlet_sidecar_udp_datagrams_total", Help: "UDP datagrams forwarded, by listener and direction (to_upstream, to_downstream).",
		}, []string{"listener", "direction"}),
		bytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "meshlet_sidecar_udp_bytes_total", Help: "UDP payload bytes forwarded, by listener and direction (to_upstream, to_downstream).",
		}, []string{"listener", "direction"}),
		dropped: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "meshlet_sidecar_udp_datagrams_dropped_total", Help: "UDP datagrams not forwarded, by listener and reason.",
		}, []string{"listener", "reason"}),
	}
	reg.MustRegister(v.active, v.opened, v.closed, v.datagrams, v.bytes, v.dropped)
	return v
}

// UDPMeter implements udpproxy.Recorder: the listener's counters, resolved
// once, so counting a datagram is two atomic adds.
func (m *Metrics) UDPMeter(listener string) udpproxy.Meter {
	if v, ok := m.udp.meters.Load(listener); ok {
		return v.(*udpMeter)
	}
	u := m.udp
	mt := &udpMeter{
		vecs: u, listener: listener,
		active: u.active.WithLabelValues(listener), opened: u.opened.WithLabelValues(listener),
		upDatagrams: u.datagrams.WithLabelValues(listener, "to_upstream"), downDatagrams: u.datagrams.WithLabelValues(listener, "to_downstream"),
		upBytes: u.bytes.WithLabelValues(listener, "to_upstream"), downBytes: u.bytes.WithLabelValues(listener, "to_downstream"),
	}
	v, _ := u.meters.LoadOrStore(listener, mt)
	return v.(*udpMeter)
}

// udpMeter is one listener's udpproxy.Meter.
type udpMeter struct {
	vecs                          *udpVecs
	listener                      string
	active                        prometheus.Gauge
	opened                        prometheus.Counter
	upDatagrams, downDatagrams    prometheus.Counter
	upBytes, downBytes            prometheus.Counter
	closedByReason, droppedReason sync.Map // reason → prometheus.Counter
}

func (u *udpMeter) SessionOpened() {
	u.opened.Inc()
	u.active.Inc()
}

func (u *udpMeter) SessionClosed(reason string) {
	u.active.Dec()
	u.counter(&u.closedByReason, u.vecs.closed, reason).Inc()
}

func (u *udpMeter) Datagram(toUpstream bool, n int) {
	if toUpstream {
		u.upDatagrams.Inc()
		u.upBytes.Add(float64(n))
		return
	}
	u.downDatagrams.Inc()
	u.downBytes.Add(float64(n))
}

func (u *udpMeter) Dropped(reason xds.FailureReason) {
	u.counter(&u.droppedReason, u.vecs.dropped, string(reason)).Inc()
}

func (u *udpMeter) counter(cache *sync.Map, vec *prometheus.CounterVec, reason string) prometheus.Counter {
	if c, ok := cache.Load(reason); ok {
		return c.(prometheus.Counter)
	}
	c, _ := cache.LoadOrStore(reason, vec.WithLabelValues(u.listener, reason))
	return c.(prometheus.Counter)
}
