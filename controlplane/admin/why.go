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
	"net/netip"
	"net/url"
	"time"

	"github.com/meshlet/meshlet/controlplane/explain"
)

// WhyCommand is `controlplane why [-admin-addr host:port] [-json] <proxy-or-pod> <ip:port>`:
// it asks the control plane's admin API (/why) what happens to a
// connection from that proxy's application to that address and prints
// each decision. Exit status: 0 answered, 1 the proxy is unknown or the
// control plane has no catalog yet, 2 usage or the admin API unreachable.
func WhyCommand(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("controlplane why", flag.ContinueOnError)
	fs.SetOutput(stderr)
	addr := fs.String("admin-addr", DefaultAddress, "the control plane's admin API (host:port or URL)")
	asJSON := fs.Bool("json", false, "print the report as JSON, as /why serves it")
	timeout := fs.Duration("timeout", 5*time.Second, "give up on the admin API after this long")
	fs.Usage = func() {
		fmt.Fprintln(stderr, "usage: controlplane why [-admin-addr host:port] [-json] <proxy-service-id-or-pod> <ip:port>")
		fmt.Fprintln(stderr, "Prints, for a connection from that proxy's application to ip:port, each decision in order:")
		fmt.Fprintln(stderr, "interception (redirect or bypass), filter chain (service by virtual IP, or pass-through), route")
		fmt.Fprintln(stderr, "and cluster, the intention or policy that allows or denies it, and the endpoints.")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return ExitUnreachable
	}
	if fs.NArg() != 2 {
		fs.Usage()
		return ExitUnreachable
	}
	if _, err := netip.ParseAddrPort(fs.Arg(1)); err != nil {
		fmt.Fprintf(stderr, "controlplane why: %q: want ip:port (a Service's ClusterIP and port, a pod IP and port...): %v\n", fs.Arg(1), err)
		return ExitUnreachable
	}
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	u := URL(*addr) + "/why?" + url.Values{"proxy": {fs.Arg(0)}, "dst": {fs.Arg(1)}}.Encode()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		fmt.Fprintf(stderr, "controlplane why: %v\n", err)
		return ExitUnreachable
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		fmt.Fprintf(stderr, "controlplane why: %v at %s: %v\nis the control plane running with -admin-addr %s?\n", ErrUnreachable, *addr, err, *addr)
		return ExitUnreachable
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if resp.StatusCode != http.StatusOK {
		fmt.Fprintf(stderr, "controlplane why: %s\n", bytes.TrimSpace(body))
		return 1
	}
	if *asJSON {
		stdout.Write(body)
		return 0
	}
	var rep explain.Report
	if err := json.Unmarshal(body, &rep); err != nil {
		fmt.Fprintf(stderr, "controlplane why: not a report: %v\n", err)
		return ExitUnreachable
	}
	if err := rep.WriteText(stdout); err != nil && !errors.Is(err, io.EOF) {
		return ExitUnreachable
	}
	return 0
}
