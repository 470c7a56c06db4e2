"""ModelConfig: the shipped configs parse to the DESIGN.md §4 facts; bad configs fail clearly."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
from conftest import SHARED, needs_shared, real_config, tiny_config

from edgecpm.config import ModelConfig
from edgecpm.errors import ConfigError

# DESIGN.md §4 table, per shipped model.
FACTS = {
    "MiniCPM4-0.5B": {"head_dim": 64, "group": 8, "tied": True, "eps": 1e-5, "layers": 24, "n_rope": 32, "hidden": 1024,
                          "heads": 16, "kv_heads": 2, "intermediate": 4096},
    "MiniCPM4-8B": {"head_dim": 128, "group": 16, "tied": False, "eps": 1e-6, "layers": 32, "n_rope": 64, "hidden": 4096,
                        "heads": 32, "kv_heads": 2, "intermediate": 16384},
}


@needs_shared
@pytest.mark.parametrize("name", sorted(FACTS))
def test_real_config_facts(name):
    f = FACTS[name]
    cfg = ModelConfig.from_file(SHARED / name)  # a folder works as well as the file
    assert cfg == ModelConfig.from_file(SHARED / name / "config.json")
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (
        f["hidden"], f["layers"], f["heads"], f["kv_heads"])
    assert cfg.intermediate_size == f["intermediate"]
    assert cfg.head_dim == f["head_dim"]
    assert cfg.group_size == f["group"]
    assert cfg.tie_word_embeddings is f["tied"]
    assert cfg.rms_norm_eps == f["eps"]
    assert cfg.residual_scale == pytest.approx(1.4 / math.sqrt(f["layers"]), rel=1e-12)
    assert cfg.logit_divisor == pytest.approx(f["hidden"] / 256)
    assert cfg.eos_token_ids == (2, 73440)
    assert cfg.bos_token_id == 1
    assert len(cfg.long_factor) == len(cfg.short_factor) == f["n_rope"]
    assert len(cfg.rope_factors) == f["n_rope"]
    assert cfg.rope_attention_scale == 1.0
    assert (cfg.vocab_size, cfg.scale_emb, cfg.scale_depth, cfg.dim_model_base) == (73448, 12, 1.4, 256)
    assert cfg.rope_theta == 10000.0
    assert cfg.max_position_embeddings == cfg.original_max_position_embeddings == 32768
    assert cfg.sparse is None


@needs_shared
def test_logit_divisor_values():
    assert ModelConfig.from_file(SHARED / "MiniCPM4-0.5B").logit_divisor == 4
    assert ModelConfig.from_file(SHARED / "MiniCPM4-8B").logit_divisor == 16


@needs_shared
@pytest.mark.parametrize("name", sorted(FACTS))
def test_rope_inv_freq_formula(name):
    cfg = ModelConfig.from_file(SHARED / name)
    d = cfg.head_dim
    factors = np.asarray(real_config(name)["rope_scaling"]["short_factor"], dtype=np.float64)
    want = 1.0 / (10000.0 ** (np.arange(0, d, 2) / d) * factors)
    got = cfg.rope_inv_freq()
    assert got.dtype == np.float32 and got.shape == (d // 2,)
    np.testing.assert_allclose(got, want, rtol=1e-6)


@needs_shared
@pytest.mark.parametrize("name", sorted(FACTS))
def test_to_dict_round_trip(name):
    cfg = ModelConfig.from_file(SHARED / name)
    again = ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    assert again.head_dim == cfg.head_dim and again.tie_word_embeddings == cfg.tie_word_embeddings


def _base() -> dict:
    return tiny_config()


def _raises(d: dict, *needles: str):
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_dict(d, source="cfg.json")
    msg = str(e.value)
    assert "cfg.json" in msg
    for n in needles:
        assert n in msg, f"{n!r} not in error message: {msg}"
    return msg


def test_tiny_config_parses():
    cfg = ModelConfig.from_dict(_base())
    assert cfg.head_dim == 16 and cfg.group_size == 2 and len(cfg.rope_factors) == 8


def test_unknown_model_type():
    d = _base()
    d["model_type"] = "llama"
    _raises(d, "model_type", "llama")


def test_foreign_architecture_without_model_type():
    d = _base()
    d.pop("model_type", None)
    d["architectures"] = ["LlamaForCausalLM"]
    _raises(d, "LlamaForCausalLM")


def test_no_model_type_no_architecture():
    d = _base()
    d.pop("model_type", None)
    d.pop("architectures", None)
    _raises(d, "model_type")


def test_minicpm_model_type_with_foreign_architecture():
    d = _base()
    d["model_type"] = "minicpm"
    d["architectures"] = ["Qwen2ForCausalLM"]
    _raises(d, "Qwen2ForCausalLM")


def test_hidden_not_divisible_by_heads():
    d = _base()
    d["hidden_size"] = 66
    d["num_attention_heads"] = 4
    _raises(d, "hidden_size", "66", "num_attention_heads", "4")


def test_heads_not_multiple_of_kv_heads():
    d = _base()
    d["num_key_value_heads"] = 3
    _raises(d, "num_key_value_heads", "3", "num_attention_heads", "4")


@pytest.mark.parametrize("which", ["long_factor", "short_factor"])
def test_longrope_list_wrong_length(which):
    d = _base()
    d["rope_scaling"] = copy.deepcopy(d["rope_scaling"])
    d["rope_scaling"][which] = d["rope_scaling"][which][:-1]
    n = len(d["rope_scaling"][which])
    _raises(d, which, str(n), "head_dim")


def test_unsupported_rope_type():
    d = _base()
    d["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    _raises(d, "yarn")


def test_missing_required_key():
    d = _base()
    del d["vocab_size"]
    _raises(d, "vocab_size")


def test_missing_config_json(tmp_path):
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_file(tmp_path)
    assert str(tmp_path) in str(e.value) and "config.json" in str(e.value)


def test_invalid_json(tmp_path):
    p = tmp_path / "config.json"
    p.write_text('{"hidden_size": 64,')
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_file(tmp_path)
    assert str(p) in str(e.value) and "JSON" in str(e.value)


def test_tie_word_embeddings_absent_means_tied():
    d = _base()
    d.pop("tie_word_embeddings", None)
    assert ModelConfig.from_dict(d).tie_word_embeddings is True
    d["tie_word_embeddings"] = False
    assert ModelConfig.from_dict(d).tie_word_embeddings is False


# ---- LongRoPE selection rule --------------------------------------------------------------------

def _longrope(max_pos: int, orig: int) -> dict:
    d = _base()
    half = d["hidden_size"] // d["num_attention_heads"] // 2
    d["max_position_embeddings"] = max_pos
    d["rope_scaling"] = {
        "rope_type": "longrope",
        "long_factor": [2.0 + i for i in range(half)],
        "short_factor": [1.0 + 0.1 * i for i in range(half)],
        "original_max_position_embeddings": orig,
    }
    return d


def test_longrope_128k_uses_long_factor_and_scale():
    d = _longrope(131072, 65536)
    cfg = ModelConfig.from_dict(d)
    np.testing.assert_array_equal(cfg.rope_factors, np.asarray(d["rope_scaling"]["long_factor"], np.float32))
    want_scale = math.sqrt(1 + math.log(131072 / 65536) / math.log(65536))
    assert cfg.rope_attention_scale == pytest.approx(want_scale, rel=1e-12)
    assert cfg.rope_attention_scale > 1.0
    hd = cfg.head_dim
    want = 1.0 / (10000.0 ** (np.arange(0, hd, 2) / hd) * np.asarray(d["rope_scaling"]["long_factor"]))
    np.testing.assert_allclose(cfg.rope_inv_freq(), want, rtol=1e-6)


def test_longrope_short_factor_when_within_original():
    d = _longrope(65536, 65536)
    cfg = ModelConfig.from_dict(d)
    np.testing.assert_array_equal(cfg.rope_factors, np.asarray(d["rope_scaling"]["short_factor"], np.float32))
    assert cfg.rope_attention_scale == 1.0


def test_longrope_model_applies_scale_and_long_factor():
    """The torch model's rope uses the same rule: cos(0) = attention scale, long inv_freq."""
    torch = pytest.importorskip("torch")
    from edgecpm.export.modeling_minicpm import LongRoPE

    d = _longrope(131072, 65536)
    cfg = ModelConfig.from_dict(d)
    rope = LongRoPE(cfg)
    pos = torch.tensor([[0, 5, 70000]])
    cos, sin = rope(pos)
    scale = math.sqrt(1 + math.log(2) / math.log(65536))
    np.testing.assert_allclose(cos[0, 0].numpy(), scale, rtol=1e-6)
    inv = 1.0 / (10000.0 ** (np.arange(0, cfg.head_dim, 2) / cfg.head_dim)
                 * np.asarray(d["rope_scaling"]["long_factor"]))
    ang = 5 * inv
    np.testing.assert_allclose(cos[0, 1].numpy(), np.cos(np.concatenate([ang, ang])) * scale, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sin[0, 1].numpy(), np.sin(np.concatenate([ang, ang])) * scale, rtol=1e-5, atol=1e-6)


def test_kv_bytes_per_token():
    cfg = ModelConfig.from_dict(_base())
    assert cfg.kv_bytes_per_token(4) == 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 4
    assert cfg.kv_bytes_per_token(2) * 2 == cfg.kv_bytes_per_token(4)


def test_defaults_without_rope_scaling():
    d = _base()
    d.pop("rope_scaling")
    cfg = ModelConfig.from_dict(d)
    np.testing.assert_array_equal(cfg.rope_factors, np.ones(cfg.head_dim // 2, np.float32))
    assert cfg.rope_attention_scale == 1.0
    assert cfg.original_max_position_embeddings == cfg.max_position_embeddings


def test_single_eos_id():
    d = _base()
    d["eos_token_id"] = 2
    assert ModelConfig.from_dict(d).eos_token_ids == (2,)
