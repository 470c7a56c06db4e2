#!/usr/bin/env python3
"""GPU check of the edgecpm CUDA kernels and the torch backend's CUDA path (DESIGN.md §11): each
kernel against the torch reference on fresh random inputs, the plugins' helper kernels, whole models
on the CUDA path against the CPU reference (plugins/tests/gpu_e2e.py, the `e2e` rows), then
timings; prints the seconds of each stage and one markdown table, and writes JSON (+ the table).

    plugins/tests/gpu_check.sh OUT_DIR                  # builds the kernels for this GPU, runs this
    python3 plugins/tests/gpu_check.py --lib build/gpu_check/libedgecpm_kernels.so --out-dir OUT_DIR
    python3 plugins/tests/gpu_check.py --plan           # every case a GPU run executes, one line each
    python3 plugins/tests/gpu_check.py --dry-run        # CPU only: references, host side, harness; no kernel

Correctness (‖out − ref‖ / ‖ref‖, tolerance 1e-4 for fp32 results, 1e-2 for fp16 ones; block sets
must be identical): InfLLM v2 compressed keys, stage-1 scores, block selection (on the reference's
scores: exact; on the kernels' own scores: identical up to near-ties with the k-th score of the
competing blocks), stage-2 decode and prefill attention and the whole op (on the rows whose block
sets agree), for v1/v2, fp32/fp16, several group sizes, draft trees (nodes at positions, not
slots: with every block selected, a tree must equal dense tree-masked attention);
ternary GEMV/GEMM against a dequantized matmul. References: edgecpm.export.infllmv2 (CPU).
Timings (median over many runs after warm-up, CUDA events): the card's device-to-device copy
bandwidth, the ternary GEMV's achieved bandwidth as a fraction of it (goal >= 0.6), ternary vs fp16
matmul, and InfLLM v2 decode attention vs dense attention at 32K/64K/128K for the MiniCPM4-8B shape
(32 query heads, 2 kv heads, head_dim 128). Fits in 8 minutes on an H100.

--dry-run (CPU only, what pytest runs) CHECKS NO KERNEL. Every row says what it checked (its
`scope`, in the table and the JSON):
  harness    the comparison code, with the reference standing in for the kernel's output (so it
             compares the reference with itself: it shows the harness runs, nothing about a kernel),
             plus negative controls: outputs of deliberately wrong "kernels" computed on the CPU
             (ternary codes in reversed bit order, codes not offset by 1, attention over the wrong
             blocks, a forced block dropped) that the comparisons must flag;
  reference  the references against independent implementations: InfLLM v2 (compressed keys,
             block sets, outputs, tree nodes by their paths) against the brute-force reference
             tests/infllmv2_reference.py, this script's stage-1 reference against
             infllmv2.block_scores, trees with every block selected against dense tree-masked
             attention, the ternary reference against numpy on edgecpm.ternary_format;
  host       host-side code: the ternary packing the kernels are fed (pack_codes = the exporter's
             ternary_format.pack = the contract's bit formula), and with --lib the library's
             host-only functions (version, ctypes signatures vs include/edgecpm_kernels.h, chunk
             counts, config checks, workspace sizes) and, when no GPU is visible, the C ABI's
             argument checks (each refusal returns before any CUDA call).
A dry run's summary and JSON say "kernels_checked": false. Only a run on a GPU has `kernel` rows
(plus the `host` rows of the library's host-only functions); none has been made yet.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import json
import math
import os
import platform
import re
import statistics
import sys
import time
import types
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
HEADER = ROOT / "plugins" / "include" / "edgecpm_kernels.h"
DEFAULT_LIB = ROOT / "build" / "gpu_check" / "libedgecpm_kernels.so"
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "gpu_check.json"
TOL = {"fp32": 1e-4, "fp16": 1e-2}
GEMV_GOAL = 0.6  # achieved bandwidth / copy bandwidth (issue 8)
F32, F16 = 0, 1  # ecpm_dtype
ABI_VERSION = 101  # ecpm_version() of include/edgecpm_kernels.h


# ---- the reference, importable from a source tree that is not installed ---------------------------
def load_reference():
    """edgecpm.export.infllmv2 (torch). On a machine where edgecpm is not installed (the GPU box), it
    is loaded from export/infllmv2.py, with a bare `edgecpm` package if edgecpm/__init__ cannot import."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    try:
        from edgecpm.export import infllmv2

        return infllmv2
    except ImportError:
        pass
    try:
        importlib.import_module("edgecpm")
    except ImportError:  # e.g. tokenizers missing: config.py needs only numpy
        pkg = types.ModuleType("edgecpm")
        pkg.__path__ = [str(ROOT / "edgecpm")]
        sys.modules["edgecpm"] = pkg
    spec = importlib.util.spec_from_file_location("edgecpm_export_infllmv2", ROOT / "export" / "infllmv2.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def sparse_config(**kw):
    from edgecpm.config import SparseConfig

    return SparseConfig(**kw)


# ---- the C ABI through ctypes -----------------------------------------------------------------------
class Config(ctypes.Structure):
    _fields_ = [(n, ctypes.c_int32) for n in ("kernel_size", "kernel_stride", "block_size", "init_blocks",
                                              "window_size", "topk", "dense_len", "semantics")]

    @classmethod
    def of(cls, cfg) -> Config:
        return cls(cfg.kernel_size, cfg.kernel_stride, cfg.block_size, cfg.init_blocks, cfg.window_size, cfg.topk,
                   cfg.dense_len, int(cfg.semantics[1:]))


class Dims(ctypes.Structure):
    _fields_ = [("T", ctypes.c_int64), ("P", ctypes.c_int64), ("Hq", ctypes.c_int32), ("Hkv", ctypes.c_int32),
                ("D", ctypes.c_int32)]


_P, _I, _I64, _SZ, _CFG = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_size_t, ctypes.POINTER(Config)
SIGNATURES = {  # name: (restype, argtypes) -- checked against the header by check_header()
    "ecpm_status_string": (ctypes.c_char_p, [_I]),
    "ecpm_version": (_I, []),
    "ecpm_infllmv2_n_chunks": (_I64, [_CFG, _I64]),
    "ecpm_infllmv2_check_config": (_I, [_CFG]),
    "ecpm_infllmv2_compress": (_I, [_I, _P, _P, Dims, _CFG, _P, _P]),
    "ecpm_infllmv2_stage1_workspace_size": (_SZ, [Dims, _CFG]),
    "ecpm_infllmv2_stage1": (_I, [_I, _P, _P, _P, _P, _P, _P, _P, Dims, _CFG, _P, _P, _SZ, _P]),
    "ecpm_infllmv2_select": (_I, [_P, _P, Dims, _CFG, _P, _P, _P, _P]),
    "ecpm_infllmv2_decode_workspace_size": (_SZ, [Dims, _CFG]),
    "ecpm_infllmv2_attend_decode": (_I, [_I, _P, _P, _P, _P, _P, _P, _P, _P, _P, Dims, _CFG, _P, _P, _SZ, _P]),
    "ecpm_infllmv2_attend_prefill": (_I, [_I, _P, _P, _P, _P, _P, _P, _P, _P, Dims, _CFG, _P, _P]),
    "ecpm_infllmv2_workspace_size": (_SZ, [Dims, _CFG]),
    "ecpm_infllmv2_forward": (_I, [_I, _P, _P, _P, _P, _P, _P, _P, _P, Dims, _CFG, _P, _P, _P, _SZ, _P]),
    "ecpm_convert_index": (_I, [_P, _I, _P, _I64, _P]),
    "ecpm_convert_mask": (_I, [_P, _I, _P, _I64, _P]),
    "ecpm_gather_rows": (_I, [_P, _I64, _I64, _I64, _I64, _P, ctypes.c_int32, _P]),
    "ecpm_ternary_gemv": (_I, [_I, _P, _P, _P, _P, _I64, _I64, _I64, _I64, _P]),
    "ecpm_ternary_gemm": (_I, [_I, _P, _P, _P, _P, _I64, _I64, _I64, _I64, _P]),
    "ecpm_ternary_matmul": (_I, [_I, _P, _P, _P, _P, _I64, _I64, _I64, _I64, _P]),
}


def header_arities(path: Path = HEADER) -> dict[str, int]:
    """Parameter counts of the ECPM_API functions declared in the header."""
    text = re.sub(r"/\*.*?\*/", "", path.read_text(), flags=re.DOTALL)
    out = {}
    for m in re.finditer(r"ECPM_API\s+[\w\s\*]+?\b(ecpm_\w+)\s*\(([^)]*)\)\s*;", text):
        params = m.group(2).strip()
        out[m.group(1)] = 0 if params in ("", "void") else params.count(",") + 1
    return out


def check_header() -> list[str]:
    """Differences between SIGNATURES and the header (empty when they agree)."""
    arities = header_arities()
    problems = [f"{n}: missing from SIGNATURES" for n in arities if n not in SIGNATURES]
    problems += [f"{n}: not in the header" for n in SIGNATURES if n not in arities]
    problems += [f"{n}: {len(SIGNATURES[n][1])} ctypes args, header has {arities[n]}"
                 for n in SIGNATURES if n in arities and len(SIGNATURES[n][1]) != arities[n]]
    return problems


def load_lib(path: Path):
    lib = ctypes.CDLL(str(path))
    for name, (restype, argtypes) in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    return lib


class KernelError(RuntimeError):
    pass


# ---- results ----------------------------------------------------------------------------------------
# What a correctness row checked. Only "kernel" rows say anything about a kernel, and only a run on a
# GPU has them.
SCOPES = {
    "kernel": "a kernel run on the GPU, compared with the reference",
    "harness": "the comparison code with the reference in place of the kernel's output, or a deliberately "
               "wrong output computed on the CPU that it must flag: no kernel ran",
    "reference": "a reference (CPU) against an independent implementation",
    "host": "host-side code, no GPU: packing, the C ABI's host-only functions and argument checks",
}
SCOPE_SHOWN = {"kernel": "kernel (GPU)", "harness": "harness only, no kernel ran", "reference": "reference (CPU)",
               "host": "host side (CPU)"}


@dataclass
class Report:
    rows: list = field(default_factory=list)  # table rows
    correctness: list = field(default_factory=list)
    timings: list = field(default_factory=list)
    facts: dict = field(default_factory=dict)

    def check(self, kernel: str, case: str, dtype: str, value: float, limit: float, what: str = "rel err",
              ok: bool | None = None, note: str = "", scope: str = "kernel") -> bool:
        """One correctness row. scope: what was checked (SCOPES); a "harness" row never vouches for a
        kernel, and its verdict says so."""
        assert scope in SCOPES, scope
        ok = bool(value <= limit) if ok is None else bool(ok)
        self.correctness.append({"kernel": kernel, "case": case, "dtype": dtype, "metric": what, "value": value,
                                 "limit": limit, "ok": ok, "note": note, "scope": scope,
                                 "kernel_ran": scope == "kernel"})
        shown = f"{value:.2e}" if isinstance(value, float) else str(value)
        if scope == "kernel":
            verdict = "ok" if ok else "FAIL"
        elif scope == "harness" and kernel.startswith("harness negative control"):
            verdict = "flagged, as it must be (no kernel ran)" if ok else "HARNESS FAIL: not flagged"
        elif scope == "harness":
            verdict = "harness ran (no kernel checked)" if ok else "HARNESS FAIL"
        else:
            verdict = f"{scope} ok" if ok else f"{scope.upper()} FAIL"
        self.rows.append((kernel, case, dtype, f"{what} {shown}", f"<= {limit:g}" if what == "rel err" else
                          str(limit), verdict + (f" ({note})" if note else ""), SCOPE_SHOWN[scope]))
        return ok

    def timing(self, kernel: str, case: str, dtype: str, us: float, baseline: str = "", base_us: float | None = None,
               extra: dict | None = None, result: str = ""):
        rec = {"kernel": kernel, "case": case, "dtype": dtype, "median_us": us, "baseline": baseline,
               "baseline_us": base_us, **(extra or {})}
        if base_us:
            rec["speedup"] = base_us / us
        self.timings.append(rec)
        base = f"{baseline} {base_us:.1f} µs" if base_us else baseline
        ratio = f"{base_us / us:.2f}x" if base_us else ""
        self.rows.append((kernel, case, dtype, f"{us:.1f} µs", base, " ".join(x for x in (ratio, result) if x),
                          "timing (GPU)"))

    @property
    def passed(self) -> bool:
        return all(c["ok"] for c in self.correctness)

    def counts(self) -> dict:
        """{scope: (passed, total)} over the correctness rows."""
        out = {}
        for c in self.correctness:
            done, total = out.get(c["scope"], (0, 0))
            out[c["scope"]] = (done + c["ok"], total + 1)
        return out

    @property
    def kernels_checked(self) -> bool:
        return any(c["scope"] == "kernel" for c in self.correctness)

    def summary(self, dry_run: bool, seconds: float) -> str:
        counts = self.counts()
        parts = ", ".join(f"{scope} {counts[scope][0]}/{counts[scope][1]}" for scope in SCOPES if scope in counts)
        if dry_run or not self.kernels_checked:
            state = "all passed" if self.passed else "FAILED"
            return (f"DRY RUN: NO KERNEL WAS RUN OR CHECKED. CPU-side checks {state}: {parts} ({seconds} s). "
                    f"The harness rows compare the reference with itself (and wrong CPU outputs it must flag); "
                    f"they say nothing about the CUDA kernels, which only plugins/tests/gpu_check.sh on a GPU checks.")
        return f"{'PASSED' if self.passed else 'FAILED'}: {parts} checks ({seconds} s, on a GPU)"

    def table(self) -> str:
        head = ("kernel", "case", "dtype", "result", "reference / baseline", "verdict", "scope")
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(str(x) for x in r) + " |" for r in self.rows]
        return "\n".join(lines)


