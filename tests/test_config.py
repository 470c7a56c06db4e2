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
    "MiniCPM4-8B": {"head_dim": 128, "group": 16, "tied": False, "eps": 1e-6, "layers": 32, "n_rope": 64,
                    "hidden": 4096,
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


# ---- value types, ranges and consistency: every error names the file and the key ----------------

@pytest.mark.parametrize("key, value, message", [
    ("hidden_size", "big", '"hidden_size" must be a positive integer, got "big"'),
    ("hidden_size", None, '"hidden_size" must be a positive integer, got null'),
    ("hidden_size", [1], '"hidden_size" must be a positive integer, got [1]'),
    ("hidden_size", 256.5, '"hidden_size" must be a positive integer, got 256.5'),
    ("hidden_size", 64.0, '"hidden_size" must be a positive integer, got 64.0'),
    ("num_hidden_layers", True, '"num_hidden_layers" must be a positive integer, got true'),
    ("num_hidden_layers", -1, '"num_hidden_layers" must be a positive integer, got -1'),
    ("num_hidden_layers", 0, '"num_hidden_layers" must be a positive integer, got 0'),
    ("vocab_size", "512", '"vocab_size" must be a positive integer, got "512"'),
    ("intermediate_size", {}, '"intermediate_size" must be a positive integer, got {}'),
    ("num_attention_heads", 0, '"num_attention_heads" must be a positive integer, got 0'),
    ("num_key_value_heads", -2, '"num_key_value_heads" must be a positive integer, got -2'),
    ("max_position_embeddings", "32k", '"max_position_embeddings" must be a positive integer, got "32k"'),
    ("rope_scaling", 5, '"rope_scaling" must be an object (or null), got 5'),
    ("rope_scaling", [1.0], '"rope_scaling" must be an object (or null), got [1.0]'),
    ("rms_norm_eps", 0, '"rms_norm_eps" must be a positive number, got 0'),
    ("rms_norm_eps", -1e-6, '"rms_norm_eps" must be a positive number, got -1e-06'),
    ("rms_norm_eps", "1e-6", '"rms_norm_eps" must be a positive number, got "1e-6"'),
    ("rms_norm_eps", float("nan"), '"rms_norm_eps" must be a positive number, got NaN'),
    ("rope_theta", True, '"rope_theta" must be a positive number, got true'),
    ("scale_emb", None, '"scale_emb" must be a positive number, got null'),
    ("scale_depth", float("inf"), '"scale_depth" must be a positive number, got Infinity'),
    ("dim_model_base", 0, '"dim_model_base" must be a positive number, got 0'),
    ("mup_denominator", "32", '"mup_denominator" must be a positive number, got "32"'),
    ("tie_word_embeddings", "false", '"tie_word_embeddings" must be true or false, got "false"'),
    ("tie_word_embeddings", 0, '"tie_word_embeddings" must be true or false, got 0'),
    ("bos_token_id", -1, '"bos_token_id" must be a non-negative integer, got -1'),
    ("bos_token_id", 512, "bos_token_id 512 lies outside the vocabulary (vocab_size 512)"),
    ("eos_token_id", None, '"eos_token_id" must be a token id or a non-empty list of token ids, got null'),
    ("eos_token_id", [2, "x"], '"eos_token_id" must be a token id or a non-empty list of token ids, got [2, "x"]'),
    ("eos_token_id", [], '"eos_token_id" must be a token id or a non-empty list of token ids, got []'),
    ("eos_token_id", [2, 512], "eos_token_id [2, 512] lies outside the vocabulary (vocab_size 512)"),
    ("eos_token_id", -1, "eos_token_id [-1] lies outside the vocabulary"),
    ("hidden_act", 7, '"hidden_act" must be a string, got 7'),
    ("model_type", ["minicpm"], '"model_type" must be a string ("minicpm"), got ["minicpm"]'),
    ("architectures", "MiniCPMForCausalLM", '"architectures" must be a list of strings'),
    ("head_dim", 32, "head_dim 32 != hidden_size/num_attention_heads = 16"),
    ("head_dim", "16", '"head_dim" must be a positive integer, got "16"'),
    ("sparse_config", [1], '"sparse_config" must be an object, got [1]'),
    ("sparse_config", {"topk": "many"}, '"sparse_config.topk" must be a positive integer, got "many"'),
    ("sparse_config", {"dense_len": -1}, '"sparse_config.dense_len" must be a non-negative integer, got -1'),
    ("sparse_config", {"use_nope": "no"}, '"sparse_config.use_nope" must be true or false, got "no"'),
    ("sparse_config", {"kernel_stride": 0}, '"sparse_config.kernel_stride" must be a positive integer, got 0'),
    ("sparse_config", {"semantics": 1}, '"sparse_config.semantics" must be a string, got 1'),
])
def test_bad_value_names_file_and_key(key, value, message):
    d = _base()
    d[key] = value
    assert message in _raises(d)


@pytest.mark.parametrize("key, value, message", [
    ("long_factor", [1.0] * 7 + ["a"], '"rope_scaling.long_factor" must be a list of positive numbers'),
    ("short_factor", 2.0, '"rope_scaling.short_factor" must be a list of positive numbers, got 2.0'),
    ("short_factor", [1.0] * 7 + [0.0], '"rope_scaling.short_factor" must be a list of positive numbers'),
    ("long_factor", [1.0] * 7 + [True], '"rope_scaling.long_factor" must be a list of positive numbers'),
    ("original_max_position_embeddings", 0.5,
     '"rope_scaling.original_max_position_embeddings" must be a positive integer, got 0.5'),
    ("original_max_position_embeddings", 1,
     '"rope_scaling.original_max_position_embeddings" must be at least 2 when max_position_embeddings exceeds it'),
])
def test_bad_rope_scaling_value(key, value, message):
    d = _base()
    d["rope_scaling"] = {**d["rope_scaling"], key: value}
    assert message in _raises(d)


def test_config_not_an_object():
    with pytest.raises(ConfigError, match=r"cfg\.json: must hold a JSON object of config keys, got \[1\]"):
        ModelConfig.from_dict([1], source="cfg.json")


def test_file_errors_name_the_path(tmp_path):
    p = tmp_path / "config.json"
    p.write_text(json.dumps({**_base(), "hidden_size": "big"}))
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_file(tmp_path)
    assert str(e.value) == f'{p}: "hidden_size" must be a positive integer, got "big"'
    p.write_bytes(b'{"hidden_size": "\xff"}')
    with pytest.raises(ConfigError, match="not UTF-8"):
        ModelConfig.from_file(tmp_path)


def test_odd_head_dim():
    d = _base()
    d.pop("rope_scaling")
    d.update(hidden_size=60, num_attention_heads=4)  # head_dim 15
    _raises(d, "head_dim 15", "odd")


def test_lenient_where_the_reference_is():
    """Floats accept integers; null means 'the default' where Hugging Face reads it so."""
    d = _base()
    d.update(rms_norm_eps=1, rope_theta=10000, scale_depth=2, num_key_value_heads=None, head_dim=None,
             rope_scaling=None, sparse_config=None, mup_denominator=None)
    cfg = ModelConfig.from_dict(d)
    assert cfg.num_key_value_heads == cfg.num_attention_heads and cfg.rms_norm_eps == 1.0
    assert cfg.eagle_residual_scale == cfg.residual_scale
    d["head_dim"] = 16
    assert ModelConfig.from_dict(d).head_dim == 16
