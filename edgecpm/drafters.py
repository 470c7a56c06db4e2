"""Drafters for speculative decoding (DESIGN.md §10): they propose, the target decides.

A drafter proposes a tree of tokens that may follow the context; the target verifies the whole
tree in one forward pass with an ancestor mask (`edgecpm.generate.speculative_tokens`). The
target always decides every emitted token from its own full-vocabulary distribution, so greedy
output equals plain greedy decoding and sampling stays lossless, whatever the drafter proposes.

Drafters (anything with `propose(context) -> DraftTree`; `context` is an int64 array):
- NgramDrafter: prompt lookup, no weights;
- ModelDrafter: a smaller MiniCPM model (its backend and KV cache) with the same vocabulary; with
  an FR-Spec bundle its LM head covers only the r most frequent ids (`edgecpm.frspec`);
- EagleDrafter: an EAGLE head (export/modeling_eagle.py) drafting from the target's features
  (its `hidden` output), with the same tree growth and FR-Spec mapping.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgecpm.bundle import is_bundle, read_manifest
from edgecpm.generate import prefill, prefill_chunk, run_step
from edgecpm.safetensors_files import tensor_names


@dataclass(frozen=True)
class SpecConfig:
    draft: object = "ngram"  # "ngram", a draft bundle/checkpoint path, or a Drafter object
    tree_size: int = 8  # draft tokens verified per step
    depth: int = 5  # longest path in the tree
    branch: int = 1  # children per expanded node (1 = a chain)
    ngram_max: int = 4  # longest suffix the n-gram drafter matches
    ngram_min: int = 2  # shortest (default_spec's n-gram drafter uses 1: see there)
    # Ouroboros phrase reuse (PhrasePool): a chain-drafting model checks guessed phrases in one call
    # and may extend its chain past `depth` with a phrase, up to tree_size tokens.
    phrases: bool = False
    # The n-gram drafter's corpus n-gram table (edgecpm.ngram_table, an .npz path): its guess is
    # taken where it is likelier right than the context's (NgramDrafter).
    corpus: str | None = None
    # The n-gram drafter's chain stops where the estimated chance that all of it is right falls
    # below this, from its third token on (0: always min(depth, tree_size) tokens where the tables
    # know a next token).
    min_confidence: float = 0.0

    def __post_init__(self):
        for name in ("tree_size", "depth", "branch", "ngram_max", "ngram_min"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"SpecConfig.{name}={getattr(self, name)!r}: must be an integer >= 1")
        if self.ngram_min > self.ngram_max:
            raise ValueError(f"SpecConfig.ngram_min={self.ngram_min} exceeds ngram_max={self.ngram_max}")
        if self.corpus is not None and self.draft != "ngram":
            raise ValueError("SpecConfig.corpus is the n-gram drafter's table; it needs draft='ngram'")
        if not (isinstance(self.min_confidence, (int, float)) and 0 <= self.min_confidence < 1):
            raise ValueError(f"SpecConfig.min_confidence={self.min_confidence!r}: must be in [0, 1)")


# Per target size, from benchmarks/speculative_cost.py (results/speculative_cost.json): the chain
# depth with the best PROJECTED speed-up at the MiniCPM4-0.5B and 8B shapes on 2 CPU threads. A
# small target's decode step is cheap next to a draft call (a full-vocabulary EAGLE head costs 0.20
# of the 0.5B's step, 0.07 of the 8B's), so small targets prefer FR-Spec heads; verifying 9 rows
# costs 1.45 / 1.34 decode steps, so neither drafts deep (the 8B's EAGLE head: 2.16x at depth 3,
# 1.80x at 8). The small target's n-gram chain is capped by its confidence floor instead (see
# default_spec); the 0.5B has no smaller draft model of its family measured (2 is the wind tunnel's).
LARGE_HIDDEN = 2048  # hidden_size from which a target counts as large (8B: 4096; 0.5B: 1024)
DEFAULT_DEPTH = {  # (drafter kind, large target) -> depth
    ("ngram", False): 12, ("ngram", True): 4,
    ("eagle", False): 4, ("eagle", True): 3,
    ("model", False): 2, ("model", True): 2,
}


SMALL_MIN_CONFIDENCE = 0.3  # the n-gram drafter's chain floor on a small target (see default_spec)
# The n-gram drafter's longest match (default_spec; SpecConfig's own default stays 4): a longer
# match tells apart places where the same 4 tokens went on differently. Held-out wind-tunnel
# prompts (click, jinja2, httpx sources), one process, 2 threads, with the corpus table: 2.39x /
# 2.91x / 2.08x plain decoding with matches of up to 6 tokens and chains of up to 12, against 2.23x /
# 2.71x / 2.01x with 4 and 8 (ad hoc; benchmarks/speculative.py measures the default on rich).
DEFAULT_NGRAM_MAX = 6


def default_spec(target_config, draft="ngram", eagle: bool = False) -> SpecConfig:
    """The measured-best SpecConfig for a target (its ModelConfig) and a drafter: "ngram", or a
    draft model / EAGLE head folder (`eagle` says which). Chains; a draft model also reuses phrases
    (Ouroboros), whose chain may go on to twice its depth."""
    large = target_config.hidden_size >= LARGE_HIDDEN
    kind = "ngram" if draft == "ngram" else "eagle" if eagle else "model"
    depth = DEFAULT_DEPTH[kind, large]
    if kind == "model":
        return SpecConfig(draft=draft, depth=depth, tree_size=2 * depth, phrases=True)
    if kind == "ngram":
        # Single-token matches guess wrong often, but their verification rows cost less than they
        # win: projected 1.93x vs 1.83x (ngram_min 2) at the 0.5B shape, 2.06x vs 1.96x at the 8B.
        # A small target's verification row costs ~9% of its step (the wind-tunnel target, 1
        # thread): its chain stops where its chance of being right falls below 0.3, up to 12 tokens
        # (held-out wind-tunnel prompts, thread time: 1.72x vs 1.64x for a fixed chain of 4). A
        # large target's rows are cheap next to its step: it drafts all 4.
        ngram = {"ngram_min": 1, "ngram_max": DEFAULT_NGRAM_MAX}
        if large:
            return SpecConfig(draft=draft, depth=depth, tree_size=depth, **ngram)
        return SpecConfig(draft=draft, depth=depth, tree_size=depth, min_confidence=SMALL_MIN_CONFIDENCE, **ngram)
    return SpecConfig(draft=draft, depth=depth, tree_size=depth)


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

    def is_chain(self) -> bool:
        return bool(np.array_equal(self.parents, np.arange(-1, len(self) - 1)))

    def depths(self) -> np.ndarray:
        """Depth of each row of [root, *tokens] (root = 0)."""
        if self.is_chain():  # every step of a chain drafter: no per-node Python
            return np.arange(len(self) + 1, dtype=np.int64)
        d = np.zeros(len(self) + 1, dtype=np.int64)
        for i, p in enumerate(self.parents):
            d[i + 1] = d[p + 1] + 1
        return d

    def ancestor_mask(self) -> np.ndarray:
        """bool [m+1, m+1]: row i sees itself and its ancestors (the root is row 0)."""
        m = len(self)
        if self.is_chain():
            return np.tri(m + 1, dtype=bool)
        mask = np.eye(m + 1, dtype=bool)
        mask[:, 0] = True
        for i, p in enumerate(self.parents):
            mask[i + 1] |= mask[p + 1]
        return mask

    def children(self) -> list[dict[int, int]]:
        """For each row, {token: row} of its children."""
        if self.is_chain():
            return [{t: i + 1} for i, t in enumerate(self.tokens.tolist())] + [{}]
        kids: list[dict[int, int]] = [{} for _ in range(len(self) + 1)]
        for i, (t, p) in enumerate(zip(self.tokens.tolist(), self.parents.tolist(), strict=True)):
            kids[p + 1].setdefault(t, i + 1)
        return kids

    def truncated(self, n: int) -> DraftTree:
        """The first n nodes (still a tree: parents precede children)."""
        return DraftTree(self.tokens[:n], self.parents[:n])


# The chance that an n-gram drafter's guess is right given the draft before it is, by the length
# of the match (1, 2, 3, 4 or more tokens), before the share of the guessed token among what
# followed the match: rounded from the wind-tunnel target's greedy continuations of held-out
# prompts (click, jinja2 and httpx sources; the standard-library files left out of its training;
# not benchmarks/speculative.py's rich prompts). Nearby values move tokens per step by under 1%.
CONTEXT_CONFIDENCE = {1: 0.3, 2: 0.55, 3: 0.75, 4: 0.9}
CORPUS_CONFIDENCE = {1: 0.3, 2: 0.45, 3: 0.6, 4: 0.75}
# min_confidence can stop a chain from its third token on: its first two are drafted whenever the
# tables know them (on the same held-out prompts: 1-4% more tokens per second than from the
# second token on, for the median prompt as for all together).
FLOOR_FROM = 2


def load_table(path):
    """A corpus n-gram table, read once per file version (a server makes a drafter per request)."""
    path = Path(path).resolve()
    return _load_table(str(path), path.stat().st_mtime_ns if path.exists() else 0)


@functools.lru_cache(maxsize=4)
def _load_table(path: str, mtime_ns: int):
    from edgecpm.ngram_table import NgramTable

    return NgramTable.load(path)


class NgramDrafter:
    """Prompt lookup as a small n-gram model of the context itself. For each draft token: take the
    longest suffix of the context + draft so far (ngram_max down to ngram_min tokens) that occurred
    earlier in the context and propose the token that followed it most often (ties: the most
    recent occurrence); a chain of min(tree_size, depth) tokens. Voting over every earlier
    occurrence, and backing off per token, accepts more than copying what followed the latest
    match (wind-tunnel held-out prompts: 2.6 vs 2.2 tokens per step at depth 4, simulated).

    The table grows with the context (a few dictionary updates per accepted token), so a step
    costs depth x ngram_max lookups, not a scan of the context.

    Each guess has a confidence, the chance that it is right given that the draft so far is: by
    the length n of the match and the share of the guessed token among what followed it,
    CONTEXT_CONFIDENCE[n] x share (CORPUS_CONFIDENCE for a corpus table's guess; both measured on
    wind-tunnel held-out prompts, not those of benchmarks/speculative.py). With a corpus table
    (`spec.corpus`, edgecpm.ngram_table: how the model's training text goes on) the likelier of
    the two guesses is drafted: code the model writes follows its training text more often than a
    lone token's last occurrence in the context. With `spec.min_confidence` the chain stops where
    the product of its confidences falls below it, so a step verifies long chains only where the
    context repeats itself.
    """

    def __init__(self, spec: SpecConfig):
        self.spec = spec
        self.indexed = np.zeros(0, np.int64)  # the context the table was built from
        self.follow: dict[tuple, dict[int, list[int]]] = {}  # n-gram -> {next token: [count, last position]}
        self.table = load_table(spec.corpus) if spec.corpus is not None else None
        self.rates = self.table is not None or spec.min_confidence > 0  # confidences wanted

    def index(self, context: np.ndarray) -> None:
        start = len(self.indexed)
        if start > len(context) or not np.array_equal(context[:start], self.indexed):  # a new prompt
            self.follow, start = {}, 0
        lo = max(start - self.spec.ngram_max, 0)
        ctx = context[lo:].tolist()  # only the new tokens and the n-grams that end in them
        for i in range(max(start, 1), len(context)):
            j = i - lo
            for n in range(1, min(self.spec.ngram_max, i) + 1):
                stats = self.follow.setdefault(tuple(ctx[j - n : j]), {}).setdefault(ctx[j], [0, 0])
                stats[0] += 1
                stats[1] = i
        self.indexed = context.copy()

    def _next(self, seq: list[int]) -> tuple[int, float] | None:
        """The next token after `seq` and its confidence (1.0 where none is wanted)."""
        best = None
        for n in range(min(self.spec.ngram_max, len(seq)), self.spec.ngram_min - 1, -1):
            stats = self.follow.get(tuple(seq[-n:]))
            if stats:
                token = max(stats, key=stats.__getitem__)  # [count, last position]: most often, then latest
                if not self.rates:
                    return token, 1.0
                share = stats[token][0] / sum(v[0] for v in stats.values())
                best = token, CONTEXT_CONFIDENCE[min(n, 4)] * share
                break
        if self.table is not None and (best is None or best[1] < CORPUS_CONFIDENCE[4]):
            hit = self.table.lookup(seq)
            if hit is not None:
                token, n, count, total = hit
                rate = CORPUS_CONFIDENCE[min(n, 4)] * count / total
                if best is None or rate > best[1]:
                    best = token, rate
        return best

    def continuation(self, seq: list[int], limit: int) -> list[int]:
        """Up to `limit` tokens that follow `seq` (the context's tail + a draft so far); with
        min_confidence, fewer where the chance that all are right falls below it (never fewer
        than FLOOR_FROM)."""
        seq, out, chance = seq[-self.spec.ngram_max :], [], 1.0
        while len(out) < limit:
            guess = self._next(seq)
            if guess is None:
                break
            chance *= guess[1]
            if len(out) >= FLOOR_FROM and chance < self.spec.min_confidence:
                break
            out.append(guess[0])
            seq.append(guess[0])
        return out

    def propose(self, context) -> DraftTree:
        context = np.asarray(context, dtype=np.int64)
        self.index(context)
        return DraftTree.chain(self.continuation(context[-self.spec.ngram_max :].tolist(),
                                                 min(self.spec.tree_size, self.spec.depth)))


POOL_PHRASES = 4096  # rejected phrases kept
PHRASE_KEY = 2  # tokens a rejected phrase is filed under (one token would bring back too many wrong ones)


class PhrasePool:
    """Ouroboros phrase reuse (Zhao et al., 2024) for chain drafts: phrases a draft may go on with.

    Two sources: the generated text (the context's n-gram table, as NgramDrafter) and the tails of
    earlier drafts that verification rejected. A draft the target cut at token i may still be
    right later on: its tokens after i are kept under the n-gram that precedes them in the draft,
    and come back whole when a later draft ends in that n-gram. The pool learns the cut itself: the
    next context is the old one + the accepted tokens + the new root, so no help from the
    verifier is needed. Whatever a phrase proposes, the target still decides every token.
    """

    def __init__(self, spec: SpecConfig):
        self.spec = spec
        self.text = NgramDrafter(spec)
        self.rejected: dict[tuple, list[int]] = {}  # n-gram -> the rejected draft tokens that followed it
        self.last: tuple[np.ndarray, list[int]] | None = None  # the last draft's context and tokens

    def update(self, context: np.ndarray) -> None:
        """Index the new context; file the rejected tail of the last draft."""
        self.text.index(context)
        if self.last is None:
            return
        before, draft = self.last
        n = len(before)
        accepted = len(context) - n - 1
        if 0 <= accepted < len(draft) and np.array_equal(context[:n], before):
            k = PHRASE_KEY
            seq = before[-k:].tolist() + draft
            for i in range(accepted + 1, len(draft)):  # from after the cut: its key holds the rejected token
                self.rejected[tuple(seq[i : i + k])] = draft[i:]
            while len(self.rejected) > POOL_PHRASES:  # the oldest go first
                del self.rejected[next(iter(self.rejected))]
        self.last = None

    def remember(self, context: np.ndarray, draft: list[int]) -> None:
        self.last = (context, list(draft))

    def guess(self, seq: list[int], limit: int) -> list[int]:
        """Up to `limit` tokens after `seq`: the context table's continuation, else (or after it)
        a whole rejected phrase keyed by the last PHRASE_KEY tokens, repeated while either knows more."""
        out: list[int] = []
        k = PHRASE_KEY
        while len(out) < limit:
            more = self.text.continuation(seq + out, limit - len(out))
            if not more:
                more = self.rejected.get(tuple((seq + out)[-k:]), [])[: limit - len(out)]
                if not more:
                    break
            out += more
        return out


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


def tree_positions(base: int, tree: DraftTree) -> np.ndarray:
    """Positions of a drafted tree's nodes placed after `base` context rows (their depths)."""
    return base + tree.depths()[1:] - 1


class ModelDrafter:
    """A smaller model drafting on its own backend and KV cache.

    A chain (branch 1) is the draft model's greedy continuation, run incrementally: one call per
    new token, and with `spec.phrases` one call checks a guessed phrase (PhrasePool) at once and
    keeps its prefix the draft model agrees with, so repetitive text costs fewer calls. The chain's
    rows stay in the cache: the next step's prefill reuses the accepted ones and runs only the new
    tokens. With phrases, the chain may then go on past `depth` with a phrase (no draft call) up
    to tree_size tokens.

    A tree (branch > 1) grows EAGLE-2-style (grow_tree): each level runs the whole tree drafted so
    far after the context with the ancestor mask (the cache is rolled back to the context between
    levels), so every node sees exactly its ancestors; `depth` draft calls, whatever the branching.
    """

    def __init__(self, backend, cache, spec: SpecConfig, id_map: np.ndarray | None):
        self.backend, self.cache, self.spec = backend, cache, spec
        self.id_map = id_map  # FR-Spec: draft logit column -> full-vocabulary id
        self.phrases = PhrasePool(spec) if spec.phrases else None
        self.eos = set(backend.config.eos_token_ids)  # verification stops there: a chain need not go on

    def propose(self, context) -> DraftTree:
        backend, cache, spec = self.backend, self.cache, self.spec
        context = np.asarray(context, dtype=np.int64)
        if cache.capacity - len(context) < max(spec.depth, spec.tree_size) + 1:
            return DraftTree.chain([])
        logits = prefill(backend, cache, context)  # next-token logits after the root
        if spec.branch == 1:
            return DraftTree.chain(self._chain(context, logits))
        base = cache.length

        def run_level(tree: DraftTree, rows: np.ndarray) -> np.ndarray:
            cache.truncate(base)
            mask = tree.ancestor_mask()[1:, 1:]  # among the drafted nodes; the context is past
            return run_step(backend, cache, tree.tokens, mask, rows, positions=tree_positions(base, tree))

        tree = grow_tree(spec, logits, self.id_map, run_level)
        cache.truncate(base)
        return tree

    def _ids(self, logits: np.ndarray) -> np.ndarray:
        """Greedy token ids of logit rows [N, V'] (FR-Spec columns mapped to ids)."""
        cols = logits.argmax(axis=-1)
        return self.id_map[cols] if self.id_map is not None else cols

    def _chain(self, context: np.ndarray, logits: np.ndarray) -> list[int]:
        spec, pool = self.spec, self.phrases
        length = min(spec.depth, spec.tree_size)
        if pool:
            pool.update(context)
        tail = context[-spec.ngram_max :].tolist()
        draft = [int(self._ids(logits[None])[0])]
        while len(draft) < length and draft[-1] not in self.eos:
            guess = pool.guess(tail + draft, length - len(draft) - 1) if pool else []
            out = run_step(self.backend, self.cache, np.array([draft[-1], *guess], dtype=np.int64), None,
                           np.arange(len(guess) + 1, dtype=np.int64))
            says = self._ids(out).tolist()  # the draft model's next token after each fed token
            agree = 0
            while agree < len(guess) and guess[agree] == says[agree]:
                agree += 1
            self.cache.truncate(self.cache.length - (len(guess) - agree))  # drop the rows it disagreed with
            draft += guess[:agree] + [says[agree]]
        if pool and draft[-1] not in self.eos:
            draft += pool.guess(tail + draft, spec.tree_size - len(draft))  # the phrase's tail: no draft call
            pool.remember(context, draft)
        return draft


# ---- EAGLE heads ----------------------------------------------------------------------------------

def is_eagle(path: Path) -> bool:
    """An EAGLE head: a bundle whose manifest says so, or a checkpoint whose config names an Eagle
    architecture or whose weights hold the head's `model.fc.weight`."""
    path = Path(path)
    if is_bundle(path):
        return bool(read_manifest(path).get("eagle"))
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


_ROW0 = np.zeros(1, dtype=np.int64)


class EagleDrafter:
    """An EAGLE head drafting from the target's features (standard EAGLE pairing).

    Head row i reads (token x[i+1], target feature f[i]) at position i and predicts x[i+2], so the
    head's cache holds the ids x[1:] of the context it has read. Before each step the head catches
    up on the rows the target added: the last of them pairs the root (the token to be verified
    next) with the feature of the last accepted row, and its logits give the tree's first level.
    Deeper levels feed (draft token, the head's own `out` of the parent node) and grow as in
    ModelDrafter. Its KV cache is its own small arena from the session's budget.
    """

    def __init__(self, backend, cache, target_backend, target_cache, spec: SpecConfig, id_map: np.ndarray | None):
        self.backend, self.cache, self.spec, self.id_map = backend, cache, spec, id_map
        self.features = FeatureLog(target_backend, target_cache)
        self.eos = set(backend.config.eos_token_ids)  # verification stops there: a chain need not go on

    def first_needed_row(self, ids) -> int:
        """The first target row whose feature the head will read for a context starting with `ids`;
        the session re-runs the target from there when the log no longer holds it."""
        need = self.cache.shared_prefix(np.asarray(ids, dtype=np.int64)[1:])  # head rows still valid
        return need if need < self.features.start else len(ids)

    def propose(self, context) -> DraftTree:
        spec, cache = self.spec, self.cache
        context = np.asarray(context, dtype=np.int64)
        n = len(context) - 1  # target rows: the root context[-1] is verified next
        if cache.capacity - n < spec.depth + 1:
            return DraftTree.chain([])
        first = min(cache.shared_prefix(context[1:]), n - 1)  # head rows still valid: they pair ids[1:]
        cache.truncate(first)
        logits, root_out = self._catch_up(context[first + 1 :], self.features.take(first, n), first)
        self.features.drop_before(n)
        base = cache.length
        if spec.branch == 1:
            tree = DraftTree.chain(self._chain(logits, root_out, base))
            cache.truncate(base)  # the chain's rows hold the head's own features, not the target's
            return tree
        outs = np.zeros((0, root_out.shape[0]), np.float32)  # the head's `out` of each tree node

        def run_level(tree: DraftTree, rows: np.ndarray) -> np.ndarray:
            nonlocal outs
            cache.truncate(base)
            parent_out = np.concatenate([root_out[None], outs])[tree.parents + 1]
            out = self._run(tree.tokens, parent_out, tree.ancestor_mask()[1:, 1:], tree_positions(base, tree), rows)
            outs = self.backend.last_hidden
            return out

        tree = grow_tree(spec, logits, self.id_map, run_level)
        cache.truncate(base)
        return tree

    def _chain(self, logits: np.ndarray, root_out: np.ndarray, base: int) -> list[int]:
        """The head's greedy chain, one call per token: each feeds the newest token with the head's
        `out` of its parent (grow_tree with branch 1 drafts the same tokens, re-running the whole
        chain at every level)."""
        draft, feature = [self._id(logits)], root_out
        while len(draft) < min(self.spec.depth, self.spec.tree_size) and draft[-1] not in self.eos:
            logits = self._run([draft[-1]], feature[None], None, [base + len(draft) - 1], _ROW0)[0]
            feature = self.backend.last_hidden[0]
            draft.append(self._id(logits))
        return draft

    def _id(self, logits: np.ndarray) -> int:
        col = int(logits.argmax())
        return int(self.id_map[col]) if self.id_map is not None else col

    def _catch_up(self, tokens: np.ndarray, features: np.ndarray, start: int) -> tuple[np.ndarray, np.ndarray]:
        """Run the head on new context rows in prefill-sized chunks; the last row's logits and out."""
        done = 0
        while done < len(tokens):
            size = prefill_chunk(self.backend, self.cache.length)
            t, f = tokens[done : done + size], features[done : done + size]
            last = done + len(t) == len(tokens)
            rows = np.array([len(t) - 1] if last else [], dtype=np.int64)
            logits = self._run(t, f, None, np.arange(start + done, start + done + len(t)), rows)
            done += len(t)
        return logits[-1], self.backend.last_hidden[-1].copy()

    def _run(self, tokens, features, mask, positions, rows) -> np.ndarray:
        return run_step(self.backend, self.cache, np.asarray(tokens, dtype=np.int64), mask, rows,
                        positions=np.asarray(positions, dtype=np.int64), hidden_in=features)
