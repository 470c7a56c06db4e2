"""Speculative decoding on the wind-tunnel pair, onnxruntime CPU, all drafters in the same run.

    python samples/wind_tunnel/make_corpus.py          # once: the corpus (train split: FR-Spec tables)
    python benchmarks/speculative.py                   # plain vs n-gram vs draft (+ phrases, FR-Spec) vs EAGLE head
    python benchmarks/speculative.py --only n-gram     # plain and the n-gram rows only

Chains; the model drafters at --depth 2 (default_spec's choice for a small target: on this 8M
target a draft call costs about a third of a target step), the n-gram drafter at a fixed
--ngram-depth 4 (matches of up to 4 tokens), and default_spec's n-gram drafter for this target
(adaptive: matches of up to 6 tokens, up to 12 tokens while the chain's estimated chance of being
right stays >= 0.3), alone and with a corpus n-gram table (edgecpm.ngram_table, built here from
the train split like the FR-Spec table: the drafter takes the corpus's guess where it is likelier
right than the context's).

Prompts (--prompts-from): "package" (default), --prompt-tokens-long slices of --prompts files of a
third-party package's sources (samples/wind_tunnel/heldout_prompts.py: rich; code the models never
saw, not the standard library they were trained on), or "heldout", the first tokens of held-out
documents of the wind-tunnel corpus (standard-library files left out of training). The FR-Spec
table is built from the train split with r = V/4 (`edgecpm freq` rules). The EAGLE head
(samples/wind_tunnel/eagle, sharing the target's embedding and LM head) is exported with `--eagle-
of` the target, with and without that table. "draft model + phrases" is the draft model with
Ouroboros phrase reuse (SpecConfig.phrases: phrase checks in one draft call, rejected draft tails
kept, chains extended by phrases up to --phrase-tree tokens). Every configuration decodes the same
prompts greedily, so all produce the same text (checked for every prompt); the sessions take turns
prompt by prompt, so a change of machine load hits all configurations alike; every prompt runs
--rounds 3 times (all prompts, then again) and its speed is the median of its runs. Reported:
tokens/s (the median over the prompts), tokens per target step (mean accepted length + 1), ratios
to plain decoding, and the acceptance by draft position (the share of steps that accepted at least
i+1 draft tokens among those that drafted i+1), and the load average.
Writes benchmarks/results/speculative.json.
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "samples" / "wind_tunnel"))
import common
from heldout_prompts import package_prompts

MODELS = common.ROOT / "samples" / "wind_tunnel"
CORPUS = Path("~/.cache/edgecpm/wind_tunnel/corpus").expanduser()


def heldout_prompts(tokenizer, path: Path, n: int, n_tokens: int) -> list[list[int]]:
    docs = [d for d in path.read_text(encoding="utf-8").split("\n\x1e\n") if len(d) > 2000]
    rng = np.random.default_rng(0)
    picks = rng.choice(len(docs), size=min(n, len(docs)), replace=False)
    return [tokenizer.encode(docs[i])[:n_tokens] for i in sorted(picks)]


def main(argv=None) -> int:
    p = common.arg_parser(__doc__, "speculative", new_tokens=96)
    p.add_argument("--prompts", type=int, default=8, help="held-out documents used as prompts (default: 8)")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3,
                   help="runs of every prompt; a prompt's speed is the median of its runs (default: 3)")
    p.add_argument("--depth", type=int, default=2, help="draft depth of the model drafters (default: 2)")
    p.add_argument("--ngram-depth", type=int, default=4, help="draft depth of the fixed n-gram rows (default: 4)")
    p.add_argument("--phrase-tree", type=int, default=8, help="chain length with phrases (default: 8)")
    p.add_argument("--only", nargs="+", default=None, metavar="TEXT",
                   help="run plain and the configurations whose name contains one of these texts")
    p.add_argument("--prompts-from", choices=["package", "heldout"], default="package")
    p.add_argument("--corpus", type=Path, default=CORPUS)
    args = p.parse_args(argv)

    import edgecpm
    from edgecpm.bench import measure_many
    from edgecpm.bundle import load_bundle
    from edgecpm.drafters import SpecConfig, default_spec
    from edgecpm.export.exporter import export_bundle
    from edgecpm.frspec import build_freq_table, count_tokens
    from edgecpm.ngram_table import NgramTable

    if not (args.corpus / "train.txt").exists():
        sys.exit(f"{args.corpus}/train.txt not found: run python samples/wind_tunnel/make_corpus.py first")
    with tempfile.TemporaryDirectory(prefix="edgecpm-spec-") as tmp:
        tmp = Path(tmp)
        tok = edgecpm.Tokenizer.from_pretrained(MODELS / "target")
        counts = count_tokens(tok, [args.corpus / "train.txt"], progress=False)
        r = tok.vocab_size // 4
        np.save(tmp / "freq.npy", build_freq_table(counts, r, tok.eos_token_ids, tok.special_ids))
        table = NgramTable.build(tok, [args.corpus / "train.txt"])
        table.save(tmp / "ngrams.npz")
        target = export_bundle(MODELS / "target", tmp / "target", progress=False)
        draft = export_bundle(MODELS / "draft", tmp / "draft", progress=False)
        frspec = export_bundle(MODELS / "draft", tmp / "draft-frspec", frspec=tmp / "freq.npy", progress=False)
        eagle = export_bundle(MODELS / "eagle", tmp / "eagle", eagle_of=MODELS / "target", progress=False)
        eagle_frspec = export_bundle(MODELS / "eagle", tmp / "eagle-frspec", eagle_of=MODELS / "target",
                                     frspec=tmp / "freq.npy", progress=False)
        adaptive = default_spec(load_bundle(target).config)  # this target's n-gram defaults
        configs = {
            "plain": None,
            "draft model": SpecConfig(draft=str(draft), depth=args.depth, tree_size=args.depth),
            "draft model + phrases": SpecConfig(draft=str(draft), depth=args.depth, tree_size=args.phrase_tree,
                                                phrases=True),
            f"FR-Spec draft (r={r})": SpecConfig(draft=str(frspec), depth=args.depth, tree_size=args.depth),
            "n-gram (ngram_min=2)": SpecConfig(draft="ngram", depth=args.ngram_depth, tree_size=args.ngram_depth),
            "n-gram (ngram_min=1)": SpecConfig(draft="ngram", depth=args.ngram_depth, tree_size=args.ngram_depth,
                                               ngram_min=1),
            "n-gram adaptive (default_spec)": adaptive,
            "n-gram adaptive + corpus table": dataclasses.replace(adaptive, corpus=str(tmp / "ngrams.npz")),
            "EAGLE head": SpecConfig(draft=str(eagle), depth=args.depth, tree_size=args.depth),
            f"EAGLE head + FR-Spec (r={r})": SpecConfig(draft=str(eagle_frspec), depth=args.depth,
                                                         tree_size=args.depth),
        }
        if args.only:
            configs = {name: spec for name, spec in configs.items()
                       if spec is None or any(text in name for text in args.only)}
        if args.prompts_from == "package":
            prompts, prompt_record = package_prompts(tok, n=args.prompts, n_tokens=args.prompt_tokens)
        else:
            prompts = heldout_prompts(tok, args.corpus / "heldout.txt", args.prompts, args.prompt_tokens)
            prompt_record = {"corpus": str(args.corpus / "heldout.txt")}
        sessions = {name: edgecpm.Session(target, kv_budget="64MiB", draft=spec, threads=args.threads)
                    for name, spec in configs.items()}
        load_before = common.load_average()
        results = measure_many(sessions, prompts, args.new_tokens, rounds=args.rounds)
        rows = [{"config": name, "decode tok/s": m["decode_tok_s"], "tokens/step": m["tokens_per_step"],
                 "prefill tok/s": m["prefill_tok_s"], "acceptance_by_position": m["acceptance_by_position"]}
                for name, m in results.items()]
        texts = {name: m["token_ids"] for name, m in results.items()}
        # What ran attention: edgecpm's fused kernel where its library builds (else the graph's own ops).
        attention = sessions["plain"].backend.attention_kernel
        del sessions
    plain = rows[0]["decode tok/s"]
    for row in rows:
        row["speedup"] = row["decode tok/s"] / plain
    same = all(t == texts["plain"] for t in texts.values())
    result = {
        **common.result_header("speculative", argv, threads=args.threads),
        "settings": vars(args) | {"corpus": str(args.corpus), "output": str(args.output), "frspec_r": r,
                                  "vocab": tok.vocab_size, "ngram_table_entries": len(table)},
        "prompts": prompt_record,
        "attention_kernel": attention,
        "load_average": {"before": load_before, "after": common.load_average()},
        "identical_outputs": same,
        "rows": rows,
    }
    table = common.markdown_table(rows, ["config", "decode tok/s", "tokens/step", "speedup", "prefill tok/s"])
    return common.finish(result, [table], args.output, note=f"identical greedy outputs across configs: {same}")


if __name__ == "__main__":
    sys.exit(main())
