"""Every custom op of the edgecpm graphs, written once: schema, ONNX node, reference body.

Custom ops live in ONNX domain `edgecpm` with op_type equal to the TensorRT plugin name and the
attributes `plugin_version="1"`, `plugin_namespace=""` (DESIGN.md §6). Each node is backed by an
ONNX local function in the same model that computes the reference result with standard ops, so
onnxruntime runs the exported graph as is; `edgecpm build` strips the functions so TensorRT maps
the nodes to the plugins. One spec, three implementations: the torch op
(edgecpm.export.infllmv2), the function below, the CUDA plugin (plugins/).

InfLLMv2Attention (plugin version "1")
  inputs   q          [T, Hq, D]    roped queries, model dtype
           k, v       [T, Hkv, D]   the new tokens' roped keys and values
           past_k/v   [P, Hkv, D]   the cache (token-major)
           past_ck    [C, Hkv, D]   float32 compressed keys of the past, C = n_chunks(P)
           positions  [T] int64     the queries' positions (P + t for plain steps)
           attn_mask  [T, T] bool   visibility among the new tokens (past always visible)
  outputs  out        [T, Hq, D]    attention output, model dtype
           ck_new     [Cn, Hkv, D]  float32 compressed keys of the chunks the new tokens complete,
                                    Cn = n_chunks(P + T) - n_chunks(P); the runtime appends them
  attributes (int): kernel_size (=2*kernel_stride), kernel_stride, block_size (=4*kernel_stride),
           init_blocks, window_size, topk, dense_len, semantics (1 or 2)
  Semantics: DESIGN.md §7 per query; ties in block scores go to the lower block index (ONNX TopK).
  positions lie in [P, P + T). Draft trees: the new rows sit in slots P + j but at positions
  positions[j], and every rule goes by position (edgecpm.export.infllmv2's docstring): a new row
  belongs to block positions[j] // block_size and needs that block chosen and attn_mask; a query
  whose path is not the slots P..P+t scores the chunks overlapping the new rows with compressed
  keys of its own path. ck_new stays slot-ordered, so the runtime recomputes the chunks of a
  tree's accepted path after compacting it.

TernaryMatMul (plugin version "1"), a BitCPM4 ternary linear layer (format: edgecpm.export.ternary)
  inputs   x          [M, K]        float32 or float16
           packed     [N, ceil(K/16)] uint32: 2-bit codes c = w/s + 1, 16 per word, lowest bits
                                    first along the input; padding codes past K are 1
           scales     [N, K/group_size] in x's dtype (per tensor or per row: group_size = K)
  outputs  y          [M, N]        x @ W^T, W[n, k] = (c - 1) * scales[n, k // group_size];
                                    fp32 accumulation, in x's dtype
  attributes (int): in_features (K), group_size
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from edgecpm.config import SparseConfig
from edgecpm.export.onnx_builder import GraphBuilder, grouped_scores

DOMAIN = "edgecpm"
PLUGIN_VERSION = "1"

INFLLMV2 = {
    "op_type": "InfLLMv2Attention",
    "inputs": ["q", "k", "v", "past_k", "past_v", "past_ck", "positions", "attn_mask"],
    "outputs": ["out", "ck_new"],
    "attributes": ["kernel_size", "kernel_stride", "block_size", "init_blocks", "window_size", "topk",
                   "dense_len", "semantics"],
}


def infllmv2_attributes(cfg: SparseConfig) -> dict:
    return {"kernel_size": cfg.kernel_size, "kernel_stride": cfg.kernel_stride, "block_size": cfg.block_size,
            "init_blocks": cfg.init_blocks, "window_size": cfg.window_size, "topk": cfg.topk,
            "dense_len": cfg.dense_len, "semantics": int(cfg.semantics[1:]),
            "plugin_version": PLUGIN_VERSION, "plugin_namespace": ""}


TERNARY = {
    "op_type": "TernaryMatMul",
    "inputs": ["x", "packed", "scales"],
    "outputs": ["y"],
    "attributes": ["in_features", "group_size"],
}


def op_schema(spec: dict, types: dict[str, str], what: str, doc: str) -> onnx.defs.OpSchema:
    """The onnx schema of an edgecpm op from its spec: inputs and outputs in the model dtype "T"
    unless `types` fixes them, the spec's INT attributes plus the TensorRT plugin fields."""
    param = onnx.defs.OpSchema.FormalParameter
    attr = onnx.defs.OpSchema.Attribute
    attrs = [attr(a, onnx.defs.OpSchema.AttrType.INT, what) for a in spec["attributes"]]
    attrs += [attr(a, onnx.defs.OpSchema.AttrType.STRING, "TensorRT plugin field")
              for a in ("plugin_version", "plugin_namespace")]
    return onnx.defs.OpSchema(
        spec["op_type"], DOMAIN, 1, inputs=[param(n, types.get(n, "T")) for n in spec["inputs"]],
        outputs=[param(n, types.get(n, "T")) for n in spec["outputs"]], attributes=attrs,
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], "model dtype")], doc=doc,
    )


