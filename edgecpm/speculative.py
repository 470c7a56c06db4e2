"""Speculative decoding (DESIGN.md §10): drafters, draft trees, and FR-Spec frequency tables.

A drafter proposes a tree of tokens that may follow the context; the target verifies the whole
tree in one forward pass with an ancestor mask (`edgecpm.generate.speculative_tokens`). The
target always decides every emitted token from its own full-vocabulary distribution, so greedy
output equals plain greedy decoding and sampling stays lossless, whatever the drafter proposes.

Drafters (anything with `propose(context) -> DraftTree`):
- NgramDrafter: prompt lookup, no weights;
- ModelDrafter: a smaller MiniCPM model (bundle or checkpoint) with the same vocabulary; with an
  FR-Spec bundle its LM head covers only the r most frequent ids, mapped back through freq.npy.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgecpm.errors import ConfigError


@dataclass(frozen=True)
class SpecConfig:
    draft: object = "ngram"  # "ngram", a draft bundle/checkpoint path, or a Drafter object
    tree_size: int = 8  # draft tokens verified per step
    depth: int = 5  # longest path in the tree
    branch: int = 1  # children per expanded node (1 = a chain)
    ngram_max: int = 4  # longest suffix the n-gram drafter matches

    def __post_init__(self):
        for name in ("tree_size", "depth", "branch", "ngram_max"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"SpecConfig.{name}={getattr(self, name)!r}: must be an integer >= 1")


@dataclass
class DraftTree:
    """Draft nodes in breadth-first order: parents[i] < i, or -1 for a child of the root (the
    last context token). Verification feeds [root, *tokens]; row 0 is the root."""

    tokens: np.ndarray  # int64 [m]
    parents: np.ndarray  # int64 [m]

    @classmethod
    def chain(cls, tokens) -> DraftTree:
        tokens = np.asarray(tokens, dtype=np.int64)
        return cls(tokens, np.arange(-1, len(tokens) - 1, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.tokens)

    def depths(self) -> np.ndarray:
        """Depth of each row of [root, *tokens] (root = 0)."""
        d = np.zeros(len(self) + 1, dtype=np.int64)
        for i, p in enumerate(self.parents):
            d[i + 1] = d[p + 1] + 1
        return d

    def ancestor_mask(self) -> np.ndarray:
        """bool [m+1, m+1]: row i sees itself and its ancestors (the root is row 0)."""
        m = len(self)
        mask = np.eye(m + 1, dtype=bool)
        mask[:, 0] = True
        for i, p in enumerate(self.parents):
            mask[i + 1] |= mask[p + 1]
        return mask

    def children(self) -> list[dict[int, int]]:
        """For each row, {token: row} of its children."""
        kids: list[dict[int, int]] = [{} for _ in range(len(self) + 1)]
        for i, (t, p) in enumerate(zip(self.tokens.tolist(), self.parents.tolist())):
            kids[p + 1].setdefault(t, i + 1)
        return kids

    def truncated(self, n: int) -> DraftTree:
        """The first n nodes (still a tree: parents precede children)."""
        return DraftTree(self.tokens[:n], self.parents[:n])


class NgramDrafter:
    """Prompt lookup: find the latest earlier occurrence of the context's last n tokens
    (n = ngram_max down to 1) and propose what followed it, as a chain."""

    def __init__(self, spec: SpecConfig):
        self.spec = spec

    def propose(self, context: list[int]) -> DraftTree:
        ctx = np.asarray(context, dtype=np.int64)
        want = min(self.spec.tree_size, self.spec.depth)
        for n in range(min(self.spec.ngram_max, len(ctx) - 1), 0, -1):
            suffix = ctx[-n:]
            # Windows of length n over ctx[:-1] (so a match has at least one token after it).
            windows = np.lib.stride_tricks.sliding_window_view(ctx[:-1], n)
            hits = np.flatnonzero((windows == suffix).all(axis=1))
            if len(hits):
                start = hits[-1] + n
                return DraftTree.chain(ctx[start : start + want])
        return DraftTree.chain([])


class ModelDrafter:
    """A smaller model drafting an EAGLE-2-style tree: expand the `branch` best children of the
    `branch` best frontier nodes per level (cumulative log-prob), keep the best `tree_size`.

    Each level runs the whole tree drafted so far after the context with the ancestor mask (the
    cache is rolled back to the context between levels), so every node sees exactly its
    ancestors. The number of draft forward passes is `depth`, whatever the branching.
    """

    def __init__(self, session, spec: SpecConfig, id_map: np.ndarray | None):
        self.s = session  # an edgecpm.Session on the draft model (its own KV arena)
        self.spec = spec
        self.id_map = id_map  # FR-Spec: draft logit column -> full-vocabulary id

    def _log_probs(self, logits: np.ndarray) -> np.ndarray:
        z = logits - logits.max(axis=-1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))

    def propose(self, context: list[int]) -> DraftTree:
        from edgecpm.generate import run_step

        s, spec = self.s, self.spec
        if s.cache.capacity - len(context) < spec.depth + 1:
            return DraftTree.chain([])
        logits = s._prefill_reusing_cache(context, timer=None)  # next-token logits after the root
        base = s.cache.length
        tokens: list[int] = []
        parents: list[int] = []
        scores: list[float] = []
        frontier = [(-1, 0.0, self._log_probs(logits))]  # (node, cumulative log-prob, its next-token log-probs)
        for level in range(spec.depth):
            cands = []
            for node, score, lp in frontier:
                best = np.argpartition(-lp, spec.branch - 1)[: spec.branch]  # O(V), not a full sort
                for col in best[np.argsort(-lp[best], kind="stable")]:
                    cands.append((score + float(lp[col]), node, col))
            cands.sort(key=lambda c: -c[0])
            new_nodes = []
            for score, node, col in cands[: spec.branch]:
                tokens.append(int(self.id_map[col]) if self.id_map is not None else int(col))
                parents.append(node)
                scores.append(score)
                new_nodes.append(len(tokens) - 1)
            if level + 1 == spec.depth or len(tokens) >= spec.tree_size:
                break
            # Run the tree so far after the context; read the logits of the newest level.
            tree = DraftTree(np.array(tokens), np.array(parents))
            s.cache.truncate(base)
            mask = tree.ancestor_mask()[1:, 1:]  # among the drafted nodes; the context is past
            rows = np.array(new_nodes, dtype=np.int64)
            out = run_step(s.backend, s.cache, tree.tokens, mask, rows, positions=base + tree.depths()[1:] - 1)
            frontier = [(n, scores[n], self._log_probs(out[j])) for j, n in enumerate(new_nodes)]
        s.cache.truncate(base)
        s._cached_ids = s._cached_ids[:base]
        best = sorted(np.argsort(-np.array(scores), kind="stable")[: spec.tree_size].tolist())
        keep = {i: k for k, i in enumerate(best)}  # scores fall along a path, so best is ancestor-closed
        return DraftTree(np.array([tokens[i] for i in best], dtype=np.int64),
                         np.array([keep[parents[i]] if parents[i] >= 0 else -1 for i in best], dtype=np.int64))


def open_draft_backend(spec: SpecConfig, target_cfg, threads: int | None):
    """The draft model's backend when the SpecConfig names one (a bundle or checkpoint path)."""
    if hasattr(spec.draft, "propose") or spec.draft == "ngram":
        return None
    from edgecpm.session import open_backend

    path = Path(spec.draft)
    if not path.is_dir():
        raise ConfigError(f"draft={spec.draft!r}: expected 'ngram' or a draft bundle/checkpoint folder")
    backend = open_backend(path, "auto", None, threads)
    if backend.config.vocab_size != target_cfg.vocab_size:
        raise ConfigError(f"{path}: draft vocabulary {backend.config.vocab_size} differs from the target's "
                          f"{target_cfg.vocab_size}; a draft must share the target's tokenizer")
    return backend


def make_drafter(spec: SpecConfig, draft_session=None):
    """The drafter a SpecConfig names; `draft_session` runs the draft model when there is one."""
    if hasattr(spec.draft, "propose"):
        return spec.draft
    if draft_session is None:
        return NgramDrafter(spec)
    bundle = getattr(draft_session.backend, "bundle", None)
    frspec = (bundle.manifest.get("spec") or {}).get("frspec") if bundle else None
    id_map = None
    if frspec:
        cfg = draft_session.config
        id_map = load_freq_table(bundle.path / frspec["file"], cfg.vocab_size, cfg.eos_token_ids)
    return ModelDrafter(draft_session, spec, id_map)


# ---- FR-Spec frequency tables -------------------------------------------------------------------

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
