"""Speculative decoding (DESIGN.md §10): drafters, draft trees, and FR-Spec frequency tables.

A drafter proposes a tree of tokens that may follow the context; the target verifies the whole
tree in one forward pass with an ancestor mask (`edgecpm.generate.speculative_tokens`). The
target always decides every emitted token from its own full-vocabulary distribution, so greedy
output equals plain greedy decoding and sampling stays lossless, whatever the drafter proposes.

Drafters (anything with `propose(context) -> DraftTree`):
- NgramDrafter: prompt lookup, no weights;
- ModelDrafter: a smaller MiniCPM model (bundle or checkpoint) with the same vocabulary; with an
  FR-Spec bundle its LM head covers only the r most frequent ids, mapped back through freq.npy;
- EagleDrafter: an EAGLE head (export/modeling_eagle.py) drafting from the target's features
  (its `hidden` output), with the same tree growth and FR-Spec mapping.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgecpm.config import ModelConfig
from edgecpm.errors import ConfigError
from edgecpm.safetensors_files import tensor_names


@dataclass(frozen=True)
class SpecConfig:
    draft: object = "ngram"  # "ngram", a draft bundle/checkpoint path, or a Drafter object
    tree_size: int = 8  # draft tokens verified per step
    depth: int = 5  # longest path in the tree
    branch: int = 1  # children per expanded node (1 = a chain)
    ngram_max: int = 4  # longest suffix the n-gram drafter matches
    ngram_min: int = 2  # shortest (a single-token match guesses too often to pay for its verification)

    def __post_init__(self):
        for name in ("tree_size", "depth", "branch", "ngram_max", "ngram_min"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"SpecConfig.{name}={getattr(self, name)!r}: must be an integer >= 1")
        if self.ngram_min > self.ngram_max:
            raise ValueError(f"SpecConfig.ngram_min={self.ngram_min} exceeds ngram_max={self.ngram_max}")


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
    """Prompt lookup as a small n-gram model of the context itself. For each draft token: take the
    longest suffix of the context + draft so far (ngram_max down to ngram_min tokens) that occurred
    earlier in the context and propose the token that followed it most often (ties: the most
    recent occurrence); a chain of min(tree_size, depth) tokens. Voting over every earlier
    occurrence, and backing off per token, accepts more than copying what followed the latest
    match (wind-tunnel held-out prompts: 2.6 vs 2.2 tokens per step at depth 4, simulated).

    The table grows with the context (a few dictionary updates per accepted token), so a step
    costs depth x ngram_max lookups, not a scan of the context.
    """

    def __init__(self, spec: SpecConfig):
        self.spec = spec
        self.seen: list[int] = []  # the context indexed so far
        self.follow: dict[tuple, dict[int, list[int]]] = {}  # n-gram -> {next token: [count, last position]}

    def _index(self, context: list[int]) -> None:
        start = len(self.seen)
        if context[:start] != self.seen:  # another context (a new prompt): start over
            self.seen, self.follow, start = [], {}, 0
        for i in range(max(start, 1), len(context)):
            for n in range(1, min(self.spec.ngram_max, i) + 1):
                stats = self.follow.setdefault(tuple(context[i - n : i]), {}).setdefault(context[i], [0, 0])
                stats[0] += 1
                stats[1] = i
        self.seen = list(context)

    def _next(self, seq: list[int]) -> int | None:
        for n in range(min(self.spec.ngram_max, len(seq)), self.spec.ngram_min - 1, -1):
            stats = self.follow.get(tuple(seq[-n:]))
            if stats:
                return max(stats, key=stats.__getitem__)  # [count, last position]: most often, then latest
        return None

    def propose(self, context: list[int]) -> DraftTree:
        self._index(context)
        seq, draft = list(context[-self.spec.ngram_max :]), []
        while len(draft) < min(self.spec.tree_size, self.spec.depth):
            token = self._next(seq)
            if token is None:
                break
            draft.append(token)
            seq.append(token)
        return DraftTree.chain(draft)


def log_probs(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def grow_tree(spec: SpecConfig, root_logits: np.ndarray, id_map: np.ndarray | None, run_level) -> DraftTree:
    """EAGLE-2-style tree growth shared by the model drafters: per level, expand the `branch` best
    children of the frontier nodes and keep the `branch` best by cumulative log-prob; finally keep
    the best `tree_size` nodes. `run_level(tree, rows)` runs the drafter on the tree drafted so far
    and returns the next-token logits of tree nodes `rows` (the newest level); it is called
    depth - 1 times at most. Logit column j is token id_map[j] (FR-Spec) or j."""
    tokens: list[int] = []
    parents: list[int] = []
    scores: list[float] = []
    frontier = [(-1, 0.0, log_probs(root_logits))]  # (node, cumulative log-prob, its next-token log-probs)
    for level in range(spec.depth):
        cands = []
        for node, score, lp in frontier:
            best = np.argpartition(-lp, spec.branch - 1)[: spec.branch]  # O(V), not a full sort
            for col in best[np.argsort(-lp[best], kind="stable")]:
                cands.append((score + float(lp[col]), node, col))
        cands.sort(key=lambda c: -c[0])
        new_nodes = []
        for score, node, col in cands[: spec.branch]:
            tokens.append(int(id_map[col]) if id_map is not None else int(col))
            parents.append(node)
            scores.append(score)
            new_nodes.append(len(tokens) - 1)
        if level + 1 == spec.depth or len(tokens) >= spec.tree_size:
            break
        out = run_level(DraftTree(np.array(tokens), np.array(parents)), np.array(new_nodes, dtype=np.int64))
        frontier = [(n, scores[n], log_probs(out[j])) for j, n in enumerate(new_nodes)]
    best = sorted(np.argsort(-np.array(scores), kind="stable")[: spec.tree_size].tolist())
    keep = {i: k for k, i in enumerate(best)}  # scores fall along a path, so best is ancestor-closed
    return DraftTree(np.array([tokens[i] for i in best], dtype=np.int64),
                     np.array([keep[parents[i]] if parents[i] >= 0 else -1 for i in best], dtype=np.int64))


class ModelDrafter:
    """A smaller model drafting an EAGLE-2-style tree (grow_tree).

    Each level runs the whole tree drafted so far after the context with the ancestor mask (the
    cache is rolled back to the context between levels), so every node sees exactly its
    ancestors. The number of draft forward passes is `depth`, whatever the branching.
    """

    def __init__(self, session, spec: SpecConfig, id_map: np.ndarray | None):
        self.s = session  # an edgecpm.Session on the draft model (its own KV arena)
        self.spec = spec
        self.id_map = id_map  # FR-Spec: draft logit column -> full-vocabulary id

    @property
    def backend(self):
        return self.s.backend

    @property
    def cache(self):
        return self.s.cache

    def propose(self, context: list[int]) -> DraftTree:
        from edgecpm.generate import run_step

        s, spec = self.s, self.spec
        if s.cache.capacity - len(context) < spec.depth + 1:
            return DraftTree.chain([])
        logits = s._prefill_reusing_cache(context, timer=None)  # next-token logits after the root
        base = s.cache.length

        def run_level(tree: DraftTree, rows: np.ndarray) -> np.ndarray:
            s.cache.truncate(base)
            mask = tree.ancestor_mask()[1:, 1:]  # among the drafted nodes; the context is past
            return run_step(s.backend, s.cache, tree.tokens, mask, rows, positions=base + tree.depths()[1:] - 1)

        tree = grow_tree(spec, logits, self.id_map, run_level)
        s.cache.truncate(base)
        s._cached_ids = s._cached_ids[:base]
        return tree


# ---- EAGLE heads ----------------------------------------------------------------------------------

def eagle_config(d: dict, source: str) -> ModelConfig:
    """An EAGLE head's config.json as a ModelConfig (num_hidden_layers = the head's layers; its
    LM head, own or the target's, is a separate matrix)."""
    return ModelConfig.from_dict({**d, "architectures": ["MiniCPMForCausalLM"], "model_type": "minicpm",
                                  "tie_word_embeddings": False}, source)


