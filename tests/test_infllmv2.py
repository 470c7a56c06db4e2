"""InfLLM v2: the torch op (and the ONNX function) against the brute-force reference."""

from __future__ import annotations

import numpy as np
import pytest
from infllmv2_reference import reference

torch = pytest.importorskip("torch")
from edgecpm.export import infllmv2

from edgecpm.config import SparseConfig

# Small settings so that a few hundred tokens already exercise every rule (block 64, 5-chunk
# pooling as shipped; window of 2 blocks; top-3).
SMALL = {"kernel_size": 32, "kernel_stride": 16, "block_size": 64, "init_blocks": 1, "window_size": 128,
         "topk": 3, "dense_len": 100}


def make(S, T, Hq, Hk, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(T, Hq, d, generator=g)
    k = torch.randn(S, Hk, d, generator=g)
    v = torch.randn(S, Hk, d, generator=g)
    return q, k, v


def run_op(q, k_all, v_all, T, cfg):
    S = k_all.shape[0]
    P = S - T
    ck_past = infllmv2.new_chunks(k_all[:0], k_all[:P], cfg)  # compressed keys of the past
    pos = torch.arange(P, S)
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    out, ck_new = infllmv2.sparse_attention(q, k_all[P:], v_all[P:], k_all[:P], v_all[:P], ck_past, pos,
                                            mask, cfg)
    ck = torch.cat([ck_past, ck_new])
    blocks = infllmv2.select_blocks(infllmv2.block_scores(q, ck, pos, S, cfg), pos, cfg)
    return out, blocks


CASES = [
    # (S, T, Hq, Hk, semantics, overrides)
    (300, 300, 4, 1, "v1", {}),  # prefill, group 4
    (300, 300, 4, 1, "v2", {}),
    (517, 3, 16, 1, "v1", {}),  # decode, S not a multiple of 16 or 64, group 16
    (517, 3, 16, 1, "v2", {}),
    (450, 2, 2, 2, "v1", {}),  # group size 1 (2 kv heads)
    (450, 2, 2, 2, "v2", {"topk": 40}),  # topk larger than the number of blocks
    (100, 1, 4, 1, "v1", {}),  # S exactly at dense_len: the first sparse query
    (99, 1, 4, 1, "v1", {}),  # one below: dense
    (700, 5, 8, 2, "v1", {"dense_len": -1, "init_blocks": 2}),  # always sparse
    (257, 257, 2, 2, "v1", {"dense_len": 0}),  # prefill, group size 1, every query sparse
]


@pytest.mark.parametrize("S, T, Hq, Hk, semantics, over", CASES)
def test_op_matches_reference(S, T, Hq, Hk, semantics, over):
    cfgd = {**SMALL, **over, "semantics": semantics}
    cfg = SparseConfig(**cfgd)
    q, k, v = make(S, T, Hq, Hk, seed=S + T)
    out, blocks = run_op(q, k, v, T, cfg)
    ref_out, ref_sel = reference(q.numpy(), k.numpy(), v.numpy(), S - T, cfgd)
    for (t, g), sel in ref_sel.items():
        assert blocks[g, t].nonzero().flatten().tolist() == sel, f"query {t}, kv head {g}"
    err = np.abs(out.numpy() - ref_out).max() / np.abs(ref_out).max()
    assert err <= 1e-5
    # The case really is sparse somewhere (else the test proves nothing about selection).
    if cfgd["dense_len"] <= S and S > 64 * (cfgd["topk"] + 3):
        assert not all(sel == list(range((S - T + t) // 64 + 1)) for (t, _), sel in ref_sel.items())


def test_chunked_prefill_equals_one_call():
    """Per-query semantics: splitting a prompt into chunks gives the same outputs."""
    cfg = SparseConfig(**{**SMALL, "dense_len": 0})
    q, k, v = make(400, 400, 4, 2, seed=3)
    whole, _ = run_op(q, k, v, 400, cfg)
    parts = []
    for a, b in ((0, 130), (130, 131), (131, 400)):
        ck_past = infllmv2.new_chunks(k[:0], k[:a], cfg)
        out, _ = infllmv2.sparse_attention(q[a:b], k[a:b], v[a:b], k[:a], v[:a], ck_past, torch.arange(a, b),
                                           torch.ones(b - a, b - a, dtype=torch.bool).tril(), cfg)
        parts.append(out)
    assert torch.allclose(torch.cat(parts), whole, rtol=1e-5, atol=1e-6)


def test_incremental_chunks_equal_recompute():
    cfg = SparseConfig()
    k = torch.randn(300, 2, 8)
    ck = infllmv2.new_chunks(k[:0], k[:0], cfg)
    done = 0
    for step in (1, 30, 1, 17, 64, 3, 100, 84):
        ck = torch.cat([ck, infllmv2.new_chunks(k[:done], k[done : done + step], cfg)])
        done += step
        full = torch.stack([k[16 * j : 16 * j + 32].mean(0) for j in range(cfg.n_chunks(done))]) \
            if done >= 32 else ck[:0]
        assert ck.shape[0] == cfg.n_chunks(done)
        assert torch.allclose(ck, full, atol=1e-6)


# ---- the ONNX reference function ---------------------------------------------------------------

def onnx_op_session(cfg):
    """A one-node ONNX model: the InfLLMv2Attention node backed by its local function."""
    ort = pytest.importorskip("onnxruntime")
    import onnx
    from edgecpm.export.custom_ops import DOMAIN, infllmv2_function, infllmv2_node, register_schemas
    from edgecpm.export.onnx_builder import GraphBuilder
    from onnx import TensorProto, helper

    register_schemas()
    g = GraphBuilder(weight_sink=lambda name, array: None)
    out, ck = infllmv2_node(g, "q", "k", "v", "pk", "pv", "pck", "pos", "mask", cfg)
    g.nodes += [helper.make_node("Identity", [out], ["out"]), helper.make_node("Identity", [ck], ["ck"])]
    f = TensorProto.FLOAT
    specs = [("q", f, ["T", "Hq", "D"]), ("k", f, ["T", "H", "D"]), ("v", f, ["T", "H", "D"]),
             ("pk", f, ["P", "H", "D"]), ("pv", f, ["P", "H", "D"]), ("pck", f, ["C", "H", "D"]),
             ("pos", TensorProto.INT64, ["T"]), ("mask", TensorProto.BOOL, ["T", "T"])]
    graph = helper.make_graph(g.nodes, "op", [helper.make_tensor_value_info(*x) for x in specs],
                              [helper.make_tensor_value_info("out", f, ["T", "Hq", "D"]),
                               helper.make_tensor_value_info("ck", f, ["Cn", "H", "D"])], initializer=g.initializers)
    model = helper.make_model(graph, functions=[infllmv2_function()],
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("S, T, Hq, Hk, semantics, over", CASES)
def test_onnx_function_matches_reference(S, T, Hq, Hk, semantics, over):
    cfgd = {**SMALL, **over, "semantics": semantics}
    cfg = SparseConfig(**cfgd)
    q, k, v = make(S, T, Hq, Hk, seed=S + T)
    P = S - T
    pck = infllmv2.new_chunks(k[:0], k[:P], cfg)
    out, ck = onnx_op_session(cfg).run(None, {
        "q": q.numpy(), "k": k[P:].numpy(), "v": v[P:].numpy(), "pk": k[:P].numpy(), "pv": v[:P].numpy(),
        "pck": pck.numpy(), "pos": np.arange(P, S), "mask": np.tril(np.ones((T, T), bool))})
    ref_out, _ = reference(q.numpy(), k.numpy(), v.numpy(), P, cfgd)
    assert np.abs(out - ref_out).max() / np.abs(ref_out).max() <= 1e-5
    full = infllmv2.new_chunks(k[:0], k, cfg).numpy()
    assert np.allclose(np.concatenate([pck.numpy(), ck]), full, atol=1e-6)
