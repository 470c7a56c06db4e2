"""How onnxruntime runs a bundle's TernaryMatMul nodes: rewritten at load, for edgecpm's own kernel
or onto onnxruntime's 2-bit MatMulNBits.

A ternary bundle is exported with the `edgecpm::TernaryMatMul` custom op (the TensorRT plugin's
contract) and a reference local function of standard ops. onnxruntime can run that function, but
it constant-folds it at load: every linear becomes a dense fp32 weight (~13 GiB of RSS and 40 s for
MiniCPM4-0.5B) and the 2-bit format saves nothing. So before the session is created:

- `fuse_ternary`: where edgecpm's kernel (runtimes/onnxruntime_ops.cpp: fp32 activations, exact)
  is built, the nodes stay TernaryMatMul and run on it; linears that read one activation are fused.
- `lower_ternary`: otherwise, they become `com.microsoft::MatMulNBits` nodes (bits=2, zero point 1)
  over the bundle's own packed bytes, as follows.

Exactness. MatMulNBits' fast 2-bit CPU kernel quantizes its input rows to int8, per block of
`block` inputs (scale = the block's max |x| / 127, symmetric), then multiplies integers: with
ternary codes that part is exact, so all of its error is the activation rounding. A row whose
every block is already on its int8 grid (x = k * scale, integer |k| <= 127, and some |k| = 127)
goes through unchanged. So each activation row x is written as `digits` rows that are:
x1 = x rounded to its blocks' int8 grids, x2 = the remainder x - x1 rounded to its own grids, and
so on, the last digit carrying the rest. The digits run as extra rows of the same call (the weights
are read once) and the rows of the result are summed. The last digit's rounding is the only error:
at most 254^-digits (~2^-8 per digit) of its block's largest activation — 3 digits ("exact") is
fp32-level (~1e-7 relative logits, like the reference function), 2 ("int16") ~1e-5, 1 ("int8")
~1e-3.
Linears that read the same activation (q/k/v, gate/up) become one call whose result is Split.

Nodes whose group size is not a multiple of 16 (MatMulNBits' block sizes) keep the reference
function. Activations are 2-D [T, K], as edgecpm's graphs write them.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgecpm.ternary_format import matmulnbits_block, matmulnbits_codes, matmulnbits_zero_points

OP_TYPE, DOMAIN = "TernaryMatMul", "edgecpm"


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


class _Rewrite:
    """The nodes and initializers a rewrite adds; constants are shared by name."""

    def __init__(self, model: onnx.ModelProto, folder: Path):
        self.folder = folder
        self.inits = {t.name: t for t in model.graph.initializer}
        self.opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
        self.added: list[onnx.TensorProto] = []
        self.digit_rows: dict[tuple[str, int], str] = {}

    def array(self, name: str) -> np.ndarray:
        return numpy_helper.to_array(self.inits[name], base_dir=str(self.folder))

    def init(self, name: str, value: np.ndarray) -> str:
        if name not in self.inits:
            self.inits[name] = numpy_helper.from_array(np.asarray(value), name)
            self.added.append(self.inits[name])
        return name

    def digits(self, x: str, k: int, block: int, digits: int, dtype: np.dtype) -> tuple[str, list[onnx.NodeProto]]:
        """`digits` rows per row of x [T, K], stacked as [digits, T, K], each on its int8 grid but
        the last; the nodes that make them (only the first caller of an (x, block) gets them)."""
        if (x, block) in self.digit_rows:
            return self.digit_rows[x, block], []
        nodes: list[onnx.NodeProto] = []
        p = f"{x}/digits{block}"

        def op(op_type, inputs, out, **attrs):
            nodes.append(helper.make_node(op_type, inputs, [f"{p}/{out}"], **attrs))
            return f"{p}/{out}"

        inv127 = self.init(f"inv127.{dtype}", np.array(1 / 127, dtype))
        # An all-zero block would divide 0 by 0: its scale is floored at the smallest normal number.
        tiny = self.init(f"tiny.{dtype}", np.array(np.finfo(dtype).tiny, dtype))
        rest = op("Reshape", [x, self.init(f"blocks.{k}.{block}", np.array([-1, k // block, block]))], "blocks")
        rows = []
        for d in range(digits - 1):
            absx = op("Abs", [rest], f"abs{d}")
            if self.opset >= 18:
                amax = op("ReduceMax", [absx, self.init("axis.-1", np.array([-1]))], f"amax{d}", keepdims=1)
            else:
                amax = op("ReduceMax", [absx], f"amax{d}", axes=[-1], keepdims=1)
            # x / scale rounds to integers |k| <= 127, and to 127 at the block's largest value
            # (127 * (1 +- a few ulps) rounds to 127): exactly the grid MatMulNBits will find.
            scale = op("Mul", [op("Max", [amax, tiny], f"amax_floor{d}"), inv127], f"scale{d}")
            rounded = op("Round", [op("Div", [rest, scale], f"x_over_scale{d}")], f"k{d}")
            digit = op("Mul", [rounded, scale], f"digit{d}")
            rows.append(digit)
            rest = op("Sub", [rest, digit], f"rest{d}")
        stacked = op("Concat", rows + [rest], "stacked", axis=0) if rows else rest
        out = op("Reshape", [stacked, self.init(f"digit_rows.{digits}.{k}", np.array([digits, -1, k]))], "rows")
        self.digit_rows[x, block] = out
        return out, nodes

    def fused(self, group: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
        """One TernaryMatMul over the rows of the nodes of `group` (same input and group size),
        then the Split into each node's output."""
        first = group[0]
        name = first.name or first.output[0]
        packed = self.init(f"{name}.fused_packed", np.concatenate([self.array(node.input[1]) for node in group]))
        scales = self.init(f"{name}.fused_scales", np.concatenate([self.array(node.input[2]) for node in group]))
        ns = [self.inits[node.input[1]].dims[0] for node in group]
        y = f"{name}/fused"
        fused = helper.make_node(OP_TYPE, [first.input[0], packed, scales], [y], name=name, domain=DOMAIN)
        fused.attribute.extend(first.attribute)
        split = helper.make_node("Split", [y, self.init(f"split.{'.'.join(map(str, ns))}", np.array(ns))],
                                 [node.output[0] for node in group], axis=-1)
        return [fused, split]

    def linears(self, group: list[onnx.NodeProto], block: int, digits: int) -> list[onnx.NodeProto]:
        """One MatMulNBits call for the TernaryMatMul nodes of `group` (same input), then the sum
        of its digit rows and the Split into each node's output."""
        first = group[0]
        x, k = first.input[0], _attrs(first)["in_features"]
        codes, scales, ns = [], [], []
        for node in group:
            packed, s = self.array(node.input[1]), self.array(node.input[2])
            codes.append(matmulnbits_codes(packed, block))
            scales.append(np.repeat(s, _attrs(node)["group_size"] // block, axis=1))  # one scale per block
            ns.append(packed.shape[0])
        n, dtype = sum(ns), scales[0].dtype
        name = first.name or first.output[0]
        b = self.init(f"{name}.codes2", np.concatenate(codes))
        s = self.init(f"{name}.block_scales", np.concatenate(scales).reshape(-1))
        z = self.init(f"{name}.zero_points", matmulnbits_zero_points(n, k, block))
        outs = [node.output[0] for node in group]
        if digits == 1:
            a, nodes = x, []
        else:
            a, nodes = self.digits(x, k, block, digits, dtype)
        y = outs[0] if digits == 1 and len(group) == 1 else f"{name}/matmulnbits"
        nodes.append(helper.make_node("MatMulNBits", [a, b, s, z], [y], name=name, domain="com.microsoft",
                                      K=k, N=n, bits=2, block_size=block, accuracy_level=4))
        if digits > 1:
            summed = outs[0] if len(group) == 1 else f"{name}/sum"
            nodes.append(helper.make_node("ReduceSum", [y, self.init("axis.0", np.array([0]))], [summed], keepdims=0))
            y = summed
        if len(group) > 1:
            nodes.append(helper.make_node("Split", [y, self.init(f"split.{'.'.join(map(str, ns))}", np.array(ns))],
                                          outs, axis=-1))
        return nodes


def _ternary_nodes(nodes: list[onnx.NodeProto], rw: _Rewrite) -> dict[str, list[onnx.NodeProto]]:
    """The TernaryMatMul nodes whose weights are initializers, by input."""
    by_input: dict[str, list[onnx.NodeProto]] = {}
    for node in nodes:
        if node.op_type != OP_TYPE or node.domain != DOMAIN:
            continue
        if node.input[1] in rw.inits and node.input[2] in rw.inits:
            by_input.setdefault(node.input[0], []).append(node)
    return by_input


def _replace(model: onnx.ModelProto, rw: _Rewrite, nodes: list[onnx.NodeProto], groups: list[list[onnx.NodeProto]],
             build) -> int:
    """Put build(group)'s nodes in each group's place, drop the weights no node reads any more;
    returns how many nodes were replaced. A group's nodes go where its first node was: their input
    is ready there, and every other member's consumers come later."""
    graph = model.graph
    at_first = {id(group[0]): group for group in groups}
    replaced = {id(node) for group in groups for node in group}
    new_nodes = []
    for node in nodes:
        if id(node) in at_first:
            new_nodes += build(at_first[id(node)])
        elif id(node) not in replaced:
            new_nodes.append(node)
    dropped = {name for group in groups for node in group for name in node.input[1:]}
    still_used = {name for node in new_nodes for name in node.input}
    keep = [t for t in list(graph.initializer) + rw.added if t.name not in dropped or t.name in still_used]
    del graph.node[:]
    graph.node.extend(new_nodes)
    del graph.initializer[:]
    graph.initializer.extend(keep)
    return len(replaced)


def _drop_reference_function(model: onnx.ModelProto) -> None:
    kept = [f for f in model.functions if f.name != OP_TYPE]
    del model.functions[:]
    model.functions.extend(kept)


def lower_ternary(model: onnx.ModelProto, folder: Path, digits: int = 3) -> int:
    """Rewrite, in place, the TernaryMatMul nodes of `model` (loaded without its external data;
    `folder` holds that data) that MatMulNBits can compute, with `digits` int8 digits per
    activation (module docstring). Returns how many nodes were rewritten."""
    rw = _Rewrite(model, folder)
    nodes = list(model.graph.node)  # held, so that id() names each node for the whole rewrite
    def block(group: list[onnx.NodeProto]) -> int | None:  # the largest that divides every member's group
        return matmulnbits_block(math.gcd(*(_attrs(node)["group_size"] for node in group)))

    # One call per input; else one per node.
    groups: list[list[onnx.NodeProto]] = []
    for members in _ternary_nodes(nodes, rw).values():
        groups += [members] if block(members) else [[node] for node in members if block([node])]
    if not groups:
        return 0
    count = _replace(model, rw, nodes, groups, lambda group: rw.linears(group, block(group), digits))
    if not any(node.op_type == OP_TYPE for node in model.graph.node):
        _drop_reference_function(model)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return count


def fuse_ternary(model: onnx.ModelProto, folder: Path) -> int:
    """For edgecpm's own kernel (runtimes/onnxruntime_ops.cpp), which implements TernaryMatMul:
    rewrite `model` in place so that linears reading one activation with one group size (q/k/v,
    gate/up) are one TernaryMatMul over their rows, then a Split — one kernel call and one wake of
    the thread pool instead of three — and drop the op's reference function. Returns how many
    nodes were fused."""
    rw = _Rewrite(model, folder)
    nodes = list(model.graph.node)
    groups = []
    for members in _ternary_nodes(nodes, rw).values():
        by_group: dict[int, list[onnx.NodeProto]] = {}
        for node in members:
            by_group.setdefault(_attrs(node)["group_size"], []).append(node)
        groups += [group for group in by_group.values() if len(group) > 1]
    count = _replace(model, rw, nodes, groups, rw.fused) if groups else 0
    _drop_reference_function(model)
    return count
