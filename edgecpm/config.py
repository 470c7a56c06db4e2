"""MiniCPM4 model configuration: parse a Hugging Face `config.json` into one typed object.

Everything the runtimes and the exporter derive from the config (head_dim, GQA group, muP
scalings, the LongRoPE table, sparse attention settings) is computed here once, so no other
module re-reads raw config keys. Pure numpy: the device side imports this without torch.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import numpy as np

from edgecpm.errors import ConfigError

SUPPORTED_MODEL_TYPES = ("minicpm",)
SUPPORTED_ARCHITECTURES = ("MiniCPMForCausalLM",)
_REQUIRED = object()


def _show(value) -> str:
    """A config value as JSON (true, null, "big"), shortened for an error message."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class _Keys:
    """Typed reads of one JSON object's keys: an int is a JSON integer (not true, not 256.5), a float
    any finite number. Every error names the file and the key. null_ok: null means the default."""

    def __init__(self, d, source: str, prefix: str = ""):
        self.d, self.source, self.prefix = d, source, prefix

    def fail(self, key: str, what: str, value) -> ConfigError:
        return ConfigError(f'{self.source}: "{self.prefix}{key}" must be {what}, got {_show(value)}')

    def get(self, key: str, default, null_ok: bool = False):
        if key not in self.d or (null_ok and self.d[key] is None):
            if default is _REQUIRED:
                raise ConfigError(f'{self.source}: missing required key "{self.prefix}{key}"; add it (see the '
                                  f"model's original config.json)")
            return default
        return self.d[key]

    def int(self, key: str, default=_REQUIRED, low: int = 1, null_ok: bool = False) -> int:
        v = self.get(key, default, null_ok)
        if not isinstance(v, int) or isinstance(v, bool) or v < low:
            what = {1: "a positive integer", 0: "a non-negative integer"}.get(low, f"an integer >= {low}")
            raise self.fail(key, what, v)
        return v

    def float(self, key: str, default=_REQUIRED, positive: bool = True, null_ok: bool = False) -> float:
        v = self.get(key, default, null_ok)
        if not _is_number(v) or (positive and v <= 0):
            raise self.fail(key, "a positive number" if positive else "a finite number", v)
        return float(v)

    def bool(self, key: str, default=_REQUIRED) -> bool:
        v = self.get(key, default)
        if not isinstance(v, bool):
            raise self.fail(key, "true or false", v)
        return v

    def str(self, key: str, default=_REQUIRED) -> str:
        v = self.get(key, default)
        if not isinstance(v, str):
            raise self.fail(key, "a string", v)
        return v

    def floats(self, key: str, default=_REQUIRED) -> tuple[float, ...]:
        v = self.get(key, default)
        if not isinstance(v, (list, tuple)) or not all(_is_number(x) and x > 0 for x in v):
            raise self.fail(key, "a list of positive numbers", v)
        return tuple(float(x) for x in v)

    def dict(self, key: str) -> dict:
        """The nested object at `key`; absent or null -> {}."""
        v = self.get(key, None) or {}
        if not isinstance(v, dict):
            raise self.fail(key, "an object (or null)", v)
        return v