def register_schema(schema: onnx.defs.OpSchema) -> None:
    """Register an op with onnx so the checker accepts its nodes (idempotent)."""
    if not onnx.defs.has(schema.name, DOMAIN):
        onnx.defs.register_schema(schema)


def register_schemas() -> None:
    register_schema(ternary_schema())
    register_schema(op_schema(INFLLMV2, {"past_ck": "tensor(float)", "positions": "tensor(int64)",
                                         "attn_mask": "tensor(bool)", "ck_new": "tensor(float)"},
                              "InfLLM v2 setting", "InfLLM v2 sparse attention (see edgecpm/export/custom_ops.py)"))


def infllmv2_node(g: GraphBuilder, q, k, v, past_k, past_v, past_ck, positions, attn_mask, cfg: SparseConfig):
    return g.op(INFLLMV2["op_type"], q, k, v, past_k, past_v, past_ck, positions, attn_mask, n_out=2,
                domain=DOMAIN, **infllmv2_attributes(cfg))


def tree_chunk_scores(g: GraphBuilder, s_new, qf, past_k, k, pos, attn_mask, first, n_new, stride, kernel, P, T):
    """Stage-1 logits of the new chunks [Cn, Hkv, G, T] (s_new, scored with the slot-ordered
    ck_new) with the columns of the unaligned queries (a draft tree off its first branch, see
    edgecpm.export.infllmv2) replaced: each such query scores chunks made of its own path, the
    chunk's past rows plus the new rows it sees whose positions fall in the chunk. A plain step has
    no unaligned query: the extra work is on empty tensors."""
    zero, one, big = g.const([0]), g.const([1]), g.const([np.iinfo(np.int64).max])
    Hkv, D = g.dim(k, 1), g.dim(k, 2)
    # aligned[t]: positions[t] = P + t and every new row i <= t is visible to t and at P + i.
    ar = g.op("Range", g.const(0), g.op("Squeeze", T), g.const(1))
    at_slot = g.op("Equal", pos, g.op("Add", ar, P))
    causal = g.op("LessOrEqual", g.op("Unsqueeze", ar, zero), g.op("Unsqueeze", ar, one))  # [t, i]: i <= t
    good = g.op("Or", g.op("Not", causal), g.op("And", attn_mask, g.op("Unsqueeze", at_slot, zero)))
    bad = g.op("ReduceMax", g.op("Cast", g.op("Not", good), to=TensorProto.INT64), axes=[1], keepdims=0)
    aligned = g.op("And", at_slot, g.op("Equal", bad, g.const(0)))
    tq = g.op("Reshape", g.op("NonZero", g.op("Not", aligned)), g.const([-1]))  # [Tn] unaligned queries
    # The chunks' past rows, summed per stride-row half (past rows only; the new rows are zeros).
    start = g.op("Mul", first, stride)
    past_tail = g.f32(g.op("Slice", past_k, start, P, zero))
    need = g.op("Mul", g.op("Add", n_new, one), stride)
    short = g.op("Max", g.op("Sub", need, g.dim(past_tail, 0)), zero)
    past_tail = g.op("Pad", past_tail, g.op("Concat", zero, zero, zero, short, zero, zero, axis=0))
    past_tail = g.op("Slice", past_tail, zero, need, zero)
    halves = g.op("ReduceSum", g.op("Reshape", past_tail, g.op("Concat", g.const([-1]), stride, Hkv, D, axis=0)),
                  one, keepdims=0)
    # [Cn, Hkv, D]
    past_sum = g.op("Add", g.op("Slice", halves, zero, n_new, zero), g.op("Slice", halves, one, big, zero))
    # The new rows each unaligned query sees, per chunk, by position.
    lo = g.op("Unsqueeze", g.op("Mul", g.op("Range", g.op("Squeeze", first), g.op("Squeeze", g.op("Add", first, n_new)),
                                            g.const(1)), g.op("Squeeze", stride)), one)  # [Cn, 1]
    inside = g.op("And", g.op("GreaterOrEqual", pos, lo), g.op("Less", pos, g.op("Add", lo, kernel)))  # [Cn, T]
    w = g.op("And", g.op("Unsqueeze", g.op("Gather", attn_mask, tq, axis=0), one), g.op("Unsqueeze", inside, zero))
    kf = g.op("Reshape", g.f32(k), g.op("Concat", T, g.const([-1]), axis=0))  # [T, Hkv*D]
    Tn = g.dim(tq, 0)
    new_sum = g.op("Reshape", g.op("MatMul", g.op("Cast", w, to=TensorProto.FLOAT), kf),
                   g.op("Concat", Tn, n_new, Hkv, D, axis=0), allowzero=1)  # [Tn, Cn, Hkv, D]
    ck = g.op("Div", g.op("Add", new_sum, past_sum), g.f32(kernel))
    G = g.op("Div", g.dim(qf, 1), Hkv)
    qt = g.op("Reshape", g.op("Gather", qf, tq, axis=0), g.op("Concat", Tn, Hkv, G, D, axis=0), allowzero=1)
    qt = g.op("Mul", qt, g.op("Reciprocal", g.op("Sqrt", g.f32(D))))
    logits = g.op("MatMul", qt, g.op("Transpose", ck, perm=[0, 2, 3, 1]))  # [Tn, Hkv, G, Cn]
    by_query = g.op("Transpose", s_new, perm=[3, 1, 2, 0])  # [T, Hkv, G, Cn]
    by_query = g.op("ScatterND", by_query, g.op("Unsqueeze", tq, one), logits)
    return g.op("Transpose", by_query, perm=[3, 1, 2, 0])


