"""Structured output in the Python API: Session.generate(json_schema=...) on the wind-tunnel target
(a model that only ever saw Python code) returns JSON that parses and validates; with a drafter the
request decodes without drafting and gives the same output."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("llguidance")
pytest.importorskip("torch")  # to export the wind-tunnel checkpoint
pytest.importorskip("onnxruntime")  # which runs as a bundle (many times faster than torch on CPU)
jsonschema = pytest.importorskip("jsonschema")

import edgecpm
from edgecpm.sampling import Sampler, SamplingParams
from edgecpm.structured import JsonConstraint

TARGET = Path(__file__).resolve().parents[1] / "samples" / "wind_tunnel" / "target"
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["path", "lines", "binary"],
          "properties": {"path": {"type": "string", "maxLength": 16},
                         "lines": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99},
                                   "maxItems": 3},
                         "binary": {"type": "boolean"}}}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    from edgecpm.export.exporter import export_bundle

    if not (TARGET / "model.safetensors").exists():
        pytest.skip(f"{TARGET} has no weights")
    return export_bundle(TARGET, tmp_path_factory.mktemp("structured") / "target", progress=False)


@pytest.fixture(scope="module")
def session(bundle):
    return edgecpm.Session(bundle)


def test_json_schema_output_validates(session):
    plain = session.generate("def open_file(path):\n", max_new_tokens=24)
    assert not plain.text.lstrip().startswith("{")  # unconstrained, it writes code
    for prompt in ("def open_file(path):\n", "import os\n", "class Tree:\n"):
        g = session.generate(prompt, max_new_tokens=64, json_schema=SCHEMA)
        assert g.finish_reason == "eos", g.text
        jsonschema.validate(json.loads(g.text), SCHEMA)
    g = session.generate("import os\n", max_new_tokens=64, json_schema={"type": "object"}, temperature=0.8, seed=3)
    assert isinstance(json.loads(g.text), dict)


def test_constrained_requests_decode_without_drafting(session, bundle):
    spec = edgecpm.Session(bundle, draft="ngram")
    want = session.generate("import os\n", max_new_tokens=48, json_schema=SCHEMA)
    got = spec.generate("import os\n", max_new_tokens=48, json_schema=SCHEMA)
    assert got.text == want.text and got.stats["accepted_per_step"] == 1.0


def test_sampler_draws_only_allowed_tokens(session):
    """Sampling at a high temperature from uniform logits still follows the grammar token by token."""
    tok = session.tokenizer
    vocab = session.config.vocab_size
    c = JsonConstraint(tok, {"type": "object", "properties": {"a": {"type": "boolean"}}, "required": ["a"],
                             "additionalProperties": False}, vocab, session.eos_ids)
    sampler = Sampler(SamplingParams(temperature=2.0, seed=0), vocab, constraint=c)
    ids = []
    while True:
        allowed = c.allowed()
        token = sampler(np.zeros(vocab, np.float32))
        assert allowed[token]
        sampler.observe(token)
        if token in session.eos_ids:
            break
        ids.append(token)
    assert json.loads(tok.decode(ids)) in ({"a": True}, {"a": False})


def test_bad_schemas_are_refused(session):
    with pytest.raises(ValueError, match="json_schema"):
        session.generate("x", json_schema={"type": "no-such-type"})
    with pytest.raises(ValueError, match="EOS"):
        session.generate("x", json_schema=SCHEMA, ignore_eos=True)
