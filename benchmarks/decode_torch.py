"""Prefill and decode speed of the torch backend on a MiniCPM4-0.5B-shaped checkpoint, against
the memory-bandwidth roofline (DESIGN.md §12).

    python benchmarks/decode_torch.py                       # random 0.5B-shaped fp32 checkpoint in a temp folder
    python benchmarks/decode_torch.py --checkpoint /data/ck  # use (or create, if absent) this checkpoint folder

The checkpoint has the real MiniCPM4-0.5B shape (../shared/minicpm4/MiniCPM4-0.5B/config.json, or
an embedded copy of it) with random weights (N(0, 0.02), norms 1): speed does not depend on the
values. Decode is memory-bound: each token reads every weight once, so
    roofline time per token = weight bytes read per token / measured memory bandwidth
(the bandwidth read the way the backend reads its weights: torch matmuls of the 0.5B linear shape
on the same threads)
and `roofline_fraction` = roofline time / measured time per token (1.0 = at the bandwidth limit).
Writes benchmarks/results/decode_torch.json and prints a markdown table.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from edgecpm import dtypes

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common


def parse_args(argv=None):
    p = common.arg_parser(__doc__, "decode_torch", prompt_len=128, new_tokens=64, repeats=3)
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="checkpoint folder to use; created with random weights if it has no config.json")
    p.add_argument("--dtype", default="fp32", choices=dtypes.NAMES, help="compute dtype (default: fp32)")
    p.add_argument("--bandwidth-mib", type=int, default=512, help="size of the bandwidth test array (default: 512)")
    return p.parse_args(argv)


def run(args, folder: Path) -> dict:
    import torch

    import edgecpm
    from edgecpm.bench import peak_rss_bytes

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    s = edgecpm.Session(folder, backend="torch", kv_budget="1GiB", dtype=args.dtype, threads=args.threads)
    load_s = time.perf_counter() - t0
    rss_after_load = common.current_rss_bytes()
    cfg = s.config
    rng = np.random.default_rng(0)

    def prompt(i: int) -> list[int]:
        # A different first token each run, so no run reuses another's cached prefix.
        ids = rng.integers(3, cfg.vocab_size, size=args.prompt_len).tolist()
        ids[0] = 1000 + i
        return ids

    # Warm-up (not timed): one full-size prefill + a few decode steps faults in every weight page
    # (the torch backend memory-maps fp32 safetensors) and the KV rows the timed runs use.
    s.generate(prompt(-1), max_new_tokens=8, ignore_eos=True)
    runs = []
    for i in range(args.repeats):
        g = s.generate(prompt(i), max_new_tokens=args.new_tokens, ignore_eos=True)
        st = g.stats
        assert st["prefill_tokens"] == args.prompt_len, st  # a full prefill, no cached prefix
        runs.append({"prefill_tok_s": st["prefill_tok_s"], "decode_tok_s": st["decode_tok_s"],
                     "decode_tokens": st["decode_tokens"], "total_s": st["total_s"]})
        print(f"run {i}: prefill {st['prefill_tok_s']:.1f} tok/s, decode {st['decode_tok_s']:.2f} tok/s",
              file=sys.stderr)
    peak_rss = peak_rss_bytes()  # before the bandwidth test allocates its arrays
    weight_bytes_held = s.backend.weight_bytes
    bytes_per_weight = torch.empty((), dtype=s.backend.dtype).element_size()
    del s
    return {"load_s": load_s, "rss_after_load_bytes": rss_after_load, "peak_rss_bytes": peak_rss,
            "weights_held_bytes": weight_bytes_held, "bytes_per_weight": bytes_per_weight, "runs": runs,
            "config": cfg}


def torch_gemv_bandwidth(threads: int, size_bytes: int, k: int = 1024, n: int = 4096, repeats: int = 5) -> dict:
    """Weight-read bandwidth the way the torch backend reads a decode step's weights: one-row fp32
    matmuls x [1, k] @ W.T with W [n, k] (nn.Linear's layout, MiniCPM4-0.5B's linear shape) over
    `size_bytes` of weights, on `threads` torch threads. Best of N: weight bytes / seconds."""
    import torch

    torch.set_num_threads(threads)
    weights = [torch.randn(n, k) for _ in range(max(1, size_bytes // (4 * k * n)))]
    x = torch.ones(1, k)

    def read_all():
        for w in weights:
            torch.nn.functional.linear(x, w)

    with torch.inference_mode():
        read_all()  # warm-up
        times = common.timings(read_all, repeats)
    total = sum(w.numel() * 4 for w in weights)
    return {"bytes_per_s": total / min(times), "weight_bytes": total, "threads": threads, "times_s": times,
            "method": f"torch: {len(weights)} fp32 linear layers [{n},{k}] applied to one row on {threads} threads, "
                      f"best of {repeats}, weight bytes read / s"}


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    import edgecpm

    tmp = None
    if args.checkpoint is not None and (args.checkpoint / "config.json").exists():
        folder, made = args.checkpoint, False
        source = f"existing checkpoint {folder}"
    else:
        if args.checkpoint is None:
            tmp = tempfile.TemporaryDirectory(prefix="edgecpm-bench-")
            folder = Path(tmp.name)
        else:
            folder = args.checkpoint
        config, config_source = common.minicpm4_config("MiniCPM4-0.5B")
        t0 = time.perf_counter()
        common.write_random_checkpoint(folder, config, seed=0, std=0.02, dtype=np.float32)
        print(f"wrote a random MiniCPM4-0.5B-shaped checkpoint to {folder} in {time.perf_counter() - t0:.1f} s",
              file=sys.stderr)
        source, made = f"random N(0,0.02) fp32 weights, config from {config_source}", True

    load_before = os.getloadavg()
    try:
        m = run(args, folder)
        disk_bytes = (folder / "model.safetensors").stat().st_size if (folder / "model.safetensors").exists() else None
    finally:
        if tmp is not None:
            tmp.cleanup()

    bw = torch_gemv_bandwidth(args.threads, args.bandwidth_mib * 2**20)  # read the way torch reads weights
    copy_bw = common.memory_bandwidth(args.bandwidth_mib * 2**20)
    cfg = m["config"]
    read = common.decode_weight_bytes(cfg, m["bytes_per_weight"])
    prefill = common.median([r["prefill_tok_s"] for r in m["runs"]])
    decode = common.median([r["decode_tok_s"] for r in m["runs"]])
    roofline_s = read["bytes"] / bw["bytes_per_s"]
    measured_s = 1.0 / decode
    result = {
        # 1/5/15-minute load averages: other processes on a shared machine skew the runs.
        **common.result_header("decode_torch", argv, torch=torch.__version__, edgecpm=edgecpm.__version__,
                               torch_threads=args.threads, loadavg_before=load_before, loadavg_after=os.getloadavg()),
        "model": {"shape": "MiniCPM4-0.5B" if made else "the checkpoint's config.json", "checkpoint": source,
                  "created_here": made,
                  "params": cfg.n_params(), "checkpoint_bytes": disk_bytes, "dtype": args.dtype,
                  "weights_held_bytes": m["weights_held_bytes"]},
        "settings": {"prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "repeats": args.repeats,
                     "ignore_eos": True, "kv_budget": "1GiB", "backend": "torch"},
        "load_s": m["load_s"],
        "prefill_tok_s": prefill,
        "decode_tok_s": decode,
        "decode_ms_per_token": 1000 * measured_s,
        "prefill_tok_s_best": max(r["prefill_tok_s"] for r in m["runs"]),
        "decode_tok_s_best": max(r["decode_tok_s"] for r in m["runs"]),
        "runs": m["runs"],
        "rss_after_load_bytes": m["rss_after_load_bytes"],
        "peak_rss_bytes": m["peak_rss_bytes"],
        "memory_bandwidth": bw,
        "copy_bandwidth_one_thread": copy_bw,
        "decode_weight_read": read,
        "roofline_ms_per_token": 1000 * roofline_s,
        "roofline_tok_s": 1.0 / roofline_s,
        "roofline_fraction": roofline_s / measured_s,
    }
    mib = 2**20
    row = {
        "backend": f"torch {args.dtype}, {args.threads} threads",
        "prefill tok/s": prefill,
        "decode tok/s": decode,
        "ms/token": 1000 * measured_s,
        "weights read/token (MiB)": read["bytes"] / mib,
        "bandwidth (GB/s)": bw["bytes_per_s"] / 1e9,
        "roofline ms/token": 1000 * roofline_s,
        "roofline fraction": roofline_s / measured_s,
        "peak RSS (MiB)": m["peak_rss_bytes"] / mib,
    }
    shape = "MiniCPM4-0.5B shape" if made else f"{folder}"
    caption = (f"\n{shape} ({cfg.n_params() / 1e6:.1f} M params), prompt {args.prompt_len}, "
               f"{args.new_tokens} new tokens, median of {args.repeats}")
    return common.finish(result, [caption, common.markdown_table([row])], args.output)


if __name__ == "__main__":
    sys.exit(main())
