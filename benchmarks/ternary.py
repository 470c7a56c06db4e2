"""BitCPM4 ternary bundles vs the fp32 bundle of the same weights, onnxruntime CPU, same run.

    python benchmarks/ternary.py                    # random ternary 0.5B-shaped checkpoint, 2 threads

Writes a checkpoint with the real MiniCPM4-0.5B shape whose linear weights are fake-quantized like
BitCPM4 (bf16 values in {-s, 0, +s}, s = mean |W| per output row, or per --group-size inputs),
and exports it: the fp32 bundle of the dequantized weights (`quantize="none"`), and the ternary
bundle (TernaryMatMul nodes) with each `ternary_activations`. It runs the ternary bundle five ways:
- "ternary-exact": the default; on edgecpm's own kernel (runtimes/onnxruntime_ops.cpp: fp32
  activations, exact), which this benchmark requires to build (see its module for the headers);
- "ternary-exact-matmulnbits": the fallback where that kernel cannot be built, onnxruntime's 2-bit
  MatMulNBits on 3 int8 digits of the activations (fp32-level; runtimes/ternary_lowering.py);
- "ternary-int16-activations" / "ternary-int8-activations": MatMulNBits on 2 digits (~1e-5) or
  1 (lossy), the bundles exported with those options.
All sessions are open at once and their timed generations are interleaved, so a change of machine
load hits all of them alike. Reports the bundle bytes of the linear weights (bits per weight),
decode and prefill tok/s and their ratios to fp32, the bytes a decode token reads (and the
embedding/lm_head share of them), each session's creation in a fresh process (seconds, RSS after,
peak RSS), and the logits of the ternary runs against the fp32 one. Writes
benchmarks/results/ternary.json.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common


def write_ternary_checkpoint(folder: Path, config: dict, group_size: int | None, seed: int = 0,
                             std: float = 0.02) -> Path:
    """bf16 safetensors, streamed one tensor at a time: linears fake-quantized (ternary.quantize
    of N(0, std)), other matrices N(0, std), norms 1."""
    from edgecpm.export.ternary import linear_names, quantize

    ternary = set(linear_names(config["num_hidden_layers"]))

    def fake_quantize(name, t):  # c * s rounds to c * bf16(s): still ternary
        return quantize(t, group_size or t.shape[1]) if name in ternary else t

    return common.write_random_checkpoint(folder, config, seed, std, dtype="bf16", transform=fake_quantize)


def open_session(bundle: Path, threads: int, kernel: str):
    """A Session whose ternary linears run on `kernel` (OnnxRuntimeBackend's `ternary`)."""
    import edgecpm
    from edgecpm.bundle import load_bundle
    from edgecpm.runtimes.onnxruntime import OnnxRuntimeBackend

    backend = OnnxRuntimeBackend(load_bundle(bundle), threads=threads, ternary=kernel)
    return edgecpm.Session.from_backend(backend, kv_budget="256MiB", path=bundle)


def measure_load(bundle: Path, threads: int, kernel: str) -> dict:
    """Session creation in a fresh process, the bundle's files already read once: seconds, RSS after
    it and peak RSS (onnxruntime folds constant subgraphs at load, which can cost far more memory
    than the weights). The peak is VmHWM: ru_maxrss would carry over the parent's peak across fork
    + exec."""
    code = ("import json, re, sys, time; sys.path.insert(0, sys.argv[1]); import common, edgecpm; "
            "import ternary; from pathlib import Path; "
            "t0 = time.perf_counter(); s = ternary.open_session(Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]); "
            "dt = time.perf_counter() - t0; "
            "hwm = int(re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1)) * 1024; "
            "print(json.dumps({'load_s': dt, 'rss_after_load_bytes': common.current_rss_bytes(), "
            "'peak_rss_bytes': hwm}))")
    for f in bundle.iterdir():  # the file cache warm, as on a device that loads its bundle again
        with open(f, "rb") as data:
            while data.read(1 << 24):
                pass
    out = subprocess.run([sys.executable, "-c", code, str(Path(__file__).resolve().parent), str(bundle), str(threads),
                          kernel],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def prompts(args, vocab: int):
    rng = np.random.default_rng(0)
    for i in range(-1, args.repeats):  # a distinct first token per run: no prefix reuse
        ids = rng.integers(3, vocab, size=args.prompt_len).tolist()
        ids[0] = 1000 + i
        yield ids


def main(argv=None) -> int:
    p = common.arg_parser(__doc__, "ternary", prompt_len=128, new_tokens=32, repeats=3)
    p.add_argument("--group-size", type=int, default=None, help="scale granularity (default: one per row)")
    args = p.parse_args(argv)

    from edgecpm.export.exporter import export_bundle
    from edgecpm.runtimes import onnxruntime_ops
    from edgecpm.ternary_format import matmulnbits_block

    library = onnxruntime_ops.library()  # the exact kernel must be measured, not silently replaced
    load_before = os.getloadavg()
    config, source = common.minicpm4_config("MiniCPM4-0.5B")
    # The ternary bundles keep a dense fp32 embedding / LM head, as the fp32 one does: this compares what
    # runs the linears (quantized.py measures the default int8 head against llama.cpp).
    dense_head = {"lm_head": "dense"}
    exports = {"fp32": {"quantize": "none"}, "ternary": dense_head,
               "ternary-int16": {"ternary_activations": "int16", **dense_head},
               "ternary-int8": {"ternary_activations": "int8", **dense_head}}
    # run name: (bundle, what runs its ternary linears)
    runs = {"fp32": ("fp32", "auto"), "ternary-exact": ("ternary", "edgecpm"),
            "ternary-exact-matmulnbits": ("ternary", "matmulnbits"),
            "ternary-int16-activations": ("ternary-int16", "matmulnbits"),
            "ternary-int8-activations": ("ternary-int8", "matmulnbits")}
    results, exported = {}, {}
    with tempfile.TemporaryDirectory(prefix="edgecpm-bench-") as tmp:
        ckpt = write_ternary_checkpoint(Path(tmp) / "ckpt", config, args.group_size)
        for name, options in exports.items():
            t0 = time.perf_counter()
            bundle = export_bundle(ckpt, Path(tmp) / name, dtype="fp32", progress=False, **options)
            exported[name] = {"export_s": time.perf_counter() - t0,
                              "ternary": json.loads((bundle / "manifest.json").read_text())["ternary"]}
        for name, (bundle, kernel) in runs.items():  # before this process holds any session: the machine has the memory
            results[name] = {"bundle": bundle, **exported[bundle], "runs": []}
            results[name] |= measure_load(Path(tmp) / bundle, args.threads, kernel)
            print(f"{name}: exported in {results[name]['export_s']:.1f} s, loaded in {results[name]['load_s']:.1f} s, "
                  f"peak RSS {results[name]['peak_rss_bytes'] / 2**20:.0f} MiB", file=sys.stderr)
        sessions = {}
        for name, (bundle, kernel) in runs.items():
            s = open_session(Path(tmp) / bundle, args.threads, kernel)
            results[name]["kernel"] = s.backend.ternary_kernel
            results[name]["bundle_weights_bytes"] = s.memory()["weights_bytes"]
            sessions[name] = s
        cfg = s.config
        for i, ids in enumerate(prompts(args, cfg.vocab_size)):
            for name, s in sessions.items():
                new = 4 if i == 0 else args.new_tokens  # run 0: warm-up, pages in the weights
                st = s.generate(ids, max_new_tokens=new, ignore_eos=True).stats
                if i > 0:
                    results[name]["runs"].append({k: st[k] for k in ("prefill_tok_s", "decode_tok_s", "decode_tokens")})
                    print(f"{name} run {i}: prefill {st['prefill_tok_s']:.1f} tok/s, "
                          f"decode {st['decode_tok_s']:.2f} tok/s", file=sys.stderr)
        ref = sessions["fp32"].logits(ids)
        for name, s in sessions.items():
            r = results[name]
            r["logits_rel_err_vs_fp32"] = float(np.abs(s.logits(ids) - ref).max() / np.abs(ref).max())
            r["decode_tok_s"] = common.median([x["decode_tok_s"] for x in r["runs"]])
            r["prefill_tok_s"] = common.median([x["prefill_tok_s"] for x in r["runs"]])
        del s, sessions
    load_after = os.getloadavg()

    # Bytes a decode token reads: every linear weight, the tied lm_head (embedding matrix), norms and
    # one embedding row; the last three stay fp32 in every bundle.
    dense = common.decode_weight_bytes(cfg, 4)
    t = results["ternary-exact"]["ternary"]
    linear_fp32 = dense["linear_elements"] * 4
    linear_packed = t["packed_bytes"] + t["scale_bytes"]
    rest = dense["bytes"] - linear_fp32
    lm_head = dense["lm_head_elements"] * 4
    fp32 = results["fp32"]
    # As MatMulNBits runs them: the 2-bit codes, one fp32 scale per block of inputs
    # and a 2-bit zero point per block.
    blocks = dense["linear_elements"] // matmulnbits_block(math.gcd(*t["group_sizes"]))
    linear_nbits = t["packed_bytes"] + blocks * 4 + blocks // 4
    summary = {
        "linear_bits_per_weight": 8 * linear_packed / dense["linear_elements"],
        "linear_bits_per_weight_matmulnbits": 8 * linear_nbits / dense["linear_elements"],
        "linear_bytes_fp32": linear_fp32,
        "linear_bytes_ternary": linear_packed,
        "bytes_read_per_token_fp32": dense["bytes"],
        "bytes_read_per_token_ternary": linear_packed + rest,
        "lm_head_share_of_bytes_read_ternary": lm_head / (linear_packed + rest),
        "lm_head_share_of_bytes_read_fp32": lm_head / dense["bytes"],
        "bytes_read_per_token_matmulnbits": linear_nbits + rest,
        "lm_head_share_of_bytes_read_matmulnbits": lm_head / (linear_nbits + rest),
    }
    for name in runs:
        if name != "fp32":
            summary[f"{name}_decode_speedup"] = results[name]["decode_tok_s"] / fp32["decode_tok_s"]
            summary[f"{name}_prefill_speedup"] = results[name]["prefill_tok_s"] / fp32["prefill_tok_s"]
    result = {
        **common.result_header("ternary", argv, threads=args.threads, edgecpm_kernel=onnxruntime_ops.isa(library),
                               loadavg_before=load_before, loadavg_after=load_after),
        "model": {"shape": "MiniCPM4-0.5B", "config": source, "params": cfg.n_params(),
                  "linear_scales": f"one per {args.group_size} inputs" if args.group_size else "one per output row"},
        "settings": vars(args) | {"output": str(args.output)},
        "bundles": results,
        "decode_weight_read_fp32": dense,
        "summary": summary,
    }
    rows = [{"run": name, "kernel": r["kernel"] or "dense MatMul", "decode tok/s": r["decode_tok_s"],
             "prefill tok/s": r["prefill_tok_s"],
             "decode vs fp32": r["decode_tok_s"] / fp32["decode_tok_s"],
             "bundle weights (MiB)": r["bundle_weights_bytes"] / 2**20,
             "load s": r["load_s"], "RSS after load (MiB)": r["rss_after_load_bytes"] / 2**20,
             "peak RSS at load (MiB)": r["peak_rss_bytes"] / 2**20,
             "logits rel err vs fp32": r["logits_rel_err_vs_fp32"]} for name, r in results.items()]
    return common.finish(result, [common.markdown_table(rows), common.markdown_table([summary])], args.output)


if __name__ == "__main__":
    sys.exit(main())
