"""Where speculative decoding pays: step costs measured at the MiniCPM4-0.5B and 8B shapes, times
acceptance measured on the wind-tunnel pair, give PROJECTED speed-ups per drafter and depth.

    python samples/wind_tunnel/make_corpus.py      # once: the FR-Spec tables count its train split
    python benchmarks/speculative_cost.py          # ~25 GB of temporary disk, ~9 GB RAM at most

Costs (measured; random weights, fp32 bundles, onnxruntime CPU, --threads threads, --context
cached tokens, minimum of --repeats after a warm-up, every group's bundles timed in turns):
- target steps: decode (T = 1) and verification of T = 2..17 rows (all rows' logits), with a causal
  (chain) and a binary-tree ancestor mask. The 0.5B shape is the whole model. The 8B shape does
  not fit this machine in fp32 (32 GB); bundles of 1 and 3 of its layers (each with the full
  embedding and LM head) are timed and the step is extrapolated as t3 + 29 (t3 - t1) / 2: the
  measured cost of a layer times the 29 layers left;
- draft calls of an EAGLE head of each target's shape (one decoder layer + fc, the target's
  embedding and LM head) with the full LM head and FR-Spec r = V/4 and V/8 (table: the lowest
  ids + EOS; its cost does not depend on which ids), at T = 1..17; the 0.5B model (whole) as a
  draft model for the 8B.
Acceptance (measured, wind-tunnel 8.1M target, held-out prompts: samples/wind_tunnel/heldout_prompts.py,
greedy, every configuration checked to emit plain decoding's tokens): per drafter and depth, the
tokens per target step, the drafted length of every step and the rows of every draft call.

Projection (labelled as such everywhere): for a drafter at depth d,

    S = tau * t(1) / ( mean over steps [ t_verify(1 + m) + sum over its draft calls t_draft(T_call) + py ] )

tau: tokens per target step, m: tokens drafted that step, T_call: rows the draft call ran, py:
the drafter's own Python time per step (measured on the wind tunnel: propose time minus its
backend calls); t(.) interpolated between the measured T. The wind-tunnel pair stands in for
MiniCPM4's own acceptance (a real 0.5B drafting for the 8B agrees with it more often than the
1.8M with the 8.1M; real EAGLE heads are trained longer) — the projection says what the costs
allow at a given acceptance, not what MiniCPM4 will accept.
Writes benchmarks/results/speculative_cost.json.
"""

from __future__ import annotations

import gc
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "samples" / "wind_tunnel"))
import common

MODELS = common.ROOT / "samples" / "wind_tunnel"
CORPUS = Path("~/.cache/edgecpm/wind_tunnel/corpus").expanduser()
VERIFY_T = [1, 2, 3, 4, 5, 6, 7, 9, 13, 17]  # rows of a target step (1: plain decoding)
TREE_T = [5, 9, 17]
DRAFT_T = [1, 2, 4, 9, 17]


# ---- costs at real shapes --------------------------------------------------------------------
def shape_config(name: str, layers: int | None = None) -> dict:
    cfg, _ = common.minicpm4_config(name)
    if layers is not None:
        cfg["num_hidden_layers"] = layers
    return cfg


def eagle_config(target: dict) -> dict:
    return {**target, "num_hidden_layers": 1, "architectures": ["EagleMiniCPMForCausalLM"]}


def write_eagle_checkpoint(folder: Path, config: dict, seed: int = 0) -> Path:
    """A random EAGLE head (fc, norms, one layer; no embedding / LM head: the target's are used),
    fp16, matrices ~ N(0, 0.02), norms 1."""
    import torch
    from safetensors.numpy import save_file

    from edgecpm.config import ModelConfig
    from edgecpm.export.modeling_eagle import EagleHead

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in EagleHead(ModelConfig.for_eagle(config), False, False)
                  .state_dict().items()}
    rng = np.random.default_rng(seed)
    tensors = {name: np.ones(shape, np.float16) if "norm" in name
               else (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16)
               for name, shape in shapes.items()}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def freq_table(folder: Path, cfg: dict, r: int) -> Path:
    from edgecpm.frspec import build_freq_table

    eos = cfg["eos_token_id"] if isinstance(cfg["eos_token_id"], list) else [cfg["eos_token_id"]]
    path = folder / f"freq{r}.npy"
    np.save(path, build_freq_table(np.zeros(cfg["vocab_size"]), r, eos, []))
    return path


