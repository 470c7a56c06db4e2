"""`edgecpm build` and the tensorrt backend, host side (CPU only, no TensorRT): engine naming, the
"built for another GPU / TensorRT" refusal, profile planning, the graph rewrite for TensorRT's
parser, the manifest record, plugin library lookup (edgecpm.runtimes.tensorrt_engines: what runs
on the device; edgecpm.export.trt_build: the build), KV compaction copies, and the errors that say
what to install."""

from __future__ import annotations

import importlib.util
import itertools
import json
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgecpm.bundle import load_bundle, write_manifest
from edgecpm.errors import BackendUnavailable, ConfigError
from edgecpm.export import trt_build as tb
from edgecpm.runtimes import tensorrt_engines as te
from edgecpm.runtimes.tensorrt import compaction_copies, is_causal

pytest.importorskip("torch")
from edgecpm.export.exporter import export_bundle

HAVE_TRT = importlib.util.find_spec("tensorrt") is not None
SPARSE = {"dense_len": 512, "window_size": 128, "topk": 2}
EIGHT_B_STYLE = {"hidden_size": 2048, "num_attention_heads": 16, "num_key_value_heads": 1,
                 "intermediate_size": 256, "num_hidden_layers": 2, "rms_norm_eps": 1e-6}


@pytest.fixture(scope="module")
def dense_bundle(make_checkpoint, tmp_path_factory):
    return export_bundle(make_checkpoint(), tmp_path_factory.mktemp("trt") / "dense", progress=False)


@pytest.fixture(scope="module")
def sparse_bundle(make_checkpoint, tmp_path_factory):
    ckpt = make_checkpoint(tie=False, sparse_config=SPARSE, **EIGHT_B_STYLE)
    return export_bundle(ckpt, tmp_path_factory.mktemp("trt") / "sparse", progress=False)


# ---- names and identity checks -----------------------------------------------------------------------
def test_engine_filename():
    assert te.engine_filename("NVIDIA H100 80GB HBM3", "10.3.0") == "nvidia-h100-80gb-hbm3-trt10.3.0.engine"
    assert te.engine_filename("Orin (nvgpu)", "10.3.0.30") == "orin-nvgpu-trt10.3.0.30.engine"
    assert te.engine_filename("NVIDIA Thor", "10.13.3") == "nvidia-thor-trt10.13.3.engine"


def test_engine_refused_for_another_gpu_or_tensorrt():
    rec = {"file": "engines/orin-trt10.3.0.engine", "gpu": "Orin (nvgpu)", "compute_capability": "8.7",
           "tensorrt": "10.3.0"}
    assert te.engine_mismatch(rec, "Orin (nvgpu)", "8.7", "10.3.0") is None
    why = te.engine_mismatch(rec, "Orin (nvgpu)", "8.7", "10.7.0")
    assert "TensorRT 10.3.0" in why and "10.7.0" in why and rec["file"] in why
    why = te.engine_mismatch(rec, "NVIDIA Thor", "11.0", "10.3.0")
    assert "Orin (nvgpu)" in why and "NVIDIA Thor" in why and "8.7" in why
    thor = {**rec, "file": "engines/thor.engine", "gpu": "NVIDIA Thor", "compute_capability": "11.0"}
    found, refused = te.find_engine({"engines": [rec, thor]}, "NVIDIA Thor", "11.0", "10.3.0")
    assert found is thor and len(refused) == 1 and "Orin" in refused[0]
    found, refused = te.find_engine({"engines": [rec]}, "NVIDIA Thor", "11.0", "10.3.0")
    assert found is None and len(refused) == 1
    assert te.find_engine({}, "x", "8.7", "10.3.0") == (None, [])


