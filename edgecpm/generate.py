"""Generation as plain functions over a backend and its KV cache (gpt-fast style).

    logits = prefill(backend, cache, prompt_ids)          # reuses the prefix the cache holds
    for token in decode_tokens(backend, cache, logits, sampler, ...): ...
    for token in speculative_tokens(backend, cache, logits, sampler, ..., drafter): ...
    g = yield from generate_text(...)                     # the whole loop, as text pieces

The cache is the static arena of `edgecpm.kv_cache`; each step writes its rows (and their token
ids) by position. `edgecpm.Session` opens a backend, a cache and a drafter and calls these.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from edgecpm.errors import BudgetError
from edgecpm.kv_cache import KVCache
from edgecpm.sampling import Sampler, SamplingParams

PREFILL_CHUNK = 512  # tokens per prefill step: bounds activation memory for long prompts
# Attention scores of a step are ~(query heads x new tokens x context) fp32 values, a few copies
# alive at once: past long contexts the chunk shrinks to keep them near 256 MiB.
SCORE_ELEMENTS = 64 * 2**20


def prefill_chunk(backend, context: int) -> int:
    """Tokens of the next prefill step after `context` cached ones: the backend's own size when its
    attention materializes no scores (a fused kernel), else shrinking with the context."""
    if backend.max_prefill_chunk:
        return backend.max_prefill_chunk
    n_heads = backend.config.num_attention_heads
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


def run_step(backend, cache: KVCache, ids: np.ndarray, attn_mask: np.ndarray | None, logit_index: np.ndarray,
             positions: np.ndarray | None = None, hidden_in: np.ndarray | None = None) -> np.ndarray:
    """One forward over `ids` placed right after the cached context; commits their K/V and ids.
    The mask defaults to causal and positions to consecutive ones (a draft tree passes its
    ancestor mask and each node's depth instead); `hidden_in` feeds an EAGLE head's features."""
    if attn_mask is None:
        attn_mask = causal_mask(len(ids))
    if positions is None:
        positions = np.arange(cache.position, cache.position + len(ids), dtype=np.int64)
    logits = backend.forward(ids, positions, attn_mask, cache, logit_index, hidden_in=hidden_in)
    cache.commit(ids)
    return logits


def prefill(backend, cache: KVCache, ids, all_logits: bool = False, timer: Timer | None = None,
            reuse_limit: int | None = None) -> np.ndarray:
    """Bring the cache to hold `ids`: keep the longest prefix it already holds (at most
    `reuse_limit` rows) and run the rest in chunks. Returns the last row's logits [V], or with
    `all_logits` the logits of every row run [T, V] (call it on an empty cache for all of `ids`)."""
    ids = np.asarray(ids, dtype=np.int64)
    check_prompt(cache, len(ids))
    ids = ids[cache.reuse_prefix(ids, reuse_limit):]
    if not cache.window:
        cache.check_room(len(ids))
    t0 = time.perf_counter()
    rows = []
    start = 0
    while start < len(ids):
        size = prefill_chunk(backend, cache.length)
        if cache.window:  # a prompt longer than the arena streams through the window
            size = min(size, cache.capacity - cache.sink_tokens, len(ids) - start)
            cache.make_room(size)
        chunk = ids[start : start + size]
        last = start + len(chunk) == len(ids)
        want = np.arange(len(chunk)) if all_logits else np.array([len(chunk) - 1] if last else [], np.int64)
        rows.append(run_step(backend, cache, chunk, None, want.astype(np.int64)))
        start += len(chunk)
    if timer:
        timer.prefill_tokens += len(ids)
        timer.prefill_s += time.perf_counter() - t0
    return np.concatenate(rows) if all_logits else rows[-1][-1]


def check_prompt(cache: KVCache, n_tokens: int) -> None:
    """Refuse, before any work, a prompt the model or the arena cannot hold."""
    if n_tokens > cache.max_positions:
        raise BudgetError(f"prompt has {n_tokens} tokens but the model's max_position_embeddings is "
                          f"{cache.max_positions}; shorten the prompt")
    if n_tokens > cache.capacity and not cache.window:  # the window policy streams a long prompt through
        raise BudgetError(f"prompt has {n_tokens} tokens but the KV budget holds {cache.capacity} tokens "
                          f"({cache.bytes_per_token} bytes per token); raise kv_budget or shorten the prompt")


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
                       eos_ids: set[int], timer: Timer, drafter):
    """Like decode_tokens, verifying a draft tree per target pass (DESIGN.md §10).

    Each step feeds [root, *draft] with the tree's ancestor mask, then walks the tree: at each node
    the sampler picks the target's token from that node's logits (argmax when greedy); if a child
    carries that token the walk descends, otherwise that token ends the step. Every emitted token
    is therefore exactly what plain decoding would emit (sample-then-match: sampling stays
    lossless). The cache keeps the rows of the root and the accepted nodes, compacted.

    Per-step Python stays small: a chain (every n-gram and chain-model step) takes its cached causal
    mask and consecutive positions, and its walk needs no children table; plain greedy decoding
    picks every row's token in one argmax over the logits; a chain's accepted rows stay in place.
    """
    n = 0
    token = sampler(logits)
    greedy = sampler.plain_greedy  # pick every row's token in one argmax
    while True:
        sampler.observe(token)
        yield token
        n += 1
        if token in eos_ids:
            return "eos"
        if n == max_new_tokens or cache.free < 1:
            return "length"
        t0 = time.perf_counter()
        tree = drafter.propose(np.append(cache.ids, token))  # the context: the cache's ids + the root
        m = min(len(tree), cache.free - 1)
        ids = np.empty(m + 1, dtype=np.int64)
        ids[0] = token
        ids[1:] = tree.tokens[:m]
        if tree.is_chain():  # mask, positions and walk without per-node work
            chain, mask, depths = True, causal_mask(m + 1), _rows(m + 1)
        else:
            tree = tree.truncated(m)
            chain, mask, depths = False, tree.ancestor_mask(), tree.depths()
        start = cache.length
        out = run_step(backend, cache, ids, mask, _rows(m + 1), positions=cache.position + depths)
        drafted = ids[1:].tolist() if chain else None
        picks = out.argmax(axis=-1).tolist() if greedy else None
        kids = None if chain else tree.children()
        row, keep, accepted = 0, [start], []
        while True:
            token = picks[row] if greedy else sampler(out[row])
            # A chain's row i has one child, row i + 1, carrying drafted[i].
            child = (row + 1 if row < m and drafted[row] == token else None) if chain else kids[row].get(token)
            # A token that ends generation is emitted by the loop head; its row is not kept.
            if child is None or token in eos_ids or n + len(accepted) + 1 >= max_new_tokens:
                break
            sampler.observe(token)
            accepted.append(token)
            row = child
            keep.append(start + row)
        if chain:
            cache.keep_prefix(start, len(keep))
        else:
            cache.keep(start, np.array(keep))
        timer.decode_s += time.perf_counter() - t0
        timer.decode_tokens += len(accepted) + 1
        timer.steps += 1
        timer.accepted.append(len(accepted))
        timer.drafted.append(m)
        for x in accepted:
            yield x
            n += 1


_ROWS = np.arange(64, dtype=np.int64)


def _rows(n: int) -> np.ndarray:
    """0, 1, ..., n-1 (logit rows of a verification step; a chain's depths)."""
    return _ROWS[:n] if n <= len(_ROWS) else np.arange(n, dtype=np.int64)


def generate_text(backend, cache: KVCache, tokenizer, prompt_ids, max_new_tokens: int, params: SamplingParams,
                  stop: list[str], eos_ids: set[int], drafter=None, reuse_limit=None, constraint=None):
    """The whole loop: prefill (reusing the cached prefix), then plain or speculative decoding;
    yields UTF-8-safe text pieces and returns the Generation.

    A `constraint` (structured output) masks every sampled token; such a request decodes without
    the drafter (drafted tokens are not checked against the mask).

    Stop strings: text that could still become the start of a stop string is held back, so a
    streamed stop string is never shown; the text ends right before it.
    """
    timer = Timer()
    t0 = time.perf_counter()
    logits = prefill(backend, cache, prompt_ids, timer=timer,
                     reuse_limit=reuse_limit(prompt_ids) if reuse_limit else None)
    sampler = Sampler(params, backend.config.vocab_size, prompt_ids, constraint)
    if drafter is None or constraint is not None:
        tokens = decode_tokens(backend, cache, logits, sampler, max_new_tokens, eos_ids, timer)
    else:
        tokens = speculative_tokens(backend, cache, logits, sampler, max_new_tokens, eos_ids, timer, drafter)
    detok = tokenizer.stream_decoder() if tokenizer else None
    out_ids: list[int] = []
    text, shown = "", 0
    hold = max((len(x) for x in stop), default=1) - 1
    finish = None
    while True:
        try:
            token = next(tokens)
        except StopIteration as end:
            finish = end.value
            break
        out_ids.append(token)
        if token in eos_ids:
            continue
        text += detok.add(token) if detok else ""
        cut = _find_stop(text, shown, stop)
        if cut is not None:
            text, finish = text[:cut], "stop"
            break
        safe = len(text) - hold if stop else len(text)
        if safe > shown:
            yield text[shown:safe]
            shown = safe
    tokens.close()
    if detok and finish != "stop":
        text += detok.flush()
    if shown < len(text):
        yield text[shown:]
    stats = timer.as_stats(cache)
    stats["total_s"] = time.perf_counter() - t0
    gen_ids = [t for t in out_ids if t not in eos_ids] if finish == "eos" else out_ids
    return Generation(text, gen_ids, finish, stats)


def _find_stop(text: str, shown: int, stop: list[str]) -> int | None:
    start = max(0, shown - max((len(x) for x in stop), default=0))
    hits = [i for i in (text.find(x, start) for x in stop) if i >= 0]
    return min(hits) if hits else None
