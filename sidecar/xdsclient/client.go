// Package xdsclient is the sidecar's ADS client (xDS v3, state of the world):
// it subscribes, hands every response to a Handler that validates and
// applies it, ACKs or NACKs (with the Handler's error as error_detail, and
// the resources it names as structured details: xds.NewNACKStatus),
// follows the dependent subscriptions the Handler asks for (RDS names from
// listeners, EDS names from clusters), and reconnects with jittered backoff,
// resuming from the last accepted versions.
package xdsclient

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/cenkalti/backoff/v5"
	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/keepalive"
	grpcstatus "google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/meshlet/meshlet/xds"
)

// Handler validates and applies the resources of one response.
type Handler interface {
	// Update receives every resource of typeURL in one response. For
	// listeners and clusters that is the complete set; for route
	// configurations and load assignments, the subscribed ones the server
	// has. A non-nil error rejects the response (NACK, its text in
	// error_detail) and must leave the previous config in force. The
	// resources it names by xds.NACKDetailsOf (*xds.ResourceError values
	// in its tree) go in error_detail's details (xds.NewNACKStatus), so
	// the control plane needs not read the text.
	//
	// On success Update returns the resource names to subscribe to now for
	// dependent types (xds.RouteType, xds.EndpointType), or nil when they
	// do not change.
	Update(typeURL, version string, resources []*anypb.Any) (map[string][]string, error)
}

// Defaults for Config.
const (
	DefaultMinBackoff = 250 * time.Millisecond
	DefaultMaxBackoff = 10 * time.Second
)

// Config configures a Client.
type Config struct {
	// Server is the control plane's ADS address, "host:port", or several
	// replicas' addresses separated by commas ("10.0.0.1:18000,10.0.0.2:18000"):
	// the client holds one connection at a time, to an address picked at
	// random (gRPC pick_first with shuffleAddressList, gRFC A62), and moves
	// to another when that one fails, as Envoy's ADS cluster with several
	// endpoints. A DNS name is resolved by gRPC's DNS resolver (every
	// address it returns is a candidate). Required.
	Server string
	// Node identifies the proxy; Node.Id is required (the proxy service ID
	// registered in Consul). UserAgentName defaults to xds.UserAgentName.
	Node *core.Node
	// Handler validates and applies responses. Required.
	Handler Handler
	// Logger defaults to slog.Default().
	Logger *slog.Logger
	// MinBackoff and MaxBackoff bound the jittered exponential delay before
	// reconnecting; defaults DefaultMinBackoff and DefaultMaxBackoff.
	MinBackoff, MaxBackoff time.Duration
	// Credentials verify the control plane and prove the client's
	// identity (TLS and a bearer token, or Insecure); required unless
	// DialOptions are given.
	Credentials Credentials
	// DialOptions, when set, replace the options Credentials make (tests
	// dialling a custom server).
	DialOptions []grpc.DialOption
}

// Validate reports missing required fields.
func (c *Config) Validate() error {
	switch {
	case c.Server == "":
		return errors.New("xdsclient: Config.Server is required")
	case strings.Contains(c.Server, ","):
		if _, _, err := serverTarget(c.Server); err != nil {
			return err
		}
	case c.Node.GetId() == "":
		return errors.New("xdsclient: Config.Node.Id is required")
	case c.Handler == nil:
		return errors.New("xdsclient: Config.Handler is required")
	}
	if len(c.DialOptions) == 0 {
		return c.Credentials.Validate()
	}
	return nil
}

// Status is a point-in-time view of the client for admin endpoints.
type Status struct {
	Connected bool
	// Versions are the last accepted version per type URL.
	Versions map[string]string
	ACKs     uint64
	NACKs    uint64
	// ACKsByType and NACKsByType count ACKs and NACKs per type URL.
	ACKsByType, NACKsByType map[string]uint64
	// LastNACK is the error_detail of the last rejected response, "" if none.
	LastNACK string
}

