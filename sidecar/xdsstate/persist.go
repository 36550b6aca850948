package xdsstate

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"

	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/meshlet/meshlet/xds"
)

// persistOrder is the order state is restored in: what listeners and
// clusters reference first.
var persistOrder = []string{xds.SecretType, xds.ClusterType, xds.EndpointType, xds.ListenerType, xds.RouteType}

func stateFile(dir, typeURL string) string {
	return filepath.Join(dir, typeURL[strings.LastIndexByte(typeURL, '.')+1:]+".json")
}

// persist writes the accepted resources of typeURL to the state directory
// as a DiscoveryResponse in JSON (write to a temporary file, then rename),
// readable by the sidecar's user only: secrets hold its private key.
func persist(dir, typeURL, version string, raw map[string]*anypb.Any) error {
	names := make([]string, 0, len(raw))
	for n := range raw {
		names = append(names, n)
	}
	slices.Sort(names)
	resp := &discovery.DiscoveryResponse{TypeUrl: typeURL, VersionInfo: version}
	for _, n := range names {
		resp.Resources = append(resp.Resources, raw[n])
	}
	b, err := protojson.MarshalOptions{Multiline: true}.Marshal(resp)
	if err != nil {
		return err
	}
	path := stateFile(dir, typeURL)
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

// Restore applies the config persisted in the state directory, through the
// same validation as an update from the control plane; call it before Run.
// Without Config.StateDir, or with a missing directory or file, it does
// nothing and returns nil; an invalid file is an error (and is skipped).
func (s *State) Restore() error {
	if s.cfg.StateDir == "" {
		return nil
	}
	var errs []error
	restored := 0
	for _, t := range persistOrder {
		b, err := os.ReadFile(stateFile(s.cfg.StateDir, t))
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			errs = append(errs, err)
			continue
		}
		var resp discovery.DiscoveryResponse
		if err := protojson.Unmarshal(b, &resp); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", stateFile(s.cfg.StateDir, t), err))
			continue
		}
		if _, err := s.Update(t, resp.GetVersionInfo(), resp.GetResources()); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", stateFile(s.cfg.StateDir, t), err))
			continue
		}
		restored++
	}
	if restored > 0 {
		s.log.Info("sidecar: restored the last accepted config from the state directory", "dir", s.cfg.StateDir, "types", restored, "ready", s.isApplied())
	}
	return errors.Join(errs...)
}

// isApplied reports whether a snapshot was applied.
func (s *State) isApplied() bool {
	s.updateMu.Lock()
	defer s.updateMu.Unlock()
	return s.applied
}
