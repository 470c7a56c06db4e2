"""Shared paths and fixtures for the edgecpm test suite.

- SHARED: the MiniCPM4 reference data (real configs, tokenizer, golden outputs); tests that need it
  skip with a reason when it is absent (a fresh clone elsewhere).
- make_checkpoint: writes tiny random MiniCPM4 checkpoints in the real Hugging Face format.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

# Keep the suite cheap on small CI machines: at most 2 CPU threads for torch/BLAS.
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("MKL_NUM_THREADS", "2")

ROOT = Path(__file__).resolve().parents[1]


def _load_benchmarks_common():
    """benchmarks/common.py (a folder of scripts, not a package: loaded by path), the one home of
    the MiniCPM4 reference config the tests and the benchmarks start from."""
    spec = importlib.util.spec_from_file_location("edgecpm_benchmarks_common", ROOT / "benchmarks" / "common.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench_common = _load_benchmarks_common()
SHARED = bench_common.SHARED
GOLDEN = SHARED / "golden"
TORCH_THREADS = 2

needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"MiniCPM4 reference data not found at {SHARED}")

TOKENIZER_VOCAB = 73448
TINY_VOCAB = 512


def pytest_configure(config):
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(TORCH_THREADS)


def real_config(name: str = "MiniCPM4-0.5B") -> dict:
    """The shipped config.json (from SHARED; MiniCPM4-0.5B's embedded copy when SHARED is absent)."""
    return bench_common.minicpm4_config(name)[0]


def _resize(values: list[float], n: int) -> list[float]:
    """Resample a LongRoPE factor list to n entries (keeps its first/last values and shape)."""
    src = np.asarray(values, dtype=np.float64)
    return [float(x) for x in np.interp(np.linspace(0, len(src) - 1, n), np.arange(len(src)), src)]


def tiny_config(tie: bool = True, with_tokenizer: bool = False, **overrides) -> dict:
    """A config.json dict in the real 0.5B key layout, shrunk to a tiny model."""
    base = real_config()
    base.pop("auto_map", None)  # remote-code pointers are meaningless for a random checkpoint
    base.update(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=128, vocab_size=TOKENIZER_VOCAB if with_tokenizer else TINY_VOCAB)
    if not with_tokenizer:
        base["eos_token_id"] = [2]  # 73440 (<|im_end|>) lies outside the tiny vocabulary
    if not tie:
        base["tie_word_embeddings"] = False
    user_rope = "rope_scaling" in overrides
    base.update(overrides)
    if not user_rope:
        half = base["hidden_size"] // base["num_attention_heads"] // 2
        rs = base["rope_scaling"]
        rs["long_factor"] = _resize(rs["long_factor"], half)
        rs["short_factor"] = _resize(rs["short_factor"], half)
    return base


def write_weights(folder: Path, cfg_dict: dict, dtype: str = "fp32", seed: int = 0) -> dict:
    """Random weights ~N(0, 0.05) (norms = 1) with the names/shapes the model expects."""
    import torch
    from safetensors.torch import save_file

    from edgecpm.config import ModelConfig
    from edgecpm.export.checkpoint import expected_shapes, torch_dtype

    cfg = ModelConfig.from_dict(cfg_dict)
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, shape in sorted(expected_shapes(cfg).items()):
        if name.endswith("norm.weight"):
            arr = np.ones(shape, dtype=np.float32)
        else:
            arr = rng.normal(0.0, 0.05, size=shape).astype(np.float32)
        tensors[name] = torch.from_numpy(arr).to(torch_dtype(dtype)).contiguous()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return tensors


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory):
    """Factory: make_checkpoint(**config_overrides, dtype="fp32", tie=True, with_tokenizer=False)
    -> Path of a tiny random MiniCPM4 checkpoint folder. Identical requests share one folder, so
    treat the result as read-only (copy it before editing)."""
    made: dict[str, Path] = {}

    def make(dtype: str = "fp32", tie: bool = True, with_tokenizer: bool = False, **overrides) -> Path:
        if with_tokenizer and not SHARED.is_dir():
            pytest.skip(f"tokenizer files of the MiniCPM4 reference data not found at {SHARED}")
        key = json.dumps([dtype, tie, with_tokenizer, overrides], sort_keys=True)
        if key in made:
            return made[key]
        folder = tmp_path_factory.mktemp("ckpt")
        cfg = tiny_config(tie=tie, with_tokenizer=with_tokenizer, **overrides)
        (folder / "config.json").write_text(json.dumps(cfg, indent=2))
        write_weights(folder, cfg, dtype=dtype)
        if with_tokenizer:
            shutil.copy(SHARED / "tokenizer.json", folder / "tokenizer.json")
            for f in ("tokenizer_config.json", "generation_config.json"):
                shutil.copy(SHARED / "MiniCPM4-0.5B" / f, folder / f)
        made[key] = folder
        return folder

    return make


def copy_checkpoint(src: Path, dst: Path) -> Path:
    """A writable copy of a checkpoint folder (for tests that damage it)."""
    shutil.copytree(src, dst)
    for p in dst.iterdir():
        p.chmod(0o644)
    return dst


def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def ternary_graph(x_dtype, linears, k):
    """A model whose TernaryMatMul nodes all read input x [M, k]; linears: (n, g, packed, scales)."""
    import onnx
    from onnx import helper, numpy_helper

    from edgecpm.export import custom_ops
    from edgecpm.export.onnx_builder import GraphBuilder

    b = GraphBuilder(lambda name, a: numpy_helper.from_array(a, name))
    et = helper.np_dtype_to_tensor_dtype(np.dtype(x_dtype))
    outputs = []
    for i, (n, g, packed, scales) in enumerate(linears):
        y = custom_ops.ternary_node(b, "x", b.weight(f"packed{i}", packed), b.weight(f"scales{i}", scales), k, g)
        b.nodes.append(helper.make_node("Identity", [y], [f"y{i}"]))
        outputs.append(helper.make_tensor_value_info(f"y{i}", et, ["M", n]))
    graph = helper.make_graph(b.nodes, "g", [helper.make_tensor_value_info("x", et, ["M", k])], outputs,
                              initializer=b.initializers)
    custom_ops.register_schemas()
    model = helper.make_model(graph, functions=[custom_ops.ternary_function()], opset_imports=[
        helper.make_opsetid("", 17), helper.make_opsetid("edgecpm", 1)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def graph_feeds(ids: list[int], layers: int = 2, kv_heads: int = 2, head_dim: int = 16) -> dict:
    """The decoder graph's inputs for a causal prompt from an empty cache (the tiny model's shapes)."""
    t = len(ids)
    feeds = {"input_ids": np.array([ids]), "position_ids": np.arange(t)[None],
             "attn_mask": np.tril(np.ones((t, t), bool)), "logit_index": np.arange(t)}
    for i in range(layers):
        feeds[f"past_key.{i}"] = feeds[f"past_value.{i}"] = np.zeros((0, kv_heads, head_dim), np.float32)
    return feeds


def run_without_torch(code: str) -> subprocess.CompletedProcess:
    """Run Python `code` in a fresh process in which importing torch fails (the device side must
    not need it); it also asserts at the end that torch was never imported."""
    blocker = textwrap.dedent("""
        import sys
        class NoTorch:
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ImportError("torch is blocked in this process")
        sys.meta_path.insert(0, NoTorch())
    """)
    code = blocker + textwrap.dedent(code) + '\nassert "torch" not in sys.modules\n'
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
