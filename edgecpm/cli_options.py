"""The command-line options that map onto the Python API, shared by `edgecpm run`, `chat` and
`bench`: session options (Session(...)), speculative decoding (SpecConfig) and sampling
(Session.generate's keyword arguments), with the checks that run before a model is loaded.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from edgecpm import dtypes
from edgecpm.backends import AUTO_RULE, BACKENDS
from edgecpm.kv_cache import POLICIES
from edgecpm.session import SINK_TOKENS


def add_session_options(p: argparse.ArgumentParser) -> None:
    """Options that open a Session (DESIGN.md §3: Session(path, backend, kv_budget, dtype, threads))."""
    g = p.add_argument_group("session")
    g.add_argument("--backend", default="auto", choices=BACKENDS, help=f"runtime to use (default: auto: {AUTO_RULE})")
    g.add_argument("--device", default=None, metavar="DEV",
                   help="the torch backend's device for a checkpoint folder: cpu (default) or cuda (KV cache on the "
                        "GPU, fp16; not run on a GPU yet)")
    g.add_argument("--kv-budget", default="1GiB", metavar="SIZE",
                   help="KV cache byte budget, e.g. 512MiB, 2GB or a plain byte count (default: 1GiB)")
    g.add_argument("--kv-policy", default="error", choices=POLICIES,
                   help="when the context outgrows the KV budget: error (stop / refuse, default) or window "
                        f"(keep the first {SINK_TOKENS} tokens + the most recent ones, StreamingLLM-style: lossy, "
                        "runs on)")
    g.add_argument("--dtype", default=None, choices=dtypes.NAMES,
                   help="compute dtype (default: the backend's choice; fp32 for torch)")
    g.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads for the backend (default: the runtime's default)")
    add_draft_options(p)


def add_draft_options(p: argparse.ArgumentParser) -> None:
    """Speculative decoding (DESIGN.md §10): Session(draft=SpecConfig(...))."""
    g = p.add_argument_group("speculative decoding")
    g.add_argument("--draft", default=None, metavar="DRAFT",
                   help="'ngram' (prompt lookup) or a draft bundle/checkpoint folder with the same tokenizer")
    g.add_argument("--draft-depth", type=int, default=None, metavar="N",
                   help="longest draft path (default: measured per drafter and model size, "
                        "edgecpm.drafters.default_spec)")
    g.add_argument("--draft-tree-size", type=int, default=None, metavar="N",
                   help="draft tokens verified per step (default: --draft-depth x --draft-branch)")
    g.add_argument("--draft-branch", type=int, default=None, metavar="K",
                   help="children per expanded node; 1 drafts a chain (default: 1)")
    g.add_argument("--draft-corpus", default=None, metavar="NGRAMS",
                   help="a corpus n-gram table (from `edgecpm ngrams`) the n-gram drafter also asks")


def spec_config(args: argparse.Namespace, draft: str | None = None):
    from edgecpm.drafters import SpecConfig

    draft = draft or args.draft
    corpus = args.draft_corpus
    if corpus is not None and "ngram" not in [args.draft, *(getattr(args, "draft_compare", None) or [])]:
        raise ValueError("--draft-corpus is the n-gram drafter's table: add --draft ngram")
    if draft is None:
        return None
    given = {k: v for k, v in (("depth", args.draft_depth), ("tree_size", args.draft_tree_size),
                               ("branch", args.draft_branch)) if v is not None}
    if "depth" in given and "tree_size" not in given:
        given["tree_size"] = given["depth"] * given.get("branch", 1)
    if corpus is not None and draft == "ngram":
        return ngram_spec(args.path, corpus, **given)
    # Nothing given: the Session picks the measured defaults for the model and drafter (default_spec).
    return SpecConfig(draft=draft, **given) if given else draft


def ngram_spec(path, corpus, **given):
    """The n-gram drafter with a corpus table: default_spec's settings for the model at `path`
    (unless depth / tree_size / branch are given), checked before the model loads."""
    import dataclasses

    from edgecpm.backends import folder_config
    from edgecpm.drafters import SpecConfig, default_spec, load_table

    load_table(corpus)  # a missing or malformed file fails here, with its name
    config = folder_config(Path(path))
    base = SpecConfig(draft="ngram", **given) if given or config is None else default_spec(config, "ngram")
    return dataclasses.replace(base, corpus=str(corpus))


def add_sampling_options(p: argparse.ArgumentParser) -> None:
    """The generation options of Session.generate/stream/chat (names as in DESIGN.md §3)."""
    g = p.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=int, default=128, metavar="N", help="default: 128")
    g.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 = greedy (default: 0)")
    g.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling, in (0, 1] (default: 1)")
    g.add_argument("--top-k", type=int, default=0, metavar="K", help="0 disables it (default: 0)")
    g.add_argument("--repetition-penalty", type=float, default=1.0, metavar="R",
                   help="> 0; 1 disables it (default: 1)")
    g.add_argument("--seed", type=int, default=None, metavar="N", help="random seed for sampling")
    g.add_argument("--stop", action="extend", nargs="+", default=None, metavar="S",
                   help="stop strings (the text ends right before the first one); repeatable; "
                        "\\n and \\t are understood as newline and tab")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence tokens")
    g.add_argument("--stats", action="store_true", help="print speed and KV statistics to stderr afterwards")


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}


def unescape(text: str) -> str:
    """Backslash escapes a shell cannot type easily: \\n, \\t, \\r, \\\\ (others stay as they are)."""
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text) and text[i + 1] in _ESCAPES:
            out.append(_ESCAPES[text[i + 1]])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


SAMPLING = ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed", "stop", "ignore_eos")


def sampling_kwargs(args: argparse.Namespace) -> dict:
    """The sampling options as keyword arguments of Session.generate / stream / Chat.send."""
    kwargs = {name: getattr(args, name) for name in SAMPLING}
    return kwargs | {"stop": [unescape(x) for x in args.stop] if args.stop else None}


def check_sampling(args: argparse.Namespace) -> None:
    """Validate the sampling options before the (slow) model load, with the library's messages."""
    from edgecpm.sampling import SamplingParams

    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens}: must be an integer >= 1")
    SamplingParams(args.temperature, args.top_p, args.top_k, args.repetition_penalty, args.seed)
    if args.stop is not None and not all(args.stop):
        raise ValueError("--stop: stop strings must be non-empty")


