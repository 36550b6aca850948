#!/usr/bin/env bash
# xtables-files.sh [--rootfs DIR] — prints, one per line, the
# internal/ociimage flags that put this host's Debian iptables into an
# image built FROM scratch (with --rootfs, copies the same files into DIR
# instead, for the Dockerfile's COPY), so
# `sidecar intercept` (the injected init container) can run
# iptables-{nft,legacy}-{save,restore} and the ip6tables ones:
#   - /usr/sbin/xtables-nft-multi and xtables-legacy-multi, and the names
#     Debian links to them (iptables-nft-restore, ip6tables-legacy-save, ...;
#     the plain iptables, iptables-save, iptables-restore and ip6tables ones
#     point at nft, Debian's default alternative);
#   - every shared library `ldd` names for them and for the plugins, at the
#     path ldd prints, and the dynamic loader (deploy/tools/elf-files.sh);
#   - the plugins directory (/usr/lib/<triplet>/xtables: libxt_REDIRECT.so,
#     libxt_owner.so, libxt_comment.so ... are dlopen()ed by name);
#   - /etc/protocols (iptables resolves "-p tcp" through it);
#   - /run, where the legacy backend takes its lock (/run/xtables.lock).
# The Makefile passes them to bin/ociimage for bin/images/meshlet.tar.
# Needs the Debian package iptables on the build host; fails naming it.
set -euo pipefail

rootfs=
if [ "${1:-}" = "--rootfs" ]; then
	rootfs=${2:?usage: xtables-files.sh [--rootfs DIR]}
	mkdir -p "$rootfs"
fi

# file SRC DST MODE, symlink PATH TARGET, dir PATH MODE: print the flag, or
# make the entry under $rootfs.
file() {
	if [ -z "$rootfs" ]; then echo "-file $1:$2:$3"; return; fi
	mkdir -p "$rootfs$(dirname "$2")"
	cp "$1" "$rootfs$2" && chmod "$3" "$rootfs$2"
}
symlink() {
	if [ -z "$rootfs" ]; then echo "-symlink $1:$2"; return; fi
	mkdir -p "$rootfs$(dirname "$1")"
	ln -sfn "$2" "$rootfs$1"
}
dir() {
	if [ -z "$rootfs" ]; then echo "-dir $1:$2"; return; fi
	mkdir -p "$rootfs$1" && chmod "$2" "$rootfs$1"
}

sbin=/usr/sbin
for m in xtables-nft-multi xtables-legacy-multi; do
	[ -x "$sbin/$m" ] || { echo "xtables-files.sh: $sbin/$m is missing: apt-get install iptables" >&2; exit 1; }
done

# The plugins directory is /usr/lib/<multiarch triplet>/xtables; the
# triplet is the directory of libxtables, as ldd resolves it.
libxtables=$(ldd "$sbin/xtables-nft-multi" | awk '$1 ~ /^libxtables\.so/ {print $3}')
[ -n "$libxtables" ] || { echo "xtables-files.sh: ldd does not show libxtables for $sbin/xtables-nft-multi" >&2; exit 1; }
plugins=/usr/lib/$(basename "$(dirname "$libxtables")")/xtables
[ -d "$plugins" ] || { echo "xtables-files.sh: no plugins directory $plugins" >&2; exit 1; }

for fam in iptables ip6tables; do
	for backend in nft legacy; do
		for tool in "" -save -restore; do
			symlink "$sbin/$fam-$backend$tool" "xtables-$backend-multi"
		done
	done
	for tool in "" -save -restore; do
		symlink "$sbin/$fam$tool" xtables-nft-multi
	done
done

# The binaries, the plugins (regular files; links such as libxt_DNAT.so
# -> libxt_NAT.so stay links) and every library they need.
regular=()
for p in "$plugins"/*.so; do
	if [ -L "$p" ]; then
		symlink "$p" "$(readlink "$p")"
	else
		regular+=("$p")
	fi
done
here=$(dirname "${BASH_SOURCE[0]}")
"$here/elf-files.sh" ${rootfs:+--rootfs "$rootfs"} "$sbin/xtables-nft-multi" "$sbin/xtables-legacy-multi" "${regular[@]}"

file /etc/protocols /etc/protocols 644
dir /run 755
