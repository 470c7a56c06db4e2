"""edgecpm vs llama.cpp on the same MiniCPM4-0.5B-shaped weights, per precision, same run (issue 16).

    python benchmarks/quantized.py          # needs the llama.cpp peer, built as benchmarks/README.md says

The peer is llama.cpp as vendored in the `llama-cpp-python` sdist from PyPI, built CPU-only outside
this repository (default: ~/.cache/edgecpm/peers/llama.cpp with build/bin/llama-bench and
llama-quantize, and a Python for its converter with torch, transformers and sentencepiece at
~/.cache/edgecpm/peers/convert-venv). Nothing of llama.cpp lives in this repository.

What it does, in a temp folder (or --workdir, kept and reused):
1. two random MiniCPM4-0.5B-shaped bf16 checkpoints (common.write_random_checkpoint): "dense"
   (N(0, 0.02) weights) and "ternary" (benchmarks/ternary.py's recipe: the 168 linears
   fake-quantized like BitCPM4, one scale per row), each with the shipped MiniCPM4 tokenizer files
   from ../shared/minicpm4 copied in (llama.cpp's converter needs tokenizer.model);
2. llama.cpp: convert_hf_to_gguf.py --outtype f32, then llama-quantize to f16, q8_0 and q4_0 (dense)
   and tq2_0 (ternary), each with llama.cpp's default embedding / LM head type (q8_0 under q8_0, q6_K
   under q4_0 and tq2_0);
3. edgecpm: bundles `fp32` and `fp16` (quantize="none"), `int8` and `int4` (quantize="int8"/"int4")
   from the dense checkpoint, and the exact ternary bundle (2-bit codes) from the ternary one, each
   with edgecpm's default embedding / LM head (int8 under int8, int4 and ternary: --lm-head), and
   the ternary bundle once more with an int4 head (`ternary-int4-head`); for quantized heads, the
   logit error of the quantized head against the checkpoint's dense one on the same hidden
   states (the bundle's `hidden` output) of a random 64-token prompt;
4. --rounds rounds; in each, every run once, in one process each: llama-bench -p P -n N -t T -r 1
   --repack R (its own warm-up untimed) and an edgecpm worker process (Session on onnxruntime,
   T threads: one untimed 4-token warm-up, then one generation of a random P-token prompt and N new
   tokens). The order within a round alternates between rounds. Reported: medians over rounds of
   prefill and decode tok/s, edgecpm / llama.cpp ratios per precision, weight bytes (file, tensors,
   bits per weight of the linears and of all weights), peak RSS of each process (its ru_maxrss), and
   which kernel ran edgecpm's linears.
Writes benchmarks/results/quantized.json and prints markdown tables.

If the peer is missing, a conversion fails or edgecpm's onnxruntime kernels (runtimes/onnxruntime_ops.cpp:
ternary linears, fused attention; they need onnxruntime's C API headers) cannot be built, it says
exactly what and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

PEERS = Path.home() / ".cache" / "edgecpm" / "peers"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")  # shared by 0.5B and 8B, in SHARED
MODEL_TOKENIZER_FILES = ("tokenizer_config.json", "added_tokens.json", "special_tokens_map.json",
                         "generation_config.json")  # in SHARED / MiniCPM4-0.5B

# precision: the checkpoint it is made from, llama.cpp's runs (name, llama-quantize type or None for
# the converter's f32 file, extra llama-quantize arguments) and edgecpm's export_bundle options.
# Each side with its default embedding / LM head: edgecpm int8 (per 128 inputs) under int8, int4 and
# ternary, llama.cpp q8_0 under q8_0 and q6_K under q4_0 and tq2_0.
PRECISIONS = {
    "fp32": {"checkpoint": "dense", "edgecpm": {"quantize": "none"},
             "llama": [("f32", None, [])]},
    "fp16": {"checkpoint": "dense", "edgecpm": {"quantize": "none", "dtype": "fp16"},
             "llama": [("f16", "f16", [])]},
    "int8": {"checkpoint": "dense", "edgecpm": {"quantize": "int8"},
             "llama": [("q8_0", "q8_0", [])]},
    "int4": {"checkpoint": "dense", "edgecpm": {"quantize": "int4"},
             "llama": [("q4_0", "q4_0", [])]},
    "ternary": {"checkpoint": "ternary", "edgecpm": {},
                "llama": [("tq2_0", "tq2_0", [])]},
    # The same with a 4-bit head: fewer bytes a token (llama.cpp's q6_K head lies between), more error.
    "ternary-int4-head": {"checkpoint": "ternary", "edgecpm": {"lm_head": "int4"},
                          "llama": [("tq2_0", "tq2_0", [])]},
}

# Run by the converter's Python: every tensor of a GGUF file (name, type, elements, bytes).
_GGUF_TENSORS = """
import json, sys
sys.path.insert(0, sys.argv[1])
from gguf import GGUFReader
r = GGUFReader(sys.argv[2])
print(json.dumps([[t.name, t.tensor_type.name, int(t.n_elements), int(t.n_bytes)] for t in r.tensors]))
"""


class PeerUnavailable(RuntimeError):
    """The llama.cpp peer (or what converting a checkpoint for it needs) is not here."""


def build_help(llama: Path) -> str:
    return (f"Build the peer as benchmarks/README.md ('quantized.py') says: llama.cpp from the llama-cpp-python "
            f"sdist, CPU only, into {llama}/build, and its converter's venv at {PEERS / 'convert-venv'}.")


def find_peer(args) -> dict:
    """Paths of the peer's tools, checked; PeerUnavailable says what is missing."""
    llama = args.llama_cpp.expanduser()
    bin_dir = llama / "build" / "bin"
    peer = {"source": llama, "llama_bench": bin_dir / "llama-bench", "llama_quantize": bin_dir / "llama-quantize",
            "converter": llama / "convert_hf_to_gguf.py", "gguf_py": llama / "gguf-py",
            "python": args.converter_python.expanduser()}
    for key in ("llama_bench", "llama_quantize", "converter", "gguf_py", "python"):
        if not peer[key].exists():
            raise PeerUnavailable(f"{peer[key]} not found. {build_help(llama)}")
    registered = [p for p in [peer["converter"], *sorted((llama / "conversion").glob("*.py"))]
                  if 'register("MiniCPMForCausalLM")' in p.read_text(errors="replace")]
    if not registered:
        raise PeerUnavailable(f"{peer['converter']}: this llama.cpp's converter does not register "
                              "MiniCPMForCausalLM, so it cannot convert a MiniCPM4 checkpoint")
    peer["converter_class_file"] = registered[0]
    check = common.run_measured([peer["python"], "-c", "import torch, transformers, sentencepiece, numpy; "
                                 "print(torch.__version__, transformers.__version__)"], timeout=300)
    if check["returncode"] != 0:
        raise PeerUnavailable(f"{peer['python']} cannot import what the converter needs (torch, transformers, "
                              f"sentencepiece): {check['stderr'].strip()[-500:]}")
    peer["converter_torch"], peer["converter_transformers"] = check["stdout"].split()
    for tool in ("llama_bench", "llama_quantize"):
        out = common.run_measured([peer[tool], "--help"], timeout=60)
        if out["returncode"] not in (0, 1) or "usage" not in (out["stdout"] + out["stderr"]).lower():
            raise PeerUnavailable(f"{peer[tool]} --help failed (exit {out['returncode']}): "
                                  f"{(out['stderr'] or out['stdout']).strip()[-500:]}")
    if "--repack" not in common.run_measured([peer["llama_bench"], "--help"], timeout=60)["stdout"]:
        raise PeerUnavailable(f"{peer['llama_bench']} has no --repack option (this benchmark sets it)")
    return peer


