"""The MiniCPM4 decoder graph (DESIGN.md §6), built directly with `onnx.helper`.

Why build the graph instead of tracing the torch model with the dynamo exporter:
- weights stream from the checkpoint to the external-data file one tensor at a time, so an 8B
  export never holds the model twice (tracing needs the whole model in memory first);
- the graph's names, layouts and dynamic dims are exactly the contract, with no exporter-version
  surprises, and custom ops (`edgecpm` domain) are plain nodes we place ourselves;
- every op is standard ONNX (opset 17) so onnxruntime and TensorRT's parser both take it.

Attention and the node builder live in `onnx_builder` (shared with the custom ops' functions).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from edgecpm.config import ModelConfig
from edgecpm.export.custom_ops import (
    DOMAIN,
    TERNARY,
    infllmv2_function,
    infllmv2_node,
    register_schemas,
    ternary_function,
    ternary_node,
)
from edgecpm.export.onnx_builder import GraphBuilder, attend
from edgecpm.export.quant_ops import QUANT, dequantize_rows, quant_function, quant_node, register_quant_schema
from edgecpm.export.ternary import (
    TernaryInfo,
    pack,
    ternary_codes,
)

OPSET = 17
ONNX_DTYPE = {"fp32": TensorProto.FLOAT, "fp16": TensorProto.FLOAT16}
NUMPY_DTYPE = {"fp32": np.float32, "fp16": np.float16}


def graph_io(cfg: ModelConfig, dtype: str, n_logits: int | None = None,
             eagle: bool = False) -> tuple[list[dict], list[dict]]:
    """Names, dtypes and shapes of the decoder graph's inputs and outputs (recorded in the manifest).
    n_logits: the logit columns (the vocabulary, or r for an FR-Spec draft head). eagle: the graph
    of an EAGLE head, which also takes the features it drafts from (`hidden_in`)."""
    kv = [cfg.num_key_value_heads, cfg.head_dim]
    inputs = [
        {"name": "input_ids", "dtype": "int64", "shape": [1, "T"]},
        {"name": "position_ids", "dtype": "int64", "shape": [1, "T"]},
        {"name": "attn_mask", "dtype": "bool", "shape": ["T", "T"]},
        {"name": "logit_index", "dtype": "int64", "shape": ["N"]},
    ]
    outputs = [{"name": "logits", "dtype": "float32", "shape": ["N", n_logits or cfg.vocab_size]},
               {"name": "hidden", "dtype": "float32", "shape": ["T", cfg.hidden_size]}]
    if eagle:
        inputs.append({"name": "hidden_in", "dtype": "float32", "shape": ["T", cfg.hidden_size]})
    kvdt = {"fp32": "float32", "fp16": "float16"}[dtype]
    for i in range(cfg.num_hidden_layers):
        inputs += [{"name": f"past_key.{i}", "dtype": kvdt, "shape": ["P", *kv]},
                   {"name": f"past_value.{i}", "dtype": kvdt, "shape": ["P", *kv]}]
        outputs += [{"name": f"key.{i}", "dtype": kvdt, "shape": ["T", *kv]},
                    {"name": f"value.{i}", "dtype": kvdt, "shape": ["T", *kv]}]
        if cfg.sparse:  # InfLLM v2 compressed keys: the past's, and those the step completes
            inputs.append({"name": f"past_ckey.{i}", "dtype": "float32", "shape": ["C", *kv]})
            outputs.append({"name": f"ckey.{i}", "dtype": "float32", "shape": ["Cn", *kv]})
    return inputs, outputs


_IO_TYPES = {"int64": TensorProto.INT64, "bool": TensorProto.BOOL, "float32": TensorProto.FLOAT,
             "float16": TensorProto.FLOAT16}


def build_decoder(cfg: ModelConfig, dtype: str, tensor, weight_sink, progress=None,
                  head_ids: np.ndarray | None = None, ternary: dict[str, TernaryInfo] | None = None,
                  eagle: bool = False, quant=None, head_quant=None) -> onnx.ModelProto:
    """The decoder graph. `tensor(name)` returns a checkpoint tensor as float32 numpy;
    `weight_sink(name, array)` stores it (external data) and returns its TensorProto.
    head_ids: FR-Spec — the LM head keeps only these rows, a separate [r, H] weight, so the last
    matmul of a draft costs r/V of the full one; logit column j is token head_ids[j].
    ternary: linear weights stored packed (edgecpm.export.ternary) as TernaryMatMul nodes, the
    custom op (2-bit codes; TensorRT's plugin, and onnxruntime, which runs them on edgecpm's
    kernel or its own MatMulNBits, rewritten at load: runtimes/ternary_lowering.py).
    eagle: an EAGLE head (export/modeling_eagle.py): `tensor` serves its layers under the decoder's
    names; the input is fc([rmsnorm1(embedding); rmsnorm2(hidden_in)]) and there is no final norm.
    quant: an export.quantize.QuantPlan: its linears stored as int8 / int4 codes (MatMulNBits'
    layout) as QuantMatMul nodes (onnxruntime rewrites them to MatMulNBits at load:
    runtimes/quant_lowering.py); a GPTQ act-order linear first gathers its inputs in group order.
    head_quant: an export.quantize.HeadQuant: the embedding and LM head stored as int8 / int4 codes
    (a tied matrix once); the LM head is a QuantMatMul, the embedding dequantizes the rows it gathers.
    Every graph outputs `hidden` [T, H] float32, the LM head's input for every row."""
    ternary = ternary or {}
    if dtype not in ONNX_DTYPE:
        raise ValueError(f"dtype={dtype!r}: the ONNX bundle supports fp32 and fp16")
    dt, npdt = ONNX_DTYPE[dtype], NUMPY_DTYPE[dtype]
    g = GraphBuilder(weight_sink, model_dtype=dt)
    L, D = cfg.num_hidden_layers, cfg.head_dim
    Hq, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads

    def to_dt(x):  # compute-dtype cast, skipped in fp32
        return x if dt == TensorProto.FLOAT else g.op("Cast", x, to=dt)

    def to_f32(x):
        return x if dt == TensorProto.FLOAT else g.op("Cast", x, to=TensorProto.FLOAT)

    def scalar(v):
        return g.const(v, npdt)

    def linear(x, name):  # x [T, in] @ W^T, W stored pre-transposed as [in, out]
        if name in ternary:
            return ternary_linear(x, name, ternary[name])
        if quant is not None and name in quant.infos:
            return quant_linear(x, name, quant.infos[name])
        return g.op("MatMul", x, g.weight(name, np.ascontiguousarray(tensor(name).T).astype(npdt)))

    def ternary_linear(x, name, info):  # codes + scales, named after the dense weight
        codes, scales = ternary_codes(tensor(name), info)
        base = name.removesuffix(".weight")
        s = g.weight(base + ".scales", scales.astype(npdt))
        return ternary_node(g, x, g.weight(base + ".packed", pack(codes)), s, info.shape[1], info.group_size)

    def quant_linear(x, name, info):  # codes, scales, zeros, named after the dense weight
        c = quant.codes(name, tensor)
        base = name.removesuffix(".weight")
        if c.perm is not None:  # GPTQ act-order: the stored weight's inputs in group order
            x = g.op("Gather", x, g.weight(base + ".perm", c.perm.astype(np.int64)), axis=1)
        codes = g.weight(base + ".codes", c.codes)
        scales = g.weight(base + ".scales", c.scales.astype(npdt))
        zeros = g.weight(base + ".zeros", c.zeros)
        return quant_node(g, x, codes, scales, zeros, info.shape[1], info.bits, info.block_size)

    def rms_norm(x, name):
        # Written as Pow -> ReduceMean -> Add -> Sqrt -> Div -> Mul: the pattern onnxruntime fuses
        # into one SimplifiedLayerNormalization kernel (fp32 inside).
        xf = to_f32(x)
        var = g.op("ReduceMean", g.op("Pow", xf, g.const(2.0, np.float32)), axes=[-1], keepdims=1)
        rms = g.op("Sqrt", g.op("Add", var, g.const(cfg.rms_norm_eps, np.float32)))
        return g.op("Mul", to_dt(g.op("Div", xf, rms)), g.weight(name, tensor(name).astype(npdt)))

    # ---- per-step values shared by all layers ------------------------------------------------
    # The step's dynamic sizes, read once: every layer's attention shapes derive from these two.
    T, P = g.dim("input_ids", 1), g.dim("past_key.0", 0)
    ids = g.op("Squeeze", "input_ids", g.const([0]))  # [T]
    positions = g.op("Squeeze", "position_ids", g.const([0]))  # [T] int64
    pos = g.op("Cast", positions, to=TensorProto.FLOAT)
    angle = g.op("Mul", g.op("Unsqueeze", pos, g.const([1])), g.const(cfg.rope_inv_freq(), np.float32))
    emb = g.op("Concat", angle, angle, axis=-1)  # [T, D] non-interleaved layout
    cos, sin = g.op("Cos", emb), g.op("Sin", emb)
    if cfg.rope_attention_scale != 1.0:
        s = g.const(cfg.rope_attention_scale, np.float32)
        cos, sin = g.op("Mul", cos, s), g.op("Mul", sin, s)
    # rotate_half(x) * sin = concat(x2, x1) * concat(-sin, sin): the sign lives in sin, once.
    sin = g.op("Mul", sin, g.const(np.repeat([-1.0, 1.0], D // 2).astype(np.float32), np.float32))
    cos, sin = (g.op("Unsqueeze", c, g.const([1])) for c in (cos, sin))  # [T, 1, D] over heads
    # attn_mask [Tq, Tk] -> [Tk, 1, 1, Tq], the layout of attend()'s new-token score block.
    new_mask = g.op("Unsqueeze", g.op("Transpose", "attn_mask", perm=[1, 0]), g.const([1, 2]))

    def rope(x):
        xf = to_f32(x)
        half = [g.op("Slice", xf, g.const([a]), g.const([b]), g.const([-1])) for a, b in ((0, D // 2), (D // 2, D))]
        rotated = g.op("Concat", half[1], half[0], axis=-1)
        return to_dt(g.op("Add", g.op("Mul", xf, cos), g.op("Mul", rotated, sin)))

    def attention(x, i):
        p = f"model.layers.{i}.self_attn."
        q = rope(g.op("Reshape", linear(x, p + "q_proj.weight"), g.const([0, Hq, D])))
        k = rope(g.op("Reshape", linear(x, p + "k_proj.weight"), g.const([0, Hkv, D])))
        v = g.op("Reshape", linear(x, p + "v_proj.weight"), g.const([0, Hkv, D]))
        g.set_shape(q, [T, Hq, D])
        for t in (k, v):
            g.set_shape(t, [T, Hkv, D])
        for t in (f"past_key.{i}", f"past_value.{i}"):
            g.set_shape(t, [P, Hkv, D])
        g.nodes.append(helper.make_node("Identity", [k], [f"key.{i}"]))
        g.nodes.append(helper.make_node("Identity", [v], [f"value.{i}"]))
        if cfg.sparse is None:
            out = attend(g, q, k, v, f"past_key.{i}", f"past_value.{i}", new_mask)
        else:
            out, ck = infllmv2_node(g, q, k, v, f"past_key.{i}", f"past_value.{i}", f"past_ckey.{i}", positions,
                                    "attn_mask", cfg.sparse)
            out = g.op("Reshape", out, g.const([0, Hq * D]))
            g.nodes.append(helper.make_node("Identity", [ck], [f"ckey.{i}"]))
        return linear(out, p + "o_proj.weight")

    def mlp(x, i):
        p = f"model.layers.{i}.mlp."
        gate = linear(x, p + "gate_proj.weight")
        act = g.op("Mul", gate, g.op("Sigmoid", gate))  # silu
        return linear(g.op("Mul", act, linear(x, p + "up_proj.weight")), p + "down_proj.weight")

    def quantized_matrix(name, w=None):  # (codes, scales, zeros) of a vocabulary-sized matrix, named after it
        c = head_quant.quantize(name, tensor(name) if w is None else w)
        base = name.removesuffix(".weight")
        return (g.weight(base + ".codes", c.codes), g.weight(base + ".scales", c.scales.astype(npdt)),
                g.weight(base + ".zeros", c.zeros))

    def embedding(ids):
        if head_quant is None:
            return g.op("Gather", embed, ids, axis=0)
        codes, scales, zeros = embed
        # The scales and zeros read back as [V, ...] whatever their stored dims (onnxruntime's
        # MatMulNBits rewrite declares them 1-D).
        rows = [g.op("Gather", codes, ids, axis=0),
                g.op("Gather", g.op("Reshape", scales, g.const([cfg.vocab_size, -1])), ids, axis=0),
                g.op("Gather", g.op("Reshape", zeros, g.const([cfg.vocab_size, -1])), ids, axis=0)]
        return to_dt(dequantize_rows(g, *rows, g.const([cfg.hidden_size]), g.const([head_quant.bits])))

    def lm_head(h, head):  # [N, H] x [V, H]^T: a tied matrix is shared with the embedding
        if head_quant is None:
            return g.op("Gemm", h, head, transB=1)
        return quant_node(g, h, *head, cfg.hidden_size, head_quant.bits, head_quant.block_size)

    # ---- the forward of DESIGN.md §4 ----------------------------------------------------------
    if head_quant is None:
        embed = g.weight("model.embed_tokens.weight", tensor("model.embed_tokens.weight").astype(npdt))
    else:
        embed = quantized_matrix("model.embed_tokens.weight")
    h = g.op("Mul", embedding(ids), scalar(cfg.scale_emb))
    if eagle:
        tokens, features = rms_norm(h, "model.input_norm1.weight"), rms_norm("hidden_in", "model.input_norm2.weight")
        both = g.op("Concat", tokens, features,
                    axis=-1)
        h = linear(both, "model.fc.weight")
    res = scalar(cfg.eagle_residual_scale if eagle else cfg.residual_scale)
    for i in range(L):
        h = g.op("Add", h, g.op("Mul", attention(rms_norm(h, f"model.layers.{i}.input_layernorm.weight"), i), res))
        h = g.op("Add", h, g.op("Mul", mlp(rms_norm(h, f"model.layers.{i}.post_attention_layernorm.weight"), i), res))
        if progress:
            progress(i + 1, L)
    # `hidden`: the LM head's input for every row (an EAGLE head's output has no final norm).
    hidden = g.op("Div", h if eagle else rms_norm(h, "model.norm.weight"), scalar(cfg.logit_divisor))
    g.nodes.append(helper.make_node("Identity", [to_f32(hidden)], ["hidden"]))
    h = g.op("Gather", hidden, "logit_index", axis=0)
    head_name = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
    if head_ids is not None:
        rows = tensor(head_name)[head_ids]
        if head_quant is None:
            head = g.weight("lm_head.frspec", rows.astype(npdt))
        else:
            head = quantized_matrix("lm_head.frspec", rows)
    elif cfg.tie_word_embeddings:
        head = embed
    elif head_quant is None:
        head = g.weight("lm_head.weight", tensor("lm_head.weight").astype(npdt))
    else:
        head = quantized_matrix("lm_head.weight")
    logits = to_f32(lm_head(h, head))
    g.nodes.append(helper.make_node("Identity", [logits], ["logits"]))

    inputs, outputs = graph_io(cfg, dtype, None if head_ids is None else len(head_ids), eagle)

    def vinfo(d):
        return helper.make_tensor_value_info(d["name"], _IO_TYPES[d["dtype"]], d["shape"])

    graph = helper.make_graph(g.nodes, "minicpm4_decoder", [vinfo(d) for d in inputs],
                              [vinfo(d) for d in outputs], initializer=g.initializers)
    opsets, functions = [helper.make_opsetid("", OPSET)], []
    if cfg.sparse:
        functions.append(infllmv2_function())
    if any(n.op_type == TERNARY["op_type"] for n in g.nodes):
        functions.append(ternary_function())
    if any(n.op_type == QUANT["op_type"] and n.domain == DOMAIN for n in g.nodes):
        functions.append(quant_function())
        register_quant_schema()
    if functions:
        register_schemas()
        opsets.append(helper.make_opsetid(DOMAIN, 1))
    if any(n.domain == "com.microsoft" for n in g.nodes):
        opsets.append(helper.make_opsetid("com.microsoft", 1))
    model = helper.make_model(graph, opset_imports=opsets, functions=functions, producer_name="edgecpm")
    model.ir_version = 8  # readable by onnxruntime >= 1.14 and TensorRT 8.6+
    return model
