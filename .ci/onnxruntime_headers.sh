#!/usr/bin/env bash
# Puts onnxruntime's C API headers under $1 and prints their include folder. The onnxruntime wheel
# does not ship them; edgecpm's onnxruntime kernel (runtimes/onnxruntime_ops.cpp) is compiled
# against them on first use. Source: Debian's libonnxruntime-dev (a package registry CI reaches),
# found through the suite's package index and checked against the SHA-256 the index gives.
set -euo pipefail

dest=$1
mirror=http://deb.debian.org/debian
suite=trixie
mkdir -p "$dest"
curl -fsSL --retry 3 "$mirror/dists/$suite/main/binary-amd64/Packages.xz" | xz -dc >"$dest/Packages"
entry=$(awk '/^Package: libonnxruntime-dev$/,/^$/' "$dest/Packages")
file=$(sed -n 's/^Filename: //p' <<<"$entry")
sha=$(sed -n 's/^SHA256: //p' <<<"$entry")
if [ -z "$file" ] || [ -z "$sha" ]; then
    echo "onnxruntime_headers: no libonnxruntime-dev in Debian $suite's index" >&2
    exit 1
fi
curl -fsSL --retry 3 -o "$dest/dev.deb" "$mirror/$file"
echo "$sha  $dest/dev.deb" | sha256sum -c --quiet -
dpkg-deb -x "$dest/dev.deb" "$dest/root"
echo "$dest/root/usr/include/onnxruntime"
