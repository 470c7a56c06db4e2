"""InfLLM v2 sparse vs dense attention, one layer of the MiniCPM4-8B attention shape, same run.

    python benchmarks/sparse_attention.py                      # decode at 16K/32K/64K, prefill chunk at 8K/16K
    python benchmarks/sparse_attention.py --contexts 16384 --prefill-contexts 8192

Shape: 32 query heads, 2 kv heads, head_dim 128, fp32, the shipped sparse_config defaults (block 64,
window 2048, top-k 64, dense_len 8192). Random q/k/v. For each context P:
- decode: one query at position P over P cached keys — dense attention (the graph's `attend`, or
  the torch model's `dense_attention`) vs the InfLLMv2Attention op (the ONNX function on
  onnxruntime, the torch custom op);
- prefill: one 512-token chunk (the runtime's prefill chunk) at positions P..P+511;
- the torch op's time split into stage 1 (compressed keys + chunk scores + block pooling), top-k
  selection, and stage 2 (attention over the selected blocks).
Median of --repeats after a warm-up, caches evicted before each timed call. Writes
benchmarks/results/sparse_attention.json.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

HQ, HKV, D = 32, 2, 128


_EVICT = np.zeros(64 << 20, dtype=np.uint8)


def median_time(fn, repeats: int) -> float:
    """Median wall time of fn, each call starting with cold CPU caches (64 MiB written first, not
    timed): in a model every layer's step reads another layer's cache, so nothing stays cached, and
    a warm rerun would flatter the sparse op, whose ~12 MB working set fits in L3."""
    fn()
    times = []
    for _ in range(repeats):
        _EVICT[:] += 1
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def ort_sessions(cfg, threads):
    """Two one-node graphs over the same inputs: dense `attend` and the InfLLMv2Attention node."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from edgecpm.export.custom_ops import DOMAIN, infllmv2_function, infllmv2_node, register_schemas
    from edgecpm.export.onnx_builder import GraphBuilder, attend

    register_schemas()
    f = TensorProto.FLOAT
    specs = [("q", f, ["T", HQ, D]), ("k", f, ["T", HKV, D]), ("v", f, ["T", HKV, D]), ("pk", f, ["P", HKV, D]),
             ("pv", f, ["P", HKV, D]), ("pck", f, ["C", HKV, D]), ("pos", TensorProto.INT64, ["T"]),
             ("mask", TensorProto.BOOL, ["T", "T"])]
    inputs = [helper.make_tensor_value_info(*s) for s in specs]
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads

    def session(sparse: bool):
        g = GraphBuilder(weight_sink=lambda name, array: None)
        if sparse:
            out, _ = infllmv2_node(g, "q", "k", "v", "pk", "pv", "pck", "pos", "mask", cfg)
        else:
            new_mask = g.op("Unsqueeze", g.op("Transpose", "mask", perm=[1, 0]), g.const([1, 2]))
            out = attend(g, "q", "k", "v", "pk", "pv", new_mask)
        g.nodes.append(helper.make_node("Identity", [out], ["out"]))
        graph = helper.make_graph(g.nodes, "attn", inputs if sparse else inputs[:5] + inputs[7:],
                                  [helper.make_tensor_value_info("out", f, None)], initializer=g.initializers)
        model = helper.make_model(graph, functions=[infllmv2_function()] if sparse else [],
                                  opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)])
        model.ir_version = 8
        return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])

    return session(False), session(True)


