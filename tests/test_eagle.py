"""The EAGLE-head drafter (DESIGN.md §10): the target's `hidden` output, the head's torch model and
ONNX graph, and greedy speculative decoding with a random head equal to plain greedy decoding."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import rel_err

import edgecpm
from edgecpm.config import ModelConfig
from edgecpm.drafters import EagleDrafter, SpecConfig
from edgecpm.errors import ConfigError
from edgecpm.frspec import build_freq_table

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")
PROMPT = [1, 17, 250, 33, 4, 99, 7, 17, 250]


@pytest.fixture(scope="module")
def target(make_checkpoint):
    return make_checkpoint(tie=False)


@pytest.fixture(scope="module")
def target_bundle(target, tmp_path_factory):
    from edgecpm.export.exporter import export_bundle

    return export_bundle(target, tmp_path_factory.mktemp("eagle") / "target", progress=False)


def test_target_hidden_output_matches_torch(target, target_bundle):
    """`hidden` is the LM head's input for every row, on both backends."""
    from edgecpm.export.checkpoint import load_model

    model = load_model(target)
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        out = model(ids)
        np.testing.assert_allclose(out.logits[0], out.hidden[0] @ model.lm_head.weight.T, rtol=1e-5, atol=1e-5)
    for backend in ("torch", "onnxruntime"):
        s = edgecpm.Session(target if backend == "torch" else target_bundle, backend=backend)
        s.logits(PROMPT)
        assert s.backend.last_hidden.shape == (len(PROMPT), model.config.hidden_size)
        assert rel_err(s.backend.last_hidden, out.hidden[0].numpy()) <= 1e-5


# ---- the head ---------------------------------------------------------------------------------------

def make_head(target: Path, folder: Path, mix: float = 0.05, own_head: bool = False, seed: int = 0) -> Path:
    """An EAGLE head that imitates the target's first layer (so it drafts partly right): the
    target's layer 0 as its layer, fc = [I | mix * noise] (the features only nudge it), norm1
    scaled to the embedding's typical RMS. Embedding (and LM head unless own_head) shared."""
    from safetensors.torch import load_file, save_file

    cfg = json.loads((target / "config.json").read_text())
    cfg.update(architectures=["EagleMiniCPMForCausalLM"], num_hidden_layers=1, mup_denominator=1)
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(cfg))
    w = load_file(str(target / "model.safetensors"))
    H = cfg["hidden_size"]
    rng = np.random.default_rng(seed)
    rms = float((w["model.embed_tokens.weight"] * cfg["scale_emb"]).pow(2).mean(-1).sqrt().mean())
    t = {k.replace("model.layers.0.", "model.eagle_layers.0."): v for k, v in w.items()
         if k.startswith("model.layers.0.")}
    t["model.fc.weight"] = torch.cat([torch.eye(H), torch.from_numpy(rng.normal(0, mix, (H, H)).astype(np.float32))], 1)
    t["model.input_norm1.weight"] = torch.full((H,), rms)
    t["model.input_norm2.weight"] = torch.ones(H)
    if own_head:
        t["lm_head.weight"] = w["lm_head.weight"].clone()
    save_file(t, str(folder / "model.safetensors"))
    return folder


