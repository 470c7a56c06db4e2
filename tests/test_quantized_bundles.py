"""int8 / int4 weight-only bundles (`edgecpm export --quantize int8|int4`, DESIGN.md §14): the bundle
on onnxruntime (QuantMatMul rewritten to MatMulNBits, fp32 activations) against the torch model of
the same dequantized weights; GPTQ / AWQ codes kept exactly; manifest, inspect, refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import graph_feeds, rel_err
from test_quantized_import import write_quantized

import edgecpm

pytest.importorskip("onnxruntime")

PROMPT = [1, 17, 300, 5, 42, 99, 7, 250]
PARITY = 1e-4  # measured: ~1e-6 (MatMulNBits at accuracy_level 0 computes in fp32)


def dequantized_twin(ckpt_folder, out, mode, group_size, lm_head="int8"):
    """A float32 checkpoint whose linears and embedding / LM head (`lm_head`, the export's default)
    are what the bundle's codes stand for."""
    import torch
    from safetensors.torch import save_file

    from edgecpm.export.checkpoint import Checkpoint, expected_shapes
    from edgecpm.export.quantize import MODES, HeadQuant, QuantPlan, dequantize

    ck = Checkpoint(ckpt_folder)
    plan = QuantPlan(ck, mode, group_size)
    head = None if lm_head == "dense" else HeadQuant(lm_head, ck.config.hidden_size)

    def tensor(name):
        return ck.tensor(name, torch.float32).numpy()

    tensors = {}
    for name in expected_shapes(ck.config):
        w = tensor(name)
        if name in plan.infos:
            w = dequantize(plan.codes(name, tensor), MODES[mode], w.shape[1])
        elif head is not None and name in ("model.embed_tokens.weight", "lm_head.weight"):
            w = dequantize(head.quantize(name, w), head.bits, w.shape[1])
        tensors[name] = torch.from_numpy(np.ascontiguousarray(w, np.float32))
    out.mkdir()
    cfg = json.loads((ckpt_folder / "config.json").read_text())
    cfg.pop("quantization_config", None)
    (out / "config.json").write_text(json.dumps(cfg))
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def _parity(bundle, ref):
    s, r = edgecpm.Session(bundle, backend="onnxruntime"), edgecpm.Session(ref, backend="torch")
    err = rel_err(s.logits(PROMPT), r.logits(PROMPT))
    tokens = s.generate(PROMPT, max_new_tokens=10, ignore_eos=True).token_ids
    assert tokens == r.generate(PROMPT, max_new_tokens=10, ignore_eos=True).token_ids
    return err


@pytest.mark.parametrize(("mode", "group"), [("int4", 32), ("int4", -1), ("int8", -1), ("int8", 32)])
def test_bundle_matches_the_dequantized_model(make_checkpoint, tmp_path, mode, group):
    from edgecpm.export.exporter import export_bundle

    ckpt = make_checkpoint()
    bundle = export_bundle(ckpt, tmp_path / "b", quantize=mode, quantize_group_size=group, progress=False)
    ref = dequantized_twin(ckpt, tmp_path / "ref", mode, group)
    err = _parity(bundle, ref)
    print(f"{mode} group {group}: onnxruntime vs torch of the dequantized weights, logits rel err {err:.2e}")
    assert err <= PARITY
    m = json.loads((bundle / "manifest.json").read_text())
    q = m["quantization"]
    assert m["custom_ops"] == ["QuantMatMul"] and q["mode"] == mode and q["sources"] == ["rtn"]
    assert q["count"] == 14 and q["sym"] is False
    head = m["lm_head"]  # int8 by default, one scale and zero per 128 inputs (the tiny model: per row)
    assert head["mode"] == "int8" and head["group_size"] == 64 and head["bits_per_weight"] == 8 + 40 / 64
    assert list(head["tensors"]) == ["model.embed_tokens.weight"]  # tied: stored once
    assert head["tensors"]["model.embed_tokens.weight"]["probe_top1_agreement"] > 0.9
    bits = int(mode[3:])
    k = 64  # the tiny model: the smallest input count (hidden size); down_proj has 128
    assert bits < q["bits_per_weight"] <= bits + (32 + bits) / (32 if group == 32 else k)
    # the lossy step is the quantizer's: the dequantized model is not the float one
    assert not np.allclose(edgecpm.Session(ref, backend="torch").logits(PROMPT),
                           edgecpm.Session(ckpt, backend="torch").logits(PROMPT), rtol=0, atol=1e-6)


@pytest.mark.parametrize(("mode", "group"), [("int4", 32), ("int8", -1)])
def test_rtn_within_half_a_step(make_checkpoint, mode, group):
    """Each stored weight is the nearest grid point: |W - Wq| <= s / 2 (asymmetric grid over [min, max]),
    read back through the bundle's byte layout."""
    import torch

    from edgecpm.export.checkpoint import Checkpoint
    from edgecpm.export.quantize import MODES, QuantPlan, dequantize

    ck = Checkpoint(make_checkpoint())
    plan = QuantPlan(ck, mode, group)
    for name, info in plan.infos.items():
        w = ck.tensor(name, torch.float32).numpy()
        c = plan.codes(name, lambda n: ck.tensor(n, torch.float32).numpy())
        n, k = info.shape
        step = np.repeat(c.scales, info.block_size, axis=1)
        err = np.abs(dequantize(c, MODES[mode], k) - w)
        assert (err <= step * (0.5 + 1e-5)).all(), name
        assert info.group_size == (k if group == -1 else group)


def test_lowering_matches_the_reference_function(make_checkpoint, tmp_path):
    """The graph as exported (QuantMatMul's reference body) and rewritten to MatMulNBits
    (runtimes/quant_lowering.py, what the onnxruntime backend loads) compute the same logits."""
    import onnx
    import onnxruntime as ort

    from edgecpm.export.exporter import export_bundle
    from edgecpm.runtimes.quant_lowering import lower_quant

    bundle = export_bundle(make_checkpoint(), tmp_path / "b", quantize="int4", quantize_group_size=32,
                           progress=False)
    feeds = graph_feeds(PROMPT)
    ref = ort.InferenceSession(str(bundle / "decoder.onnx"), providers=["CPUExecutionProvider"]).run(["logits"], feeds)
    model = onnx.load(str(bundle / "decoder.onnx"), load_external_data=False)
    assert lower_quant(model) == 15  # the decoder's linears and the int8 LM head
    assert not any(n.domain == "edgecpm" for n in model.graph.node) and not model.functions
    opts = ort.SessionOptions()
    opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(bundle))
    ours = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(
        ["logits"], feeds)
    assert rel_err(ours[0], ref[0]) <= PARITY
    assert rel_err(edgecpm.Session(bundle, backend="onnxruntime").logits(PROMPT), ref[0]) <= PARITY


