"""`edgecpm build` for int8 / int4 bundles, host side: the TensorRT graph rewrite of QuantMatMul and
the quantized embedding (export/trt_quant.py) into DequantizeLinear (opset 21, signed INT4 / INT8
weights, blocked or per channel) + MatMul / Gather, with the zero points put back exactly.

Checked here with onnxruntime on CPU: the rewritten graph (no QuantMatMul, no BitShift, no uint8
weight left) against the bundle on edgecpm's normal onnxruntime backend, logits and greedy tokens,
and the weight bytes it keeps. Not executed on TensorRT here (no TensorRT, no GPU on this machine)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import onnx
import pytest
from conftest import rel_err
from onnx import TensorProto, helper, numpy_helper

import edgecpm
from edgecpm.errors import BundleError
from edgecpm.export import trt_build as tb
from edgecpm.export import trt_quant as tq

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("torch")
from edgecpm.export.exporter import export_bundle

PROMPT = [1, 17, 300, 5, 42, 99, 7, 250]
PARITY = 1e-4
WIDE = {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2}


def _feeds(manifest: dict, ids: list[int]) -> dict:
    cfg = manifest["config"]
    t = len(ids)
    hkv = cfg["num_key_value_heads"]
    d = cfg["hidden_size"] // cfg["num_attention_heads"]
    feeds = {"input_ids": np.array([ids]), "position_ids": np.arange(t)[None],
             "attn_mask": np.tril(np.ones((t, t), bool)), "logit_index": np.arange(t)}
    for i in range(cfg["num_hidden_layers"]):
        feeds[f"past_key.{i}"] = feeds[f"past_value.{i}"] = np.zeros((0, hkv, d), np.dtype(
            "float16" if manifest["dtype"] == "fp16" else "float32"))
    return feeds


def _session(path):
    """The graph exactly as written: onnxruntime's own DQ -> MatMulNBits fusion would round the
    activations to int8 (its default accuracy level for that fusion), which is not what the graph says."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _greedy(sess, manifest, ids, n):
    ids = list(ids)
    for _ in range(n):
        logits = sess.run(["logits"], _feeds(manifest, ids))[0]
        ids.append(int(logits[-1].argmax()))
    return ids[-n:]


def _rewrite(bundle):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the notes on TensorRT's documented limits: asserted from `changes`
        return tb.write_trt_graph(bundle, "decoder.onnx")


def _check_weights(path, bundle, manifest):
    """The rewritten graph keeps the quantized matrices at 4 / 8 bits: every DequantizeLinear reads a
    signed INT4 / INT8 initializer of bits / 8 bytes a weight, and the only new float initializers
    are their scales and zero-point terms (at most one value per block of 16 weights each: no dense
    copy of a matrix)."""
    model = onnx.load(str(path), load_external_data=False)
    original = {t.name for t in onnx.load(str(bundle / "decoder.onnx"), load_external_data=False).graph.initializer}
    inits = {t.name: t for t in model.graph.initializer}
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert dq
    weights, nbytes, scale_elems = 0, 0, 0
    for n in dq:
        t = inits[n.input[0]]
        bits = {TensorProto.INT4: 4, TensorProto.INT8: 8}[t.data_type]
        count = int(np.prod(t.dims))
        length = int(next(e.value for e in t.external_data if e.key == "length"))
        assert length == count * bits // 8  # bytes per weight
        weights += count
        nbytes += length
        scale_elems += int(np.prod(inits[n.input[1]].dims))
    q = manifest["quantization"]
    head = manifest["lm_head"]
    head_weights = sum(np.prod(v["shape"]) for v in head["tensors"].values()) if head else 0
    tied = manifest["config"]["tie_word_embeddings"] and head is not None
    assert weights == q["weights"] + head_weights * (2 if tied else 1)  # a tied matrix: rows + [H, V]
    new_float = sum(int(np.prod(t.dims)) for t in model.graph.initializer
                    if t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16) and t.name not in original)
    assert scale_elems * 16 <= weights and new_float <= 2 * scale_elems
    for t in model.graph.initializer:
        assert t.data_type != TensorProto.UINT8, t.name  # TensorRT takes no uint8 weights
    return nbytes


