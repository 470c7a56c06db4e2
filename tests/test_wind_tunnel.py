"""The built-in wind-tunnel models load like any MiniCPM4 checkpoint and meet the foundation's
parity rules: cached decoding equals full recomputation, and the exported bundle (onnxruntime)
matches the torch backend within 1e-4 with identical greedy tokens."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import rel_err

import edgecpm

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")
from edgecpm.export.exporter import export_bundle

MODELS = Path(__file__).resolve().parents[1] / "samples" / "wind_tunnel"
PROMPT = "import os\n\n\ndef list_files(path):\n"


@pytest.mark.parametrize("name", ["target", "draft"])
def test_wind_tunnel_parity(name, tmp_path):
    path = MODELS / name
    if not (path / "model.safetensors").exists():
        pytest.skip(f"{path} has no weights")
    torch_s = edgecpm.Session(path, backend="torch")
    ids = torch_s.tokenizer.encode(PROMPT)
    g = torch_s.generate(ids, max_new_tokens=16, ignore_eos=True)
    # Cached decoding equals recomputing the whole sequence for every token.
    full = torch_s.logits(ids + g.token_ids)
    assert np.argmax(full[len(ids) - 1 : -1], axis=-1).tolist() == g.token_ids

    bundle = edgecpm.Session(export_bundle(path, tmp_path / "b", progress=False), backend="onnxruntime")
    assert rel_err(bundle.logits(ids + g.token_ids), full) <= 1e-4
    assert bundle.generate(ids, max_new_tokens=16, ignore_eos=True).token_ids == g.token_ids
    assert g.text == bundle.tokenizer.decode(g.token_ids)


def test_wind_tunnel_eagle_head(tmp_path):
    """The shipped EAGLE head (fc, two input norms, one layer; the target's embedding and LM head)
    exports with --eagle-of and drafts for the target bundle: greedy output equals plain decoding,
    on both the exported head (onnxruntime) and the checkpoint (torch, sharing the target's tensors)."""
    from edgecpm.drafters import SpecConfig
    from edgecpm.safetensors_files import tensor_names

    head = MODELS / "eagle"
    if not (head / "model.safetensors").exists():
        pytest.skip(f"{head} has no weights")
    assert not {"model.embed_tokens.weight", "lm_head.weight"} & tensor_names(head)
    target = export_bundle(MODELS / "target", tmp_path / "target", progress=False)
    bundle = export_bundle(head, tmp_path / "eagle", eagle_of=MODELS / "target", progress=False)
    plain = edgecpm.Session(target)
    ids = plain.tokenizer.encode(PROMPT)
    want = plain.generate(ids, max_new_tokens=24, ignore_eos=True).token_ids
    for path, draft in ((target, bundle), (MODELS / "target", head)):
        s = edgecpm.Session(path, draft=SpecConfig(draft=str(draft), depth=4, tree_size=4))
        g = s.generate(ids, max_new_tokens=24, ignore_eos=True)
        assert g.token_ids == want
        assert g.stats["accepted_per_step"] > 1.5  # it drafts for real (a random head gets ~1.0)