def open_session(args: argparse.Namespace):
    from edgecpm.session import Session

    return Session(args.path, backend=args.backend, kv_budget=args.kv_budget, dtype=args.dtype,
                   threads=args.threads, draft=spec_config(args), kv_policy=args.kv_policy, device=args.device)


def add_quantize_options(p: argparse.ArgumentParser) -> None:
    """`edgecpm export`'s linear-weight options (export/quantize.py, export/ternary.py)."""
    p.add_argument("--quantize", default=None, choices=("ternary", "none", "int8", "int4"),
                   help="linear weights: by default a BitCPM4 ternary checkpoint (detected exactly) is packed at 2 "
                        "bits and any other stays dense; 'ternary' also ternarizes non-ternary linears (lossy: "
                        "only for a QAT-trained model), 'none' keeps every linear dense; 'int8' / 'int4' store "
                        "every decoder linear as 8 / 4-bit codes (round to nearest, asymmetric; a 4-bit GPTQ / AWQ "
                        "checkpoint keeps its own codes under int4), run with fp32 activations on edgecpm's kernel "
                        "(x86-64 AVX-512) or onnxruntime's MatMulNBits")
    p.add_argument("--group-size", type=int, default=None, metavar="G",
                   help="inputs sharing one scale (and zero) under --quantize int8/int4/ternary: a multiple of 16 "
                        "dividing every linear's inputs, or -1 for one per row (default: int4 128, int8 and "
                        "ternary per row)")
    p.add_argument("--lm-head", default=None, choices=("dense", "int8", "int4"),
                   help="how the embedding / LM head matrix is stored: int8 or int4 codes (one scale and zero per "
                        "128 inputs; the tied matrix once) or dense in --dtype (default: int8 when the linears are "
                        "int8, int4 or ternary, else dense); `edgecpm inspect` reports its logit error")