# ---- profiles ------------------------------------------------------------------------------------------
def test_profiles_from_manifest(dense_bundle):
    manifest = load_bundle(dense_bundle).manifest
    max_pos = manifest["config"]["max_position_embeddings"]
    prefill, decode = tb.plan_profiles(manifest, max_prefill=512, max_verify=64)
    assert prefill["name"] == "prefill" and prefill["dims"]["T"] == [1, 512, 512]
    assert decode["name"] == "decode" and decode["dims"]["T"] == [1, 1, 64]
    for p in (prefill, decode):
        assert p["dims"]["P"][0] == 0 and p["dims"]["P"][2] == max_pos - 1
        assert p["dims"]["N"][0] == 0  # prefill chunks before the last ask for no logits
        assert "C" not in p["dims"]  # dense: no compressed keys

    shapes = tb.profile_shapes(manifest["graphs"]["decoder"]["inputs"], decode)
    assert set(shapes) == {d["name"] for d in manifest["graphs"]["decoder"]["inputs"]}
    hkv, d = manifest["config"]["num_key_value_heads"], 64 // 4
    assert shapes["input_ids"] == ((1, 1), (1, 1), (1, 64))
    assert shapes["attn_mask"] == ((1, 1), (1, 1), (64, 64))
    assert shapes["logit_index"] == ((0,), (1,), (64,))
    assert shapes["past_key.0"] == ((0, hkv, d), ((max_pos - 1) // 2, hkv, d), (max_pos - 1, hkv, d))

    small = tb.plan_profiles(manifest, max_prefill=128, max_verify=16, max_context=1024)
    assert small[0]["dims"]["P"] == [0, 511, 1023] and small[1]["dims"]["T"] == [1, 1, 16]


@pytest.mark.parametrize("kw, msg", [
    ({"max_prefill": 64, "max_verify": 128}, "max_verify"),
    ({"max_verify": 0}, "max_verify"),
    ({"max_context": 10**9}, "max-context"),
    ({"max_context": 100, "max_prefill": 512}, "max-prefill"),
])
def test_bad_profile_arguments(dense_bundle, kw, msg):
    with pytest.raises(ConfigError, match=msg):
        tb.plan_profiles(load_bundle(dense_bundle).manifest, **kw)


def test_sparse_profiles_bound_compressed_keys(sparse_bundle):
    manifest = load_bundle(sparse_bundle).manifest
    sp = manifest["sparse"]
    for p in tb.plan_profiles(manifest, max_context=4096):
        assert p["dims"]["C"] == [te.n_chunks(v, sp) for v in p["dims"]["P"]]
        assert p["dims"]["C"][2] == (4095 - sp["kernel_size"]) // sp["kernel_stride"] + 1
    shapes = tb.profile_shapes(manifest["graphs"]["decoder"]["inputs"], tb.plan_profiles(manifest)[1])
    assert shapes["past_ckey.0"][0][0] == 0


def test_profile_selection_by_step_size(dense_bundle):
    profiles = tb.plan_profiles(load_bundle(dense_bundle).manifest, max_prefill=512, max_verify=64, max_context=2048)
    assert te.select_profile(profiles, 1, 100) == 1  # decode
    assert te.select_profile(profiles, 64, 0) == 1  # a verify tree
    assert te.select_profile(profiles, 65, 0) == 0  # prefill chunk
    assert te.select_profile(profiles, 512, 1000) == 0
    with pytest.raises(ConfigError, match="outside the engine's profiles"):
        te.select_profile(profiles, 513, 0)
    with pytest.raises(ConfigError, match="max-context"):
        te.select_profile(profiles, 1, 2048)


# ---- the graph rewrite -----------------------------------------------------------------------------------
def _topologically_sorted(graph) -> bool:
    known = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    for node in graph.node:
        if any(name not in known for name in node.input):
            return False
        known.update(node.output)
    return True


def test_rewrite_strips_functions_and_casts_plugin_inputs(sparse_bundle):
    model = onnx.load(str(sparse_bundle / "decoder.onnx"), load_external_data=False)
    n_nodes = len(model.graph.node)
    assert [f.name for f in model.functions] == ["InfLLMv2Attention"]
    changes = tb.prepare_for_tensorrt(model)
    assert changes["functions_removed"] == ["InfLLMv2Attention"] and not model.functions
    # One int32 Cast per source (positions, attn_mask), shared by both layers' nodes.
    assert len(changes["casts"]) == 2 and len(model.graph.node) == n_nodes + 2
    attn = [n for n in model.graph.node if n.op_type == "InfLLMv2Attention"]
    assert len(attn) == 2 and all(n.domain == "edgecpm" for n in attn)
    casts = {n.output[0]: n for n in model.graph.node if n.name.startswith("edgecpm_trt_cast")}
    for node in attn:
        assert node.input[6] in casts and node.input[7] in casts
        assert {a.name: a.i for a in node.attribute}["kernel_stride"] == 16
        assert {a.name: a.s for a in node.attribute}["plugin_version"] == b"1"
    assert all(helper.get_attribute_value(c.attribute[0]) == TensorProto.INT32 for c in casts.values())
    assert _topologically_sorted(model.graph)
    # Weights stay external (the file is small).
    assert all(t.data_location == TensorProto.EXTERNAL for t in model.graph.initializer if t.dims and
               np.prod(t.dims) > 1024)


def test_rewritten_graph_keeps_external_data_valid(sparse_bundle):
    path, _ = tb.write_trt_graph(sparse_bundle, "decoder.onnx")
    try:
        assert path.parent == sparse_bundle and path.name == tb.TRT_GRAPH
        assert path.stat().st_size < (sparse_bundle / "decoder.onnx.data").stat().st_size
        model = onnx.load(str(path))  # resolves decoder.onnx.data next to it
        original = onnx.load(str(sparse_bundle / "decoder.onnx"))
        a = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        b = {t.name: numpy_helper.to_array(t) for t in original.graph.initializer}
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    finally:
        path.unlink()
    load_bundle(sparse_bundle, verify=True)  # the bundle itself is untouched


def test_dense_graph_rewrite_is_a_no_op(dense_bundle):
    model = onnx.load(str(dense_bundle / "decoder.onnx"), load_external_data=False)
    before = model.SerializeToString()
    assert tb.prepare_for_tensorrt(model) == {"functions_removed": [], "casts": [], "retyped": []}
    assert model.SerializeToString() == before


def _ternary_model(packed: TensorProto) -> onnx.ModelProto:
    node = helper.make_node("TernaryMatMul", ["x", packed.name, "scales"], ["y"], domain="edgecpm", in_features=32,
                            group_size=32, plugin_version="1", plugin_namespace="")
    scales = numpy_helper.from_array(np.ones((3, 1), np.float32), "scales")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])], [packed, scales])
    fn = helper.make_function("edgecpm", "TernaryMatMul", ["x", "packed", "scales"], ["y"], [], [])
    return helper.make_model(graph, functions=[fn], opset_imports=[helper.make_opsetid("", 17),
                                                                   helper.make_opsetid("edgecpm", 1)])


