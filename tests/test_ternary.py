"""BitCPM4 ternary weights: the packed format, exact detection, the torch and ONNX ops, and
ternary checkpoints exported to bundles that match the fp32 dequantized reference."""

from __future__ import annotations

import doctest
import json
import os
import shutil

import numpy as np
import pytest
from conftest import rel_err, ternary_graph

from edgecpm import ternary_format
from edgecpm.errors import CheckpointError
from edgecpm.export import ternary
from edgecpm.export.ternary import MIN_GROUP, detect, explain, quantize
from edgecpm.ternary_format import dequantize, encode, pack, unpack

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")


def bf16(w: np.ndarray) -> np.ndarray:
    """The float32 values of w rounded to bf16, as a BitCPM4 checkpoint stores them."""
    return torch.from_numpy(np.asarray(w, np.float32)).to(torch.bfloat16).float().numpy()


def next_bf16(x: float) -> np.float32:
    """The bf16 value one ulp above x (away from zero for x != 0; the smallest subnormal for 0)."""
    bits = np.array([x], np.float32).view(np.uint32) + np.uint32(1 << 16)
    return bits.view(np.float32)[0]


def random_ternary(rng, n, k, group_size) -> np.ndarray:
    """A fake-quantized bf16 weight: quantize() of N(0, 0.05); group_size None = one scale per tensor."""
    return bf16(quantize(rng.normal(0, 0.05, (n, k)), group_size))


# ---- the format ---------------------------------------------------------------------------------
def test_worked_example_in_the_docstring():
    result = doctest.testmod(ternary_format)  # the format (device side)
    assert result.attempted >= 6 and result.failed == 0
    result = doctest.testmod(ternary)  # detection (export side)
    assert result.attempted >= 4 and result.failed == 0


def test_worked_example_words_by_hand():
    # Row 1 of the docstring's example: codes 1 2 0 1 | 1 1 1 1 | 2 2 2 2 | 1 0 1 1, then 1 1 1 0 + padding.
    codes = np.array([[1, 2, 0, 1, 1, 1, 1, 1, 2, 2, 2, 2, 1, 0, 1, 1, 1, 1, 1, 0]], np.uint8)
    by_hand = [sum(int(c) << (2 * i) for i, c in enumerate(codes[0, :16])),
               sum(int(c) << (2 * i) for i, c in enumerate(list(codes[0, 16:]) + [1] * 12))]
    assert pack(codes).tolist() == [by_hand] == [[0x51AA5549, 0x55555515]]


