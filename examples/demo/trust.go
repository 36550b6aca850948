package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	"google.golang.org/grpc/status"

	"github.com/meshlet/meshlet/sidecar/xdsclient"
)

// checkTrust asks the control plane for node's secrets as an attacker on
// this machine would: with no credential, with another service's token
// (web's), with a made-up token; each must be refused with nothing
// served. Then node's own service's token must get its certificate and
// key. It says what each got.
func (d *demo) checkTrust(ctx context.Context, xdsAddr, caFile, tokenDir, node string) error {
	service := strings.SplitN(node, "-", 2)[0]
	madeUp := filepath.Join(d.workDir, "made-up-token")
	if err := os.WriteFile(madeUp, []byte("1b4e28ba-2fa1-11d2-883f-0016d3cca427\n"), 0o600); err != nil {
		return err
	}
	probe := func(creds xdsclient.Credentials) (*xdsclient.ProbeResult, error) {
		pctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		return xdsclient.Probe(pctx, xdsAddr, creds, &core.Node{Id: node})
	}
	for _, c := range []struct {
		who   string
		creds xdsclient.Credentials
	}{
		{"no credential:", xdsclient.Credentials{CAFile: caFile}},
		{"web's token:", xdsclient.Credentials{CAFile: caFile, TokenFile: filepath.Join(tokenDir, "web")}},
		{"a made-up token:", xdsclient.Credentials{CAFile: caFile, TokenFile: madeUp}},
	} {
		res, err := probe(c.creds)
		if err == nil {
			return fmt.Errorf("ADS is open: a process with %s was served %s's secrets %v (private key: %t)", strings.TrimSuffix(c.who, ":"), node, res.Secrets, res.PrivateKey)
		}
		st := status.Convert(err)
		d.say("       %-17s refused, nothing served (%s: %s)", c.who, st.Code(), st.Message())
	}
	res, err := probe(xdsclient.Credentials{CAFile: caFile, TokenFile: filepath.Join(tokenDir, service)})
	if err != nil {
		return fmt.Errorf("%s's own token was refused %s's configuration: %v", service, node, err)
	}
	if !res.PrivateKey {
		return fmt.Errorf("%s's own token got no private key for %s: %+v", service, node, res)
	}
	d.say("       %-17s served its certificate (%s) and key", service+"'s token:", res.SPIFFEID)
	if b, err := os.ReadFile(filepath.Join(d.workDir, "logs", "controlplane.log")); err == nil && strings.Contains(string(b), "hands cached leaf certificates") {
		d.say("       but Consul's own agent hands the leaves it cached to callers without a token (Consul 1.19's")
		d.say("       /v1/agent/connect/ca/leaf), as the control plane warns: keep workloads off the HTTP API of the agent it")
		d.say("       reads (here all is on one machine's loopback; README, Security model)")
	}
	return nil
}
