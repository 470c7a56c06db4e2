"""edgecpm.inspect (what `edgecpm inspect` shows) and the safetensors reader it uses."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from edgecpm.errors import BundleError, CheckpointError
from edgecpm.inspect import human_bytes, inspect_info, print_report, sections
from edgecpm.safetensors_files import checkpoint_tensors

pytest.importorskip("torch")


def test_checkpoint_facts_from_headers(make_checkpoint):
    info = inspect_info(make_checkpoint(tie=False, dtype="bf16"), kv_budget="1MiB")
    assert info["kind"] == "checkpoint" and info["notes"] == []
    assert info["config"]["layers"] == 2 and info["config"]["kv_heads"] == 2
    w = info["weights"]
    assert w["elements"] == info["params"] and set(w["by_dtype"]) == {"BF16"}
    assert w["by_dtype"]["BF16"]["bytes"] == 2 * info["params"]
    # 2 layers * (K + V) * 2 kv heads * head_dim 16 elements per token
    assert info["kv"]["bytes_per_token"] == {"fp32": 512, "fp16": 256, "bf16": 256}
    assert info["kv"]["tokens_in_budget"]["fp16"] == 2**20 // 256
    assert not info["ternary"]["ternary"]  # random weights


def test_stored_tensors_read_like_safetensors(make_checkpoint):
    from safetensors.torch import load_file

    for dtype in ("bf16", "fp16", "fp32"):
        folder = make_checkpoint(tie=False, dtype=dtype)
        ref = load_file(str(folder / "model.safetensors"))
        for name, t in checkpoint_tensors(folder).items():
            values = t.read_float()
            assert values.dtype == np.float32 and values.shape == t.shape
            np.testing.assert_array_equal(values, ref[name].float().numpy())


def test_config_mismatch_and_missing_weights_are_notes(make_checkpoint, tmp_path):
    import shutil

    folder = shutil.copytree(make_checkpoint(tie=False), tmp_path / "c")
    cfg = json.loads((folder / "config.json").read_text())
    cfg.pop("tie_word_embeddings", None)  # absent means tied, yet the file holds lm_head.weight
    (folder / "config.json").write_text(json.dumps(cfg))
    info = inspect_info(folder)
    assert any("lm_head.weight is present" in n for n in info["notes"]) and info["ternary"] is None
    (folder / "model.safetensors").unlink()
    assert inspect_info(folder / "config.json")["notes"][0].startswith("no model.safetensors")


def test_truncated_checkpoint_is_a_clear_error(make_checkpoint, tmp_path):
    import shutil

    folder = shutil.copytree(make_checkpoint(tie=False), tmp_path / "c")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        inspect_info(folder)


def test_bundle_missing_files_is_a_note_and_a_bad_manifest_an_error(make_checkpoint, tmp_path):
    from edgecpm.export.exporter import export_bundle

    bundle = export_bundle(make_checkpoint(tie=False), tmp_path / "b", progress=False)
    info = inspect_info(bundle)
    assert info["kind"] == "bundle" and info["weights"]["bundle"]["format_version"] == 1
    assert info["ternary"] == {"ternary": False}
    (bundle / "decoder.onnx.data").unlink()
    assert inspect_info(bundle)["notes"] == ["files listed in manifest.json but missing: decoder.onnx.data"]
    (bundle / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        inspect_info(bundle)


def test_report_rows_and_plain_text(make_checkpoint, capsys):
    info = inspect_info(make_checkpoint(tie=True))
    titles = [title for title, _ in sections(info)]
    assert titles == ["model", "weights", "KV cache", "ternary (BitCPM4)"]
    print_report(info)
    out = capsys.readouterr().out
    assert out.startswith(info["path"]) and "[KV cache]" in out and "tied embeddings              yes" in out
    assert human_bytes(512) == "512 B" and human_bytes(3 * 2**30) == "3.00 GiB"


def test_inspect_never_imports_torch(make_checkpoint):
    folder = make_checkpoint(tie=False, dtype="bf16")
    code = ("import sys; from edgecpm.cli import main; rc = main(['inspect', sys.argv[1]]); "
            "assert rc == 0 and 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)")
    subprocess.run([sys.executable, "-c", code, str(folder)], check=True, capture_output=True)


@pytest.mark.parametrize("sparse", [False, True])
def test_numbers_match_the_loaded_model_and_its_arena(make_checkpoint, sparse):
    """Parameter count against the torch model's own parameters; KV bytes per token and tokens in
    the budget against the arena a Session really allocates (compressed keys included)."""
    import edgecpm
    from edgecpm.export.checkpoint import load_model

    extra = {"sparse_config": {"dense_len": 64, "window_size": 128, "topk": 2}, "num_attention_heads": 16,
             "num_key_value_heads": 1, "hidden_size": 512} if sparse else {}
    folder = make_checkpoint(tie=False, **extra)
    budget = 3 * 2**20
    info = inspect_info(folder, kv_budget=budget)
    model = load_model(str(folder))
    assert info["params"] == sum(p.numel() for p in model.parameters())
    s = edgecpm.Session(folder, backend="torch", kv_budget=budget)
    arena = s.cache.arena.nbytes + s.cache.ckeys.nbytes
    assert info["kv"]["bytes_per_token"]["fp32"] == s.memory()["kv_bytes_per_token"]
    assert info["kv"]["tokens_in_budget"]["fp32"] == s.cache.capacity
    # The per-token figure is what the arena costs: capacity x bytes per token covers it; the budget
    # counts capacity/16 compressed-key rows where the arena holds (capacity-16)//16, so up to 2 rows more.
    ck_row = s.config.num_hidden_layers * s.config.num_key_value_heads * s.config.head_dim * 4
    assert 0 <= s.cache.capacity * info["kv"]["bytes_per_token"]["fp32"] - arena <= (2 * ck_row if sparse else 0)