// Client is an ADS client. Create it with New and run it with Run.
type Client struct {
	cfg Config

	mu sync.Mutex // guards the fields below
	// subs holds subscription state per type, kept across reconnects so a
	// new stream resumes from the last accepted versions.
	subs   map[string]*subscription
	status Status
	// repeats counts consecutive NACKs of the same version per type, to
	// pace them when a server keeps resending a rejected version.
	repeats map[string]nackRepeat
}

type nackRepeat struct {
	version string
	n       int
}

type subscription struct {
	wildcard bool
	names    []string // sorted; nil for wildcard
	sent     bool     // a request for this type was sent on the current stream
	version  string   // last accepted version
	nonce    string   // nonce of the last response on the current stream
}

// typeOrder is the order of first subscriptions, Envoy's: clusters, then
// endpoints, then listeners, then routes; secrets first.
var typeOrder = []string{xds.SecretType, xds.ClusterType, xds.EndpointType, xds.ListenerType, xds.RouteType}

// New returns a client subscribed to all listeners and clusters (wildcard).
func New(cfg Config) (*Client, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.MinBackoff == 0 {
		cfg.MinBackoff = DefaultMinBackoff
	}
	if cfg.MaxBackoff == 0 {
		cfg.MaxBackoff = DefaultMaxBackoff
	}
	if cfg.Node.GetUserAgentName() == "" {
		cfg.Node.UserAgentName = xds.UserAgentName
	}
	return &Client{
		cfg: cfg,
		subs: map[string]*subscription{
			xds.ClusterType:  {wildcard: true},
			xds.ListenerType: {wildcard: true},
		},
		status:  Status{Versions: map[string]string{}, ACKsByType: map[string]uint64{}, NACKsByType: map[string]uint64{}},
		repeats: map[string]nackRepeat{},
	}, nil
}

// Status returns a copy of the client's status.
func (c *Client) Status() Status {
	c.mu.Lock()
	defer c.mu.Unlock()
	s := c.status
	s.Versions = maps.Clone(c.status.Versions)
	s.ACKsByType = maps.Clone(c.status.ACKsByType)
	s.NACKsByType = maps.Clone(c.status.NACKsByType)
	return s
}

// Run keeps an ADS stream to the server open until ctx is done, reconnecting
// with jittered exponential backoff. The first failure to reach the server
// and the recovery are logged once each; a refusal by the control plane
// (PermissionDenied, Unauthenticated) is logged with its reason whenever
// the reason changes. It returns ctx.Err(), or the error of credentials
// that cannot be read at start (a missing CA or token file).
func (c *Client) Run(ctx context.Context) error {
	opts := c.cfg.DialOptions
	if len(opts) == 0 {
		var err error
		if opts, err = c.cfg.Credentials.DialOptions(); err != nil {
			return err
		}
		if c.cfg.Credentials.Insecure {
			c.cfg.Logger.Warn("xds: -xds-insecure: ADS in plaintext without a token; the control plane must run with -xds-insecure too (development only)", "server", c.cfg.Server)
		}
	}
	opts = append(opts, grpc.WithKeepaliveParams(keepalive.ClientParameters{Time: 30 * time.Second, Timeout: 10 * time.Second}))
	target, ropts, err := serverTarget(c.cfg.Server)
	if err != nil {
		return err
	}
	conn, err := grpc.NewClient(target, append(opts, ropts...)...)
	if err != nil {
		return fmt.Errorf("xdsclient: %s: %w", c.cfg.Server, err)
	}
	defer conn.Close()
	ads := discovery.NewAggregatedDiscoveryServiceClient(conn)

	bo := backoff.NewExponentialBackOff()
	bo.InitialInterval = c.cfg.MinBackoff
	bo.MaxInterval = c.cfg.MaxBackoff
	bo.Reset()
	failing := false
	refused := "" // the last refusal's message, logged once
	for {
		received, err := c.runStream(ctx, ads)
		c.setConnected(false)
		if ctx.Err() != nil {
			return ctx.Err()
		}
		code := grpcstatus.Code(err)
		denied := code == codes.PermissionDenied || code == codes.Unauthenticated
		if received {
			// The stream had worked: a failure to reconnect starts a new
			// outage.
			bo.Reset()
			failing, refused = false, ""
		}
		switch {
		case denied:
			if msg := grpcstatus.Convert(err).Message(); msg != refused {
				refused = msg
				c.cfg.Logger.Error("xds: the control plane refused this proxy's stream; serving the last accepted config and retrying with backoff",
					"server", c.cfg.Server, "code", code.String(), "reason", msg)
			}
			failing = true
		case received:
			// A stream the server ended (a restart, its connections'
			// maximum age) is no outage unless reconnecting fails.
			c.cfg.Logger.Info("xds: stream to the control plane ended; reconnecting", "server", c.cfg.Server, "error", err)
		case !failing:
			c.cfg.Logger.Error("xds: control plane unreachable; serving the last accepted config and retrying with backoff",
				"server", c.cfg.Server, "error", err)
			failing = true
		default:
			c.cfg.Logger.Debug("xds: stream failed", "server", c.cfg.Server, "error", err)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(bo.NextBackOff()):
		}
	}
}

