"""The torch backend: the reference MiniCPM4 model on CPU or CUDA, straight from a checkpoint.

CPU: the KV arena is KVCache's numpy memory shared with torch through `torch.from_numpy` (no
copy); the model returns the new keys/values and they are written into the arena's next rows.

CUDA (`TorchBackend(path, device="cuda")`, fp16 unless told otherwise): the arena is a
DeviceArena on the GPU with the cache's capacity (the same byte budget), read as views and written
in place; only the step's ids, positions and mask go up and its logits (and `hidden` rows) come
back. A dense model's decode step is a CUDA graph (runtimes/decode_graphs.py). InfLLM v2 and
ternary linears run edgecpm's CUDA kernels (runtimes/cuda_kernels.py, fp16/fp32), except InfLLM v2
prefill chunks below dense_len, which are plain attention (PyTorch's SDPA). Sampling, speculative
decoding and the cache's bookkeeping are the device-independent code of edgecpm. None of the CUDA
side has run on a GPU yet (plugins/tests/gpu_check.sh is the check); its host logic is tested on
CPU tensors (tests/test_cuda_path.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from edgecpm import dtypes
from edgecpm.config import ModelConfig, SparseConfig
from edgecpm.export.checkpoint import load_model, torch_dtype
from edgecpm.kv_cache import KVCache
from edgecpm.runtimes.decode_graphs import DecodeGraphs
from edgecpm.runtimes.device_arena import DeviceArena

if TYPE_CHECKING:  # the GPU check imports this module where tokenizers may be absent
    from edgecpm.tokenizer import Tokenizer


def _kv_numpy_dtype(dtype: torch.dtype) -> np.dtype:
    """The arena's numpy dtype (bf16: ml_dtypes.bfloat16, which has torch.bfloat16's bits)."""
    return dtypes.numpy_dtype(dtype)


def _as_torch(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    if dtype == torch.bfloat16:
        return torch.from_numpy(a.view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def _uses_kernels(model) -> bool:
    """InfLLM v2 or ternary linears: ops that run edgecpm's kernels on CUDA."""
    from edgecpm.export.modeling_minicpm import TernaryLinear

    return model.config.sparse is not None or any(isinstance(m, TernaryLinear) for m in model.modules())


_kernels = None
PREFILL_MIN_T = 9  # more new tokens than the kernels' decode path takes (ECPM_DECODE_MAX_T = 8)


def dense_prefill(q, k, v, past_k, past_v, position_ids, attn_mask, cfg: SparseConfig):
    """(out, ck_new) of InfLLM v2 for a prefill chunk whose queries all lie below dense_len, where
    every query attends to every past row and the new rows its mask shows: plain masked attention,
    through PyTorch's scaled_dot_product_attention (tensor cores) instead of the kernels' fp32
    prefill path. None for any other call (decode steps; a chunk reaching dense_len). Reads one
    position to the host (a sync per layer and chunk: prefill only)."""
    T = q.shape[0]
    if T < PREFILL_MIN_T or int(position_ids.max()) + 1 >= cfg.dense_len:
        return None
    from edgecpm.export.infllmv2 import new_chunks

    P = past_k.shape[0]
    visible = torch.cat([attn_mask.new_ones(T, P), attn_mask], dim=1)  # [T, P + T]
    keys, values = torch.cat([past_k, k]), torch.cat([past_v, v])  # [P + T, Hkv, D]
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1)[None], keys.transpose(0, 1)[None], values.transpose(0, 1)[None], attn_mask=visible,
        enable_gqa=True)
    return out[0].transpose(0, 1).contiguous(), new_chunks(past_k, k, cfg)