@pytest.mark.parametrize("form", ["raw", "uint64_data"])
def test_ternary_codes_retyped_to_int32(form):
    codes = np.array([[0x12345678, 0xFFFFFFFF], [0, 0x80000000], [1, 2]], np.uint32)
    if form == "raw":
        packed = numpy_helper.from_array(codes, "packed")
    else:
        packed = helper.make_tensor("packed", TensorProto.UINT32, codes.shape, codes.flatten().tolist())
    model = _ternary_model(packed)
    changes = tb.prepare_for_tensorrt(model)
    assert changes["retyped"] == ["packed"] and changes["functions_removed"] == ["TernaryMatMul"]
    t = next(t for t in model.graph.initializer if t.name == "packed")
    assert t.data_type == TensorProto.INT32
    assert np.array_equal(numpy_helper.to_array(t).view(np.uint32), codes)


# ---- manifest record ----------------------------------------------------------------------------------
def test_engine_record_in_manifest(dense_bundle, tmp_path):
    import shutil

    bundle = shutil.copytree(dense_bundle, tmp_path / "b")
    manifest = load_bundle(bundle).manifest
    rec = {"file": "engines/orin-nvgpu-trt10.3.0.engine", "gpu": "Orin (nvgpu)", "compute_capability": "8.7",
           "tensorrt": "10.3.0", "size": 1, "sha256": "0" * 64}
    m1 = tb.record_engine(manifest, rec)
    assert "engines" not in manifest and m1["engines"] == [rec]  # the input is not modified
    newer = {**rec, "size": 2}
    other = {**rec, "file": "engines/thor-trt10.13.0.engine"}
    m2 = tb.record_engine(tb.record_engine(m1, other), newer)
    assert [e["file"] for e in m2["engines"]] == [other["file"], rec["file"]] and m2["engines"][1]["size"] == 2
    write_manifest(bundle, m2)
    assert not list(bundle.glob(".manifest.json.tmp*"))
    again = load_bundle(bundle, verify=True)  # still a valid bundle, files unchanged
    assert again.manifest["engines"] == m2["engines"]
    assert json.loads((bundle / "manifest.json").read_text())["files"] == manifest["files"]