@pytest.mark.parametrize(("mode", "group", "lm_head", "wide"), [
    ("int4", 64, "int8", False),  # asymmetric RTN, blocks of 64 (TensorRT's size); int8 head per channel
    ("int4", 32, "int8", False),  # blocks of 32: runs, with a note on TensorRT's documented sizes
    ("int4", -1, "int4", False),  # one group per row (blocks 64 / 128), int4 head and embedding
    ("int4", 16, "int4", True),  # hidden 256: int4 head / embedding with two blocks a row
    ("int8", -1, "int8", False),  # int8 per channel everywhere
    ("int8", 32, "int8", True),  # int8 with groups: blocked INT8; int8 head with two blocks a row
])
def test_rewritten_graph_matches_the_bundle(make_checkpoint, tmp_path, mode, group, lm_head, wide):
    ckpt = make_checkpoint(tie=not wide, **(WIDE if wide else {}))
    bundle = export_bundle(ckpt, tmp_path / "b", quantize=mode, quantize_group_size=group, lm_head=lm_head,
                           progress=False)
    manifest = json.loads((bundle / "manifest.json").read_text())
    path, changes = _rewrite(bundle)
    q = changes["quantized"]
    print(f"{mode} group {group} head {lm_head}: {json.dumps(q)}")
    model = onnx.load(str(path), load_external_data=False)
    ops = {(n.domain, n.op_type) for n in model.graph.node}
    assert ("edgecpm", "QuantMatMul") not in ops and ("", "BitShift") not in ops
    assert not model.functions and model.opset_import[0].version == 21 and model.ir_version >= 10
    onnx.checker.check_model(str(path), full_check=True)
    n_quant = manifest["quantization"]["count"] + 1  # the linears and the LM head
    assert q["int4"] + q["int8"] + q["int8_per_channel"] == n_quant
    assert q["embeddings"] == 1 and q["zero_point_terms"] == n_quant + 1  # RTN is asymmetric everywhere
    if mode == "int8" and group == -1:
        assert q["int8_per_channel"] == n_quant and not q["notes"]
    if group in (16, 32):
        assert q["notes"]
    nbytes = _check_weights(path, bundle, manifest)
    assert (bundle / tb.TRT_DATA).stat().st_size >= nbytes

    sess = _session(path)
    s = edgecpm.Session(bundle, backend="onnxruntime")
    ref = s.logits(PROMPT)
    got = sess.run(["logits"], _feeds(manifest, PROMPT))[0]
    err = rel_err(got[-len(ref):], ref)
    print(f"  rewritten graph (onnxruntime, DequantizeLinear as written) vs the bundle: rel err {err:.2e}")
    assert err <= PARITY
    tokens = s.generate(PROMPT, max_new_tokens=6, ignore_eos=True).token_ids
    assert _greedy(sess, manifest, PROMPT, 6) == tokens


@pytest.mark.parametrize(("mode", "group", "lm_head"), [("int4", 64, "int8"), ("int4", 32, "int4"),
                                                     ("int8", -1, "int8")])
