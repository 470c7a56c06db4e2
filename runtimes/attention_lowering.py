"""Swap each layer's dense attention subgraph for edgecpm's fused `edgecpm::Attention` kernel, at load.

The exported decoder graph computes attention with standard ops (export/onnx_builder.py `attend`):
the score blocks of the past and of the new tokens ([P + T, Hkv, G, T] fp32), one Softmax over
both, two weighted sums. That graph stays the bundle's contract (every runtime loads it); on
onnxruntime CPU, where edgecpm's kernel library builds (runtimes/onnxruntime_ops.cpp), the
subgraph is recognized and replaced by one node

    edgecpm::Attention(q [T, Hq, D], k [T, Hkv, D], v [T, Hkv, D], past_k [P, Hkv, D],
                       past_v [P, Hkv, D], attn_mask [T, T] bool; scale: float) -> [T, Hq*D]

that reads the token-major arena in place with an online softmax (no score matrix). Bundles are
not changed, so old ones get the kernel too. The match is strict (op types, permutations, the
operands' provenance, fp32 only); a layer that does not match keeps its dense subgraph, and the
nodes only the replaced subgraphs used are dropped.
"""

from __future__ import annotations

import math

import onnx
from onnx import helper, numpy_helper

OP_TYPE, DOMAIN = "Attention", "edgecpm"


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