def test_atomic_write_replaces_whole_file(tmp_path):
    path = tmp_path / "x.engine"
    tb.atomic_write_bytes(path, b"a" * 100)
    tb.atomic_write_bytes(path, b"b" * 10)
    assert path.read_bytes() == b"b" * 10 and [p.name for p in tmp_path.iterdir()] == ["x.engine"]


def test_peak_rss_is_reported_in_bytes():
    assert 10 * 2**20 < tb.peak_rss_bytes() < 2**40


# ---- plugin library lookup -------------------------------------------------------------------------------
def test_plugin_library_lookup(tmp_path, monkeypatch):
    monkeypatch.setattr(te, "REPO_ROOT", tmp_path)
    monkeypatch.delenv(te.PLUGIN_ENV, raising=False)
    assert te.find_plugin_library() is None
    built = tmp_path / "build" / "plugins" / te.PLUGIN_LIB_NAME
    built.parent.mkdir(parents=True)
    built.write_bytes(b"")
    assert te.find_plugin_library() == built
    preferred = tmp_path / "plugins" / "build" / te.PLUGIN_LIB_NAME
    preferred.parent.mkdir(parents=True)
    preferred.write_bytes(b"")
    assert te.find_plugin_library() == preferred
    monkeypatch.setenv(te.PLUGIN_ENV, str(built))
    assert te.find_plugin_library() == built
    monkeypatch.setenv(te.PLUGIN_ENV, str(tmp_path / "nope.so"))
    with pytest.raises(BackendUnavailable, match="nope.so"):
        te.find_plugin_library()
    with pytest.raises(BackendUnavailable, match="missing.so: not found|missing.so not found"):
        te.find_plugin_library(tmp_path / "missing.so")


def test_plugins_needed_only_for_custom_ops(dense_bundle, sparse_bundle, tmp_path, monkeypatch):
    monkeypatch.setattr(te, "REPO_ROOT", tmp_path)
    monkeypatch.delenv(te.PLUGIN_ENV, raising=False)
    assert te.require_plugin_library(load_bundle(dense_bundle).manifest) is None
    with pytest.raises(BackendUnavailable, match=r"InfLLMv2Attention.*cmake -S plugins"):
        te.require_plugin_library(load_bundle(sparse_bundle).manifest)


# ---- without TensorRT ----------------------------------------------------------------------------------
@pytest.mark.skipif(HAVE_TRT, reason="tensorrt is installed here; the missing-package message cannot be tested")
def test_build_without_tensorrt_says_what_to_install(dense_bundle):
    with pytest.raises(BackendUnavailable) as e:
        tb.build_engine(dense_bundle, progress=False)
    msg = str(e.value)
    assert "tensorrt" in msg and "pip install" in msg and "JetPack" in msg


@pytest.mark.skipif(HAVE_TRT, reason="tensorrt is installed here; the missing-package message cannot be tested")
def test_tensorrt_backend_without_tensorrt(dense_bundle):
    from edgecpm.runtimes.tensorrt import TensorRTBackend

    with pytest.raises(BackendUnavailable, match="backend 'tensorrt'.*tensorrt.*pip install"):
        TensorRTBackend(load_bundle(dense_bundle))


