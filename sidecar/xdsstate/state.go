// Package xdsstate is the sidecar's xDS state, kept beside the ADS stream
// (package xdsclient) as grpc-go keeps its resource cache beside
// ads_stream.go: it decodes and validates every response, keeps the
// accepted resources (the last good config stays in force after a NACK),
// asks for the dependent subscriptions (RDS names from listeners, EDS names
// from clusters, SDS names from both), warms a new config until everything
// it references has arrived (or the warm timeout passes), persists the
// accepted config and restores it at start-up. Each config it activates is
// one immutable Snapshot handed to an Applier; the sidecar builds its
// listeners and clusters from it.
package xdsstate

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"os"
	"strings"
	"sync"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/meshlet/meshlet/sidecar/config"
	"github.com/meshlet/meshlet/sidecar/xdsclient"
	"github.com/meshlet/meshlet/xds"
)

// DefaultWarmTimeout is how long a new config waits for the route
// configurations, load assignments and secrets it references before it is
// activated anyway (Envoy's initial_fetch_timeout default).
const DefaultWarmTimeout = 15 * time.Second

// Applier is what the State drives: the sidecar's listeners and clusters.
type Applier interface {
	// Bind is called with every valid set of listeners before it is
	// accepted, to bind the addresses not bound yet; an error rejects the
	// update (NACK, its text in error_detail).
	Bind(listeners map[string]*config.Listener) error
	// Apply activates snap. Calls are serialised, and made while the
	// State holds its update lock: Apply must not call State.Update.
	Apply(snap *Snapshot)
}

// Config configures a State.
type Config struct {
	// Server is the control plane's ADS address, "host:port". Required.
	Server string
	// Node identifies the proxy; Node.Id is required.
	Node *core.Node
	// Credentials verify the control plane and prove the proxy's
	// identity (xdsclient.Credentials); required.
	Credentials xdsclient.Credentials
	// Applier receives the listeners to bind and the configs to activate.
	// Required.
	Applier Applier
	// WarmTimeout is DefaultWarmTimeout when 0.
	WarmTimeout time.Duration
	// StateDir, when set, is where the last accepted config is kept (one
	// JSON DiscoveryResponse per type); created if missing.
	StateDir string
	// MinBackoff and MaxBackoff bound reconnect delays; the xdsclient
	// defaults when 0.
	MinBackoff, MaxBackoff time.Duration
	// Logger defaults to slog.Default().
	Logger *slog.Logger
}

// Validate reports missing required fields.
func (c *Config) Validate() error {
	if c.Applier == nil {
		return errors.New("xdsstate: Config.Applier is required")
	}
	return nil
}

// Rejection is a NACKed update.
type Rejection struct {
	Version string
	Time    time.Time
	Error   string
}

// State is the sidecar's xDS state and its ADS stream. Create it with New;
// restore persisted config with Restore, then run the stream with Run.
type State struct {
	cfg    Config
	log    *slog.Logger
	client *xdsclient.Client

	// updateMu serialises Update, activation and the warm timer; the
	// Applier is called with it held.
	updateMu  sync.Mutex
	warmTimer *time.Timer // guarded by updateMu
	applied   bool        // a snapshot was applied; guarded by updateMu
	closed    bool        // Close was called; guarded by updateMu

	mu sync.Mutex // guards the fields below; held only for short copies
	// accepted is the latest accepted snapshot, active or warming.
	accepted *Snapshot
	rejected map[string]Rejection // by type URL, until the type's next accepted update
}

var _ xdsclient.Handler = (*State)(nil)

