"""An EAGLE draft head for MiniCPM4 in torch (DESIGN.md §10), in the checkpoint format of the
public MiniCPM4-8B-Eagle-FRSpec head (vLLM's `EagleMiniCPMForCausalLM`).

A folder with config.json (MiniCPM fields; num_hidden_layers = the head's layers, usually 1;
optional `mup_denominator` for the residual scale) and safetensors:

    model.fc.weight [H, 2H]                          model.input_norm1.weight, model.input_norm2.weight
    model.eagle_layers.{i}.<MiniCPM decoder layer>   (self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj, norms)
    model.embed_tokens.weight, lm_head.weight        optional: absent, the target's are used

For new tokens x with target features f (both [T, ...]), f being the target's `hidden` output:

    h = fc([rmsnorm1(embed(x) * scale_emb); rmsnorm2(f)])
    h = eagle layers (MiniCPM decoder layers: RoPE by position, the step's mask, own KV cache)
    out = h / (hidden_size / dim_model_base)          (no final norm)
    logits = lm_head(out)

`out` approximates the target's feature at the next position, so a deeper draft level feeds it
back as f. The forward has the decoder's signature (plus `hidden_in`) and returns ModelOutput with
`hidden` = out, so the torch runtime and the ONNX export treat the head like a small decoder.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from edgecpm.config import ModelConfig
from edgecpm.errors import CheckpointError
from edgecpm.export.checkpoint import Checkpoint
from edgecpm.export.modeling_minicpm import DecoderLayer, LongRoPE, ModelOutput, RMSNorm


class EagleModel(nn.Module):
    def __init__(self, cfg: ModelConfig, own_embed: bool):
        super().__init__()
        h = cfg.hidden_size
        if own_embed:
            self.embed_tokens = nn.Embedding(cfg.vocab_size, h)
        self.fc = nn.Linear(2 * h, h, bias=False)
        self.input_norm1 = RMSNorm(h, cfg.rms_norm_eps)
        self.input_norm2 = RMSNorm(h, cfg.rms_norm_eps)
        self.eagle_layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        for layer in self.eagle_layers:
            layer.residual_scale = cfg.eagle_residual_scale


class EagleHead(nn.Module):
    """own_embed/own_head: whether the checkpoint has its own embedding / LM head; otherwise
    `share()` hands it the target's tensors (not copied, and not part of its state dict)."""

    def __init__(self, cfg: ModelConfig, own_embed: bool, own_head: bool):
        super().__init__()
        self.config = cfg
        self.model = EagleModel(cfg, own_embed)
        self.rope = LongRoPE(cfg)
        if own_head:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self._shared: dict[str, torch.Tensor] = {}

    def share(self, embed: torch.Tensor, lm_head: torch.Tensor) -> None:
        self._shared = {"embed": embed, "lm_head": lm_head}

    @property
    def embed_weight(self) -> torch.Tensor:
        own = getattr(self.model, "embed_tokens", None)
        return own.weight if own is not None else self._shared["embed"]

    @property
    def lm_head_weight(self) -> torch.Tensor:
        own = getattr(self, "lm_head", None)
        return own.weight if own is not None else self._shared["lm_head"]

    def forward(self, input_ids, position_ids, attn_mask, past_keys=None, past_values=None, logit_index=None,
                past_ckeys=None, hidden_in=None) -> ModelOutput:
        cfg, m = self.config, self.model
        B = input_ids.shape[0]
        if past_keys is None:
            empty = input_ids.new_zeros((B, 0, cfg.num_key_value_heads, cfg.head_dim), dtype=m.fc.weight.dtype)
            past_keys = past_values = [empty] * cfg.num_hidden_layers
        cos, sin = self.rope(position_ids)
        e = m.input_norm1(F.embedding(input_ids, self.embed_weight) * cfg.scale_emb)
        h = m.fc(torch.cat([e, m.input_norm2(hidden_in.to(e.dtype))], dim=-1))
        keys, values = [], []
        for layer, pk, pv in zip(m.eagle_layers, past_keys, past_values, strict=True):
            h, k, v, _ = layer(h, cos, sin, attn_mask, pk, pv, position_ids, None)
            keys.append(k)
            values.append(v)
        out = h / cfg.logit_divisor  # muP width scaling and no final norm (the format's convention)
        rows = out if logit_index is None else out[:, logit_index]
        return ModelOutput(F.linear(rows, self.lm_head_weight).float(), keys, values, [], out)


class EagleCheckpoint(Checkpoint):
    """An EAGLE head folder. `decoder_tensor` serves it under the decoder graph's names (its layers
    as model.layers.{i}, the embedding and LM head from `target` when it has none), so
    onnx_graph.build_decoder exports it."""

    def __init__(self, folder: str | Path, target: Checkpoint | None = None):
        self.folder = Path(folder)
        if not (self.folder / "config.json").is_file():
            raise CheckpointError(f"{self.folder}: no config.json; expected an EAGLE head checkpoint folder")
        self.config = ModelConfig.for_eagle(json.loads((self.folder / "config.json").read_text()), str(self.folder))
        self._handles = {}
        self.files = self._tensor_files()
        self.target = target
        self.own_embed = "model.embed_tokens.weight" in self.files
        self.own_head = "lm_head.weight" in self.files
        if target is not None and target.config.vocab_size != self.config.vocab_size:
            raise CheckpointError(f"{self.folder}: vocabulary {self.config.vocab_size} differs from the target's "
                                  f"{target.config.vocab_size} ({target.folder})")

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        with torch.device("meta"):
            model = EagleHead(self.config, self.own_embed, self.own_head)
        return {k: tuple(v.shape) for k, v in model.state_dict().items()}

    def decoder_tensor(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        if name.startswith("model.layers."):
            return self.tensor(name.replace("model.layers.", "model.eagle_layers.", 1), dtype)
        own = {"model.embed_tokens.weight": self.own_embed, "lm_head.weight": self.own_head}.get(name, True)
        if own:
            return self.tensor(name, dtype)
        if self.target is None:
            raise CheckpointError(f"{self.folder}: the head has no {name}; name the target it drafts for "
                                  f"(`edgecpm export {self.folder} --eagle-of TARGET`)")
        if name == "lm_head.weight" and self.target.config.tie_word_embeddings:
            name = "model.embed_tokens.weight"
        return self.target.tensor(name, dtype)


def load_eagle(folder: str | Path, dtype: torch.dtype, target_model=None) -> EagleHead:
    """The head with its weights in `dtype`; the embedding / LM head it lacks come from
    `target_model` (a MiniCPMForCausalLM), shared rather than copied."""
    ckpt = EagleCheckpoint(folder)
    ckpt.check()
    if (not ckpt.own_embed or not ckpt.own_head) and target_model is None:
        raise CheckpointError(f"{ckpt.folder}: this EAGLE head shares the target's embedding/LM head, so it runs "
                              f"with a checkpoint target on the torch backend; for a bundle target export it: "
                              f"`edgecpm export {ckpt.folder} --eagle-of TARGET -o EAGLE_BUNDLE`")
    with torch.device("meta"):
        model = EagleHead(ckpt.config, ckpt.own_embed, ckpt.own_head)
    model.load_state_dict({name: ckpt.tensor(name, dtype) for name in ckpt.expected_shapes()}, assign=True)
    model.rope = LongRoPE(ckpt.config)  # its constant buffers were created on meta: build them for real
    if target_model is not None:
        model.share(target_model.model.embed_tokens.weight, target_model.lm_head_weight)
    return model.eval()
