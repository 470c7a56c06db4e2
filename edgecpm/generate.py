"""Generation as plain functions over a backend and its KV cache (gpt-fast style).

    logits = prefill(backend, cache, prompt_ids)
    for token in decode_tokens(backend, cache, logits, sampler, ...): ...

The cache is the static arena of `edgecpm.kv_cache`; each step writes its rows by position.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from edgecpm.kv_cache import KVCache
from edgecpm.sampling import Sampler

PREFILL_CHUNK = 512  # tokens per prefill step: bounds activation memory for long prompts
# Attention scores of a step are ~(query heads x new tokens x context) fp32 values, a few copies
# alive at once: past long contexts the chunk shrinks to keep them near 256 MiB.
SCORE_ELEMENTS = 64 * 2**20


def prefill_chunk(n_heads: int, context: int) -> int:
    return int(max(16, min(PREFILL_CHUNK, SCORE_ELEMENTS // (n_heads * (context + PREFILL_CHUNK)))))

_causal_masks: dict[int, np.ndarray] = {}


def causal_mask(n: int) -> np.ndarray:
    if n not in _causal_masks:
        _causal_masks[n] = np.tril(np.ones((n, n), dtype=bool))
    return _causal_masks[n]


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    finish_reason: str  # "eos" | "length" | "stop"
    stats: dict = field(default_factory=dict)


@dataclass
class Timer:
    """Counts tokens and seconds of each phase; becomes Generation.stats."""

    prefill_tokens: int = 0
    prefill_s: float = 0.0
    decode_tokens: int = 0
    decode_s: float = 0.0
    steps: int = 0
    accepted: list = field(default_factory=list)  # speculative: draft tokens accepted per step
    drafted: list = field(default_factory=list)  # speculative: draft tokens proposed per step

    def as_stats(self, cache: KVCache) -> dict:
        return {
            "prefill_tokens": self.prefill_tokens,
            "prefill_tok_s": self.prefill_tokens / self.prefill_s if self.prefill_s else 0.0,
            "decode_tokens": self.decode_tokens,
            "decode_tok_s": self.decode_tokens / self.decode_s if self.decode_s else 0.0,
            "accepted_per_step": self.decode_tokens / self.steps if self.steps else 0.0,
            "acceptance_by_position": acceptance_by_position(self.accepted, self.drafted),
            "kv_tokens": cache.length,
            "kv_bytes_in_use": cache.bytes_in_use,
        }


def acceptance_by_position(accepted: list[int], drafted: list[int]) -> list[float]:
    """For i = 0, 1, ...: the share of steps accepting at least i+1 draft tokens among the steps
    that drafted at least i+1 (for a chain: the acceptance rate of draft position i)."""
    if not accepted:
        return []
    acc, dr = np.asarray(accepted), np.asarray(drafted)
    depth = int(dr.max(initial=0))
    return [float((acc > i).sum() / max((dr > i).sum(), 1)) for i in range(depth)]


def run_step(backend, cache: KVCache, ids: np.ndarray, attn_mask: np.ndarray, logit_index: np.ndarray,
             positions: np.ndarray | None = None) -> np.ndarray:
    """One forward over `ids` placed right after the cached context; commits their K/V.
    Positions default to consecutive ones (a draft tree passes each node's depth instead)."""
    if positions is None:
        positions = np.arange(cache.position, cache.position + len(ids), dtype=np.int64)
    logits = backend.forward(ids, positions, attn_mask, cache, logit_index)
    cache.commit(len(ids))
    return logits


def prefill(backend, cache: KVCache, ids, all_logits: bool = False, timer: Timer | None = None) -> np.ndarray:
    """Run `ids` through the model in chunks. Returns the last row's logits [V] (or [T, V])."""
    ids = np.asarray(ids, dtype=np.int64)
    if not cache.window:
        cache.check_room(len(ids))
    t0 = time.perf_counter()
    rows = []
    start = 0
    while start < len(ids):
        size = prefill_chunk(backend.config.num_attention_heads, cache.length)
        if cache.window:  # a prompt longer than the arena streams through the window
            size = min(size, cache.capacity - cache.sink_tokens, len(ids) - start)
            cache.make_room(size)
        chunk = ids[start : start + size]
        last = start + len(chunk) == len(ids)
        want = np.arange(len(chunk)) if all_logits else np.array([len(chunk) - 1] if last else [], np.int64)
        rows.append(run_step(backend, cache, chunk, causal_mask(len(chunk)), want.astype(np.int64)))
        start += len(chunk)
    if timer:
        timer.prefill_tokens += len(ids)
        timer.prefill_s += time.perf_counter() - t0
    return np.concatenate(rows) if all_logits else rows[-1][-1]


_ONE = np.zeros(1, dtype=np.int64)
_MASK1 = np.ones((1, 1), dtype=bool)


def decode_one_token(backend, cache: KVCache, token: int) -> np.ndarray:
    return run_step(backend, cache, np.array([token], dtype=np.int64), _MASK1, _ONE)[0]


def decode_tokens(backend, cache: KVCache, logits: np.ndarray, sampler: Sampler, max_new_tokens: int,
                  eos_ids: set[int], timer: Timer):
    """Yield sampled tokens one by one until EOS, max_new_tokens or a full arena.

    The generator's return value is the finish reason; a token is fed to the model only when
    another one is wanted, so the cache never holds a token past the end.
    """
    for n in range(max_new_tokens):
        token = sampler(logits)
        sampler.observe(token)
        yield token
        if token in eos_ids:
            return "eos"
        if n + 1 == max_new_tokens:
            break
        if not cache.make_room(1):
            return "length"
        t0 = time.perf_counter()
        logits = decode_one_token(backend, cache, token)
        timer.decode_s += time.perf_counter() - t0
        timer.decode_tokens += 1
        timer.steps += 1
    return "length"


def speculative_tokens(backend, cache: KVCache, logits: np.ndarray, sampler: Sampler, max_new_tokens: int,
                       eos_ids: set[int], timer: Timer, drafter, context: list[int]):
    """Like decode_tokens, verifying a draft tree per target pass (DESIGN.md §10).

    Each step feeds [root, *draft] with the tree's ancestor mask, then walks the tree: at each node
    the sampler picks the target's token from that node's logits (argmax when greedy); if a child
    carries that token the walk descends, otherwise that token ends the step. Every emitted token
    is therefore exactly what plain decoding would emit (sample-then-match: sampling stays
    lossless). The cache keeps the rows of the root and the accepted nodes, compacted.
    `context` (the prompt ids) is extended in place with the emitted tokens.
    """
    n = 0
    token = sampler(logits)
    while True:
        sampler.observe(token)
        context.append(token)
        yield token
        n += 1
        if token in eos_ids:
            return "eos"
        if n == max_new_tokens or cache.free < 1:
            return "length"
        t0 = time.perf_counter()
        tree = drafter.propose(context)
        tree = tree.truncated(min(len(tree), cache.free - 1))
        start = cache.length
        out = run_step(backend, cache, np.concatenate([[token], tree.tokens]).astype(np.int64),
                       tree.ancestor_mask(), np.arange(len(tree) + 1, dtype=np.int64),
                       positions=cache.position + tree.depths())
        kids = tree.children()
        row, keep, accepted = 0, [start], []
        while True:
            token = sampler(out[row])
            child = kids[row].get(token)
            # A token that ends generation is emitted by the loop head; its row is not kept.
            if child is None or token in eos_ids or n + len(accepted) + 1 >= max_new_tokens:
                break
            sampler.observe(token)
            context.append(token)
            accepted.append(token)
            row = child
            keep.append(start + row)
        cache.keep(start, np.array(keep))
        timer.decode_s += time.perf_counter() - t0
        timer.decode_tokens += len(accepted) + 1
        timer.steps += 1
        timer.accepted.append(len(accepted))
        timer.drafted.append(len(tree))
        for x in accepted:
            yield x
            n += 1
