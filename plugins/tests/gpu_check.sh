#!/usr/bin/env bash
# GPU check of the edgecpm kernels and the torch backend's CUDA path (DESIGN.md §11), in one command:
# builds libedgecpm_kernels.so with nvcc for the GPU of this machine, then runs
# plugins/tests/gpu_check.py: every kernel against the CPU reference, the plugins' helper kernels,
# the e2e rows (whole models on the CUDA path against the CPU reference's greedy tokens), timings.
# Prints the seconds of each stage; writes gpu_check.json, gpu_check.md (the table) and
# gpu_check.log to OUT_DIR. Needs nvcc, python3 with torch (CUDA), numpy and safetensors. Sized
# for 8 minutes on an H100 (not run yet: no GPU run of this check has been made). This is the
# only check that runs the kernels; gpu_check.py --dry-run (pytest) checks none of them.
#
#   plugins/tests/gpu_check.sh OUT_DIR                 # extra arguments go to gpu_check.py
#   plugins/tests/gpu_check.sh OUT_DIR --no-timings
#   python3 plugins/tests/gpu_check.py --plan          # every case it runs, with its shape
set -euo pipefail

if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then
    echo "usage: $0 OUT_DIR [gpu_check.py arguments]" >&2
    exit 2
fi
out="$(mkdir -p "$1" && cd "$1" && pwd)"
shift
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
build="$root/build/gpu_check"
mkdir -p "$build"
export PYTHONUNBUFFERED=1

arch="$(python3 -c 'import torch; m, n = torch.cuda.get_device_capability(); print(f"{m}{n}")' 2>/dev/null || true)"
if [ -z "$arch" ]; then
    arch="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d '.')"
fi
if [ -z "$arch" ]; then
    echo "gpu_check: no CUDA GPU visible (torch.cuda and nvidia-smi): no kernel can be checked here" \
         "(gpu_check.py --dry-run checks the references, host side and harness on the CPU, no kernel)" >&2
    exit 2
fi

echo "== build: nvcc $(nvcc --version | sed -n 's/.*release \([0-9.]*\).*/\1/p') for sm_$arch"
start=$(date +%s)
nvcc -std=c++17 -O3 -Xcompiler -fPIC -shared -arch="sm_$arch" -I plugins/include \
    plugins/src/infllmv2.cu plugins/src/ternary.cu -o "$build/libedgecpm_kernels.so"
echo "== build: $(( $(date +%s) - start )) s ($build/libedgecpm_kernels.so)"

status=0
# The e2e rows' torch backend loads the same library.
EDGECPM_KERNELS_LIB="$build/libedgecpm_kernels.so" python3 plugins/tests/gpu_check.py \
    --lib "$build/libedgecpm_kernels.so" --out-dir "$out" "$@" 2>&1 | tee "$out/gpu_check.log" || status=$?
echo "== total: $(( $(date +%s) - start )) s; results in $out"
exit "$status"