@pytest.mark.parametrize("shape", [(1, 1), (3, 15), (5, 16), (7, 17), (4, 33), (2, 100), (9, 1024)])
def test_pack_unpack_identity(shape):
    codes = np.random.default_rng(sum(shape)).integers(0, 3, shape).astype(np.uint8)
    packed = pack(codes)
    assert packed.dtype == np.uint32 and packed.shape == (shape[0], -(-shape[1] // 16))
    assert np.array_equal(unpack(packed, shape[1]), codes)
    pad = unpack(packed, packed.shape[1] * 16)[:, shape[1]:]
    assert (pad == 1).all()  # padding codes are 1: zero weight


# ---- detection ----------------------------------------------------------------------------------
@pytest.mark.parametrize("k, group_size, granularity", [(96, None, "tensor"), (96, 96, "row"), (96, 32, "group"),
                                                        (192, 64, "group"), (80, 80, "row")])
def test_detect_granularity_and_exact_encoding(k, group_size, granularity):
    w = random_ternary(np.random.default_rng(1), 24, k, group_size)
    info = detect(w)
    assert info.granularity == granularity and info.group_size == (group_size or k)
    codes, scales = encode(w, info.group_size)
    assert np.array_equal(dequantize(pack(codes), scales, w.shape[1]), w)  # bit-exact


def test_all_zero_group_fits_any_scale():
    w = random_ternary(np.random.default_rng(2), 8, 64, 32)
    w[3, 32:] = 0  # one group with no nonzero weight
    info = detect(w)
    assert (info.granularity, info.group_size) == ("group", 32)
    codes, scales = encode(w, 32)
    assert scales[3, 1] == 0 and (codes[3, 32:] == 1).all()


@pytest.mark.parametrize("group_size", [None, 64, 32])
@pytest.mark.parametrize("zero", [False, True])
def test_one_ulp_makes_a_tensor_non_ternary(group_size, zero):
    w = random_ternary(np.random.default_rng(3), 16, 64, group_size)
    assert detect(w) is not None
    r, c = np.argwhere(w == 0)[5] if zero else np.argwhere(w != 0)[5]
    w[r, c] = next_bf16(w[r, c])
    assert detect(w) is None
    why = explain(w)
    assert f"row {r}, inputs {c // MIN_GROUP * MIN_GROUP}.." in why and "2 distinct nonzero magnitudes" in why


def test_ordinary_weights_are_not_ternary():
    w = bf16(np.random.default_rng(4).normal(0, 0.05, (8, 64)))
    assert detect(w) is None and "32 distinct nonzero magnitudes" in explain(w)
    w[0, 0] = np.nan
    assert "row 0, input 0 is nan" in explain(w)


def test_quantize_is_the_bitcpm_formula():
    w = np.array([[0.3, -0.05, 0.1, -0.9], [0.0, 0.0, 0.0, 0.0]], np.float32)
    s = np.float32(1.35 / 4)  # mean |W| of row 0
    assert np.allclose(quantize(w, 4), [[s, 0, 0, -s], [0, 0, 0, 0]])  # an all-zero row stays zero
    assert detect(quantize(w, 4)).granularity == "tensor"  # the zero row fits the one scale


# ---- the torch op and the ONNX op ---------------------------------------------------------------
@pytest.mark.parametrize("n, k, g, dtype", [(7, 40, 20, torch.float32), (64, 128, 32, torch.float32),
                                            (5, 48, 48, torch.float16)])
def test_torch_op_matches_dequantized_matmul(n, k, g, dtype):
    rng = np.random.default_rng(n)
    packed = pack(rng.integers(0, 3, (n, k)).astype(np.uint8))
    scales = (rng.random((n, k // g)) + 0.1).astype(np.float32)
    x = torch.from_numpy(rng.standard_normal((3, k)).astype(np.float32)).to(dtype)
    args = (x, torch.from_numpy(packed.view(np.int32)), torch.from_numpy(scales).to(dtype), k, g)
    y = ternary.ternary_matmul(*args)
    ref = x.double() @ torch.from_numpy(dequantize(packed, scales, k)).to(dtype).double().T
    assert y.dtype == dtype and rel_err(y.double(), ref) <= (1e-6 if dtype == torch.float32 else 1e-3)
    torch.library.opcheck(torch.ops.edgecpm.ternary_matmul, args)


# Relative error bound of each onnxruntime lowering (runtimes/ternary_lowering.py) on the rows below
# (one has a 300-sigma outlier), fp32 activations: the reference function and 3 int8 digits are
# fp32-level; 2 digits ("int16") and 1 ("int8") round each activation to ~2^-16 and ~2^-8 of its
# block's largest one, so the outlier's block costs them more than random rows do.
LOWERING_TOLERANCE = {"reference function": 1e-6, 3: 1e-6, 2: 5e-4, 1: 3e-2}


@pytest.mark.parametrize("lowering", list(LOWERING_TOLERANCE))
@pytest.mark.parametrize("n, k, g, dtype", [(7, 40, 20, np.float32), (64, 128, 32, np.float32),
                                            (24, 384, 384, np.float32), (5, 48, 48, np.float16)])
def test_onnx_lowerings_match_dequantized_matmul(lowering, n, k, g, dtype, tmp_path):
    import onnxruntime as ort

    from edgecpm.runtimes.ternary_lowering import lower_ternary

    rng = np.random.default_rng(k)
    packed = pack(rng.integers(0, 3, (n, k)).astype(np.uint8))
    scales = (rng.random((n, k // g)) + 0.1).astype(dtype)
    model = ternary_graph(dtype, [(n, g, packed, scales)], k)
    block = ternary_format.matmulnbits_block(g)
    if lowering != "reference function":  # what the onnxruntime backend does to a bundle's TernaryMatMul nodes
        assert lower_ternary(model, tmp_path, digits=lowering) == (block is not None)
        if block is None:
            pytest.skip(f"MatMulNBits blocks are multiples of 16; group size {g} is not (the node kept its function)")
        assert [nd.op_type for nd in model.graph.node].count("MatMulNBits") == 1 and not model.functions
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    w = dequantize(packed, scales, k)
    # One-hot rows read the dequantized weight back: exactly through the reference function, to
    # fp32 rounding through MatMulNBits (127 * (1 / 127) on its int8 grid; its zero point is
    # subtracted in float).
    eye = session.run(None, {"x": np.eye(k, dtype=dtype)})[0].astype(np.float32)
    if lowering == "reference function":
        assert np.array_equal(eye, w.T)
    else:
        assert rel_err(eye, w.T) <= (1e-6 if dtype == np.float32 else 1e-3)
    x = rng.standard_normal((4, k)).astype(dtype)
    x[1, 3] = 300  # an outlier, as LLM activations have
    x[2, :16] = 0  # an all-zero block
    y = session.run(None, {"x": x})[0]
    tol = LOWERING_TOLERANCE[lowering] if dtype == np.float32 else max(LOWERING_TOLERANCE[lowering], 1e-3)
    assert rel_err(y, x.astype(np.float64) @ w.T) <= tol
    if lowering in (2, 1):  # really rounded activations: not the fp32 path in disguise
        assert rel_err(y, x.astype(np.float64) @ w.T) > 1e-7


def test_linears_reading_one_activation_share_one_matmulnbits_call(tmp_path):
    """q/k/v and gate/up read the same input: one MatMulNBits call (weights concatenated along N,
    each with its own group size) and a Split, with one set of digit rows."""
    import onnxruntime as ort

    from edgecpm.runtimes.ternary_lowering import lower_ternary

    rng = np.random.default_rng(0)
    k = 256
    linears = [(n, g, pack(rng.integers(0, 3, (n, k)).astype(np.uint8)),
                (rng.random((n, k // g)) + 0.1).astype(np.float32))
               for n, g in [(64, 256), (16, 128), (16, 64)]]
    model = ternary_graph(np.float32, linears, k)
    assert lower_ternary(model, tmp_path) == 3
    ops = [nd.op_type for nd in model.graph.node]
    assert ops.count("MatMulNBits") == 1 and ops.count("Split") == 1 and ops.count("Round") == 2  # 3 digits
    x = rng.standard_normal((3, k)).astype(np.float32)
    ys = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    for y, (n, _g, packed, scales) in zip(ys, linears, strict=True):
        assert y.shape == (3, n)
        assert rel_err(y, x.astype(np.float64) @ dequantize(packed, scales, k).T) <= 1e-6


# ---- ternary checkpoints -> bundles -------------------------------------------------------------
GRANULARITIES = {"tensor": None, "row": "K", "group": 32}


def ternarize_checkpoint(src, dst, group_size, perturb: str | None = None):
    """A copy of checkpoint src whose linear weights are fake-quantized bf16 (like BitCPM4);
    perturb: one tensor whose one weight moves by one bf16 ulp."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    (dst / "model.safetensors").chmod(0o644)
    tensors = load_file(str(dst / "model.safetensors"))
    cfg = json.loads((dst / "config.json").read_text())
    for name in ternary.linear_names(cfg["num_hidden_layers"]):
        w = tensors[name].float().numpy()
        w = quantize(w, w.shape[1] if group_size == "K" else group_size)
        if name == perturb:
            w[1, 2] = next_bf16(bf16(w)[1, 2])
        tensors[name] = torch.from_numpy(w).to(torch.bfloat16)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def greedy(model, ids, n):
    """Greedy tokens of a torch model, recomputing the whole sequence each step (no cache)."""
    ids = list(ids)
    for _ in range(n):
        with torch.no_grad():
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[-n:]


@pytest.fixture(scope="module")
def ternary_checkpoints(make_checkpoint, tmp_path_factory):
    src = make_checkpoint(dtype="bf16", tie=False)
    root = tmp_path_factory.mktemp("ternary")
    return {name: ternarize_checkpoint(src, root / name, g) for name, g in GRANULARITIES.items()}


@pytest.mark.parametrize("granularity", list(GRANULARITIES))
def test_ternary_checkpoint_to_bundle_parity(granularity, ternary_checkpoints, tmp_path):
    import edgecpm
    from edgecpm.bundle import load_bundle
    from edgecpm.export.checkpoint import load_model
    from edgecpm.export.exporter import export_bundle
    from edgecpm.export.modeling_minicpm import TernaryLinear
    from edgecpm.runtimes.onnxruntime import OnnxRuntimeBackend

    ckpt = ternary_checkpoints[granularity]
    ids = [1, *range(7, 40, 3)]
    dense = load_model(ckpt, "fp32", ternary=False)  # the fp32 dequantized reference
    with torch.no_grad():
        ref_logits = dense(torch.tensor([ids])).logits[0].numpy()
    ref_tokens = greedy(dense, ids, 8)

    on_torch = edgecpm.Session(ckpt, backend="torch")
    assert isinstance(on_torch.backend.model.model.layers[1].mlp.down_proj, TernaryLinear)
    bundle = export_bundle(ckpt, tmp_path / "b", progress=False, lm_head="dense")  # the int8 head: below
    # onnxruntime: edgecpm's kernel where it can be built (runtimes/onnxruntime_ops.cpp), MatMulNBits
    # on 3 int8 digits of the activations (runtimes/ternary_lowering.py), the op's reference function.
    on_ort = [edgecpm.Session.from_backend(OnnxRuntimeBackend(load_bundle(bundle), ternary=kernel))
              for kernel in ("auto", "matmulnbits", "reference")]
    assert on_ort[1].backend.ternary_kernel == "MatMulNBits (3 int8 digits)"
    if os.environ.get("EDGECPM_REQUIRE_ORT_OPS"):  # CI builds edgecpm's kernel: "auto" must have run it
        assert on_ort[0].backend.ternary_kernel.startswith("edgecpm ("), on_ort[0].backend.ternary_kernel
    for s in (on_torch, *on_ort):
        assert rel_err(s.logits(ids), ref_logits) <= 1e-4
        assert s.generate(ids, max_new_tokens=8, ignore_eos=True).token_ids == ref_tokens

    m = json.loads((bundle / "manifest.json").read_text())
    t = m["ternary"]
    assert m["custom_ops"] == ["TernaryMatMul"] and t["op"] == "TernaryMatMul" and t["count"] == 14
    assert t["granularities"] == [granularity]
    assert t["group_sizes"] == {"tensor": [64, 128], "row": [64, 128], "group": [32]}[granularity]
    # 2 bits per weight + one fp32 scale per group (or row).
    assert t["packed_bytes"] == t["weights"] // 4
    assert t["bits_per_weight"] == pytest.approx(8 * (t["packed_bytes"] + t["scale_bytes"]) / t["weights"])
    if granularity == "group":
        assert t["bits_per_weight"] == 2 + 32 / 32
    # Session.memory() reports the bundle's weights: the dense ones shrank to the packed bytes.
    dense_linear = 4 * t["weights"]
    full = sum(p.numel() * 4 for p in dense.parameters())
    assert on_ort[0].memory()["weights_bytes"] <= full - dense_linear + t["packed_bytes"] + t["scale_bytes"] + 64 * 4096
    assert on_torch.memory()["weights_bytes"] == full - dense_linear + t["packed_bytes"] + t["scale_bytes"]


@pytest.mark.parametrize("head", ["int8", "int4"])
def test_ternary_bundle_quantizes_embedding_and_lm_head(head, ternary_checkpoints, tmp_path):
    """int8 by default (--lm-head): an untied checkpoint's embedding and LM head each stored as codes;
    the bundle equals the model whose two matrices are the dequantized codes."""
    import edgecpm
    from edgecpm.export.checkpoint import load_model
    from edgecpm.export.exporter import export_bundle
    from edgecpm.export.quantize import HeadQuant, dequantize

    ckpt = ternary_checkpoints["row"]
    ids = [1, *range(7, 40, 3)]
    b = export_bundle(ckpt, tmp_path / "b", progress=False, lm_head=None if head == "int8" else head)
    m = json.loads((b / "manifest.json").read_text())
    assert m["custom_ops"] == ["QuantMatMul", "TernaryMatMul"] and m["lm_head"]["mode"] == head
    assert sorted(m["lm_head"]["tensors"]) == ["lm_head.weight", "model.embed_tokens.weight"]
    model = load_model(ckpt, ternary=False)
    state = model.state_dict()
    hq = HeadQuant(head, state["lm_head.weight"].shape[1])
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        w = state[name].numpy()
        state[name].copy_(torch.from_numpy(dequantize(hq.quantize(name, w), hq.bits, w.shape[1])))
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    s = edgecpm.Session(b)
    assert rel_err(s.logits(ids), ref) <= 1e-4
    assert s.generate(ids, max_new_tokens=8, ignore_eos=True).token_ids == greedy(model, ids, 8)


def test_fp16_ternary_bundle(ternary_checkpoints, tmp_path):
    import edgecpm
    from edgecpm.export.checkpoint import load_model
    from edgecpm.export.exporter import export_bundle

    ckpt = ternary_checkpoints["row"]
    ids = [1, *range(7, 40, 3)]
    with torch.no_grad():
        ref = load_model(ckpt, ternary=False)(torch.tensor([ids])).logits[0].numpy()
    b = export_bundle(ckpt, tmp_path / "b", dtype="fp16", progress=False, lm_head="dense")
    # 2 layers x 512 output rows (q 64, k 32, v 32, o 64, gate 128, up 128, down 64) x one fp16 scale
    assert json.loads((b / "manifest.json").read_text())["ternary"]["scale_bytes"] == 2 * 512 * 2
    assert rel_err(edgecpm.Session(b).logits(ids), ref) <= 2e-3  # fp16 activations


def test_one_ulp_off_tensor_is_refused_by_name(make_checkpoint, tmp_path):
    import edgecpm
    from edgecpm.export.checkpoint import load_model
    from edgecpm.export.exporter import export_bundle

    bad = "model.layers.1.self_attn.o_proj.weight"
    ckpt = ternarize_checkpoint(make_checkpoint(dtype="bf16", tie=False), tmp_path / "c", "K", perturb=bad)
    why = rf"{bad}: not ternary \(row 1, inputs 0..31, has 2 distinct nonzero magnitudes .*13 of the 14"
    with pytest.raises(CheckpointError, match=why):
        export_bundle(ckpt, tmp_path / "b", progress=False)
    assert not (tmp_path / "b").exists()
    with pytest.raises(CheckpointError, match=why):
        load_model(ckpt)
    # Asked explicitly: that tensor is ternarized (lossy), the others are packed exactly as found.
    b = export_bundle(ckpt, tmp_path / "q", progress=False, quantize="ternary")
    t = json.loads((b / "manifest.json").read_text())["ternary"]["tensors"]
    assert t[bad]["lossy"] and sum(x["lossy"] for x in t.values()) == 1
    # Or kept dense: no ternary section, and the same logits as the dense torch model.
    b = export_bundle(ckpt, tmp_path / "n", progress=False, quantize="none")
    assert json.loads((b / "manifest.json").read_text())["ternary"] is None
    ids = [1, 5, 9, 13]
    with torch.no_grad():
        ref = load_model(ckpt, ternary=False)(torch.tensor([ids])).logits[0].numpy()
    assert rel_err(edgecpm.Session(b).logits(ids), ref) <= 1e-5


def test_quantize_ternary_export_equals_quantized_reference(make_checkpoint, tmp_path):
    """--quantize ternary on an ordinary checkpoint: the bundle computes exactly quantize(W)."""
    import edgecpm
    from edgecpm.export.checkpoint import load_model
    from edgecpm.export.exporter import export_bundle

    ckpt = make_checkpoint(tie=False)
    b = export_bundle(ckpt, tmp_path / "b", progress=False, quantize="ternary", quantize_group_size=32,
                      lm_head="dense")
    t = json.loads((b / "manifest.json").read_text())["ternary"]
    assert t["group_sizes"] == [32] and all(x["lossy"] for x in t["tensors"].values())
    with pytest.raises(CheckpointError, match=r"ternary=True, but .* distinct nonzero magnitudes"):
        load_model(ckpt, ternary=True)
    model = load_model(ckpt, ternary=False)
    state = model.state_dict()
    for name in ternary.linear_names(2):
        state[name].copy_(torch.from_numpy(quantize(state[name].numpy(), 32)))
    ids = [1, 4, 8, 15, 16, 23, 42]
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    assert rel_err(edgecpm.Session(b).logits(ids), ref) <= 1e-4


def test_cli_inspect_and_export_quantize(ternary_checkpoints, make_checkpoint, tmp_path, capsys):
    from edgecpm.cli import main

    ckpt = ternary_checkpoints["row"]
    assert main(["inspect", str(ckpt), "--json"]) == 0
    t = json.loads(capsys.readouterr().out)["ternary"]
    assert t["ternary"] and t["count"] == 14 and t["granularities"] == ["row"]
    assert main(["inspect", str(ckpt)]) == 0
    assert "one scale per output row" in capsys.readouterr().out
    plain = make_checkpoint(tie=False)
    assert main(["inspect", str(plain), "--json"]) == 0
    t = json.loads(capsys.readouterr().out)["ternary"]
    assert not t["ternary"] and "distinct nonzero magnitudes" in t["reason"]
    assert main(["export", str(plain), "-o", str(tmp_path / "b"), "--quantize", "ternary"]) == 0
    assert main(["inspect", str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    assert "14 linear weights" in out and "lossy" in out


def test_faster_activation_modes_are_opt_in_and_bounded(ternary_checkpoints, make_checkpoint, tmp_path):
    """ternary_activations="int16" (2 int8 digits) stays within the exactness bar of the parity test
    (1e-4, same greedy tokens); "int8" (onnxruntime's own int8 rounding) is lossy but close."""
    import edgecpm
    from edgecpm.export.exporter import export_bundle

    ckpt = ternary_checkpoints["row"]
    ids = [1, *range(7, 60, 3)]
    exact = edgecpm.Session(export_bundle(ckpt, tmp_path / "exact", progress=False))
    ref, ref_tokens = exact.logits(ids), exact.generate(ids, max_new_tokens=8, ignore_eos=True).token_ids
    for mode, (low, high) in {"int16": (1e-8, 1e-4), "int8": (1e-6, 2e-2)}.items():
        b = export_bundle(ckpt, tmp_path / mode, progress=False, ternary_activations=mode)
        assert json.loads((b / "manifest.json").read_text())["ternary"]["activations"] == mode
        s = edgecpm.Session(b)
        err = rel_err(s.logits(ids), ref)
        assert low < err < high, (mode, err)  # really another computation, and within its bound
        if mode == "int16":
            assert s.generate(ids, max_new_tokens=8, ignore_eos=True).token_ids == ref_tokens
        else:
            assert (s.logits(ids).argmax(-1) == ref.argmax(-1)).mean() >= 0.9
    with pytest.raises(ValueError, match="applies to ternary linear weights"):
        export_bundle(make_checkpoint(), tmp_path / "dense", progress=False, ternary_activations="int8")