@pytest.mark.parametrize(("kernel", "label", "bound"), [
    ("edgecpm", "edgecpm (", PARITY), ("matmulnbits", "MatMulNBits (fp32 activations)", PARITY),
    ("matmulnbits-int8act", "MatMulNBits (int8 activations)", 0.05)])
def test_each_quant_kernel_against_the_reference_function(make_checkpoint, tmp_path, monkeypatch, kernel, label,
                                                          bound):
    """What runs QuantMatMul on onnxruntime (EDGECPM_ORT_QUANT): edgecpm's kernel and MatMulNBits with
    fp32 activations equal the op's reference function; the int8-activation path is lossy (bounded
    loosely, and it must differ)."""
    import onnxruntime as ort

    from edgecpm.backends import open_backend
    from edgecpm.export.exporter import export_bundle

    bundle = export_bundle(make_checkpoint(), tmp_path / "b", quantize="int4", quantize_group_size=32,
                           progress=False)
    feeds = graph_feeds(PROMPT)
    ref = ort.InferenceSession(str(bundle / "decoder.onnx"), providers=["CPUExecutionProvider"]).run(["logits"], feeds)
    monkeypatch.setenv("EDGECPM_ORT_QUANT", kernel)
    if kernel == "edgecpm":
        from edgecpm.errors import BackendUnavailable
        from edgecpm.runtimes import onnxruntime_ops

        try:
            onnxruntime_ops.library()
        except BackendUnavailable as e:
            pytest.skip(f"edgecpm's onnxruntime kernel cannot be built here: {e}")
    assert open_backend(bundle, "onnxruntime").quant_kernel.startswith(label)
    err = rel_err(edgecpm.Session(bundle, backend="onnxruntime").logits(PROMPT), ref[0])
    assert err <= bound
    if kernel == "matmulnbits-int8act":
        assert err > 1e-6


@pytest.mark.parametrize(("method", "group", "kw"), [("gptq", 32, {"sym": False, "desc_act": True}),
                                                     ("gptq", -1, {"fmt": "gptq_v2"}), ("awq", 32, {})])