@dataclass(frozen=True)
class SparseConfig:
    """InfLLM v2 settings (DESIGN.md §7); these defaults apply to keys a `sparse_config` omits."""

    kernel_size: int = 32
    kernel_stride: int = 16
    init_blocks: int = 1
    block_size: int = 64
    window_size: int = 2048
    topk: int = 64
    use_nope: bool = False
    dense_len: int = 8192
    semantics: str = "v1"

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> SparseConfig:
        if not isinstance(d, dict):
            raise ConfigError(f'{source}: "sparse_config" must be an object, got {_show(d)}')
        k, df = _Keys(d, source, "sparse_config."), cls()
        sc = cls(kernel_size=k.int("kernel_size", df.kernel_size),
                 kernel_stride=k.int("kernel_stride", df.kernel_stride),
                 init_blocks=k.int("init_blocks", df.init_blocks, low=0), block_size=k.int("block_size", df.block_size),
                 window_size=k.int("window_size", df.window_size, low=0), topk=k.int("topk", df.topk),
                 use_nope=k.bool("use_nope", df.use_nope), dense_len=k.int("dense_len", df.dense_len, low=0),
                 semantics=k.str("semantics", df.semantics))
        # The 5-chunk block pooling of the reference assumes these ratios (DESIGN.md §7).
        if sc.kernel_size != 2 * sc.kernel_stride or sc.block_size != 4 * sc.kernel_stride:
            raise ConfigError(f"{source}: sparse_config needs kernel_size = 2*kernel_stride and block_size = "
                              f"4*kernel_stride (got {sc.kernel_size}, {sc.kernel_stride}, {sc.block_size})")
        if sc.window_size % sc.block_size:
            raise ConfigError(f"{source}: sparse_config.window_size {sc.window_size} is not a multiple of "
                              f"block_size {sc.block_size}")
        if sc.semantics not in ("v1", "v2"):
            raise ConfigError(f"{source}: sparse_config.semantics must be 'v1' (MiniCPM4-8B) or 'v2' (MiniCPM4.1)")
        if sc.use_nope:
            raise ConfigError(f"{source}: sparse_config.use_nope=true is not supported yet (compressed keys "
                              f"from pre-RoPE keys); set it to false")
        return sc

    def n_chunks(self, length: int) -> int:
        """Complete compressed-key chunks among `length` keys (chunk j = rows [stride*j, stride*j+kernel))."""
        return 0 if length < self.kernel_size else (length - self.kernel_size) // self.kernel_stride + 1


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rms_norm_eps: float
    max_position_embeddings: int
    original_max_position_embeddings: int
    rope_theta: float
    long_factor: tuple[float, ...]
    short_factor: tuple[float, ...]
    scale_emb: float
    scale_depth: float
    dim_model_base: float
    tie_word_embeddings: bool
    bos_token_id: int
    eos_token_ids: tuple[int, ...]
    sparse: SparseConfig | None = None
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    # ---- derived values -------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def group_size(self) -> int:
        """Query heads per kv head (GQA)."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def residual_scale(self) -> float:
        return self.scale_depth / math.sqrt(self.num_hidden_layers)

    @property
    def eagle_residual_scale(self) -> float:
        """An EAGLE head's residual scale: its few layers may be scaled as if the model were deeper
        (`mup_denominator`, default num_hidden_layers). MiniCPM4-8B's own config carries a
        mup_denominator that its decoder ignores, so this is for EAGLE heads only."""
        return self.scale_depth / math.sqrt(self.raw.get("mup_denominator") or self.num_hidden_layers)

    @property
    def logit_divisor(self) -> float:
        return self.hidden_size / self.dim_model_base

    @property
    def rope_factors(self) -> np.ndarray:
        """LongRoPE rule: long_factor iff the table (sized by max_position_embeddings) reaches past
        the original context; contexts beyond max_position_embeddings are refused by the runtime,
        so this static choice equals the reference's dynamic one."""
        long = self.max_position_embeddings > self.original_max_position_embeddings
        return np.asarray(self.long_factor if long else self.short_factor, dtype=np.float32)

    @property
    def rope_attention_scale(self) -> float:
        scale = self.max_position_embeddings / self.original_max_position_embeddings
        if scale <= 1.0:
            return 1.0
        return math.sqrt(1 + math.log(scale) / math.log(self.original_max_position_embeddings))

    def rope_inv_freq(self) -> np.ndarray:
        """inv_freq[i] = 1 / (theta^(2i/d) * factor[i]), float32 like the reference."""
        d = self.head_dim
        exponents = np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / d
        base = np.float32(self.rope_theta) ** exponents
        return (1.0 / (self.rope_factors * base)).astype(np.float32)

    def with_sparse(self, settings: dict | None = None) -> ModelConfig:
        """This config with InfLLM v2 switched on (DESIGN.md §7 defaults, overridden by `settings`).

        Only models trained with it qualify: MiniCPM4-8B / 4.1-8B, recognised by their 16 query
        heads per kv head. MiniCPM4-0.5B's reference code runs dense only.
        """
        if self.group_size != 16:
            raise ConfigError(
                f"sparse attention needs a model trained with InfLLM v2 (MiniCPM4-8B: 16 query heads per kv "
                f"head); this model has {self.group_size}. The reference runs it dense. To experiment anyway, "
                f"put a sparse_config into its config.json"
            )
        sparse = SparseConfig.from_dict({**(self.raw.get("sparse_config") or {}), **(settings or {})})
        return replace(self, sparse=sparse, raw={**self.raw, "sparse_config": self.to_dict_sparse(sparse)})

    @staticmethod
    def to_dict_sparse(sparse: SparseConfig) -> dict:
        return {f.name: getattr(sparse, f.name) for f in fields(SparseConfig)}

    def n_params(self) -> int:
        h, i, L = self.hidden_size, self.intermediate_size, self.num_hidden_layers
        kv = self.num_key_value_heads * self.head_dim
        per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return self.vocab_size * h + L * per_layer + h + head

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """K and V for every layer; plus InfLLM v2 compressed keys (1 per kernel_stride tokens)."""
        per = 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim * dtype_bytes
        if self.sparse is not None:
            per += math.ceil(
                self.num_hidden_layers * self.num_key_value_heads * self.head_dim * 4
                / self.sparse.kernel_stride
            )
        return per

    # ---- parsing ------------------------------------------------------------------------
    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            raise ConfigError(f"{path}: no config.json here; is this a MiniCPM4 checkpoint folder?")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not UTF-8 text ({e}); save config.json as UTF-8 JSON") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(d, source=str(path))

    @classmethod
    def for_eagle(cls, d: dict, source: str = "config") -> ModelConfig:
        """An EAGLE head's config.json as a ModelConfig (num_hidden_layers = the head's layers;
        its LM head, own or the target's, is a separate matrix)."""
        return cls.from_dict({**d, "architectures": ["MiniCPMForCausalLM"], "model_type": "minicpm",
                              "tie_word_embeddings": False}, source)

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> ModelConfig:
        """Every key the model uses is checked for its type, range and consistency with the others;
        a ConfigError names `source` and the key."""
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: must hold a JSON object of config keys, got {_show(d)}")
        k = _Keys(d, source)
        model_type = d.get("model_type")
        archs = d.get("architectures") or []
        if model_type is not None and not isinstance(model_type, str):
            raise k.fail("model_type", 'a string ("minicpm")', model_type)
        if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
            raise k.fail("architectures", 'a list of strings (["MiniCPMForCausalLM"])', archs)
        # MiniCPM4-0.5B ships without model_type; its architecture names it instead.
        if model_type is not None and model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"{source}: unknown model_type '{model_type}'; edgecpm supports MiniCPM4 "
                f"(model_type {SUPPORTED_MODEL_TYPES})"
            )
        if model_type is None and not any(a in SUPPORTED_ARCHITECTURES for a in archs):
            raise ConfigError(
                f"{source}: not a MiniCPM config (model_type missing and architectures={archs}; "
                f"expected one of {SUPPORTED_ARCHITECTURES})"
            )
        if archs and not any(a in SUPPORTED_ARCHITECTURES for a in archs):
            raise ConfigError(f"{source}: unsupported architectures {archs}; expected {SUPPORTED_ARCHITECTURES}")
        if k.str("hidden_act", "silu") != "silu":
            raise ConfigError(f"{source}: hidden_act '{d['hidden_act']}' is not supported (MiniCPM4 uses silu)")

        vocab, hidden, heads = k.int("vocab_size"), k.int("hidden_size"), k.int("num_attention_heads")
        kv_heads = k.int("num_key_value_heads", heads, null_ok=True)
        layers, inter = k.int("num_hidden_layers"), k.int("intermediate_size")
        if hidden % heads:
            raise ConfigError(f"{source}: hidden_size {hidden} is not divisible by num_attention_heads {heads}")
        if heads % kv_heads:
            raise ConfigError(
                f"{source}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}"
            )
        head_dim = hidden // heads
        if k.int("head_dim", head_dim, null_ok=True) != head_dim:
            raise ConfigError(f"{source}: head_dim {d['head_dim']} != hidden_size/num_attention_heads = {head_dim}; "
                              f"edgecpm needs hidden_size = num_attention_heads * head_dim")
        if head_dim % 2:
            raise ConfigError(f"{source}: head_dim {head_dim} (hidden_size/num_attention_heads) is odd; RoPE "
                              f"rotates pairs of dimensions")

        max_pos = k.int("max_position_embeddings", 32768)
        rs = k.dict("rope_scaling")
        r = _Keys(rs, source, "rope_scaling.")
        rope_type = rs.get("rope_type", rs.get("type"))
        if rs and rope_type != "longrope":
            raise ConfigError(f"{source}: rope_scaling type '{rope_type}' is not supported (MiniCPM4 uses longrope)")
        ones = (1.0,) * (head_dim // 2)
        long_f, short_f = r.floats("long_factor", ones), r.floats("short_factor", ones)
        for name, lst in (("long_factor", long_f), ("short_factor", short_f)):
            if len(lst) != head_dim // 2:
                raise ConfigError(
                    f"{source}: rope_scaling.{name} has {len(lst)} entries; head_dim {head_dim} needs "
                    f"{head_dim // 2}"
                )
        orig_pos = r.int("original_max_position_embeddings", max_pos)
        if orig_pos == 1 and max_pos > 1:  # the LongRoPE attention scale divides by log(original)
            raise r.fail("original_max_position_embeddings", "at least 2 when max_position_embeddings exceeds it",
                          orig_pos)

        eos = k.get("eos_token_id", 2)
        eos = eos if isinstance(eos, list) and eos else [eos]
        if not all(isinstance(e, int) and not isinstance(e, bool) for e in eos):
            raise k.fail("eos_token_id", "a token id or a non-empty list of token ids", d["eos_token_id"])
        if any(not 0 <= e < vocab for e in eos):
            raise ConfigError(f"{source}: eos_token_id {eos} lies outside the vocabulary (vocab_size {vocab})")
        bos = k.int("bos_token_id", 1, low=0)
        if bos >= vocab:
            raise ConfigError(f"{source}: bos_token_id {bos} lies outside the vocabulary (vocab_size {vocab})")
        k.float("mup_denominator", layers, null_ok=True)  # read by eagle_residual_scale
        sparse = d.get("sparse_config")
        return cls(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=inter,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            rms_norm_eps=k.float("rms_norm_eps", 1e-6),
            max_position_embeddings=max_pos,
            original_max_position_embeddings=orig_pos,
            rope_theta=k.float("rope_theta", 10000.0),
            long_factor=long_f,
            short_factor=short_f,
            scale_emb=k.float("scale_emb", 1.0),
            scale_depth=k.float("scale_depth", 1.0),
            dim_model_base=k.float("dim_model_base", hidden),
            # Absent means tied (MiniCPM4-0.5B ships no key and no lm_head.weight).
            tie_word_embeddings=k.bool("tie_word_embeddings", True),
            bos_token_id=bos,
            eos_token_ids=tuple(eos),
            sparse=SparseConfig.from_dict(sparse, source) if sparse is not None else None,
            raw=dict(d),
        )

    def to_dict(self) -> dict:
        """The normalized form recorded in a bundle manifest (round-trips through from_dict)."""
        d = {
            "architectures": ["MiniCPMForCausalLM"],
            "model_type": "minicpm",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_theta": self.rope_theta,
            "rope_scaling": {
                "rope_type": "longrope",
                "long_factor": list(self.long_factor),
                "short_factor": list(self.short_factor),
                "original_max_position_embeddings": self.original_max_position_embeddings,
            },
            "scale_emb": self.scale_emb,
            "scale_depth": self.scale_depth,
            "dim_model_base": self.dim_model_base,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids),
            "hidden_act": "silu",
        }
        if self.sparse is not None:
            d["sparse_config"] = self.to_dict_sparse(self.sparse)
        if "mup_denominator" in self.raw:
            d["mup_denominator"] = self.raw["mup_denominator"]
        return d
