"""The MiniCPM4 decoder graph (DESIGN.md §6), built directly with `onnx.helper`.

Why build the graph instead of tracing the torch model with the dynamo exporter:
- weights stream from the checkpoint to the external-data file one tensor at a time, so an 8B
  export never holds the model twice (tracing needs the whole model in memory first);
- the graph's names, layouts and dynamic dims are exactly the contract, with no exporter-version
  surprises, and custom ops (`edgecpm` domain) are plain nodes we place ourselves;
- every op is standard ONNX (opset 17) so onnxruntime and TensorRT's parser both take it.

Attention reads the token-major cache [P, Hkv, D] without copying or transposing it: viewed as
[P*Hkv, D] it is the left operand of one MatMul against all queries ([D, Hkv*G*T]). That scores
every kv head against every query group (Hkv times the needed multiply-adds — 2x for MiniCPM4's
two kv heads) and a Gather keeps the matching (kv head, group) pairs. Decoding is bound by reading
the cache, so reading it once beats the copy a Transpose/Einsum would make. Values work the same
way. Past and new score blocks share one softmax; their weighted sums are added (never a concat
of the cache).
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import TensorProto, helper

from edgecpm.config import ModelConfig

OPSET = 17
ONNX_DTYPE = {"fp32": TensorProto.FLOAT, "fp16": TensorProto.FLOAT16}
NUMPY_DTYPE = {"fp32": np.float32, "fp16": np.float16}


def graph_io(cfg: ModelConfig, dtype: str) -> tuple[list[dict], list[dict]]:
    """Names, dtypes and shapes of the decoder graph's inputs and outputs (recorded in the manifest)."""
    kv = [cfg.num_key_value_heads, cfg.head_dim]
    inputs = [
        {"name": "input_ids", "dtype": "int64", "shape": [1, "T"]},
        {"name": "position_ids", "dtype": "int64", "shape": [1, "T"]},
        {"name": "attn_mask", "dtype": "bool", "shape": ["T", "T"]},
        {"name": "logit_index", "dtype": "int64", "shape": ["N"]},
    ]
    outputs = [{"name": "logits", "dtype": "float32", "shape": ["N", cfg.vocab_size]}]
    kvdt = {"fp32": "float32", "fp16": "float16"}[dtype]
    for i in range(cfg.num_hidden_layers):
        inputs += [{"name": f"past_key.{i}", "dtype": kvdt, "shape": ["P", *kv]},
                   {"name": f"past_value.{i}", "dtype": kvdt, "shape": ["P", *kv]}]
        outputs += [{"name": f"key.{i}", "dtype": kvdt, "shape": ["T", *kv]},
                    {"name": f"value.{i}", "dtype": kvdt, "shape": ["T", *kv]}]
    return inputs, outputs


_IO_TYPES = {"int64": TensorProto.INT64, "bool": TensorProto.BOOL, "float32": TensorProto.FLOAT,
             "float16": TensorProto.FLOAT16}


