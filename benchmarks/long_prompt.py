"""Long prompts: prefill (time to first token) and decode at context N, edgecpm vs llama.cpp, same run (issue 17).

    python benchmarks/long_prompt.py                      # lengths 512 2048 8192
    python benchmarks/long_prompt.py --lengths 32768      # only if you have the time

Needs the llama.cpp peer built as benchmarks/README.md ('quantized.py') says; its helpers are reused from
benchmarks/quantized.py. In a temp folder (or --workdir, kept and reused):
1. a random MiniCPM4-0.5B-shaped fp32 checkpoint (common.write_random_checkpoint, the real 0.5B config,
   N(0, 0.02)) with MiniCPM4's tokenizer files copied in;
2. llama.cpp: convert_hf_to_gguf.py --outtype f32; edgecpm: an fp32 bundle (quantize="none");
3. for each length N, interleaved, each run in its own process (common.run_measured: its peak RSS):
   - edgecpm, attention="auto" (edgecpm's fused attention kernel): one untimed warm-up generation
     (min(N, 512) prompt tokens, 2 new), then one generation of a random N-token prompt and --new-tokens
     new tokens: prefill tok/s of the prompt, decode tok/s of the new tokens at context N;
   - llama.cpp `llama-bench -p N -n 16 -t T -r 1 --repack 0`: prefill tok/s of N tokens, and decode from an
     EMPTY context (llama-bench runs its tests from an empty context);
   - llama.cpp `llama-bench -p 0 -n 16 -d N ...`: decode of 16 tokens at depth N (the N-token context is
     filled untimed first), the number comparable with edgecpm's decode;
   - edgecpm with attention="reference" (the exported graph's attention, the path before the fused kernel)
     only for N <= --reference-max (default 2048: the old path is far too slow at 8K here).
One repeat of each (--rounds to change): the numbers are single runs, not medians.
Writes benchmarks/results/long_prompt.json and prints markdown tables. Exits 2 if the peer is missing, a
conversion fails or edgecpm's onnxruntime kernels cannot be built (as quantized.py does).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common
import quantized
from quantized import PEERS, PeerUnavailable


def llama_runs(peer: dict, path: Path, n: int, args) -> dict:
    """Two llama-bench processes: prefill of N (+ decode from an empty context), and decode at depth N."""
    base = ["-t", args.threads, "-r", 1, "--repack", args.repack, "-o", "json"]
    out = {}
    for key, flags in (("prefill", ["-p", n, "-n", args.new_tokens]), ("depth", ["-p", 0, "-n", args.new_tokens,
                                                                                 "-d", n])):
        cmd = [peer["llama_bench"], "-m", path, *flags, *base]
        res = common.run_measured(cmd, timeout=args.run_timeout)
        run = {"command": " ".join(map(str, cmd)), "peak_rss_bytes": res["peak_rss_bytes"], "wall_s": res["wall_s"]}
        if res["returncode"] != 0:
            tail = (res["stderr"] or res["stdout"]).strip().splitlines()[-5:]
            out[key] = run | {"error": f"exit {res['returncode']}{' ' + res.get('error', '')}: " + " | ".join(tail)}
            continue
        tests = json.loads(res["stdout"])
        run["tests"] = [{k: t.get(k) for k in ("n_prompt", "n_gen", "n_depth", "avg_ts", "avg_ns")} for t in tests]
        if key == "prefill":
            pp = next(t for t in tests if t["n_prompt"] > 0 and t["n_gen"] == 0)
            tg = next(t for t in tests if t["n_gen"] > 0 and t["n_prompt"] == 0)
            run |= {"prefill_tok_s": pp["avg_ts"], "decode_empty_context_tok_s": tg["avg_ts"]}
            run["facts"] = {k: tg.get(k) for k in ("build_commit", "build_number", "cpu_info", "backends", "model_type",
                                                   "model_size", "model_n_params", "type_k", "type_v", "n_threads",
                                                   "n_batch", "n_ubatch", "flash_attn", "repack", "poll", "use_mmap")}
        else:
            tg = next(t for t in tests if t["n_gen"] > 0)
            if tg.get("n_depth") != n:
                run["error"] = f"llama-bench reported n_depth={tg.get('n_depth')}, asked for {n}"
            run["decode_tok_s"] = tg["avg_ts"]
        out[key] = run
    return out


def edgecpm_run(bundle: Path, n: int, attention: str, args, seed: int, profile: bool = False) -> dict:
    cmd = [sys.executable, Path(__file__).resolve(), "--edgecpm-worker", bundle, "--attention", attention,
           "--threads", args.threads, "--prompt-len", n, "--new-tokens", args.new_tokens, "--seed", seed,
           *(["--profile-ops"] if profile else [])]
    out = common.run_measured(cmd, timeout=args.run_timeout)
    run = {"attention": attention, "peak_rss_bytes": out["peak_rss_bytes"], "wall_s": out["wall_s"]}
    if out["returncode"] != 0:
        tail = (out["stderr"] or out["stdout"]).strip().splitlines()[-5:]
        return run | {"error": f"exit {out['returncode']}{' ' + out.get('error', '')}: " + " | ".join(tail)}
    return run | json.loads(out["stdout"].strip().splitlines()[-1])


def memory() -> dict:
    """This process's resident memory in MiB: all, anonymous (heap: packed weights, KV arena,
    activations) and file-backed (memory-mapped weights and libraries), and the peak."""
    status = Path("/proc/self/status").read_text()
    return {k: int(re.search(rf"{k}:\s+(\d+) kB", status).group(1)) / 1024 for k in ("VmRSS", "RssAnon", "RssFile",
                                                                                     "VmHWM")}


def op_profile(session) -> dict:
    """Seconds per onnxruntime op type over the profiled session's runs (its node events)."""
    path = Path(session.end_profiling())
    trace = json.loads(path.read_text())
    path.unlink()
    by_op: dict[str, float] = {}
    for ev in trace:
        if ev.get("cat") == "Node" and ev.get("name", "").endswith("_kernel_time"):
            op = ev["args"]["op_name"]
            by_op[op] = by_op.get(op, 0.0) + ev["dur"] / 1e6
    return dict(sorted(by_op.items(), key=lambda kv: -kv[1]))


