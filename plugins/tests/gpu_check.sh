#!/usr/bin/env bash
# GPU check of the edgecpm kernels (DESIGN.md §11): builds libedgecpm_kernels.so with nvcc for the
# GPU of this machine, then runs plugins/tests/gpu_check.py (correctness against the torch
# reference, timings, one markdown table, JSON in benchmarks/results/gpu_check.json).
# Needs nvcc, python3 with torch (CUDA) and numpy. Fits in 8 minutes on an H100. This is the only
# check that runs the kernels; gpu_check.py --dry-run (pytest) checks none of them.
#
#   plugins/tests/gpu_check.sh                 # extra arguments go to gpu_check.py
#   plugins/tests/gpu_check.sh --no-timings
set -euo pipefail

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
echo "== built $build/libedgecpm_kernels.so in $(( $(date +%s) - start )) s"

status=0
python3 plugins/tests/gpu_check.py --lib "$build/libedgecpm_kernels.so" "$@" 2>&1 | tee "$build/gpu_check.log" \
    || status=$?
# On the lent GPU machine of this workplace, files under $OUT come back to the session.
if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then
    cp "$build/gpu_check.log" "$OUT/" || true
    cp benchmarks/results/gpu_check.json "$OUT/" 2>/dev/null || true
fi
exit "$status"