def is_eagle(path: Path) -> bool:
    """An EAGLE head: a bundle whose manifest says so, or a checkpoint whose config names an Eagle
    architecture or whose weights hold the head's `model.fc.weight`."""
    path = Path(path)
    if (path / "manifest.json").exists():
        return bool(json.loads((path / "manifest.json").read_text()).get("eagle"))
    if not (path / "config.json").exists():
        return False
    if any("eagle" in a.lower() for a in json.loads((path / "config.json").read_text()).get("architectures") or []):
        return True
    return "model.fc.weight" in tensor_names(path)


class FeatureLog:
    """The target's features (its `hidden` rows) of target cache rows [start, start + len(rows))
    that the EAGLE head has not read yet. The target cache's hooks keep it in step: a commit
    appends the step's rows (replacing any rolled-back ones), a keep compacts them like the KV."""

    def __init__(self, backend, cache):
        self.backend = backend
        self.start = 0
        self.rows = np.zeros((0, backend.config.hidden_size), np.float32)
        cache.commit_hooks.append(self.on_commit)
        cache.keep_hooks.append(self.on_keep)

    def on_commit(self, start: int, n: int) -> None:
        if start < self.start:  # the target recomputes rows the head has read: start over from there
            self.start, self.rows = start, self.rows[:0]
        self.rows = np.concatenate([self.rows[: start - self.start], self.backend.last_hidden[:n]])

    def on_keep(self, start: int, rows: np.ndarray) -> None:
        self.rows = np.concatenate([self.rows[: start - self.start], self.rows[rows - self.start]])

    def take(self, begin: int, end: int) -> np.ndarray:
        if begin < self.start or end > self.start + len(self.rows):
            raise RuntimeError(f"EAGLE drafter: target features of rows [{begin}, {end}) are not available "
                               f"(have [{self.start}, {self.start + len(self.rows)}))")
        return self.rows[begin - self.start : end - self.start]

    def drop_before(self, row: int) -> None:
        self.rows = self.rows[row - self.start :]
        self.start = row


