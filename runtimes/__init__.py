"""Backends: one module per runtime, each implementing the small `Backend` protocol.

A backend runs the decoder graph of DESIGN.md §6 for one sequence. It reads the past from the
KV arena (`cache.past(i)`, zero-copy views) and leaves the new keys/values in the arena's next
rows (`cache.slot(i, T)`); the caller commits them. Backend modules import their runtime package
lazily so `import edgecpm` stays light (and torch-free).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from edgecpm.bundle import Bundle
from edgecpm.config import ModelConfig
from edgecpm.kv_cache import KVCache


class Backend(Protocol):
    """What a Session and the drafters use of a backend: every member is required (a capability a
    backend lacks is declared with its "none" value, never left out)."""

    name: str
    config: ModelConfig
    kv_dtype: np.dtype  # dtype of the KV arena this backend reads and writes
    weight_bytes: int  # bytes of weights it holds (reported by Session.memory())
    bundle: Bundle | None  # the bundle it runs; None for a checkpoint
    ternary_kernel: str | None  # what runs a ternary bundle's TernaryMatMul nodes; None if nothing does
    has_hidden: bool  # forward() also leaves the `hidden` rows (the LM head's input) in last_hidden
    last_hidden: np.ndarray | None  # [T, H] float32 of the last forward, when has_hidden
    # Prefill tokens per step when attention materializes no [T, P] scores (a fused kernel); None:
    # generate.prefill_chunk shrinks the chunk with the context to bound score memory.
    max_prefill_chunk: int | None

    def forward(self, input_ids: np.ndarray, position_ids: np.ndarray, attn_mask: np.ndarray,
                cache: KVCache, logit_index: np.ndarray, hidden_in: np.ndarray | None = None) -> np.ndarray:
        """input_ids, position_ids int64 [T]; attn_mask bool [T, T]; logit_index int64 [N];
        hidden_in float32 [T, H]: an EAGLE head's input features (None for a decoder).
        Returns float32 logits [N, V] and writes rows [cache.length, cache.length + T)."""
        ...

    def on_keep(self, start: int, rows: np.ndarray) -> None:
        """Called after cache.keep(start, rows): a backend holding its own copy of the arena
        (TensorRT's device copy) compacts it the same way; the others do nothing."""
        ...
