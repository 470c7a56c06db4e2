"""InfLLM v2: the torch op (and the ONNX function) against the brute-force reference."""

from __future__ import annotations

import numpy as np
import pytest
from infllmv2_reference import reference

torch = pytest.importorskip("torch")
from edgecpm.config import SparseConfig
from edgecpm.export import infllmv2

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
    if cfgd["dense_len"] <= S and 64 * (cfgd["topk"] + 3) < S:
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
    from onnx import TensorProto, helper

    from edgecpm.export.custom_ops import DOMAIN, infllmv2_function, infllmv2_node, register_schemas
    from edgecpm.export.onnx_builder import GraphBuilder

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


# ---- draft trees (DESIGN.md §7: new rows go by position, never hidden by the block rule) ----------

TREE = [-1, 0, 0, 1, 2, 2, 4]  # parent of each node (-1: the root): siblings at every level


def tree_inputs(parents, P, Hq, Hk, d=16, seed=0):
    """A draft-tree verification step over a cache of P rows: q, new k/v, past k/v, positions
    (P + depth) and the ancestor mask, as the runtime builds them."""
    T = len(parents)
    mask = np.zeros((T, T), bool)
    depth = np.zeros(T, np.int64)
    for i, p in enumerate(parents):
        mask[i, i] = True
        if p >= 0:
            mask[i] |= mask[p]
            depth[i] = depth[p] + 1
    q, k, v = make(P + T, T, Hq, Hk, d=d, seed=seed)
    return q, k, v, torch.from_numpy(P + depth), torch.from_numpy(mask)


def dense_tree_attention(q, k_all, v_all, mask):
    """Every past row plus the new rows the tree mask allows: float64 [T, Hq, d]."""
    q, k_all, v_all = (np.asarray(x, np.float64) for x in (q, k_all, v_all))
    T, Hq, d = q.shape
    S, Hk = k_all.shape[:2]
    visible = np.concatenate([np.ones((T, S - T), bool), np.asarray(mask)], axis=1)
    out = np.zeros_like(q)
    for t in range(T):
        for h in range(Hq):
            s = np.where(visible[t], k_all[:, h // (Hq // Hk)] @ q[t, h] / np.sqrt(d), -np.inf)
            w = np.exp(s - s.max())
            out[t, h] = w / w.sum() @ v_all[:, h // (Hq // Hk)]
    return out


def path_reference(q, k_all, v_all, pos, mask, cfg):
    """Each tree node as plain decoding would compute it: the brute-force reference over the past
    followed by the node's ancestors in position order (itself last)."""
    T = q.shape[0]
    P = k_all.shape[0] - T
    out = np.zeros(q.shape)
    for t in range(T):
        path = sorted(np.flatnonzero(np.asarray(mask[t])), key=lambda i: int(pos[i]))
        rows = list(range(P)) + [P + i for i in path]
        o, _ = reference(q[t : t + 1].numpy(), k_all[rows].numpy(), v_all[rows].numpy(), int(pos[t]), cfg)
        out[t] = o[0]
    return out


def run_tree_op(q, k_all, v_all, pos, mask, cfg):
    T = q.shape[0]
    P = k_all.shape[0] - T
    pck = infllmv2.new_chunks(k_all[:0], k_all[:P], cfg)
    out, _ = infllmv2.sparse_attention(q, k_all[P:], v_all[P:], k_all[:P], v_all[:P], pck, pos, mask, cfg)
    return out.numpy()


def run_tree_onnx(sess, q, k_all, v_all, pos, mask, cfg):
    T = q.shape[0]
    P = k_all.shape[0] - T
    pck = infllmv2.new_chunks(k_all[:0], k_all[:P], cfg)
    out, _ = sess.run(None, {"q": q.numpy(), "k": k_all[P:].numpy(), "v": v_all[P:].numpy(), "pk": k_all[:P].numpy(),
                             "pv": v_all[:P].numpy(), "pck": pck.numpy(), "pos": pos.numpy(), "mask": mask.numpy()})
    return out


# Sparse for every query (dense_len 1), but top-k covers every block: the result must be dense
# attention under the tree mask, wherever the tree's slots and positions fall against the blocks.
ALL_BLOCKS = {**SMALL, "dense_len": 1, "topk": 16}


@pytest.mark.parametrize("semantics, over", [("v1", {}), ("v2", {}), ("v1", {"dense_len": 10**6})])
def test_tree_equals_dense_tree_attention_at_every_block_offset(semantics, over):
    """(The last case: queries below dense_len, which attend to every block up to their own.)"""
    cfgd = {**ALL_BLOCKS, **over, "semantics": semantics}
    cfg = SparseConfig(**cfgd)
    sess = onnx_op_session(cfg)
    for offset in range(64):
        P = 64 * (1 + offset % 3) + offset
        q, k, v, pos, mask = tree_inputs(TREE, P, 4, 2, seed=offset)
        want = dense_tree_attention(q, k, v, mask)
        for name, got in (("torch", run_tree_op(q, k, v, pos, mask, cfg)),
                          ("onnx", run_tree_onnx(sess, q, k, v, pos, mask, cfg))):
            err = np.abs(got - want).max() / np.abs(want).max()
            assert err <= 1e-5, f"{name}: P={P} (offset {offset}): rel err {err:.2e}"


def adversarial_tree(P, seed):
    """A tree step whose stage 1 goes wrong if a chunk holds a sibling: node 4 (path 0-2-4, position
    P + 2) sees the chunk ending at position P + 2 (P = 13 mod 16), which by slot holds node 1, not
    on its path. Node 1's key points along node 4's query head 0 (so a slot-ordered chunk would take
    head 0's stage-1 mass), and so does a far block that only head 0 likes: on its true path, node
    4 selects that block."""
    q, k, v, pos, mask = tree_inputs(TREE, P, 8, 2, seed=seed)
    d = q[4, 0] / q[4, 0].norm() * 4
    k[192:256, 0] = 1.5 * d
    k[P + 1, 0] = 32 * 3 * d
    return q, k, v, pos, mask


@pytest.mark.parametrize("semantics", ["v1", "v2"])
def test_tree_nodes_equal_their_paths_decoded_plainly(semantics):
    """Lossless trees under real selection (small top-k and window): every node's output equals the
    brute-force reference run on the past plus its own path, as plain decoding would see it, for
    trees whose nodes cross chunk ends (stage 1) and block boundaries (stage 2)."""
    cfgd = {**SMALL, "dense_len": 1, "topk": 3, "semantics": semantics}
    cfg = SparseConfig(**cfgd)
    sess = onnx_op_session(cfg)
    cases = [tree_inputs(TREE, 64 * 9 + o, 8, 2, seed=o) for o in (13, 14, 15, 61, 62, 63)]
    cases += [adversarial_tree(64 * 10 + 13, seed) for seed in (0, 1)]
    for q, k, v, pos, mask in cases:
        want = path_reference(q, k, v, pos, mask, cfgd)
        for name, got in (("torch", run_tree_op(q, k, v, pos, mask, cfg)),
                          ("onnx", run_tree_onnx(sess, q, k, v, pos, mask, cfg))):
            err = np.abs(got - want).max() / np.abs(want).max()
            assert err <= 1e-5, f"{name}: P={k.shape[0] - len(TREE)}: rel err {err:.2e}"