class EagleDrafter:
    """An EAGLE head drafting from the target's features (standard EAGLE pairing).

    Head row i reads (token x[i+1], target feature f[i]) at position i and predicts x[i+2]. Before
    each step the head catches up on the rows the target added: the last of them pairs the root
    (the token to be verified next) with the feature of the last accepted row, and its logits give
    the tree's first level. Deeper levels feed (draft token, the head's own `out` of the parent
    node) and grow as in ModelDrafter (grow_tree: the whole tree is rerun per level, the head's
    cache rolled back to the context in between). Its KV cache is its own small arena from the
    session's budget and always holds exactly the caught-up context rows.
    """

    def __init__(self, backend, cache, target_backend, target_cache, spec: SpecConfig, id_map: np.ndarray | None):
        self.backend, self.cache, self.spec, self.id_map = backend, cache, spec, id_map
        self.features = FeatureLog(target_backend, target_cache)
        self.ids: list[int] = []  # the context the head has read: cache row i pairs ids[i+1] with f[i]

    def first_needed_row(self, ids: list[int]) -> int:
        """The first target row whose feature the head will read for a context starting with `ids`;
        the session re-runs the target from there when the log no longer holds it."""
        need = max(_common_prefix(self.ids, ids) - 1, 0)
        return need if need < self.features.start else len(ids)

    def propose(self, context: list[int]) -> DraftTree:
        spec, cache = self.spec, self.cache
        n = len(context) - 1  # target rows: the root context[-1] is verified next
        if cache.capacity - n < spec.depth + 1:
            return DraftTree.chain([])
        first = min(max(_common_prefix(self.ids, context) - 1, 0), n - 1)  # rows still valid: [0, first)
        cache.truncate(first)
        logits, root_out = self._catch_up(np.asarray(context[first + 1 :], dtype=np.int64),
                                          self.features.take(first, n), first)
        self.ids = list(context)
        self.features.drop_before(n)
        base = cache.length
        outs = np.zeros((0, root_out.shape[0]), np.float32)  # the head's `out` of each tree node

        def run_level(tree: DraftTree, rows: np.ndarray) -> np.ndarray:
            nonlocal outs
            cache.truncate(base)
            parent_out = np.concatenate([root_out[None], outs])[tree.parents + 1]
            out = self._run(tree.tokens, parent_out, tree.ancestor_mask()[1:, 1:], base + tree.depths()[1:] - 1, rows)
            outs = self.backend.last_hidden
            return out

        tree = grow_tree(spec, logits, self.id_map, run_level)
        cache.truncate(base)
        return tree

    def _catch_up(self, tokens: np.ndarray, features: np.ndarray, start: int) -> tuple[np.ndarray, np.ndarray]:
        """Run the head on new context rows in prefill-sized chunks; the last row's logits and out."""
        from edgecpm.generate import causal_mask, prefill_chunk

        done = 0
        while done < len(tokens):
            size = prefill_chunk(self.backend.config.num_attention_heads, self.cache.length)
            t, f = tokens[done : done + size], features[done : done + size]
            last = done + len(t) == len(tokens)
            rows = np.array([len(t) - 1] if last else [], dtype=np.int64)
            logits = self._run(t, f, causal_mask(len(t)), np.arange(start + done, start + done + len(t)), rows)
            done += len(t)
        return logits[-1], self.backend.last_hidden[-1].copy()

    def _run(self, tokens, features, mask, positions, rows) -> np.ndarray:
        logits = self.backend.forward(np.asarray(tokens, dtype=np.int64), np.asarray(positions, dtype=np.int64), mask,
                                      self.cache, rows, hidden_in=features)
        self.cache.commit(len(tokens))
        return logits


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    differ = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(differ[0]) if len(differ) else n