func (c *Client) setConnected(v bool) {
	c.mu.Lock()
	c.status.Connected = v
	c.mu.Unlock()
}

// runStream runs one ADS stream until it fails. received reports whether
// any response arrived (the server was reachable).
func (c *Client) runStream(ctx context.Context, ads discovery.AggregatedDiscoveryServiceClient) (received bool, err error) {
	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stream, err := ads.StreamAggregatedResources(sctx)
	if err != nil {
		return false, err
	}
	c.mu.Lock()
	for _, s := range c.subs {
		s.sent, s.nonce = false, ""
	}
	c.mu.Unlock()
	first := true
	for _, t := range typeOrder {
		if req := c.request(t, "", nil, first); req != nil {
			if err := stream.Send(req); err != nil {
				return false, err
			}
			first = false
		}
	}
	for {
		resp, err := stream.Recv()
		if err != nil {
			if errors.Is(err, io.EOF) {
				err = errors.New("stream closed by server")
			}
			return received, err
		}
		if !received {
			received = true
			c.setConnected(true)
			c.cfg.Logger.Info("xds: connected to control plane", "server", c.cfg.Server)
		}
		reqs, delay := c.handle(resp)
		if delay > 0 {
			select {
			case <-sctx.Done():
				return received, sctx.Err()
			case <-time.After(delay):
			}
		}
		for _, req := range reqs {
			if err := stream.Send(req); err != nil {
				return received, err
			}
		}
	}
}

// handle passes resp to the Handler and returns the requests to send: the
// ACK or NACK, then any changed dependent subscriptions, and how long to
// wait before sending them (only when NACKing a version already NACKed).
func (c *Client) handle(resp *discovery.DiscoveryResponse) ([]*discovery.DiscoveryRequest, time.Duration) {
	t := resp.GetTypeUrl()
	c.mu.Lock()
	sub, ok := c.subs[t]
	if ok {
		sub.nonce = resp.GetNonce()
	}
	c.mu.Unlock()
	if !ok {
		c.cfg.Logger.Warn("xds: response for a type not subscribed; ignored", "type", t)
		return nil, 0
	}
	for _, r := range resp.GetResources() {
		if r.GetTypeUrl() != t {
			return c.nack(t, resp, fmt.Errorf("resource of type %s in a %s response", r.GetTypeUrl(), t))
		}
	}
	deps, err := c.cfg.Handler.Update(t, resp.GetVersionInfo(), resp.GetResources())
	if err != nil {
		return c.nack(t, resp, err)
	}
	c.mu.Lock()
	delete(c.repeats, t)
	sub.version = resp.GetVersionInfo()
	c.status.Versions[t] = sub.version
	c.status.ACKs++
	c.status.ACKsByType[t]++
	c.mu.Unlock()
	c.cfg.Logger.Debug("xds: ACK", "type", t, "version", resp.GetVersionInfo(), "resources", len(resp.GetResources()))
	reqs := []*discovery.DiscoveryRequest{c.request(t, resp.GetNonce(), nil, false)}
	depTypes := make([]string, 0, len(deps))
	for dt := range deps {
		depTypes = append(depTypes, dt)
	}
	slices.Sort(depTypes)
	for _, dt := range depTypes {
		if req := c.resubscribe(dt, deps[dt]); req != nil {
			reqs = append(reqs, req)
		}
	}
	return reqs, 0
}

