"""4-bit GPTQ and AWQ checkpoints as they are published (DESIGN.md §14, import), in numpy: which
format a checkpoint declares, the tensors each quantized linear stores, and exact unpacking to the
integer codes and to float32 weights. Nothing here is lossy: W is rebuilt exactly as the format
defines it (fp16 scale × a difference of two 4-bit integers is exact in float32).

A quantized linear `X` (weight [N outputs, K inputs]) is stored as `X.qweight`, `X.qzeros`,
`X.scales` (+ `X.g_idx` for GPTQ, + `X.bias` when the quantizer kept one) instead of `X.weight`.
Codes are 4 bits, 8 to an int32 word, lowest bits first; G = the number of groups (1 for
group_size -1, "per channel", else ceil(K / group_size)).

GPTQ (`quant_method "gptq"`; `checkpoint_format` "gptq" = v1, the default, or "gptq_v2"):
    qweight int32 [K/8, N]   packed along the INPUT: input i is in bits 4·(i%8) of word [i//8, o]
    qzeros  int32 [G, N/8]   packed along the OUTPUT: output o in bits 4·(o%8) of word [g, o//8];
                             v1 stores zero−1 (the v1 kernels add 1 back after unpacking, so a
                             nibble n means zero n+1), v2 stores the zero itself
    scales  fp16  [G, N]
    g_idx   int32 [K]        the group of each input row; under act-order (desc_act) a permutation
                             of the plain i // group_size; when absent, i // group_size
    W[o, i] = scales[g_idx[i], o] · (q[i, o] − zero[g_idx[i], o])
  sym=true only means the quantizer chose zero = 8 everywhere; the stored zeros are used as they are.

AWQ (`quant_method "awq"`, `version "gemm"`, zero_point true), AutoAWQ's GEMM layout:
    qweight int32 [K, N/8]   packed along the OUTPUT, interleaved: nibble j (bits 4j..4j+3) of word
                             [i, c] holds output 8c + AWQ_ORDER[j], AWQ_ORDER = 0, 2, 4, 6, 1, 3, 5, 7
                             (AutoAWQ's packer walks each block of 8 outputs in that order, shifting
                             the j-th one it takes by 4j; its GEMM kernels expect the even outputs in
                             the low half of the word and the odd ones in the high half)
    qzeros  int32 [G, N/8]   the same interleaved order; zeros stored as they are
    scales  fp16  [G, N]
    W[o, i] = scales[i // group_size, o] · (q[i, o] − zero[i // group_size, o])

Worked example (GPTQ): K = 16 inputs, N = 8 outputs, group_size 8, v1, symmetric (zero 8 stored as
7 in every nibble). Column o of qweight holds codes 0..15 down the 16 inputs (words 0x76543210 and
0xFEDCBA98); scales give group 0 the scale 0.5 and group 1 the scale 0.25.

>>> qweight = np.array([[0x76543210] * 8, [0xFEDCBA98] * 8], dtype=np.uint32).view(np.int32)
>>> unpack_along_input(qweight)[:, 0].tolist()
[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]
>>> qzeros = np.array([[0x77777777], [0x77777777]], dtype=np.uint32).view(np.int32)
>>> scales = np.array([[0.5] * 8, [0.25] * 8], dtype=np.float16)
>>> cfg = QuantConfig("gptq", 4, 8, sym=True, desc_act=False, checkpoint_format="gptq")
>>> w = dequantize(cfg, {"qweight": qweight, "qzeros": qzeros, "scales": scales}, "x")
>>> w.shape, w.dtype
((8, 16), dtype('float32'))
>>> w[3].tolist()  # inputs 0..7: 0.5·(i − 8); inputs 8..15: 0.25·(i − 8)
[-4.0, -3.5, -3.0, -2.5, -2.0, -1.5, -1.0, -0.5, 0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75]

The AWQ interleave on one word: nibbles 0..7 hold the values 0..7, which land on outputs
0, 2, 4, 6, 1, 3, 5, 7:

>>> unpack_along_output(np.array([[0x76543210]], dtype=np.uint32).view(np.int32), AWQ_ORDER).tolist()
[[0, 4, 1, 5, 2, 6, 3, 7]]
>>> unpack_along_output(np.array([[0x76543210]], dtype=np.uint32).view(np.int32)).tolist()  # GPTQ qzeros
[[0, 1, 2, 3, 4, 5, 6, 7]]
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgecpm.errors import CheckpointError

BITS = 4
PER_WORD = 32 // BITS
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # the output (within a block of 8) that nibble j of an AWQ word holds
SUPPORTED = ("4-bit GPTQ (checkpoint_format gptq or gptq_v2; group size any or -1, sym or asym, act-order) "
             "and 4-bit AWQ (version gemm, zero_point true)")
# Suffixes of the tensors a quantized linear stores; OPTIONAL ones may be absent.
REQUIRED = ("qweight", "qzeros", "scales")
OPTIONAL = {"gptq": ("g_idx", "bias"), "awq": ("bias",)}
# Tensor names of repacked layouts edgecpm does not read, with what they are.
FOREIGN = {"B": "a Marlin-repacked weight", "s": "Marlin scales", "workspace": "a Marlin workspace",
           "q_weight": "an ExLlamaV2 (EXL2) weight", "q_scale": "ExLlamaV2 scales",
           "q_perm": "an ExLlamaV2 permutation", "q_invperm": "an ExLlamaV2 permutation",
           "q_scale_max": "ExLlamaV2 scales", "q_groups": "ExLlamaV2 groups"}


@dataclass(frozen=True)
class QuantConfig:
    method: str  # "gptq" or "awq"
    bits: int
    group_size: int  # inputs per group; -1: one group for all inputs (per channel)
    sym: bool
    desc_act: bool  # GPTQ act-order: g_idx is a permutation of the plain grouping
    checkpoint_format: str  # GPTQ: "gptq" (v1, zeros stored minus one) or "gptq_v2"; AWQ: "gemm"
    source: str = "config.json"

    def groups(self, k: int) -> int:
        return 1 if self.group_size == -1 else math.ceil(k / self.group_size)

    def stored_shapes(self, n: int, k: int) -> dict[str, tuple[int, ...]]:
        """Suffix -> shape of every tensor a quantized [n, k] linear may store (OPTIONAL included)."""
        g = self.groups(k)
        shapes = {"qweight": (k // PER_WORD, n) if self.method == "gptq" else (k, n // PER_WORD),
                  "qzeros": (g, n // PER_WORD), "scales": (g, n)}
        if self.method == "gptq":
            shapes["g_idx"] = (k,)
        shapes["bias"] = (n,)
        return shapes

    def describe(self) -> str:
        gs = "per channel" if self.group_size == -1 else f"group {self.group_size}"
        extra = f", desc_act {str(self.desc_act).lower()}" if self.method == "gptq" else ""
        return (f"{self.method.upper()} {self.bits}-bit, {gs}, {'sym' if self.sym else 'asym'}{extra}, "
                f"format {self.checkpoint_format}")


def _refuse_named(source: str, what: str, tensor: str | None = None) -> CheckpointError:
    where = f" (tensors such as {tensor})" if tensor else ""
    return CheckpointError(f"{source}: {what}{where}; edgecpm imports {SUPPORTED}")


def read_quant_config(folder: str | Path, tensors: Iterable[str] = ()) -> QuantConfig | None:
    """The quantization a checkpoint folder declares (config.json `quantization_config`, else an
    AutoGPTQ-style quantize_config.json), None for a float checkpoint; unsupported ones refused,
    naming the first quantized tensor among `tensors` (the checkpoint's names)."""
    folder = Path(folder)
    config = folder / "config.json"
    qc, source = None, config.name
    try:
        if config.is_file():
            qc = json.loads(config.read_text(encoding="utf-8")).get("quantization_config")
            source = f"{config} quantization_config"
        legacy = folder / "quantize_config.json"
        if qc is None and legacy.is_file():
            qc, source = {"quant_method": "gptq", **json.loads(legacy.read_text(encoding="utf-8"))}, str(legacy)
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return None  # ModelConfig.from_file reports an unreadable config.json
    if qc is None:
        return None
    example = next((n for n in sorted(tensors) if n.endswith(".qweight") or foreign_tensor(n)), None)
    return parse_quant_config(qc, source, example)


def parse_quant_config(qc: Mapping, source: str = "quantization_config", tensor: str | None = None) -> QuantConfig:
    """A `quantization_config` dict as a QuantConfig; unsupported settings raise CheckpointError
    (naming `tensor`, an example of the tensors they concern, when given)."""
    def _refuse(source, what):
        return _refuse_named(source, what, tensor)

    if not isinstance(qc, Mapping):
        raise _refuse(source, f"expected an object, got {qc!r}")
    method = str(qc.get("quant_method", "")).lower()
    if method not in ("gptq", "awq"):
        raise _refuse(source, f"quant_method {qc.get('quant_method')!r} is not supported")
    bits = qc.get("bits", qc.get("w_bit"))
    if bits != BITS:
        raise _refuse(source, f"bits {bits!r} is not supported (only 4-bit codes are unpacked)")
    group_size = qc.get("group_size", qc.get("q_group_size", 128))
    if not isinstance(group_size, int) or isinstance(group_size, bool) or not (group_size == -1 or group_size > 0):
        raise _refuse(source, f"group_size {group_size!r} is not a positive integer or -1")
    if method == "gptq":
        fmt = qc.get("checkpoint_format") or qc.get("format") or "gptq"
        fmt = "marlin" if qc.get("is_marlin_format") else str(fmt).lower()
        if fmt not in ("gptq", "gptq_v2"):
            raise _refuse(source, f"checkpoint_format {fmt!r} (a kernel-specific repacking) is not supported; "
                                  f"re-save the model in the gptq or gptq_v2 format")
        if qc.get("dynamic"):
            raise _refuse(source, "per-module overrides ('dynamic') are not supported")
        return QuantConfig("gptq", bits, group_size, bool(qc.get("sym", True)), bool(qc.get("desc_act", False)),
                           fmt, source)
    version = str(qc.get("version") or "gemm").lower()
    if version != "gemm":
        raise _refuse(source, f"AWQ version {qc.get('version')!r} (its own packing for that kernel) is not supported")
    if not qc.get("zero_point", True):
        raise _refuse(source, "AWQ zero_point false is not supported")
    if group_size == -1:
        raise _refuse(source, "AWQ group_size -1 is not supported")
    return QuantConfig("awq", bits, group_size, False, False, "gemm", source)


# ---- unpacking ---------------------------------------------------------------------------------
_SHIFTS = np.arange(PER_WORD, dtype=np.uint32) * BITS


def _words(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).view(np.uint32)


def unpack_along_input(words: np.ndarray) -> np.ndarray:
    """int32 [R, C] -> uint8 [8R, C]: row 8r+j is nibble j (bits 4j..4j+3) of word [r, c] (GPTQ qweight)."""
    w = _words(words)
    codes = (w[:, None, :] >> _SHIFTS[None, :, None]) & 0xF  # [R, 8, C]
    return codes.reshape(w.shape[0] * PER_WORD, w.shape[1]).astype(np.uint8)


def unpack_along_output(words: np.ndarray, order: tuple[int, ...] = tuple(range(PER_WORD))) -> np.ndarray:
    """int32 [R, C] -> uint8 [R, 8C]: column 8c + order[j] is nibble j of word [r, c]
    (GPTQ qzeros with the plain order; AWQ qweight/qzeros with AWQ_ORDER)."""
    w = _words(words)
    nibbles = ((w[:, :, None] >> _SHIFTS[None, None, :]) & 0xF).astype(np.uint8)  # [R, C, 8]: nibble j
    out = np.empty_like(nibbles)
    out[:, :, list(order)] = nibbles
    return out.reshape(w.shape[0], w.shape[1] * PER_WORD)


@dataclass
class Unpacked:
    """One quantized linear's integer codes and grouping, K inputs and N outputs."""

    codes: np.ndarray  # uint8 [K, N], 0..15
    zeros: np.ndarray  # int16 [G, N] (v1 GPTQ: already plus one)
    scales: np.ndarray  # float32 [G, N]
    group: np.ndarray  # int64 [K]: the group of each input

    def dequantize(self) -> np.ndarray:
        """float32 [N, K]: W[o, i] = scales[group[i], o] · (codes[i, o] − zeros[group[i], o]), exact."""
        diff = self.codes.astype(np.int16) - self.zeros[self.group]
        return np.ascontiguousarray((self.scales[self.group] * diff).T)


def _expect(name: str, a: np.ndarray, shape: tuple[int, ...], kinds: str, what: str) -> None:
    if a.dtype.kind not in kinds or (kinds == "iu" and a.dtype.itemsize != 4):
        raise CheckpointError(f"{name}: dtype {a.dtype} where {what} is expected; edgecpm imports {SUPPORTED}")
    if tuple(a.shape) != tuple(shape):
        raise CheckpointError(f"{name}: shape {list(a.shape)}, expected {list(shape)} ({what}); "
                              f"edgecpm imports {SUPPORTED}")


def unpack(cfg: QuantConfig, stored: Mapping[str, np.ndarray], base: str, shape: tuple[int, int] | None = None
           ) -> Unpacked:
    """The codes of the quantized linear `base` from its stored tensors (suffix -> array).
    shape (N, K) is checked when given, else inferred from qweight and scales."""
    for suffix in REQUIRED:
        if stored.get(suffix) is None:
            raise CheckpointError(f"{base}.{suffix}: missing; a quantized linear stores "
                                  f"{', '.join(base + '.' + s for s in REQUIRED)}; edgecpm imports {SUPPORTED}")
    qweight, qzeros, scales = (np.asarray(stored[s]) for s in REQUIRED)
    if shape is None:
        n = scales.shape[-1]
        k = qweight.shape[0] * (PER_WORD if cfg.method == "gptq" else 1)
    else:
        n, k = shape
    if n % PER_WORD or k % PER_WORD:
        raise CheckpointError(f"{base}: {n} outputs x {k} inputs; 4-bit packing needs both to be multiples of 8")
    if cfg.group_size != -1 and cfg.method == "awq" and k % cfg.group_size:
        raise CheckpointError(f"{base}: group_size {cfg.group_size} does not divide its {k} inputs")
    want = cfg.stored_shapes(n, k)
    layout = "[K/8, N], packed along the inputs" if cfg.method == "gptq" else "[K, N/8], packed along the outputs"
    _expect(f"{base}.qweight", qweight, want["qweight"], "iu", f"int32 {layout} of {cfg.bits}-bit codes")
    _expect(f"{base}.qzeros", qzeros, want["qzeros"], "iu", "int32 [groups, N/8] of 4-bit zeros")
    _expect(f"{base}.scales", scales, want["scales"], "f", "float [groups, N]")
    groups = want["scales"][0]
    if cfg.method == "gptq":
        codes = unpack_along_input(qweight)
        zeros = unpack_along_output(qzeros).astype(np.int16)
        if cfg.checkpoint_format == "gptq":
            zeros += 1  # v1 stores zero − 1
        g_idx = stored.get("g_idx")
        if g_idx is None:
            group = np.arange(k) // (k if cfg.group_size == -1 else cfg.group_size)
        else:
            g_idx = np.asarray(g_idx)
            _expect(f"{base}.g_idx", g_idx, want["g_idx"], "iu", "int32 [K], the group of each input")
            group = g_idx.astype(np.int64)
            if len(group) and (group.min() < 0 or group.max() >= groups):
                raise CheckpointError(f"{base}.g_idx: group ids {group.min()}..{group.max()} outside the "
                                      f"{groups} groups of its scales")
    else:
        codes = unpack_along_output(qweight, AWQ_ORDER)
        zeros = unpack_along_output(qzeros, AWQ_ORDER).astype(np.int16)
        group = np.arange(k) // cfg.group_size
    bias = stored.get("bias")
    if bias is not None and np.any(np.asarray(bias, dtype=np.float32) != 0):
        raise CheckpointError(f"{base}.bias: nonzero bias; MiniCPM4 linears have none (an all-zero bias is ignored)")
    return Unpacked(codes, zeros, np.asarray(scales, dtype=np.float32), group)


def dequantize(cfg: QuantConfig, stored: Mapping[str, np.ndarray], base: str,
               shape: tuple[int, int] | None = None) -> np.ndarray:
    """float32 [N, K]: the exact weight of the quantized linear `base`."""
    return unpack(cfg, stored, base, shape).dequantize()


def foreign_tensor(name: str) -> str | None:
    """What a tensor of a repacked layout edgecpm does not read is (from its name), or None."""
    return FOREIGN.get(name.rsplit(".", 1)[-1])


def bits_per_weight(cfg: QuantConfig, n: int, k: int, scale_bytes: int = 2, with_g_idx: bool = True) -> float:
    """Stored bits per weight of a quantized [n, k] linear: codes + zeros + scales (+ g_idx)."""
    shapes = cfg.stored_shapes(n, k)
    total = (math.prod(shapes["qweight"]) + math.prod(shapes["qzeros"])) * 4 + math.prod(shapes["scales"]) * scale_bytes
    if cfg.method == "gptq" and with_g_idx:
        total += k * 4
    return total * 8 / (n * k)
