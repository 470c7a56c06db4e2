"""GPTQ and AWQ 4-bit checkpoints as published (DESIGN.md §14, import; export/quantized.py).

The checkpoints here are written by this file's own packer, which follows the public formats with
explicit loops from integer codes (it never calls the unpacker): GPTQ qweight packs 8 inputs per
int32 word, qzeros/scales per group and output, zeros minus one in the v1 format; AWQ packs 8
outputs per word in AutoAWQ's GEMM order (nibble j holds output 0, 2, 4, 6, 1, 3, 5, 7 [j]). The
reference for every check is the float32 weight computed from the codes in float64.
"""

from __future__ import annotations

import doctest
import json
import math
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import rel_err, tiny_config

pytest.importorskip("torch")

import edgecpm
from edgecpm.errors import CheckpointError
from edgecpm.export import quantized
from edgecpm.export.quantized import QuantConfig, unpack

AWQ_PACK_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ GEMM: the output that the j-th nibble of a word holds
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
PARITY = 1e-4
PROMPT = [1, 17, 300, 5, 42, 99, 7, 250]


# ---- the independent writer ---------------------------------------------------------------------
def pack_gptq_qweight(codes: np.ndarray) -> np.ndarray:
    """codes [K, N] (0..15) -> int32 [K/8, N]: input i in bits 4*(i%8) of word i//8."""
    k, n = codes.shape
    rows = codes.tolist()
    words = [[0] * n for _ in range(k // 8)]
    for i in range(k):
        for o in range(n):
            words[i // 8][o] |= rows[i][o] << (4 * (i % 8))
    return np.array(words, dtype=np.uint32).view(np.int32)


def pack_outputs(values: np.ndarray, order: list[int]) -> np.ndarray:
    """values [R, N] (0..15) -> int32 [R, N/8]: nibble j of word c holds column 8*c + order[j]."""
    r, n = values.shape
    rows = values.tolist()
    words = []
    for row in rows:
        out = []
        for c in range(n // 8):
            word = 0
            for j in range(8):
                word |= row[8 * c + order[j]] << (4 * j)
            out.append(word)
        words.append(out)
    return np.array(words, dtype=np.uint32).view(np.int32)


def quantize_random(rng, n: int, k: int, method: str, group_size: int, sym: bool = True, desc_act: bool = False,
                    fmt: str = "gptq"):
    """Random codes/zeros/scales of an [n, k] linear; its stored tensors and its exact float32 weight."""
    groups = 1 if group_size == -1 else math.ceil(k / group_size)
    plain = np.arange(k) // (k if group_size == -1 else group_size)
    group = rng.permutation(plain) if desc_act else plain
    codes = rng.integers(0, 16, (k, n))
    if sym:
        zeros = np.full((groups, n), 8)
    else:  # v1 stores zero - 1 in 4 bits: zero 0 cannot be stored
        zeros = rng.integers(1 if method == "gptq" and fmt == "gptq" else 0, 16, (groups, n))
    scales = rng.uniform(0.002, 0.01, (groups, n)).astype(np.float16)
    weight = np.ascontiguousarray((scales.astype(np.float64)[group] * (codes - zeros[group])).T, dtype=np.float32)
    if method == "gptq":
        stored = {"qweight": pack_gptq_qweight(codes),
                  "qzeros": pack_outputs(zeros - 1 if fmt == "gptq" else zeros, list(range(8))),
                  "scales": scales, "g_idx": group.astype(np.int32)}
    else:
        stored = {"qweight": pack_outputs(codes, AWQ_PACK_ORDER), "qzeros": pack_outputs(zeros, AWQ_PACK_ORDER),
                  "scales": scales}
    return stored, weight, (codes, zeros, group)


def quant_config(method: str, group_size: int, sym: bool = True, desc_act: bool = False, fmt: str = "gptq") -> dict:
    if method == "gptq":
        return {"quant_method": "gptq", "bits": 4, "group_size": group_size, "sym": sym, "desc_act": desc_act,
                "checkpoint_format": fmt, "true_sequential": True, "damp_percent": 0.01}
    return {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True, "version": "gemm",
            "modules_to_not_convert": None}


def write_quantized(folder, ref_folder, method: str, group_size: int, sym: bool = True, desc_act: bool = False,
                    fmt: str = "gptq", tie: bool = True, quantize_lm_head: bool = False, seed: int = 0):
    """A tiny quantized checkpoint in `folder` and its float32 twin (the same weights, dequantized) in
    `ref_folder`. Other tensors are fp16 in the quantized one, as published checkpoints store them."""
    from safetensors.numpy import save_file

    from edgecpm.config import ModelConfig
    from edgecpm.export.checkpoint import expected_shapes

    cfg = tiny_config(tie=tie)
    cfg_obj = ModelConfig.from_dict(cfg)
    rng = np.random.default_rng(seed)
    q_tensors, ref_tensors = {}, {}
    quantized_names = {f"model.layers.{i}.{m}.weight" for i in range(cfg_obj.num_hidden_layers) for m in LINEARS}
    if quantize_lm_head and not tie:
        quantized_names.add("lm_head.weight")
    for name, shape in sorted(expected_shapes(cfg_obj).items()):
        if name in quantized_names:
            stored, weight, _ = quantize_random(rng, *shape, method, group_size, sym, desc_act, fmt)
            base = name.removesuffix(".weight")
            q_tensors.update({f"{base}.{s}": a for s, a in stored.items()})
            ref_tensors[name] = weight
            continue
        arr = np.ones(shape, np.float16) if name.endswith("norm.weight") else rng.normal(0, 0.05, shape).astype(
            np.float16)
        q_tensors[name] = arr
        ref_tensors[name] = arr.astype(np.float32)
    for f, tensors, qc in ((folder, q_tensors, quant_config(method, group_size, sym, desc_act, fmt)),
                           (ref_folder, ref_tensors, None)):
        f.mkdir(parents=True, exist_ok=True)
        (f / "config.json").write_text(json.dumps({**cfg, "quantization_config": qc} if qc else cfg, indent=2))
        save_file(tensors, str(f / "model.safetensors"), metadata={"format": "pt"})
    return folder, ref_folder


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """pair(method, ...) -> (quantized folder, float twin folder), one per distinct request."""
    made = {}

    def make(method, group_size, **kw):
        key = json.dumps([method, group_size, kw], sort_keys=True)
        if key not in made:
            root = tmp_path_factory.mktemp(f"{method}")
            made[key] = write_quantized(root / "q", root / "ref", method, group_size, **kw)
        return made[key]

    return make


def edit_checkpoint(src, dst, drop=(), add=None, config=None):
    """A copy of checkpoint `src` in `dst` with tensors dropped / added and config keys changed."""
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(src / "model.safetensors"))
    for name in drop:
        del tensors[name]
    tensors.update(add or {})
    dst.mkdir()
    save_file(tensors, str(dst / "model.safetensors"))
    cfg = json.loads((src / "config.json").read_text())
    for key, value in (config or {}).items():
        cfg["quantization_config"][key] = value
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


# ---- the unpacker ---------------------------------------------------------------------------------
def test_doctest_worked_example():
    result = doctest.testmod(quantized)
    assert result.attempted >= 8 and result.failed == 0


def test_writer_matches_the_worked_example():
    """The test writer packs the docstring's hand-checked words."""
    codes = np.tile(np.arange(16)[:, None], (1, 8))
    assert pack_gptq_qweight(codes).view(np.uint32).tolist() == [[0x76543210] * 8, [0xFEDCBA98] * 8]
    assert pack_outputs(np.array([[0, 4, 1, 5, 2, 6, 3, 7]]), AWQ_PACK_ORDER).view(np.uint32).tolist() == [[0x76543210]]


GPTQ_VARIANTS = [(g, sym, fmt, act) for g in (32, 64, -1) for sym in (True, False) for fmt in ("gptq", "gptq_v2")
                 for act in (False, True)]


@pytest.mark.parametrize(("group_size", "sym", "fmt", "desc_act"), GPTQ_VARIANTS)
def test_gptq_unpacks_exactly(group_size, sym, fmt, desc_act):
    rng = np.random.default_rng([group_size + 1, sym, desc_act, fmt == "gptq"])
    n, k = 48, 128
    stored, weight, (codes, zeros, group) = quantize_random(rng, n, k, "gptq", group_size, sym, desc_act, fmt)
    cfg = QuantConfig("gptq", 4, group_size, sym, desc_act, fmt)
    u = unpack(cfg, stored, "x", (n, k))
    assert np.array_equal(u.codes, codes) and np.array_equal(u.zeros, zeros) and np.array_equal(u.group, group)
    assert np.array_equal(u.dequantize(), weight)  # exact, not close
    if not desc_act:  # g_idx absent: i // group_size
        plain = {s: a for s, a in stored.items() if s != "g_idx"}
        assert np.array_equal(quantized.dequantize(cfg, plain, "x", (n, k)), weight)


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_awq_unpacks_exactly(group_size):
    rng = np.random.default_rng(group_size)
    n, k = 48, 128
    stored, weight, (codes, zeros, _) = quantize_random(rng, n, k, "awq", group_size, sym=False)
    u = unpack(QuantConfig("awq", 4, group_size, False, False, "gemm"), stored, "x", (n, k))
    assert np.array_equal(u.codes, codes) and np.array_equal(u.zeros, zeros)
    assert np.array_equal(u.dequantize(), weight)
    # the plain (GPTQ) order would read other outputs: the interleave matters
    assert not np.array_equal(quantized.unpack_along_output(stored["qweight"]), codes)


# ---- through Checkpoint, the torch model and an exported bundle ----------------------------------
CASES = {
    "gptq-act-order-asym-v1-g32": ("gptq", 32, {"sym": False, "desc_act": True, "fmt": "gptq"}),
    "gptq-sym-v2-per-channel-lm-head": ("gptq", -1, {"fmt": "gptq_v2", "tie": False, "quantize_lm_head": True}),
    "awq-g32-untied": ("awq", 32, {"tie": False}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_torch_matches_the_dequantized_float_model(pair, case):
    from edgecpm.export.checkpoint import Checkpoint

    method, g, kw = CASES[case]
    q, ref = pair(method, g, **kw)
    ck = Checkpoint(q)
    ck.check()
    assert ck.quant.method == method and len(ck.quantized_weights) == 14 + kw.get("quantize_lm_head", False)
    s, r = edgecpm.Session(q, backend="torch"), edgecpm.Session(ref, backend="torch")
    ours, want = s.logits(PROMPT), r.logits(PROMPT)
    err = rel_err(ours, want)
    print(f"{case}: torch vs dequantized float model, logits rel err {err:.2e}")
    assert err <= PARITY
    out = s.generate(PROMPT, max_new_tokens=12, ignore_eos=True)
    assert out.token_ids == r.generate(PROMPT, max_new_tokens=12, ignore_eos=True).token_ids


@pytest.mark.parametrize("case", ["gptq-act-order-asym-v1-g32", "awq-g32-untied"])
def test_exported_fp32_bundle_on_onnxruntime(pair, case, tmp_path):
    pytest.importorskip("onnxruntime")
    from edgecpm.export.exporter import export_bundle

    method, g, kw = CASES[case]
    q, ref = pair(method, g, **kw)
    bundle = export_bundle(q, tmp_path / "b", dtype="fp32", progress=False)
    s = edgecpm.Session(bundle, backend="onnxruntime")
    r = edgecpm.Session(ref, backend="torch")
    err = rel_err(s.logits(PROMPT), r.logits(PROMPT))
    print(f"{case}: fp32 bundle on onnxruntime vs dequantized float model, logits rel err {err:.2e}")
    assert err <= PARITY
    out = s.generate(PROMPT, max_new_tokens=12, ignore_eos=True)
    assert out.token_ids == r.generate(PROMPT, max_new_tokens=12, ignore_eos=True).token_ids


# ---- refusals --------------------------------------------------------------------------------------
def _load(folder):
    from edgecpm.export.checkpoint import load_model

    return load_model(folder)


@pytest.mark.parametrize(("config", "words"), [
    ({"bits": 3}, ["bits 3", "model.layers.0.mlp.down_proj.qweight", "4-bit GPTQ"]),
    ({"bits": 8}, ["bits 8", "4-bit"]),
    ({"checkpoint_format": "marlin"}, ["checkpoint_format 'marlin'", "gptq_v2"]),
    ({"is_marlin_format": True}, ["'marlin'"]),
    ({"quant_method": "bitsandbytes"}, ["quant_method 'bitsandbytes'", "4-bit AWQ"]),
    ({"dynamic": {"-:.*down_proj": {}}}, ["dynamic"]),
])
def test_unsupported_gptq_configs_refused(pair, tmp_path, config, words):
    q, _ = pair("gptq", 32)
    bad = edit_checkpoint(q, tmp_path / "bad", config=config)
    with pytest.raises(CheckpointError) as e:
        _load(bad)
    for w in words:
        assert w in str(e.value)


@pytest.mark.parametrize(("version", "word"), [("gemv", "'gemv'"), ("GEMV_FAST", "'GEMV_FAST'"),
                                               ("marlin", "'marlin'"), ("exllama", "'exllama'")])
def test_unsupported_awq_versions_refused(pair, tmp_path, version, word):
    q, _ = pair("awq", 32, tie=False)
    bad = edit_checkpoint(q, tmp_path / "bad", config={"version": version})
    with pytest.raises(CheckpointError, match="version") as e:
        _load(bad)
    assert word in str(e.value) and "gemm" in str(e.value)


def test_missing_companion_tensor_named(pair, tmp_path):
    q, _ = pair("gptq", 32)
    bad = edit_checkpoint(q, tmp_path / "bad", drop=["model.layers.1.mlp.up_proj.qzeros"])
    with pytest.raises(CheckpointError, match=r"missing tensors: model\.layers\.1\.mlp\.up_proj\.qzeros") as e:
        _load(bad)
    assert "qweight, qzeros, scales" in str(e.value)


def test_marlin_repacked_tensors_named(pair, tmp_path):
    q, _ = pair("gptq", 32)
    base = "model.layers.0.self_attn.q_proj"
    bad = edit_checkpoint(q, tmp_path / "bad", drop=[f"{base}.{s}" for s in ("qweight", "qzeros", "scales", "g_idx")],
                          add={f"{base}.B": np.zeros((4, 128), np.int32), f"{base}.s": np.zeros((2, 64), np.float16)})
    with pytest.raises(CheckpointError) as e:
        _load(bad)
    msg = str(e.value)
    assert f"{base}.B: a Marlin-repacked weight" in msg and f"missing tensors: {base}.weight" in msg


def test_wrong_packing_named(pair, tmp_path):
    """A 3-bit-shaped qweight under a 4-bit config: the tensor and the expected layout are named."""
    q, _ = pair("gptq", 32)
    name = "model.layers.0.mlp.gate_proj.qweight"  # 4-bit: [64/8, 128]; 3-bit packing: [64*3/32, 128]
    bad = edit_checkpoint(q, tmp_path / "bad", add={name: np.zeros((6, 128), np.int32)})
    with pytest.raises(CheckpointError, match=rf"wrong shapes: {name}: \(6, 128\) \(expected \(8, 128\)\)") as e:
        _load(bad)
    assert "GPTQ 4-bit, group 32" in str(e.value)


def test_bad_g_idx_and_dtype_named(pair, tmp_path):
    q, _ = pair("gptq", 32)
    base = "model.layers.0.self_attn.k_proj"
    bad = edit_checkpoint(q, tmp_path / "bad", add={f"{base}.g_idx": np.full(64, 5, np.int32)})
    with pytest.raises(CheckpointError, match=rf"{base}\.g_idx: group ids 5\.\.5 outside the 2 groups"):
        _load(bad)
    bad = edit_checkpoint(q, tmp_path / "bad2", add={f"{base}.qweight": np.zeros((8, 32), np.float32)})
    with pytest.raises(CheckpointError, match=rf"{base}\.qweight: dtype float32 where int32"):
        _load(bad)


def test_bias_zero_ignored_nonzero_refused(pair, tmp_path):
    q, _ = pair("gptq", 32)
    base = "model.layers.0.self_attn.o_proj"
    ok = edit_checkpoint(q, tmp_path / "ok", add={f"{base}.bias": np.zeros(64, np.float16)})
    _load(ok)
    bad = edit_checkpoint(q, tmp_path / "bad", add={f"{base}.bias": np.full(64, 0.5, np.float16)})
    with pytest.raises(CheckpointError, match=rf"{base}\.bias: nonzero bias"):
        _load(bad)


def test_quantized_tensors_without_config_named(pair, tmp_path):
    q, _ = pair("gptq", 32)
    bad = tmp_path / "bad"
    shutil.copytree(q, bad)
    cfg = json.loads((bad / "config.json").read_text())
    del cfg["quantization_config"]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="no quantization_config"):
        _load(bad)


# ---- inspect ---------------------------------------------------------------------------------------
def test_inspect_reports_quantization(pair, capsys):
    from edgecpm.inspect import inspect_info, print_report

    q, ref = pair("gptq", 32, sym=False, desc_act=True, fmt="gptq")
    info = inspect_info(q)
    qi = info["quantization"]
    assert qi["supported"] and qi["method"] == "gptq" and qi["bits"] == 4 and qi["group_size"] == 32
    assert (qi["sym"], qi["desc_act"], qi["checkpoint_format"]) == (False, True, "gptq")
    assert qi["quantized_linears"] == 14 and qi["float_linears"] == []
    # per linear: 4 bits + 16-bit scale and 4-bit zero per 32 inputs + 32-bit g_idx per row
    assert 4.6 < qi["bits_per_weight"] < 5.3 and 4.6 < qi["bits_per_weight_nominal"] < 4.7
    assert info["notes"] == [] and info["ternary"] is None
    assert inspect_info(ref)["quantization"] is None
    print_report(info)
    out = capsys.readouterr().out
    assert "[quantization (GPTQ)]" in out and "sym / desc_act" in out and "bits per weight" in out

    awq = inspect_info(pair("awq", 32, tie=False)[0])["quantization"]
    assert awq["method"] == "awq" and awq["checkpoint_format"] == "gemm" and awq["float_linears"] == ["lm_head.weight"]


def test_inspect_unsupported_is_a_note_and_no_torch(pair, tmp_path):
    q, _ = pair("gptq", 32)
    bad = edit_checkpoint(q, tmp_path / "bad", config={"bits": 3})
    code = ("import sys, json; from edgecpm.inspect import inspect_info; i = inspect_info(sys.argv[1]); "
            "print(json.dumps(i['notes'])); sys.exit(1 if 'torch' in sys.modules else 0)")
    r = subprocess.run([sys.executable, "-c", code, str(bad)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "bits 3" in r.stdout and "quantization not supported" in r.stdout
