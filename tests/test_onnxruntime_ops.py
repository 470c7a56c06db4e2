"""edgecpm's onnxruntime kernel for TernaryMatMul (runtimes/onnxruntime_ops.cpp): built on first
use, exact against the dequantized matmul on each of its CPU paths, fused where linears share an
input, and a clear fallback (or error) where it cannot be built.

With EDGECPM_REQUIRE_ORT_OPS set (CI: .ci/run sets it and installs the headers), edgecpm's kernel is
required: a failure to build it fails these tests instead of skipping them, and the tests that run a
ternary bundle through the "auto" path assert that edgecpm's kernel ran (`backend.ternary_kernel`),
not the MatMulNBits fallback."""

from __future__ import annotations

import os
import platform

import numpy as np
import pytest
from conftest import graph_feeds, rel_err, ternary_graph

from edgecpm.errors import BackendUnavailable
from edgecpm.ternary_format import dequantize, pack

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")


def required() -> bool:
    """EDGECPM_REQUIRE_ORT_OPS is set (CI): edgecpm's kernel must build, and "auto" must run it."""
    return bool(os.environ.get("EDGECPM_REQUIRE_ORT_OPS"))


MATMULNBITS_EXACT = "MatMulNBits (3 int8 digits)"


@pytest.fixture
def ort_ops():
    """The built library, or a skip that says why it cannot be built here (a failure in CI, which
    installs the headers: .ci/run sets EDGECPM_REQUIRE_ORT_OPS)."""
    from edgecpm.runtimes import onnxruntime_ops

    try:
        return onnxruntime_ops.library()
    except BackendUnavailable as e:
        if required():
            raise
        pytest.skip(f"edgecpm's onnxruntime kernel cannot be built here: {e}")


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux reports them (empty where /proc/cpuinfo is absent)."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return set()
    return {f for line in text.splitlines() if line.startswith("flags") for f in line.split(":", 1)[1].split()}


def auto_kernel_here() -> str:
    """What OnnxRuntimeBackend(ternary="auto") must run for an fp32 bundle with exact activations on
    this machine: edgecpm's kernel where it builds and has a vector path (x86-64: AVX-512 or AVX2),
    else MatMulNBits on 3 digits. With EDGECPM_REQUIRE_ORT_OPS set, edgecpm's kernel is required:
    a build failure is raised (the test fails, it does not skip or fall back), and so is a machine
    where "auto" would not pick it (not x86-64, or the library on its scalar path although the CPU
    reports AVX2)."""
    from edgecpm.runtimes import onnxruntime_ops

    try:
        library = onnxruntime_ops.library()
    except BackendUnavailable:
        if required():
            raise
        return MATMULNBITS_EXACT
    path = onnxruntime_ops.isa(library)
    if platform.machine() == "x86_64" and path != "scalar":
        return f"edgecpm ({path})"
    if required():
        flags = "avx2" in cpu_flags() and not os.environ.get("EDGECPM_ORT_ISA")
        pytest.fail(f"EDGECPM_REQUIRE_ORT_OPS is set, but \"auto\" cannot run edgecpm's kernel here: machine "
                    f"{platform.machine()}, kernel path {path!r}"
                    + (" although the CPU reports AVX2" if flags else "") + " (it needs x86-64 with AVX2 or AVX-512)")
    return MATMULNBITS_EXACT


@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    """library() forgets its result (before and after the test) and builds into tmp_path."""
    from edgecpm.runtimes import onnxruntime_ops

    onnxruntime_ops.library.cache_clear()
    monkeypatch.setenv("EDGECPM_CACHE", str(tmp_path / "cache"))
    yield onnxruntime_ops
    onnxruntime_ops.library.cache_clear()


