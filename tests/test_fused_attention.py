"""edgecpm's fused attention kernel for onnxruntime (`edgecpm::Attention` in runtimes/onnxruntime_ops.cpp),
swapped in at load for the graph's dense attention (runtimes/attention_lowering.py): equal to the
dense reference subgraph it replaces and to float64 attention, on sizes that are not multiples of
its tiles, every GQA group size, causal and tree masks, an empty past, each CPU path; and a
bundle's logits with it equal the exported graph's."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import rel_err

from edgecpm.errors import BackendUnavailable

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")


@pytest.fixture(scope="module")
def ort_ops():
    import os

    from edgecpm.runtimes import onnxruntime_ops

    try:
        return onnxruntime_ops.library()
    except BackendUnavailable as e:
        if os.environ.get("EDGECPM_REQUIRE_ORT_OPS"):
            raise
        pytest.skip(f"edgecpm's onnxruntime kernel cannot be built here: {e}")


def dense_model() -> onnx.ModelProto:
    """One attend() of export/onnx_builder.py, with the decoder graph's mask layout, as a model."""
    from onnx import TensorProto, helper

    from edgecpm.export.onnx_builder import GraphBuilder, attend

    g = GraphBuilder(weight_sink=lambda name, a: onnx.numpy_helper.from_array(a, name), model_dtype=TensorProto.FLOAT)
    new_mask = g.op("Unsqueeze", g.op("Transpose", "attn_mask", perm=[1, 0]), g.const([1, 2]))
    out = attend(g, "q", "k", "v", "past_k", "past_v", new_mask)
    g.nodes.append(helper.make_node("Identity", [out], ["out"]))
    f = TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info(n, f, s) for n, s in
              (("q", ["T", "Hq", "D"]), ("k", ["T", "H", "D"]), ("v", ["T", "H", "D"]),
               ("past_k", ["P", "H", "D"]), ("past_v", ["P", "H", "D"]))]
    inputs.append(helper.make_tensor_value_info("attn_mask", TensorProto.BOOL, ["T", "T"]))
    graph = helper.make_graph(g.nodes, "attend", inputs, [helper.make_tensor_value_info("out", f, ["T", "X"])],
                              initializer=g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def session(model: onnx.ModelProto, library=None):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    if library is not None:
        opts.register_custom_ops_library(str(library))
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def attention64(q, k, v, pk, pv, mask):
    """float64 GQA attention: past rows always visible, new rows where mask[t, j]."""
    T, Hq, D = q.shape
    G = Hq // k.shape[1]
    keys, values = np.concatenate([pk, k]).astype(np.float64), np.concatenate([pv, v]).astype(np.float64)
    visible = np.concatenate([np.ones((T, len(pk)), bool), mask], axis=1)
    out = np.empty((T, Hq, D))
    for h in range(Hq):
        s = q[:, h].astype(np.float64) @ keys[:, h // G].T / np.sqrt(D)
        s = np.where(visible, s, -np.inf)
        p = np.exp(s - s.max(axis=1, keepdims=True))
        out[:, h] = (p / p.sum(axis=1, keepdims=True)) @ values[:, h // G]
    return out.reshape(T, Hq * D)


def tree_mask(T: int, rng) -> np.ndarray:
    """An ancestor mask of a random tree over T nodes (node 0 the root, parents come first)."""
    mask = np.eye(T, dtype=bool)
    for j in range(1, T):
        parent = int(rng.integers(0, j))
        mask[j] |= mask[parent]
    return mask


# (T, P, Hq, Hkv, D): odd T and P around the 64-key tile and the query blocks, GQA groups 1, 2, 8, 16,
# head dims on the vector path (multiples of 16) and off it.
SHAPES = [(1, 0, 4, 2, 16), (37, 0, 16, 2, 64), (70, 133, 16, 1, 64), (5, 200, 8, 8, 16), (130, 65, 16, 16, 32),
          (67, 129, 16, 8, 64), (3, 1, 2, 1, 24), (65, 0, 16, 1, 128), (1, 300, 16, 2, 64)]


@pytest.mark.parametrize("path", ["avx512", "avx2", "scalar"])
def test_kernel_equals_reference_attention(ort_ops, path, monkeypatch):
    from edgecpm.runtimes.attention_lowering import fuse_attention
    from edgecpm.runtimes.onnxruntime_ops import isa

    monkeypatch.setenv("EDGECPM_ORT_ISA", path)
    if path != isa(ort_ops) and path != "scalar":
        pytest.skip(f"this CPU has no {path} path (the library takes {isa(ort_ops)!r})")
    model = dense_model()
    assert fuse_attention(model, head_dim=16) == 1
    assert [n.op_type for n in model.graph.node] == ["Attention", "Identity"]  # the rest is gone
    ref_session = session(dense_model())
    rng = np.random.default_rng(0)
    for T, P, Hq, Hkv, D in SHAPES:
        model = dense_model()
        fuse_attention(model, head_dim=D)
        fused_session = session(model, ort_ops)
        q = rng.standard_normal((T, Hq, D), dtype=np.float32)
        k, v = rng.standard_normal((2, T, Hkv, D), dtype=np.float32)
        pk, pv = rng.standard_normal((2, P, Hkv, D), dtype=np.float32)
        for mask in (np.tril(np.ones((T, T), bool)), tree_mask(T, rng)):
            feeds = {"q": q, "k": k, "v": v, "past_k": pk, "past_v": pv, "attn_mask": mask}
            ours = fused_session.run(None, feeds)[0]
            exact = attention64(q, k, v, pk, pv, mask)
            assert ours.shape == (T, Hq * D)
            assert rel_err(ours, exact) <= 1e-5, (path, T, P, Hq, Hkv, D)
            assert rel_err(ours, ref_session.run(None, feeds)[0]) <= 1e-5, (path, T, P, Hq, Hkv, D)


def test_mismatched_shapes_are_refused(ort_ops):
    from edgecpm.runtimes.attention_lowering import fuse_attention

    model = dense_model()
    fuse_attention(model, head_dim=8)
    s = session(model, ort_ops)
    z = np.zeros
    with pytest.raises(Exception, match="do not agree"):
        s.run(None, {"q": z((4, 6, 8), np.float32), "k": z((4, 4, 8), np.float32), "v": z((4, 4, 8), np.float32),
                     "past_k": z((0, 4, 8), np.float32), "past_v": z((0, 4, 8), np.float32),
                     "attn_mask": np.ones((4, 4), bool)})


def test_lowering_leaves_other_graphs_alone():
    """A graph without attend()'s pattern (here: its past scores masked) is not rewritten."""
    from onnx import TensorProto, helper

    from edgecpm.export.onnx_builder import GraphBuilder, attend
    from edgecpm.runtimes.attention_lowering import fuse_attention

    g = GraphBuilder(weight_sink=lambda name, a: onnx.numpy_helper.from_array(a, name), model_dtype=TensorProto.FLOAT)
    out = attend(g, "q", "k", "v", "past_k", "past_v", "new_mask", past_mask="past_mask")
    g.nodes.append(helper.make_node("Identity", [out], ["out"]))
    graph = helper.make_graph(g.nodes, "a", [], [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
                              initializer=g.initializers)
    model = helper.make_model(graph)
    before = model.SerializeToString()
    assert fuse_attention(model, head_dim=16) == 0
    assert model.SerializeToString() == before


@pytest.fixture(scope="module")
def bundle(make_checkpoint, tmp_path_factory):
    from edgecpm.bundle import load_bundle
    from edgecpm.export.exporter import export_bundle

    ckpt = make_checkpoint(num_attention_heads=4, num_key_value_heads=1)  # GQA group 4, head_dim 16
    return load_bundle(export_bundle(ckpt, tmp_path_factory.mktemp("fused") / "b", progress=False))


def steps(backend):
    """Logits of a prefill in two chunks, a decode step and a draft-tree step over one KV arena."""
    from edgecpm.generate import run_step
    from edgecpm.kv_cache import KVCache

    cache = KVCache(backend.config, 256, backend.kv_dtype)
    rng = np.random.default_rng(1)
    vocab = backend.config.vocab_size
    out = []
    for n in (70, 45):
        ids = rng.integers(3, vocab, n)
        out.append(run_step(backend, cache, ids, None, np.arange(n)))
    out.append(run_step(backend, cache, rng.integers(3, vocab, 1), None, np.zeros(1, np.int64)))
    mask = tree_mask(9, rng)
    positions = cache.position + mask.sum(axis=1) - 1  # each node's depth after the context
    out.append(run_step(backend, cache, rng.integers(3, vocab, 9), mask, np.arange(9), positions=positions))
    return out


def test_bundle_logits_with_the_kernel_equal_the_exported_graph(ort_ops, bundle):
    import edgecpm
    from edgecpm.runtimes.onnxruntime import OnnxRuntimeBackend
    from edgecpm.runtimes.onnxruntime_ops import isa

    fused = OnnxRuntimeBackend(bundle, threads=2, attention="edgecpm")
    ref = OnnxRuntimeBackend(bundle, threads=2, attention="reference")
    assert fused.attention_kernel == f"edgecpm ({isa(ort_ops)})" and fused.max_prefill_chunk
    assert ref.attention_kernel is None and ref.max_prefill_chunk is None
    for ours, theirs in zip(steps(fused), steps(ref), strict=True):
        assert rel_err(ours, theirs) <= 1e-5
    a = edgecpm.Session.from_backend(fused).generate([1, 5, 9, 12], max_new_tokens=8, ignore_eos=True)
    b = edgecpm.Session.from_backend(ref).generate([1, 5, 9, 12], max_new_tokens=8, ignore_eos=True)
    assert a.token_ids == b.token_ids


def test_auto_takes_the_kernel_where_it_has_a_vector_path(ort_ops, bundle, monkeypatch):
    import platform

    from edgecpm.runtimes.onnxruntime import OnnxRuntimeBackend
    from edgecpm.runtimes.onnxruntime_ops import isa

    vector = platform.machine() == "x86_64" and isa(ort_ops) != "scalar"
    assert (OnnxRuntimeBackend(bundle).attention_kernel is not None) == vector
    monkeypatch.setenv("EDGECPM_ORT_ATTENTION", "reference")
    assert OnnxRuntimeBackend(bundle).attention_kernel is None
    with pytest.raises(ValueError, match="attention="):
        OnnxRuntimeBackend(bundle, attention="flash")
