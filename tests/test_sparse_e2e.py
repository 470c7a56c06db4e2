"""InfLLM v2 through the whole SDK: config, torch backend, bundle on onnxruntime, the KV arena."""

from __future__ import annotations

import json

import numpy as np
import pytest

import edgecpm
from edgecpm.config import ModelConfig
from edgecpm.errors import ConfigError

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")
from edgecpm.export.exporter import export_bundle

# 8B-style attention (head_dim 128, 16 query heads per kv head), two small layers.
SPARSE = {"dense_len": 512, "window_size": 128, "topk": 2}
EIGHT_B_STYLE = {"hidden_size": 2048, "num_attention_heads": 16, "num_key_value_heads": 1,
                 "intermediate_size": 256, "num_hidden_layers": 2, "rms_norm_eps": 1e-6}


@pytest.fixture(scope="module")
def sparse_ckpt(make_checkpoint):
    return make_checkpoint(tie=False, sparse_config=SPARSE, **EIGHT_B_STYLE)


def test_sparse_greedy_torch_equals_onnxruntime_across_dense_len(sparse_ckpt, tmp_path):
    rng = np.random.default_rng(0)
    prompt = [1] + rng.integers(3, 500, size=499).tolist()  # 500 tokens: decoding crosses 512
    torch_s = edgecpm.Session(sparse_ckpt, backend="torch")
    bundle = export_bundle(sparse_ckpt, tmp_path / "b", progress=False)
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["custom_ops"] == ["InfLLMv2Attention"] and manifest["sparse"]["dense_len"] == 512
    ort_s = edgecpm.Session(bundle, backend="onnxruntime")
    a = torch_s.generate(prompt, max_new_tokens=40, ignore_eos=True)
    b = ort_s.generate(prompt, max_new_tokens=40, ignore_eos=True)
    assert a.token_ids == b.token_ids
    assert torch_s.cache.length > 512
    # The compressed keys the two backends left in their arenas agree.
    n = torch_s.config.sparse.n_chunks(torch_s.cache.length)
    assert np.allclose(torch_s.cache.ckeys[:, :n], ort_s.cache.ckeys[:, :n], atol=1e-5)


def test_sparse_changes_results_past_dense_len(sparse_ckpt, tmp_path):
    """The sparse path is really taken: the same weights run dense give other logits past dense_len."""
    cfg = json.loads((sparse_ckpt / "config.json").read_text())
    dense_dir = tmp_path / "dense"
    dense_dir.mkdir()
    (dense_dir / "model.safetensors").symlink_to(sparse_ckpt / "model.safetensors")
    (dense_dir / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "sparse_config"}))
    ids = [1] + np.random.default_rng(1).integers(3, 500, size=700).tolist()
    sp, de = edgecpm.Session(sparse_ckpt).logits(ids), edgecpm.Session(dense_dir).logits(ids)
    assert np.allclose(sp[:511], de[:511], atol=1e-5)  # dense below dense_len
    assert not np.allclose(sp[600:], de[600:], atol=1e-3)


def test_compressed_keys_follow_appends_and_rollbacks(sparse_ckpt):
    """Property: after any appends, truncations and compactions the arena's compressed keys equal
    the chunk means recomputed from its keys."""
    s = edgecpm.Session(sparse_ckpt, backend="torch")
    sp, cache = s.config.sparse, s.cache
    rng = np.random.default_rng(2)

    def check():
        n = sp.n_chunks(cache.length)
        for layer in range(s.config.num_hidden_layers):
            keys = cache.keys[layer][: cache.length].astype(np.float64)
            want = np.array([keys[16 * j : 16 * j + 32].mean(0) for j in range(n)]).reshape(n, *keys.shape[1:])
            assert np.allclose(cache.past_ck(layer), want, atol=1e-5)

    ids = rng.integers(3, 500, size=200).tolist()
    s.logits(ids)
    check()
    for _ in range(12):
        action = rng.integers(3)
        if action == 0:  # append a few tokens
            extra = rng.integers(3, 500, size=int(rng.integers(1, 40))).tolist()
            s.generate(cache.ids.tolist() + extra, max_new_tokens=int(rng.integers(1, 5)), ignore_eos=True)
        elif action == 1:  # roll back
            s.cache.truncate(int(rng.integers(1, cache.length)))
        else:  # keep a random ascending subset of the tail (speculative compaction)
            start = int(rng.integers(max(cache.length - 40, 0), cache.length))
            tail = np.arange(start, cache.length)
            rows = np.sort(rng.choice(tail, size=int(rng.integers(0, len(tail) + 1)), replace=False))
            cache.keep(start, rows)
        check()


@pytest.mark.parametrize("draft", [None, "self"])
@pytest.mark.parametrize("budget", [1 << 20, 3_000_000])
def test_sparse_session_stays_within_its_budget(sparse_ckpt, draft, budget):
    """The arena, its compressed keys and a (sparse) draft model's arena all come out of kv_budget."""
    s = edgecpm.Session(sparse_ckpt, backend="torch", kv_budget=budget,
                        draft=None if draft is None else edgecpm.SpecConfig(draft=str(sparse_ckpt)))
    m = s.memory()
    allocated = s.cache.arena.nbytes + s.cache.ckeys.nbytes
    assert s.cache.ckeys.nbytes > 0 and allocated == m["kv_allocated_bytes"]
    if draft:
        assert m["draft_kv_allocated_bytes"] == s.draft_cache.arena.nbytes + s.draft_cache.ckeys.nbytes > 0
    assert m["kv_allocated_bytes"] + m["draft_kv_allocated_bytes"] <= budget
    assert m["kv_allocated_bytes"] + m["draft_kv_allocated_bytes"] > 0.9 * budget  # and uses most of it


def test_sparse_refused_for_05b_style(make_checkpoint, tmp_path):
    with pytest.raises(ConfigError, match="16 query heads per kv head"):
        export_bundle(make_checkpoint(num_attention_heads=8, num_key_value_heads=1), tmp_path / "b",
                      sparse=True, progress=False)


@pytest.mark.parametrize("bad, msg", [
    ({"kernel_size": 48}, "kernel_size = 2\\*kernel_stride"),
    ({"semantics": "v3"}, "semantics"),
    ({"use_nope": True}, "use_nope"),
    ({"window_size": 100}, "multiple of block_size"),
])
def test_bad_sparse_config(bad, msg):
    d = json.loads(json.dumps({"model_type": "minicpm", "vocab_size": 10, "hidden_size": 2048,
                               "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 16,
                               "num_key_value_heads": 1, "sparse_config": bad}))
    with pytest.raises(ConfigError, match=msg):
        ModelConfig.from_dict(d)


def test_sparse_fp16_bundle_tracks_fp32(sparse_ckpt, tmp_path):
    """The sparse op's reference function in an fp16 graph (fp32 compressed keys and scores)."""
    ids = [1] + np.random.default_rng(2).integers(3, 500, size=640).tolist()
    fp32 = edgecpm.Session(export_bundle(sparse_ckpt, tmp_path / "32", progress=False)).logits(ids)
    fp16 = edgecpm.Session(export_bundle(sparse_ckpt, tmp_path / "16", dtype="fp16", progress=False)).logits(ids)
    err = np.abs(fp16[520:] - fp32[520:]).max() / np.abs(fp32[520:]).max()
    assert 0 < err < 2e-2, err