def edgecpm_worker(args) -> int:
    """One process: open the bundle with the given attention, warm up, one timed generation; a JSON line.
    With --profile-ops, onnxruntime's profiler is on for it (slower: for the op breakdown, not the speed)."""
    os.environ["EDGECPM_ORT_ATTENTION"] = args.attention  # OnnxRuntimeBackend's `attention` default
    if args.profile_ops:
        import onnxruntime

        class ProfiledOptions(onnxruntime.SessionOptions):  # the backend builds its own options
            def __init__(self):
                super().__init__()
                self.enable_profiling = True
                self.profile_file_prefix = str(Path(tempfile.gettempdir()) / f"edgecpm-ort-profile-{os.getpid()}")

        onnxruntime.SessionOptions = ProfiledOptions
    import edgecpm

    t0 = time.perf_counter()
    s = edgecpm.Session(args.edgecpm_worker, backend="onnxruntime", threads=args.threads,
                        kv_budget=f"{max(1, (args.prompt_len + 1024) // 8192 + 1)}GiB")
    load_s = time.perf_counter() - t0
    after_load = memory()
    rng = np.random.default_rng(args.seed)
    warm = [1, *rng.integers(3, s.config.vocab_size, size=min(args.prompt_len, 512) - 1).tolist()]
    ids = [1, *rng.integers(3, s.config.vocab_size, size=args.prompt_len - 1).tolist()]
    s.generate(warm, max_new_tokens=2, ignore_eos=True)  # pages in the weights, builds the kernels
    s.reset()
    t0 = time.perf_counter()
    st = s.generate(ids, max_new_tokens=args.new_tokens, ignore_eos=True).stats
    total_s = time.perf_counter() - t0
    hwm = re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())
    mem = {"after_load_mib": after_load, "after_generation_mib": memory(),
           "kv_used_mib": s.memory()["kv_used_bytes"] / 2**20}
    if args.profile_ops:
        mem["op_seconds"] = op_profile(s.backend.session)  # warm-up and the generation
    print(json.dumps({"memory": mem, "prefill_tok_s": st["prefill_tok_s"], "decode_tok_s": st["decode_tok_s"],
                      "prompt_tokens": args.prompt_len, "decode_tokens": st["decode_tokens"],
                      "generation_s": total_s, "load_s": load_s, "stats": st,
                      "attention_kernel": s.backend.attention_kernel,
                      "max_prefill_chunk": getattr(s.backend, "max_prefill_chunk", None),
                      "weights_bytes": s.memory()["weights_bytes"],
                      "vm_hwm_bytes": int(hwm.group(1)) * 1024 if hwm else None}, default=str))
    return 0


