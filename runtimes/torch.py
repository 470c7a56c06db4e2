"""The torch backend: the reference MiniCPM4 model on CPU or CUDA, straight from a checkpoint.

The KV arena is numpy memory shared with torch through `torch.from_numpy` (no copy); the model
returns the new keys/values and they are written into the arena's next rows.
"""

from __future__ import annotations

import numpy as np
import torch

from edgecpm import dtypes
from edgecpm.config import ModelConfig
from edgecpm.export.checkpoint import load_model, torch_dtype
from edgecpm.kv_cache import KVCache
from edgecpm.tokenizer import Tokenizer


def _kv_numpy_dtype(dtype: torch.dtype) -> np.dtype:
    """The arena's numpy dtype (bf16: ml_dtypes.bfloat16, which has torch.bfloat16's bits)."""
    return dtypes.numpy_dtype(dtype)


def _as_torch(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    if dtype == torch.bfloat16:
        return torch.from_numpy(a.view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(a)


class TorchBackend:
    name = "torch"
    bundle = None  # runs checkpoints
    ternary_kernel = None  # ternary linears run torch.ops.edgecpm.ternary_matmul inside the model
    has_hidden = True
    max_prefill_chunk = None  # dense attention materializes its scores

    def __init__(self, checkpoint: str, dtype: str | None = None, threads: int | None = None,
                 device: str | None = None):
        if threads:
            torch.set_num_threads(threads)
        dtype = torch_dtype(dtype or "fp32")
        self._attach(load_model(checkpoint, dtype), torch.device(device or "cpu"), dtype)

    def _attach(self, model, device: torch.device, dtype: torch.dtype) -> None:
        self.device, self.dtype = device, dtype
        self.model = model.to(device)
        self.config: ModelConfig = model.config
        self.kv_dtype = _kv_numpy_dtype(dtype)
        # Parameters and buffers: packed ternary weights are buffers (their 2-bit size counts).
        self.weight_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        self.last_hidden: np.ndarray | None = None  # [T, H] float32: the last step's `hidden` rows

    def on_keep(self, start: int, rows) -> None:
        """The arena is numpy memory shared with torch: nothing of it is kept here."""

    @torch.inference_mode()
    def forward(self, input_ids, position_ids, attn_mask, cache: KVCache, logit_index, hidden_in=None):
        """hidden_in [T, H] float32: an EAGLE head's input features."""
        dev, dt = self.device, self.dtype
        layers = range(self.config.num_hidden_layers)
        past = [cache.past(i) for i in layers]
        sparse = self.config.sparse is not None
        extra = {}
        if hidden_in is not None:
            extra["hidden_in"] = torch.from_numpy(np.ascontiguousarray(hidden_in, np.float32))[None].to(dev)
        out = self.model(
            torch.from_numpy(input_ids).to(dev)[None],
            torch.from_numpy(position_ids).to(dev)[None],
            torch.from_numpy(attn_mask).to(dev),
            [_as_torch(k, dt).to(dev)[None] for k, _ in past],
            [_as_torch(v, dt).to(dev)[None] for _, v in past],
            torch.from_numpy(logit_index).to(dev),
            [torch.from_numpy(cache.past_ck(i)).to(dev)[None] for i in layers] if sparse else None,
            **extra,
        )
        T = len(input_ids)
        for i in layers:
            k_slot, v_slot = cache.slot(i, T)
            _as_torch(k_slot, dt).copy_(out.keys[i][0])
            _as_torch(v_slot, dt).copy_(out.values[i][0])
            if sparse:
                torch.from_numpy(cache.ck_slot(i, T)).copy_(out.ckeys[i][0])
        self.last_hidden = out.hidden[0].float().cpu().numpy()
        return out.logits[0].float().cpu().numpy()


class EagleTorchBackend(TorchBackend):
    """An EAGLE head checkpoint (export/modeling_eagle.py) on torch. A head without its own
    embedding / LM head shares the torch target's (its device and dtype too)."""

    def __init__(self, checkpoint: str, target, threads: int | None = None):
        from edgecpm.export.modeling_eagle import load_eagle

        if threads:
            torch.set_num_threads(threads)
        shared = isinstance(target, TorchBackend)
        device, dtype = (target.device, target.dtype) if shared else (torch.device("cpu"), torch.float32)
        self._attach(load_eagle(checkpoint, dtype, target.model if shared else None), device, dtype)



def load_tokenizer(folder) -> Tokenizer:
    """The tokenizer of a checkpoint run on torch: its tokenizer.json, else its SentencePiece
    tokenizer.model converted on the fly (the device side reads tokenizer.json only; exported
    bundles always carry one)."""
    from edgecpm.export.tokenizer_convert import load_tokenizer as convert_or_load

    return convert_or_load(folder)
