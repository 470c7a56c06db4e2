"""Strict checkpoint loading (DESIGN.md §4, §13): every problem is a CheckpointError naming the
tensor or file, both through `Checkpoint` and through the user-facing `edgecpm.Session`."""

from __future__ import annotations

import json

import pytest
from conftest import copy_checkpoint

import edgecpm
from edgecpm.errors import CheckpointError

torch = pytest.importorskip("torch", reason="checkpoint loading needs torch (pip install 'edgecpm[export]')")
from safetensors.torch import load_file, save_file

from edgecpm.export.checkpoint import Checkpoint, expected_shapes, load_model


@pytest.fixture
def ckpt(make_checkpoint, tmp_path):
    """A writable copy of a tiny tied checkpoint."""
    return copy_checkpoint(make_checkpoint(), tmp_path / "ckpt")


def _rewrite(folder, edit):
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def _load_error(folder) -> str:
    """Both entry points must refuse the folder with a CheckpointError; returns Session's message."""
    with pytest.raises(CheckpointError):
        load_model(folder)
    with pytest.raises(CheckpointError) as e:
        edgecpm.Session(folder, backend="torch")
    return str(e.value)


def test_fixture_checkpoint_matches_expected_shapes(make_checkpoint):
    folder = make_checkpoint()
    ck = Checkpoint(folder)
    assert ck.shapes() == expected_shapes(ck.config)
    ck.check()
    assert "lm_head.weight" not in ck.shapes()  # tied: like MiniCPM4-0.5B


def test_tied_without_lm_head_loads(make_checkpoint):
    model = load_model(make_checkpoint(), "fp32")
    assert model.lm_head_weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    s = edgecpm.Session(make_checkpoint(), backend="torch")
    assert s.logits([1, 5, 7]).shape == (3, s.config.vocab_size)


def test_untied_loads(make_checkpoint):
    folder = make_checkpoint(tie=False)
    assert "lm_head.weight" in Checkpoint(folder).shapes()
    model = load_model(folder, "fp32")
    assert model.lm_head_weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()


def test_missing_tensor(ckpt):
    name = "model.layers.1.mlp.up_proj.weight"
    _rewrite(ckpt, lambda t: t.pop(name))
    msg = _load_error(ckpt)
    assert name in msg and "missing" in msg


def test_unexpected_tensor(ckpt):
    name = "model.layers.0.self_attn.rotary_emb.inv_freq"
    _rewrite(ckpt, lambda t: t.__setitem__(name, torch.zeros(8)))
    msg = _load_error(ckpt)
    assert name in msg and "unexpected" in msg


def test_lm_head_in_tied_checkpoint_is_unexpected(ckpt):
    _rewrite(ckpt, lambda t: t.__setitem__("lm_head.weight", t["model.embed_tokens.weight"].clone()))
    msg = _load_error(ckpt)
    assert "lm_head.weight" in msg and "unexpected" in msg


def test_wrong_shape(ckpt):
    name = "model.layers.0.self_attn.k_proj.weight"

    def edit(t):
        t[name] = t[name][:-1].contiguous()

    _rewrite(ckpt, edit)
    msg = _load_error(ckpt)
    assert name in msg and "shape" in msg


def test_all_problems_reported_at_once(ckpt):
    missing, extra = "model.norm.weight", "model.extra.weight"

    def edit(t):
        t.pop(missing)
        t[extra] = torch.zeros(3)

    _rewrite(ckpt, edit)
    msg = _load_error(ckpt)
    assert missing in msg and extra in msg


def test_untied_config_missing_lm_head(make_checkpoint, tmp_path):
    folder = copy_checkpoint(make_checkpoint(), tmp_path / "ckpt")  # tied weights ...
    cfg = json.loads((folder / "config.json").read_text())
    cfg["tie_word_embeddings"] = False  # ... under an untied config
    (folder / "config.json").write_text(json.dumps(cfg))
    msg = _load_error(folder)
    assert "lm_head.weight" in msg and "missing" in msg


def test_truncated_file(ckpt):
    path = ckpt / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    msg = _load_error(ckpt)
    assert str(path) in msg


def test_corrupted_header(ckpt):
    path = ckpt / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[:8] = b"\xff" * 8
    path.write_bytes(bytes(data))
    msg = _load_error(ckpt)
    assert str(path) in msg


def test_garbage_header_json(ckpt):
    path = ckpt / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:16] = b"not json"
    path.write_bytes(bytes(data))
    msg = _load_error(ckpt)
    assert str(path) in msg


def _shard(folder):
    """Split model.safetensors into two shards with an index; optionally delete the second."""
    tensors = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    names = sorted(tensors)
    parts = [names[: len(names) // 2], names[len(names) // 2 :]]
    weight_map = {}
    files = []
    for i, part in enumerate(parts):
        fname = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, str(folder / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, fname))
        files.append(folder / fname)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return files


def test_sharded_loads(ckpt, make_checkpoint):
    import numpy as np

    _shard(ckpt)
    ids = [1, 17, 300, 42]
    ref = edgecpm.Session(make_checkpoint(), backend="torch").logits(ids)
    np.testing.assert_array_equal(edgecpm.Session(ckpt, backend="torch").logits(ids), ref)


def test_sharded_index_lists_missing_shard(ckpt):
    files = _shard(ckpt)
    files[1].unlink()
    msg = _load_error(ckpt)
    assert files[1].name in msg


def test_sharded_truncated_shard(ckpt):
    files = _shard(ckpt)
    data = files[0].read_bytes()
    files[0].write_bytes(data[: len(data) // 2])
    msg = _load_error(ckpt)
    assert files[0].name in msg


def test_sharded_index_invalid_json(ckpt):
    _shard(ckpt)
    (ckpt / "model.safetensors.index.json").write_text("{ not json")
    msg = _load_error(ckpt)
    assert "model.safetensors.index.json" in msg


def test_no_weights(ckpt):
    (ckpt / "model.safetensors").unlink()
    msg = _load_error(ckpt)
    assert str(ckpt) in msg and "model.safetensors" in msg


def test_pickle_weights_are_not_loaded(ckpt):
    """A folder with only pytorch_model.bin is refused (nothing is loaded with pickle)."""
    (ckpt / "model.safetensors").rename(ckpt / "pytorch_model.bin")
    msg = _load_error(ckpt)
    assert "safetensors" in msg


def test_checkpoint_on_a_file(ckpt):
    with pytest.raises(CheckpointError) as e:
        Checkpoint(ckpt / "config.json")
    assert "config.json" in str(e.value)
