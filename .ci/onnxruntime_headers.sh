#!/usr/bin/env bash
# Puts onnxruntime's C API headers under $1 and prints their include folder (nothing else goes to
# stdout). The onnxruntime wheel does not ship them; edgecpm's onnxruntime kernel
# (runtimes/onnxruntime_ops.cpp) is compiled against them on first use.
#
# Source: Debian's libonnxruntime-dev, from the Debian archive this machine's apt is configured
# with (its sources list names it; no address is written here). The machine runs Debian 12
# (bookworm), whose suite lacks the package; Debian 13 (trixie) has it. So the script writes a
# private sources list with the configured archive and suite trixie, and runs apt-get update,
# apt-get download and apt-cache with its own lists and cache folders under $1: the system's apt
# state is not touched. apt checks the suite's signed index and the download against it; the
# .deb's SHA-256 is checked once more against the index here. Run as root (like CI).
set -euo pipefail

dest=$(realpath -m "$1")
suite=trixie
package=libonnxruntime-dev
say() { echo "onnxruntime_headers: $*" >&2; }

# ---- the configured Debian archive -------------------------------------------------------------
# (URI, Signed-By) of the main archive entry: a `deb` source for this release's own suite (e.g.
# bookworm, not bookworm-security/-updates) with component main, in deb822 .sources files or in
# one-line .list files.
. /etc/os-release
release=${VERSION_CODENAME:?no VERSION_CODENAME in /etc/os-release}
sources=()
for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] && sources+=("$f")
done
found=$(awk -v release="$release" '
    function flush() {
        if (!done && enabled != "no" && types ~ /(^| )deb( |$)/ && (" " suites " ") ~ (" " release " ") &&
            (" " comps " ") ~ / main / && uris != "") {
            split(uris, u, " "); print u[1] "\t" signed; done = 1
        }
        types = suites = comps = uris = signed = enabled = ""
    }
    FNR == 1 { flush() }
    FILENAME ~ /\.sources$/ {
        if ($0 ~ /^[ \t]*$/) { flush(); next }
        if ($0 ~ /^[ \t]*#/) next
        key = tolower($1); sub(/:$/, "", key)
        val = $0; sub(/^[^:]*:[ \t]*/, "", val)
        if (key == "types") types = val; else if (key == "suites") suites = val
        else if (key == "components") comps = val; else if (key == "uris") uris = val
        else if (key == "enabled") enabled = tolower(val)
        else if (key == "signed-by" && val !~ /^-----BEGIN/) signed = val
        next
    }
    /^[ \t]*deb[ \t]/ && !done {
        line = $0; opts = ""
        if (match(line, /\[[^]]*\]/)) { opts = substr(line, RSTART + 1, RLENGTH - 2); line = substr(line, 1, RSTART - 1) substr(line, RSTART + RLENGTH) }
        n = split(line, w, /[ \t]+/); i = (w[1] == "" ? 2 : 1)
        if (n >= i + 3 && w[i + 2] == release) {
            for (j = i + 3; j <= n; j++) if (w[j] == "main") {
                signed = ""; if (match(opts, /signed-by=[^ \t]+/)) signed = substr(opts, RSTART + 10, RLENGTH - 10)
                print w[i + 1] "\t" signed; done = 1; break
            }
        }
    }
    END { flush() }
' "${sources[@]}")
uri=${found%%$'\t'*}
signed=${found#*$'\t'}
if [ -z "$found" ] || [ -z "$uri" ]; then
    say "no Debian archive entry for suite $release (component main) in apt's sources (${sources[*]:-none})"
    exit 1
fi

# ---- a private apt: the same archive, suite trixie, own lists and cache --------------------------
work=$dest/apt
mkdir -p "$work/lists/partial" "$work/cache/archives/partial" "$work/parts"
{
    echo "Types: deb"
    echo "URIs: $uri"
    echo "Suites: $suite"
    echo "Components: main"
    if [ -n "$signed" ]; then echo "Signed-By: $signed"; fi
} >"$work/trixie.sources"
if [ "$(id -u)" = 0 ] && id _apt >/dev/null 2>&1; then  # apt downloads as the unprivileged _apt user
    chmod go+x "$dest"
    chown -R _apt "$work"
fi
apt_opts=(
    -o "Dir::Etc::SourceList=$work/trixie.sources"
    -o "Dir::Etc::SourceParts=$work/parts"
    -o "Dir::State::Lists=$work/lists"
    -o "Dir::Cache=$work/cache"
    -o "Acquire::Languages=none"
)
say "apt archive $uri, suite $suite"
apt-get "${apt_opts[@]}" -qq update >&2
version=$(apt-cache "${apt_opts[@]}" show --no-all-versions "$package" | sed -n 's/^Version: //p' | head -n1)
sha=$(apt-cache "${apt_opts[@]}" show --no-all-versions "$package" | sed -n 's/^SHA256: //p' | head -n1)
if [ -z "$version" ] || [ -z "$sha" ]; then
    say "no $package (with a SHA256) in Debian $suite's index from $uri"
    exit 1
fi
(cd "$work" && apt-get "${apt_opts[@]}" -qq download "$package=$version" >&2)
deb=$(find "$work" -maxdepth 1 -name "${package}_*.deb" | head -n1)
if [ -z "$deb" ]; then
    say "apt-get download left no ${package}_*.deb in $work"
    exit 1
fi
echo "$sha  $deb" | sha256sum -c --quiet - >&2
dpkg-deb -x "$deb" "$dest/root"
include=$dest/root/usr/include/onnxruntime
if [ ! -f "$include/onnxruntime_c_api.h" ]; then
    say "$deb holds no usr/include/onnxruntime/onnxruntime_c_api.h"
    exit 1
fi
echo "$include"