class GraphBuilder:
    """Appends nodes with fresh output names. Inside a graph, constants and weights become
    initializers (weights through `weight_sink`); inside a function body (no sink) constants
    become Constant nodes, since functions cannot hold initializers."""

    def __init__(self, weight_sink=None, prefix: str = ""):
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.sink = weight_sink
        self.prefix = prefix
        self._n = 0
        self._consts: dict[tuple, str] = {}

    def op(self, op_type: str, *inputs: str, n_out: int = 1, domain: str = "", **attrs):
        self._n += 1
        base = f"{self.prefix}{op_type.lower()}_{self._n}"
        outs = [base + (f"_{j}" if n_out > 1 else "") for j in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=base, domain=domain, **attrs))
        return outs[0] if n_out == 1 else outs

    def const(self, value, dtype=np.int64) -> str:
        """A small constant (shapes, scalars), deduplicated."""
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            name = f"{self.prefix}const_{len(self._consts)}"
            tensor = onnx.numpy_helper.from_array(arr, name)
            if self.sink is None:
                self.nodes.append(helper.make_node("Constant", [], [name], value=tensor))
            else:
                self.initializers.append(tensor)
            self._consts[key] = name
        return self._consts[key]

    def weight(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(self.sink(name, array))
        return name

    def dim(self, x: str, axis: int) -> str:
        """x.shape[axis] as an int64 [1] tensor."""
        return self.op("Shape", x, start=axis, end=axis + 1)

    def f32(self, x: str) -> str:
        return self.op("Cast", x, to=TensorProto.FLOAT)


def grouped_scores(g: GraphBuilder, keys: str, q: str) -> str:
    """q·k / sqrt(D) for every key row, kv head, query head of its group and query: fp32
    [S, Hkv, G, T]. keys [S, Hkv, D] (token-major) are the left operand, viewed as [S*Hkv, D]:
    read once and never copied (see the module docstring); q is [T, Hq, D]."""
    T, Hq, Hkv, D = g.dim(q, 0), g.dim(q, 1), g.dim(keys, 1), g.dim(keys, 2)
    G = g.op("Div", Hq, Hkv)
    # Flat index of (kv head h, query group h) among the Hkv x Hkv pairs the MatMul scores.
    diag = g.op("Mul", g.op("Range", g.const(0), g.op("Squeeze", Hkv), g.const(1)), g.op("Add", Hkv, g.const([1])))
    # All queries as columns [D, Hkv*G*T], pre-scaled by 1/sqrt(D).
    q4 = g.op("Reshape", q, g.op("Concat", T, Hkv, G, D, axis=0))
    qt = g.op("Reshape", g.op("Transpose", q4, perm=[3, 1, 2, 0]), g.op("Concat", D, g.const([-1]), axis=0))
    qt = g.op("CastLike", g.op("Mul", g.f32(qt), g.op("Reciprocal", g.op("Sqrt", g.f32(D)))), q)
    rows = g.op("Reshape", keys, g.op("Concat", g.const([-1]), D, axis=0))
    s = g.f32(g.op("MatMul", rows, qt))  # [S*Hkv, Hkv*G*T]
    s = g.op("Reshape", s, g.op("Concat", g.const([-1]), g.op("Mul", Hkv, Hkv), G, T, axis=0))
    return g.op("Gather", s, diag, axis=1)


def attend(g: GraphBuilder, q, k, v, past_k, past_v, new_mask, past_mask=None):
    """GQA attention of new queries over past + new keys (any dtype, any head counts).

    q [T, Hq, D]; k, v [T, Hkv, D]; past_k, past_v [P, Hkv, D]; new_mask bool broadcastable to
    [Tk, Hkv, 1, Tq] (visibility among the new tokens); past_mask, if given, [P, Hkv, 1, Tq].
    Past and new score blocks share one fp32 softmax; their weighted sums are added, so the
    cache is never concatenated. Returns [T, Hq*D] in q's dtype.
    """
    T, Hkv, D = g.dim(q, 0), g.dim(k, 1), g.dim(k, 2)
    neg_inf = g.const(-np.inf, np.float32)
    s_past = grouped_scores(g, past_k, q)
    if past_mask is not None:
        s_past = g.op("Where", past_mask, s_past, neg_inf)
    s_new = g.op("Where", new_mask, grouped_scores(g, k, q), neg_inf)
    probs = g.op("Softmax", g.op("Concat", s_past, s_new, axis=0), axis=0)  # [S, Hkv, G, T]
    n_past = g.dim(past_k, 0)
    n_queries = g.op("Mul", g.dim(q, 1), T)  # Hq*T = Hkv*G*T score columns

    def weighted(first, count, values):  # probs rows [first, first+count) x values -> [Hkv*G*T, Hkv*D]
        p = g.op("Slice", probs, first, g.op("Add", first, count), g.const([0]))
        pt = g.op("Transpose", g.op("CastLike", p, q), perm=[1, 2, 3, 0])
        # count may be 0 (first prefill): explicit dims with allowzero, since -1 or a 0 would not work.
        pt = g.op("Reshape", pt, g.op("Concat", n_queries, count, axis=0), allowzero=1)
        return g.op("MatMul", pt, g.op("Reshape", values, g.op("Concat", g.const([0]), g.op("Mul", Hkv, D), axis=0)))

    both = g.op("Add", weighted(g.const([0]), n_past, past_v), weighted(n_past, T, v))  # [Hkv*G*T, Hkv*D]
    # Keep the blocks where the query's kv head equals the value's kv head.
    diag = g.op("Mul", g.op("Range", g.const(0), g.op("Squeeze", Hkv), g.const(1)), g.op("Add", Hkv, g.const([1])))
    both = g.op("Reshape", both, g.op("Concat", Hkv, g.const([-1]), Hkv, D, axis=0))
    both = g.op("Reshape", g.op("Transpose", both, perm=[0, 2, 1, 3]),
                g.op("Concat", g.op("Mul", Hkv, Hkv), g.const([-1]), D, axis=0))
    out = g.op("Reshape", g.op("Gather", both, diag, axis=0), g.op("Concat", Hkv, g.const([-1]), T, D, axis=0))
    return g.op("Reshape", g.op("Transpose", out, perm=[2, 0, 1, 3]), g.op("Concat", T, g.const([-1]), axis=0))


def build_decoder(cfg: ModelConfig, dtype: str, tensor, weight_sink, progress=None) -> onnx.ModelProto:
    """The decoder graph. `tensor(name)` returns a checkpoint tensor as float32 numpy;
    `weight_sink(name, array)` stores it (external data) and returns its TensorProto."""
    if dtype not in ONNX_DTYPE:
        raise ValueError(f"dtype={dtype!r}: the ONNX bundle supports fp32 and fp16")
    dt, npdt = ONNX_DTYPE[dtype], NUMPY_DTYPE[dtype]
    g = GraphBuilder(weight_sink)
    H, L, D = cfg.hidden_size, cfg.num_hidden_layers, cfg.head_dim
    Hq, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads

    def to_dt(x):  # compute-dtype cast, skipped in fp32
        return x if dt == TensorProto.FLOAT else g.op("Cast", x, to=dt)

    def to_f32(x):
        return x if dt == TensorProto.FLOAT else g.op("Cast", x, to=TensorProto.FLOAT)

    def scalar(v):
        return g.const(v, npdt)

    def linear(x, name):  # x [T, in] @ W^T, W stored pre-transposed as [in, out]
        return g.op("MatMul", x, g.weight(name, np.ascontiguousarray(tensor(name).T).astype(npdt)))

    def rms_norm(x, name):
        xf = to_f32(x)
        var = g.op("ReduceMean", g.op("Mul", xf, xf), axes=[-1], keepdims=1)
        inv = g.op("Reciprocal", g.op("Sqrt", g.op("Add", var, g.const(cfg.rms_norm_eps, np.float32))))
        return g.op("Mul", to_dt(g.op("Mul", xf, inv)), g.weight(name, tensor(name).astype(npdt)))

    # ---- per-step values shared by all layers ------------------------------------------------
    ids = g.op("Squeeze", "input_ids", g.const([0]))  # [T]
    pos = g.op("Cast", g.op("Squeeze", "position_ids", g.const([0])), to=TensorProto.FLOAT)
    angle = g.op("Mul", g.op("Unsqueeze", pos, g.const([1])), g.const(cfg.rope_inv_freq(), np.float32))
    emb = g.op("Concat", angle, angle, axis=-1)  # [T, D] non-interleaved layout
    cos, sin = g.op("Cos", emb), g.op("Sin", emb)
    if cfg.rope_attention_scale != 1.0:
        s = g.const(cfg.rope_attention_scale, np.float32)
        cos, sin = g.op("Mul", cos, s), g.op("Mul", sin, s)
    cos, sin = (g.op("Unsqueeze", c, g.const([1])) for c in (cos, sin))  # [T, 1, D] over heads
    # attn_mask [Tq, Tk] -> [Tk, 1, 1, Tq], the layout of attend()'s new-token score block.
    new_mask = g.op("Unsqueeze", g.op("Transpose", "attn_mask", perm=[1, 0]), g.const([1, 2]))

    def rope(x):
        xf = to_f32(x)
        half = [g.op("Slice", xf, g.const([a]), g.const([b]), g.const([-1])) for a, b in ((0, D // 2), (D // 2, D))]
        rotated = g.op("Concat", g.op("Neg", half[1]), half[0], axis=-1)
        return to_dt(g.op("Add", g.op("Mul", xf, cos), g.op("Mul", rotated, sin)))

    def attention(x, i):
        p = f"model.layers.{i}.self_attn."
        q = rope(g.op("Reshape", linear(x, p + "q_proj.weight"), g.const([0, Hq, D])))
        k = rope(g.op("Reshape", linear(x, p + "k_proj.weight"), g.const([0, Hkv, D])))
        v = g.op("Reshape", linear(x, p + "v_proj.weight"), g.const([0, Hkv, D]))
        g.nodes.append(helper.make_node("Identity", [k], [f"key.{i}"]))
        g.nodes.append(helper.make_node("Identity", [v], [f"value.{i}"]))
        out = attend(g, q, k, v, f"past_key.{i}", f"past_value.{i}", new_mask)
        return linear(out, p + "o_proj.weight")

    def mlp(x, i):
        p = f"model.layers.{i}.mlp."
        gate = linear(x, p + "gate_proj.weight")
        act = g.op("Mul", gate, g.op("Sigmoid", gate))  # silu
        return linear(g.op("Mul", act, linear(x, p + "up_proj.weight")), p + "down_proj.weight")

    # ---- the forward of DESIGN.md §4 ----------------------------------------------------------
    embed = g.weight("model.embed_tokens.weight", tensor("model.embed_tokens.weight").astype(npdt))
    h = g.op("Mul", g.op("Gather", embed, ids, axis=0), scalar(cfg.scale_emb))
    res = scalar(cfg.residual_scale)
    for i in range(L):
        h = g.op("Add", h, g.op("Mul", attention(rms_norm(h, f"model.layers.{i}.input_layernorm.weight"), i), res))
        h = g.op("Add", h, g.op("Mul", mlp(rms_norm(h, f"model.layers.{i}.post_attention_layernorm.weight"), i), res))
        if progress:
            progress(i + 1, L)
    h = g.op("Gather", h, "logit_index", axis=0)
    h = g.op("Div", rms_norm(h, "model.norm.weight"), scalar(cfg.logit_divisor))
    head = embed if cfg.tie_word_embeddings else g.weight("lm_head.weight", tensor("lm_head.weight").astype(npdt))
    logits = to_f32(g.op("Gemm", h, head, transB=1))  # [N, H] x [V, H]^T: the tied matrix is shared
    g.nodes.append(helper.make_node("Identity", [logits], ["logits"]))

    inputs, outputs = graph_io(cfg, dtype)

    def vinfo(d):
        return helper.make_tensor_value_info(d["name"], _IO_TYPES[d["dtype"]], d["shape"])

    graph = helper.make_graph(g.nodes, "minicpm4_decoder", [vinfo(d) for d in inputs],
                              [vinfo(d) for d in outputs], initializer=g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="edgecpm")
    model.ir_version = 8  # readable by onnxruntime >= 1.14 and TensorRT 8.6+
    return model
