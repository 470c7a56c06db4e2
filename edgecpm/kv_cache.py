"""The KV cache: one arena per sequence, allocated once from a byte budget (DESIGN.md §9).

Layout: per layer K and V of shape [capacity, Hkv, D], token-major, so the first `length` rows of
a layer are one contiguous view that a backend binds as `past_key.{i}` without copying, and the
rows a step adds are one contiguous slot it writes into. Every backend uses this class.

The cache also owns the token ids of the sequence it holds (`ids`, by position): a step commits
its ids with its rows, and a new request keeps the longest prefix it shares (`reuse_prefix`).
This is the one copy of the sequence that sessions and drafters read.

Policy when the context outgrows the arena:
- "error" (default): a prompt that does not fit is refused before any work (BudgetError naming the
  numbers); generation that reaches the end stops with finish_reason "length". Nothing is
  corrupted either way and the session stays usable.
- "window" (StreamingLLM-style, lossy): when a step needs room, the oldest rows after the first
  `sink_tokens` (the attention sinks) are dropped, a quarter of the arena at a time, and the rest
  is compacted. Keys keep the RoPE positions they were computed at and new tokens continue the
  sequence's positions (`position`), so a long generation or chat runs on in a fixed arena,
  attending to the sinks and the most recent tokens (up to max_position_embeddings).
"""

from __future__ import annotations

import re

import numpy as np

