"""The MiniCPM4 model in torch, exactly as DESIGN.md §4 (and the public reference) computes it.

One forward serves the torch runtime, ONNX export and training. Its contract is the decoder graph
of DESIGN.md §6, with a leading batch dimension that the exported graph drops:

    logits, keys, values, ckeys, hidden = model(input_ids, position_ids, attn_mask, past_keys, past_values,
                                                logit_index, past_ckeys)

- input_ids, position_ids  [B, T] int64
- attn_mask                [T, T] bool, True = visible, among the new tokens only (past is always visible)
- past_keys/values         per layer [B, P, Hkv, D], token-major: a prefix of the runtime's KV arena
- logit_index              [N] int64, rows of T that need logits (None: all rows)
- past_ckeys                with InfLLM v2 (config.sparse), per layer [B, C, Hkv, D] float32
                            compressed keys of the past; batch 1 only
- returns logits [B, N, V] float32, the new per-layer keys/values [B, T, Hkv, D] and, with InfLLM
  v2, the compressed keys the new tokens complete; the caller writes them into its arena (the
  static, preallocated cache lives with the runtime, gpt-fast style, so the same model exports
  without any cache state inside the graph).
- hidden [B, T, H]: the LM head's input for every new row (rmsnorm(h, norm) / (hidden_size /
  dim_model_base)), the feature an EAGLE head drafts from.
- past_valid (keyword, dense attention only, never exported) [P] bool: the past rows to attend
  to. A CUDA graph replays fixed shapes, so the torch backend's captured decode step passes a fixed
  span of its arena and masks the rows past the cache length (runtimes/decode_graphs.py).

Parameter names match the Hugging Face checkpoint, so `load_state_dict` takes its tensors as is.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from edgecpm.config import ModelConfig
from edgecpm.export.infllmv2 import sparse_attention
from edgecpm.export.ternary import TernaryInfo, ternary_matmul


class ModelOutput(NamedTuple):
    logits: torch.Tensor
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    ckeys: list[torch.Tensor]  # InfLLM v2 compressed keys the step completed (empty when dense)
    hidden: torch.Tensor  # [B, T, H] the LM head's input for every row (EAGLE drafters read it)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Normalize in fp32, round back to the compute dtype, then scale (reference order).
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class LongRoPE(nn.Module):
    """cos/sin for arbitrary positions, computed in fp32 from two constant vectors (no table, so
    the graph works at any position up to max_position_embeddings)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.register_buffer("inv_freq", torch.from_numpy(cfg.rope_inv_freq()), persistent=False)
        self.attention_scale = cfg.rope_attention_scale

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angle = position_ids.float()[..., None] * self.inv_freq  # [B, T, D/2]
        emb = torch.cat([angle, angle], dim=-1)  # non-interleaved ("rotate_half") layout
        return emb.cos() * self.attention_scale, emb.sin() * self.attention_scale


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, D]; cos/sin [B, T, D] fp32. Rotation in fp32, result in x's dtype."""
    xf = x.float()
    half = xf.shape[-1] // 2
    rotated = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
    return (xf * cos[:, :, None] + rotated * sin[:, :, None]).to(x.dtype)


def dense_attention(q, k, v, past_k, past_v, attn_mask, past_valid=None):
    """GQA attention of the new queries over past + new keys, without concatenating the cache.

    q [B, T, Hq, D]; k, v [B, T, Hkv, D]; past_k, past_v [B, P, Hkv, D]; attn_mask [T, T] bool;
    past_valid [P] bool or None (every past row).
    The past and the new score blocks are computed separately and share one fp32 softmax, so a
    decode step reads the cache once and never copies it (DESIGN.md §6). Query heads are grouped
    per kv head as [Hkv, G*T] rows, so K/V are never repeated G times either.
    """
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    G = Hq // Hkv
    P = past_k.shape[1]
    qg = q.reshape(B, T, Hkv, G, D).permute(0, 2, 3, 1, 4).reshape(B, Hkv, G * T, D)
    scale = 1.0 / math.sqrt(D)
    s_past = torch.matmul(qg, past_k.permute(0, 2, 3, 1)).float() * scale  # [B, Hkv, G*T, P]
    if past_valid is not None:
        s_past = s_past.masked_fill(~past_valid, float("-inf"))
    s_new = torch.matmul(qg, k.permute(0, 2, 3, 1)).float() * scale  # [B, Hkv, G*T, T]
    s_new = s_new.reshape(B, Hkv, G, T, T).masked_fill(~attn_mask, float("-inf")).reshape(B, Hkv, G * T, T)
    probs = torch.softmax(torch.cat([s_past, s_new], dim=-1), dim=-1).to(q.dtype)
    out = torch.matmul(probs[..., :P], past_v.permute(0, 2, 1, 3))  # [B, Hkv, G*T, D]
    out = out + torch.matmul(probs[..., P:], v.permute(0, 2, 1, 3))
    return out.reshape(B, Hkv, G, T, D).permute(0, 3, 1, 2, 4).reshape(B, T, Hq * D)