def main(argv=None) -> int:
    p = common.arg_parser(__doc__, "long_prompt", new_tokens=16)
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192],
                   help="prompt lengths (default: 512 2048 8192; 32768 only if asked, slow on a small CPU)")
    p.add_argument("--reference-max", type=int, default=2048,
                   help="run edgecpm's attention='reference' only at lengths up to this (default: 2048)")
    p.add_argument("--rounds", type=int, default=1, help="runs of every configuration, interleaved (default: 1)")
    p.add_argument("--llama-cpp", type=Path, default=PEERS / "llama.cpp",
                   help="llama.cpp source folder with build/bin (default: ~/.cache/edgecpm/peers/llama.cpp)")
    p.add_argument("--converter-python", type=Path, default=PEERS / "convert-venv" / "bin" / "python",
                   help="Python with torch, transformers, sentencepiece for convert_hf_to_gguf.py")
    p.add_argument("--repack", type=int, default=0, choices=(0, 1), help="llama-bench --repack (default 0)")
    p.add_argument("--workdir", type=Path, default=None,
                   help="keep the checkpoint, GGUF file and bundle here and reuse them (default: a temp folder)")
    p.add_argument("--run-timeout", type=float, default=1200, help="seconds one measured process may take")
    p.add_argument("--profile-ops", action="store_true",
                   help="after the measured runs, one more edgecpm run at the longest length with onnxruntime's "
                        "profiler on: seconds per op type (where the prefill's time goes)")
    p.add_argument("--edgecpm-worker", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--attention", default="auto", help=argparse.SUPPRESS)
    p.add_argument("--prompt-len", type=int, default=512, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.edgecpm_worker is not None:
        return edgecpm_worker(args)

    peer, tok, kernel_isa, dirty = quantized.preflight(args, "long_prompt.py")  # the fused attention is measured
    from edgecpm.config import ModelConfig

    config, source = common.minicpm4_config("MiniCPM4-0.5B")
    config = {k: v for k, v in config.items() if k != "auto_map"}  # no remote code for a random checkpoint
    cfg = ModelConfig.from_dict(config, source=source)
    linear_elements = common.decode_weight_bytes(cfg, 4)["linear_elements"]
    load_before = os.getloadavg()
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="edgecpm-long-prompt-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        ckpt = work / "ckpt-dense"
        if not (ckpt / "model.safetensors").exists():
            t0 = time.perf_counter()
            common.write_random_checkpoint(ckpt, config, seed=0, std=0.02, dtype="fp32")
            print(f"checkpoint: written in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        for f in tok:
            (ckpt / f.name).write_bytes(f.read_bytes())
        try:
            ggufs, prep_logs = quantized.prepare_gguf(peer, work, {"dense": ckpt}, ["fp32"], args.threads,
                                                      linear_elements)
        except PeerUnavailable as e:
            print(f"long_prompt.py: cannot measure against llama.cpp: {e}", file=sys.stderr)
            return 2
        bundle = quantized.prepare_bundles(work, {"dense": ckpt}, ["fp32"])["fp32"]
        if "path" not in bundle:
            print(f"long_prompt.py: {bundle['unavailable']}", file=sys.stderr)
            return 2
        gguf = ggufs["f32"]
        prep_s = time.perf_counter() - t_start

        runs = {n: {"edgecpm": [], "llama.cpp": [], "edgecpm_reference": []} for n in args.lengths}
        for r in range(args.rounds):
            for n in args.lengths:
                plan = [("edgecpm", lambda n=n, r=r: edgecpm_run(bundle["path"], n, "auto", args, r)),
                        ("llama.cpp", lambda n=n: llama_runs(peer, gguf["path"], n, args))]
                if n <= args.reference_max:
                    plan.append(("edgecpm_reference",
                                 lambda n=n, r=r: edgecpm_run(bundle["path"], n, "reference", args, r)))
                for name, fn in plan if r % 2 == 0 else plan[::-1]:
                    t0 = time.perf_counter()
                    run = fn()
                    runs[n][name].append(run)
                    parts = run.values() if name == "llama.cpp" else [run]
                    msg = "; ".join(x.get("error") or ", ".join(f"{k} {x[k]:.2f}" for k in (
                        "prefill_tok_s", "decode_tok_s", "decode_empty_context_tok_s") if k in x) for x in parts)
                    print(f"round {r} N={n} {name} ({time.perf_counter() - t0:.0f} s): {msg}", file=sys.stderr)
        profile = None
        if args.profile_ops:
            profile = edgecpm_run(bundle["path"], max(args.lengths), "auto", args, 0, profile=True)
            print(f"profiled N={max(args.lengths)}: {profile.get('error') or profile['memory']['op_seconds']}",
                  file=sys.stderr)
    load_after = os.getloadavg()

    def mib(b):
        return b / 2**20 if b else ""

    def median_of(rs, key):
        vals = [x[key] for x in rs if key in x and "error" not in x]
        return common.median(vals) if vals else None

    results, rows, ref_rows, failed = {}, [], [], 0
    for n in args.lengths:
        e_runs, l_runs, ref_runs = runs[n]["edgecpm"], runs[n]["llama.cpp"], runs[n]["edgecpm_reference"]
        failed += sum("error" in x for x in e_runs + ref_runs)
        failed += sum("error" in x for lr in l_runs for x in lr.values())
        e = {"runs": e_runs, "prefill_tok_s": median_of(e_runs, "prefill_tok_s"),
             "decode_tok_s": median_of(e_runs, "decode_tok_s"),
             "peak_rss_bytes": max((x["peak_rss_bytes"] or 0 for x in e_runs), default=None),
             "attention_kernel": next((x["attention_kernel"] for x in e_runs if "attention_kernel" in x), None)}
        pre = [lr["prefill"] for lr in l_runs]
        dep = [lr["depth"] for lr in l_runs]
        lc = {"runs": l_runs, "prefill_tok_s": median_of(pre, "prefill_tok_s"),
              "decode_tok_s_at_depth": median_of(dep, "decode_tok_s"),
              "decode_tok_s_empty_context": median_of(pre, "decode_empty_context_tok_s"),
              "peak_rss_bytes_prefill_process": max((x["peak_rss_bytes"] or 0 for x in pre), default=None),
              "peak_rss_bytes_depth_process": max((x["peak_rss_bytes"] or 0 for x in dep), default=None)}
        res = {"edgecpm": e, "llama.cpp": lc}
        if e["prefill_tok_s"] and lc["prefill_tok_s"]:
            res["edgecpm_over_llama"] = {"prefill": e["prefill_tok_s"] / lc["prefill_tok_s"]}
            if e["decode_tok_s"] and lc["decode_tok_s_at_depth"]:
                res["edgecpm_over_llama"]["decode_at_depth"] = e["decode_tok_s"] / lc["decode_tok_s_at_depth"]
        if ref_runs:
            ref = res["edgecpm_reference"] = {
                "runs": ref_runs, "prefill_tok_s": median_of(ref_runs, "prefill_tok_s"),
                "decode_tok_s": median_of(ref_runs, "decode_tok_s"),
                "peak_rss_bytes": max((x["peak_rss_bytes"] or 0 for x in ref_runs), default=None),
                "attention_kernel": next((x["attention_kernel"] for x in ref_runs if "attention_kernel" in x), "none")}
            if ref["prefill_tok_s"] and e["prefill_tok_s"]:
                res["fused_over_reference"] = {"prefill": e["prefill_tok_s"] / ref["prefill_tok_s"],
                                               "decode": e["decode_tok_s"] / ref["decode_tok_s"]}
            ref_rows.append({"prompt tokens": n, "edgecpm reference prefill tok/s": ref["prefill_tok_s"] or "failed",
                             "edgecpm fused prefill tok/s": e["prefill_tok_s"] or "failed",
                             "fused / reference prefill": res.get("fused_over_reference", {}).get("prefill", ""),
                             "reference decode tok/s": ref["decode_tok_s"] or "failed",
                             "fused decode tok/s": e["decode_tok_s"] or "failed",
                             "reference peak RSS MiB": mib(ref["peak_rss_bytes"])})
        results[str(n)] = res
        ratio = res.get("edgecpm_over_llama", {})
        rows.append({"prompt tokens": n, "edgecpm prefill tok/s": e["prefill_tok_s"] or "failed",
                     "llama.cpp prefill tok/s": lc["prefill_tok_s"] or "failed",
                     "prefill edgecpm/llama.cpp": ratio.get("prefill", ""),
                     "edgecpm decode tok/s @N": e["decode_tok_s"] or "failed",
                     "llama.cpp decode tok/s @N": lc["decode_tok_s_at_depth"] or "failed",
                     "decode edgecpm/llama.cpp": ratio.get("decode_at_depth", ""),
                     "llama.cpp decode tok/s @0": lc["decode_tok_s_empty_context"] or "failed",
                     "edgecpm peak RSS MiB": mib(e["peak_rss_bytes"]),
                     "llama.cpp peak RSS MiB (prefill / @N)": f"{mib(lc['peak_rss_bytes_prefill_process']):.0f} / "
                     f"{mib(lc['peak_rss_bytes_depth_process']):.0f}"
                     if lc["peak_rss_bytes_prefill_process"] and lc["peak_rss_bytes_depth_process"] else "failed"})

    facts = next((lr["prefill"]["facts"] for n in args.lengths for lr in runs[n]["llama.cpp"]
                  if "facts" in lr["prefill"]), {})
    result = {
        **common.result_header("long_prompt", argv, threads=args.threads, edgecpm_kernel=kernel_isa,
                               git_modified_files=dirty["stdout"].splitlines(),
                               loadavg_before=load_before, loadavg_after=load_after),
        "model": {"shape": "MiniCPM4-0.5B", "config": source, "params": cfg.n_params(),
                  "checkpoint": "fp32, random N(0, 0.02), norms 1 (common.write_random_checkpoint, seed 0)",
                  "edgecpm": {k: v for k, v in bundle.items() if k != "path"},
                  "llama.cpp": {k: (str(v) if k == "path" else v) for k, v in gguf.items() if k != "path"}},
        "settings": vars(args) | {"output": str(args.output), "llama_cpp": str(args.llama_cpp),
                                  "converter_python": str(args.converter_python), "workdir": str(args.workdir),
                                  "edgecpm_worker": None},
        "method": {
            "repeats": f"{args.rounds} run(s) per configuration; with 1 the numbers are single runs, not medians",
            "edgecpm": "one process per (length, attention): Session on onnxruntime, T threads (spinning), fp32 KV; "
                       "untimed warm-up of min(N, 512) prompt tokens + 2 new, reset, then one generation of a "
                       "random N-token prompt + new_tokens; prefill tok/s = N / prefill time (time to first token), "
                       "decode tok/s = the new tokens at context N",
            "llama.cpp": "llama-bench -p N -n new_tokens (prefill; its tg test decodes from an EMPTY context), and "
                         "llama-bench -p 0 -n new_tokens -d N (decode at depth N, the context filled untimed "
                         "first), each its own process; f16 KV cache (llama-bench's default type_k/type_v), "
                         "flash attention 'auto', threads spin (poll 50), n_batch 2048 / n_ubatch 512, "
                         "its own warm-up untimed",
            "peak_rss": "each process's ru_maxrss (common.run_measured)"},
        "peer": {"what": "llama.cpp vendored in the llama-cpp-python sdist (PyPI), built CPU-only, Release, "
                         "GGML_NATIVE=ON", "source": str(peer["source"].resolve()),
                 "converter": str(peer["converter_class_file"]),
                 "converter_torch": peer["converter_torch"], "converter_transformers": peer["converter_transformers"],
                 "llama_bench": facts},
        "preparation_s": prep_s, "preparation_logs": prep_logs,
        "total_s": time.perf_counter() - t_start,
        "results": results,
        "op_profile": profile and {"prompt_tokens": max(args.lengths), "note": "onnxruntime's profiler on (slower); "
                                   "seconds per op type over the warm-up and one generation", **profile},
    }
    blocks = [common.markdown_table(rows)]
    if ref_rows:
        blocks.append(common.markdown_table(ref_rows))
    status = common.finish(result, blocks, args.output,
                           note=f"{failed} measured runs failed (see 'error' in the JSON)" if failed else "")
    return 1 if failed else status


if __name__ == "__main__":
    sys.exit(main())
