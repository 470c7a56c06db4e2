"""`edgecpm bench`: prefill/decode speed, memory and (optionally) speculative decoding, measured
for every configuration in the same run so the ratios are meaningful on a shared machine."""

from __future__ import annotations

import resource
import statistics
import sys
from pathlib import Path

import numpy as np

from edgecpm.backends import check_draft, folder_config
from edgecpm.drafters import SpecConfig
from edgecpm.session import Session


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (ru_maxrss counts KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def _prompts(session: Session, texts: list[str], prompt_len: int, n: int) -> list[list[int]]:
    if texts:
        if session.tokenizer is None:
            raise ValueError("--prompt needs tokenizer files in the model folder")
        return [session.tokenizer.encode(t) for t in texts]
    rng = np.random.default_rng(0)
    return [[1, *rng.integers(3, session.config.vocab_size, size=prompt_len - 1).tolist()] for _ in range(n)]


def measure(session: Session, prompts: list[list[int]], new_tokens: int) -> dict:
    return measure_many({"": session}, prompts, new_tokens)[""]


def measure_many(sessions: dict[str, Session], prompts: list[list[int]], new_tokens: int,
                 rounds: int = 1) -> dict[str, dict]:
    """Medians over the prompts for each session. The sessions take turns prompt by prompt, so a
    change of machine load during the run hits all of them alike. With `rounds` > 1 every prompt
    runs that many times (all prompts, then again) and a prompt's speeds are the medians of its
    rounds: short generations on a shared machine are noisy one by one. Each result also holds the
    generated ids per prompt (`token_ids`, of the first round)."""
    for s in sessions.values():
        s.generate(prompts[0], max_new_tokens=4, ignore_eos=True)  # warm-up: pages in the weights
    runs = {name: [[] for _ in prompts] for name in sessions}
    for _ in range(rounds):
        for i, ids in enumerate(prompts):
            for name, s in sessions.items():
                s.reset()  # every prompt is prefilled in full
                runs[name][i].append(s.generate(ids, max_new_tokens=new_tokens, ignore_eos=True))
    return {name: _summary([_rounds([g.stats for g in gens]) for gens in per_prompt])
            | {"token_ids": [gens[0].token_ids for gens in per_prompt]}
            for name, per_prompt in runs.items()}


def _rounds(stats: list[dict]) -> dict:
    """One prompt's stats over its rounds: the first round's, with the median speeds."""
    return stats[0] | {key: statistics.median(s[key] for s in stats) for key in ("prefill_tok_s", "decode_tok_s")}


def _summary(runs: list[dict]) -> dict:
    def med(key):
        return statistics.median(r[key] for r in runs)

    return {
        "prefill_tok_s": med("prefill_tok_s"),
        "decode_tok_s": med("decode_tok_s"),
        "tokens_per_step": med("accepted_per_step"),
        "acceptance_by_position": mean_by_position([r.get("acceptance_by_position") or [] for r in runs]),
        "kv_bytes_in_use": max(r["kv_bytes_in_use"] for r in runs),
        "runs": len(runs),
    }


def run_bench(path, backend="auto", kv_budget="1GiB", threads=None, dtype=None, prompts=(), prompt_len=128,
              new_tokens=64, repeats=3, drafts=(), kv_policy="error") -> dict:
    """Plain decoding, then each drafter in `drafts` (SpecConfig or its draft argument), same prompts."""
    results = {}
    target = folder_config(path)  # its config only: every drafter is checked before any model loads
    for draft in drafts:
        named = draft.draft if isinstance(draft, SpecConfig) else draft
        if target is not None and isinstance(named, (str, Path)) and named != "ngram":
            check_draft(Path(named), target.vocab_size)
    for draft in (None, *drafts):
        s = Session(path, backend=backend, kv_budget=kv_budget, draft=draft, dtype=dtype, threads=threads,
                    kv_policy=kv_policy)
        ids = _prompts(s, list(prompts), prompt_len, repeats)
        name = "plain" if draft is None else str(draft.draft if isinstance(draft, SpecConfig) else draft)
        results[name] = {**measure(s, ids, new_tokens), "memory": s.memory(), "backend": s.backend.name}
        if s.backend.ternary_kernel:  # what ran a ternary bundle's linears
            results[name]["ternary_kernel"] = s.backend.ternary_kernel
        print(f"{name}: decode {results[name]['decode_tok_s']:.2f} tok/s", file=sys.stderr)
        del s
    plain = results["plain"]["decode_tok_s"]
    for r in results.values():
        r["decode_speedup"] = r["decode_tok_s"] / plain if plain else 0.0
    return {"path": str(path), "new_tokens": new_tokens, "configs": results, "peak_rss_bytes": peak_rss_bytes()}


def mean_by_position(lists: list[list[float]]) -> list[float]:
    """Position by position, the mean over the runs that drafted that far (speculative decoding:
    the acceptance rate of draft position i; empty for plain decoding)."""
    depth = max(map(len, lists), default=0)
    return [statistics.mean(x[i] for x in lists if len(x) > i) for i in range(depth)]


def print_results(result: dict, file=None) -> None:
    """`run_bench`'s result as a table, one row per configuration, then the peak RSS."""
    from edgecpm.inspect import human_bytes

    file = file or sys.stdout
    print(f"{'config':<28} {'prefill tok/s':>14} {'decode tok/s':>13} {'tok/step':>9} {'speedup':>8} {'KV used':>10}",
          file=file)
    for name, r in result["configs"].items():
        print(f"{name[-28:]:<28} {r['prefill_tok_s']:>14.1f} {r['decode_tok_s']:>13.2f} {r['tokens_per_step']:>9.2f} "
              f"{r['decode_speedup']:>7.2f}x {human_bytes(r['kv_bytes_in_use']):>10}", file=file)
    print(f"peak RSS {human_bytes(result['peak_rss_bytes'])}", file=file)
