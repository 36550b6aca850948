#!/usr/bin/env bash
# deps.sh [-n] GROUP... — installs what a make target runs, and nothing when
# it is all there (then it prints nothing). One home for every dependency
# that is not a Go module of meshlet's own go.mod: Debian packages (apt-get)
# and Go tools (go install). Consul, Jaeger and the Kubernetes binaries are
# built by make from their tool modules under deploy/tools, not here.
#
# Groups:
#   demo   `make demo`: nothing beyond Go today (the group exists so the
#          target states its needs in one place)
#   test   `make test`: the real peers of the protocol tests (curl, h2load,
#          zeep/spyne, nc, redis, mosquitto, PostgreSQL, MariaDB, dnsmasq,
#          dig), promtool for /metrics checks, ghz for gRPC load
#   bench  `make bench`: HAProxy, nginx (+ stream module), wrk, redis, ghz
#   kube   the one-node Kubernetes cluster (internal/devkube): etcd,
#          containerd, runc, CNI plugins, iptables, conntrack
#   image  `make images`: iptables, whose binaries and libraries the
#          meshlet image carries (deploy/tools/xtables-files.sh), and
#          redis-server, redis-tools for the tests' redis image
#   lint   `make lint`: staticcheck (pinned; the Makefile runs the one in
#          GOBIN, or GOPATH/bin, first)
#
# -n (dry run) prints what would be installed and exits 1 when something is
# missing, 0 when nothing is. DEPS_EXTRA_PACKAGES adds Debian packages to
# every group (CI_DEBIAN_PACKAGES is read too, for older CI settings).
set -euo pipefail

dry=0
if [ "${1:-}" = "-n" ]; then
	dry=1
	shift
fi
[ $# -gt 0 ] || { echo "usage: deps.sh [-n] demo|test|bench|kube|image|lint ..." >&2; exit 2; }

debs=()  # Debian packages the groups want
gotools=() # "binary=module@version" Go tools the groups want
for group in "$@"; do
	case "$group" in
	demo) ;;
	test)
		debs+=(prometheus curl nghttp2-client python3-zeep python3-spyne netcat-openbsd
			redis-server redis-tools mosquitto mosquitto-clients postgresql postgresql-client
			mariadb-server mariadb-client dnsmasq-base bind9-dnsutils)
		gotools+=("ghz=github.com/bojand/ghz/cmd/ghz@v0.120.0")
		;;
	bench)
		# taskset (util-linux) pins each system to its core; Debian builds
		# nginx's TCP proxy (stream) as a dynamic module.
		debs+=(util-linux haproxy nginx libnginx-mod-stream wrk redis-server redis-tools)
		gotools+=("ghz=github.com/bojand/ghz/cmd/ghz@v0.120.0")
		;;
	kube)
		debs+=(etcd-server containerd runc containernetworking-plugins iptables conntrack iproute2 util-linux)
		;;
	image) debs+=(iptables redis-server redis-tools) ;;
	lint) gotools+=("staticcheck=honnef.co/go/tools/cmd/staticcheck@v0.8.2") ;;
	*) echo "deps.sh: unknown group $group (demo, test, bench, kube, image, lint)" >&2; exit 2 ;;
	esac
done
# shellcheck disable=SC2206
debs+=(${DEPS_EXTRA_PACKAGES:-} ${CI_DEBIAN_PACKAGES:-})

# Missing Debian packages: one dpkg-query for all of them (fast when
# everything is installed).
missing_debs=()
if [ ${#debs[@]} -gt 0 ]; then
	mapfile -t wanted < <(printf '%s\n' "${debs[@]}" | sort -u)
	declare -A installed=()
	while read -r name status; do
		[ "$status" = "installed" ] && installed[$name]=1
	done < <(dpkg-query -W -f='${Package} ${db:Status-Status}\n' "${wanted[@]}" 2>/dev/null || true)
	for p in "${wanted[@]}"; do
		[ -n "${installed[$p]:-}" ] || missing_debs+=("$p")
	done
fi

gobin=$(go env GOBIN)
[ -n "$gobin" ] || gobin=$(go env GOPATH)/bin
missing_go=()
if [ ${#gotools[@]} -gt 0 ]; then
	mapfile -t tools < <(printf '%s\n' "${gotools[@]}" | sort -u)
	for t in "${tools[@]}"; do
		bin=${t%%=*}
		command -v "$bin" >/dev/null 2>&1 || [ -x "$gobin/$bin" ] || missing_go+=("${t#*=}")
	done
fi

if [ ${#missing_debs[@]} -eq 0 ] && [ ${#missing_go[@]} -eq 0 ]; then
	exit 0
fi
if [ $dry = 1 ]; then
	[ ${#missing_debs[@]} -eq 0 ] || echo "deps: would apt-get install ${missing_debs[*]}"
	[ ${#missing_go[@]} -eq 0 ] || echo "deps: would go install ${missing_go[*]}"
	exit 1
fi

if [ ${#missing_debs[@]} -gt 0 ]; then
	sudo=""
	[ "$(id -u)" = 0 ] || sudo=sudo
	echo "==> deps ($*): apt-get install ${missing_debs[*]} (a minute or two)"
	export DEBIAN_FRONTEND=noninteractive
	$sudo apt-get -o DPkg::Lock::Timeout=600 update -qq
	$sudo apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${missing_debs[@]}" >/dev/null
fi
for m in "${missing_go[@]}"; do
	echo "==> deps ($*): go install $m"
	go install "$m"
done
echo "==> deps ($*): done"
