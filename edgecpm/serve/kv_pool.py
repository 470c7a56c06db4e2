"""KV caches for concurrent requests, all allocated out of one byte budget.

Each running request holds one KVCache sized for its prompt + max_tokens. When it finishes its
cache stays in the pool, idle, holding the conversation's ids; a new request whose prompt shares
a prefix with an idle cache takes that cache (or a copy of its prefix rows, when it needs more
room), and prefill keeps the shared prefix (KVCache.reuse_prefix, the rule Session uses). Idle
caches are evicted least recently used when a new request needs their bytes; running requests'
caches never are.
"""

from __future__ import annotations

import numpy as np

from edgecpm.config import ModelConfig
from edgecpm.kv_cache import KVCache


class KVPool:
    def __init__(self, config: ModelConfig, dtype, budget: int):
        self.config, self.dtype, self.budget = config, np.dtype(dtype), budget
        self.bytes_per_token = config.kv_bytes_per_token(self.dtype.itemsize)
        self.active: list[KVCache] = []
        self.idle: list[KVCache] = []  # least recently used first

    def cache_bytes(self, capacity: int) -> int:
        """What KVCache(config, capacity) allocates: the arena and InfLLM v2's compressed keys."""
        c = self.config
        per_row = c.num_hidden_layers * c.num_key_value_heads * c.head_dim
        n_ck = c.sparse.n_chunks(capacity) if c.sparse else 0
        return 2 * capacity * per_row * self.dtype.itemsize + n_ck * per_row * 4

    @property
    def max_capacity(self) -> int:
        """The most tokens one request can hold: the whole budget, within the model's context."""
        n = self.budget // self.bytes_per_token
        while n > 0 and self.cache_bytes(n) > self.budget:
            n -= 1
        return min(n, self.config.max_position_embeddings)

    def bytes_of(self, caches) -> int:
        return sum(c.bytes_allocated for c in caches)

    def acquire(self, ids, capacity: int) -> KVCache | None:
        """A cache of at least `capacity` tokens for a prompt `ids`, holding the longest prefix of
        `ids` an idle cache holds; None while running requests hold too much of the budget.

        A prompt that continues an idle cache's whole context takes that cache. Otherwise the
        shared rows are copied into a new cache (a copy is far cheaper than a prefill), leaving
        the idle one for its own conversation, unless its bytes are needed."""
        ids = np.asarray(ids, dtype=np.int64)[:-1]  # the last prompt token always runs (its logits are wanted)
        source = max(reversed(self.idle), key=lambda c: c.shared_prefix(ids), default=None)
        shared = source.shared_prefix(ids) if source else 0
        continues = shared > 0 and shared == source.length
        if continues and source.capacity >= capacity:
            return self._take(source)
        need = self.cache_bytes(capacity)
        if self._free_up(need, spare=source):
            cache = KVCache(self.config, capacity, self.dtype)
            if shared:
                copy_prefix(source, cache, shared)
            if continues:  # the new cache holds all of it
                self.idle.remove(source)
            self.active.append(cache)
            return cache
        if shared and source.capacity >= capacity:  # the budget is tight: give up the idle cache's tail
            return self._take(source)
        if self._free_up(need):
            self.active.append(KVCache(self.config, capacity, self.dtype))
            return self.active[-1]
        return None

    def _take(self, cache: KVCache) -> KVCache:
        self.idle.remove(cache)
        self.active.append(cache)
        return cache

    def release(self, cache: KVCache, keep: bool) -> None:
        """A request is done with `cache`: keep it for a continuation, or free it now."""
        self.active.remove(cache)
        if keep:
            self.idle.append(cache)

    def _free_up(self, need: int, spare: KVCache | None = None) -> bool:
        """Evict idle caches (least recently used first, `spare` last of all: never) until `need`
        bytes are free; evicts nothing when that cannot be reached."""
        victims = [c for c in self.idle if c is not spare]
        free = self.budget - self.bytes_of(self.active) - self.bytes_of(self.idle)
        if free + self.bytes_of(victims) < need:
            return False
        for c in victims:
            if free >= need:
                break
            self.idle.remove(c)
            free += c.bytes_allocated
        return True


def copy_prefix(src: KVCache, dst: KVCache, n: int) -> None:
    """Make `dst` (empty) hold the first `n` tokens of `src`: their K/V rows, compressed keys and ids."""
    dst.arena[:, :, :n] = src.arena[:, :, :n]
    if src.sparse:
        k = src.sparse.n_chunks(n)
        dst.ckeys[:, :k] = src.ckeys[:, :k]
    dst.commit(src.ids[:n].copy())
