"""BitCPM4 ternary weights (DESIGN.md §8), the export side: exact detection, the lossy quantizer,
which linears of a checkpoint to pack, and the torch op `edgecpm::ternary_matmul`. The packed 2-bit
format itself (codes, scales, pack/unpack/dequantize, the MatMulNBits view) lives on the device
side, in edgecpm.ternary_format, with its worked example; its names are re-exported here.

Detection, on the format's worked example (N = 2 rows, K = 20 inputs, one scale per row):

>>> W = np.array([[.5, -.5, 0, .5,  0, 0, -.5, .5,  .5, 0, 0, 0,  -.5, 0, 0, .5,  -.5, .5, 0, 0],
...               [0, .25, -.25, 0,  0, 0, 0, 0,  .25, .25, .25, .25,  0, -.25, 0, 0,  0, 0, 0, -.25]],
...              np.float32)
>>> detect(W)
TernaryInfo(granularity='row', group_size=20, shape=(2, 20), lossy=False)
>>> [[hex(word) for word in row] for row in pack(encode(W, detect(W).group_size)[0])]
[['0x94568592', '0x55555558'], ['0x51aa5549', '0x55555515']]
>>> detect(W + np.eye(2, 20, dtype=np.float32)) is None  # row 0 now holds 0.5 and 1.5
True

Detection (`detect`) is exact: a tensor is ternary when, within each group, every nonzero |w| is
the same value. It tries, in order, one scale for the whole tensor, then the coarsest group size
that fits among: powers of two from MIN_GROUP up that divide K, then K itself (one scale per
row). Each candidate divides the next, so a group size that fails rules out every coarser one.
The coarsest consistent group is the smallest exact encoding. A group of all zeros fits any
scale. Groups finer than MIN_GROUP are not considered: there every tensor starts to look
ternary (g = 1 always fits), and the scales would cost more than the codes.

A checkpoint is ternary when more than half of its quantized linears (QUANTIZED) are; then every
one must be, and export refuses the first that is not, saying where and why (`plan`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from edgecpm.errors import CheckpointError
from edgecpm.ternary_format import CODES_PER_WORD, encode, pack  # noqa: F401  (pack: for checkpoint.py, onnx_graph.py)

MIN_GROUP = 32
# The linear weights BitCPM4 quantizes, per decoder layer (embedding, norms, lm_head stay dense).
QUANTIZED = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@dataclass(frozen=True)
class TernaryInfo:
    granularity: str  # "tensor", "row" or "group"
    group_size: int  # inputs sharing one scale (K for "tensor" and "row")
    shape: tuple[int, int]  # (N, K)
    lossy: bool = False  # produced by quantize() (--quantize ternary), not found in the checkpoint

    @property
    def packed_bytes(self) -> int:
        n, k = self.shape
        return n * math.ceil(k / CODES_PER_WORD) * 4

    def scale_bytes(self, itemsize: int) -> int:
        n, k = self.shape
        return n * (k // self.group_size) * itemsize


def linear_names(num_layers: int) -> list[str]:
    return [f"model.layers.{i}.{m}.weight" for i in range(num_layers) for m in QUANTIZED]


def _group_sizes(k: int) -> list[int]:
    """Candidate group sizes, finest first; each divides the next."""
    sizes = []
    g = MIN_GROUP
    while g < k and k % g == 0:
        sizes.append(g)
        g *= 2
    return sizes + [k]


def _bad_groups(a: np.ndarray, g: int) -> np.ndarray:
    """bool [N, K // g]: groups of |w| holding more than one nonzero magnitude."""
    groups = a.reshape(a.shape[0], -1, g)
    return ~np.all((groups == 0) | (groups == groups.max(-1, keepdims=True)), axis=-1)


def detect(w: np.ndarray) -> TernaryInfo | None:
    """How w [N, K] (float32 holding the checkpoint's exact values) is ternary, or None."""
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2:
        return None
    a = np.abs(w)
    n, k = a.shape
    # An ordinary weight already fails in its first row at the finest group size: cheap rejection.
    if _bad_groups(a[:1], _group_sizes(k)[0]).any() or not np.isfinite(a).all():
        return None
    if np.all((a == 0) | (a == a.max())):
        return TernaryInfo("tensor", k, (n, k))
    best = None
    for g in _group_sizes(k):
        if _bad_groups(a, g).any():
            break
        best = g
    if best is None:
        return None
    return TernaryInfo("row" if best == k else "group", best, (n, k))


def explain(w: np.ndarray) -> str:
    """Why w is not ternary, naming the first offending place (or how it is ternary)."""
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2:
        return f"not a matrix (shape {list(w.shape)})"
    bad = np.argwhere(~np.isfinite(w))
    if len(bad):
        r, c = bad[0]
        return f"row {r}, input {c} is {w[r, c]}"
    info = detect(w)
    if info is not None:
        return f"ternary, {describe(info)}"
    a = np.abs(w)
    g = _group_sizes(a.shape[1])[0]
    r, j = np.argwhere(_bad_groups(a, g))[0]
    group = a[r, j * g : (j + 1) * g]
    mags = np.unique(group[group > 0])
    where = f"row {r}" if g == a.shape[1] else f"row {r}, inputs {j * g}..{(j + 1) * g - 1},"
    shown = ", ".join(f"{m:.7g}" for m in mags[:3]) + (", ..." if len(mags) > 3 else "")
    return (f"{where} has {len(mags)} distinct nonzero magnitudes ({shown}); a ternary weight has one "
            f"per group (groups of {g} inputs or coarser)")


def describe(info: TernaryInfo) -> str:
    return {"tensor": "one scale per tensor", "row": "one scale per output row"}.get(
        info.granularity, f"one scale per {info.group_size} inputs")


def quantize(w: np.ndarray, group_size: int | None = None) -> np.ndarray:
    """The lossy BitCPM quantizer: s = mean(|W|) per group, W = clamp(round(W / s), -1, 1) * s.
    group_size None: one scale for the whole tensor (BitNet b1.58); K: one per row. It only
    preserves a model trained for it (QAT); applied to an ordinary checkpoint it ruins it."""
    w = np.asarray(w, dtype=np.float32)
    if group_size is not None and w.shape[1] % group_size:
        raise ValueError(f"group_size={group_size} does not divide the input dimension {w.shape[1]}")
    groups = w.reshape(1, -1) if group_size is None else w.reshape(-1, group_size)
    s = np.abs(groups).mean(-1, keepdims=True)
    q = np.clip(np.round(groups / np.where(s > 0, s, 1)), -1, 1) * s
    return q.reshape(w.shape).astype(np.float32)


# ---- which linears of a checkpoint to pack -------------------------------------------------------
def plan(names: list[str], tensor: Callable[[str], np.ndarray], quantize_mode: str | None = None,
         group_size: int | None = None) -> dict[str, TernaryInfo]:
    """The linear weights to pack, by name. quantize_mode None: the checkpoint is ternary when more
    than half of them are exactly ternary, and then all must be (CheckpointError naming the first
    that is not, and why); "ternary": every linear, the non-ternary ones through the lossy
    quantizer with `group_size` (None: per row); "none": nothing."""
    if quantize_mode not in (None, "ternary", "none"):
        raise ValueError(f"quantize={quantize_mode!r}: expected 'ternary' or 'none'")
    if quantize_mode == "none":
        return {}
    found = {}
    for name in names:
        w = tensor(name)
        found[name] = detect(w)
        if found[name] is None and quantize_mode == "ternary":
            n, k = w.shape
            g = group_size or k
            if k % g:
                raise ValueError(f"{name}: group_size={g} does not divide its {k} inputs")
            found[name] = TernaryInfo("row" if g == k else "group", g, (n, k), lossy=True)
    if quantize_mode == "ternary":
        return found
    ternary = {name: info for name, info in found.items() if info is not None}
    if len(ternary) * 2 <= len(names):
        return {}
    for name in names:
        if found[name] is None:
            raise CheckpointError(
                f"{name}: not ternary ({explain(tensor(name))}), but {len(ternary)} of the {len(names)} linear "
                f"weights are; fix the checkpoint, or export with --quantize ternary (ternarizes it, lossy) or "
                f"--quantize none (keeps every linear at full precision)")
    return ternary


def report(names: list[str], tensor: Callable[[str], np.ndarray]) -> dict:
    """What detection finds in a checkpoint's linear weights (`edgecpm inspect`): whether export
    would pack them, how, and the first weight that is not ternary with the reason."""
    found = {name: detect(tensor(name)) for name in names}
    infos = {name: info for name, info in found.items() if info is not None}
    out = {"ternary": len(infos) * 2 > len(names), "linears": len(names),
           **{k: v for k, v in summary(infos, 4).items() if k != "tensors"}}  # as an fp32 export stores it
    bad = next((name for name in names if found[name] is None), None)
    if bad is not None:
        out["reason"] = f"{bad}: {explain(tensor(bad))}"
    return out


def ternary_codes(w: np.ndarray, info: TernaryInfo) -> tuple[np.ndarray, np.ndarray]:
    """codes uint8 [N, K] and float32 scales [N, K // g] of a planned tensor."""
    return encode(quantize(w, info.group_size) if info.lossy else w, info.group_size)


def summary(infos: dict[str, TernaryInfo], scale_itemsize: int) -> dict:
    """The manifest's "ternary" section: per tensor granularity and stored bytes, and the totals
    (scales of `scale_itemsize` bytes: the bundle's dtype)."""
    tensors = {name: {"granularity": i.granularity, "group_size": i.group_size, "shape": list(i.shape),
                      "lossy": i.lossy, "packed_bytes": i.packed_bytes, "scale_bytes": i.scale_bytes(scale_itemsize)}
               for name, i in infos.items()}
    weights = sum(i.shape[0] * i.shape[1] for i in infos.values())
    stored = sum(t["packed_bytes"] + t["scale_bytes"] for t in tensors.values())
    return {"tensors": tensors, "count": len(infos), "weights": weights,
            "granularities": sorted({i.granularity for i in infos.values()}),
            "scales": sorted({describe(i) for i in infos.values()}), "lossy": sum(i.lossy for i in infos.values()),
            "group_sizes": sorted({i.group_size for i in infos.values()}),
            "packed_bytes": sum(t["packed_bytes"] for t in tensors.values()),
            "scale_bytes": sum(t["scale_bytes"] for t in tensors.values()),
            "bits_per_weight": 8 * stored / weights if weights else None}


# ---- the torch op -----------------------------------------------------------------------------
ROW_BLOCK_BYTES = 1 << 20  # unpack this much fp32 weight at a time: it stays in cache for the matmul


@functools.cache
def _torch_op():
    """Registers `edgecpm::ternary_matmul` on first use, so importing this module needs no torch."""
    import torch

    shifts = torch.arange(CODES_PER_WORD, dtype=torch.int32) * 2

    # An explicit schema: this module's annotations are strings naming a torch it does not import.
    @torch.library.custom_op("edgecpm::ternary_matmul", mutates_args=(),
                             schema="(Tensor x, Tensor packed, Tensor scales, int in_features, int group_size) "
                                    "-> Tensor")
    def ternary_matmul(x, packed, scales, in_features, group_size):
        """x [M, K] @ W^T with W from packed (int32 holding the uint32 words) and scales [N, K // g];
        fp32 accumulation, output in x's dtype. Unpacks a block of rows at a time, so the full
        fp32 weight never exists."""
        n, k, g = packed.shape[0], in_features, group_size
        xf = x.float()
        out = torch.empty(x.shape[0], n, dtype=torch.float32, device=x.device)
        rows = max(1, ROW_BLOCK_BYTES // (4 * k))
        for n0 in range(0, n, rows):
            block = packed[n0 : n0 + rows]
            # Arithmetic shift of int32 fills the top with sign bits; the mask keeps two bits.
            codes = ((block.unsqueeze(-1) >> shifts.to(block.device)) & 3).flatten(1)[:, :k]
            w = (codes.float() - 1).view(len(block), k // g, g) * scales[n0 : n0 + rows].float().unsqueeze(-1)
            out[:, n0 : n0 + rows] = xf @ w.view(len(block), k).T
        return out.to(x.dtype)

    @ternary_matmul.register_fake
    def _(x, packed, scales, in_features, group_size):
        return x.new_empty((x.shape[0], packed.shape[0]))

    return torch.ops.edgecpm.ternary_matmul


def ternary_matmul(x, packed, scales, in_features: int, group_size: int):
    """torch: y [M, N] = x [M, K] @ W^T of a packed ternary weight (see the module docstring)."""
    return _torch_op()(x, packed, scales, in_features, group_size)
