"""int8 / int4 weight-only linears (DESIGN.md §14, export): `edgecpm export --quantize int8|int4`.

Every decoder linear W [N outputs, K inputs] is stored as integer codes q, one scale s and one zero
point z per group of `group_size` inputs along a row: W[n, k] = s[n, g] · (q[n, k] − z[n, g]),
g = k // group_size. The layout is onnxruntime's MatMulNBits' own (com.microsoft, bits 4 or 8), so
loading a bundle on onnxruntime rewrites no weight byte (runtimes/quant_lowering.py):

- codes  uint8 [N, K / block, block · bits / 8]: for 4 bits two codes a byte, the even input in the
         low nibble; for 8 bits one code a byte.
- scales [N, K / block] in the bundle dtype.
- zeros  uint8 [N, ceil(K / block · bits / 8)]: packed like the codes, each row padded to a byte.

`block` (MatMulNBits' block_size) is the largest of 128, 64, 32, 16 that divides the group: a group
wider than a block repeats its scale and zero in each of its blocks, which is exact.

Where the codes come from (`source` in the manifest):
- "rtn": round to nearest, asymmetric. s = (max(W_g, 0) − min(W_g, 0)) / (2^bits − 1), z = round(−min / s),
  q = clamp(round(W / s) + z, 0, 2^bits − 1). Asymmetric because at 4 bits a symmetric grid wastes
  one of its 16 levels and, on a skewed group, up to half the range; the zero point costs 4 (8) bits
  per group (0.03 bits per weight at group 128), and MatMulNBits takes it at no speed cost. int4
  groups are 128 inputs by default, int8 one group per row (group_size -1).
- "gptq" / "awq": a 4-bit checkpoint (export/quantized.py) exported with --quantize int4 keeps its
  exact codes, scales and zeros (no re-quantization). GPTQ act-order (a g_idx that permutes the
  inputs) is kept exactly too: the inputs are reordered so that each group is contiguous, and the
  graph gathers the activation columns in that order before the matmul (`perm`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from edgecpm.export import quantized
from edgecpm.export.ternary import linear_names

MODES = {"int8": 8, "int4": 4}
DEFAULT_GROUP = {"int8": -1, "int4": 128}
BLOCKS = (128, 64, 32, 16)  # MatMulNBits block sizes, largest first


@dataclass(frozen=True)
class QuantInfo:
    bits: int
    group_size: int  # inputs sharing one scale and zero (K: one group per row)
    block_size: int  # MatMulNBits block: divides group_size
    shape: tuple[int, int]  # (N, K)
    source: str = "rtn"  # "rtn", "gptq" or "awq"
    permuted: bool = False  # GPTQ act-order: the graph gathers the inputs in group order first

    @property
    def code_bytes(self) -> int:
        n, k = self.shape
        return n * k * self.bits // 8

    def scale_bytes(self, itemsize: int) -> int:
        n, k = self.shape
        return n * (k // self.block_size) * itemsize

    @property
    def zero_bytes(self) -> int:
        n, k = self.shape
        return n * math.ceil(k // self.block_size * self.bits / 8)


@dataclass
class QuantCodes:
    """One linear, in the bundle's layout (module docstring)."""

    codes: np.ndarray  # uint8 [N, K / block, block * bits / 8]
    scales: np.ndarray  # float32 [N, K / block]
    zeros: np.ndarray  # uint8 [N, ceil(K / block * bits / 8)]
    perm: np.ndarray | None = None  # int64 [K]: input j of the stored weight is input perm[j] of x


def block_for(group_size: int) -> int | None:
    return next((b for b in BLOCKS if group_size % b == 0), None)


def check_group_size(mode: str, group_size: int | None) -> int:
    """The group size to use (-1: per row); a bad one refused with the reason."""
    if group_size is None:
        return DEFAULT_GROUP[mode]
    if group_size == -1:
        return -1
    if isinstance(group_size, bool) or not isinstance(group_size, int) or block_for(group_size) is None:
        raise ValueError(f"--group-size {group_size}: expected -1 (one group per row) or a multiple of 16 "
                         f"(onnxruntime's MatMulNBits reads blocks of 16, 32, 64 or 128 inputs), e.g. 32, 64, 128")
    return group_size


