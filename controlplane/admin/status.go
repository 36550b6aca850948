package admin

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/meshlet/meshlet/controlplane/server"
	"github.com/meshlet/meshlet/xds"
)

// DefaultAddress is where the admin API listens unless configured
// otherwise, and where `controlplane status` looks for it.
const DefaultAddress = "127.0.0.1:19100"

// ErrUnreachable is wrapped by Fetch's error when nothing answers at the
// admin address (connection refused, timeout).
var ErrUnreachable = errors.New("admin: control plane admin API unreachable")

// Exit statuses of StatusCommand.
const (
	ExitOK          = 0 // no rejections
	ExitRejections  = 1 // at least one proxy rejects its config (a NACK not followed by an ACK)
	ExitUnreachable = 2 // the admin API did not answer, answered badly, or the flags were wrong
)

// URL returns the base URL of an admin address given as host:port or as a
// URL (http://host:port).
func URL(addr string) string {
	if strings.Contains(addr, "://") {
		return strings.TrimRight(addr, "/")
	}
	return "http://" + addr
}

// Fetch reads /status from the admin API at addr (host:port or URL) with
// client (http.DefaultClient when nil). It returns the status and the raw
// JSON body. Its error wraps ErrUnreachable when the request fails, and
// names the address; a non-200 answer or a body that is not a Status is an
// error too.
func Fetch(ctx context.Context, client *http.Client, addr string) (*server.Status, []byte, error) {
	if client == nil {
		client = http.DefaultClient
	}
	u := URL(addr) + "/status"
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return nil, nil, fmt.Errorf("admin: status request for %s: %w", addr, err)
	}
	resp, err := client.Do(req)
	if err != nil {
		return nil, nil, fmt.Errorf("%w at %s: %w", ErrUnreachable, addr, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	if err != nil {
		return nil, nil, fmt.Errorf("%w at %s: reading %s: %w", ErrUnreachable, addr, u, err)
	}
	if resp.StatusCode != http.StatusOK {
		return nil, body, fmt.Errorf("admin: GET %s: %s: %s", u, resp.Status, bytes.TrimSpace(body))
	}
	var st server.Status
	if err := json.Unmarshal(body, &st); err != nil {
		return nil, body, fmt.Errorf("admin: GET %s: not a control plane status: %w", u, err)
	}
	return &st, body, nil
}

// typeColumns are the types of the version columns of WriteText, in xDS
// order, with their headers.
var typeColumns = []struct{ typeURL, header string }{
	{xds.ListenerType, "LISTENER"},
	{xds.RouteType, "ROUTE"},
	{xds.ClusterType, "CLUSTER"},
	{xds.EndpointType, "ENDPOINT"},
	{xds.SecretType, "SECRET"},
}

// ShortType returns the message name of a type URL ("RouteConfiguration"
// for type.googleapis.com/envoy.config.route.v3.RouteConfiguration).
func ShortType(typeURL string) string { return typeURL[strings.LastIndex(typeURL, ".")+1:] }

// WriteText prints st for people: a summary line naming addr; a table of
// the proxies with their connection and the version they last acknowledged
// per type ("!" after a version: the latest one of that type was rejected;
// "*": a newer version is sent or built but not acknowledged yet; "-":
// nothing acknowledged); under it, per proxy, the authenticated identity
// of its newest stream and why its snapshot is held back, when it has
// them; then
// every rejection with its node, type, versions, time, error and, per
// rejected resource, its sources (policy file:line (kind name) or Consul
// entry).
func WriteText(w io.Writer, addr string, st *server.Status) error {
	var b bytes.Buffer
	connected := 0
	for _, p := range st.Proxies {
		if p.Connected {
			connected++
		}
	}
	ready := "ready"
	if !st.Ready {
		ready = "not ready (" + st.Waiting + ")"
	}
	fmt.Fprintf(&b, "control plane %s: %s; %s, %d connected; %s\n\n", addr, ready,
		plural(len(st.Proxies), "proxy", "proxies"), connected, plural(len(st.Rejections), "rejection", "rejections"))

	rejected := map[[2]string]bool{}
	for _, r := range st.Rejections {
		rejected[[2]string{r.Node, r.TypeURL}] = true
	}
	tw := tabwriter.NewWriter(&b, 0, 0, 2, ' ', 0)
	fmt.Fprint(tw, "NODE\tSERVICE\tKIND\tCONNECTED")
	for _, c := range typeColumns {
		fmt.Fprintf(tw, "\t%s", c.header)
	}
	fmt.Fprintln(tw)
	for _, p := range st.Proxies {
		svc := p.Service
		switch {
		case p.Kind == server.KindProxyless:
			svc = "-"
		case !p.Registered:
			svc = "(not in Consul)"
		}
		conn := "no"
		if p.Connected {
			conn = "yes"
			if p.Streams > 1 {
				conn = fmt.Sprintf("yes (%d streams)", p.Streams)
			}
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s", p.Node, svc, p.Kind, conn)
		for _, c := range typeColumns {
			fmt.Fprintf(tw, "\t%s", versionCell(p, c.typeURL, rejected[[2]string{p.Node, c.typeURL}]))
		}
		fmt.Fprintln(tw)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	fmt.Fprintln(&b, `versions last ACKed; "!" latest version rejected, "*" newer version not ACKed yet, "-" none`)
	for _, p := range st.Proxies {
		if p.Identity != "" {
			fmt.Fprintf(&b, "%s: authenticated as %s\n", p.Node, p.Identity)
		}
		if p.HeldBack != "" {
			fmt.Fprintf(&b, "%s: snapshot held back (keeps its last config): %s\n", p.Node, p.HeldBack)
		}
	}
	if len(st.Denials) > 0 {
		fmt.Fprintf(&b, "\nREFUSED STREAMS (authentication or authorization of ADS)\n")
		tw := tabwriter.NewWriter(&b, 0, 0, 2, ' ', 0)
		fmt.Fprintln(tw, "LAST\tPEER\tIDENTITY\tNODE\tREASON\tCOUNT")
		for _, d := range st.Denials {
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%d\n", d.Last.UTC().Format(time.RFC3339), orDash(d.Peer), orDash(d.Identity),
				orDash(d.Node), d.Reason, d.Count)
		}
		if err := tw.Flush(); err != nil {
			return err
		}
		for _, d := range st.Denials {
			fmt.Fprintf(&b, "%s %s: %s\n", d.Reason, orDash(d.Node), d.Detail)
		}
	}
	for i, r := range st.Rejections {
		fmt.Fprintf(&b, "\nREJECTION %d of %d\n", i+1, len(st.Rejections))
		tw := tabwriter.NewWriter(&b, 0, 0, 2, ' ', 0)
		fmt.Fprintf(tw, "  node\t%s\n", r.Node)
		fmt.Fprintf(tw, "  type\t%s\n", r.TypeURL)
		keeps := "nothing accepted yet"
		if r.AcceptedVersion != "" {
			keeps = "keeps " + r.AcceptedVersion
		}
		fmt.Fprintf(tw, "  version\t%s rejected (%s)\n", orDash(r.Version), keeps)
		when := r.Time.UTC().Format(time.RFC3339)
		if r.Count > 1 {
			when = fmt.Sprintf("%s (%d NACKs since %s)", when, r.Count, r.FirstTime.UTC().Format(time.RFC3339))
		}
		fmt.Fprintf(tw, "  time\t%s\n", when)
		fmt.Fprintf(tw, "  error\t%s\n", strings.ReplaceAll(r.Error, "\n", "\n\t"))
		if !r.Named && len(r.Resources) > 0 {
			fmt.Fprintf(tw, "  note\tthe error names no resource: every %s of the rejected snapshot is listed\n", ShortType(r.TypeURL))
		}
		if len(r.Resources) == 0 {
			fmt.Fprintf(tw, "  resource\t(unknown: the rejected version is no longer held)\n")
		}
		for _, res := range r.Resources {
			fmt.Fprintf(tw, "  resource\t%s %q\n", ShortType(r.TypeURL), res.Name)
			if res.Field != "" {
				fmt.Fprintf(tw, "  field\t%s\n", res.Field)
			}
			if len(res.Sources) == 0 {
				fmt.Fprintf(tw, "  source\t(none known)\n")
			}
			for j, src := range res.Sources {
				label := ""
				if j == 0 {
					label = "source"
				}
				fmt.Fprintf(tw, "  %s\t%s\n", label, src)
			}
		}
		if err := tw.Flush(); err != nil {
			return err
		}
	}
	_, err := w.Write(b.Bytes())
	return err
}

// versionCell is the ACKed version of typeURL with its marker.
func versionCell(p server.ProxyStatus, typeURL string, rejected bool) string {
	v := orDash(p.ACKed[typeURL])
	switch {
	case rejected:
		return v + "!"
	case p.Connected && p.Snapshot[typeURL] != "" && p.ACKed[typeURL] != p.Snapshot[typeURL] && p.Sent[typeURL] != "":
		return v + "*"
	}
	return v
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func plural(n int, one, many string) string {
	if n == 1 {
		return "1 " + one
	}
	return fmt.Sprintf("%d %s", n, many)
}

// StatusCommand is `controlplane status [-admin-addr host:port] [-json]`:
// it reads /status from the control plane's admin API and prints it with
// WriteText (or, with -json, the JSON as served) on stdout. It returns
// ExitOK when no proxy rejects its config, ExitRejections when some do, and
// ExitUnreachable, with a message on stderr naming the address, when the
// admin API cannot be read (or the flags are wrong).
func StatusCommand(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("controlplane status", flag.ContinueOnError)
	fs.SetOutput(stderr)
	addr := fs.String("admin-addr", DefaultAddress, "the control plane's admin API (host:port or URL)")
	asJSON := fs.Bool("json", false, "print the status as JSON, as the admin API serves it on /status")
	timeout := fs.Duration("timeout", 5*time.Second, "give up on the admin API after this long")
	fs.Usage = func() {
		fmt.Fprintln(stderr, "usage: controlplane status [-admin-addr host:port] [-json]")
		fmt.Fprintln(stderr, "Prints every proxy, its connection and last ACKed versions, and every rejected update (NACK)")
		fmt.Fprintln(stderr, "with the policy file or Consul entry behind it. Exit status: 0 no rejections, 1 rejections,")
		fmt.Fprintln(stderr, "2 admin API unreachable.")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return ExitUnreachable
	}
	if fs.NArg() > 0 {
		fs.Usage()
		return ExitUnreachable
	}
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	st, body, err := Fetch(ctx, nil, *addr)
	if err != nil {
		fmt.Fprintf(stderr, "controlplane status: %v\n", err)
		if errors.Is(err, ErrUnreachable) {
			fmt.Fprintf(stderr, "is the control plane running with -admin-addr %s?\n", *addr)
		}
		return ExitUnreachable
	}
	if *asJSON {
		_, err = stdout.Write(body)
	} else {
		err = WriteText(stdout, *addr, st)
	}
	if err != nil {
		fmt.Fprintf(stderr, "controlplane status: %v\n", err)
		return ExitUnreachable
	}
	if len(st.Rejections) > 0 {
		return ExitRejections
	}
	return ExitOK
}
