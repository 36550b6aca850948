package sidecar

import (
	"github.com/meshlet/meshlet/sidecar/config"
	"github.com/meshlet/meshlet/sidecar/xdsstate"
)

// applier is the Sidecar as the xDS state's Applier: it binds listener
// addresses and builds listeners, clusters, certificates and tracers from
// each activated snapshot.
type applier struct{ s *Sidecar }

var _ xdsstate.Applier = applier{}

// Bind implements xdsstate.Applier.
func (a applier) Bind(listeners map[string]*config.Listener) error {
	return a.s.listeners.Bind(listeners)
}

// Apply implements xdsstate.Applier.
func (a applier) Apply(snap *xdsstate.Snapshot) {
	s, c := a.s, snap.Config
	s.tls.Set(c.Secrets) // first: new handshakes use new certificates and roots
	s.tracing.Sync(c.TraceProviders())
	s.clusters.Update(c.Clusters, c.Endpoints)
	if err := s.listeners.Apply(c); err != nil {
		s.log.Error("xds: applying listeners", "error", err)
	}
	s.mu.Lock()
	s.active = snap
	s.mu.Unlock()
	if !s.ready.Swap(true) {
		s.log.Info("sidecar: ready; first config applied", "listeners", len(c.Listeners), "clusters", len(c.Clusters))
		if s.cfg.ReclaimStartupMemory {
			s.reclaimStartupMemory()
		}
	}
}