# ---- the quantizer and the packing ---------------------------------------------------------------
def rtn(w: np.ndarray, bits: int, group_size: int, scale_dtype=np.float32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Round to nearest, asymmetric: codes uint8 [N, K], zeros uint8 [N, G], scales float32 [N, G]
    (already rounded to scale_dtype, the bundle's, so the codes are nearest for the stored scale)."""
    w = np.asarray(w, dtype=np.float32)
    n, k = w.shape
    qmax = (1 << bits) - 1
    groups = w.reshape(n, k // group_size, group_size)
    lo = np.minimum(groups.min(-1), 0)
    hi = np.maximum(groups.max(-1), 0)
    s = ((hi - lo) / qmax).astype(scale_dtype).astype(np.float32)
    s = np.where(s > 0, s, np.float32(1))  # an all-zero group: any scale, code = zero
    z = np.clip(np.round(-lo / s), 0, qmax)
    q = np.clip(np.round(groups / s[..., None]) + z[..., None], 0, qmax)
    return q.reshape(n, k).astype(np.uint8), z.astype(np.uint8), s.astype(np.float32)


def pack_nibbles(a: np.ndarray) -> np.ndarray:
    """uint8 [..., 2m] of values < 16 -> [..., m]: element 2j in the low nibble of byte j."""
    return (a[..., 0::2] | (a[..., 1::2] << 4)).astype(np.uint8)


def unpack_layout(codes: np.ndarray, zeros: np.ndarray, bits: int, n_blocks: int) -> tuple[np.ndarray, np.ndarray]:
    """layout()'s inverse for the codes and zeros: q uint8 [N, K] (0 .. 2^bits - 1), z uint8 [N, n_blocks]."""
    n = codes.shape[0]
    if bits == 4:
        q = np.stack([codes & 15, codes >> 4], -1).reshape(n, -1)
        z = np.stack([zeros & 15, zeros >> 4], -1).reshape(n, -1)[:, :n_blocks]
    else:
        q, z = codes.reshape(n, -1), zeros.reshape(n, -1)[:, :n_blocks]
    return q, z


def layout(codes: np.ndarray, zeros: np.ndarray, scales: np.ndarray, bits: int, group_size: int,
           perm: np.ndarray | None = None) -> QuantCodes:
    """codes [N, K], zeros / scales [N, K / group_size] -> the bundle's MatMulNBits layout."""
    n, k = codes.shape
    block = block_for(group_size)
    rep = group_size // block
    zeros, scales = np.repeat(zeros, rep, axis=1), np.repeat(scales, rep, axis=1)  # one per block
    if bits == 4:
        b = pack_nibbles(codes.reshape(n, k // block, block))
        if zeros.shape[1] % 2:
            zeros = np.concatenate([zeros, np.zeros((n, 1), np.uint8)], axis=1)
        zeros = pack_nibbles(zeros)
    else:
        b = codes.reshape(n, k // block, block)
    return QuantCodes(np.ascontiguousarray(b, np.uint8), np.ascontiguousarray(scales, np.float32),
                      np.ascontiguousarray(zeros, np.uint8), perm)


def dequantize(c: QuantCodes, bits: int, k: int) -> np.ndarray:
    """float32 [N, K] in x's input order: the weight the bundle's QuantMatMul multiplies by."""
    n, nb = c.scales.shape
    q, z = unpack_layout(c.codes, c.zeros, bits, nb)
    w = ((q.reshape(n, nb, -1).astype(np.float32) - z[..., None]) * c.scales[..., None]).reshape(n, k)
    if c.perm is not None:
        out = np.empty_like(w)
        out[:, c.perm] = w
        w = out
    return w


# ---- which linears, and how ------------------------------------------------------------------------
class QuantPlan:
    """The quantized linears of an export, by name (`infos`), and their codes (`codes(name)`)."""

    def __init__(self, ckpt, mode: str, group_size: int | None, scale_dtype=np.float32):
        if mode not in MODES:
            raise ValueError(f"quantize={mode!r}: expected one of {', '.join(MODES)}")
        self.ckpt, self.mode, self.bits = ckpt, mode, MODES[mode]
        self.group_size = check_group_size(mode, group_size)
        self.scale_dtype = scale_dtype
        self.infos: dict[str, QuantInfo] = {}
        self._gptq: dict[str, tuple[quantized.Unpacked, np.ndarray | None]] = {}
        shapes = ckpt.expected_shapes()
        keep = self.bits == 4 and ckpt.quant is not None
        for name in linear_names(ckpt.config.num_hidden_layers):
            n, k = shapes[name]
            if keep and name in ckpt.quantized_weights:
                self.infos[name] = self._exact(name, n, k)
                continue
            g = k if self.group_size == -1 else self.group_size
            if k % g:
                raise ValueError(f"{name}: --group-size {g} does not divide its {k} inputs; choose a group size "
                                 f"that divides every linear's inputs, or -1 (one group per row)")
            if block_for(g) is None:
                raise ValueError(f"{name}: one group per row is {k} inputs, not a multiple of 16 (onnxruntime's "
                                 f"MatMulNBits blocks); choose --group-size 16, 32, 64 or 128")
            self.infos[name] = QuantInfo(self.bits, g, block_for(g), (n, k))

    def _exact(self, name: str, n: int, k: int) -> QuantInfo:
        """A GPTQ / AWQ linear kept as stored, when its group layout fits MatMulNBits."""
        cfg = self.ckpt.quant
        u = quantized.unpack(cfg, self._stored(name), name.removesuffix(".weight"), (n, k))
        g = k if cfg.group_size == -1 else cfg.group_size
        perm = None
        plain = np.arange(k) // g
        if not np.array_equal(u.group, plain):
            perm = np.argsort(u.group, kind="stable")
            if not np.array_equal(u.group[perm], plain):
                raise ValueError(f"{name}: its g_idx gives groups of unequal sizes (not {g} inputs each), which "
                                 f"a reordering of the inputs cannot make contiguous; export with --quantize none "
                                 f"(dequantized) or --quantize int8")
        block = block_for(g)
        if k % g or block is None:
            raise ValueError(f"{name}: group size {g} with {k} inputs does not fit MatMulNBits (groups must divide "
                             f"the inputs and be a multiple of 16); export with --quantize none (dequantized) or "
                             f"--quantize int8")
        if u.zeros.max(initial=0) > 15:
            raise ValueError(f"{name}: a zero point of {int(u.zeros.max())} (a GPTQ v1 zero of 15 stored as -1) does "
                             f"not fit 4 bits; export with --quantize none (dequantized) or --quantize int8")
        self._gptq[name] = (u, perm)
        return QuantInfo(4, g, block, (n, k), cfg.method, perm is not None)

    def _stored(self, name: str) -> dict[str, np.ndarray]:
        base = name.removesuffix(".weight")
        out = {}
        for suffix in quantized.REQUIRED + quantized.OPTIONAL[self.ckpt.quant.method]:
            if f"{base}.{suffix}" in self.ckpt.files:
                t = self.ckpt._stored(f"{base}.{suffix}")
                out[suffix] = t.float().numpy() if t.is_floating_point() else t.numpy()
        return out

    def codes(self, name: str, tensor: Callable[[str], np.ndarray]) -> QuantCodes:
        info = self.infos[name]
        if name in self._gptq:
            u, perm = self._gptq.pop(name)
            codes, zeros = u.codes.T, u.zeros.T.astype(np.uint8)  # [N, K], [N, G]
            scales = u.scales.T.astype(self.scale_dtype).astype(np.float32)  # fp16 scales: exact either way
            if perm is not None:
                codes = codes[:, perm]
            return layout(np.ascontiguousarray(codes), zeros, scales, 4, info.group_size, perm)
        q, z, s = rtn(tensor(name), info.bits, info.group_size, self.scale_dtype)
        return layout(q, z, s, info.bits, info.group_size)


def summary(infos: dict[str, QuantInfo], scale_itemsize: int) -> dict:
    """The manifest's "quantization" section (scales of `scale_itemsize` bytes: the bundle's dtype)."""
    weights = sum(i.shape[0] * i.shape[1] for i in infos.values())
    code = sum(i.code_bytes for i in infos.values())
    scale = sum(i.scale_bytes(scale_itemsize) for i in infos.values())
    zero = sum(i.zero_bytes for i in infos.values())
    return {
        "op": "QuantMatMul",
        "bits": sorted({i.bits for i in infos.values()}),
        "group_sizes": sorted({i.group_size for i in infos.values()}),
        "block_sizes": sorted({i.block_size for i in infos.values()}),
        "sym": False,
        "sources": sorted({i.source for i in infos.values()}),
        "act_order": sum(i.permuted for i in infos.values()),
        "activations": "fp32",
        "count": len(infos), "weights": weights,
        "code_bytes": code, "scale_bytes": scale, "zero_bytes": zero,
        "bits_per_weight": 8 * (code + scale + zero) / weights if weights else None,
        "tensors": {name: {"bits": i.bits, "group_size": i.group_size, "block_size": i.block_size,
                           "shape": list(i.shape), "source": i.source, "act_order": i.permuted}
                    for name, i in infos.items()},
    }


# ---- the embedding / LM head (--lm-head) -----------------------------------------------------------
HEAD_MODES = ("dense", "int8", "int4")
HEAD_GROUP = 128  # inputs per scale: finer than one per row for the same cost as the body's int4 groups
_PROBES = 256  # embedding rows used as hidden states to measure the head's logit error at export
_CHUNK = 8192  # rows quantized at a time: an 8B head is 300M weights


def head_mode(lm_head: str | None, quantized_body: bool) -> str:
    """--lm-head: int8 where the linears are quantized (int8, int4, ternary) — the tied 73448 x H
    matrix is then most of the bytes a token reads — else dense (the bundle's dtype)."""
    if lm_head is None:
        return "int8" if quantized_body else "dense"
    if lm_head not in HEAD_MODES:
        raise ValueError(f"--lm-head {lm_head}: expected one of {', '.join(HEAD_MODES)}")
    return lm_head


class HeadQuant:
    """The embedding and LM head stored as int8 / int4 codes in the QuantMatMul layout: the head is a
    QuantMatMul, the embedding a gather of dequantized rows, and a tied matrix is stored once.
    `quantize` records each matrix's error for the manifest (`summary`)."""

    def __init__(self, mode: str, hidden: int, scale_dtype=np.float32):
        self.mode, self.bits = mode, MODES[mode]
        self.group_size = HEAD_GROUP if hidden % HEAD_GROUP == 0 else hidden
        self.block_size = block_for(self.group_size)
        if self.block_size is None:
            raise ValueError(f"--lm-head {mode}: hidden size {hidden} is not a multiple of 16 (onnxruntime's "
                             f"MatMulNBits blocks); use --lm-head dense")
        self.scale_dtype = scale_dtype
        self.tensors: dict[str, dict] = {}

    def quantize(self, name: str, w: np.ndarray) -> QuantCodes:
        parts = [layout(*rtn(w[i:i + _CHUNK], self.bits, self.group_size, self.scale_dtype), self.bits,
                        self.group_size) for i in range(0, len(w), _CHUNK)]
        c = QuantCodes(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("codes", "scales", "zeros")))
        self.tensors[name] = {"shape": list(w.shape), **self._errors(w, dequantize(c, self.bits, w.shape[1]))}
        return c

    @staticmethod
    def _errors(w: np.ndarray, wq: np.ndarray) -> dict:
        """Relative error of the weights, and of the logits of _PROBES rows of w used as hidden states
        (a tied head's hidden states live in the embedding's space), with their top-1 agreement."""
        probes = w[np.random.default_rng(0).choice(len(w), min(_PROBES, len(w)), replace=False)]
        ref, got = probes @ w.T, probes @ wq.T
        return {"probes": len(probes), "weight_rel_error": float(np.linalg.norm(wq - w) / np.linalg.norm(w)),
                "probe_logit_rel_error": float(np.linalg.norm(got - ref) / np.linalg.norm(ref)),
                "probe_top1_agreement": float(np.mean(got.argmax(1) == ref.argmax(1)))}

    def summary(self, scale_itemsize: int) -> dict:
        info = [QuantInfo(self.bits, self.group_size, self.block_size, tuple(t["shape"]))
                for t in self.tensors.values()]
        weights = sum(i.shape[0] * i.shape[1] for i in info)
        stored = sum(i.code_bytes + i.scale_bytes(scale_itemsize) + i.zero_bytes for i in info)
        return {"mode": self.mode, "bits": self.bits, "group_size": self.group_size, "block_size": self.block_size,
                "bits_per_weight": 8 * stored / weights, "tensors": self.tensors}