def test_build_checks_arguments_before_tensorrt(dense_bundle):
    with pytest.raises(ConfigError, match="max_verify"):
        tb.build_engine(dense_bundle, max_prefill=8, max_verify=16, progress=False)


def test_tensorrt_modules_import_without_torch_or_tensorrt():
    """The device side: the backend, its engine helpers and the build import neither torch nor onnx."""
    code = textwrap.dedent("""
        import sys
        sys.modules["torch"] = None
        import edgecpm.runtimes.tensorrt, edgecpm.runtimes.tensorrt_engines, edgecpm.export.trt_build
        print(sorted(m for m in ("torch", "onnx", "tensorrt") if sys.modules.get(m) is not None))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ---- KV compaction on the device arena ------------------------------------------------------------------
def _apply(copies, arena, start, n):
    for src, dst, k in copies:
        assert dst + k <= src or src + k <= dst, "a copy overlaps itself"
        arena[dst:dst + k] = arena[src:src + k].copy()
    return arena[start:start + n]


@pytest.mark.parametrize("start, rows", [
    (10, [10, 11, 12]),  # nothing moves
    (10, [12, 13, 14, 15]),  # one run, shift 2 < length 4: cut into pieces
    (10, [11, 13, 20, 21, 22]),
    (0, [0, 5, 6, 7, 8, 9, 30]),
    (5, []),
])
def test_compaction_copies_match_kv_cache_keep(start, rows):
    arena = np.arange(64) * 10
    expected = arena[np.array(rows, dtype=int)].copy() if rows else arena[:0]
    got = _apply(compaction_copies(start, rows), arena.copy(), start, len(rows))
    assert np.array_equal(got, expected)
    assert all(n > 0 for _, _, n in compaction_copies(start, rows))


def test_compaction_random_trees():
    rng = np.random.default_rng(0)
    for _ in range(200):
        start = int(rng.integers(0, 20))
        rows = np.sort(rng.choice(np.arange(start, start + 40), size=int(rng.integers(0, 20)), replace=False))
        arena = np.arange(100)
        assert np.array_equal(_apply(compaction_copies(start, rows), arena.copy(), start, len(rows)), arena[rows])


def test_causal_mask_detection():
    assert is_causal(np.tri(5, dtype=bool)) and not is_causal(np.ones((3, 3), bool))


@pytest.mark.skipif(HAVE_TRT, reason="tensorrt is installed here")
def test_usable_engine_never_raises(dense_bundle):
    from edgecpm.runtimes.tensorrt import usable_engine

    record, why = usable_engine(load_bundle(dense_bundle))
    assert record is None and "tensorrt" in why


@pytest.mark.parametrize("T, rows, max_tokens, max_rows", [
    (512, [511], 512, 64),  # a prefill chunk wanting its last row: one piece
    (512, list(range(512)), 512, 64),  # logits() of a whole chunk: pieces of 64
    (1000, [999], 512, 64),  # longer than the largest profile
    (100, list(range(0, 100, 3)), 80, 16),
    (5, [], 64, 64),
])
def test_step_pieces(T, rows, max_tokens, max_rows):
    from edgecpm.runtimes.tensorrt import plan_pieces

    pieces = plan_pieces(T, np.array(rows, dtype=np.int64), max_tokens, max_rows)
    assert pieces[0][0] == 0 and pieces[-1][1] == T
    assert all(a[1] == b[0] for a, b in itertools.pairwise(pieces))
    rows = np.array(rows)
    for s, e in pieces:
        assert 0 < e - s <= max_tokens and ((rows >= s) & (rows < e)).sum() <= max_rows


def test_onnxruntime_only_ternary_graph_is_refused():
    from edgecpm.errors import BundleError

    node = helper.make_node("MatMulNBits", ["x", "w", "s"], ["y"], domain="com.microsoft", K=32, N=3, bits=4,
                            block_size=32)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])])
    with pytest.raises(BundleError, match="MatMulNBits.*re-export it with TernaryMatMul"):
        tb.prepare_for_tensorrt(helper.make_model(graph))