def use_cuda_kernels():
    """edgecpm's CUDA kernels (runtimes/cuda_kernels.py) as the CUDA implementations of the model's
    two custom ops; once per process."""
    global _kernels
    if _kernels is None:
        from edgecpm.export.infllmv2 import infllmv2_attention
        from edgecpm.export.ternary import _torch_op as ternary_op
        from edgecpm.runtimes import cuda_kernels

        kernels = cuda_kernels.Kernels(cuda_kernels.load())

        def infllmv2_cuda(q, k, v, past_k, past_v, past_ck, position_ids, attn_mask, kernel_size, kernel_stride,
                          block_size, init_blocks, window_size, topk, dense_len, semantics):
            cfg = SparseConfig(kernel_size=kernel_size, kernel_stride=kernel_stride, block_size=block_size,
                               init_blocks=init_blocks, window_size=window_size, topk=topk, dense_len=dense_len,
                               semantics=f"v{semantics}")
            dense = dense_prefill(q, k, v, past_k, past_v, position_ids, attn_mask, cfg)
            if dense is not None:
                return dense
            return kernels.infllmv2(q.contiguous(), k.contiguous(), v.contiguous(), past_k, past_v, past_ck,
                                    position_ids, attn_mask, cfg)

        infllmv2_attention.register_kernel("cuda")(infllmv2_cuda)
        ternary_op()  # defines edgecpm::ternary_matmul
        torch.library.register_kernel("edgecpm::ternary_matmul", "cuda",
                                      lambda x, w, s, k, g: kernels.ternary(x.contiguous(), w, s, k, g))
        _kernels = kernels
    return _kernels


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
        device = torch.device(device or "cpu")
        dtype = torch_dtype(dtype or ("fp16" if device.type == "cuda" else "fp32"))
        self._attach(load_model(checkpoint, dtype), device, dtype, decode_graphs=device.type == "cuda")

    def _attach(self, model, device: torch.device, dtype: torch.dtype, resident: bool | None = None,
                decode_graphs: bool = False, capture=None) -> None:
        """resident: the arena lives on `device` (default: any device but the CPU). decode_graphs:
        capture dense decode steps (capture: the mechanism, CUDA graphs unless a test's stand-in)."""
        self.device, self.dtype = device, dtype
        self.config: ModelConfig = model.config
        if device.type == "cuda" and _uses_kernels(model):
            if dtype == torch.bfloat16:
                raise ValueError("dtype bf16: edgecpm's CUDA kernels (InfLLM v2, ternary) compute fp16 or fp32; "
                                 "run dtype='fp16'")
            use_cuda_kernels()  # loads (or builds) libedgecpm_kernels.so, or says why it cannot
        self.model = model.to(device)
        self.kv_dtype = _kv_numpy_dtype(dtype)
        # Parameters and buffers: packed ternary weights are buffers (their 2-bit size counts).
        self.weight_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        self.last_hidden: np.ndarray | None = None  # [T, H] float32: the last step's `hidden` rows
        self.resident = device.type != "cpu" if resident is None else resident
        self.arena: DeviceArena | None = None  # allocated on the first step, for that cache's capacity
        self._arena_cache: KVCache | None = None
        # The sparse op's kernels take the past length by value: only dense decode steps are captured.
        self.decode_graphs = decode_graphs and self.config.sparse is None
        self._capture = capture
        self.graphs: DecodeGraphs | None = None

    def on_keep(self, start: int, rows) -> None:
        """KVCache.keep/_compact: the numpy arena is torch's too; a device arena moves its own rows."""
        if self.arena is not None:
            self.arena.keep(start, rows)

    def _arena_for(self, cache: KVCache) -> DeviceArena:
        if self._arena_cache is not cache:
            if cache.length:
                raise RuntimeError(f"the torch backend's device arena was made for another KVCache; this one holds "
                                   f"{cache.length} rows it never saw (one backend serves one session)")
            self.arena = DeviceArena(self.config, cache.capacity, self.dtype, self.device)
            self._arena_cache, self.graphs = cache, None
        return self.arena

    @torch.inference_mode()
    def forward(self, input_ids, position_ids, attn_mask, cache: KVCache, logit_index, hidden_in=None):
        """hidden_in [T, H] float32: an EAGLE head's input features."""
        if not self.resident:
            return self._forward_host(input_ids, position_ids, attn_mask, cache, logit_index, hidden_in)
        arena = self._arena_for(cache)
        if self.decode_graphs and len(input_ids) == 1 and len(logit_index) == 1 and hidden_in is None:
            return self._decode_graph(int(input_ids[0]), int(position_ids[0]), cache)
        dev, P = self.device, cache.length
        layers = range(self.config.num_hidden_layers)
        extra = {}
        if hidden_in is not None:
            extra["hidden_in"] = torch.from_numpy(np.ascontiguousarray(hidden_in, np.float32))[None].to(dev)
        past = [arena.past(i, P) for i in layers]
        out = self.model(
            torch.from_numpy(input_ids).to(dev)[None],
            torch.from_numpy(position_ids).to(dev)[None],
            torch.from_numpy(attn_mask).to(dev),
            [k[None] for k, _ in past],
            [v[None] for _, v in past],
            torch.from_numpy(logit_index).to(dev),
            [arena.past_ck(i, P)[None] for i in layers] if self.config.sparse else None,
            **extra,
        )
        arena.write(P, [k[0] for k in out.keys], [v[0] for v in out.values], [c[0] for c in out.ckeys])
        self.last_hidden = out.hidden[0].float().cpu().numpy()
        return out.logits[0].float().cpu().numpy()

    def _decode_graph(self, token: int, position: int, cache: KVCache) -> np.ndarray:
        if self.graphs is None:
            self.graphs = DecodeGraphs(self._graph_step, self.device, self._capture)
        logits, hidden = self.graphs.run(token, position, cache.length, cache.capacity)
        # Copies: the next replay overwrites the graph's static outputs (on a CPU stand-in,
        # .cpu().numpy() would alias them).
        self.last_hidden = hidden.to("cpu", torch.float32, copy=True).numpy()
        return logits.to("cpu", torch.float32, copy=True).numpy()

    def _graph_step(self, span: int, ids, positions, length):
        """One decode step over arena rows [0, span), rows >= length masked; writes its row at
        `length` (ids, positions, length: DecodeGraphs' static buffers)."""
        kv = self.arena.kv
        valid = torch.arange(span, device=kv.device) < length
        out = self.model(ids, positions, torch.ones(1, 1, dtype=torch.bool, device=kv.device),
                         [kv[i, 0, :span][None] for i in range(len(kv))],
                         [kv[i, 1, :span][None] for i in range(len(kv))], past_valid=valid)
        for i in range(len(kv)):
            kv[i, 0].index_copy_(0, length, out.keys[i][0])
            kv[i, 1].index_copy_(0, length, out.values[i][0])
        return out.logits[0], out.hidden[0]

    def _forward_host(self, input_ids, position_ids, attn_mask, cache: KVCache, logit_index, hidden_in=None):
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
