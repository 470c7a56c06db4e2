"""Run a bundle's TernaryMatMul nodes on onnxruntime's own 4-bit kernel, rewritten at load.

A ternary bundle is exported with the `edgecpm::TernaryMatMul` custom op (the TensorRT plugin's
contract) and a reference local function of standard ops. onnxruntime can run that function, but
it constant-folds it at load: every linear is unpacked into a dense fp32 weight (~13 GiB of RSS and
40 s for MiniCPM4-0.5B) and the 2-bit format saves nothing. So before the session is created each
TernaryMatMul node becomes a `com.microsoft::MatMulNBits` node (bits=4, accuracy_level 1: fp32
accumulation, exact for codes in {0, 1, 2}; accuracy_level 4, int8 activations, when the bundle
was exported with `ternary_activations="int8"`) over the same codes, re-packed in memory as 4-bit
nibbles. Nodes whose group size is not a multiple of 16 (MatMulNBits' block sizes) keep the
reference function.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from edgecpm.export.ternary import matmulnbits_block, nibbles, unpack
from onnx import helper, numpy_helper

OP_TYPE, DOMAIN = "TernaryMatMul", "edgecpm"


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def lower_ternary(model: onnx.ModelProto, folder: Path, accuracy_level: int = 1) -> int:
    """Rewrite, in place, the TernaryMatMul nodes of `model` (loaded without its external data;
    `folder` holds that data) that MatMulNBits can compute. Returns how many were rewritten."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    lowered, dropped = 0, set()
    for i, node in enumerate(graph.node):
        if node.op_type != OP_TYPE or node.domain != DOMAIN:
            continue
        a = _attrs(node)
        k, group = a["in_features"], a["group_size"]
        block = matmulnbits_block(group)
        x, packed_name, scales_name = node.input
        if block is None or packed_name not in inits or scales_name not in inits:
            continue
        packed = numpy_helper.to_array(inits[packed_name], base_dir=str(folder))
        scales = numpy_helper.to_array(inits[scales_name], base_dir=str(folder))
        n = packed.shape[0]
        nib = numpy_helper.from_array(nibbles(unpack(packed, k), block), f"{packed_name}.nibbles")
        # MatMulNBits wants one scale per block; a group spans group // block blocks.
        per_block = numpy_helper.from_array(np.repeat(scales, group // block, axis=1).reshape(-1),
                                            f"{scales_name}.blocks")
        graph.initializer.extend([nib, per_block])
        graph.node[i].CopyFrom(helper.make_node(
            "MatMulNBits", [x, nib.name, per_block.name], list(node.output), name=node.name, domain="com.microsoft",
            K=k, N=n, bits=4, block_size=block, accuracy_level=accuracy_level))
        dropped |= {packed_name, scales_name}
        lowered += 1
    if lowered:
        still_used = {name for node in graph.node for name in node.input}
        keep = [t for t in graph.initializer if t.name not in dropped or t.name in still_used]
        del graph.initializer[:]
        graph.initializer.extend(keep)
        if not any(node.op_type == OP_TYPE for node in graph.node):
            kept = [f for f in model.functions if f.name != OP_TYPE]
            del model.functions[:]
            model.functions.extend(kept)
        if not any(o.domain == "com.microsoft" for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return lowered
