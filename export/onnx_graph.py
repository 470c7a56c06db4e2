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
    """Appends nodes with fresh output names; initializers go through `weight_sink`."""

    def __init__(self, weight_sink):
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.sink = weight_sink
        self._n = 0
        self._consts: dict[tuple, str] = {}

    def op(self, op_type: str, *inputs: str, n_out: int = 1, **attrs):
        self._n += 1
        outs = [f"{op_type.lower()}_{self._n}" + (f"_{j}" if n_out > 1 else "") for j in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=f"{op_type}_{self._n}", **attrs))
        return outs[0] if n_out == 1 else outs

    def const(self, value, dtype=np.int64) -> str:
        """A small constant (shapes, scalars), deduplicated, stored inline."""
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            name = f"const_{len(self._consts)}"
            self.initializers.append(onnx.numpy_helper.from_array(arr, name))
            self._consts[key] = name
        return self._consts[key]

    def weight(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(self.sink(name, array))
        return name


def build_decoder(cfg: ModelConfig, dtype: str, tensor, weight_sink, progress=None) -> onnx.ModelProto:
    """The decoder graph. `tensor(name)` returns a checkpoint tensor as float32 numpy;
    `weight_sink(name, array)` stores it (external data) and returns its TensorProto."""
    if dtype not in ONNX_DTYPE:
        raise ValueError(f"dtype={dtype!r}: the ONNX bundle supports fp32 and fp16")
    dt, npdt = ONNX_DTYPE[dtype], NUMPY_DTYPE[dtype]
    g = GraphBuilder(weight_sink)
    H, L, D = cfg.hidden_size, cfg.num_hidden_layers, cfg.head_dim
    Hq, Hkv, G = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.group_size

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

    # ---- dynamic sizes and per-step constants ----------------------------------------------
    ids = g.op("Squeeze", "input_ids", g.const([0]))  # [T]
    T = g.op("Shape", ids)  # [1] int64
    GT = g.op("Mul", T, g.const([G]))
    pos = g.op("Cast", g.op("Squeeze", "position_ids", g.const([0])), to=TensorProto.FLOAT)
    angle = g.op("Mul", g.op("Unsqueeze", pos, g.const([1])), g.const(cfg.rope_inv_freq(), np.float32))
    emb = g.op("Concat", angle, angle, axis=-1)  # [T, D] non-interleaved layout
    cos, sin = g.op("Cos", emb), g.op("Sin", emb)
    if cfg.rope_attention_scale != 1.0:
        s = g.const(cfg.rope_attention_scale, np.float32)
        cos, sin = g.op("Mul", cos, s), g.op("Mul", sin, s)
    cos_q, sin_q = (g.op("Reshape", c, g.const([0, 1, 1, D])) for c in (cos, sin))
    cos_k, sin_k = (g.op("Reshape", c, g.const([0, 1, D])) for c in (cos, sin))
    # attn_mask [Tq, Tk] -> [Tk, 1, 1, Tq], the layout of the new-token score block below.
    mask = g.op("Unsqueeze", g.op("Transpose", "attn_mask", perm=[1, 0]), g.const([1, 2]))
    neg_inf = g.const(-np.inf, np.float32)
    diag = g.const([h * Hkv + h for h in range(Hkv)])  # (kv head h, query group h) pairs
    qt_shape = g.op("Concat", g.const([D]), g.op("Mul", GT, g.const([Hkv])), axis=0)
    score_shape = g.op("Concat", g.const([-1, Hkv * Hkv]), GT, axis=0)
    new_shape = g.op("Concat", g.const([-1, Hkv, G]), T, axis=0)
    new_flat = g.op("Concat", g.const([-1, Hkv]), GT, axis=0)
    probs_t_shape = g.op("Concat", g.op("Mul", GT, g.const([Hkv])), g.const([-1]), axis=0)
    out_shape = g.op("Concat", g.const([Hkv, G]), T, g.const([D]), axis=0)
    inv_sqrt_d = g.const(1.0 / math.sqrt(D), np.float32)

    def rope(x, c, s):
        xf = to_f32(x)
        half = [g.op("Slice", xf, g.const([a]), g.const([b]), g.const([-1])) for a, b in ((0, D // 2), (D // 2, D))]
        rotated = g.op("Concat", g.op("Neg", half[1]), half[0], axis=-1)
        return to_dt(g.op("Add", g.op("Mul", xf, c), g.op("Mul", rotated, s)))

    def scores(keys, qt):  # keys [S, Hkv, D] -> [S, Hkv, G*T] fp32, reading keys once, no copy
        flat = g.op("Reshape", keys, g.const([-1, D]))
        s = g.op("Reshape", to_f32(g.op("MatMul", flat, qt)), score_shape)  # [S, Hkv*Hkv, G*T]
        return g.op("Gather", s, diag, axis=1)

    def weighted(probs, values):  # probs [S, Hkv, G*T] fp32, values [S, Hkv, D] -> [Hkv*G*T, Hkv*D]
        pt = g.op("Reshape", g.op("Transpose", to_dt(probs), perm=[1, 2, 0]), probs_t_shape)
        return g.op("MatMul", pt, g.op("Reshape", values, g.const([0, Hkv * D])))

    def attention(x, i):
        p = f"model.layers.{i}.self_attn."
        q = g.op("Reshape", linear(x, p + "q_proj.weight"), g.const([0, Hkv, G, D]))
        k = g.op("Reshape", linear(x, p + "k_proj.weight"), g.const([0, Hkv, D]))
        v = g.op("Reshape", linear(x, p + "v_proj.weight"), g.const([0, Hkv, D]), )
        q, k = rope(q, cos_q, sin_q), rope(k, cos_k, sin_k)
        g.nodes.append(helper.make_node("Identity", [k], [f"key.{i}"]))
        g.nodes.append(helper.make_node("Identity", [v], [f"value.{i}"]))
        # All queries as columns [D, Hkv*G*T], pre-scaled by 1/sqrt(D).
        qt = g.op("Reshape", g.op("Transpose", q, perm=[3, 1, 2, 0]), qt_shape)
        qt = to_dt(g.op("Mul", to_f32(qt), inv_sqrt_d))
        s_past = scores(f"past_key.{i}", qt)
        s_new = g.op("Reshape", scores(k, qt), new_shape)  # [Tk, Hkv, G, Tq]
        s_new = g.op("Reshape", g.op("Where", mask, s_new, neg_inf), new_flat)
        probs = g.op("Softmax", g.op("Concat", s_past, s_new, axis=0), axis=0)
        n_past = g.op("Shape", f"past_key.{i}", start=0, end=1)
        p_past = g.op("Slice", probs, g.const([0]), n_past, g.const([0]))
        p_new = g.op("Slice", probs, n_past, g.const([np.iinfo(np.int64).max]), g.const([0]))
        both = g.op("Add", weighted(p_past, f"past_value.{i}"), weighted(p_new, v))  # [Hkv*G*T, Hkv*D]
        both = g.op("Reshape", both, g.const([Hkv, -1, Hkv, D]))
        both = g.op("Reshape", g.op("Transpose", both, perm=[0, 2, 1, 3]), g.const([Hkv * Hkv, -1, D]))
        out = g.op("Reshape", g.op("Gather", both, diag, axis=0), out_shape)  # [Hkv, G, T, D]
        out = g.op("Reshape", g.op("Transpose", out, perm=[2, 0, 1, 3]), g.const([0, Hq * D]))
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