class _Graph:
    def __init__(self, model: onnx.ModelProto):
        self.nodes = list(model.graph.node)
        self.producer = {o: n for n in self.nodes for o in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in self.nodes:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.inits = {t.name: t for t in model.graph.initializer}

    def made_by(self, name: str, op_type: str) -> onnx.NodeProto:
        node = self.producer.get(name)
        if node is None or node.op_type != op_type or node.domain not in ("", "ai.onnx"):
            raise _NoMatch(f"{name} is not made by {op_type}")
        return node

    def through_cast(self, name: str) -> str:
        """name, or the input of the fp32 Cast that made it (a no-op in an fp32 graph)."""
        node = self.producer.get(name)
        if node is not None and node.op_type == "Cast" and _attr(node, "to") == onnx.TensorProto.FLOAT:
            return node.input[0]
        return name

    def only_consumer(self, name: str, op_type: str) -> onnx.NodeProto:
        users = self.consumers.get(name, [])
        if len(users) != 1 or users[0].op_type != op_type:
            raise _NoMatch(f"{name} is not read by one {op_type}")
        return users[0]

    def constant(self, name: str):
        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            return numpy_helper.to_array(_attr(node, "value"))
        raise _NoMatch(f"{name} is not a constant")


class _NoMatch(Exception):
    pass


def _scores(g: _Graph, scores: str) -> tuple[str, str]:
    """grouped_scores(keys, q) -> (keys, q): Gather(Reshape(MatMul(Reshape(keys), qt)))
    with qt = Mul(Reshape(Transpose(Reshape(q), [3, 1, 2, 0])), 1/sqrt(D))."""
    gather = g.made_by(scores, "Gather")
    matmul = g.made_by(g.through_cast(g.made_by(gather.input[0], "Reshape").input[0]), "MatMul")
    keys = g.made_by(matmul.input[0], "Reshape").input[0]
    mul = g.made_by(matmul.input[1], "Mul")
    transpose = g.made_by(g.made_by(g.through_cast(mul.input[0]), "Reshape").input[0], "Transpose")
    if list(_attr(transpose, "perm")) != [3, 1, 2, 0]:
        raise _NoMatch("query transpose")
    q = g.made_by(transpose.input[0], "Reshape").input[0]
    # The scale: Reciprocal(Sqrt(Cast(D))) of the keys' last dimension.
    recip = g.made_by(mul.input[1], "Reciprocal")
    g.made_by(g.made_by(recip.input[0], "Sqrt").input[0], "Cast")
    return keys, q


def _weighted(g: _Graph, matmul_out: str, probs: str) -> str:
    """weighted(): MatMul(Reshape(Transpose(Slice(probs))), Reshape(values)) -> values."""
    matmul = g.made_by(matmul_out, "MatMul")
    transpose = g.made_by(g.made_by(matmul.input[0], "Reshape").input[0], "Transpose")
    if list(_attr(transpose, "perm")) != [1, 2, 3, 0]:
        raise _NoMatch("probability transpose")
    if g.made_by(transpose.input[0], "Slice").input[0] != probs:
        raise _NoMatch("weights are not the softmax's")
    return g.made_by(matmul.input[1], "Reshape").input[0]


def _match(g: _Graph, softmax: onnx.NodeProto) -> tuple[list[str], str, onnx.NodeProto]:
    """The operands (q, k, v, past_k, past_v, attn_mask), the output and the last node of one attend()."""
    if _attr(softmax, "axis") != 0:
        raise _NoMatch("softmax axis")
    concat = g.made_by(softmax.input[0], "Concat")
    if _attr(concat, "axis") != 0 or len(concat.input) != 2:
        raise _NoMatch("score concat")
    past_k, q_past = _scores(g, concat.input[0])  # a Where here would be a past mask: not matched
    where = g.made_by(concat.input[1], "Where")
    if float(g.constant(where.input[2])) != -math.inf:
        raise _NoMatch("mask fill")
    k, q = _scores(g, where.input[1])
    if q != q_past:
        raise _NoMatch("two queries")
    unsq = g.made_by(where.input[0], "Unsqueeze")
    if list(g.constant(unsq.input[1])) != [1, 2]:
        raise _NoMatch("mask unsqueeze")
    tr = g.made_by(unsq.input[0], "Transpose")
    if list(_attr(tr, "perm")) != [1, 0]:
        raise _NoMatch("mask transpose")
    attn_mask = tr.input[0]
    # Forward: the Slice -> Transpose -> Reshape -> MatMul of each block meet in one Add.
    probs = softmax.output[0]
    adds = set()
    for s in g.consumers.get(probs, []):
        if s.op_type != "Slice":
            raise _NoMatch("softmax reader")
        mm = g.only_consumer(g.only_consumer(g.only_consumer(s.output[0], "Transpose").output[0], "Reshape").output[0],
                             "MatMul")
        adds.add(g.only_consumer(mm.output[0], "Add").name)
    if len(adds) != 1:
        raise _NoMatch("weighted sums")
    add = g.only_consumer(mm.output[0], "Add")
    past_v, v = _weighted(g, add.input[0], probs), _weighted(g, add.input[1], probs)
    # Then the head-diagonal selection back to [T, Hq*D].
    node = add
    for op_type, perm in (("Reshape", None), ("Transpose", [0, 2, 1, 3]), ("Reshape", None), ("Gather", None),
                          ("Reshape", None), ("Transpose", [2, 0, 1, 3]), ("Reshape", None)):
        node = g.only_consumer(node.output[0], op_type)
        if perm is not None and list(_attr(node, "perm")) != perm:
            raise _NoMatch("output layout")
    return [q, k, v, past_k, past_v, attn_mask], node.output[0], node


def fuse_attention(model: onnx.ModelProto, head_dim: int) -> int:
    """Rewrite `model` (an fp32 decoder graph, loaded with or without its external data) in place:
    every attend() subgraph becomes one edgecpm::Attention node. Returns how many were replaced."""
    g = _Graph(model)
    swaps: dict[int, onnx.NodeProto] = {}  # id(last node of a subgraph) -> its Attention node
    for node in g.nodes:
        if node.op_type != "Softmax" or node.domain not in ("", "ai.onnx"):
            continue
        try:
            operands, out, last = _match(g, node)
        except _NoMatch:
            continue
        swaps[id(last)] = helper.make_node(OP_TYPE, operands, [out], name=f"{last.name or out}/fused_attention",
                                           domain=DOMAIN, scale=1.0 / math.sqrt(head_dim))
    if not swaps:
        return 0
    new_nodes = [swaps.get(id(n), n) for n in g.nodes]
    # Drop what only the replaced subgraphs read (repeatedly: a chain dies from its end).
    needed = {o.name for o in model.graph.output}
    live: list[onnx.NodeProto] = []
    for node in reversed(new_nodes):
        if any(o in needed for o in node.output):
            live.append(node)
            needed.update(i for i in node.input if i)
    live.reverse()
    del model.graph.node[:]
    model.graph.node.extend(live)
    used = {i for n in live for i in n.input}
    kept = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return len(swaps)
