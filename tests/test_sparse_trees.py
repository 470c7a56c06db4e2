"""Draft trees under InfLLM v2 sparse attention stay lossless, end to end (DESIGN.md §7, §10).

A tree step writes its nodes to cache slots P..P+T-1 while their positions are P + depth, so a
node's slot can sit in the next 64-token block while its position does not. The target below is
8B-shaped (16 query heads per kv head) and sparse from position 63 on, with a one-block window and
top-1 so that block selection decides what a query sees once the context passes 192 tokens; it
drafts for itself, so accepted paths run deep through the trees. Greedy output must equal plain
decoding token for token, on the torch backend (checkpoint) and onnxruntime (exported bundle),
for chains and trees alike.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import tiny_config, write_weights

import edgecpm

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")
from edgecpm.export.exporter import export_bundle

SPARSE = {"dense_len": 64, "window_size": 64, "topk": 1}
PROMPT = 200  # the prompt already needs selection; 192 new tokens cross the blocks at 256, 320 and 384
NEW_TOKENS = 192


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The model is tiny: one thread is as fast, and it does not stall when the cores are shared
    (two threads wait on each other at every small op then, 30x slower)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def targets(tmp_path_factory):
    """{backend: model path}: a tiny sparse 8B-shaped checkpoint and its bundle. Its query and key
    projections are scaled up (x4) so attention is peaked and one hidden row changes the argmax
    (with the seed-3 weights, hiding tree rows by slot diverges within 120 tokens for branch 2-4)."""
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("sparse_tree_ckpt")
    cfg = tiny_config(tie=False, hidden_size=512, num_attention_heads=16, num_key_value_heads=1,
                      intermediate_size=128, num_hidden_layers=2, rms_norm_eps=1e-6, sparse_config=SPARSE)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    tensors = write_weights(folder, cfg, seed=3)
    tensors = {n: w * 4 if n.endswith(("q_proj.weight", "k_proj.weight")) else w for n, w in tensors.items()}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    bundle = export_bundle(folder, tmp_path_factory.mktemp("sparse_tree_bundle") / "b", progress=False)
    return {"torch": folder, "onnxruntime": bundle}


@pytest.fixture(scope="module")
def prompt():
    return [1] + np.random.default_rng(0).integers(3, 500, size=PROMPT - 1).tolist()


@pytest.fixture(scope="module")
def plain(targets, prompt):
    """Plain greedy decoding per backend (computed once)."""
    return {name: edgecpm.Session(path, backend=name).generate(prompt, max_new_tokens=NEW_TOKENS,
                                                               ignore_eos=True).token_ids
            for name, path in targets.items()}


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
@pytest.mark.parametrize("branch", [1, 2, 3, 4])
def test_self_drafted_trees_equal_plain_greedy(targets, prompt, plain, backend, branch):
    path = targets[backend]
    spec = edgecpm.SpecConfig(draft=str(path), branch=branch, depth=6, tree_size=min(6 * branch, 12))
    g = edgecpm.Session(path, backend=backend, draft=spec).generate(prompt, max_new_tokens=NEW_TOKENS,
                                                                    ignore_eos=True)
    want = plain[backend]
    assert len(want) == NEW_TOKENS
    first = next((i for i, (a, b) in enumerate(zip(g.token_ids, want, strict=False)) if a != b), None)
    assert g.token_ids == want, f"branch {branch}: first differs at new token {first}"
    assert g.stats["accepted_per_step"] > 2  # the drafts were accepted deep: trees were really verified


def test_backends_agree(plain):
    assert plain["torch"] == plain["onnxruntime"]
