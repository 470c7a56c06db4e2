"""FR-Spec frequency tables (DESIGN.md §10): the r most frequent token ids of a corpus.

A drafter's LM head restricted to these ids costs r/V of the full one; its logit column j is the
token `table[j]`. The target always verifies over the full vocabulary, so output is unchanged.

    counts = count_tokens(tokenizer, ["corpus/"])
    table = build_freq_table(counts, r=8192, eos_ids=tok.eos_token_ids, special_ids=tok.special_ids)
    np.save("freq.npy", table)            # `edgecpm freq` does these three steps
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np

from edgecpm.errors import ConfigError


def count_tokens(tokenizer, paths: list[Path], progress: bool = True) -> np.ndarray:
    """Token counts [vocab] over text files (folders: every file below them, sorted)."""
    from rich.progress import Progress

    files = sorted(f for p in map(Path, paths) for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file())
    if not files:
        raise ConfigError(f"no files found in {[str(p) for p in paths]}")
    counts = np.zeros(tokenizer.vocab_size, dtype=np.int64)
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("counting tokens", total=sum(f.stat().st_size for f in files))
        for f in files:
            lines = f.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)
            ids = np.fromiter(itertools.chain.from_iterable(tokenizer.encode_batch(lines)), dtype=np.int64)
            counts += np.bincount(ids, minlength=len(counts))
            bar.advance(task, f.stat().st_size)
    return counts


def build_freq_table(counts: np.ndarray, r: int, eos_ids, special_ids) -> np.ndarray:
    """The r most frequent ids (special tokens not counted), every EOS id forced in, unique,
    length exactly r, int32. Ties rank the lower id first."""
    vocab = len(counts)
    eos = sorted({int(e) for e in eos_ids})
    if r > vocab:
        raise ValueError(f"r={r} is larger than the vocabulary ({vocab})")
    if r <= len(eos):
        raise ValueError(f"r={r} leaves no room beside the {len(eos)} EOS ids")
    counts = np.asarray(counts, dtype=np.int64).copy()
    counts[list({int(i) for i in special_ids} | set(eos))] = -1  # specials: not ranked; EOS: forced below
    ranked = np.argsort(-counts, kind="stable")[: r - len(eos)]
    return np.concatenate([ranked, eos]).astype(np.int32)


def load_freq_table(path: str | Path, vocab_size: int, eos_ids) -> np.ndarray:
    path = Path(path)
    try:
        ids = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: not a .npy frequency table ({e}); build one with `edgecpm freq`") from None
    if ids.ndim != 1 or ids.dtype.kind not in "iu":
        raise ConfigError(f"{path}: expected a 1-D integer array, got {ids.dtype} {ids.shape}")
    bad = ids[(ids < 0) | (ids >= vocab_size)]
    if len(bad):
        raise ConfigError(f"{path}: ids out of range [0, {vocab_size}): {bad[:5].tolist()}")
    uniq, counts = np.unique(ids, return_counts=True)
    if len(uniq) != len(ids):
        raise ConfigError(f"{path}: duplicate ids {uniq[counts > 1][:5].tolist()}; rebuild it with `edgecpm freq`")
    missing = sorted({int(e) for e in eos_ids} - set(uniq.tolist()))
    if missing:
        raise ConfigError(f"{path}: EOS ids {missing} are missing; the draft could never propose the end")
    return ids.astype(np.int64)


def frspec_map(backend) -> np.ndarray | None:
    """FR-Spec: a draft bundle's logit column -> full-vocabulary id (None: columns are ids)."""
    bundle = backend.bundle
    frspec = (bundle.manifest.get("spec") or {}).get("frspec") if bundle else None
    if not frspec:
        return None
    return load_freq_table(bundle.path / frspec["file"], backend.config.vocab_size, backend.config.eos_token_ids)