def tokenizer_sources() -> list[Path]:
    files = [common.SHARED / f for f in TOKENIZER_FILES]
    files += [common.SHARED / "MiniCPM4-0.5B" / f for f in MODEL_TOKENIZER_FILES]
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise PeerUnavailable("llama.cpp's converter needs MiniCPM4's tokenizer files next to the checkpoint "
                              f"(vocab 73448); not found: {', '.join(missing)}")
    return files


def run_checked(cmd: list, what: str, timeout: float) -> dict:
    out = common.run_measured(cmd, timeout=timeout)
    if out["returncode"] != 0:
        tail = "\n".join((out["stderr"] + out["stdout"]).strip().splitlines()[-25:])
        raise PeerUnavailable(f"{what} failed (exit {out['returncode']}{', ' + out['error'] if 'error' in out else ''})"
                              f":\n  {' '.join(map(str, cmd))}\n{tail}")
    return out


def gguf_tensors(peer: dict, path: Path) -> list[list]:
    out = run_checked([peer["python"], "-c", _GGUF_TENSORS, peer["gguf_py"], path], f"reading {path.name}", 300)
    return json.loads(out["stdout"].strip().splitlines()[-1])


def weight_summary(tensors: list[list], linear_elements: int) -> dict:
    """Bytes of a GGUF model's tensors: all, the linears (attn_*/ffn_* matrices), the tied embedding."""
    linear = [t for t in tensors if re.search(r"\.(attn_(q|k|v|output)|ffn_(gate|up|down))\.weight$", t[0])]
    embd = [t for t in tensors if t[0] == "token_embd.weight"]
    weights = [t for t in tensors if not t[0].startswith("rope_factors")]  # model weights, not rope tables
    linear_bytes = sum(t[3] for t in linear)
    if sum(t[2] for t in linear) != linear_elements:
        raise PeerUnavailable(f"the GGUF file's linear tensors hold {sum(t[2] for t in linear)} weights, "
                              f"expected {linear_elements}")
    return {"tensor_bytes": sum(t[3] for t in tensors), "linear_bytes": linear_bytes,
            "linear_bits_per_weight": 8 * linear_bytes / linear_elements,
            "bits_per_weight": 8 * sum(t[3] for t in weights) / sum(t[2] for t in weights),
            "linear_types": sorted({t[1] for t in linear}),
            "embedding_type": embd[0][1] if embd else None, "embedding_bytes": embd[0][3] if embd else None}