def infllmv2_function() -> onnx.FunctionProto:
    """The reference body of InfLLMv2Attention with standard ops (opset 17)."""
    g = GraphBuilder(prefix="f_")
    names = INFLLMV2["inputs"]
    q, k, v, past_k, past_v, past_ck, pos, attn_mask = names

    attr = g.attr
    stride, block, init = attr("kernel_stride"), attr("block_size"), attr("init_blocks")
    window, topk, dense_len, semantics = attr("window_size"), attr("topk"), attr("dense_len"), attr("semantics")
    kernel = g.op("Mul", stride, g.const([2]))
    one, zero = g.const([1]), g.const([0])
    neg_inf, pos_inf = g.const(-np.inf, np.float32), g.const(np.inf, np.float32)

    def n_chunks(length):  # (length - kernel) // stride + 1, or 0 below one kernel
        return g.op("Where", g.op("Less", length, kernel), zero,
                    g.op("Add", g.op("Div", g.op("Sub", length, kernel), stride), one))

    P, T, Hkv = g.dim(past_k, 0), g.dim(k, 0), g.dim(k, 1)
    S = g.op("Add", P, T)
    # 1. compressed keys completed by the new tokens: pairs of stride-row sums, / kernel.
    first, last = n_chunks(P), n_chunks(S)
    n_new = g.op("Sub", last, first)
    start = g.op("Mul", first, stride)
    tail = g.f32(g.op("Concat", g.op("Slice", past_k, start, P, zero), k, axis=0))
    need = g.op("Mul", g.op("Add", n_new, one), stride)
    short = g.op("Max", g.op("Sub", need, g.dim(tail, 0)), zero)
    tail = g.op("Pad", tail, g.op("Concat", zero, zero, zero, short, zero, zero, axis=0))
    tail = g.op("Slice", tail, zero, need, zero)
    halves = g.op("ReduceSum", g.op("Reshape", tail, g.op("Concat", g.const([-1]), stride, Hkv, g.dim(k, 2), axis=0)),
                  g.const([1]), keepdims=0)
    big = g.const([np.iinfo(np.int64).max])
    ck_new = g.op("Div", g.op("Add", g.op("Slice", halves, zero, n_new, zero), g.op("Slice", halves, one, big, zero)),
                  g.f32(kernel))
    g.nodes.append(helper.make_node("Identity", [ck_new], ["ck_new"]))

    # 2. stage 1: chunk scores [Hkv, G, T, nc] in fp32, past and new chunks scored separately (the
    #    compressed keys are never concatenated); softmax over the visible chunks (last axis),
    #    summed over the group's query heads.
    qf = g.f32(q)
    s_new = tree_chunk_scores(g, grouped_scores(g, ck_new, qf), qf, past_k, k, pos, attn_mask, first, n_new, stride,
                              kernel, P, T)
    s = g.op("Concat", grouped_scores(g, past_ck, qf), s_new, axis=0)  # [nc, Hkv, G, T]
    s = g.op("Transpose", s, perm=[1, 2, 3, 0])
    nc = g.dim(s, 3)
    chunk_index = g.op("Range", g.const(0), g.op("Squeeze", nc), g.const(1))
    chunk_end = g.op("Add", g.op("Mul", chunk_index, g.op("Squeeze", stride)),
                     g.op("Squeeze", g.op("Sub", kernel, one)))
    visible = g.op("LessOrEqual", g.op("Unsqueeze", chunk_end, zero), g.op("Unsqueeze", pos, one))  # [T, nc]
    p = g.op("ReduceSum", g.op("Softmax", g.op("Where", visible, s, neg_inf), axis=-1), one, keepdims=0)
    score = g.op("Where", g.op("IsNaN", p), g.const(0.0, np.float32), p)  # [Hkv, T, nc]; NaN: no visible chunk

    # 3. block scores: max over the block's own chunks and the one before it.
    per = g.op("Div", block, stride)  # 4 chunks per block
    nb = g.op("Div", g.op("Sub", g.op("Add", S, block), one), block)  # ceil(S / block)
    score = g.op("Pad", score, g.op("Concat", zero, zero, zero, zero, zero, g.op("Sub", g.op("Mul", nb, per), nc),
                                    axis=0), neg_inf)
    own = g.op("Reshape", score, g.op("Concat", Hkv, T, nb, per, axis=0))
    tail_chunk = g.op("Squeeze", g.op("Slice", own, g.op("Sub", per, one), per, g.const([3])), g.const([3]))
    before = g.op("Pad", g.op("Slice", tail_chunk, zero, g.op("Sub", nb, one), g.const([2])),
                  g.const([0, 0, 1, 0, 0, 0]), neg_inf)
    blk = g.op("Max", g.op("ReduceMax", own, axes=[3], keepdims=0), before)  # [Hkv, T, nb]

    # 4. selection. v1: window -inf, k = topk, keep b < qb, union the window.
    #    v2: window +inf (one block wider), k = topk + local, keep b <= qb.
    is_v2 = g.op("Equal", semantics, g.const([2]))
    v2 = g.op("Cast", is_v2, to=TensorProto.INT64)
    b = g.op("Range", g.const(0), g.op("Squeeze", nb), g.const(1))  # [nb]
    qb = g.op("Unsqueeze", g.op("Div", pos, g.op("Squeeze", block)), one)  # [T, 1]
    local = g.op("Div", window, block)
    lo = g.op("Sub", g.op("Add", g.op("Sub", qb, local), one), v2)
    in_window = g.op("And", g.op("GreaterOrEqual", b, lo), g.op("LessOrEqual", b, qb))  # [T, nb]
    blk = g.op("Where", g.op("Less", b, init), pos_inf, blk)
    blk = g.op("Where", in_window, g.op("Where", is_v2, pos_inf, neg_inf), blk)
    k_eff = g.op("Min", g.op("Add", topk, g.op("Mul", v2, local)), nb)
    _, top = g.op("TopK", blk, k_eff, axis=-1, largest=1, sorted=1, n_out=2)
    chosen = g.op("ScatterElements", g.op("Expand", g.const(0.0, np.float32), g.op("Shape", blk)), top,
                  g.op("Expand", g.const(1.0, np.float32), g.op("Shape", top)), axis=2)
    chosen = g.op("And", g.op("Cast", chosen, to=TensorProto.BOOL), g.op("Less", b, g.op("Add", qb, v2)))
    chosen = g.op("Or", chosen, g.op("And", in_window, g.op("Not", is_v2)))
    dense = g.op("And", g.op("Less", g.op("Add", g.op("Unsqueeze", pos, one), one), dense_len),
                 g.op("LessOrEqual", b, qb))
    chosen = g.op("Or", chosen, dense)  # [Hkv, T, nb]

    # 5. stage 2, per kv head: the past rows of every block one of the step's queries selected,
    #    gathered head-major [Hkv, R, D] (a decode step reads ~(topk + window) blocks per head, not
    #    P rows). R is 64x the largest block count over the heads; a head with fewer blocks is
    #    padded with unselected ones, masked like rows past the cache end.
    D = g.dim(k, 2)
    G = g.op("Div", g.dim(q, 1), Hkv)
    past_blocks = g.op("Div", g.op("Sub", g.op("Add", P, block), one), block)  # ceil(P / block)
    picked = g.op("ReduceMax", g.op("Cast", chosen, to=TensorProto.FLOAT), axes=[1], keepdims=0)  # [Hkv, nb]
    picked = g.op("Slice", picked, zero, past_blocks, one)  # [Hkv, past blocks]
    n_picked = g.op("Cast", g.op("ReduceMax", g.op("ReduceSum", picked, one, keepdims=0), axes=[0], keepdims=1),
                    to=TensorProto.INT64)
    _, blocks = g.op("TopK", picked, n_picked, axis=-1, largest=1, sorted=1, n_out=2)  # picked ones first
    rows = g.op("Add", g.op("Mul", g.op("Unsqueeze", blocks, g.const([2])), block),
                g.op("Range", g.const(0), g.op("Squeeze", block), g.const(1)))
    rows = g.op("Reshape", rows, g.op("Concat", Hkv, g.const([-1]), axis=0))  # [Hkv, R]
    heads = g.op("Unsqueeze", g.op("Range", g.const(0), g.op("Squeeze", Hkv), g.const(1)), one)
    flat = g.op("Add", g.op("Mul", g.op("Min", rows, g.op("Sub", P, one)), Hkv), heads)  # into past as [P*Hkv, D]

    def gather(past):
        return g.op("Gather", g.op("Reshape", past, g.op("Concat", g.const([-1]), D, axis=0)), flat, axis=0)

    R = g.dim(rows, 1)
    row_block = g.op("Expand", g.op("Unsqueeze", g.op("Div", rows, block), one), g.op("Concat", Hkv, T, R, axis=0))
    past_mask = g.op("And", g.op("Cast", g.op("GatherElements", g.op("Cast", chosen, to=TensorProto.INT32), row_block,
                                               axis=2), to=TensorProto.BOOL),
                     g.op("Unsqueeze", g.op("Less", rows, P), one))  # [Hkv, T, R]
    # A new row belongs to the block of its position (for a draft tree its slot P + j is not its
    # position): visible iff that block is chosen and the step's mask allows it.
    new_block = g.op("Div", pos, g.op("Squeeze", block))
    new_mask = g.op("And", g.op("Gather", chosen, new_block, axis=2), attn_mask)  # [Hkv, T, T]

    # Queries head-major [Hkv, G*T, D], pre-scaled by 1/sqrt(D); scores fp32 [Hkv, G, T, N].
    qh = g.op("Transpose", g.op("Reshape", q, g.op("Concat", T, Hkv, G, D, axis=0)), perm=[1, 2, 0, 3])
    qh = g.op("Mul", g.f32(g.op("Reshape", qh, g.op("Concat", Hkv, g.const([-1]), D, axis=0))),
              g.op("Reciprocal", g.op("Sqrt", g.f32(D))))
    four_d = g.op("Concat", Hkv, G, T, g.const([-1]), axis=0)

    def scores(keys, mask):  # keys [Hkv, N, D], mask [Hkv, T, N]
        s = g.f32(g.op("MatMul", g.op("CastLike", qh, keys), g.op("Transpose", keys, perm=[0, 2, 1])))
        return g.op("Where", g.op("Unsqueeze", mask, one), g.op("Reshape", s, four_d), neg_inf)

    def weighted(p, values):  # p [Hkv, G, T, N] x values [Hkv, N, D] -> [Hkv, G*T, D]
        shape = g.op("Concat", Hkv, g.const([-1]), g.dim(values, 1), axis=0)
        flat_p = g.op("Reshape", g.op("CastLike", p, values), shape,
                      allowzero=1)
        return g.op("MatMul", flat_p, values)

    k_new, v_new = (g.op("Transpose", x, perm=[1, 0, 2]) for x in (k, v))  # [Hkv, T, D]
    probs = g.op("Softmax", g.op("Concat", scores(gather(past_k), past_mask), scores(k_new, new_mask), axis=3), axis=-1)
    three = g.const([3])
    out = g.op("Add", weighted(g.op("Slice", probs, zero, R, three), gather(past_v)),
               weighted(g.op("Slice", probs, R, big, three), v_new))
    out = g.op("Transpose", g.op("Reshape", out, g.op("Concat", Hkv, G, T, D, axis=0)), perm=[2, 0, 1, 3])
    g.nodes.append(helper.make_node("Reshape", [g.op("CastLike", out, q), g.op("Shape", q)], ["out"]))
    return helper.make_function(
        DOMAIN, INFLLMV2["op_type"], names, INFLLMV2["outputs"], g.nodes,
        opset_imports=[helper.make_opsetid("", 17)],
        attributes=INFLLMV2["attributes"] + ["plugin_version", "plugin_namespace"],
    )


