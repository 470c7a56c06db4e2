"""onnxruntime vs torch backend on a MiniCPM4-0.5B-shaped checkpoint, same run (DESIGN.md §12).

    python benchmarks/decode_ort.py                 # random 0.5B-shaped fp32 checkpoint, 2 threads

Measures, for each backend: prefill and decode tok/s (median of --repeats), and for onnxruntime
also the memory roofline fraction of decode (weight bytes read per token / measured bandwidth,
divided by the measured time per token) and the Python overhead per decode step: the share of a
step's wall time spent outside `InferenceSession.run_with_iobinding` (binding, sampling, the
generation loop). Writes benchmarks/results/decode_ort.json and prints a markdown table.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common


def timed_runs(session, args, vocab: int) -> list[dict]:
    rng = np.random.default_rng(0)

    def prompt(i):  # a distinct first token per run: no run reuses another's cached prefix
        ids = rng.integers(3, vocab, size=args.prompt_len).tolist()
        ids[0] = 1000 + i
        return ids

    session.generate(prompt(-1), max_new_tokens=4, ignore_eos=True)  # warm-up: page in the weights
    runs = []
    for i in range(args.repeats):
        st = session.generate(prompt(i), max_new_tokens=args.new_tokens, ignore_eos=True).stats
        runs.append({k: st[k] for k in ("prefill_tok_s", "decode_tok_s", "decode_tokens")})
        print(f"{session.backend.name} run {i}: prefill {st['prefill_tok_s']:.1f} tok/s, "
              f"decode {st['decode_tok_s']:.2f} tok/s", file=sys.stderr)
    return runs


def python_overhead(session, args, vocab: int) -> dict:
    """Decode steps timed end to end and inside onnxruntime's run call."""
    from edgecpm.generate import decode_one_token

    ort_session = session.backend.session
    inside = []
    real_run = ort_session.run_with_iobinding

    def run_with_iobinding(binding, *a):
        t0 = time.perf_counter()
        real_run(binding, *a)
        inside.append(time.perf_counter() - t0)

    ort_session.run_with_iobinding = run_with_iobinding
    session.logits(np.random.default_rng(1).integers(3, vocab, size=args.prompt_len).tolist())
    inside.clear()
    total = []
    token = 7
    for _ in range(args.new_tokens):
        t0 = time.perf_counter()
        logits = decode_one_token(session.backend, session.cache, token)
        token = int(np.argmax(logits))  # the per-step work of greedy generation
        total.append(time.perf_counter() - t0)
    ort_session.run_with_iobinding = real_run
    step, ort = float(np.median(total)), float(np.median(inside))
    return {"step_ms": 1000 * step, "inside_ort_ms": 1000 * ort, "overhead_fraction": (step - ort) / step}


def main(argv=None) -> int:
    p = common.arg_parser(__doc__, "decode_ort", prompt_len=128, new_tokens=32, repeats=3)
    args = p.parse_args(argv)

    import edgecpm
    from edgecpm.bench import peak_rss_bytes
    from edgecpm.export.exporter import export_bundle

    with tempfile.TemporaryDirectory(prefix="edgecpm-bench-") as tmp:
        ckpt, bundle = Path(tmp) / "ckpt", Path(tmp) / "bundle"
        config, source = common.minicpm4_config("MiniCPM4-0.5B")
        common.write_random_checkpoint(ckpt, config, seed=0, std=0.02, dtype=np.float32)
        t0 = time.perf_counter()
        export_bundle(ckpt, bundle, dtype="fp32", progress=False)
        export_s = time.perf_counter() - t0
        results = {}
        for backend, path in (("onnxruntime", bundle), ("torch", ckpt)):
            s = edgecpm.Session(path, backend=backend, kv_budget="256MiB", threads=args.threads)
            runs = timed_runs(s, args, s.config.vocab_size)
            results[backend] = {
                "prefill_tok_s": common.median([r["prefill_tok_s"] for r in runs]),
                "decode_tok_s": common.median([r["decode_tok_s"] for r in runs]),
                "runs": runs,
            }
            if backend == "onnxruntime":
                results[backend]["python_overhead"] = python_overhead(s, args, s.config.vocab_size)
            cfg = s.config
            del s
        peak_rss = peak_rss_bytes()

    bw = common.gemv_bandwidth(args.threads)  # read the way the runtime reads its weights
    copy_bw = common.memory_bandwidth()
    read = common.decode_weight_bytes(cfg, 4)
    roofline_s = read["bytes"] / bw["bytes_per_s"]
    ort, pt = results["onnxruntime"], results["torch"]
    summary = {
        "ort_over_torch_decode": ort["decode_tok_s"] / pt["decode_tok_s"],
        "ort_over_torch_prefill": ort["prefill_tok_s"] / pt["prefill_tok_s"],
        "ort_roofline_fraction": roofline_s * ort["decode_tok_s"],
        "torch_roofline_fraction": roofline_s * pt["decode_tok_s"],
        "ort_python_overhead_fraction": ort["python_overhead"]["overhead_fraction"],
    }
    result = {
        **common.result_header("decode_ort", argv, threads=args.threads),
        "model": {"shape": "MiniCPM4-0.5B", "config": source, "params": cfg.n_params(), "dtype": "fp32"},
        "settings": vars(args) | {"output": str(args.output)},
        "export_s": export_s,
        "backends": results,
        "memory_bandwidth": bw,
        "copy_bandwidth_one_thread": copy_bw,
        "decode_weight_read": read,
        "roofline_ms_per_token": 1000 * roofline_s,
        "peak_rss_bytes": peak_rss,
        "summary": summary,
    }
    rows = [{"backend": name, "prefill tok/s": r["prefill_tok_s"], "decode tok/s": r["decode_tok_s"],
             "roofline fraction": roofline_s * r["decode_tok_s"]} for name, r in results.items()]
    return common.finish(result, [common.markdown_table(rows), common.markdown_table([summary])], args.output)


if __name__ == "__main__":
    sys.exit(main())
