"""The packed ternary weight format (DESIGN.md §8), numpy only: what an exported bundle stores and
every backend reads. The export side (edgecpm.export.ternary: detection, the lossy quantizer, the
torch op) writes it; the ONNX op (TernaryMatMul), edgecpm's onnxruntime kernel, onnxruntime's
MatMulNBits lowering (runtimes/ternary_lowering.py) and the TensorRT plugin read exactly this layout.

Format of one linear weight W [N, K] (N outputs, K inputs), ternary: W[n, k] ∈ {−s, 0, +s}
- codes   c = W / s + 1 ∈ {0, 1, 2}, 2 bits each, 16 per uint32, lowest bits first along the
          input dimension: `packed[n, k // 16] >> (2 * (k % 16)) & 3` is the code of input k of
          row n. packed is [N, ceil(K / 16)]; the padding codes past K are 1 (zero weight).
- scales  [N, K // group_size] in the model dtype: s of inputs [j*g, (j+1)*g) of row n is
          scales[n, j]. Per-tensor and per-row scales are stored as group_size = K ([N, 1]).
- W[n, k] = (code − 1) · scales[n, k // group_size]; a group whose weights are all zero stores 0.

Worked example: N = 2 rows, K = 20 inputs, one scale per row (0.5 and 0.25).

>>> W = np.array([[.5, -.5, 0, .5,  0, 0, -.5, .5,  .5, 0, 0, 0,  -.5, 0, 0, .5,  -.5, .5, 0, 0],
...               [0, .25, -.25, 0,  0, 0, 0, 0,  .25, .25, .25, .25,  0, -.25, 0, 0,  0, 0, 0, -.25]],
...              np.float32)
>>> codes, scales = encode(W, 20)
>>> for row in codes.tolist():
...     print(row)
[2, 0, 1, 2, 1, 1, 0, 2, 2, 1, 1, 1, 0, 1, 1, 2, 0, 2, 1, 1]
[1, 2, 0, 1, 1, 1, 1, 1, 2, 2, 2, 2, 1, 0, 1, 1, 1, 1, 1, 0]
>>> scales.tolist()
[[0.5], [0.25]]
>>> [[hex(word) for word in row] for row in pack(codes)]
[['0x94568592', '0x55555558'], ['0x51aa5549', '0x55555515']]
>>> bool((dequantize(pack(codes), scales, 20) == W).all())
True

Row 0, word 0: codes 2, 0, 1, 2 fill its lowest byte as 0b10_01_00_10 = 0x92 (the first code in
the lowest two bits). Word 1 holds codes 16..19 (0, 2, 1, 1 → 0x58) and 12 padding codes of 1,
which make each remaining byte 0b01010101 = 0x55.

Which weights are ternary, and at which group size, is found at export (edgecpm.export.ternary.detect).
"""

from __future__ import annotations

import math

import numpy as np

CODES_PER_WORD = 16
_SHIFTS = np.arange(CODES_PER_WORD, dtype=np.uint32) * 2


def encode(w: np.ndarray, group_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Split an exactly ternary w [N, K] into codes uint8 [N, K] and float32 scales [N, K // g]."""
    w = np.asarray(w, dtype=np.float32)
    scales = np.abs(w).reshape(w.shape[0], -1, group_size).max(-1)
    codes = (np.sign(w) + 1).astype(np.uint8)
    return codes, scales


def pack(codes: np.ndarray) -> np.ndarray:
    """codes [N, K] in {0, 1, 2} -> uint32 [N, ceil(K / 16)], lowest bits first, padded with 1."""
    n, k = codes.shape
    words = math.ceil(k / CODES_PER_WORD)
    padded = np.ones((n, words * CODES_PER_WORD), dtype=np.uint32)
    padded[:, :k] = codes
    return np.bitwise_or.reduce(padded.reshape(n, words, CODES_PER_WORD) << _SHIFTS, axis=-1)


def unpack(packed: np.ndarray, k: int) -> np.ndarray:
    """uint32 [N, W] -> codes uint8 [N, K]."""
    codes = (packed[..., None] >> _SHIFTS) & 3
    return codes.reshape(packed.shape[0], -1)[:, :k].astype(np.uint8)


def dequantize(packed: np.ndarray, scales: np.ndarray, k: int) -> np.ndarray:
    """The float32 weight [N, K] a packed tensor stands for."""
    g = k // scales.shape[1]
    codes = unpack(packed, k).astype(np.float32) - 1
    return (codes.reshape(len(codes), -1, g) * scales.astype(np.float32)[..., None]).reshape(len(codes), k)


# ---- onnxruntime's MatMulNBits: the 2-bit kernel (runtimes/ternary_lowering.py) ----------------------
# How the onnxruntime backend computes a bundle's packed linears where edgecpm's own kernel does not
# (runtimes/onnxruntime_ops.cpp, "exact" only), per its manifest's `ternary.activations`: as int8
# "digits" of the activations on MatMulNBits' integer kernel. 3 digits are exact to fp32 rounding; 2
# ("int16") to 2^-16 of each block's largest activation; 1 ("int8") is onnxruntime's own int8
# rounding, lossy (logits ~1e-3 relative). See runtimes/ternary_lowering.py for why.
ACTIVATION_DIGITS = {"exact": 3, "int16": 2, "int8": 1}


def matmulnbits_block(group_size: int) -> int | None:
    """The MatMulNBits block size for a group size (it must divide the group), or None. 128 is the
    fastest its 2-bit int8 kernel takes; at 256 onnxruntime 1.32 falls back to its exact 2-bit path,
    ~30x slower (a 0.5B decode step: 835 ms)."""
    return next((b for b in (128, 64, 32, 16) if group_size % b == 0), None)


def matmulnbits_codes(packed: np.ndarray, block: int) -> np.ndarray:
    """MatMulNBits' 2-bit B [N, K / block, block / 4] uint8 — the packed codes' own bytes: 4 codes a
    byte, lowest bits first, is 16 codes a little-endian uint32, lowest bits first."""
    n = packed.shape[0]
    return np.ascontiguousarray(packed, dtype="<u4").view(np.uint8).reshape(n, -1, block // 4)


def matmulnbits_zero_points(n: int, k: int, block: int) -> np.ndarray:
    """Zero point 1 (code c = w + 1) for every block: 2-bit fields, 4 a byte, each row padded to a byte."""
    return np.full(n * -(-(k // block) // 4), 0b01010101, np.uint8)