# ---- TernaryMatMul -------------------------------------------------------------------------------
def ternary_schema() -> onnx.defs.OpSchema:
    return op_schema(TERNARY, {"packed": "tensor(uint32)"}, "ternary layout",
                     "BitCPM4 ternary matmul (see edgecpm/export/custom_ops.py)")


def ternary_node(g: GraphBuilder, x, packed, scales, in_features: int, group_size: int):
    return g.op(TERNARY["op_type"], x, packed, scales, domain=DOMAIN, in_features=in_features,
                group_size=group_size, plugin_version=PLUGIN_VERSION, plugin_namespace="")


def _unpack_codes(g: GraphBuilder, packed, n, k):
    """uint32 codes [N, K] of packed [N, W]: each code is shifted to the top two bits, then down
    (two BitShifts; BitwiseAnd would need opset 18)."""
    words = g.op("Unsqueeze", packed, g.const([2]))  # [N, W, 1] against the 16 code slots
    top = g.op("BitShift", words, g.const(30 - 2 * np.arange(16), np.uint32), direction="LEFT")
    codes = g.op("BitShift", top, g.const([30], np.uint32), direction="RIGHT")  # [N, W, 16]
    codes = g.op("Reshape", codes, g.op("Concat", n, g.const([-1]), axis=0))
    return g.op("Slice", codes, g.const([0]), k, g.const([1]))


