#!/usr/bin/env bash
# bench-deps.sh installs what `make bench` runs (see ../shared/PEERS.md):
# the reference proxies, load generators and apps from Debian when missing,
# and ghz (gRPC load) with `go install`. vegeta (optional cross-check of the
# open-loop generator) is built by make from deploy/tools/vegeta.
set -euo pipefail

need=()
have() { command -v "$1" >/dev/null 2>&1; }
have taskset || need+=(util-linux)
have haproxy || need+=(haproxy)
have nginx || need+=(nginx)
# Debian builds nginx's TCP proxy (stream) as a dynamic module.
[ -e /usr/lib/nginx/modules/ngx_stream_module.so ] || need+=(libnginx-mod-stream)
have wrk || need+=(wrk)
have redis-server || need+=(redis-server)
have redis-benchmark || need+=(redis-tools)
if [ ${#need[@]} -gt 0 ]; then
	sudo=""
	[ "$(id -u)" = 0 ] || sudo=sudo
	echo "==> bench: apt-get install ${need[*]}"
	$sudo apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

gobin=$(go env GOBIN)
[ -n "$gobin" ] || gobin=$(go env GOPATH)/bin
if ! have ghz && [ ! -x "$gobin/ghz" ]; then
	echo "==> bench: go install github.com/bojand/ghz/cmd/ghz@v0.120.0"
	go install github.com/bojand/ghz/cmd/ghz@v0.120.0
fi