def session(model, library):
    opts = ort.SessionOptions()
    opts.register_custom_ops_library(str(library))
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def check_against_dequantized(s, w: np.ndarray, m: int, rng) -> None:
    """A one-linear session `s` against its dequantized weight w [N, K]: one-hot rows read w back
    exactly (each weight times 1, summed with zeros), all K at once and a few; m random rows with an
    outlier, as LLM activations have, within fp32 summation error."""
    n, k = w.shape
    eye = np.eye(k, dtype=np.float32)
    assert np.array_equal(s.run(None, {"x": eye})[0], w.T)
    few = np.arange(0, k, max(1, k // 7))[:7]  # under 16 tokens: the decode tiles, not the panel
    assert np.array_equal(s.run(None, {"x": eye[few]})[0], w[:, few].T)
    x = rng.standard_normal((m, k)).astype(np.float32)
    x[0, 3] = 300
    y = s.run(None, {"x": x})[0]
    assert y.shape == (m, n)
    assert rel_err(y, x.astype(np.float64) @ w.T) <= 1e-6


def linear(rng, n, k, g):
    return n, g, pack(rng.integers(0, 3, (n, k)).astype(np.uint8)), (rng.random((n, k // g)) + 0.1).astype(np.float32)


@pytest.mark.parametrize("isa", ["avx512vnni", "avx512", "avx2vnni", "avx2", "scalar"])
@pytest.mark.parametrize("n, k, g, m", [(7, 40, 20, 3), (64, 128, 32, 9), (24, 384, 384, 1), (33, 1000, 1000, 17),
                                        (16, 20, 20, 2), (40, 4096, 128, 8), (50, 256, 64, 40)])
def test_kernel_matches_dequantized_matmul(isa, n, k, g, m, ort_ops, monkeypatch, tmp_path):
    """Shapes cover: K not a multiple of 16 (a partial last word), groups that split words (20),
    several groups per row, and token counts on and off the kernel's tiles (4 on AVX-512, 2 on AVX2;
    from 16 tokens on AVX-512 a dequantized panel: one and two vectors of tokens, two blocks of 32)."""
    from edgecpm.runtimes.onnxruntime_ops import isa as isa_of
    from edgecpm.runtimes.ternary_lowering import fuse_ternary

    monkeypatch.setenv("EDGECPM_ORT_ISA", isa)  # read when onnxruntime creates the kernel
    if isa_of(ort_ops) != isa:
        pytest.skip(f"this CPU has no {isa}")
    rng = np.random.default_rng(k + m)
    n, g, packed, scales = linear(rng, n, k, g)
    model = ternary_graph(np.float32, [(n, g, packed, scales)], k)
    assert fuse_ternary(model, tmp_path) == 0 and not model.functions  # the kernel replaces the reference body
    check_against_dequantized(session(model, ort_ops), dequantize(packed, scales, k), m, rng)


@pytest.mark.parametrize("isa", ["avx512vnni", "avx512", "avx2vnni", "avx2", "scalar"])
def test_a_nan_or_inf_input_gives_nan_as_in_fp32(isa, ort_ops, monkeypatch, tmp_path):
    """A nan or inf among a token's inputs makes every output of that token nan (0 * nan and
    +1 * inf - 1 * inf are nan in fp32 too): the integer decode must not round it away."""
    from edgecpm.runtimes.onnxruntime_ops import isa as isa_of
    from edgecpm.runtimes.ternary_lowering import fuse_ternary

    monkeypatch.setenv("EDGECPM_ORT_ISA", isa)
    if isa_of(ort_ops) != isa:
        pytest.skip(f"this CPU has no {isa}")
    rng = np.random.default_rng(0)
    n, g, packed, scales = linear(rng, 8, 256, 256)
    model = ternary_graph(np.float32, [(n, g, packed, scales)], 256)
    fuse_ternary(model, tmp_path)
    x = rng.standard_normal((3, 256)).astype(np.float32)
    x[0, 5], x[1, 200] = np.nan, np.inf
    x[2, 16:32] = 0
    x[2, 17] = np.nan  # alone in a word of zeros
    y = session(model, ort_ops).run(None, {"x": x})[0]
    assert np.isnan(y[0]).all() and not np.isfinite(y[1]).any() and np.isnan(y[2]).all()


def test_linears_reading_one_activation_are_fused(ort_ops, tmp_path):
    """q/k/v-like linears with one group size become one TernaryMatMul over their rows and a Split;
    a linear with another group size keeps its own node."""
    from edgecpm.runtimes.ternary_lowering import fuse_ternary

    rng = np.random.default_rng(0)
    k = 256
    linears = [linear(rng, n, k, g) for n, g in [(64, 128), (16, 256), (16, 128), (8, 128)]]
    model = ternary_graph(np.float32, linears, k)
    assert fuse_ternary(model, tmp_path) == 3
    ops = [nd.op_type for nd in model.graph.node]
    assert ops.count("TernaryMatMul") == 2 and ops.count("Split") == 1 and not model.functions
    x = rng.standard_normal((3, k)).astype(np.float32)
    for y, (n, _g, packed, scales) in zip(session(model, ort_ops).run(None, {"x": x}), linears, strict=True):
        assert y.shape == (3, n)
        assert rel_err(y, x.astype(np.float64) @ dequantize(packed, scales, k).T) <= 1e-6


def test_library_is_cached_and_says_why_it_cannot_be_built(fresh_build, ort_ops, monkeypatch):
    first = fresh_build.library()
    fresh_build.library.cache_clear()
    assert fresh_build.library() == first  # the second session of a process, or the next process: no rebuild
    fresh_build.library.cache_clear()
    monkeypatch.setenv("CXX", "false")
    monkeypatch.setenv("EDGECPM_CACHE", str(first.parents[3] / "other"))
    with pytest.raises(BackendUnavailable, match="building onnxruntime_ops.cpp failed"):
        fresh_build.library()
    assert not list((first.parents[3] / "other").rglob("*.so"))  # nothing half-built left behind
    monkeypatch.setenv("ONNXRUNTIME_INCLUDE_DIR", "/nonexistent/include")
    with pytest.raises(BackendUnavailable, match="ONNXRUNTIME_INCLUDE_DIR=/nonexistent/include"):
        fresh_build.library()


@pytest.fixture(scope="module")
def ternary_bundle(make_checkpoint, tmp_path_factory):
    pytest.importorskip("torch")
    from test_ternary import ternarize_checkpoint

    from edgecpm.bundle import load_bundle
    from edgecpm.export.exporter import export_bundle

    root = tmp_path_factory.mktemp("ort_ops")
    ckpt = ternarize_checkpoint(make_checkpoint(dtype="bf16", tie=False), root / "c", "K")
    # A dense head: these tests are about the ternary linears (the int8 head: test_quantized_bundles).
    bundle = load_bundle(export_bundle(ckpt, root / "b", progress=False, lm_head="dense"))
    # What "auto" may give edgecpm's kernel (auto_kernel_here): fp32, exact activations.
    assert bundle.manifest.get("dtype", "fp32") == "fp32"
    assert (bundle.manifest.get("ternary") or {}).get("activations", "exact") == "exact"
    return bundle


def test_backend_falls_back_to_matmulnbits_with_a_warning(fresh_build, ternary_bundle, monkeypatch, tmp_path):
    """Without the headers, "auto" runs MatMulNBits (exact digits) and warns why; "edgecpm" refuses."""
    import edgecpm
    from edgecpm.runtimes.onnxruntime import OnnxRuntimeBackend

    monkeypatch.setenv("ONNXRUNTIME_INCLUDE_DIR", str(tmp_path / "no-headers"))
    with pytest.warns(UserWarning, match="no-headers.*MatMulNBits instead"):
        backend = OnnxRuntimeBackend(ternary_bundle)
    assert backend.ternary_kernel == "MatMulNBits (3 int8 digits)"
    assert len(edgecpm.Session.from_backend(backend).generate([1, 5, 9], max_new_tokens=3).token_ids) == 3
    with pytest.raises(BackendUnavailable, match="no-headers"):
        OnnxRuntimeBackend(ternary_bundle, ternary="edgecpm")


def test_auto_takes_edgecpm_kernel_only_with_a_vector_path(ort_ops, ternary_bundle, monkeypatch):
    """Where the library has only its portable C++ path, onnxruntime's own kernel is the faster exact
    one: "auto" picks it, silently; asked for by name, edgecpm's still runs, and agrees. (With
    EDGECPM_REQUIRE_ORT_OPS set, a machine where "auto" would not pick edgecpm's kernel fails.)"""
    import warnings

    import edgecpm
    from edgecpm.runtimes.onnxruntime import OnnxRuntimeBackend
    from edgecpm.runtimes.onnxruntime_ops import isa

    expected = auto_kernel_here()
    if not expected.startswith("edgecpm ("):
        pytest.skip(f"\"auto\" does not take edgecpm's kernel here (machine {platform.machine()}, kernel path "
                    f"{isa(ort_ops)!r}: it needs x86-64 with AVX2 or AVX-512)")
    assert OnnxRuntimeBackend(ternary_bundle).ternary_kernel == expected == f"edgecpm ({isa(ort_ops)})"
    monkeypatch.setenv("EDGECPM_ORT_ISA", "scalar")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert OnnxRuntimeBackend(ternary_bundle).ternary_kernel == MATMULNBITS_EXACT
    scalar = OnnxRuntimeBackend(ternary_bundle, ternary="edgecpm")
    assert scalar.ternary_kernel == "edgecpm (scalar)"
    ids = [1, *range(7, 40, 3)]
    ref = edgecpm.Session.from_backend(OnnxRuntimeBackend(ternary_bundle, ternary="reference")).logits(ids)
    assert rel_err(edgecpm.Session.from_backend(scalar).logits(ids), ref) <= 1e-5


def test_auto_runs_the_kernel_this_machine_allows(ternary_bundle):
    """A plain Session on a ternary bundle (backend and ternary kernel both "auto"): with
    EDGECPM_REQUIRE_ORT_OPS set, edgecpm's kernel must be what ran -- never the MatMulNBits
    fallback -- and exact against the op's reference function."""
    import edgecpm
    from edgecpm.runtimes.onnxruntime import OnnxRuntimeBackend

    expected = auto_kernel_here()
    session = edgecpm.Session(ternary_bundle.path)
    assert session.backend.ternary_kernel == expected
    if required():
        assert session.backend.ternary_kernel.startswith("edgecpm (")
    ids = [1, *range(7, 40, 3)]
    ref = edgecpm.Session.from_backend(OnnxRuntimeBackend(ternary_bundle, ternary="reference")).logits(ids)
    assert rel_err(session.logits(ids), ref) <= 1e-5


def test_bench_says_what_ran_the_ternary_linears(ternary_bundle):
    from edgecpm.bench import run_bench

    expected = auto_kernel_here()
    result = run_bench(ternary_bundle.path, backend="onnxruntime", prompt_len=8, new_tokens=2, repeats=1)
    assert result["configs"]["plain"]["ternary_kernel"] == expected
    if required():
        assert expected.startswith("edgecpm (")


def test_kernel_refuses_weights_that_disagree_with_its_attributes(ort_ops, tmp_path):
    from onnx import numpy_helper

    from edgecpm.runtimes.ternary_lowering import fuse_ternary

    rng = np.random.default_rng(0)
    model = ternary_graph(np.float32, [linear(rng, 8, 64, 32)], 64)
    fuse_ternary(model, tmp_path)
    scales = next(t for t in model.graph.initializer if t.name.startswith("scales"))
    scales.CopyFrom(numpy_helper.from_array(np.ones((8, 3), np.float32), scales.name))  # 3 groups, not 2
    with pytest.raises(Exception, match="do not agree with in_features / group_size"):
        session(model, ort_ops).run(None, {"x": np.ones((1, 64), np.float32)})


def test_unwritable_cache_is_a_clear_error(fresh_build, ort_ops, monkeypatch, tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    monkeypatch.setenv("EDGECPM_CACHE", str(blocked))
    fresh_build.library.cache_clear()
    with pytest.raises(BackendUnavailable, match="set EDGECPM_CACHE to a writable folder"):
        fresh_build.library()


def quant_graph(n, k, bits, block, c):
    """A model of one QuantMatMul node reading x [M, k] (codes in the bundle's layout `c`)."""
    import onnx
    from onnx import helper, numpy_helper

    from edgecpm.export import custom_ops
    from edgecpm.export.onnx_builder import GraphBuilder
    from edgecpm.export.quant_ops import quant_function, quant_node, register_quant_schema

    b = GraphBuilder(lambda name, a: numpy_helper.from_array(a, name))
    y = quant_node(b, "x", b.weight("codes", c.codes), b.weight("scales", c.scales), b.weight("zeros", c.zeros),
                   k, bits, block)
    b.nodes.append(helper.make_node("Identity", [y], ["y"]))
    f = onnx.TensorProto.FLOAT
    graph = helper.make_graph(b.nodes, "g", [helper.make_tensor_value_info("x", f, ["M", k])],
                              [helper.make_tensor_value_info("y", f, ["M", n])], initializer=b.initializers)
    custom_ops.register_schemas()
    register_quant_schema()
    model = helper.make_model(graph, functions=[quant_function()], opset_imports=[
        helper.make_opsetid("", 17), helper.make_opsetid("edgecpm", 1)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("isa", ["avx512vnni", "avx512", "avx2vnni", "avx2", "scalar"])
@pytest.mark.parametrize(("bits", "n", "k", "group", "m"), [
    (4, 37, 128, 32, 1), (4, 20, 256, 128, 5), (4, 9, 96, 16, 3), (4, 16, 64, 64, 9),
    (4, 50, 256, 128, 40), (8, 37, 128, -1, 1), (8, 20, 256, 32, 6), (8, 5, 48, 16, 4), (8, 30, 64, 32, 17)])
def test_quant_kernel_matches_dequantized_matmul(isa, bits, n, k, group, m, ort_ops, monkeypatch):
    """Decode (1-3 tokens: weights dequantized in registers) and several tokens (a dequantized panel:
    one and two vectors of tokens, several blocks of 32), rows on and off the tiles (4; 12 and 24),
    one and several blocks a row, int4 blocks of 16 (AVX2's path, also on AVX-512), zeros in both nibbles."""
    from edgecpm.export.quantize import dequantize, layout, rtn
    from edgecpm.runtimes.onnxruntime_ops import isa as isa_of

    monkeypatch.setenv("EDGECPM_ORT_ISA", isa)  # read when onnxruntime creates the kernel
    if isa_of(ort_ops) != isa:
        pytest.skip(f"this CPU has no {isa}")
    rng = np.random.default_rng(n * k + m)
    g = k if group == -1 else group
    c = layout(*rtn(rng.standard_normal((n, k)).astype(np.float32) * 0.02, bits, g), bits, g)
    check_against_dequantized(session(quant_graph(n, k, bits, c.codes.shape[2] * 8 // bits, c), ort_ops),
                              dequantize(c, bits, k), m, rng)


def test_tied_dense_head_is_not_prepacked(make_checkpoint, tmp_path):
    """A dense tied embedding / LM head is declared a graph input at load (onnxruntime then neither
    prepacks nor folds it: one copy in memory); an untied one or a quantized one is left alone. The
    session's required inputs stay the manifest's and the logits are the graph's."""
    import onnx

    import edgecpm
    from edgecpm.export.exporter import export_bundle
    from edgecpm.runtimes.onnxruntime import _tied_head_in_place

    tied = export_bundle(make_checkpoint(), tmp_path / "tied", progress=False)
    model = onnx.load(str(tied / "decoder.onnx"), load_external_data=False)
    assert _tied_head_in_place(model) and not _tied_head_in_place(model)  # once
    assert "model.embed_tokens.weight" in {i.name for i in model.graph.input}
    s = edgecpm.Session(tied, backend="onnxruntime")
    assert "model.embed_tokens.weight" not in {i.name for i in s.backend.session.get_inputs()}
    assert "model.embed_tokens.weight" in {i.name for i in s.backend.session.get_overridable_initializers()}
    opts = ort.SessionOptions()
    opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(tied))
    plain = ort.InferenceSession(str(tied / "decoder.onnx"), opts, providers=["CPUExecutionProvider"])
    ids = [1, 5, 9, 13]
    assert rel_err(s.logits(ids), plain.run(["logits"], graph_feeds(ids))[0]) <= 1e-6
    for other in (export_bundle(make_checkpoint(tie=False), tmp_path / "untied", progress=False),
                  export_bundle(make_checkpoint(), tmp_path / "int8", quantize="int8", progress=False)):
        assert not _tied_head_in_place(onnx.load(str(other / "decoder.onnx"), load_external_data=False))


def head_graph():
    """One edgecpm::HeadMatMul node: y = x [M, K] times weight [N, K] transposed, the weight a graph
    input as the tied head's is at load (shapes left to the kernel to check)."""
    import onnx
    from onnx import helper

    graph = helper.make_graph(
        [helper.make_node("HeadMatMul", ["x", "weight"], ["y"], domain="edgecpm")], "head",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["M", "K"]),
         helper.make_tensor_value_info("weight", onnx.TensorProto.FLOAT, ["N", "K_weight"])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["M", "N"])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("edgecpm", 1)])


@pytest.mark.parametrize("isa", ["avx512", "avx2", "scalar"])
@pytest.mark.parametrize("n, k", [(300, 256), (37, 40), (96, 1000), (16, 16)])
def test_head_kernel_matches_the_product(isa, n, k, ort_ops, monkeypatch):
    """Every token count through every tile (4, 2 and 1 tokens at a time, 16-row blocks and the
    rows past them), K not a multiple of 16 or 8 (the masked and scalar tails): one-hot rows read
    the weight back exactly, random rows with an outlier within fp32 summation error."""
    from edgecpm.runtimes.onnxruntime_ops import isa as isa_of

    monkeypatch.setenv("EDGECPM_ORT_ISA", isa)
    if isa != "scalar" and not isa_of(ort_ops).startswith(isa):
        pytest.skip(f"this CPU has no {isa} path")
    s = session(head_graph(), ort_ops)
    rng = np.random.default_rng(n + k)
    w = rng.standard_normal((n, k)).astype(np.float32)
    eye = np.eye(k, dtype=np.float32)
    for rows in (eye[:1], eye[: min(k, 7)], eye):
        assert np.array_equal(s.run(None, {"x": rows, "weight": w})[0], w[:, : len(rows)].T)
    for m in (1, 2, 3, 4, 5, 7, 9, 17, 40):
        x = rng.standard_normal((m, k)).astype(np.float32)
        x[0, min(3, k - 1)] = 300
        y = s.run(None, {"x": x, "weight": w})[0]
        assert y.shape == (m, n)
        assert rel_err(y, x.astype(np.float64) @ w.T.astype(np.float64)) <= 4e-6  # the scalar path sums in order


def test_head_kernel_refuses_mismatched_shapes(ort_ops):
    s = session(head_graph(), ort_ops)
    with pytest.raises(Exception, match="HeadMatMul: x"):
        s.run(None, {"x": np.zeros((2, 12), np.float32), "weight": np.zeros((8, 16), np.float32)})


def test_tied_head_runs_on_the_kernel(ort_ops, make_checkpoint, tmp_path):
    """A tied fp32 head's Gemm becomes HeadMatMul where edgecpm's kernels run by default; logits of a
    prefill, a decode step and a draft tree's verification are the exported graph's within fp32
    summation error, greedy tokens identical. attention="reference" (the graph as exported), an
    untied head and a quantized head keep their own ops."""
    import edgecpm
    from edgecpm.bundle import load_bundle
    from edgecpm.export.exporter import export_bundle
    from edgecpm.generate import run_step
    from edgecpm.kv_cache import KVCache
    from edgecpm.runtimes.onnxruntime import OnnxRuntimeBackend
    from edgecpm.runtimes.onnxruntime_ops import isa

    if isa(ort_ops) == "scalar" or platform.machine() != "x86_64":
        pytest.skip("the kernel runs by default only with a vector path on x86-64")
    tied = load_bundle(export_bundle(make_checkpoint(), tmp_path / "tied", progress=False))
    kernel, ref = OnnxRuntimeBackend(tied, threads=2), OnnxRuntimeBackend(tied, threads=2, attention="reference")
    assert kernel.head_kernel == f"edgecpm ({isa(ort_ops)})" and ref.head_kernel is None

    def steps(backend):
        cache, rng = KVCache(backend.config, 128, backend.kv_dtype), np.random.default_rng(0)
        return [run_step(backend, cache, rng.integers(3, backend.config.vocab_size, n), None, np.arange(n))
                for n in (20, 1, 5)]

    for ours, theirs in zip(steps(kernel), steps(ref), strict=True):
        assert rel_err(ours, theirs) <= 1e-5
    a = edgecpm.Session.from_backend(kernel).generate([1, 5, 9, 12], max_new_tokens=8, ignore_eos=True)
    b = edgecpm.Session.from_backend(ref).generate([1, 5, 9, 12], max_new_tokens=8, ignore_eos=True)
    assert a.token_ids == b.token_ids
    for other in (export_bundle(make_checkpoint(tie=False), tmp_path / "untied", progress=False),
                  export_bundle(make_checkpoint(), tmp_path / "int8", quantize="int8", progress=False)):
        assert OnnxRuntimeBackend(load_bundle(other)).head_kernel is None
