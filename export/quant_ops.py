"""The `edgecpm::QuantMatMul` custom op: an int8 / int4 weight-only linear (export/quantize.py),
written once: schema, ONNX node, reference local function (DESIGN.md §6's recipe, like
TernaryMatMul in custom_ops.py; kept in its own module).

Why a custom op with a reference function rather than onnxruntime's `com.microsoft::MatMulNBits`
in the exported graph: the bundle stays standard ONNX plus `edgecpm` ops with bodies, so any
runtime loads it (TensorRT's parser reads no com.microsoft op; onnxruntime or another runtime
without the rewrite runs the body). The weights are stored in MatMulNBits' own layout, so
onnxruntime's load-time rewrite (runtimes/quant_lowering.py) changes the node only, never a weight
byte, and its CPU kernel with accuracy_level 0 computes in fp32 (exact activations).

QuantMatMul (plugin version "1")
  inputs   x       [M, K]             float32 or float16
           codes   [N, K/block, block*bits/8] uint8: for bits 4 two codes a byte, the even input in
                                      the low nibble; for bits 8 one a byte
           scales  [N, K/block]       in x's dtype
           zeros   [N, ceil(K/block*bits/8)] uint8: zero points, packed like the codes, rows padded
  outputs  y       [M, N]             x @ W^T, W[n, k] = scales[n, k/block] * (q[n, k] - zeros[n, k/block]);
                                      fp32 accumulation, in x's dtype
  attributes (int): in_features (K), bits (4 or 8), block_size (16, 32, 64 or 128)
"""

from __future__ import annotations

import onnx

from edgecpm.export.custom_ops import DOMAIN, PLUGIN_VERSION, dequantized_matmul, op_schema, register_schema
from edgecpm.export.onnx_builder import GraphBuilder

QUANT = {
    "op_type": "QuantMatMul",
    "inputs": ["x", "codes", "scales", "zeros"],
    "outputs": ["y"],
    "attributes": ["in_features", "bits", "block_size"],
}


def register_quant_schema() -> None:
    register_schema(op_schema(QUANT, {"codes": "tensor(uint8)", "zeros": "tensor(uint8)"}, "quantized layout",
                              "int8 / int4 weight-only matmul (see edgecpm/export/quant_ops.py)"))


def quant_node(g: GraphBuilder, x, codes, scales, zeros, in_features: int, bits: int, block_size: int):
    return g.op(QUANT["op_type"], x, codes, scales, zeros, domain=DOMAIN, in_features=in_features, bits=bits,
                block_size=block_size, plugin_version=PLUGIN_VERSION, plugin_namespace="")


def _unpack(g: GraphBuilder, packed, left, right):
    """uint8 [..., B] -> [..., B, 8/bits]: each field shifted to the top of its byte, then down."""
    top = g.op("BitShift", g.op("Unsqueeze", packed, g.const([-1])), left, direction="LEFT")
    return g.op("BitShift", top, right, direction="RIGHT")


def dequantize_rows(g: GraphBuilder, codes, scales, zeros, k, bits):
    """float32 [N, K] of N stored rows (codes [N, K/block, blob], scales [N, K/block], zeros [N, zb]),
    with standard ops: W = (q - z) * s. k, bits: int64 [1] tensors (the op's attributes inside its
    function, constants in a graph: a quantized embedding dequantizes only its gathered rows)."""
    eight = g.const([8])
    right = g.op("Sub", eight, bits)  # [1]: 4 or 0
    slots = g.op("Div", eight, bits)  # fields per byte: 2 or 1
    # left shift of field j (lowest first): 8 - bits * (j + 1) = [4, 0] for 4 bits, [0] for 8 bits
    left = g.op("Slice", g.op("Concat", right, g.const([0]), axis=0), g.const([0]), slots)
    left, right = g.op("Cast", left, to=onnx.TensorProto.UINT8), g.op("Cast", right, to=onnx.TensorProto.UINT8)
    n, nb = g.dim(codes, 0), g.dim(scales, 1)
    q = g.op("Reshape", _unpack(g, codes, left, right), g.op("Concat", n, nb, g.const([-1]), axis=0))  # [N, nb, block]
    z = g.op("Reshape", _unpack(g, zeros, left, right), g.op("Concat", n, g.const([-1]), axis=0))
    z = g.op("Slice", z, g.const([0]), nb, g.const([1]))  # [N, nb]: the padding field dropped
    w = g.op("Sub", g.f32(q), g.op("Unsqueeze", g.f32(z), g.const([2])))
    w = g.op("Mul", w, g.op("Unsqueeze", g.f32(scales), g.const([2])))
    return g.op("Reshape", w, g.op("Concat", n, k, axis=0))


def quant_function() -> onnx.FunctionProto:
    """The reference body of QuantMatMul with standard ops (opset 17): unpack codes and zeros,
    dequantize to fp32, one fp32 Gemm, cast to x's dtype."""
    g = GraphBuilder(prefix="q_")
    x, codes, scales, zeros = QUANT["inputs"]
    w = dequantize_rows(g, codes, scales, zeros, g.attr("in_features"), g.attr("bits"))
    return dequantized_matmul(g, QUANT, x, w)
