"""The CUDA kernels and the plugins' CMake project, as far as a machine without a GPU can check them:
nvcc compiles the kernels (Orin's sm_87), the CMake project configures (and says why it skips the
TensorRT glue when the headers are absent), the GPU check's ctypes signatures agree with
include/edgecpm_kernels.h (and the compiled library's host-only functions and argument checks
answer as they should, when nvcc is here), and the GPU check's dry run -- which checks NO kernel --
runs its harness and checks its references against independent implementations. Nothing here
executes a kernel: that happens only in plugins/tests/gpu_check.sh on a GPU."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PLUGINS = ROOT / "plugins"
GPU_CHECK = PLUGINS / "tests" / "gpu_check.py"


def gpu_check_module():
    """plugins/tests/gpu_check.py as a module (its reference and host-side code run on the CPU)."""
    sys.path.insert(0, str(GPU_CHECK.parent))
    try:
        import gpu_check
    finally:
        sys.path.pop(0)
    return gpu_check
NVCC = shutil.which("nvcc")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH (CUDA toolkit absent): kernels not compiled")


def real_nvcc() -> str:
    """nvcc behind wrapper scripts (CMake wants the compiler next to its toolkit)."""
    cmd = [NVCC, "--dryrun", "-c", "-x", "cu", "/dev/null", "-o", "/dev/null"]
    out = subprocess.run(cmd, check=False, capture_output=True, text=True).stderr
    here = next((line.split("=", 1)[1] for line in out.splitlines() if line.startswith("#$ _HERE_=")), None)
    return str(Path(here) / "nvcc") if here else NVCC


@pytest.fixture(scope="module")
def kernels_lib(tmp_path_factory):
    """Both kernel translation units compiled for sm_87 into one shared library (about 10 s)."""
    out = tmp_path_factory.mktemp("kernels") / "libedgecpm_kernels.so"
    cmd = [NVCC, "-std=c++17", "-O3", "-Xcompiler", "-fPIC", "-shared", "-arch=sm_87", "-I", str(PLUGINS / "include"),
           str(PLUGINS / "src" / "infllmv2.cu"), str(PLUGINS / "src" / "ternary.cu"), "-o", str(out)]
    res = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    return out


@needs_nvcc
def test_kernel_translation_unit_compiles_for_orin(tmp_path):
    obj = tmp_path / "ternary.o"
    cmd = [NVCC, "-std=c++17", "-O3", "-arch=sm_87", "-I", str(PLUGINS / "include"), "-c",
           str(PLUGINS / "src" / "ternary.cu"), "-o", str(obj)]
    res = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    assert obj.stat().st_size > 10_000


@needs_nvcc
def test_kernel_library_exports_the_c_abi(kernels_lib):
    gpu_check = gpu_check_module()
    lib = gpu_check.load_lib(kernels_lib)  # every declared function resolves, with its signature
    assert lib.ecpm_version() == gpu_check.ABI_VERSION == 101
    assert lib.ecpm_status_string(3) == b"workspace too small"


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not on PATH")
@needs_nvcc
def test_cmake_configures_and_reports_tensorrt(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TENSORRT_INCLUDE_DIR"}
    cmd = ["cmake", "-S", str(PLUGINS), "-B", str(tmp_path / "build"), "-DCMAKE_CUDA_ARCHITECTURES=87",
           f"-DCMAKE_CUDA_COMPILER={real_nvcc()}"]
    res = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    missing = "TensorRT headers not found: skipping IPluginV3 glue (set TENSORRT_INCLUDE_DIR)"
    places = ("/usr/include/x86_64-linux-gnu", "/usr/include/aarch64-linux-gnu", "/usr/local/tensorrt/include",
              "/usr/include")
    system_headers = [p for p in places if (Path(p) / "NvInferRuntime.h").exists()]
    if system_headers:
        assert "headers:" in res.stdout and "building libedgecpm_plugins.so" in res.stdout
    else:
        assert missing in res.stdout


def test_build_script_is_executable():
    assert os.access(PLUGINS / "build_kernels.sh", os.X_OK)
    assert os.access(PLUGINS / "tests" / "gpu_check.sh", os.X_OK)


def test_ctypes_signatures_match_the_header():
    gpu_check = gpu_check_module()
    assert gpu_check.check_header() == []
    assert len(gpu_check.header_arities()) == len(gpu_check.SIGNATURES)


def test_gpu_check_dry_run_checks_references_and_harness_not_kernels(tmp_path, request):
    """The GPU check's CPU side. This is NOT a kernel check: in a dry run the reference stands in for
    every kernel output, so those rows only show that the comparison code runs (scope "harness"), and
    the output must say so. What it does check for real: the references against independent
    implementations (the brute-force tests/infllmv2_reference.py, numpy), the ternary packing against
    the exporter's and the contract's bit formula, negative controls the comparisons must flag, and
    (with the compiled library, when nvcc is here) the C ABI's host-only functions and argument
    checks."""
    pytest.importorskip("torch")
    out = tmp_path / "gpu_check.json"
    cmd = [sys.executable, str(GPU_CHECK), "--dry-run", "--out-dir", str(tmp_path)]
    if NVCC is not None:
        cmd += ["--lib", str(request.getfixturevalue("kernels_lib"))]
    res = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "| kernel | case |" in res.stdout and "| scope |" in res.stdout
    summary = res.stdout.strip().splitlines()[-2]
    assert summary.startswith("DRY RUN: NO KERNEL WAS RUN OR CHECKED") and "all passed" in summary
    assert "PASSED" not in res.stdout  # the word a GPU run's summary uses
    rows = [line for line in res.stdout.splitlines() if line.startswith("| ") and not line.startswith("| kernel |")]
    assert rows and all(not line.rstrip(" |").endswith("kernel (GPU)") for line in rows)
    assert not any("| ok |" in line or "| ok (" in line for line in rows)  # no bare "ok" next to a kernel name

    data = json.loads(out.read_text())
    assert data["kernels_checked"] is False and data["facts"]["kernels_checked"] is False
    assert "passed" not in data and data["reference_host_harness_passed"] and data["facts"]["dry_run"]
    checks = data["correctness"]
    assert {c["scope"] for c in checks} <= {"harness", "reference", "host"}
    assert not any(c["kernel_ran"] for c in checks)
    by_scope = {}
    for c in checks:
        by_scope.setdefault(c["scope"], set()).add(c["kernel"])
    # The kernels' comparison paths all ran, as harness rows only.
    assert {"infllmv2 select (ref scores)", "infllmv2 attend decode", "infllmv2 attend prefill", "infllmv2 forward",
            "ternary gemv", "ternary gemm"} <= by_scope["harness"]
    # Negative controls: wrong CPU "kernels" the comparisons flagged (reversed ternary bit order among them).
    controls = [c for c in checks if c["kernel"].startswith("harness negative control")]
    assert any("reversed bit order" in c["kernel"] for c in controls) and all(c["ok"] for c in controls)
    assert {"infllmv2 reference: block sets = brute force", "infllmv2 reference: output = brute force",
            "infllmv2 reference: tree = dense tree attention",
            "ternary reference = numpy (ternary_format.dequantize)"} <= by_scope["reference"]
    trees = [c for c in checks if c["kernel"] == "infllmv2 reference: output = brute force" and "tree" in c["case"]]
    assert trees and all(c["ok"] for c in trees)  # tree nodes against their paths decoded by the brute force
    assert "ternary packing: pack_codes = ternary_format.pack = contract" in by_scope["host"]
    # The shipped sparse settings: the reference side at the planned contexts, against the brute force.
    shipped = {c["case"].split(" (")[0] for c in checks if c["kernel"] == "infllmv2 reference: output = brute force"}
    assert {f"shipped settings decode P={P}" for P in (32768, 65536, 131072)} <= shipped
    assert {"plugin helper convert_index", "plugin helper convert_mask", "plugin helper gather_rows"} <= \
        by_scope["harness"]
    # e2e: the CUDA path's host logic (device arena, eager decode graphs) on CPU gives the reference's tokens.
    e2e = [c for c in checks if c["kernel"].startswith("e2e tokens")]
    assert len(e2e) == 6 and all(c["ok"] and c["scope"] == "host" for c in e2e)  # tokens + logits, 3 models
    assert all(c["value"] == c["limit"] == 16 for c in e2e if c["metric"] == "steps equal to the CPU reference")
    assert set(data["facts"]["stage_seconds"]) == {"infllmv2 correctness", "ternary correctness", "plugin helpers",
                                                   "e2e tokens"}
    assert (tmp_path / "gpu_check.md").read_text().startswith("| kernel | case |")
    if NVCC is not None:
        assert {"C ABI", "C ABI argument check"} <= by_scope["host"]


def test_gpu_check_plan_lists_the_cases_of_a_gpu_run():
    """--plan: one line per case with its shape; the case list of issue 19."""
    res = subprocess.run([sys.executable, str(GPU_CHECK), "--plan"], check=False, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.strip().splitlines()
    cases = lines[:-1]
    assert lines[-1] == f"{len(cases)} cases (GPU run)" and all(": " in line for line in cases)
    text = res.stdout
    for P in (32768, 65536, 131072):  # shipped settings, correctness (both dtypes) and timing
        assert f"infllmv2 shipped settings decode P={P} fp32: T=1 P={P} " in text
        assert f"infllmv2 shipped settings decode P={P} fp16: T=1 P={P} " in text
        assert "window=2048 topk=64 dense_len=8192" in text
    infllmv2 = [line for line in cases if line.startswith("infllmv2 ")]
    assert {int(line.split(" G=")[1].split()[0]) for line in infllmv2} >= {1, 2, 16, 32}
    assert {int(line.split(" D=")[1].split()[0]) for line in infllmv2} >= {64, 128}
    assert max(int(line.split(" nb=")[1].split()[0]) for line in infllmv2) > 256  # multi-chunk selection
    assert "decode split 300 blocks" in text and "tree = dense, decode path" in text
    assert {int(line.split("M=")[1].split()[0]) for line in cases if "ternary gemv" in line} >= {1, 2, 3, 4}
    assert all(f"plugin helper {k}" in text for k in ("convert_index", "convert_mask", "gather_rows"))
    e2e = [line for line in cases if line.startswith("e2e ")]
    assert any("0.5B sparse" in line and "H=1024" in line and "steps=64" in line for line in e2e)
    assert any("8B sparse" in line and "H=4096" in line and "steps=64" in line for line in e2e)
    assert any("copy roofline" in line for line in e2e) and any("ternary decode vs fp16" in line for line in e2e)
    assert {P for P in (65536, 131072) if any("sparse vs dense decode: 8B fp16" in line and f"P={P}" in line
                                              for line in e2e)} == {65536, 131072}
    dry = subprocess.run([sys.executable, str(GPU_CHECK), "--plan", "--dry-run"], check=False, capture_output=True,
                         text=True, timeout=120)
    assert dry.returncode == 0 and dry.stdout.strip().endswith("cases (dry run, CPU)")
    assert "e2e tokens 8B sparse" in dry.stdout and "timing" not in dry.stdout


def test_gpu_e2e_timing_code_runs_on_cpu_stand_ins():
    """The e2e timing rows' code (arena fill, decode loop, ternary conversion, sparse vs dense) on
    CPU tensors with eager decode graphs at tiny shapes: it runs and makes its rows. The numbers
    mean nothing; a GPU run's are the only ones to report."""
    torch = pytest.importorskip("torch")
    gpu_check = gpu_check_module()
    e2e = gpu_check.e2e_module()
    rep = gpu_check.Report()
    e2e.run_timings(torch, e2e.import_sdk(), rep, 10.0, shapes=e2e.DRY_SHAPES, P=100, contexts=(300,), device="cpu",
                    capture=e2e.EagerCapture())
    assert [t["kernel"] for t in rep.timings] == ["e2e decode tok/s vs copy roofline", "e2e ternary decode vs fp16",
                                                  "e2e sparse vs dense decode"]
    assert all(t["median_us"] > 0 for t in rep.timings) and rep.timings[0]["roofline_tok_s"] > 0