def test_fp16_bundle(make_checkpoint, tmp_path, mode, group, lm_head):
    """An fp16 bundle: the Dequantize outputs fp16 (the scales' type), the MatMuls run in fp16 as the
    strongly typed engine would. Measured: ~4e-4 from the bundle on onnxruntime, about what the
    bundle's own graph and its onnxruntime kernels differ by (~3e-4); greedy tokens identical."""
    bundle = export_bundle(make_checkpoint(), tmp_path / "b", dtype="fp16", quantize=mode, quantize_group_size=group,
                           lm_head=lm_head, progress=False)
    manifest = json.loads((bundle / "manifest.json").read_text())
    path, _ = _rewrite(bundle)
    model = onnx.load(str(path), load_external_data=False)
    inits = {t.name: t for t in model.graph.initializer}
    assert all(inits[n.input[1]].data_type == TensorProto.FLOAT16 for n in model.graph.node
               if n.op_type == "DequantizeLinear")
    _check_weights(path, bundle, manifest)
    sess = _session(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = edgecpm.Session(bundle, backend="onnxruntime")
    ref = s.logits(PROMPT)
    got = sess.run(["logits"], _feeds(manifest, PROMPT))[0]
    assert rel_err(got[-len(ref):], ref) <= 2e-3
    assert _greedy(sess, manifest, PROMPT, 6) == s.generate(PROMPT, max_new_tokens=6, ignore_eos=True).token_ids


@pytest.mark.parametrize("desc_act", [False, True])
def test_symmetric_checkpoint_needs_no_zero_point_term(tmp_path, desc_act):
    """GPTQ sym (every zero point 8): the signed INT4 weights alone are the matrix; act-order's
    Gather of the activations stays in front of the MatMul."""
    from test_quantized_import import write_quantized

    q, _ = write_quantized(tmp_path / "q", tmp_path / "ref", "gptq", 64, sym=True, desc_act=desc_act)
    bundle = export_bundle(q, tmp_path / "b", quantize="int4", lm_head="dense", progress=False)
    manifest = json.loads((bundle / "manifest.json").read_text())
    path, changes = _rewrite(bundle)
    assert changes["quantized"]["int4"] == 14 and changes["quantized"]["zero_point_terms"] == 0
    assert changes["quantized"]["embeddings"] == 0 and not changes["quantized"]["notes"]
    got = _session(path).run(["logits"], _feeds(manifest, PROMPT))[0]
    ref = edgecpm.Session(bundle, backend="onnxruntime").logits(PROMPT)
    assert rel_err(got[-len(ref):], ref) <= PARITY


def test_signed_bytes_layout():
    """ONNX INT4: q - 8 two a byte, the first element in the low nibble (onnx reads it back)."""
    q = np.array([[0, 15, 8, 7], [1, 2, 3, 4]], np.uint8)
    t = TensorProto(name="w", data_type=TensorProto.INT4, dims=[2, 4])
    t.raw_data = tq.signed_bytes(q, 4)
    assert np.array_equal(numpy_helper.to_array(t).astype(int), q.astype(int) - 8)
    t8 = TensorProto(name="w", data_type=TensorProto.INT8, dims=[2, 4])
    t8.raw_data = tq.signed_bytes(q * 17, 8)
    assert np.array_equal(numpy_helper.to_array(t8).astype(int), (q * 17).astype(int) - 128)


def test_opset_raised_without_changing_a_dense_graph(make_checkpoint, tmp_path):
    """raise_opset on a whole fp32 decoder (ReduceMean's axes become an input at opset 18): the same logits."""
    bundle = export_bundle(make_checkpoint(), tmp_path / "b", progress=False)
    manifest = json.loads((bundle / "manifest.json").read_text())
    model = onnx.load(str(bundle / "decoder.onnx"), load_external_data=False)
    assert model.opset_import[0].version == 17
    assert "ReduceMean" in tq.raise_opset(model, 21)
    assert model.opset_import[0].version == 21
    model.ir_version = 10
    out = bundle / "raised.onnx"
    onnx.save(model, str(out))
    feeds = _feeds(manifest, PROMPT)
    ref = _session(bundle / "decoder.onnx").run(["logits"], feeds)[0]
    assert np.array_equal(_session(out).run(["logits"], feeds)[0], ref)


def test_opset_refused_for_an_op_that_changed_meaning():
    node = helper.make_node("Resize", ["x", "", "scales"], ["y"], mode="nearest")  # 18, 19: new semantics
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 2, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              initializer=[numpy_helper.from_array(np.ones(4, np.float32), "scales")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(BundleError, match="Resize"):
        tq.raise_opset(model, 21)
    assert model.opset_import[0].version == 17


def test_dense_bundle_is_left_alone(make_checkpoint, tmp_path):
    bundle = export_bundle(make_checkpoint(), tmp_path / "b", progress=False)
    model = onnx.load(str(bundle / "decoder.onnx"), load_external_data=False)
    changes = tb.prepare_for_tensorrt(model, bundle)
    assert "quantized" not in changes and model.opset_import[0].version == 17
    path, _ = tb.write_trt_graph(bundle, "decoder.onnx")
    assert not (bundle / tb.TRT_DATA).exists()
    path.unlink()


@pytest.mark.parametrize(("bits", "block", "per_row"), [(4, 16, False), (4, 64, True), (8, 32, False),
                                                       (8, 32, True)])
def test_one_linear_against_the_reference_function(monkeypatch, bits, block, per_row):
    """One QuantMatMul (random codes, asymmetric zeros, a block whose fp16 scale underflowed to 0)
    rewritten with its weights in the model, against the op's reference function; the transposed
    codes written in several pieces."""
    from edgecpm.export.onnx_builder import GraphBuilder
    from edgecpm.export.quant_ops import quant_function, quant_node, register_quant_schema
    from edgecpm.export.quantize import pack_nibbles

    monkeypatch.setattr(tq, "_CHUNK", 200)
    rng = np.random.default_rng(bits + block)
    n, k, m = 6, 128, 5
    nb = k // block
    q = rng.integers(0, 1 << bits, (n, k)).astype(np.uint8)
    z = rng.integers(0, 1 << bits, (n, 1 if per_row else nb)).astype(np.uint8)
    s = rng.uniform(0.01, 0.1, (n, 1 if per_row else nb)).astype(np.float32)
    z, s = np.repeat(z, nb // z.shape[1], 1), np.repeat(s, nb // s.shape[1], 1)
    if not per_row:
        s[2, 1] = 0
    codes = q.reshape(n, nb, block)
    zeros = z
    if bits == 4:
        codes = pack_nibbles(codes)
        zeros = pack_nibbles(np.concatenate([z, np.zeros((n, nb % 2), np.uint8)], 1))
    g = GraphBuilder(lambda name, a: numpy_helper.from_array(a, name))
    y = quant_node(g, "x", g.weight("w.codes", codes), g.weight("w.scales", s), g.weight("w.zeros", zeros), k, bits,
                   block)
    g.nodes.append(helper.make_node("Identity", [y], ["y"]))
    graph = helper.make_graph(g.nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", n])],
                              initializer=g.initializers)
    register_quant_schema()
    model = helper.make_model(graph, functions=[quant_function()], opset_imports=[
        helper.make_opsetid("", 17), helper.make_opsetid("edgecpm", 1)])
    model.ir_version = 8
    x = rng.normal(size=(m, k)).astype(np.float32)
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    w = s.repeat(block, 1) * (q.astype(np.float32) - z.repeat(block, 1))
    assert rel_err(ref, x @ w.T) < 1e-6
    done = tq.lower_quant_for_tensorrt(model)
    assert done["int8_per_channel" if bits == 8 and per_row else f"int{bits}"] == 1
    assert done["zero_point_terms"] == 1 and not model.functions
    assert {n.op_type for n in model.graph.node} >= {"DequantizeLinear", "MatMul"}
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    got = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(
        None, {"x": x})[0]
    assert rel_err(got, ref) < 1e-6
    scales = [numpy_helper.to_array(t) for t in model.graph.initializer if "scale" in t.name]
    assert all((a > 0).all() for a in scales)  # TensorRT's parser refuses scales <= 0


def test_quantized_bundle_needs_no_plugin_library():
    """QuantMatMul is rewritten into standard ops: an int8 / int4 bundle builds without the plugins."""
    from edgecpm.runtimes import tensorrt_engines as te

    assert not te.needs_plugins({"custom_ops": ["QuantMatMul"]})
    assert te.require_plugin_library({"custom_ops": ["QuantMatMul"]}, None) is None
    assert te.needs_plugins({"custom_ops": ["InfLLMv2Attention", "QuantMatMul"]})
    assert not te.needs_plugins({"custom_ops": []}) and not te.needs_plugins({})


def test_sparse_int4_bundle_keeps_its_plugin_nodes(make_checkpoint, tmp_path):
    """InfLLM v2 + int4: the attention stays a plugin node (int32 casts), the linears become DQ + MatMul."""
    ckpt = make_checkpoint(tie=False, sparse_config={"dense_len": 512, "window_size": 128, "topk": 2},
                           hidden_size=2048, num_attention_heads=16, num_key_value_heads=1, intermediate_size=256,
                           num_hidden_layers=2, rms_norm_eps=1e-6)
    bundle = export_bundle(ckpt, tmp_path / "b", sparse=True, quantize="int4", progress=False)
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert set(manifest["custom_ops"]) == {"InfLLMv2Attention", "QuantMatMul"}
    path, changes = _rewrite(bundle)
    assert changes["functions_removed"] == ["InfLLMv2Attention", "QuantMatMul"] and len(changes["casts"]) == 2
    q = changes["quantized"]
    assert q["int4"] == 14 and q["int8"] == 1 and q["embeddings"] == 1  # linears: groups of 128, no note;
    assert len(q["notes"]) == 1 and "INT8 with several scales" in q["notes"][0]  # the int8 head: blocks of 128
    model = onnx.load(str(path), load_external_data=False)
    ops = [(n.domain, n.op_type) for n in model.graph.node]
    assert ops.count(("edgecpm", "InfLLMv2Attention")) == 2 and ("edgecpm", "QuantMatMul") not in ops
    assert model.opset_import[0].version == 21
    _check_weights(path, bundle, manifest)
