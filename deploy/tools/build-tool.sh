#!/usr/bin/env bash
# build-tool.sh <tool-module-dir> <packages> <output> <label>
#
# Builds a dev tool (Consul, Jaeger, Kubernetes, CoreDNS) from its own tool
# module under deploy/tools/, keeping its dependency graph out of meshlet's
# go.mod. Long builds print progress so nobody stares at a silent terminal.
#
# <packages> is one package, or several separated by spaces; with several,
# <output> is a directory ending in "/" and each program is written into it
# under its package's last element (go build -o dir/). LDFLAGS, when set, is
# passed as -ldflags (e.g. -X version stamps).
set -euo pipefail
dir=$1 pkgs=$2 out=$3 label=$4
case $out in
*/) mkdir -p "$out"; out=$(cd "$out" && pwd)/ ;;
*) out=$(cd "$(dirname "$out")" && pwd)/$(basename "$out") ;;
esac
start=$(date +%s)

heartbeat() {
	while sleep 15; do
		echo "    ... still building $label ($(( $(date +%s) - start ))s so far)"
	done
}
heartbeat &
hb=$!
trap 'kill $hb 2>/dev/null || true' EXIT

cd "$dir"
echo "==> $label: downloading modules (Go module proxy)"
go mod download
echo "==> $label: compiling (first build takes minutes on 2 cores; Go's build cache makes later builds fast)"
# go build -v names each package as it compiles: count them as progress.
# shellcheck disable=SC2086 # $pkgs is a space-separated list on purpose
go build -v -trimpath ${LDFLAGS:+-ldflags "$LDFLAGS"} -o "$out" $pkgs 2>&1 | awk '
	/^(#|go: )/ || /\.go:[0-9]+/ { print; next }
	{ n++; if (n % 100 == 0) { printf "    ... %d packages compiled (now: %s)\n", n, $0; fflush() } }
	END { if (n > 0) printf "    ... %d packages compiled\n", n }'
status=${PIPESTATUS[0]}
if [ "$status" -ne 0 ]; then
	echo "==> $label: build failed" >&2
	exit "$status"
fi
echo "==> $label: built $out in $(( $(date +%s) - start ))s"