def test_gpu_check_script_needs_an_output_folder():
    res = subprocess.run([str(PLUGINS / "tests" / "gpu_check.sh")], check=False, capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 2 and "usage:" in res.stderr and "OUT_DIR" in res.stderr


def test_gpu_check_harness_rows_never_vouch_for_a_kernel():
    """Report: a harness row (reference in place of a kernel) never says "ok" for the kernel, and a
    report without kernel rows sums up as a dry run whatever it was asked."""
    gpu_check = gpu_check_module()
    rep = gpu_check.Report()
    rep.check("ternary gemv", "M=1", "fp32", 0.0, 1e-4, scope="harness")
    assert rep.rows[-1][5] == "harness ran (no kernel checked)" and rep.rows[-1][6] == "harness only, no kernel ran"
    assert not rep.kernels_checked and rep.correctness[-1]["kernel_ran"] is False
    assert rep.summary(dry_run=False, seconds=1.0).startswith("DRY RUN: NO KERNEL WAS RUN OR CHECKED")
    rep.check("ternary gemv", "M=1", "fp32", 0.0, 1e-4)
    assert rep.kernels_checked and rep.rows[-1][5] == "ok" and rep.rows[-1][6] == "kernel (GPU)"
    assert rep.summary(dry_run=False, seconds=1.0).startswith("PASSED: kernel 1/1")


def test_gpu_check_missing_library(tmp_path):
    pytest.importorskip("torch")
    cmd = [sys.executable, str(GPU_CHECK), "--lib", str(tmp_path / "absent.so")]
    res = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "absent.so not found" in res.stderr and "gpu_check.sh" in res.stderr


@needs_nvcc
def test_gpu_check_says_when_there_is_no_gpu(kernels_lib):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the check would run for real")
    cmd = [sys.executable, str(GPU_CHECK), "--lib", str(kernels_lib)]
    res = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "no CUDA device" in res.stderr and "--dry-run" in res.stderr


def test_gpu_check_near_ties_compete_only_among_free_blocks():
    """The GPU check excuses a differing block set only as a near-tie at the k-th score among the
    blocks competing for top-k slots: never a forced (init/window) block, never a far-off score."""
    torch = pytest.importorskip("torch")
    gpu_check = gpu_check_module()
    ref = gpu_check.load_reference()
    cfg = gpu_check.sparse_config(window_size=128, topk=3, dense_len=1)
    g = torch.Generator().manual_seed(0)
    P, T, Hq, Hkv, D = 900, 1, 4, 1, 16
    q, k = torch.randn(T, Hq, D, generator=g), torch.randn(P + T, Hkv, D, generator=g)
    ck = ref.new_chunks(k[:0], k, cfg)
    pos = torch.tensor([P])
    blk = ref.block_scores(q, ck, pos, P + T, cfg)
    theirs = ref.select_blocks(blk, pos, cfg)
    chosen = theirs[0, 0].nonzero().flatten().tolist()
    qb = P // 64
    free = [b for b in chosen if cfg.init_blocks <= b < qb - 1]  # top-k picks, not init or window
    assert len(free) == cfg.topk - cfg.init_blocks
    last = min(free, key=lambda b: float(blk[0, 0, b]))  # the k-th competing score
    rest = [b for b in range(cfg.init_blocks, qb - 1) if b not in chosen]
    runner_up = max(rest, key=lambda b: float(blk[0, 0, b]))
    gap = float(blk[0, 0, last] - blk[0, 0, runner_up])

    def check(ours, eps):
        return gpu_check.near_tie_rows(torch, ref, q, ck, pos, P + T, cfg, ours, theirs, eps=eps)[:2]

    swapped = theirs.clone()
    swapped[0, 0, last], swapped[0, 0, runner_up] = False, True
    assert check(swapped, eps=2 * gap) == (1, 1)  # within eps of the threshold: a near-tie
    assert check(swapped, eps=gap / 10) == (1, 0)  # farther apart: a real difference
    no_window = theirs.clone()
    no_window[0, 0, qb] = False  # the query's own block is forced, whatever the scores
    assert check(no_window, eps=1e9) == (1, 0)
    assert check(theirs, eps=0) == (0, 0)
