"""edgecpm's onnxruntime CPU kernels alone: GEMV throughput per kernel path, and spin-waiting threads.

    python benchmarks/kernels.py     # ~3 min; needs onnxruntime's C API headers (runtimes/onnxruntime_ops.py)

1. One decode GEMV (one token) through a one-node graph, one intra-op thread, CPU time of the
   calling thread (robust to other load), best of 5 x 20 calls; reported as weight bytes read per
   second:
   - TernaryMatMul [4096 -> 8192] (8 MiB of codes: from cache) and [4096 -> 400000] (391 MiB: from
     memory) on each path this CPU has (EDGECPM_ORT_ISA: avx512vnni, avx512, avx2vnni, avx2);
   - QuantMatMul int8 and int4 (blocks of 128) [1024 -> 600000] on the default path.
2. Spin-waiting: a MiniCPM4-0.5B-shaped ternary bundle (benchmarks/ternary.py's random BitCPM4-like
   weights, int8 head) in two sessions of 2 threads, onnxruntime's idle threads spinning and not,
   alternating 4 rounds of 64 new tokens; median decode tok/s.
3. A tied LM head (the weight a graph input, as the runtime loads one: runtimes/onnxruntime.py)
   for 1 to 17 tokens (decode, a draft's verification): onnxruntime's Gemm (transB) against
   edgecpm::HeadMatMul, wind-tunnel [8192, 256] and MiniCPM4-0.5B [73448, 1024] shapes, --threads
   threads spinning within a call only (as OnnxRuntimeBackend's), wall time, median of interleaved
   batches of calls.
Writes benchmarks/results/kernels.json.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common
from ternary import write_ternary_checkpoint

PATHS = ["avx512vnni", "avx512", "avx2vnni", "avx2"]


def one_node_model(op: str, k: int, n: int, rng) -> tuple[bytes, int]:
    """A graph of one TernaryMatMul ("ternary") or QuantMatMul ("int8" / "int4") node with random
    weights, and the bytes of its weights."""
    from onnx import TensorProto, helper, numpy_helper

    from edgecpm.export import custom_ops, quant_ops
    from edgecpm.export.onnx_builder import GraphBuilder

    b = GraphBuilder(lambda name, a: numpy_helper.from_array(a, name))
    if op == "ternary":
        words = rng.integers(0, 2**32, (n, k // 16), dtype=np.uint32)
        words &= ~(words & (words >> 1) & np.uint32(0x55555555))  # code 3 -> 2: every code in {0, 1, 2}
        weights = [words, np.ones((n, 1), np.float32)]
        y = custom_ops.ternary_node(b, "x", b.weight("packed", weights[0]), b.weight("scales", weights[1]), k, k)
    else:
        bits, block = (8, 128) if op == "int8" else (4, 128)
        weights = [rng.integers(0, 256, (n, k // block, block * bits // 8), dtype=np.uint8),
                   rng.random((n, k // block), dtype=np.float32),
                   rng.integers(0, 256, (n, (k // block * bits + 7) // 8), dtype=np.uint8)]
        codes, scales, zeros = (b.weight(name, w) for name, w in zip(("c", "s", "z"), weights, strict=True))
        y = quant_ops.quant_node(b, "x", codes, scales, zeros, k, bits, block)
    b.nodes.append(helper.make_node("Identity", [y], ["y"]))
    graph = helper.make_graph(b.nodes, "gemv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])], b.initializers)
    custom_ops.register_schemas()
    quant_ops.register_quant_schema()
    model = helper.make_model(graph, functions=[custom_ops.ternary_function(), quant_ops.quant_function()],
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("edgecpm", 1)])
    model.ir_version = 8
    return model.SerializeToString(), sum(w.nbytes for w in weights)


def gemv(model: bytes, nbytes: int, k: int, path: str | None, library: Path) -> dict:
    import onnxruntime as ort

    from edgecpm.runtimes import onnxruntime_ops

    if path:
        os.environ["EDGECPM_ORT_ISA"] = path  # read when the kernel is created
    try:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.register_custom_ops_library(str(library))
        s = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
        ran = onnxruntime_ops.isa(library)
    finally:
        os.environ.pop("EDGECPM_ORT_ISA", None)
    x = {"x": np.random.default_rng(1).standard_normal((1, k)).astype(np.float32)}
    for _ in range(3):
        s.run(None, x)
    best = float("inf")
    for _ in range(5):
        t0 = time.thread_time()
        for _ in range(20):
            s.run(None, x)
        best = min(best, (time.thread_time() - t0) / 20)
    return {"path": ran if path else "default", "weight_mib": nbytes / 2**20, "ms": best * 1e3,
            "gb_per_s": nbytes / best / 1e9}


def head_model(op: str, n: int, k: int) -> bytes:
    """y = x [T, k] times weight [n, k] transposed: a Gemm or an edgecpm::HeadMatMul node."""
    from onnx import TensorProto, helper

    node = (helper.make_node("Gemm", ["x", "weight"], ["y"], transB=1) if op == "Gemm"
            else helper.make_node("HeadMatMul", ["x", "weight"], ["y"], domain="edgecpm"))
    graph = helper.make_graph([node], "head", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", k]),
                                               helper.make_tensor_value_info("weight", TensorProto.FLOAT, [n, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["T", n])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                   helper.make_opsetid("edgecpm", 1)]).SerializeToString()


def head_ab(library: Path, threads: int, rounds: int = 7) -> list[dict]:
    import onnxruntime as ort

    rows = []
    rng = np.random.default_rng(2)
    for shape, (n, k), calls in (("wind tunnel", (8192, 256), 50), ("MiniCPM4-0.5B", (73448, 1024), 3)):
        weight = rng.standard_normal((n, k), dtype=np.float32)
        sessions = {}
        for op in ("Gemm", "HeadMatMul"):
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = threads
            opts.add_session_config_entry("session.force_spinning_stop", "1")  # as the runtime's sessions
            opts.register_custom_ops_library(str(library))
            sessions[op] = ort.InferenceSession(head_model(op, n, k), opts, providers=["CPUExecutionProvider"])
        for tokens in (1, 2, 3, 5, 9, 17):
            feeds = {"x": rng.standard_normal((tokens, k), dtype=np.float32), "weight": weight}
            times = {op: [] for op in sessions}
            for r in range(rounds):
                for op in (("Gemm", "HeadMatMul") if r % 2 == 0 else ("HeadMatMul", "Gemm")):
                    sessions[op].run(None, feeds)
                    t0 = time.perf_counter()
                    for _ in range(calls):
                        sessions[op].run(None, feeds)
                    times[op].append((time.perf_counter() - t0) / calls * 1e3)
            gemm, head = common.median(times["Gemm"]), common.median(times["HeadMatMul"])
            rows.append({"shape": shape, "tokens": tokens, "Gemm ms": gemm, "HeadMatMul ms": head,
                         "Gemm / HeadMatMul": gemm / head})
            print(rows[-1], file=sys.stderr)
    return rows


def spin_ab(tmp: Path, threads: int, rounds: int = 4, new_tokens: int = 64) -> dict:
    import edgecpm
    from edgecpm.bundle import load_bundle
    from edgecpm.export.exporter import export_bundle
    from edgecpm.runtimes.onnxruntime import OnnxRuntimeBackend

    config, _ = common.minicpm4_config("MiniCPM4-0.5B")
    bundle = load_bundle(export_bundle(write_ternary_checkpoint(tmp / "ckpt", config, None), tmp / "b",
                                       progress=False))
    sessions = {spin: edgecpm.Session.from_backend(OnnxRuntimeBackend(bundle, threads=threads, spin=spin))
                for spin in (True, False)}
    ids = [1, *np.random.default_rng(0).integers(3, 1000, size=7).tolist()]
    runs = {spin: [] for spin in sessions}
    for r in range(rounds):
        for spin in ((True, False) if r % 2 == 0 else (False, True)):
            s = sessions[spin]
            s.reset()
            s.generate(ids, max_new_tokens=2, ignore_eos=True)
            s.reset()
            runs[spin].append(s.generate(ids, max_new_tokens=new_tokens, ignore_eos=True).stats["decode_tok_s"])
    return {"threads": threads, "kernel": sessions[True].backend.ternary_kernel,
            "decode_tok_s": {"spinning": common.median(runs[True]), "sleeping": common.median(runs[False])},
            "runs": {"spinning": runs[True], "sleeping": runs[False]},
            "spinning_over_sleeping": common.median(runs[True]) / common.median(runs[False])}


def main(argv=None) -> int:
    p = common.arg_parser(__doc__, "kernels")
    args = p.parse_args(argv)
    from edgecpm.runtimes import onnxruntime_ops

    library = onnxruntime_ops.library()
    rng = np.random.default_rng(0)
    rows = []
    for n, where in ((8192, "cache"), (400_000, "memory")):
        model, nbytes = one_node_model("ternary", 4096, n, rng)
        for path in PATHS:
            r = gemv(model, nbytes, 4096, path, library)
            if r["path"] == path:  # this CPU has the path
                rows.append({"op": "TernaryMatMul", "shape": f"4096 -> {n}", "from": where, **r})
                print(rows[-1], file=sys.stderr)
        del model
    for op in ("int8", "int4"):
        model, nbytes = one_node_model(op, 1024, 600_000, rng)
        rows.append({"op": f"QuantMatMul {op}", "shape": "1024 -> 600000", "from": "memory",
                     **gemv(model, nbytes, 1024, None, library)})
        print(rows[-1], file=sys.stderr)
        del model
    with tempfile.TemporaryDirectory(prefix="edgecpm-kernels-") as tmp:
        spin = spin_ab(Path(tmp), args.threads)
    head = head_ab(library, args.threads)
    result = {**common.result_header("kernels", argv, threads=args.threads, isa=onnxruntime_ops.isa(library)),
              "gemv": rows, "spin": spin, "tied_head": head}
    spin_row = [{"session": name, "decode tok/s": v} for name, v in spin["decode_tok_s"].items()]
    return common.finish(result, [common.markdown_table(rows, ["op", "shape", "from", "path", "weight_mib", "ms",
                                                               "gb_per_s"]),
                                  common.markdown_table(spin_row), common.markdown_table(head)],
                         args.output, note=f"spinning / sleeping: {spin['spinning_over_sleeping']:.3f}")


if __name__ == "__main__":
    sys.exit(main())
