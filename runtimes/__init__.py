"""Backends: one module per runtime, each implementing the small `Backend` protocol.

A backend runs the decoder graph of DESIGN.md §6 for one sequence. It reads the past from the
KV arena (`cache.past(i)`, zero-copy views) and leaves the new keys/values in the arena's next
rows (`cache.slot(i, T)`); the caller commits them. Backend modules import their runtime package
lazily so `import edgecpm` stays light (and torch-free).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from edgecpm.config import ModelConfig
from edgecpm.kv_cache import KVCache


class Backend(Protocol):
    name: str
    config: ModelConfig
    kv_dtype: np.dtype  # dtype of the KV arena this backend reads and writes
    weight_bytes: int  # bytes of weights it holds (reported by Session.memory())

    def forward(self, input_ids: np.ndarray, position_ids: np.ndarray, attn_mask: np.ndarray,
                cache: KVCache, logit_index: np.ndarray) -> np.ndarray:
        """input_ids, position_ids int64 [T]; attn_mask bool [T, T]; logit_index int64 [N].
        Returns float32 logits [N, V] and writes rows [cache.length, cache.length + T)."""
        ...