def open_draft_backend(spec: SpecConfig, target, threads: int | None):
    """The draft model's or EAGLE head's backend when the SpecConfig names one (a bundle or
    checkpoint path); `target` is the target's backend."""
    if hasattr(spec.draft, "propose") or spec.draft == "ngram":
        return None
    from edgecpm.session import open_backend

    path = Path(spec.draft)
    if not path.is_dir():
        raise ConfigError(f"draft={spec.draft!r}: expected 'ngram' or a draft bundle/checkpoint folder")
    backend = open_eagle_backend(path, target, threads) if is_eagle(path) else open_backend(path, "auto", None, threads)
    if backend.config.vocab_size != target.config.vocab_size:
        raise ConfigError(f"{path}: draft vocabulary {backend.config.vocab_size} differs from the target's "
                          f"{target.config.vocab_size}; a draft must share the target's tokenizer")
    return backend


def open_eagle_backend(path: Path, target, threads: int | None):
    """An EAGLE head: a bundle runs on onnxruntime; a checkpoint on torch, sharing a torch
    target's embedding and LM head when it has none of its own."""
    if not getattr(target, "has_hidden", False):
        where = getattr(getattr(target, "bundle", None), "path", "the target")
        raise ConfigError(f"{where}: this target bundle has no `hidden` output (exported by an older edgecpm), which "
                          f"an EAGLE head drafts from; re-export it: `edgecpm export CHECKPOINT -o BUNDLE`")
    if (path / "manifest.json").exists():
        from edgecpm.bundle import load_bundle
        from edgecpm.runtimes.onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend(load_bundle(path), threads=threads)
    from edgecpm.runtimes.torch import EagleTorchBackend

    return EagleTorchBackend(str(path), target, threads=threads)


def make_drafter(spec: SpecConfig, draft_session=None):
    """The drafter a SpecConfig names; `draft_session` runs the draft model when there is one."""
    if hasattr(spec.draft, "propose"):
        return spec.draft
    if draft_session is None:
        return NgramDrafter(spec)
    return ModelDrafter(draft_session, spec, frspec_map(draft_session.backend))


def make_eagle_drafter(spec: SpecConfig, head, capacity: int, target_backend, target_cache) -> EagleDrafter:
    """An EAGLE drafter over `head` (its backend) with its own KV arena of `capacity` tokens."""
    from edgecpm.kv_cache import KVCache

    return EagleDrafter(head, KVCache(head.config, capacity, head.kv_dtype), target_backend, target_cache, spec,
                        frspec_map(head))


def frspec_map(backend) -> np.ndarray | None:
    """FR-Spec: a draft bundle's logit column -> full-vocabulary id (None: columns are ids)."""
    bundle = getattr(backend, "bundle", None)
    frspec = (bundle.manifest.get("spec") or {}).get("frspec") if bundle else None
    if not frspec:
        return None
    return load_freq_table(bundle.path / frspec["file"], backend.config.vocab_size, backend.config.eos_token_ids)


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