// nack builds the NACK of resp. A version NACKed again right after its
// previous NACK is logged at debug level and the NACK is delayed with
// exponential backoff (MinBackoff doubling up to MaxBackoff), so a server
// that keeps resending a rejected version cannot make the proxy spin.
func (c *Client) nack(t string, resp *discovery.DiscoveryResponse, err error) ([]*discovery.DiscoveryRequest, time.Duration) {
	v := resp.GetVersionInfo()
	c.mu.Lock()
	c.status.NACKs++
	c.status.NACKsByType[t]++
	c.status.LastNACK = fmt.Sprintf("%s version %s: %v", t, v, err)
	rep := c.repeats[t]
	if rep.version == v {
		rep.n++
	} else {
		rep = nackRepeat{version: v}
	}
	c.repeats[t] = rep
	c.mu.Unlock()
	var delay time.Duration
	if rep.n == 0 {
		c.cfg.Logger.Warn("xds: rejected update (NACK); keeping the last accepted config",
			"type", t, "version", v, "error", err)
	} else {
		delay = min(c.cfg.MinBackoff<<min(rep.n-1, 16), c.cfg.MaxBackoff)
		c.cfg.Logger.Debug("xds: server resent a rejected version; NACKing again after a pause",
			"type", t, "version", v, "times", rep.n+1, "pause", delay)
	}
	req := c.request(t, resp.GetNonce(), xds.NewNACKStatus(err.Error(), xds.NACKDetailsOf(err)...), false)
	return []*discovery.DiscoveryRequest{req}, delay
}

// resubscribe updates the names subscribed for t and returns the request
// announcing them, or nil when nothing changed.
func (c *Client) resubscribe(t string, names []string) *discovery.DiscoveryRequest {
	names = slices.Clone(names)
	slices.Sort(names)
	names = slices.Compact(names)
	c.mu.Lock()
	sub, ok := c.subs[t]
	if !ok {
		if len(names) == 0 {
			c.mu.Unlock()
			return nil // never subscribed: an empty list would read as a legacy wildcard
		}
		sub = &subscription{}
		c.subs[t] = sub
	}
	if sub.sent && slices.Equal(sub.names, names) {
		c.mu.Unlock()
		return nil
	}
	sub.names = names
	nonce := sub.nonce
	c.mu.Unlock()
	return c.request(t, nonce, nil, false)
}

// request builds a request for t from the subscription state, or nil when
// t is not subscribed. The node is sent on the first request of a stream.
func (c *Client) request(t, nonce string, errDetail *status.Status, withNode bool) *discovery.DiscoveryRequest {
	c.mu.Lock()
	defer c.mu.Unlock()
	sub, ok := c.subs[t]
	if !ok || (!sub.wildcard && len(sub.names) == 0 && !sub.sent) {
		return nil // an empty first request would read as a legacy wildcard
	}
	sub.sent = true
	req := &discovery.DiscoveryRequest{
		TypeUrl:       t,
		VersionInfo:   sub.version,
		ResponseNonce: nonce,
		ErrorDetail:   errDetail,
	}
	if !sub.wildcard {
		req.ResourceNames = slices.Clone(sub.names)
		if req.ResourceNames == nil {
			req.ResourceNames = []string{}
		}
	}
	if withNode {
		req.Node = c.cfg.Node
	}
	return req
}