class TernaryLinear(nn.Module):
    """A bias-free linear layer whose weight is BitCPM4 ternary, kept packed at 2 bits (format:
    edgecpm.export.ternary) and computed by the `edgecpm::ternary_matmul` op. `packed` holds the
    uint32 words as int32 (same bits); `scales` are in the model dtype."""

    def __init__(self, in_features: int, out_features: int, group_size: int):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.register_buffer("packed", torch.empty(out_features, math.ceil(in_features / 16), dtype=torch.int32))
        self.register_buffer("scales", torch.empty(out_features, in_features // group_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = ternary_matmul(x.reshape(-1, self.in_features), self.packed, self.scales, self.in_features,
                           self.group_size)
        return y.view(*x.shape[:-1], self.out_features)


def use_ternary(model: nn.Module, infos: dict[str, TernaryInfo]) -> None:
    """Swap the nn.Linear owning each named weight for a TernaryLinear (buffers still to be loaded)."""
    for name, info in infos.items():
        parent, child = name.removesuffix(".weight").rsplit(".", 1)
        n, k = info.shape
        setattr(model.get_submodule(parent), child, TernaryLinear(k, n, info.group_size))


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, d
        self.q_proj = nn.Linear(h, cfg.num_attention_heads * d, bias=False)
        self.k_proj = nn.Linear(h, cfg.num_key_value_heads * d, bias=False)
        self.v_proj = nn.Linear(h, cfg.num_key_value_heads * d, bias=False)
        self.o_proj = nn.Linear(cfg.num_attention_heads * d, h, bias=False)
        self.sparse = cfg.sparse

    def forward(self, x, cos, sin, attn_mask, past_k, past_v, positions, past_ck, past_valid=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.sparse is None:
            return self.o_proj(dense_attention(q, k, v, past_k, past_v, attn_mask, past_valid)), k, v, None
        if B != 1:
            raise ValueError("InfLLM v2 sparse attention runs batch 1 (one sequence per KV arena)")
        if past_valid is not None:  # its kernels take the past length by value: no masked span
            raise ValueError("past_valid: InfLLM v2 sparse attention reads exactly the past it is given")
        out, ck = sparse_attention(q[0], k[0], v[0], past_k[0], past_v[0], past_ck[0], positions[0], attn_mask,
                                   self.sparse)
        return self.o_proj(out.reshape(1, T, -1)), k, v, ck[None]


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.residual_scale = cfg.residual_scale  # muP depth scaling: scale_depth / sqrt(L)

    def forward(self, h, cos, sin, attn_mask, past_k, past_v, positions, past_ck, past_valid=None):
        a, k, v, ck = self.self_attn(self.input_layernorm(h), cos, sin, attn_mask, past_k, past_v, positions, past_ck,
                                     past_valid)
        h = h + a * self.residual_scale
        h = h + self.mlp(self.post_attention_layernorm(h)) * self.residual_scale
        return h, k, v, ck


class MiniCPMModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class MiniCPMForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = MiniCPMModel(cfg)
        self.rope = LongRoPE(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        if self.config.tie_word_embeddings:
            return self.model.embed_tokens.weight
        return self.lm_head.weight

    def forward(self, input_ids, position_ids=None, attn_mask=None, past_keys=None, past_values=None,
                logit_index=None, past_ckeys=None, *, past_valid=None) -> ModelOutput:
        cfg = self.config
        B, T = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device).expand(B, T)
        if attn_mask is None:
            attn_mask = torch.ones(T, T, dtype=torch.bool, device=input_ids.device).tril()
        if past_keys is None:
            dtype = self.model.embed_tokens.weight.dtype
            empty = input_ids.new_zeros((B, 0, cfg.num_key_value_heads, cfg.head_dim), dtype=dtype)
            past_keys = past_values = [empty] * cfg.num_hidden_layers
        if past_ckeys is None:
            past_ckeys = [torch.zeros(B, 0, cfg.num_key_value_heads, cfg.head_dim)] * cfg.num_hidden_layers

        cos, sin = self.rope(position_ids)
        h = self.model.embed_tokens(input_ids) * cfg.scale_emb
        keys, values, ckeys = [], [], []
        for layer, pk, pv, pck in zip(self.model.layers, past_keys, past_values, past_ckeys, strict=True):
            h, k, v, ck = layer(h, cos, sin, attn_mask, pk, pv, position_ids, pck, past_valid)
            keys.append(k)
            values.append(v)
            if ck is not None:
                ckeys.append(ck)
        hidden = self.model.norm(h) / cfg.logit_divisor  # muP width scaling, also when tied
        rows = hidden if logit_index is None else hidden[:, logit_index]
        logits = F.linear(rows, self.lm_head_weight).float()
        return ModelOutput(logits, keys, values, ckeys, hidden)