def measure(P: int, T: int, cfg, dense_ort, sparse_ort, repeats: int) -> dict:
    import torch

    from edgecpm.export import infllmv2
    from edgecpm.export.modeling_minicpm import dense_attention

    rng = np.random.default_rng(P + T)
    q = rng.standard_normal((T, HQ, D), dtype=np.float32)
    k, v = (rng.standard_normal((T, HKV, D), dtype=np.float32) for _ in range(2))
    pk, pv = (rng.standard_normal((P, HKV, D), dtype=np.float32) for _ in range(2))
    tq, tk, tv, tpk, tpv = map(torch.from_numpy, (q, k, v, pk, pv))
    pck = infllmv2.new_chunks(tpk[:0], tpk, cfg)
    pos = torch.arange(P, P + T)
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    feed = {"q": q, "k": k, "v": v, "pk": pk, "pv": pv, "mask": mask.numpy()}
    sparse_feed = {**feed, "pck": pck.numpy(), "pos": pos.numpy()}

    row = {"context": P, "queries": T}
    row["ort_dense_ms"] = 1000 * median_time(lambda: dense_ort.run(None, feed), repeats)
    row["ort_sparse_ms"] = 1000 * median_time(lambda: sparse_ort.run(None, sparse_feed), repeats)
    with torch.inference_mode():
        row["torch_dense_ms"] = 1000 * median_time(
            lambda: dense_attention(tq[None], tk[None], tv[None], tpk[None], tpv[None], mask), repeats)
        row["torch_sparse_ms"] = 1000 * median_time(
            lambda: infllmv2.sparse_attention(tq, tk, tv, tpk, tpv, pck, pos, mask, cfg), repeats)
        # The torch op's stages, timed separately on the same inputs.
        state = {}

        def stage1():
            ck_new = infllmv2.new_chunks(tpk, tk, cfg)
            state["blk"] = infllmv2.block_scores(tq, torch.cat([pck, ck_new]), pos, P + T, cfg)

        def topk():
            state["blocks"] = infllmv2.select_blocks(state["blk"], pos, cfg)

        row["torch_stage1_ms"] = 1000 * median_time(stage1, repeats)
        row["torch_topk_ms"] = 1000 * median_time(topk, repeats)
        row["torch_stage2_ms"] = 1000 * median_time(
            lambda: infllmv2.sparse_attend(tq, tk, tv, tpk, tpv, pos, mask, state["blocks"], cfg), repeats)
        row["selected_tokens_per_query"] = int(state["blocks"][0, -1].sum()) * cfg.block_size
    row["ort_speedup"] = row["ort_dense_ms"] / row["ort_sparse_ms"]
    row["torch_speedup"] = row["torch_dense_ms"] / row["torch_sparse_ms"]
    print(row, file=sys.stderr)
    return row


def main(argv=None) -> int:
    p = common.arg_parser(__doc__, "sparse_attention", repeats=9)
    p.add_argument("--contexts", type=int, nargs="+", default=[16384, 32768, 65536])
    p.add_argument("--prefill-contexts", type=int, nargs="*", default=[8192, 16384])
    p.add_argument("--prefill-chunk", type=int, default=512)
    args = p.parse_args(argv)

    import torch

    from edgecpm.config import SparseConfig

    torch.set_num_threads(args.threads)
    cfg = SparseConfig()  # the shipped defaults
    dense_ort, sparse_ort = ort_sessions(cfg, args.threads)
    decode = [measure(P, 1, cfg, dense_ort, sparse_ort, args.repeats) for P in args.contexts]
    prefill = [measure(P, args.prefill_chunk, cfg, dense_ort, sparse_ort, max(2, args.repeats // 2))
               for P in args.prefill_contexts]
    result = {
        **common.result_header("sparse_attention", argv, threads=args.threads),
        "shape": {"query_heads": HQ, "kv_heads": HKV, "head_dim": D, "dtype": "fp32"},
        "sparse_config": vars(cfg),
        "decode": decode,
        "prefill_chunk": prefill,
    }
    cols = ["context", "queries", "ort_dense_ms", "ort_sparse_ms", "ort_speedup", "torch_dense_ms", "torch_sparse_ms",
            "torch_speedup", "torch_stage1_ms", "torch_topk_ms", "torch_stage2_ms", "selected_tokens_per_query"]
    return common.finish(result, [common.markdown_table(decode + prefill, cols)], args.output)


if __name__ == "__main__":
    sys.exit(main())