def converter_facts(out: dict) -> list[str]:
    """The converter's lines on the model it wrote (architecture, rope scaling, MiniCPM's scales)."""
    lines = (out["stderr"] + out["stdout"]).splitlines()
    return [line[:200] for line in lines if "gguf: " in line or "Model architecture" in line or "rope_factors" in line]


def prepare_checkpoints(work: Path, config: dict) -> dict[str, Path]:
    import ternary

    config = {k: v for k, v in config.items() if k != "auto_map"}  # no remote code for a random checkpoint
    tok = tokenizer_sources()
    folders = {}
    for kind in ("dense", "ternary"):
        folder = work / f"ckpt-{kind}"
        if not (folder / "model.safetensors").exists():
            t0 = time.perf_counter()
            if kind == "dense":
                common.write_random_checkpoint(folder, config, seed=0, std=0.02, dtype="bf16")
            else:
                ternary.write_ternary_checkpoint(folder, config, group_size=None, seed=0)
            print(f"checkpoint {kind}: written in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        for f in tok:
            shutil.copyfile(f, folder / f.name)
        folders[kind] = folder
    return folders


def prepare_gguf(peer: dict, work: Path, checkpoints: dict[str, Path], precisions: list[str], threads: int,
                 linear_elements: int) -> dict[str, dict]:
    """Convert and quantize; returns {llama run name: {path, type, quantize log facts, weights}}."""
    files, logs = {}, {}
    for precision in precisions:
        kind = PRECISIONS[precision]["checkpoint"]
        f32 = work / f"{kind}-f32.gguf"
        if not f32.exists():
            t0 = time.perf_counter()
            out = run_checked([peer["python"], peer["converter"], checkpoints[kind], "--outtype", "f32",
                               "--outfile", str(f32) + ".tmp"], f"converting the {kind} checkpoint to GGUF", 1800)
            Path(str(f32) + ".tmp").replace(f32)
            logs[f"convert-{kind}"] = {"seconds": time.perf_counter() - t0, "model_facts": converter_facts(out)}
            print(f"converted {kind} to {f32.name} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        for name, qtype, extra in PRECISIONS[precision]["llama"]:
            path = f32 if qtype is None else work / f"{kind}-{name}.gguf"
            if not path.exists():
                t0 = time.perf_counter()
                out = run_checked([peer["llama_quantize"], *extra, f32, str(path) + ".tmp", qtype, threads],
                                  f"llama-quantize {name}", 1800)
                Path(str(path) + ".tmp").replace(path)
                logs[f"quantize-{name}"] = {"seconds": time.perf_counter() - t0, "log_tail": [
                    line[:200] for line in (out["stderr"] + out["stdout"]).strip().splitlines()[-6:]]}
                print(f"quantized {name} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
            files[name] = {"path": path, "file_bytes": path.stat().st_size, "quantize_args": [*extra, qtype],
                           **weight_summary(gguf_tensors(peer, path), linear_elements)}
    return files, logs


def prepare_bundles(work: Path, checkpoints: dict[str, Path], precisions: list[str]) -> dict[str, dict]:
    from edgecpm.export.exporter import export_bundle

    bundles = {}
    for precision in precisions:
        spec = PRECISIONS[precision]
        out = work / f"bundle-{precision}"
        entry = {"export_options": spec["edgecpm"]}
        if not (out / "manifest.json").exists():
            t0 = time.perf_counter()
            try:
                export_bundle(checkpoints[spec["checkpoint"]], out, progress=False, force=True,
                              **{"dtype": "fp32", **spec["edgecpm"]})
            except (ValueError, TypeError, NotImplementedError) as e:  # this edgecpm cannot export it
                shutil.rmtree(out, ignore_errors=True)
                bundles[precision] = entry | {"unavailable": f"edgecpm export {spec['edgecpm']}: {e}"}
                print(f"bundle {precision}: not available ({e})", file=sys.stderr)
                continue
            entry["export_s"] = time.perf_counter() - t0
            print(f"exported bundle {precision} in {entry['export_s']:.0f} s", file=sys.stderr)
        entry["path"] = out
        entry["file_bytes"] = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
        manifest = json.loads((out / "manifest.json").read_text())
        entry["manifest"] = {k: {f: v for f, v in manifest[k].items() if f != "tensors"}  # the summary, not per tensor
                             if isinstance(manifest[k], dict) else manifest[k]
                             for k in ("ternary", "quantization", "lm_head") if k in manifest}
        entry["dtype"] = manifest["dtype"]
        if manifest.get("lm_head"):
            entry["lm_head_error"] = head_error(out, checkpoints[spec["checkpoint"]])
        bundles[precision] = entry
    return bundles


def head_error(bundle: Path, checkpoint: Path, tokens: int = 64) -> dict:
    """The logit error of a bundle's quantized LM head against the checkpoint's dense one, on the same
    hidden states (the bundle's `hidden` output: the head's input) of a random prompt."""
    import edgecpm
    from edgecpm.safetensors_files import checkpoint_tensors

    s = edgecpm.Session(bundle, backend="onnxruntime", kv_budget="64MiB")
    ids = [1, *np.random.default_rng(1).integers(3, s.config.vocab_size, size=tokens - 1).tolist()]
    got = s.logits(ids)
    hidden = s.backend.last_hidden
    ref = hidden @ checkpoint_tensors(checkpoint)["model.embed_tokens.weight"].read_float().T
    return {"positions": tokens, "logit_rel_error": float(np.linalg.norm(got - ref) / np.linalg.norm(ref)),
            "logit_max_abs_error": float(np.abs(got - ref).max()),
            "top1_agreement": float(np.mean(got.argmax(1) == ref.argmax(1)))}


# ---- one measured run of each engine ----------------------------------------------------------
def llama_run(peer: dict, path: Path, args) -> dict:
    cmd = [peer["llama_bench"], "-m", path, "-p", args.prompt_len, "-n", args.new_tokens, "-t", args.threads,
           "-r", 1, "--repack", args.repack, "-o", "json"]
    out = common.run_measured(cmd, timeout=args.run_timeout)
    run = {"command": " ".join(map(str, cmd)), "peak_rss_bytes": out["peak_rss_bytes"], "wall_s": out["wall_s"]}
    if out["returncode"] != 0:
        tail = (out["stderr"] or out["stdout"]).strip().splitlines()[-5:]
        return run | {"error": f"exit {out['returncode']}{' ' + out.get('error', '')}: " + " | ".join(tail)}
    tests = json.loads(out["stdout"])
    pp = next(t for t in tests if t["n_prompt"] > 0 and t["n_gen"] == 0)
    tg = next(t for t in tests if t["n_gen"] > 0 and t["n_prompt"] == 0)
    return run | {"prefill_tok_s": pp["avg_ts"], "decode_tok_s": tg["avg_ts"],
                  "facts": {k: tg.get(k) for k in ("build_commit", "build_number", "cpu_info", "backends",
                                                   "model_type", "model_size", "model_n_params", "type_k",
                                                   "n_threads", "n_batch", "n_ubatch", "flash_attn", "repack",
                                                   "load_mode", "poll")}}


def edgecpm_run(bundle: Path, args, seed: int) -> dict:
    cmd = [sys.executable, Path(__file__).resolve(), "--edgecpm-worker", bundle, "--threads", args.threads,
           "--prompt-len", args.prompt_len, "--new-tokens", args.new_tokens, "--seed", seed]
    out = common.run_measured(cmd, timeout=args.run_timeout)
    run = {"peak_rss_bytes": out["peak_rss_bytes"], "wall_s": out["wall_s"]}
    if out["returncode"] != 0:
        tail = (out["stderr"] or out["stdout"]).strip().splitlines()[-5:]
        return run | {"error": f"exit {out['returncode']}{' ' + out.get('error', '')}: " + " | ".join(tail)}
    return run | json.loads(out["stdout"].strip().splitlines()[-1])


def edgecpm_worker(args) -> int:
    """One process, one bundle: open, warm up, one timed generation; prints a JSON line."""
    import edgecpm

    t0 = time.perf_counter()
    s = edgecpm.Session(args.edgecpm_worker, backend="onnxruntime", threads=args.threads, kv_budget="256MiB")
    load_s = time.perf_counter() - t0
    rng = np.random.default_rng(args.seed)
    warm, ids = ([1, *rng.integers(3, s.config.vocab_size, size=args.prompt_len - 1).tolist()] for _ in range(2))
    s.generate(warm, max_new_tokens=4, ignore_eos=True)  # pages in the weights, builds the kernels
    s.reset()
    st = s.generate(ids, max_new_tokens=args.new_tokens, ignore_eos=True).stats
    hwm = re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())
    print(json.dumps({"prefill_tok_s": st["prefill_tok_s"], "decode_tok_s": st["decode_tok_s"],
                      "decode_tokens": st["decode_tokens"], "load_s": load_s,
                      "weights_bytes": s.memory()["weights_bytes"], "ternary_kernel": s.backend.ternary_kernel,
                      "quant_kernel": s.backend.quant_kernel,
                      "vm_hwm_bytes": int(hwm.group(1)) * 1024 if hwm else None}))
    return 0


# ---- the benchmark ---------------------------------------------------------------------------
def summarize(runs: list[dict]) -> dict:
    ok = [r for r in runs if "error" not in r]
    out = {"runs": runs, "failed_runs": len(runs) - len(ok)}
    if ok:
        out |= {"prefill_tok_s": common.median([r["prefill_tok_s"] for r in ok]),
                "decode_tok_s": common.median([r["decode_tok_s"] for r in ok]),
                "peak_rss_bytes": max(r["peak_rss_bytes"] or 0 for r in ok)}
    return out


def table_row(precision: str, engine: str, weights: str, lm_head: str, r: dict, weight_bytes) -> dict:
    def mib(b):
        return b / 2**20 if b else ""

    err = r.get("lm_head_error")
    return {"precision": precision, "engine": engine, "weights": weights, "lm_head": lm_head,
            "lm_head logit error": f"{err['logit_rel_error']:.1e} (top-1 {100 * err['top1_agreement']:.0f}%)"
            if err else "",
            "prefill tok/s": r.get("prefill_tok_s", "failed"), "decode tok/s": r.get("decode_tok_s", "failed"),
            "weights MiB": mib(weight_bytes), "bits/weight (all)": r.get("bits_per_weight", ""),
            "linear bits/weight": r.get("linear_bits_per_weight", ""), "peak RSS MiB": mib(r.get("peak_rss_bytes"))}


def preflight(args, name: str):
    """What a benchmark against llama.cpp checks before it measures anything: the peer build, the
    tokenizer files, and that edgecpm's own onnxruntime kernels (ternary linears, fused attention)
    build, since they are what is measured. Exits with status 2 and the reason otherwise. Returns
    (peer, tokenizer sources, kernel ISA, `git status` of the tree being measured)."""
    from edgecpm.errors import BackendUnavailable
    from edgecpm.runtimes import onnxruntime_ops

    try:
        peer, tok = find_peer(args), tokenizer_sources()
    except PeerUnavailable as e:
        print(f"{name}: cannot measure against llama.cpp: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    try:
        kernel_isa = onnxruntime_ops.isa(onnxruntime_ops.library())
    except BackendUnavailable as e:
        print(f"{name}: edgecpm's onnxruntime kernels cannot be built, so edgecpm would be measured without them: "
              f"{e}", file=sys.stderr)
        raise SystemExit(2) from None
    dirty = common.run_measured(["git", "-C", common.ROOT, "status", "--porcelain", "--untracked-files=no"], timeout=60)
    return peer, tok, kernel_isa, dirty


def main(argv=None) -> int:
    p = common.arg_parser(__doc__, "quantized", prompt_len=256, new_tokens=128)
    p.add_argument("--rounds", type=int, default=3, help="runs of every configuration, interleaved (default: 3)")
    p.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=list(PRECISIONS))
    p.add_argument("--llama-cpp", type=Path, default=PEERS / "llama.cpp",
                   help="llama.cpp source folder with build/bin (default: ~/.cache/edgecpm/peers/llama.cpp)")
    p.add_argument("--converter-python", type=Path, default=PEERS / "convert-venv" / "bin" / "python",
                   help="Python with torch, transformers, sentencepiece for convert_hf_to_gguf.py")
    p.add_argument("--repack", type=int, default=0, choices=(0, 1),
                   help="llama-bench --repack (default 0: weight repacking crashed q4_0 on this project's CPU)")
    p.add_argument("--workdir", type=Path, default=None,
                   help="keep checkpoints, GGUF files and bundles here and reuse them (default: a temp folder)")
    p.add_argument("--run-timeout", type=float, default=600, help="seconds one measured process may take")
    p.add_argument("--edgecpm-worker", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.edgecpm_worker is not None:
        return edgecpm_worker(args)

    peer, _, kernel_isa, dirty = preflight(args, "quantized.py")
    from edgecpm.config import ModelConfig

    config, source = common.minicpm4_config("MiniCPM4-0.5B")
    cfg = ModelConfig.from_dict(config, source=source)
    linear_elements = common.decode_weight_bytes(cfg, 4)["linear_elements"]
    load_before = os.getloadavg()
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="edgecpm-quantized-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        try:
            checkpoints = prepare_checkpoints(work, config)
            ggufs, prep_logs = prepare_gguf(peer, work, checkpoints, args.precisions, args.threads, linear_elements)
        except PeerUnavailable as e:
            print(f"quantized.py: cannot measure against llama.cpp: {e}", file=sys.stderr)
            return 2
        bundles = prepare_bundles(work, checkpoints, args.precisions)
        prep_s = time.perf_counter() - t_start

        # every run: (precision, engine, name, callable(round) -> run dict)
        plan = []
        for precision in args.precisions:
            for name, _, _ in PRECISIONS[precision]["llama"]:
                plan.append((precision, "llama.cpp", name,
                             lambda r, path=ggufs[name]["path"]: llama_run(peer, path, args)))
            if "path" in bundles[precision]:
                plan.append((precision, "edgecpm", precision,
                             lambda r, path=bundles[precision]["path"]: edgecpm_run(path, args, seed=r)))
        runs = {(pr, eng, name): [] for pr, eng, name, _ in plan}
        for r in range(args.rounds):
            for pr, eng, name, fn in plan if r % 2 == 0 else plan[::-1]:
                run = fn(r)
                runs[(pr, eng, name)].append(run)
                msg = run.get("error") or (f"prefill {run['prefill_tok_s']:.1f} tok/s, "
                                           f"decode {run['decode_tok_s']:.2f} tok/s")
                print(f"round {r} {eng} {name}: {msg}", file=sys.stderr)
    load_after = os.getloadavg()

    dense = common.decode_weight_bytes(cfg, 4)
    results, rows, ratios = {}, [], []
    for precision in args.precisions:
        res = {"edgecpm": {k: v for k, v in bundles[precision].items() if k != "path"}, "llama.cpp": {}}
        results[precision] = res
        e = res["edgecpm"]
        if "unavailable" in e:
            rows.append({"precision": precision, "engine": "edgecpm", "weights": "not available: " + e["unavailable"]})
        else:
            e |= summarize(runs[(precision, "edgecpm", precision)])
            ok = [x for x in e["runs"] if "error" not in x]
            head = e["manifest"].get("lm_head")
            head_bits = head["bits_per_weight"] if head else 8 * (2 if e["dtype"] == "fp16" else 4)
            if ok:
                # The bundle's linears = its weights less the embedding (the tied lm_head) and norms.
                e["weights_bytes"] = ok[0]["weights_bytes"]
                e["ternary_kernel"] = ok[0]["ternary_kernel"]
                e["quant_kernel"] = ok[0].get("quant_kernel")
                norm_bytes = dense["norm_elements"] * (2 if e["dtype"] == "fp16" else 4)
                e["linear_bytes"] = e["weights_bytes"] - head_bits * dense["lm_head_elements"] / 8 - norm_bytes
                e["linear_bits_per_weight"] = 8 * e["linear_bytes"] / linear_elements
                packed = [e["manifest"][k] for k in ("ternary", "quantization") if e["manifest"].get(k)]
                if packed and packed[0].get("bits_per_weight"):
                    e["linear_bits_per_weight_manifest"] = packed[0]["bits_per_weight"]
                e["bits_per_weight"] = 8 * e["weights_bytes"] / cfg.n_params()
            kernel = e.get("ternary_kernel") or e.get("quant_kernel")
            kernel = f" ({kernel} kernel)" if kernel else ""
            rows.append(table_row(precision, "edgecpm", f"{precision} bundle{kernel}",
                                  head["mode"] if head else e["dtype"], e, e.get("weights_bytes")))
        for name, _, _ in PRECISIONS[precision]["llama"]:
            lr = res["llama.cpp"][name] = {k: v for k, v in ggufs[name].items() if k != "path"}
            lr |= summarize(runs[(precision, "llama.cpp", name)])
            rows.append(table_row(precision, "llama.cpp", f"{name} GGUF", lr["embedding_type"], lr,
                                  lr["tensor_bytes"]))
            if "decode_tok_s" in e and "decode_tok_s" in lr:
                lr["edgecpm_over_llama"] = {"decode": e["decode_tok_s"] / lr["decode_tok_s"],
                                            "prefill": e["prefill_tok_s"] / lr["prefill_tok_s"]}
                ratios.append({"precision": precision, "edgecpm": f"{precision} bundle", "llama.cpp": f"{name} GGUF",
                               "decode edgecpm/llama.cpp": lr["edgecpm_over_llama"]["decode"],
                               "prefill edgecpm/llama.cpp": lr["edgecpm_over_llama"]["prefill"]})
    facts = next((x["facts"] for pr in results.values() for lr in pr["llama.cpp"].values()
                  for x in lr["runs"] if "facts" in x), {})
    result = {
        **common.result_header("quantized", argv, threads=args.threads, edgecpm_kernel=kernel_isa,
                               git_modified_files=dirty["stdout"].splitlines(),
                               loadavg_before=load_before,
                               loadavg_after=load_after),
        "model": {"shape": "MiniCPM4-0.5B", "config": source, "params": cfg.n_params(),
                  "linear_elements": linear_elements, "checkpoints": "bf16, random N(0, 0.02); ternary: "
                  "benchmarks/ternary.py's fake-quantized linears, one scale per row"},
        "settings": vars(args) | {"output": str(args.output), "llama_cpp": str(args.llama_cpp),
                                  "converter_python": str(args.converter_python), "workdir": str(args.workdir)},
        "peer": {"what": "llama.cpp vendored in the llama-cpp-python sdist (PyPI), built CPU-only, Release, "
                         "GGML_NATIVE=ON", "source": str(peer["source"].resolve()),
                 "converter": str(peer["converter_class_file"]),
                 "converter_torch": peer["converter_torch"], "converter_transformers": peer["converter_transformers"],
                 "llama_bench": {k: facts.get(k) for k in ("build_commit", "build_number", "cpu_info", "backends")}},
        "preparation_s": prep_s, "preparation_logs": prep_logs,
        "total_s": time.perf_counter() - t_start,
        "results": results,
        "ratios": ratios,
    }
    failed = sum(x.get("failed_runs", 0) for pr in results.values()
                 for x in [pr["edgecpm"], *pr["llama.cpp"].values()])
    columns = ["precision", "engine", "weights", "lm_head", "lm_head logit error", "prefill tok/s", "decode tok/s",
               "weights MiB", "bits/weight (all)", "linear bits/weight", "peak RSS MiB"]
    status = common.finish(result, [common.markdown_table(rows, columns), common.markdown_table(ratios)], args.output,
                           note=f"{failed} measured runs failed (see 'error' in the JSON)" if failed else "")
    return 1 if failed else status


if __name__ == "__main__":
    sys.exit(main())