def rel_err(torch, ours, ref) -> float:
    ours, ref = ours.detach().double().cpu(), ref.detach().double().cpu()
    denom = ref.norm().item()
    diff = (ours - ref).norm().item()
    return diff / denom if denom > 0 else diff


# ---- InfLLM v2 --------------------------------------------------------------------------------------
@dataclass
class AttnCase:
    name: str
    T: int
    P: int
    Hq: int
    Hkv: int
    D: int
    cfg: dict
    tree: bool = False
    parents: tuple | None = None  # a fixed draft tree (else a random one)
    dense_tree: bool = False  # every block selected: also check against dense tree-masked attention


# Sparse for every query but top-k covering every block: a tree step must equal dense attention
# under its mask. The fixed tree has siblings at every level, so its slots and positions differ.
ALL_BLOCKS = {"window_size": 128, "topk": 64, "dense_len": 1}
TREE = (-1, 0, 0, 1, 2, 2, 4)


def attn_cases(dry_run: bool) -> list[AttnCase]:
    small = {"window_size": 256, "topk": 6, "dense_len": 1024}  # 4-block window, so short caches are sparse
    if dry_run:  # tiny shapes: every rule still fires (dense and sparse queries, window, ties)
        s = {"window_size": 128, "topk": 3, "dense_len": 200}
        return [AttnCase("decode", 1, 517, 8, 2, 16, s),
                AttnCase("prefill", 40, 400, 4, 1, 16, {**s, "dense_len": 420, "semantics": "v2"}),
                AttnCase("tree", 5, 300, 4, 2, 8, s, tree=True),
                AttnCase("tree = dense", 7, 64 * 3 + 62, 4, 2, 16, ALL_BLOCKS, tree=True, parents=TREE,
                         dense_tree=True),
                *shipped_cases()]  # the planned shapes: the CPU reference side runs them in seconds
    return [
        AttnCase("decode G16 v1", 1, 4095, 32, 2, 128, small),
        AttnCase("decode G16 v2", 1, 4095, 32, 2, 128, {**small, "semantics": "v2"}),
        AttnCase("verify T=5 tree", 5, 3000, 32, 2, 128, small, tree=True),
        AttnCase("verify T=24 tree (prefill path)", 24, 3000, 32, 2, 128, small, tree=True),
        AttnCase("tree = dense, decode path", 7, 64 * 40 + 62, 32, 2, 128, ALL_BLOCKS, tree=True, parents=TREE,
                 dense_tree=True),
        AttnCase("tree = dense, prefill path", 24, 64 * 40 + 50, 32, 2, 128, {**ALL_BLOCKS, "semantics": "v2"},
                 tree=True, dense_tree=True),
        AttnCase("decode G3 D64", 2, 2047, 12, 4, 64, small),
        AttnCase("prefill G16 mixed dense/sparse", 256, 900, 32, 2, 128, small),
        AttnCase("prefill G1 v2", 100, 1333, 2, 2, 64, {**small, "semantics": "v2"}),
        AttnCase("first chunk P=0", 512, 0, 16, 2, 64, {"window_size": 128, "topk": 2, "dense_len": 200}),
        # Group sizes 1, 2, 32 and head dims 64/128 beside the G16/G3 cases above.
        AttnCase("decode G1 D128", 1, 3001, 4, 4, 128, small),
        AttnCase("decode G2 D64", 3, 2500, 8, 4, 64, small),
        AttnCase("decode G32 D64", 1, 3100, 32, 1, 64, small),
        AttnCase("prefill G2 D128", 80, 1500, 4, 2, 128, {**small, "semantics": "v2"}),
        # Multi-chunk selection: nb > 256 blocks, the top-k over several chunks of the block list.
        AttnCase("select nb=314 prefill", 64, 20000, 32, 2, 128, small),
        # Multi-block decode split: 300 blocks chosen, split over many CTAs.
        AttnCase("decode split 300 blocks", 1, 64 * 300 - 1, 32, 2, 128, {"window_size": 128, "topk": 300,
                                                                         "dense_len": 1}),
        *shipped_cases(),
    ]


SHIPPED_P = (32768, 65536, 131072)


