#!/usr/bin/env bash
# elf-files.sh [--rootfs DIR] FILE... — puts host executables (or shared
# objects) into an image built FROM scratch, with everything the dynamic
# loader needs to run them: prints, one per line, the internal/ociimage
# flags (-file SRC:DST:MODE) for each FILE at its own path and for every
# shared library `ldd` lists for any of them (at the path ldd prints,
# content from the resolved file; the loader included, mode 755). With
# --rootfs, copies the same files under DIR instead (for a Dockerfile's
# COPY). Each library appears once whatever the number of FILEs.
#
# Used by deploy/tools/xtables-files.sh (iptables in the meshlet image) and
# the Makefile's redis image (redis-server, redis-cli for the Kubernetes
# tests). Fails naming a FILE that is missing or that ldd cannot read.
set -euo pipefail

rootfs=
if [ "${1:-}" = "--rootfs" ]; then
	rootfs=${2:?usage: elf-files.sh [--rootfs DIR] FILE...}
	shift 2
	mkdir -p "$rootfs"
fi
[ $# -gt 0 ] || { echo "usage: elf-files.sh [--rootfs DIR] FILE..." >&2; exit 2; }

# file SRC DST MODE: print the flag, or copy under $rootfs.
file() {
	if [ -z "$rootfs" ]; then echo "-file $1:$2:$3"; return; fi
	mkdir -p "$rootfs$(dirname "$2")"
	cp "$1" "$rootfs$2" && chmod "$3" "$rootfs$2"
}

for f in "$@"; do
	[ -f "$f" ] || { echo "elf-files.sh: $f is missing" >&2; exit 1; }
	mode=755
	case $f in *.so | *.so.*) mode=644 ;; esac
	file "$f" "$f" "$mode"
done

# "name => /path (addr)" and the loader as "/path (addr)".
libs=$(for f in "$@"; do
	ldd "$f" || { echo "elf-files.sh: ldd $f failed" >&2; exit 1; }
done | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}' | sort -u)
for lib in $libs; do
	mode=644
	case $lib in */ld-linux*) mode=755 ;; esac
	file "$(readlink -f "$lib")" "$lib" "$mode"
done