def tree_mask(T: int) -> np.ndarray:
    """The ancestor mask of a root + T-1 nodes in a binary tree (breadth-first)."""
    from edgecpm.drafters import DraftTree

    return DraftTree(np.zeros(T - 1, np.int64), np.arange(T - 1) // 2 - 1).ancestor_mask()


def time_calls(backends: dict, context: int, plan: dict[str, list[tuple[str, int]]], repeats: int) -> dict:
    """Seconds of each (mask, T) call in plan[name] on backends[name], `context` cached rows
    (zeros: attention costs the same whatever they hold); the backends take turns per round. The
    minimum over the rounds: on a machine shared with other jobs the median of a few calls moved
    by 2x between runs (the 8B layer cost is a difference of two such times), the minimum is what
    the step itself costs."""
    from edgecpm.generate import causal_mask, run_step
    from edgecpm.kv_cache import KVCache

    caches = {}
    for name, b in backends.items():
        caches[name] = KVCache(b.config, context + 32, b.kv_dtype)
        caches[name].commit(np.zeros(context, np.int64))
    times = {name: {key: [] for key in keys} for name, keys in plan.items()}
    for rnd in range(repeats + 1):  # round 0 warms up
        for name, keys in plan.items():
            b, cache = backends[name], caches[name]
            for mask_kind, T in keys:
                mask = causal_mask(T) if mask_kind == "chain" else tree_mask(T)
                hidden = np.zeros((T, b.config.hidden_size), np.float32) if b.bundle.manifest.get("eagle") else None
                ids = np.arange(5, 5 + T, dtype=np.int64)
                rows = np.arange(T, dtype=np.int64)
                t0 = time.perf_counter()
                run_step(b, cache, ids, mask, rows, hidden_in=hidden)
                dt = time.perf_counter() - t0
                cache.truncate(context)
                if rnd:
                    times[name][(mask_kind, T)].append(dt)
    return {name: {f"{k}{T}": float(np.min(v)) for (k, T), v in keys.items()} for name, keys in times.items()}


def suspect_extrapolation(t1: dict, t3: dict) -> list[str]:
    """Keys whose per-layer cost (t3 - t1) / 2 is below half the decode step's: two more 8B layers
    (1.9 GB of fp32 weights) cannot cost less than that. Seen once, with load average 3-4: the
    3-layer bundle timed as fast as the 1-layer one for T = 3..7, which extrapolates to
    verification at a tenth of a decode step. A run with suspect keys is not to be quoted."""
    layer = (t3["chain1"] - t1["chain1"]) / 2
    return [k for k in t3 if (t3[k] - t1[k]) / 2 < layer / 2]


def measure_costs(tmp: Path, args) -> dict:
    """{shape: {"target": {key: s}, "drafts": {drafter: {key: s}}}}, keys "chain1".."chain17",
    "tree5".. (the mask and T of the call)."""
    from edgecpm.bundle import load_bundle
    from edgecpm.export.exporter import export_bundle
    from edgecpm.runtimes.onnxruntime import OnnxRuntimeBackend

    def open_(path):
        return OnnxRuntimeBackend(load_bundle(path), threads=args.threads)

    def bundle(name, cfg, eagle_of=None, frspec=None):
        ckpt = tmp / f"{name}-ckpt"
        if eagle_of is None:
            common.write_random_checkpoint(ckpt, cfg, dtype="bf16")
        else:
            write_eagle_checkpoint(ckpt, cfg)
        t0 = time.perf_counter()
        out = export_bundle(ckpt, tmp / name, eagle_of=eagle_of, frspec=frspec, progress=False)
        print(f"exported {name} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        shutil.rmtree(ckpt)
        return out

    target_plan = [("chain", T) for T in VERIFY_T] + [("tree", T) for T in TREE_T]
    draft_plan = [("chain", T) for T in DRAFT_T]
    costs = {}
    for shape in args.shapes:
        full = shape_config(shape)
        V, L = full["vocab_size"], full["num_hidden_layers"]
        entry = {"load_average": {}}
        if shape == "MiniCPM4-8B":  # 32 GB in fp32: two partial models give the per-layer cost
            paths = {n: bundle(f"8b-l{n}", shape_config(shape, n)) for n in (1, 3)}
            t = time_calls({n: open_(p) for n, p in paths.items()}, args.context,
                           {1: target_plan, 3: target_plan}, args.repeats)
            entry["target"] = {k: t[3][k] + (L - 3) * (t[3][k] - t[1][k]) / 2 for k in t[3]}
            entry["partial_models"] = {"1 layer": t[1], "3 layers": t[3]}
            for p in paths.values():
                shutil.rmtree(p)
        else:
            path = bundle("whole", full)
            entry["target"] = time_calls({0: open_(path)}, args.context, {0: target_plan}, args.repeats)[0]
            shutil.rmtree(path)
        entry["load_average"]["target"] = common.load_average()
        gc.collect()
        # EAGLE heads of this shape; a 1-layer model of the shape lends them its embedding / LM head.
        tgt = common.write_random_checkpoint(tmp / "head-target", shape_config(shape, 1), dtype="bf16")
        heads = {"EAGLE head": bundle("eagle", eagle_config(full), eagle_of=tgt)}
        for div in (4, 8):
            heads[f"EAGLE head + FR-Spec (r=V/{div})"] = bundle(f"eagle-r{div}", eagle_config(full), eagle_of=tgt,
                                                               frspec=freq_table(tmp, full, V // div))
        shutil.rmtree(tgt)
        entry["drafts"] = time_calls({n: open_(p) for n, p in heads.items()}, args.context,
                                     dict.fromkeys(heads, draft_plan), args.repeats)
        entry["load_average"]["drafts"] = common.load_average()
        for p in heads.values():
            shutil.rmtree(p)
        gc.collect()
        if shape == "MiniCPM4-8B":  # the 0.5B drafting for the 8B
            path = bundle("small", shape_config("MiniCPM4-0.5B"))
            entry["drafts"]["draft model (MiniCPM4-0.5B)"] = time_calls(
                {0: open_(path)}, args.context, {0: draft_plan}, args.repeats)[0]
            shutil.rmtree(path)
        costs[shape] = entry
        gc.collect()
    return costs


# ---- acceptance on the wind-tunnel pair -------------------------------------------------------
class StepRecorder:
    """Records every target step of a session's speculative decoding: tokens drafted and accepted
    (the next context is the old one + the accepted tokens + the new root), the rows of each draft
    backend call, and the drafter's own Python seconds (propose time minus its backend calls).
    The first step of a prompt (the draft's prompt catch-up: prefill work) is left out."""

    def __init__(self, session):
        self.steps, self.pending = [], None
        self.calls, self.backend_s = [], 0.0
        drafter, backend = session.drafter, session.draft_backend
        if backend is not None:
            forward = backend.forward

            def counted(input_ids, *a, **k):
                t0 = time.perf_counter()
                out = forward(input_ids, *a, **k)
                self.backend_s += time.perf_counter() - t0
                self.calls.append(len(input_ids))
                return out

            backend.forward = counted
        propose = drafter.propose

        def recorded(context):
            first = self.pending is None or len(context) <= self.pending[0]
            if not first:
                n, m, calls, py = self.pending
                self.steps.append({"drafted": m, "accepted": len(context) - n - 1, "draft_rows": calls,
                                   "python_s": py})
            self.calls, self.backend_s = [], 0.0
            t0 = time.perf_counter()
            tree = propose(context)
            self.pending = (len(context), len(tree), self.calls, time.perf_counter() - t0 - self.backend_s)
            return tree

        drafter.propose = recorded

    def summary(self) -> dict:
        acc = np.array([s["accepted"] for s in self.steps])
        return {"steps": self.steps, "tokens_per_step": float(acc.mean() + 1),
                "acceptance_by_position": [float((acc > i).mean())
                                           for i in range(max(s["drafted"] for s in self.steps))],
                "draft_calls_per_step": float(np.mean([len(s["draft_rows"]) for s in self.steps]))}


def chain(draft: str, extend: int = 1, **more):
    """A chain of `depth` tokens (`extend` x depth with phrases: the pool's phrase may go on)."""
    return lambda bundles, d: {"draft": bundles.get(draft, draft), "depth": d, "tree_size": extend * d, **more}


def tree(draft: str):
    return lambda bundles, d: {"draft": bundles[draft], "depth": d, "branch": 2, "tree_size": 2 * d}


SMALL = "draft model (MiniCPM4-0.5B)"
DRAFTERS = {  # name -> (SpecConfig arguments at depth d, the real-shape draft it stands for, tree)
    "n-gram (ngram_min=2)": (chain("ngram", ngram_min=2), None, False),
    "n-gram (ngram_min=1)": (chain("ngram", ngram_min=1), None, False),
    "draft model": (chain("draft"), SMALL, False),
    "draft model + phrases": (chain("draft", extend=2, phrases=True), SMALL, False),
    "EAGLE head": (chain("eagle"), "EAGLE head", False),
    "EAGLE head + FR-Spec (r=V/4)": (chain("eagle-r4"), "EAGLE head + FR-Spec (r=V/4)", False),
    "EAGLE head + FR-Spec (r=V/8)": (chain("eagle-r8"), "EAGLE head + FR-Spec (r=V/8)", False),
    "EAGLE head + FR-Spec (r=V/4), tree": (tree("eagle-r4"), "EAGLE head + FR-Spec (r=V/4)", True),
}


def measure_acceptance(tmp: Path, args) -> dict:
    from heldout_prompts import package_prompts

    import edgecpm
    from edgecpm.drafters import SpecConfig
    from edgecpm.export.exporter import export_bundle
    from edgecpm.frspec import build_freq_table, count_tokens

    tok = edgecpm.Tokenizer.from_pretrained(MODELS / "target")
    counts = count_tokens(tok, [args.corpus / "train.txt"], progress=False)
    b = {"target": export_bundle(MODELS / "target", tmp / "wt-target", progress=False),
         "draft": export_bundle(MODELS / "draft", tmp / "wt-draft", progress=False),
         "eagle": export_bundle(MODELS / "eagle", tmp / "wt-eagle", eagle_of=MODELS / "target", progress=False)}
    for div in (4, 8):
        np.save(tmp / f"wt-freq{div}.npy", build_freq_table(counts, tok.vocab_size // div, tok.eos_token_ids,
                                                            tok.special_ids))
        b[f"eagle-r{div}"] = export_bundle(MODELS / "eagle", tmp / f"wt-eagle-r{div}", eagle_of=MODELS / "target",
                                           frspec=tmp / f"wt-freq{div}.npy", progress=False)
    b = {k: str(v) for k, v in b.items()}
    prompts, record = package_prompts(tok, n=args.prompts, n_tokens=args.prompt_tokens)
    plain = edgecpm.Session(b["target"], kv_budget="64MiB", threads=args.threads)
    reference = [plain.generate(p, max_new_tokens=args.new_tokens, ignore_eos=True).token_ids for p in prompts]
    out = {"prompts": record, "identical_outputs": True, "drafters": {}}
    for name, (spec, _, _) in DRAFTERS.items():
        out["drafters"][name] = {}
        for d in args.depths:
            s = edgecpm.Session(b["target"], kv_budget="64MiB", draft=SpecConfig(**spec(b, d)), threads=args.threads)
            rec = StepRecorder(s)
            for p, want in zip(prompts, reference, strict=True):
                s.reset()
                g = s.generate(p, max_new_tokens=args.new_tokens, ignore_eos=True)
                out["identical_outputs"] &= g.token_ids == want
            out["drafters"][name][d] = rec.summary()
            print(f"{name} depth {d}: {out['drafters'][name][d]['tokens_per_step']:.2f} tokens/step", file=sys.stderr)
    return out


# ---- projection -------------------------------------------------------------------------------
def interp(costs: dict, kind: str, points: list[int], T) -> np.ndarray:
    return np.interp(T, points, [costs[f"{kind}{t}"] for t in points])


def project(costs: dict, record: dict, draft: str | None, tree: bool) -> dict:
    """PROJECTED speed-up over plain decoding of one drafter at one depth, at one shape (formula: the
    module docstring)."""
    target = costs["target"]
    steps = record["steps"]
    m = np.array([s["drafted"] for s in steps])
    verify = interp(target, "chain", VERIFY_T, 1 + m)
    if tree:  # tree masks were timed at TREE_T; below them the chain's cost
        big = 1 + m >= TREE_T[0]
        verify[big] = interp(target, "tree", TREE_T, 1 + m[big])
    drafting = np.zeros(len(steps))
    if draft is not None:
        drafting = np.array([interp(costs["drafts"][draft], "chain", DRAFT_T, s["draft_rows"]).sum() for s in steps])
    python = np.array([s["python_s"] for s in steps])
    step = verify + drafting + python
    tau = record["tokens_per_step"]
    return {"projected_speedup": float(tau * target["chain1"] / step.mean()), "tokens_per_step": tau,
            "verify_ms": float(verify.mean() * 1e3), "draft_ms": float(drafting.mean() * 1e3),
            "python_ms": float(python.mean() * 1e3)}


def projections(costs: dict, acceptance: dict) -> list[dict]:
    rows = []
    for shape, c in costs.items():
        for name, (_, draft, tree) in DRAFTERS.items():
            if draft is not None and draft not in c["drafts"]:
                continue  # no smaller MiniCPM4 drafts for the 0.5B
            for d, record in acceptance["drafters"][name].items():
                rows.append({"shape": shape, "drafter": name, "depth": int(d), **project(c, record, draft, tree)})
    return rows


def target_rows(costs: dict) -> list[dict]:
    rows = []
    for shape, c in costs.items():
        t1 = c["target"]["chain1"]
        row = {"shape": shape, "decode ms": t1 * 1e3}
        for T in (3, 5, 9, 17):
            row[f"verify T={T} / decode"] = c["target"][f"chain{T}"] / t1
        row["tree T=17 / decode"] = c["target"]["tree17"] / t1
        rows.append(row)
    return rows


def draft_rows(costs: dict) -> list[dict]:
    return [{"shape": shape, "draft": name, "call ms (T=1)": d["chain1"] * 1e3,
             "call / target decode": d["chain1"] / c["target"]["chain1"],
             "T=17 call / target decode": d["chain17"] / c["target"]["chain1"]}
            for shape, c in costs.items() for name, d in c["drafts"].items()]


def main(argv=None) -> int:
    p = common.arg_parser(__doc__, "speculative_cost", new_tokens=96, repeats=5)
    p.add_argument("--shapes", nargs="+", default=["MiniCPM4-0.5B", "MiniCPM4-8B"])
    p.add_argument("--context", type=int, default=512, help="cached tokens during the timed steps (default: 512)")
    p.add_argument("--depths", type=int, nargs="+", default=[1, 2, 3, 4, 6, 8])
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--corpus", type=Path, default=CORPUS)
    p.add_argument("--costs-from", type=Path, default=None,
                   help="reuse the measured costs of an earlier result JSON (its date is kept in the output)")
    p.add_argument("--tmp", type=Path, default=None, help="folder for the temporary bundles (default: system temp)")
    args = p.parse_args(argv)
    if not (args.corpus / "train.txt").exists():
        sys.exit(f"{args.corpus}/train.txt not found: run python samples/wind_tunnel/make_corpus.py first")

    with tempfile.TemporaryDirectory(prefix="edgecpm-speccost-", dir=args.tmp) as tmp:
        tmp = Path(tmp)
        acceptance = measure_acceptance(tmp, args)
        load_acceptance = common.load_average()
        if args.costs_from:
            earlier = json.loads(args.costs_from.read_text())
            costs, costs_source = earlier["costs"], {"from": str(args.costs_from), "date": earlier["date"]}
        else:
            costs, costs_source = measure_costs(tmp, args), "measured in this run"
    suspect = {}
    for shape, c in costs.items():
        if "partial_models" in c:
            keys = suspect_extrapolation(c["partial_models"]["1 layer"], c["partial_models"]["3 layers"])
            if keys:
                suspect[shape] = keys
    if suspect:
        print(f"WARNING: implausible 8B extrapolation for {suspect}: rerun the costs", file=sys.stderr)
    rows = projections(costs, acceptance)
    best = {}
    for r in rows:
        key = (r["shape"], r["drafter"])
        if key not in best or r["projected_speedup"] > best[key]["projected_speedup"]:
            best[key] = r
    result = {
        **common.result_header("speculative_cost", argv, threads=args.threads),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "load_average_after_acceptance": load_acceptance,
        "costs_source": costs_source,
        "suspect_costs": suspect,
        "costs": costs,
        "acceptance": acceptance,
        "projections": rows,
        "best_depth": list(best.values()),
    }
    tables = ["Measured step costs (target):", common.markdown_table(target_rows(costs)),
              "Measured draft call costs:", common.markdown_table(draft_rows(costs)),
              "PROJECTED speed-ups (best depth per drafter):",
              common.markdown_table(list(best.values()), ["shape", "drafter", "depth", "tokens_per_step",
                                                          "projected_speedup", "verify_ms", "draft_ms", "python_ms"])]
    return common.finish(result, tables, args.output,
                         note=f"identical greedy outputs (wind tunnel): {acceptance['identical_outputs']}")


if __name__ == "__main__":
    sys.exit(main())
