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