from edgecpm.config import ModelConfig
from edgecpm.errors import BudgetError

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_bytes(value: int | str) -> int:
    """1024, "512MiB", "2GB", "1.5 GiB" -> bytes."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        n = int(value)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(value))
        unit = m.group(2).upper() if m else None
        if unit not in _UNITS:
            raise BudgetError(f"kv_budget={value!r}: expected bytes (int) or a size like '512MiB', '2GB'")
        n = int(float(m.group(1)) * _UNITS[unit])
    if n <= 0:
        raise BudgetError(f"kv_budget={value!r}: must be positive")
    return n


POLICIES = ("error", "window")


class KVCache:
    def __init__(self, cfg: ModelConfig, capacity: int, dtype: np.dtype, policy: str = "error", sink_tokens: int = 4):
        if policy not in POLICIES:
            raise ValueError(f"kv_policy={policy!r}: expected one of {POLICIES}")
        self.policy, self.sink_tokens = policy, sink_tokens
        self.max_positions = cfg.max_position_embeddings
        self.dtype = np.dtype(dtype)
        self.capacity = capacity
        self.bytes_per_token = cfg.kv_bytes_per_token(self.dtype.itemsize)
        # One allocation for all layers; np.zeros maps pages lazily, so resident memory grows with
        # use but can never exceed capacity * bytes_per_token.
        self.arena = np.zeros(
            (cfg.num_hidden_layers, 2, capacity, cfg.num_key_value_heads, cfg.head_dim), self.dtype
        )
        self.keys = [self.arena[i, 0] for i in range(cfg.num_hidden_layers)]
        self.values = [self.arena[i, 1] for i in range(cfg.num_hidden_layers)]
        # InfLLM v2: float32 compressed keys, one row per completed chunk, derived from the keys
        # (their count always follows from `length`, so truncation needs no bookkeeping).
        self.sparse = cfg.sparse
        n_ck = cfg.sparse.n_chunks(capacity) if cfg.sparse else 0
        self.ckeys = np.zeros((cfg.num_hidden_layers, n_ck, cfg.num_key_value_heads, cfg.head_dim), np.float32)
        # The ids of positions [0, position): the sequence the cache has seen, evicted tokens
        # included (the window policy needs them to recognise a continuation).
        self._ids = np.zeros(self.max_positions if policy == "window" else capacity, np.int64)
        self.length = 0
        self.evicted = 0  # tokens dropped by the window policy: row r (past the sinks) is position r + evicted
        self.peak_length = 0
        # Called as hook(start, rows) after keep(): a backend holding a device copy of the arena
        # (TensorRT) compacts its own rows the same way.
        self.keep_hooks: list = []
        # Called as hook(start, n) after commit(): an EAGLE drafter collects the target's features
        # of the rows a step added.
        self.commit_hooks: list = []

    @classmethod
    def from_budget(cls, cfg: ModelConfig, budget: int | str, dtype: np.dtype) -> KVCache:
        budget = parse_bytes(budget)
        per_token = cfg.kv_bytes_per_token(np.dtype(dtype).itemsize)
        capacity = min(budget // per_token, cfg.max_position_embeddings)
        if capacity < 1:
            raise BudgetError(
                f"kv_budget of {budget} bytes holds no token: this model needs {per_token} bytes per "
                f"token of KV cache; raise kv_budget"
            )
        return cls(cfg, capacity, dtype)

    @property
    def bytes_allocated(self) -> int:
        return self.arena.nbytes + self.ckeys.nbytes

    @property
    def bytes_in_use(self) -> int:
        return self.length * self.bytes_per_token

    @property
    def free(self) -> int:
        return self.capacity - self.length

    @property
    def position(self) -> int:
        """The position of the next token: the context's length, evicted tokens included."""
        return self.evicted + self.length

    @property
    def ids(self) -> np.ndarray:
        """The token ids of the context, positions [0, position) (a view: copy it to keep it)."""
        return self._ids[: self.position]

    @property
    def window(self) -> bool:
        return self.policy == "window"

    def make_room(self, n_tokens: int) -> bool:
        """Ensure n_tokens free rows: under the window policy by dropping the oldest rows after the
        sinks (at least a quarter of the arena, so the compaction copy is rare). False if they
        cannot be freed."""
        if self.position + n_tokens > self.max_positions:
            return False
        if n_tokens <= self.free:
            return True
        if not self.window or n_tokens > self.capacity - self.sink_tokens:
            return False
        drop = min(max(n_tokens - self.free, (self.capacity - self.sink_tokens) // 4), self.length - self.sink_tokens)
        self._compact(self.sink_tokens, np.arange(self.sink_tokens + drop, self.length))
        self.evicted += drop
        return True

    def check_room(self, n_tokens: int, what: str = "prompt") -> None:
        if n_tokens > self.free:
            raise BudgetError(
                f"{what} needs {n_tokens} more tokens of KV cache but only {self.free} of "
                f"{self.capacity} are free ({self.bytes_per_token} bytes per token, "
                f"{self.bytes_allocated} bytes allocated); raise kv_budget or shorten the {what}"
            )

    def past(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows [0, length): zero-copy views bound as past_key/past_value."""
        return self.keys[layer][: self.length], self.values[layer][: self.length]

    def slot(self, layer: int, n_tokens: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows [length, length + n): where a step writes its new keys/values."""
        end = self.length + n_tokens
        return self.keys[layer][self.length : end], self.values[layer][self.length : end]

    def past_ck(self, layer: int) -> np.ndarray:
        return self.ckeys[layer][: self.sparse.n_chunks(self.length)]

    def ck_slot(self, layer: int, n_tokens: int) -> np.ndarray:
        """Where a step writes the compressed keys of the chunks its tokens complete."""
        return self.ckeys[layer][self.sparse.n_chunks(self.length) : self.sparse.n_chunks(self.length + n_tokens)]

    def commit(self, ids: np.ndarray) -> None:
        """Make the rows a step wrote (one per id of `ids`) part of the context."""
        n_tokens = len(ids)
        self._ids[self.position : self.position + n_tokens] = ids
        self.length += n_tokens
        self.peak_length = max(self.peak_length, self.length)
        for hook in self.commit_hooks:
            hook(self.length - n_tokens, n_tokens)

    def shared_prefix(self, ids: np.ndarray) -> int:
        """How many leading ids of `ids` the context holds (compared in numpy)."""
        held = self.ids
        n = min(len(held), len(ids))
        differ = np.flatnonzero(held[:n] != ids[:n])
        return int(differ[0]) if len(differ) else n

    def reuse_prefix(self, ids: np.ndarray, limit: int | None = None) -> int:
        """Roll back to the longest prefix of the context that `ids` starts with, leaving at least
        the last id to run (its logits are wanted) and at most `limit` rows; returns the number
        of ids kept. After the window policy dropped rows only a continuation is reused."""
        ids = np.asarray(ids, dtype=np.int64)
        keep = self.shared_prefix(ids[: len(ids) - 1 if limit is None else min(len(ids) - 1, limit)])
        if self.evicted and keep < self.position:
            keep = 0
        self.truncate(keep - self.evicted if keep else 0)
        return keep

    def truncate(self, length: int) -> None:
        """Roll back to `length` tokens (rows past it are simply overwritten later)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} tokens to {length}")
        self.length = length
        if length == 0:
            self.evicted = 0

    def keep(self, start: int, rows: np.ndarray) -> None:
        """Keep rows `rows` (absolute, ascending, all >= start) of the tail [start, length) and
        drop the others: used after speculative verification to compact the accepted path."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) and (rows[0] < start or rows[-1] >= self.length or np.any(np.diff(rows) <= 0)):
            raise ValueError(f"rows {rows.tolist()} are not an ascending subset of [{start}, {self.length})")
        if self.evicted:
            raise ValueError("keep() after the window policy dropped rows: rows and positions differ")
        n = len(rows)
        if not self.sparse and (n == 0 or rows[-1] == start + n - 1):  # ascending from start: rows stay put
            self._keep_in_place(start, n, rows)
            return
        self._ids[start : start + n] = self._ids[rows]
        self._compact(start, rows)

    def keep_prefix(self, start: int, n: int) -> None:
        """keep(start, [start, start + n)): a chain's accepted rows, which stay where they are."""
        if self.sparse or self.evicted or not 0 <= start <= start + n <= self.length:
            self.keep(start, np.arange(start, start + n))  # its checks and errors
            return
        self._keep_in_place(start, n)

    def _keep_in_place(self, start: int, n: int, rows: np.ndarray | None = None) -> None:
        """The kept rows are [start, start + n) already: cut the rest, no copy (the hooks still hear
        of it)."""
        self.length = start + n
        if self.keep_hooks:
            rows = np.arange(start, start + n) if rows is None else rows
            for hook in self.keep_hooks:
                hook(start, rows)

    def _compact(self, start: int, rows: np.ndarray) -> None:
        """Move rows `rows` of the arena to [start, start + len(rows)) and cut the rest."""
        n = len(rows)
        # One fancy-indexed gather per arena (copies only the kept tail rows).
        self.arena[:, :, start : start + n] = self.arena[:, :, rows]
        self.length = start + n
        if self.sparse:  # chunks [n_chunks(start), ...) overlap the moved rows: recompute them
            sp = self.sparse
            for j in range(sp.n_chunks(start), sp.n_chunks(self.length)):
                rows_j = self.arena[:, 0, j * sp.kernel_stride : j * sp.kernel_stride + sp.kernel_size]
                self.ckeys[:, j] = rows_j.astype(np.float32).mean(axis=1)
        for hook in self.keep_hooks:
            hook(start, rows)