// New returns a State whose ADS client is configured but not running.
func New(cfg Config) (*State, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if cfg.WarmTimeout == 0 {
		cfg.WarmTimeout = DefaultWarmTimeout
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	s := &State{cfg: cfg, log: cfg.Logger, accepted: emptySnapshot(), rejected: map[string]Rejection{}}
	client, err := xdsclient.New(xdsclient.Config{
		Server:      cfg.Server,
		Node:        cfg.Node,
		Credentials: cfg.Credentials,
		Handler:     s,
		Logger:      cfg.Logger,
		MinBackoff:  cfg.MinBackoff,
		MaxBackoff:  cfg.MaxBackoff,
	})
	if err != nil {
		return nil, err
	}
	s.client = client
	if cfg.StateDir != "" {
		if err := os.MkdirAll(cfg.StateDir, 0o700); err != nil {
			return nil, fmt.Errorf("xdsstate: state directory: %w", err)
		}
	}
	return s, nil
}

// Run keeps the ADS stream open until ctx is done (xdsclient.Client.Run),
// then stops warming (see Close). It returns ctx.Err().
func (s *State) Run(ctx context.Context) error {
	defer s.Close()
	return s.client.Run(ctx)
}

// Close stops the warm timer; no config is activated after it returns.
// Close is idempotent.
func (s *State) Close() {
	s.updateMu.Lock()
	defer s.updateMu.Unlock()
	s.closed = true
	if s.warmTimer != nil {
		s.warmTimer.Stop()
		s.warmTimer = nil
	}
}

// Status returns the ADS stream's status.
func (s *State) Status() xdsclient.Status { return s.client.Status() }

// Accepted returns the latest accepted snapshot: the active config, or a
// newer one still warming.
func (s *State) Accepted() *Snapshot {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.accepted
}

// Rejected returns the last rejected update of each type not accepted
// since.
func (s *State) Rejected() map[string]Rejection {
	s.mu.Lock()
	defer s.mu.Unlock()
	return maps.Clone(s.rejected)
}

// Update implements xdsclient.Handler: it validates one response, has the
// Applier bind new listener addresses, accepts the resources, persists
// them, and activates the config once every reference is resolved (or the
// warm timeout passes).
func (s *State) Update(typeURL, version string, resources []*anypb.Any) (map[string][]string, error) {
	s.updateMu.Lock()
	defer s.updateMu.Unlock()
	decoded, raw, err := decodeAll(typeURL, resources)
	if err == nil && typeURL == xds.ListenerType {
		err = s.cfg.Applier.Bind(typed[*config.Listener](decoded))
	}
	if err != nil {
		s.mu.Lock()
		s.rejected[typeURL] = Rejection{Version: version, Time: time.Now(), Error: err.Error()}
		s.mu.Unlock()
		return nil, err
	}

	s.mu.Lock()
	snap, deps := s.accepted.next(typeURL, version, time.Now(), decoded, raw)
	s.accepted = snap
	delete(s.rejected, typeURL)
	s.mu.Unlock()
	if s.cfg.StateDir != "" {
		if err := persist(s.cfg.StateDir, typeURL, version, snap.Types[typeURL].Resources); err != nil {
			s.log.Warn("sidecar: could not persist accepted config", "type", typeURL, "dir", s.cfg.StateDir, "error", err)
		}
	}
	s.activate(snap, false)
	return deps, nil
}

// activate applies snap once nothing is missing, or, with force (the warm
// timer fired), with what there is. updateMu must be held.
func (s *State) activate(snap *Snapshot, force bool) {
	if s.closed {
		return
	}
	if !snap.Complete() {
		if !force || !snap.haveBase() {
			if snap.haveBase() && s.warmTimer == nil {
				s.warmTimer = time.AfterFunc(s.cfg.WarmTimeout, s.warmTimeout)
			}
			s.log.Debug("xds: warming", "waiting for", strings.Join(snap.Missing, ", "))
			return
		}
		s.log.Warn("xds: activating config without everything it references after the warm timeout",
			"missing", strings.Join(snap.Missing, ", "), "warmTimeout", s.cfg.WarmTimeout)
	}
	if s.warmTimer != nil {
		s.warmTimer.Stop()
		s.warmTimer = nil
	}
	s.applied = true
	s.cfg.Applier.Apply(snap)
}

// warmTimeout activates the latest accepted snapshot with what it has.
func (s *State) warmTimeout() {
	s.updateMu.Lock()
	defer s.updateMu.Unlock()
	s.warmTimer = nil
	s.activate(s.Accepted(), true)
}