def shipped_cases(contexts=SHIPPED_P) -> list[AttnCase]:
    """The shipped sparse settings (SparseConfig's defaults: window 2048, top-k 64, dense_len 8192),
    MiniCPM4-8B's attention, one decode step after P tokens."""
    return [AttnCase(f"shipped settings decode P={P}", 1, P, 32, 2, 128, {}) for P in contexts]


def case_shape(case: AttnCase) -> str:
    cfg = sparse_config(**case.cfg)
    nb = -(-(case.P + case.T) // cfg.block_size)
    return (f"T={case.T} P={case.P} Hq={case.Hq} Hkv={case.Hkv} G={case.Hq // case.Hkv} D={case.D} nb={nb} "
            f"window={cfg.window_size} topk={cfg.topk} dense_len={cfg.dense_len} {cfg.semantics}"
            + (" tree" if case.tree else ""))


def stage1_reference(torch, q, ck, pos, cfg, path=None):
    """[Hkv, T, nc] chunk scores: the first half of edgecpm.export.infllmv2.block_scores (path: a
    draft tree's own-path chunk logits, infllmv2.path_chunk_logits)."""
    T, Hq, D = q.shape
    Hkv, nc = ck.shape[1], ck.shape[0]
    qg = q.float().reshape(T, Hkv, Hq // Hkv, D).permute(1, 2, 0, 3)
    s = torch.einsum("hgtd,chd->hgtc", qg, ck) / math.sqrt(D)
    if path is not None:
        queries, logits = path
        s[:, :, queries, nc - logits.shape[-1] :] = logits
    chunk_end = torch.arange(nc) * cfg.kernel_stride + cfg.kernel_size - 1
    s = s.masked_fill(chunk_end[None, :] > pos[:, None], float("-inf"))
    return torch.softmax(s, dim=-1).nan_to_num(0.0).sum(1)


def tree_mask(torch, T: int, g, parents=None) -> tuple:
    """A draft tree (random unless `parents` is given: each node's parent is an earlier node, the
    root's -1); mask = ancestors, positions = P + depth."""
    parent = list(parents) if parents else [-1] + [int(torch.randint(0, i, (1,), generator=g)) for i in range(1, T)]
    mask = torch.zeros(T, T, dtype=torch.bool)
    depth = [0] * T
    for i in range(T):
        j = i
        while j >= 0:
            mask[i, j] = True
            j = parent[j]
        depth[i] = 0 if parent[i] < 0 else depth[parent[i]] + 1
    return mask, torch.tensor(depth)


def near_tie_rows(torch, ref, q, ck, pos, S, cfg, ours, theirs, path=None, eps=1e-5):
    """(rows whose block sets differ, of which explained by near-ties, agree [Hkv, T] bool). Only the
    blocks competing for the top-k slots can legitimately differ -- not the init blocks, the window
    or blocks past the query's own (all forced), nor any block of a dense query -- and only where
    their reference scores lie within eps of the selection threshold: the k-th largest score among
    the competing blocks, k = the slots the forced blocks leave them."""
    blk = ref.block_scores(q, ck, pos, S, cfg, path)  # [Hkv, T, nb], before init/window/top-k
    nb = blk.shape[-1]
    b = torch.arange(nb)
    local = cfg.window_size // cfg.block_size
    v2 = cfg.semantics == "v2"
    diff = (ours != theirs).any(-1)  # [Hkv, T]
    rows = diff.nonzero().tolist()
    explained = 0
    for h, t in rows:
        p = int(pos[t])
        if p + 1 < cfg.dense_len:
            continue  # dense: every causal block, nothing competes
        qb = p // cfg.block_size
        lo = qb - local if v2 else qb - local + 1  # the window is [lo, qb]
        competing = (b >= cfg.init_blocks) & (b < min(lo, qb))
        forced = ((b < cfg.init_blocks) | (v2 & (b >= lo) & (b <= qb))).sum()
        slots = min(cfg.topk + (local if v2 else 0), nb) - int(forced)
        scores = blk[h, t][competing].sort(descending=True).values
        if not 1 <= slots <= scores.numel():
            continue  # every competing block fits (or none): the sets cannot differ legitimately
        thr = float(scores[slots - 1])
        d = (ours[h, t] != theirs[h, t]).nonzero().flatten()
        explained += bool(competing[d].all() and ((blk[h, t][d] - thr).abs() <= eps * max(1.0, abs(thr))).all())
    return len(rows), explained, ~diff


def dense_tree_attention(torch, q, k_all, v_all, mask):
    """Every past row plus the new rows the step's mask allows, float64 [T, Hq, D]."""
    T, Hq, D = q.shape
    S, Hkv = k_all.shape[:2]
    G = Hq // Hkv
    visible = torch.cat([torch.ones(T, S - T, dtype=torch.bool), mask], 1)  # [T, S]
    kx, vx = k_all.double().repeat_interleave(G, 1), v_all.double().repeat_interleave(G, 1)  # [S, Hq, D]
    s = torch.einsum("thd,shd->hts", q.double(), kx) / math.sqrt(D)
    s = s.masked_fill(~visible[None], float("-inf"))
    return torch.einsum("hts,shd->thd", torch.softmax(s, -1), vx)


class Device:
    """Runs the kernels through the C ABI on torch CUDA tensors (or, in a dry run, stands in for them
    with the reference so that every comparison path runs)."""

    def __init__(self, torch, lib, dry_run: bool):
        self.torch, self.lib, self.dry = torch, lib, dry_run

    def call(self, name, *args):
        status = getattr(self.lib, name)(*args)
        if status != 0:
            raise KernelError(f"{name}: {self.lib.ecpm_status_string(status).decode()}")

    def ptr(self, t):
        return ctypes.c_void_p(t.data_ptr()) if t is not None and t.numel() else ctypes.c_void_p(0)

    @property
    def stream(self):
        return ctypes.c_void_p(self.torch.cuda.current_stream().cuda_stream)

    def empty(self, shape, dtype):
        return self.torch.empty(shape, dtype=dtype, device="cuda")


def run_attn_case(torch, ref, dev: Device, rep: Report, case: AttnCase, dtype: str, seed: int):
    cfg = sparse_config(**case.cfg)
    g = torch.Generator().manual_seed(seed)
    tdt = {"fp32": torch.float32, "fp16": torch.float16}[dtype]
    T, P, Hq, Hkv, D = case.T, case.P, case.Hq, case.Hkv, case.D
    S = P + T
    q = torch.randn(T, Hq, D, generator=g).to(tdt)
    k_all = torch.randn(S, Hkv, D, generator=g).to(tdt)
    v_all = torch.randn(S, Hkv, D, generator=g).to(tdt)
    past_k, past_v, k, v = k_all[:P], v_all[:P], k_all[P:], v_all[P:]
    if case.tree:
        mask, depth = tree_mask(torch, T, g, case.parents)
        pos = P + depth
    else:
        mask, pos = torch.ones(T, T, dtype=torch.bool).tril(), torch.arange(P, S)
    ck_past = ref.new_chunks(k_all[:0], past_k, cfg)

    # Reference (CPU).
    ck_new_ref = ref.new_chunks(past_k, k, cfg)
    ck = torch.cat([ck_past, ck_new_ref])
    path = ref.path_chunk_logits(q, past_k, k, pos, mask, cfg)  # a tree's own-path chunks (None: plain)
    score_ref = stage1_reference(torch, q, ck, pos, cfg, path)
    blocks_ref = ref.select_blocks(ref.block_scores(q, ck, pos, S, cfg, path), pos, cfg)
    out_ref = ref.sparse_attend(q, k, v, past_k, past_v, pos, mask, blocks_ref, cfg)
    nb = blocks_ref.shape[-1]
    label = f"{case.name} (T={T} P={P} Hq={Hq} Hkv={Hkv} D={D} {cfg.semantics})"

    if dev.dry:  # the reference stands in for the device: the comparisons run, no kernel is checked
        ck_new, score, blocks_a, blocks_b = ck_new_ref, score_ref, blocks_ref, blocks_ref
        out_dec = out_pre = out_fwd = out_ref
        ck_fwd = ck_new_ref
        scope = "harness"
    else:
        ck_new, score, blocks_a, blocks_b, out_dec, out_pre, out_fwd, ck_fwd = device_attn(
            torch, dev, cfg, q, k, v, past_k, past_v, ck_past, ck_new_ref, score_ref, blocks_ref, pos, mask, nb)
        scope = "kernel"

    tol = TOL[dtype]
    rep.check("infllmv2 compress", label, dtype, rel_err(torch, ck_new, ck_new_ref), TOL["fp32"], scope=scope)
    rep.check("infllmv2 stage1", label, dtype, rel_err(torch, score, score_ref), TOL["fp32"], scope=scope)
    same = bool((blocks_a == blocks_ref).all())
    rep.check("infllmv2 select (ref scores)", label, "-", int((blocks_a != blocks_ref).any(-1).sum()), 0,
              what="rows differing", ok=same, scope=scope)
    n_diff, n_tie, agree = near_tie_rows(torch, ref, q, ck, pos, S, cfg, blocks_b, blocks_ref, path)
    rep.check("infllmv2 select (own scores)", label, "-", n_diff, 0, what="rows differing", ok=n_diff == n_tie,
              note=f"{n_tie} near-ties" if n_diff else "", scope=scope)
    rep.check("infllmv2 attend decode", label, dtype, rel_err(torch, out_dec, out_ref), tol, scope=scope)
    rep.check("infllmv2 attend prefill", label, dtype, rel_err(torch, out_pre, out_ref), tol, scope=scope)
    # The whole op on the (query, kv head) rows whose block sets agree with the reference's.
    rows = agree.T.repeat_interleave(Hq // Hkv, dim=1)  # [T, Hq]
    if rows.any():
        rep.check("infllmv2 forward", label, dtype, rel_err(torch, out_fwd[rows], out_ref[rows]), tol,
                  note=f"{int((~agree).sum())} rows with near-tie block sets left out" if n_diff else "", scope=scope)
    rep.check("infllmv2 forward ck_new", label, dtype, rel_err(torch, ck_fwd, ck_new_ref), TOL["fp32"], scope=scope)
    if case.dense_tree:  # every block selected: nodes by position, so = dense tree-masked attention
        dense = dense_tree_attention(torch, q, k_all, v_all, mask)
        assert bool(blocks_ref.sum(-1).eq(pos // cfg.block_size + 1).all()), "the case must select every block"
        rep.check("infllmv2 reference: tree = dense tree attention", label, dtype, rel_err(torch, out_ref, dense),
                  tol, scope="reference")
        for kernel, out in (("attend decode", out_dec), ("attend prefill", out_pre), ("forward", out_fwd)):
            rep.check(f"infllmv2 tree = dense tree attention ({kernel})", label, dtype, rel_err(torch, out, dense),
                      tol, scope=scope)
    if dev.dry:  # what a CPU can check for real: the references, and that the comparisons can fail
        reference_attn_checks(torch, ref, rep, case, cfg, dtype, label, q, k_all, v_all, pos, mask, ck_past,
                              ck_new_ref, score_ref, blocks_ref, out_ref, path)
        if case.name == "decode" and dtype == "fp32":
            attn_negative_controls(torch, ref, rep, cfg, label, q, k, v, past_k, past_v, ck, pos, mask, S, blocks_ref,
                                   out_ref, path)


# ---- what a dry run checks for real (CPU) ---------------------------------------------------------
def brute_force_reference():
    """tests/infllmv2_reference.py: the independent brute-force InfLLM v2 (numpy, float64 loops)."""
    path = ROOT / "tests" / "infllmv2_reference.py"
    spec = importlib.util.spec_from_file_location("edgecpm_infllmv2_brute_force", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.reference


def cfg_dict(cfg) -> dict:
    return {n: getattr(cfg, n) for n in ("kernel_size", "kernel_stride", "block_size", "init_blocks", "window_size",
                                         "topk", "dense_len", "semantics")}


def reference_attn_checks(torch, ref, rep: Report, case: AttnCase, cfg, dtype, label, q, k_all, v_all, pos, mask,
                          ck_past, ck_new_ref, score_ref, blocks_ref, out_ref, path):
    """The references the GPU check compares the kernels with, against independent implementations:
    compressed keys against numpy window means; this script's stage-1 reference, max-pooled in numpy,
    against infllmv2.block_scores; block sets and outputs against the brute-force reference (a tree
    node: the brute force over the past plus the node's own path, as plain decoding sees it)."""
    T, P = case.T, case.P
    ks, st, B = cfg.kernel_size, cfg.kernel_stride, cfg.block_size
    kf = k_all.double().numpy()
    first, last = cfg.n_chunks(P), cfg.n_chunks(P + T)
    means = np.array([kf[c * st : c * st + ks].mean(0) for c in range(first, last)]).reshape(-1, *kf.shape[1:])
    rep.check("infllmv2 reference: compressed keys = numpy window means", label, dtype,
              rel_err(torch, ck_new_ref, torch.from_numpy(means)), 1e-6, scope="reference")

    ck = torch.cat([ck_past, ck_new_ref])
    probs = score_ref.double().numpy()  # [Hkv, T, nc]
    nc, nb, per = probs.shape[-1], blocks_ref.shape[-1], B // st
    pooled = np.full(probs.shape[:2] + (nb,), -np.inf)
    for b in range(nb):
        lo, hi = max(per * b - 1, 0), min(per * b + per, nc)
        if lo < hi:
            pooled[..., b] = probs[..., lo:hi].max(-1)
    blk = ref.block_scores(q, ck, pos, P + T, cfg, path).double().numpy()
    same_inf = bool((np.isinf(pooled) == np.isinf(blk)).all())
    fin = np.isfinite(pooled) & np.isfinite(blk)
    err = float(np.abs(pooled[fin] - blk[fin]).max() / max(np.abs(blk[fin]).max(), 1e-30)) if fin.any() else 0.0
    rep.check("infllmv2 reference: stage-1 reference max-pooled = block_scores", label, dtype, err, 1e-6,
              ok=same_inf and err <= 1e-6, scope="reference")

    brute = brute_force_reference()
    cd = cfg_dict(cfg)
    qn, kn, vn = (t.double().numpy() for t in (q, k_all, v_all))
    Hkv = k_all.shape[1]
    want = np.zeros(q.shape)
    chosen = {}
    if case.tree:  # each node: the past plus its own path in position order (itself last)
        for t in range(T):
            path_rows = sorted(np.flatnonzero(mask[t].numpy()), key=lambda i: int(pos[i]))
            rows = list(range(P)) + [P + int(i) for i in path_rows]
            o, sel = brute(qn[t : t + 1], kn[rows], vn[rows], int(pos[t]), cd)
            want[t] = o[0]
            chosen.update({(t, g): sel[(0, g)] for g in range(Hkv)})
    else:
        want, chosen = brute(qn, kn, vn, P, cd)
    differing = sum(blocks_ref[g, t].nonzero().flatten().tolist() != chosen[(t, g)] for t in range(T)
                    for g in range(Hkv))
    rep.check("infllmv2 reference: block sets = brute force", label, dtype, differing, 0, what="rows differing",
              ok=differing == 0, scope="reference")
    rep.check("infllmv2 reference: output = brute force", label, dtype, rel_err(torch, out_ref,
              torch.from_numpy(want)), TOL[dtype], scope="reference")


def attn_negative_controls(torch, ref, rep: Report, cfg, label, q, k, v, past_k, past_v, ck, pos, mask, S, blocks_ref,
                           out_ref, path):
    """Deliberately wrong "kernel" results computed on the CPU: the comparisons must flag them (a
    harness that cannot fail checks nothing)."""
    nb = blocks_ref.shape[-1]
    causal = torch.arange(nb)[None, None, :] <= (pos // cfg.block_size)[None, :, None]
    every = causal.expand_as(blocks_ref).clone()
    assert bool((every != blocks_ref).any()), "the case must be sparse"
    wrong = ref.sparse_attend(q, k, v, past_k, past_v, pos, mask, every, cfg)
    err = rel_err(torch, wrong, out_ref)
    rep.check("harness negative control: attention over every causal block", label, "fp32", err, TOL["fp32"],
              what="rel err, must exceed", ok=err > TOL["fp32"], scope="harness")
    qb = int(pos[0]) // cfg.block_size
    dropped = blocks_ref.clone()
    dropped[:, 0, qb] = False  # the query's own block is always chosen
    n_diff, n_tie, _ = near_tie_rows(torch, ref, q, ck, pos, S, cfg, dropped, blocks_ref, path)
    rep.check("harness negative control: select drops the query's own block", label, "-", n_diff - n_tie, 1,
              what="rows flagged, must be >=", ok=n_diff > 0 and n_tie == 0, scope="harness")


def device_attn(torch, dev: Device, cfg, q, k, v, past_k, past_v, ck_past, ck_new_ref, score_ref, blocks_ref, pos,
                mask, nb):
    """Every InfLLM v2 stage on the GPU; stage inputs come from the reference where that isolates a stage."""
    T, Hq, D = q.shape
    P, Hkv = past_k.shape[0], k.shape[1]
    dt = F16 if q.dtype == torch.float16 else F32
    host = {"q": q, "k": k, "v": v, "pk": past_k, "pv": past_v, "ckp": ck_past}
    cu = {n: t.cuda().contiguous() for n, t in host.items()}
    pos32 = pos.to(torch.int32).cuda()
    mask8 = mask.to(torch.uint8).cuda()
    dims, c = Dims(T, P, Hq, Hkv, D), Config.of(cfg)
    p, s, lib = dev.ptr, dev.stream, dev.lib
    nc = ck_past.shape[0] + ck_new_ref.shape[0]

    ck_new = dev.empty((ck_new_ref.shape[0], Hkv, D), torch.float32)
    dev.call("ecpm_infllmv2_compress", dt, p(cu["pk"]), p(cu["k"]), dims, ctypes.byref(c), p(ck_new), s)
    score = dev.empty((Hkv, T, nc), torch.float32)
    ws1 = dev.empty((max(lib.ecpm_infllmv2_stage1_workspace_size(dims, ctypes.byref(c)), 1),), torch.uint8)
    dev.call("ecpm_infllmv2_stage1", dt, p(cu["q"]), p(cu["pk"]), p(cu["k"]), p(cu["ckp"]), p(ck_new), p(pos32),
             p(mask8), dims, ctypes.byref(c), p(score), p(ws1), ws1.numel(), s)

    def select(scores):
        blocks = dev.empty((Hkv, T, nb), torch.uint8)
        lst, cnt = dev.empty((Hkv, T, nb), torch.int32), dev.empty((Hkv, T), torch.int32)
        dev.call("ecpm_infllmv2_select", p(scores), p(pos32), dims, ctypes.byref(c), p(blocks), p(lst), p(cnt), s)
        return blocks, lst, cnt

    blocks_a, _, _ = select(score_ref.cuda().contiguous())  # exact: same scores in, same sets out
    blocks_b, _, _ = select(score)
    # Stage 2 on the reference's blocks (list form for decode, built here).
    ref_blocks = blocks_ref.to(torch.uint8).cuda()
    cnt = blocks_ref.sum(-1).to(torch.int32).cuda()
    order = torch.sort((~blocks_ref).to(torch.int8), dim=-1, stable=True).indices.to(torch.int32).cuda()
    out_dec, out_pre = torch.empty_like(cu["q"]), torch.empty_like(cu["q"])
    wsd = dev.empty((max(lib.ecpm_infllmv2_decode_workspace_size(dims, ctypes.byref(c)), 1),), torch.uint8)
    dev.call("ecpm_infllmv2_attend_decode", dt, p(cu["q"]), p(cu["k"]), p(cu["v"]), p(cu["pk"]), p(cu["pv"]), p(mask8),
             p(order), p(cnt), p(pos32), dims, ctypes.byref(c), p(out_dec), p(wsd), wsd.numel(), s)
    dev.call("ecpm_infllmv2_attend_prefill", dt, p(cu["q"]), p(cu["k"]), p(cu["v"]), p(cu["pk"]), p(cu["pv"]),
             p(mask8), p(ref_blocks), p(pos32), dims, ctypes.byref(c), p(out_pre), s)
    # The whole op.
    out_fwd, ck_fwd = torch.empty_like(cu["q"]), torch.empty_like(ck_new)
    ws = dev.empty((max(lib.ecpm_infllmv2_workspace_size(dims, ctypes.byref(c)), 1),), torch.uint8)
    dev.call("ecpm_infllmv2_forward", dt, p(cu["q"]), p(cu["k"]), p(cu["v"]), p(cu["pk"]), p(cu["pv"]), p(cu["ckp"]),
             p(pos32), p(mask8), dims, ctypes.byref(c), p(out_fwd), p(ck_fwd), p(ws), ws.numel(), s)
    torch.cuda.synchronize()
    return (ck_new.cpu(), score.cpu(), blocks_a.cpu().bool(), blocks_b.cpu().bool(), out_dec.cpu(), out_pre.cpu(),
            out_fwd.cpu(), ck_fwd.cpu())


# ---- ternary ----------------------------------------------------------------------------------------
def pack_codes(codes: np.ndarray) -> np.ndarray:
    """uint8 codes [N, K] in {0, 1, 2} -> uint32 [N, ceil(K/16)], 16 per word, lowest bits first
    (the TernaryMatMul contract); the padding past K is code 1 (weight 0)."""
    N, K = codes.shape
    kw = -(-K // 16)
    padded = np.ones((N, kw * 16), np.uint64)
    padded[:, :K] = codes
    shifts = 2 * np.arange(16, dtype=np.uint64)
    return (padded.reshape(N, kw, 16) << shifts).sum(-1, dtype=np.uint64).astype(np.uint32)


def ternary_reference(torch, x, codes, scales, gs):
    """y = x @ W^T with W = (code - 1) * scale, in float64."""
    w = (torch.from_numpy(codes).double() - 1.0) * scales.double().cpu().repeat_interleave(gs, dim=1)
    return x.double().cpu() @ w.T


TERNARY_CASES = [  # (M, N, K, group_size)
    (1, 1000, 4096, 128), (3, 2048, 1024, 1024), (4, 777, 4096, 4096), (2, 640, 2048, 32), (1, 300, 1000, 200),
    (17, 1000, 4096, 128), (130, 515, 2048, 2048), (64, 256, 1000, 1000),
]


def run_ternary_case(torch, dev: Device, rep: Report, M, N, K, gs, dtype, seed):
    rng = np.random.default_rng(seed)
    tdt = {"fp32": torch.float32, "fp16": torch.float16}[dtype]
    codes = rng.integers(0, 3, size=(N, K), dtype=np.uint8)
    packed = pack_codes(codes)
    scales = torch.from_numpy(rng.uniform(0.01, 0.05, size=(N, K // gs)).astype(np.float32)).to(tdt)
    x = torch.from_numpy(rng.standard_normal((M, K)).astype(np.float32)).to(tdt)
    ref = ternary_reference(torch, x, codes, scales, gs)
    label = f"M={M} N={N} K={K} gs={gs}"
    if dev.dry:  # the reference stands in for the device: the comparisons run, no kernel is checked
        outs, scope = {"gemv": ref, "gemm": ref}, "harness"
    else:
        xc, sc = x.cuda(), scales.cuda()
        pc = torch.from_numpy(packed.view(np.int32)).cuda()
        outs, scope = {}, "kernel"
        for kind in ("gemv", "gemm"):
            y = dev.empty((M, N), tdt)
            dev.call(f"ecpm_ternary_{kind}", F16 if dtype == "fp16" else F32, dev.ptr(xc), dev.ptr(pc), dev.ptr(sc),
                     dev.ptr(y), M, N, K, gs, dev.stream)
            outs[kind] = y
        torch.cuda.synchronize()
    for kind, y in outs.items():
        if kind == "gemv" and M > 4 and not dev.dry:
            continue  # the GEMV serves decode (M <= 4); larger M is the GEMM's
        rep.check(f"ternary {kind}", label, dtype, rel_err(torch, y, ref), TOL[dtype], scope=scope)
    if dev.dry:
        ternary_host_and_reference_checks(torch, rep, label, dtype, x, codes, packed, scales, gs, ref)


def ternary_host_and_reference_checks(torch, rep: Report, label, dtype, x, codes, packed, scales, gs, ref):
    """On the CPU, for real: the packing the kernels are fed (this script's pack_codes = the exporter's
    ternary_format.pack = the contract's formula read back code by code), the float64 reference
    against numpy on ternary_format.dequantize, and negative controls the comparison must flag:
    codes read in reversed bit order within each word, and codes not offset by 1."""
    from edgecpm import ternary_format

    N, K = codes.shape
    kw = packed.shape[1]
    n, k = np.meshgrid(np.arange(N), np.arange(kw * 16), indexing="ij")
    formula = (packed[n, k // 16] >> (2 * (k % 16)).astype(np.uint32)) & 3  # code(n, k) as the contract reads it
    bad = int((formula[:, :K] != codes).sum()) + int((formula[:, K:] != 1).sum())  # padding: code 1, weight 0
    bad += int((ternary_format.pack(codes) != packed).sum())
    rep.check("ternary packing: pack_codes = ternary_format.pack = contract", label, "-", bad, 0, what="mismatches",
              ok=bad == 0, scope="host")
    w = ternary_format.dequantize(packed, scales.float().numpy(), K).astype(np.float64)
    numpy_ref = x.double().numpy() @ w.T
    rep.check("ternary reference = numpy (ternary_format.dequantize)", label, dtype,
              rel_err(torch, ref, torch.from_numpy(numpy_ref)), 1e-12, scope="reference")
    if dtype != "fp32":
        return
    # What a kernel with the bit order reversed within each word (or without the -1) would compute.
    padded = np.ones((N, kw * 16), np.uint8)
    padded[:, :K] = codes
    reversed_order = padded.reshape(N, kw, 16)[:, :, ::-1].reshape(N, -1)[:, :K]
    for what, wrong_codes, offset in (("codes in reversed bit order", reversed_order, 1.0),
                                      ("codes not offset by 1", codes, 0.0)):
        w_wrong = (torch.from_numpy(np.ascontiguousarray(wrong_codes)).double() - offset) * \
            scales.double().repeat_interleave(gs, dim=1)
        err = rel_err(torch, x.double() @ w_wrong.T, ref)
        rep.check(f"harness negative control: ternary {what}", label, dtype, err, TOL[dtype],
                  what="rel err, must exceed", ok=err > TOL[dtype], scope="harness")


# ---- the plugins' converter and gather kernels ----------------------------------------------------
HELPER_CASES = [  # (kernel, case)
    ("convert_index", "int64 -> int32 n=100000"), ("convert_index", "int32 -> int32 n=100000"),
    ("convert_mask", "bool -> uint8 n=65536"), ("convert_mask", "int32 -> uint8 n=65536"),
    ("gather_rows", "fp16 slabs=48 rows=4096 row_bytes=512 start=4000 n_rows=60"),
]


def run_helper_cases(torch, dev: Device, rep: Report, seed: int):
    """ecpm_convert_index / ecpm_convert_mask / ecpm_gather_rows against torch on the same inputs."""
    g = torch.Generator().manual_seed(seed)
    scope = "harness" if dev.dry else "kernel"
    for kernel, case in HELPER_CASES:
        if kernel == "convert_index":
            src = torch.randint(-(2**31), 2**31 - 1, (100000,), generator=g)
            src = src if case.startswith("int64") else src.to(torch.int32)
            want = src.to(torch.int32)
            got = want if dev.dry else device_helper(torch, dev, kernel, src, torch.int32)
        elif kernel == "convert_mask":
            src = torch.randint(0, 3, (65536,), generator=g)
            src = src.bool() if case.startswith("bool") else src.to(torch.int32)
            want = (src != 0).to(torch.uint8)
            got = want if dev.dry else device_helper(torch, dev, kernel, src, torch.uint8)
        else:
            base = torch.randn(48, 4096, 2, 128, generator=g).half()
            rows = torch.sort(torch.randperm(96, generator=g)[:60]).values + 4000
            want = base.clone()
            want[:, 4000 : 4000 + len(rows)] = base[:, rows]
            got = want if dev.dry else device_gather(torch, dev, base, 4000, rows)
        bad = int((got.cpu() != want).sum())
        rep.check(f"plugin helper {kernel}", case, "-", bad, 0, what="elements differing", ok=bad == 0, scope=scope)
    if dev.dry:  # the comparison must flag a gather that forgot the start offset
        wrong = base.clone()
        wrong[:, : len(rows)] = base[:, rows]
        bad = int((wrong != want).sum())
        rep.check("harness negative control: gather_rows without the start offset", HELPER_CASES[-1][1], "-", bad, 1,
                  what="elements differing, must be >=", ok=bad > 0, scope="harness")


def device_helper(torch, dev: Device, kernel: str, src, out_dtype):
    s, d = src.cuda(), torch.empty(src.numel(), dtype=out_dtype, device="cuda")
    dev.call(f"ecpm_{kernel}", dev.ptr(s), s.element_size(), dev.ptr(d), s.numel(), dev.stream)
    torch.cuda.synchronize()
    return d


def device_gather(torch, dev: Device, base, start: int, rows):
    b, r = base.cuda(), rows.to(torch.int32).cuda()
    slab = b[0].numel() * b.element_size()
    row_bytes = b[0, 0].numel() * b.element_size()
    dev.call("ecpm_gather_rows", dev.ptr(b), b.shape[0], slab, row_bytes, start, dev.ptr(r), len(rows), dev.stream)
    torch.cuda.synchronize()
    return b


# ---- timings ----------------------------------------------------------------------------------------
def time_us(torch, fn, batch: int = 20, repeats: int = 15, warmup: int = 5) -> float:
    """Median over `repeats` of the mean time of `batch` back-to-back calls (CUDA events), after warm-up."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    pairs = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(batch):
            fn()
        end.record()
        pairs.append((start, end))
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) * 1e3 / batch for s, e in pairs)


def copy_bandwidth(torch) -> float:
    """Device-to-device cudaMemcpy (tensor.copy_) bandwidth, counting bytes read + written, GB/s."""
    n = 1 << 30
    src, dst = torch.empty(n, dtype=torch.uint8, device="cuda"), torch.empty(n, dtype=torch.uint8, device="cuda")
    us = time_us(torch, lambda: dst.copy_(src), batch=5, repeats=11)
    return 2 * n / us / 1e3


def time_ternary(torch, dev: Device, rep: Report, copy_gbps: float):
    """MiniCPM4-8B's projections: gate/up [16384 x 4096], down [4096 x 16384], q/o [4096 x 4096]."""
    for N, K, gs in TERNARY_TIMED:
        time_ternary_shape(torch, dev, rep, copy_gbps, N, K, gs)


def time_ternary_shape(torch, dev: Device, rep: Report, copy_gbps: float, N: int, K: int, gs: int):
    rng = np.random.default_rng(7)
    pc = torch.from_numpy(pack_codes(rng.integers(0, 3, size=(N, K), dtype=np.uint8)).view(np.int32)).cuda()
    sc = torch.rand(N, K // gs, device="cuda", dtype=torch.float16) * 0.05
    w16 = torch.randn(N, K, device="cuda", dtype=torch.float16)  # the fp16 baseline's weights
    x = torch.randn(1, K, device="cuda", dtype=torch.float16)
    y = torch.empty(1, N, device="cuda", dtype=torch.float16)
    us = time_us(torch, lambda: dev.call("ecpm_ternary_gemv", F16, dev.ptr(x), dev.ptr(pc), dev.ptr(sc), dev.ptr(y),
                                         1, N, K, gs, dev.stream), batch=50)
    moved = pc.numel() * 4 + sc.numel() * 2 + x.numel() * 2 + y.numel() * 2
    gbps = moved / us / 1e3
    base = time_us(torch, lambda: torch.matmul(x, w16.T), batch=50)
    frac = gbps / copy_gbps
    rep.timing("ternary gemv", f"M=1 N={N} K={K} gs={gs}", "fp16", us, "fp16 matmul", base,
               {"achieved_GBps": gbps, "fraction_of_copy_bw": frac, "bytes": moved},
               f"{gbps:.0f} GB/s = {frac:.2f} of copy bw (goal {GEMV_GOAL})")
    M = 512
    xm = torch.randn(M, K, device="cuda", dtype=torch.float16)
    ym = torch.empty(M, N, device="cuda", dtype=torch.float16)
    us = time_us(torch, lambda: dev.call("ecpm_ternary_gemm", F16, dev.ptr(xm), dev.ptr(pc), dev.ptr(sc), dev.ptr(ym),
                                         M, N, K, gs, dev.stream), batch=5, repeats=7)
    base = time_us(torch, lambda: torch.matmul(xm, w16.T), batch=5, repeats=7)
    rep.timing("ternary gemm", f"M={M} N={N} K={K} gs={gs}", "fp16", us, "fp16 matmul", base,
               {"TFLOPs": 2 * M * N * K / us / 1e6})


def time_attention(torch, dev: Device, rep: Report):
    """InfLLM v2 decode (the whole op, T=1) vs dense attention, MiniCPM4-8B shape, shipped settings."""
    for S in (32768, 65536, 131072):
        time_attention_context(torch, dev, rep, S)


def time_attention_context(torch, dev: Device, rep: Report, S: int):
    cfg = sparse_config()  # kernel 32/16, block 64, window 2048, topk 64, dense_len 8192, v1
    c = Config.of(cfg)
    Hq, Hkv, D = 32, 2, 128
    F = torch.nn.functional
    P, T = S - 1, 1
    k_all = torch.randn(S, Hkv, D, device="cuda", dtype=torch.float16)
    v_all = torch.randn(S, Hkv, D, device="cuda", dtype=torch.float16)
    ck_past = k_all[:P].float().unfold(0, cfg.kernel_size, cfg.kernel_stride).mean(-1).contiguous()
    q = torch.randn(T, Hq, D, device="cuda", dtype=torch.float16)
    pk, pv, k, v = k_all[:P], v_all[:P], k_all[P:], v_all[P:]
    pos = torch.tensor([P], device="cuda", dtype=torch.int32)
    mask = torch.ones(1, 1, device="cuda", dtype=torch.uint8)
    dims = Dims(T, P, Hq, Hkv, D)
    nb = -(-S // cfg.block_size)
    cn = cfg.n_chunks(S) - cfg.n_chunks(P)
    out, ck_new = torch.empty_like(q), torch.empty(max(cn, 1), Hkv, D, device="cuda")
    ws = torch.empty(lib_size(dev, "ecpm_infllmv2_workspace_size", dims, c), device="cuda", dtype=torch.uint8)
    p, s = dev.ptr, dev.stream
    us = time_us(torch, lambda: dev.call("ecpm_infllmv2_forward", F16, p(q), p(k), p(v), p(pk), p(pv), p(ck_past),
                                         p(pos), p(mask), dims, ctypes.byref(c), p(out), p(ck_new), p(ws), ws.numel(),
                                         s))
    # Dense baselines: the same stage-2 kernel over every block, and PyTorch's SDPA (flash) on its
    # preferred [1, H, S, D] layout.
    all_blocks = torch.arange(nb, device="cuda", dtype=torch.int32).repeat(Hkv, 1).reshape(Hkv, T, nb)
    cnt = torch.full((Hkv, T), nb, device="cuda", dtype=torch.int32)
    wsd = torch.empty(lib_size(dev, "ecpm_infllmv2_decode_workspace_size", dims, c), device="cuda", dtype=torch.uint8)
    dense_us = time_us(torch, lambda: dev.call("ecpm_infllmv2_attend_decode", F16, p(q), p(k), p(v), p(pk), p(pv),
                                               p(mask), p(all_blocks), p(cnt), p(pos), dims, ctypes.byref(c), p(out),
                                               p(wsd), wsd.numel(), s))
    kd, vd = k_all.permute(1, 0, 2)[None].contiguous(), v_all.permute(1, 0, 2)[None].contiguous()
    qd = q.permute(1, 0, 2)[None].contiguous()
    try:
        sdpa_us = time_us(torch, lambda: F.scaled_dot_product_attention(qd, kd, vd, enable_gqa=True))
    except (TypeError, RuntimeError):
        kx, vx = kd.repeat_interleave(Hq // Hkv, 1), vd.repeat_interleave(Hq // Hkv, 1)
        sdpa_us = time_us(torch, lambda: F.scaled_dot_product_attention(qd, kx, vx))
    case = f"decode S={S // 1024}K Hq={Hq} Hkv={Hkv} D={D}"
    rep.timing("infllmv2 decode (whole op)", case, "fp16", us, "dense, same kernel", dense_us)
    rep.timing("infllmv2 decode (whole op)", case, "fp16", us, "dense, torch SDPA", sdpa_us)
    if S == 131072:
        time_stages(torch, dev, rep, q, k, v, pk, pv, ck_past, pos, mask, dims, c, cfg, nb, case)


def lib_size(dev: Device, name: str, dims, c) -> int:
    return max(int(getattr(dev.lib, name)(dims, ctypes.byref(c))), 1)


def time_stages(torch, dev, rep, q, k, v, pk, pv, ck_past, pos, mask, dims, c, cfg, nb, case):
    p, s = dev.ptr, dev.stream
    Hkv, T, D = dims.Hkv, dims.T, dims.D
    nc = cfg.n_chunks(dims.P + dims.T)
    ck_new = torch.empty(max(nc - ck_past.shape[0], 1), Hkv, D, device="cuda")
    score = torch.empty(Hkv, T, nc, device="cuda")
    ws1 = torch.empty(lib_size(dev, "ecpm_infllmv2_stage1_workspace_size", dims, c), device="cuda", dtype=torch.uint8)
    blocks = torch.empty(Hkv, T, nb, device="cuda", dtype=torch.uint8)
    lst, cnt = torch.empty(Hkv, T, nb, device="cuda", dtype=torch.int32), torch.empty(Hkv, T, device="cuda",
                                                                                       dtype=torch.int32)
    wsd = torch.empty(lib_size(dev, "ecpm_infllmv2_decode_workspace_size", dims, c), device="cuda", dtype=torch.uint8)
    out = torch.empty_like(q)
    stages = {
        "compress": lambda: dev.call("ecpm_infllmv2_compress", F16, p(pk), p(k), dims, ctypes.byref(c), p(ck_new), s),
        "stage1": lambda: dev.call("ecpm_infllmv2_stage1", F16, p(q), p(pk), p(k), p(ck_past), p(ck_new), p(pos),
                                   p(mask), dims, ctypes.byref(c), p(score), p(ws1), ws1.numel(), s),
        "select": lambda: dev.call("ecpm_infllmv2_select", p(score), p(pos), dims, ctypes.byref(c), p(blocks), p(lst),
                                   p(cnt), s),
        "attend decode": lambda: dev.call("ecpm_infllmv2_attend_decode", F16, p(q), p(k), p(v), p(pk), p(pv), p(mask),
                                          p(lst), p(cnt), p(pos), dims, ctypes.byref(c), p(out), p(wsd), wsd.numel(),
                                          s),
    }
    for fn in stages.values():
        fn()  # in order, so that each stage's inputs are real
    torch.cuda.synchronize()
    selected = int(cnt.max().item())
    for name, fn in stages.items():
        rep.timing(f"infllmv2 {name}", case, "fp16", time_us(torch, fn),
                   extra={"blocks_selected": selected} if name == "attend decode" else None,
                   result=f"{selected}/{nb} blocks" if name == "attend decode" else "")


# ---- main -------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--lib", type=Path, help=f"libedgecpm_kernels.so (default: {DEFAULT_LIB.relative_to(ROOT)})")
    ap.add_argument("--out", type=Path, help=f"JSON results (default: {DEFAULT_OUT.relative_to(ROOT)}; "
                                             f"a dry run writes none unless given)")
    ap.add_argument("--out-dir", type=Path, help="folder for gpu_check.json and gpu_check.md (the table)")
    ap.add_argument("--plan", action="store_true", help="print every case the run executes, with its shape, and exit")
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU only, checks NO kernel: references, host side and the harness, at small shapes")
    ap.add_argument("--no-timings", action="store_true", help="correctness only")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def host_checks(lib, rep: Report):
    """What the library answers without a GPU: version, config checks, chunk counts, workspace sizes."""
    def check(case, value, limit, what, ok):
        rep.check("C ABI", case, "-", value, limit, what=what, ok=ok, scope="host")

    problems = check_header()
    check("ctypes signatures = header", len(problems), 0, "differences", not problems)
    check("ecpm_version", lib.ecpm_version(), ABI_VERSION, "version", lib.ecpm_version() == ABI_VERSION)
    cfg = sparse_config()
    c = Config.of(cfg)
    ok = all(lib.ecpm_infllmv2_n_chunks(ctypes.byref(c), n) == cfg.n_chunks(n) for n in range(300))
    check("n_chunks = SparseConfig.n_chunks", int(not ok), 0, "mismatches", ok)
    bad = Config.of(cfg)
    bad.kernel_size = 48
    ok = lib.ecpm_infllmv2_check_config(ctypes.byref(c)) == 0 and lib.ecpm_infllmv2_check_config(ctypes.byref(bad)) == 1
    check("check_config accepts/refuses", int(not ok), 0, "mismatches", ok)
    sizes = [lib.ecpm_infllmv2_workspace_size(Dims(1, P, 32, 2, 128), ctypes.byref(c)) for P in (0, 4096, 131071)]
    ok = 0 < sizes[0] <= sizes[1] <= sizes[2] and lib.ecpm_infllmv2_workspace_size(Dims(1, 0, 32, 2, 12),
                                                                                   ctypes.byref(c)) == 0
    check("workspace grows with the context, 0 for bad dims", sizes[-1], 0, "bytes at 128K", ok)


ARG, WORKSPACE = 1, 3  # ecpm_status


def argument_checks(lib, rep: Report):
    """The C ABI's host-side refusals: each returns its status before any CUDA call (and an empty
    problem returns ECPM_OK without one), so this runs without a GPU. Only where no GPU is visible:
    a refusal that went missing would launch on these fake pointers (here it fails as ECPM_ERR_CUDA,
    which the check reports)."""
    fake = ctypes.c_void_p(0x1000)  # never dereferenced on the host
    null = ctypes.c_void_p(0)
    cfg = sparse_config(window_size=128, topk=3, dense_len=200)
    c, bad = Config.of(cfg), Config.of(cfg)
    bad.semantics = 3
    d = Dims(4, 517, 8, 2, 16)
    c_ = ctypes.byref(c)
    need = lib.ecpm_infllmv2_workspace_size(d, c_)
    need1 = lib.ecpm_infllmv2_stage1_workspace_size(d, c_)
    f = fake
    cases = [  # (call, expected status)
        ("ternary_gemv x = NULL", lib.ecpm_ternary_gemv(F32, null, f, f, f, 1, 8, 64, 32, null), ARG),
        ("ternary_gemv K % group_size != 0", lib.ecpm_ternary_gemv(F16, f, f, f, f, 1, 8, 64, 48, null), ARG),
        ("ternary_gemv group_size 0", lib.ecpm_ternary_gemv(F16, f, f, f, f, 1, 8, 64, 0, null), ARG),
        ("ternary_gemv N = 0", lib.ecpm_ternary_gemv(F16, f, f, f, f, 1, 0, 64, 32, null), ARG),
        ("ternary_gemv M = 0 (nothing to do)", lib.ecpm_ternary_gemv(F16, f, f, f, f, 0, 8, 64, 32, null), 0),
        ("ternary_gemm y = NULL", lib.ecpm_ternary_gemm(F32, f, f, f, null, 9, 8, 64, 32, null), ARG),
        ("ternary_gemm M over 65535 row tiles", lib.ecpm_ternary_gemm(F16, f, f, f, f, 65536 * 64, 8, 64, 32, null),
         ARG),
        ("ternary_matmul scales = NULL", lib.ecpm_ternary_matmul(F16, f, f, null, f, 1, 8, 64, 32, null), ARG),
        ("forward: bad config", lib.ecpm_infllmv2_forward(F16, f, f, f, f, f, f, f, f, d, ctypes.byref(bad), f, f, f,
                                                          need, null), ARG),
        ("forward: D % 8 != 0", lib.ecpm_infllmv2_forward(F16, f, f, f, f, f, f, f, f, Dims(4, 517, 8, 2, 12), c_, f,
                                                          f, f, need, null), ARG),
        ("forward: Hq % Hkv != 0", lib.ecpm_infllmv2_forward(F16, f, f, f, f, f, f, f, f, Dims(4, 517, 9, 2, 16), c_,
                                                             f, f, f, need, null), ARG),
        ("forward: T = 0 (nothing to do)", lib.ecpm_infllmv2_forward(F16, f, f, f, f, f, f, f, f,
                                                                     Dims(0, 517, 8, 2, 16), c_, f, f, f, 0, null), 0),
        ("forward: workspace 1 byte short", lib.ecpm_infllmv2_forward(F16, f, f, f, f, f, f, f, f, d, c_, f, f, f,
                                                                      need - 1, null), WORKSPACE),
        ("stage1: workspace 1 byte short", lib.ecpm_infllmv2_stage1(F16, f, f, f, f, f, f, f, d, c_, f, f, need1 - 1,
                                                                    null), WORKSPACE),
        ("select: list without count", lib.ecpm_infllmv2_select(f, f, d, c_, f, f, null, null), ARG),
        ("attend_decode: list = NULL", lib.ecpm_infllmv2_attend_decode(F16, f, f, f, f, f, f, null, f, f, d, c_, f, f,
                                                                        1 << 20, null), ARG),
        ("attend_decode: positions = NULL", lib.ecpm_infllmv2_attend_decode(F16, f, f, f, f, f, f, f, f, null, d, c_,
                                                                             f, f, 1 << 20, null), ARG),
        ("attend_prefill: blocks = NULL", lib.ecpm_infllmv2_attend_prefill(F16, f, f, f, f, f, f, null, f, d, c_, f,
                                                                            null), ARG),
        ("attend_prefill: positions = NULL", lib.ecpm_infllmv2_attend_prefill(F16, f, f, f, f, f, f, f, null, d, c_,
                                                                               f, null), ARG),
        ("convert_index: 2-byte source", lib.ecpm_convert_index(f, 2, f, 10, null), ARG),
        ("convert_index: n < 0", lib.ecpm_convert_index(f, 8, f, -1, null), ARG),
        ("convert_mask: 8-byte source", lib.ecpm_convert_mask(f, 8, f, 10, null), ARG),
        ("gather_rows: base = NULL", lib.ecpm_gather_rows(null, 2, 64, 64, 0, f, 3, null), ARG),
        ("gather_rows: row_bytes 0", lib.ecpm_gather_rows(f, 2, 64, 0, 0, f, 3, null), ARG),
    ]
    for case, got, want in cases:
        rep.check("C ABI argument check", case, "-", got, want, what="status", ok=got == want,
                  note="" if got == want else lib.ecpm_status_string(got).decode(), scope="host")


def e2e_module():
    """plugins/tests/gpu_e2e.py (the e2e rows), loaded by path next to this script."""
    spec = importlib.util.spec_from_file_location("gpu_e2e", Path(__file__).resolve().parent / "gpu_e2e.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def ternary_plan(dry_run: bool) -> list[tuple[tuple, str]]:
    """((M, N, K, group_size), dtype) of every ternary correctness case."""
    cases = [(c, dtype) for c in (TERNARY_CASES[:3] if dry_run else TERNARY_CASES) for dtype in ("fp32", "fp16")]
    if dry_run:  # a shape with a partial last word and groups that split words (K = 1000, gs = 200)
        cases.append((TERNARY_CASES[4], "fp32"))
    return cases


TERNARY_TIMED = ((16384, 4096, 4096), (4096, 16384, 128), (4096, 4096, 128))  # MiniCPM4-8B's projections


def plan(dry_run: bool, timings: bool) -> list[tuple[str, str]]:
    """(case, shape) of everything the run executes, in order."""
    rows = [(f"infllmv2 {c.name} {dtype}", case_shape(c)) for c in attn_cases(dry_run) for dtype in ("fp32", "fp16")]
    rows += [(f"ternary gemv+gemm {dtype}", f"M={M} N={N} K={K} gs={gs}") for (M, N, K, gs), dtype in
             ternary_plan(dry_run)]
    rows += [(f"plugin helper {kernel}", case) for kernel, case in HELPER_CASES]
    rows += e2e_module().plan(dry_run)
    if timings and not dry_run:
        rows.append(("timing cudaMemcpy D2D", "1 GiB"))
        for N, K, gs in TERNARY_TIMED:
            rows += [("timing ternary gemv vs fp16", f"M=1 N={N} K={K} gs={gs}"),
                     ("timing ternary gemm vs fp16", f"M=512 N={N} K={K} gs={gs}")]
        timed = shipped_cases([S - 1 for S in SHIPPED_P])  # time_attention: S = P + 1 keys
        rows += [("timing infllmv2 decode vs dense (same kernel, SDPA)", case_shape(c)) for c in timed]
        rows.append(("timing infllmv2 stages (compress, stage1, select, attend)", case_shape(timed[-1])))
    return rows


class Stages:
    """Prints and records the seconds of each stage of the run."""

    def __init__(self, facts: dict):
        self.t, self.facts = time.time(), facts.setdefault("stage_seconds", {})

    def done(self, name: str) -> None:
        now = time.time()
        self.facts[name] = round(now - self.t, 1)
        print(f"== {name}: {self.facts[name]} s", flush=True)
        self.t = now


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.plan:
        rows = plan(args.dry_run, not args.no_timings)
        for case, shape in rows:
            print(f"{case}: {shape}")
        print(f"{len(rows)} cases ({'dry run, CPU' if args.dry_run else 'GPU run'})")
        return 0
    t0 = time.time()
    import torch

    ref = load_reference()
    rep = Report()
    lib_path = args.lib or (DEFAULT_LIB if not args.dry_run else None)
    lib = None
    if lib_path is not None:
        if not Path(lib_path).exists():
            print(f"gpu_check: {lib_path} not found; build it with plugins/tests/gpu_check.sh", file=sys.stderr)
            return 2
        lib = load_lib(Path(lib_path))
        os.environ.setdefault("EDGECPM_KERNELS_LIB", str(Path(lib_path).resolve()))  # the e2e rows' torch backend
        host_checks(lib, rep)
        if not torch.cuda.is_available():
            argument_checks(lib, rep)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: torch sees no CUDA device: no kernel can be checked here (--dry-run checks the references, "
              "host side and harness on the CPU, no kernel)", file=sys.stderr)
        return 2
    dev = Device(torch, lib, args.dry_run)
    rep.facts = {"dry_run": args.dry_run, "torch": torch.__version__, "python": platform.python_version(),
                 "command": " ".join(["python3 plugins/tests/gpu_check.py", *(sys.argv[1:] if argv is None else argv)])}
    if not args.dry_run:
        props = torch.cuda.get_device_properties(0)
        rep.facts.update(device=props.name, compute_capability=f"{props.major}.{props.minor}",
                         sms=props.multi_processor_count, cuda=torch.version.cuda)
    stages = Stages(rep.facts)

    for i, case in enumerate(attn_cases(args.dry_run)):
        for dtype in ("fp32", "fp16"):
            run_attn_case(torch, ref, dev, rep, case, dtype, args.seed + i)
    stages.done("infllmv2 correctness")
    for i, ((M, N, K, gs), dtype) in enumerate(ternary_plan(args.dry_run)):
        run_ternary_case(torch, dev, rep, M, N, K, gs, dtype, args.seed + 100 + i // 2)
    stages.done("ternary correctness")
    run_helper_cases(torch, dev, rep, args.seed + 200)
    stages.done("plugin helpers")
    e2e = e2e_module()
    sdk = e2e.import_sdk()
    e2e.run_tokens(torch, sdk, rep, args.dry_run, args.seed)
    stages.done("e2e tokens")

    if not args.dry_run and not args.no_timings:
        copy = copy_bandwidth(torch)
        rep.facts["copy_bandwidth_GBps"] = copy
        rep.rows.append(("cudaMemcpy D2D", "1 GiB", "-", f"{copy:.0f} GB/s", "read + write", "", "timing (GPU)"))
        time_ternary(torch, dev, rep, copy)
        time_attention(torch, dev, rep)
        stages.done("kernel timings")
        e2e.run_timings(torch, sdk, rep, copy)
        stages.done("e2e timings")

    rep.facts["seconds"] = round(time.time() - t0, 1)
    rep.facts["kernels_checked"] = rep.kernels_checked  # false in a dry run: no kernel ran
    summary = rep.summary(args.dry_run, rep.facts["seconds"])
    print(rep.table())
    print(f"\n{summary}")
    out = args.out or (args.out_dir / "gpu_check.json" if args.out_dir else None) or \
        (None if args.dry_run else DEFAULT_OUT)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        counts = {scope: {"passed": p, "checks": n} for scope, (p, n) in rep.counts().items()}
        result = {"facts": rep.facts, "kernels_checked": rep.kernels_checked, "summary": summary, "scopes": SCOPES,
                  "counts": counts}
        if rep.kernels_checked:
            result["passed"] = rep.passed
        else:  # no "passed" a reader could take for the kernels'
            result["reference_host_harness_passed"] = rep.passed
        result.update(correctness=rep.correctness, timings=rep.timings, table=rep.table())
        out.write_text(json.dumps(result, indent=1, default=float))
        out.with_suffix(".md").write_text(f"{rep.table()}\n\n{summary}\n")
        print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0 if rep.passed else 1


if __name__ == "__main__":
    sys.exit(main())