@pytest.fixture(scope="module")
def heads(target, tmp_path_factory):
    """The head as a checkpoint and as bundles (plain, and FR-Spec over the ids the target emits most)."""
    from edgecpm.export.exporter import export_bundle

    root = tmp_path_factory.mktemp("heads")
    ckpt = make_head(target, root / "eagle")
    out = {"ckpt": ckpt, "bundle": export_bundle(ckpt, root / "eagle-bundle", eagle_of=target, progress=False)}
    # FR-Spec tables: the ids the target emits on PROMPT and more (partly right drafts), and one
    # leaving every one of them out (no draft can ever be right).
    cfg = ModelConfig.from_file(target)
    emitted = edgecpm.Session(target).generate(PROMPT, max_new_tokens=30, ignore_eos=True).token_ids
    for name, weight in (("frspec", 1), ("frspec-out", 0)):
        counts = np.full(cfg.vocab_size, 1 - weight)
        counts[emitted] = weight
        np.save(root / f"{name}.npy", build_freq_table(counts, cfg.vocab_size // 4, cfg.eos_token_ids, []))
        out[name] = export_bundle(ckpt, root / name, eagle_of=target, frspec=root / f"{name}.npy", progress=False)
    return out


@pytest.fixture(scope="module")
def greedy(target):
    return edgecpm.Session(target).generate(PROMPT, max_new_tokens=30, ignore_eos=True).token_ids


def test_head_onnx_matches_torch(target, heads):
    """The head's graph (shared embedding / LM head filled in from the target) equals its torch forward."""
    from edgecpm.bundle import load_bundle
    from edgecpm.export.checkpoint import load_model
    from edgecpm.export.modeling_eagle import load_eagle
    from edgecpm.kv_cache import KVCache
    from edgecpm.runtimes.onnxruntime import OnnxRuntimeBackend

    head = load_eagle(heads["ckpt"], torch.float32, load_model(target))
    rng = np.random.default_rng(1)
    T, H = 7, head.config.hidden_size
    ids = rng.integers(0, head.config.vocab_size, T)
    feats = rng.normal(0, 1, (T, H)).astype(np.float32)
    mask = np.tril(np.ones((T, T), bool))
    mask[5, 3] = False  # a tree-like mask
    b = OnnxRuntimeBackend(load_bundle(heads["bundle"]))
    cache = KVCache(b.config, 32, b.kv_dtype)
    cache.commit(np.zeros(3, np.int64))  # three rows of zeros as the past
    ref_past = [torch.zeros(1, 3, b.config.num_key_value_heads, b.config.head_dim)] * b.config.num_hidden_layers
    with torch.no_grad():
        ref = head(torch.tensor(ids)[None], torch.arange(3, 3 + T)[None], torch.from_numpy(mask), ref_past, ref_past,
                   hidden_in=torch.from_numpy(feats)[None])
    logits = b.forward(ids, np.arange(3, 3 + T), mask, cache, np.arange(T), hidden_in=feats)
    assert rel_err(logits, ref.logits[0]) <= 1e-4
    assert rel_err(b.last_hidden, ref.hidden[0]) <= 1e-4
    assert rel_err(cache.keys[0][3 : 3 + T], ref.keys[0][0]) <= 1e-4


# ---- speculative decoding with the head -------------------------------------------------------------

def paths(kind, target, target_bundle, heads):
    """(target, draft) paths per backend: torch runs the head checkpoint (sharing the target's
    embedding / LM head), onnxruntime the exported bundles; 'mixed' a torch target + head bundle."""
    return {"torch": (target, heads["ckpt"]), "onnxruntime": (target_bundle, heads["bundle"]),
            "mixed": (target, heads["bundle"])}[kind]


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
@pytest.mark.parametrize("shape", [{"depth": 4, "tree_size": 4}, {"depth": 3, "branch": 2, "tree_size": 6}],
                         ids=["chain", "tree"])
def test_greedy_identical(target, target_bundle, heads, greedy, backend, shape):
    path, draft = paths(backend, target, target_bundle, heads)
    s = edgecpm.Session(path, draft=SpecConfig(draft=str(draft), **shape))
    assert isinstance(s.drafter, EagleDrafter)
    g = s.generate(PROMPT, max_new_tokens=30, ignore_eos=True)
    assert g.token_ids == greedy
    assert g.stats["accepted_per_step"] > 1.2  # the imitating head is often right
    again = s.generate(PROMPT[:4], max_new_tokens=8, ignore_eos=True)  # a new prompt reusing a prefix
    assert again.token_ids == edgecpm.Session(path).generate(PROMPT[:4], max_new_tokens=8, ignore_eos=True).token_ids


@pytest.mark.parametrize("backend", ["mixed", "onnxruntime"])
@pytest.mark.parametrize("table", ["frspec", "frspec-out"])
def test_frspec_head(target, target_bundle, heads, greedy, backend, table):
    """An FR-Spec head (r = V/4) drafts full-vocabulary ids through its table; with a table that
    leaves out every token the target emits, nothing is ever accepted and the output is unchanged."""
    path = target if backend == "mixed" else target_bundle
    s = edgecpm.Session(path, draft=SpecConfig(draft=str(heads[table]), depth=3, branch=2, tree_size=6))
    assert s.drafter.id_map is not None and len(s.drafter.id_map) == s.config.vocab_size // 4
    g = s.generate(PROMPT, max_new_tokens=30, ignore_eos=True)
    assert g.token_ids == greedy
    if table == "frspec-out":
        assert not set(greedy) & set(s.drafter.id_map.tolist())
        assert g.stats["accepted_per_step"] == 1.0
    else:
        assert g.stats["accepted_per_step"] > 1.2


@pytest.mark.parametrize("n", [1, 2, 3, 7, 11])
def test_max_new_tokens_mid_acceptance(target_bundle, heads, greedy, n):
    s = edgecpm.Session(target_bundle, draft=SpecConfig(draft=str(heads["bundle"]), depth=5, tree_size=5))
    g = s.generate(PROMPT, max_new_tokens=n, ignore_eos=True)
    assert g.token_ids == greedy[:n] and g.finish_reason == "length"
    assert s.cache.length == len(PROMPT) + n - 1  # as plain decoding leaves it


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_kv_arenas_equal_one_by_one(target, target_bundle, heads, backend):
    """After accepts and rejects, the target's arena equals plain decoding's, and the head's arena
    equals one run of the head over the context with the target's features (standard pairing)."""
    path, draft = paths(backend, target, target_bundle, heads)
    plain = edgecpm.Session(path)
    plain.generate(PROMPT, max_new_tokens=25, ignore_eos=True)
    s = edgecpm.Session(path, draft=SpecConfig(draft=str(draft), depth=3, branch=2, tree_size=6))
    g = s.generate(PROMPT, max_new_tokens=25, ignore_eos=True)
    assert 1.0 < g.stats["accepted_per_step"] < 4.0  # both accepts and rejects happened
    n = plain.cache.length
    assert s.cache.length == n
    np.testing.assert_allclose(s.cache.arena[:, :, :n], plain.cache.arena[:, :, :n], rtol=1e-4, atol=1e-5)

    # The head has read the context up to the last proposal: rows i = (token i+1, feature i).
    head = s.drafter
    m = head.cache.length
    context = s.cache.ids.copy()
    np.testing.assert_array_equal(head.cache.ids, context[1 : m + 1])
    plain.logits(context[:m].tolist())
    features = plain.backend.last_hidden
    from edgecpm.kv_cache import KVCache

    ref = KVCache(head.backend.config, m, head.backend.kv_dtype)
    head.backend.forward(context[1 : m + 1], np.arange(m), np.tril(np.ones((m, m), bool)), ref,
                         np.array([m - 1]), hidden_in=features)
    np.testing.assert_allclose(head.cache.arena[:, :, :m], ref.arena, rtol=1e-4, atol=1e-5)


def test_target_without_hidden_refused(target_bundle, heads):
    from edgecpm.bundle import load_bundle
    from edgecpm.runtimes.onnxruntime import OnnxRuntimeBackend

    old = OnnxRuntimeBackend(load_bundle(target_bundle))
    old.has_hidden = False  # as a bundle exported before the `hidden` output loads
    with pytest.raises(ConfigError, match="no `hidden` output.*re-export"):
        edgecpm.Session.from_backend(old, draft=str(heads["bundle"]))


def test_head_lacking_embedding_needs_a_torch_target(target_bundle, heads):
    with pytest.raises(Exception, match="--eagle-of"):
        edgecpm.Session(target_bundle, draft=str(heads["ckpt"]))


def test_memory_counts_the_head(target, heads):
    s = edgecpm.Session(target, kv_budget=1 << 20, draft=str(heads["ckpt"]))
    m = s.memory()
    assert m["draft_kv_allocated_bytes"] == s.drafter.cache.bytes_allocated > 0
    assert m["kv_allocated_bytes"] + m["draft_kv_allocated_bytes"] <= 1 << 20


def test_eagle_bundles_run_without_torch(target_bundle, heads, greedy):
    """The device side: an ONNX target with an ONNX FR-Spec head, torch made unimportable."""
    import subprocess
    import sys

    code = (f"import sys; sys.modules['torch'] = None\nimport edgecpm\n"
            f"s = edgecpm.Session({str(target_bundle)!r}, draft={str(heads['frspec'])!r})\n"
            f"print(s.generate({PROMPT}, max_new_tokens=12, ignore_eos=True).token_ids)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(greedy[:12])
