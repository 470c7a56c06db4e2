#!/usr/bin/env bash
# Compile the edgecpm CUDA kernels (and the TensorRT plugin glue when TensorRT headers are found)
# out of tree, for the CI archs: sm_87 (Jetson Orin), sm_90 (Hopper), sm_110 (Jetson Thor).
#
#   plugins/build_kernels.sh                      # -> build/plugins/
#   BUILD_DIR=/tmp/k CUDA_ARCHS=87 plugins/build_kernels.sh
#   TENSORRT_INCLUDE_DIR=/usr/include/aarch64-linux-gnu plugins/build_kernels.sh
#
# Exits non-zero when nvcc is missing or anything fails to compile. Missing TensorRT headers are
# reported (the glue is skipped) and do not fail the build. Prints the wall time.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="${BUILD_DIR:-$root/build/plugins}"
archs="${CUDA_ARCHS:-87;90;110}"
jobs="${JOBS:-$(nproc 2>/dev/null || echo 2)}"

nvcc_bin="$(command -v nvcc || true)"
if [ -z "$nvcc_bin" ]; then
    echo "build_kernels: nvcc not found on PATH; install the CUDA toolkit (CUDA 13 for sm_110, or set CUDA_ARCHS)" >&2
    exit 1
fi
# Resolve wrapper scripts (e.g. /usr/local/bin/nvcc -> exec .../cuda/bin/nvcc) to the real compiler
# so that CMake finds the toolkit next to it.
here="$("$nvcc_bin" --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ _HERE_=//p' | head -1)"
real_nvcc="${here:+$here/nvcc}"
[ -x "${real_nvcc:-}" ] || real_nvcc="$nvcc_bin"

echo "== kernels: nvcc $("$real_nvcc" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p'), archs $archs, $jobs jobs -> $build"
start=$(date +%s)
cmake -S "$root/plugins" -B "$build" -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES="$archs" \
    -DCMAKE_CUDA_COMPILER="$real_nvcc" ${TENSORRT_INCLUDE_DIR:+-DTENSORRT_INCLUDE_DIR="$TENSORRT_INCLUDE_DIR"}
cmake --build "$build" -j "$jobs"
end=$(date +%s)

echo "== kernels: built in $((end - start)) s:"
for lib in libedgecpm_kernels.so libedgecpm_plugins.so; do
    if [ -f "$build/$lib" ]; then
        echo "   $build/$lib ($(du -k "$build/$lib" | cut -f1) KiB)"
    fi
done
if [ -f "$build/libedgecpm_plugins.so" ]; then
    # Host-side checks of the IPluginV3 glue (no GPU needed); its refusals of bad attributes are expected.
    echo "== plugin glue: host checks (the 'edgecpm plugins:' lines below are expected refusals)"
    "$build/edgecpm_plugin_host_check"
else
    echo "   libedgecpm_plugins.so not built: TensorRT headers not found (set TENSORRT_INCLUDE_DIR); kernels only"
fi
