"""The KV arena on the torch backend's device (CUDA): edgecpm.kv_cache.KVCache's layout, in torch
tensors, allocated once for the cache's capacity, so it spends exactly the session's byte budget.

KVCache stays the bookkeeper (length, ids, policy); its numpy arena is never touched on this path
(np.zeros maps its pages lazily, so it costs no memory). A step reads rows [0, P) as views and
writes its new rows in place at [P, P + T): nothing of the cache crosses the bus. KVCache.keep
(speculative compaction, window eviction) is mirrored here through its keep hook.

Device-agnostic: the tests run it on CPU tensors.
"""

from __future__ import annotations

import numpy as np
import torch

from edgecpm.config import ModelConfig


class DeviceArena:
    def __init__(self, cfg: ModelConfig, capacity: int, dtype: torch.dtype, device: torch.device):
        self.capacity, self.sparse = capacity, cfg.sparse
        L, Hkv, D = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
        # [layer, K/V, row, Hkv, D]: KVCache.arena's layout.
        self.kv = torch.zeros(L, 2, capacity, Hkv, D, dtype=dtype, device=device)
        n_ck = cfg.sparse.n_chunks(capacity) if cfg.sparse else 0
        self.ck = torch.zeros(L, n_ck, Hkv, D, dtype=torch.float32, device=device)

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size() + self.ck.numel() * 4

    def past(self, layer: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows [0, length) of a layer's K and V: views, no copy."""
        return self.kv[layer, 0, :length], self.kv[layer, 1, :length]

    def past_ck(self, layer: int, length: int) -> torch.Tensor:
        return self.ck[layer, : self.sparse.n_chunks(length)]

    def write(self, start: int, keys, values, ckeys=()) -> None:
        """A step's new rows (per layer [T, Hkv, D]) in place at [start, start + T), and the
        compressed keys of the chunks they complete after the existing ones."""
        for i, (k, v) in enumerate(zip(keys, values, strict=True)):
            self.kv[i, 0, start : start + len(k)].copy_(k)
            self.kv[i, 1, start : start + len(v)].copy_(v)
        for i, ck in enumerate(ckeys):
            first = self.sparse.n_chunks(start)
            self.ck[i, first : first + len(ck)].copy_(ck)

    @torch.inference_mode()  # the arena was made under the backend's inference mode
    def keep(self, start: int, rows) -> None:
        """KVCache._compact on the device: rows `rows` move to [start, start + len(rows)), which
        ends the cache, and the chunks overlapping the moved rows are recomputed."""
        rows = torch.as_tensor(np.asarray(rows, dtype=np.int64), device=self.kv.device)
        n = len(rows)
        length = start + n
        self.kv[:, :, start : start + n] = self.kv[:, :, rows]  # the gather reads before it writes
        if self.sparse:
            sp = self.sparse
            for j in range(sp.n_chunks(start), sp.n_chunks(length)):
                window = self.kv[:, 0, j * sp.kernel_stride : j * sp.kernel_stride + sp.kernel_size]
                self.ck[:, j] = window.float().mean(dim=1)