def test_gptq_awq_codes_kept_exactly(tmp_path, method, group, kw):
    from edgecpm.export.checkpoint import Checkpoint
    from edgecpm.export.exporter import export_bundle
    from edgecpm.export.quantize import QuantPlan, dequantize

    q, ref = write_quantized(tmp_path / "q", tmp_path / "ref", method, group, **kw)
    ck = Checkpoint(q)
    plan = QuantPlan(ck, "int4", None)
    for name, info in plan.infos.items():
        assert info.source == method and info.permuted == kw.get("desc_act", False)
        w = dequantize(plan.codes(name, None), 4, info.shape[1])
        assert np.array_equal(w, ck.dequantized(name)), name  # bit-exact: no re-quantization
    bundle = export_bundle(q, tmp_path / "b", quantize="int4", lm_head="dense", progress=False)
    m = json.loads((bundle / "manifest.json").read_text())["quantization"]
    assert m["sources"] == [method] and m["act_order"] == (14 if kw.get("desc_act") else 0)
    err = _parity(bundle, ref)
    print(f"{method} {kw}: int4 bundle on onnxruntime vs the checkpoint's dequantized twin, rel err {err:.2e}")
    assert err <= PARITY


def test_inspect_reports_bits_per_weight(make_checkpoint, tmp_path, capsys):
    from edgecpm.cli import main
    from edgecpm.export.exporter import export_bundle

    bundle = export_bundle(make_checkpoint(), tmp_path / "b", quantize="int4", quantize_group_size=32,
                           progress=False)
    assert main(["inspect", str(bundle)]) == 0
    out = capsys.readouterr().out
    assert "int4" in out and "bits per weight" in out and "group 32" in out and "rtn" in out


@pytest.mark.parametrize(("group", "words"), [(24, "multiple of 16"), (8, "multiple of 16"),
                                              (256, "does not divide")])
def test_bad_group_size_refused(make_checkpoint, tmp_path, group, words):
    from edgecpm.export.exporter import export_bundle

    with pytest.raises(ValueError, match=words):
        export_bundle(make_checkpoint(), tmp_path / "b", quantize="int4", quantize_group_size=group, progress=False)
    assert not (tmp_path / "b").exists()


def test_cli_export_int4(make_checkpoint, tmp_path):
    from edgecpm.cli import main

    out = tmp_path / "b"
    assert main(["export", str(make_checkpoint()), "-o", str(out), "--quantize", "int4", "--group-size", "32"]) == 0
    q = json.loads((out / "manifest.json").read_text())["quantization"]
    assert q["group_sizes"] == [32] and q["bits"] == [4]


def test_int8_head_of_a_ternary_bundle_runs_on_edgecpm_kernel_with_matmulnbits_ternary(make_checkpoint, tmp_path):
    """Ternary linears on MatMulNBits still leave the int8 LM head to edgecpm's kernel (onnxruntime's
    8-bit MatMulNBits with fp32 activations is the slow path); only the ternary reference check
    mode keeps the library out, and then a warning names the slow path."""
    import warnings

    from test_ternary import ternarize_checkpoint

    from edgecpm.bundle import load_bundle
    from edgecpm.errors import BackendUnavailable
    from edgecpm.export.exporter import export_bundle
    from edgecpm.runtimes import onnxruntime_ops
    from edgecpm.runtimes.onnxruntime import OnnxRuntimeBackend

    try:
        isa = onnxruntime_ops.isa(onnxruntime_ops.library())
    except BackendUnavailable as e:
        pytest.skip(f"edgecpm's onnxruntime kernel cannot be built here: {e}")
    if isa == "scalar":
        pytest.skip("edgecpm's kernel has no vector path here")
    ckpt = ternarize_checkpoint(make_checkpoint(dtype="bf16", tie=False), tmp_path / "c", "K")
    bundle = load_bundle(export_bundle(ckpt, tmp_path / "b", progress=False))
    b = OnnxRuntimeBackend(bundle, ternary="matmulnbits")
    assert b.ternary_kernel.startswith("MatMulNBits") and b.quant_kernel == f"edgecpm ({isa})"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        b = OnnxRuntimeBackend(bundle, ternary="reference")
    assert b.quant_kernel == "MatMulNBits (fp32 activations)"
    assert any("8-bit MatMulNBits" in str(w.message) for w in caught)
