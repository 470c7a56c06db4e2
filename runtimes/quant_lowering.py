"""How onnxruntime runs a bundle's QuantMatMul nodes (int8 / int4 weight-only linears,
export/quantize.py): rewritten at load to `com.microsoft::MatMulNBits`.

The bundle stores the codes, scales and zero points in MatMulNBits' own layout, so the rewrite
touches no weight byte: each QuantMatMul node becomes a MatMulNBits node over the same initializers
(the scales and zeros declared 1-D, as MatMulNBits reads them: only their TensorProto dims change,
their external data stays where it is). accuracy_level 0: onnxruntime's CPU kernel dequantizes
blocks and multiplies in fp32, so the activations are exact (measured on onnxruntime 1.32: the
result matches fp32 x @ W^T of the dequantized weight to ~1e-6 relative, summation order).
Without the rewrite onnxruntime would constant-fold the op's reference function into dense fp32
weights at load, and the 4-bit format would save nothing.
"""

from __future__ import annotations

import math

import onnx
from onnx import helper

OP_TYPE, DOMAIN = "QuantMatMul", "edgecpm"
ACCURACY_LEVEL = 0  # fp32 activations; 4 would round them to int8 (faster, lossy)


def lower_quant(model: onnx.ModelProto, accuracy_level: int = ACCURACY_LEVEL) -> int:
    """Rewrite, in place, the QuantMatMul nodes of `model` (loaded with or without its external
    data) whose weights are initializers into MatMulNBits nodes; drop the op's reference function
    once no node needs it. Returns how many nodes were rewritten."""
    inits = {t.name: t for t in model.graph.initializer}
    count = 0
    flat: set[str] = set()
    for node in model.graph.node:
        if node.op_type != OP_TYPE or node.domain != DOMAIN:
            continue
        codes, scales, zeros = node.input[1:4]
        if not all(name in inits for name in (codes, scales, zeros)):
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        for name in (scales, zeros):
            if name not in flat:  # [N, blocks] -> [N * blocks]
                t = inits[name]
                size = math.prod(t.dims)
                del t.dims[:]
                t.dims.append(size)
                flat.add(name)
        n = inits[codes].dims[0]
        node.op_type, node.domain = "MatMulNBits", "com.microsoft"
        del node.attribute[:]
        node.attribute.extend([helper.make_attribute("K", attrs["in_features"]), helper.make_attribute("N", n),
                               helper.make_attribute("bits", attrs["bits"]),
                               helper.make_attribute("block_size", attrs["block_size"]),
                               helper.make_attribute("accuracy_level", accuracy_level)])
        count += 1
    if count and not any(n.op_type == OP_TYPE and n.domain == DOMAIN for n in model.graph.node):
        kept = [f for f in model.functions if f.name != OP_TYPE]
        del model.functions[:]
        model.functions.extend(kept)
    if count and not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return count