def ternary_function() -> onnx.FunctionProto:
    """The reference body of TernaryMatMul with standard ops (opset 17): unpack the codes,
    dequantize to fp32, one fp32 Gemm, cast to x's dtype."""
    g = GraphBuilder(prefix="t_")
    x, packed, scales = TERNARY["inputs"]

    attr = g.attr
    k, group = attr("in_features"), attr("group_size")
    n = g.dim(packed, 0)
    w = g.op("Sub", g.f32(_unpack_codes(g, packed, n, k)), g.const(1.0, np.float32))
    w = g.op("Reshape", w, g.op("Concat", n, g.const([-1]), group, axis=0))  # [N, K/g, g]
    w = g.op("Mul", w, g.op("Unsqueeze", g.f32(scales), g.const([2])))
    return dequantized_matmul(g, TERNARY, x, g.op("Reshape", w, g.op("Concat", n, k, axis=0)))


def dequantized_matmul(g: GraphBuilder, spec: dict, x, w) -> onnx.FunctionProto:
    """The end of a quantized matmul's reference body: one fp32 Gemm of x by the dequantized weight
    w [N, K], cast back to x's dtype; the function of `spec`'s op."""
    y = g.op("Gemm", g.f32(x), w, transB=1)
    g.nodes.append(helper.make_node("CastLike", [y, x], spec["outputs"]))
    return helper.make_function(
        DOMAIN, spec["op_type"], spec["inputs"], spec["outputs"], g.nodes,
        opset_imports=[helper.make_opsetid("", 17)],
        attributes=spec["attributes"] + ["plugin_version", "plugin_namespace"],
    )
