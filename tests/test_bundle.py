"""Export -> bundle -> onnxruntime Session: parity, budget, chat reuse, bad bundles, no torch."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import GOLDEN, needs_shared, rel_err, run_without_torch

import edgecpm
from edgecpm.errors import BudgetError, BundleError

pytest.importorskip("onnxruntime")
pytest.importorskip("torch")
from edgecpm.export.exporter import export_bundle

GOLDEN_MODELS = ["like-0.5B", "like-8B"]


def _golden(name):
    from safetensors.numpy import load_file

    return load_file(str(GOLDEN / name / "golden.safetensors"))


@pytest.fixture(scope="module")
def golden_bundles(tmp_path_factory):
    if not GOLDEN.is_dir():
        pytest.skip(f"golden reference outputs not found at {GOLDEN}")
    root = tmp_path_factory.mktemp("bundles")
    return {(n, dt): export_bundle(GOLDEN / n, root / f"{n}-{dt}", dtype=dt, progress=False)
            for n in GOLDEN_MODELS for dt in ("fp32", "fp16")}


@needs_shared
@pytest.mark.parametrize("name", GOLDEN_MODELS)
def test_golden_parity_fp32_bundle(golden_bundles, name):
    g = _golden(name)
    s = edgecpm.Session(golden_bundles[name, "fp32"], backend="onnxruntime")
    assert rel_err(s.logits(g["input_ids"]), g["prompt_logits"]) <= 1e-4
    full = np.concatenate([g["input_ids"], g["greedy_ids"]])
    assert rel_err(s.logits(full), g["full_logits"]) <= 1e-4

    fresh = edgecpm.Session(golden_bundles[name, "fp32"], backend="onnxruntime")
    out = fresh.generate(g["input_ids"].tolist(), max_new_tokens=24, ignore_eos=True)
    assert out.token_ids == g["greedy_ids"].tolist()
    # Prefill of the prompt, then one cached decode step per further token.
    assert out.stats["prefill_tokens"] == 40 and out.stats["decode_tokens"] == 23


@needs_shared
@pytest.mark.parametrize("name", GOLDEN_MODELS)
def test_golden_fp16_bundle(golden_bundles, name, record_property):
    g = _golden(name)
    s = edgecpm.Session(golden_bundles[name, "fp16"])
    err = rel_err(s.logits(g["input_ids"]), g["prompt_logits"])
    record_property("fp16_logit_rel_err", err)
    print(f"{name} fp16 bundle: logits rel err {err:.2e}")
    assert err < 3e-3  # README: ~2e-3 (measured 1.7e-3 / 1.0e-3)
    fresh = edgecpm.Session(golden_bundles[name, "fp16"])
    out = fresh.generate(g["input_ids"].tolist(), max_new_tokens=24, ignore_eos=True)
    assert out.token_ids == g["greedy_ids"].tolist()


def test_manifest_and_graph_io(make_checkpoint, tmp_path):
    import onnx

    b = export_bundle(make_checkpoint(), tmp_path / "b", progress=False)
    m = json.loads((b / "manifest.json").read_text())
    assert m["format_version"] == 1 and m["dtype"] == "fp32"
    assert set(m["files"]) == {"decoder.onnx", "decoder.onnx.data"}
    model = onnx.load(str(b / "decoder.onnx"), load_external_data=False)
    assert [i.name for i in model.graph.input] == [d["name"] for d in m["graphs"]["decoder"]["inputs"]]
    assert [o.name for o in model.graph.output] == [d["name"] for d in m["graphs"]["decoder"]["outputs"]]
    onnx.checker.check_model(str(b / "decoder.onnx"), full_check=True)
    # No leftovers of the atomic write next to the bundle.
    assert [p.name for p in tmp_path.iterdir()] == ["b"]


def test_bundle_matches_torch_checkpoint(make_checkpoint, tmp_path):
    ckpt = make_checkpoint(tie=False)
    ids = list(range(3, 40))
    ref = edgecpm.Session(ckpt, backend="torch")
    b = edgecpm.Session(export_bundle(ckpt, tmp_path / "b", progress=False))
    assert rel_err(b.logits(ids), ref.logits(ids)) <= 1e-5
    assert b.generate(ids, max_new_tokens=12, ignore_eos=True).token_ids == \
        ref.generate(ids, max_new_tokens=12, ignore_eos=True).token_ids


def test_interrupted_export_leaves_nothing(make_checkpoint, tmp_path, monkeypatch):
    from edgecpm.export import exporter

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(exporter.onnx.checker, "check_model", boom)
    with pytest.raises(KeyboardInterrupt):
        export_bundle(make_checkpoint(), tmp_path / "b", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_existing_folder(make_checkpoint, tmp_path):
    (tmp_path / "b").mkdir()
    with pytest.raises(BundleError, match="already exists"):
        export_bundle(make_checkpoint(), tmp_path / "b", progress=False)


def test_session_runs_where_torch_cannot_import(make_checkpoint, tmp_path):
    b = export_bundle(make_checkpoint(), tmp_path / "b", progress=False)
    ref = edgecpm.Session(b).generate([1, 5, 9, 30], max_new_tokens=6, ignore_eos=True).token_ids
    out = run_without_torch(f"""
        import edgecpm
        s = edgecpm.Session({str(b)!r})
        print(s.generate([1, 5, 9, 30], max_new_tokens=6, ignore_eos=True).token_ids)
    """)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(ref)


# ---- the KV budget --------------------------------------------------------------------------

def test_budget_holds_n_tokens(make_checkpoint, tmp_path):
    b = export_bundle(make_checkpoint(), tmp_path / "b", progress=False)
    per_token = edgecpm.Session(b).memory()["kv_bytes_per_token"]
    n, k = 24, 5
    s = edgecpm.Session(b, kv_budget=n * per_token)
    mem = s.memory()
    assert mem["kv_capacity_tokens"] == n and mem["kv_allocated_bytes"] == n * per_token <= s.kv_budget
    prompt = [1] + list(range(10, 10 + n - k - 1))
    assert len(prompt) == n - k
    out = s.generate(prompt, max_new_tokens=100, ignore_eos=True)
    # k free rows: k tokens are fed back after the prompt's; the (k+1)-th sampled token needs none.
    assert out.finish_reason == "length" and len(out.token_ids) == k + 1
    assert s.memory()["kv_used_tokens"] == n and s.memory()["kv_peak_bytes"] <= s.kv_budget
    want = rf"prompt has {n + 1} tokens .* holds {n} tokens \({per_token} bytes per token\)"
    with pytest.raises(BudgetError, match=want):
        s.generate([1] * (n + 1), max_new_tokens=1)
    # Still usable, and equal to an unconstrained session.
    again = s.generate(prompt, max_new_tokens=3, ignore_eos=True)
    assert again.token_ids == edgecpm.Session(b).generate(prompt, max_new_tokens=3, ignore_eos=True).token_ids


# ---- chat reuses the cache ------------------------------------------------------------------

@needs_shared
def test_second_chat_turn_prefills_only_new_tokens(make_checkpoint, tmp_path):
    b = export_bundle(make_checkpoint(with_tokenizer=True), tmp_path / "b", progress=False)
    s = edgecpm.Session(b)
    chat = s.chat(system="You are terse.")
    first = chat.send("Hello there", max_new_tokens=6, ignore_eos=True)
    history = list(chat.ids)
    turn = s.tokenizer.apply_chat_template([{"role": "user", "content": "And now?"}], add_bos=False)
    second = chat.send("And now?", max_new_tokens=6, ignore_eos=True)
    # Cached: the whole history except the reply's last sampled token (a reply stopped by length
    # never feeds it) and the closing "<|im_end|>\n" the template adds after the reply.
    assert first.finish_reason == "length"
    closing = len(s.tokenizer.encode("<|im_end|>\n", add_bos=False))
    assert second.stats["prefill_tokens"] == 1 + closing + len(turn)
    fresh = edgecpm.Session(b).generate(history + turn, max_new_tokens=6, ignore_eos=True)
    assert second.token_ids == fresh.token_ids
    assert first.text and chat.messages[-1]["content"] == second.text


# ---- damaged bundles ------------------------------------------------------------------------

@pytest.fixture
def bundle_copy(make_checkpoint, tmp_path_factory):
    src = export_bundle(make_checkpoint(), tmp_path_factory.mktemp("src") / "b", progress=False)
    dst = tmp_path_factory.mktemp("copy") / "b"
    shutil.copytree(src, dst)
    (dst / ".verified").unlink(missing_ok=True)
    return dst


def test_corrupted_weight_byte(bundle_copy):
    data = bundle_copy / "decoder.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(raw)
    with pytest.raises(BundleError, match=r"decoder\.onnx\.data: sha256 mismatch"):
        edgecpm.Session(bundle_copy)


def test_corruption_caught_with_verify_after_stamp(bundle_copy):
    edgecpm.Session(bundle_copy)  # first load hashes and stamps
    data = bundle_copy / "decoder.onnx.data"
    st = data.stat()
    raw = bytearray(data.read_bytes())
    raw[100] ^= 0x01
    data.write_bytes(raw)
    import os

    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size and mtime: the stamp still matches
    edgecpm.Session(bundle_copy)  # not re-hashed without --verify
    with pytest.raises(BundleError, match="sha256 mismatch"):
        edgecpm.bundle.load_bundle(bundle_copy, verify=True)


def test_deleted_file(bundle_copy):
    (bundle_copy / "decoder.onnx.data").unlink()
    with pytest.raises(BundleError, match=r"decoder\.onnx\.data: missing"):
        edgecpm.Session(bundle_copy)


def test_truncated_file(bundle_copy):
    data = bundle_copy / "decoder.onnx.data"
    data.write_bytes(data.read_bytes()[:-10])
    with pytest.raises(BundleError, match=r"decoder\.onnx\.data: size"):
        edgecpm.Session(bundle_copy)


def test_newer_format_version(bundle_copy):
    m = json.loads((bundle_copy / "manifest.json").read_text())
    m["format_version"] = 99
    (bundle_copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="format version 99 is newer"):
        edgecpm.Session(bundle_copy)


def test_graph_io_mismatch(bundle_copy):
    m = json.loads((bundle_copy / "manifest.json").read_text())
    good = json.dumps(m)
    m["graphs"]["decoder"]["inputs"][0]["name"] = "tokens"
    (bundle_copy / "manifest.json").write_text(json.dumps(m))
    # An input the graph contract needs is missing from the manifest: refused before onnxruntime loads.
    with pytest.raises(BundleError, match='graph "decoder" lacks input_ids that its "config" needs'):
        edgecpm.Session(bundle_copy)
    # A manifest consistent in itself, but not with the ONNX file: refused by the backend.
    m = json.loads(good)
    m["graphs"]["decoder"]["inputs"].append({"name": "hidden_in", "dtype": "float32", "shape": ["T", 64]})
    (bundle_copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="do not match the manifest"):
        edgecpm.Session(bundle_copy)


def test_read_write_manifest(tmp_path, monkeypatch):
    from edgecpm.bundle import FORMAT, FORMAT_VERSION, read_manifest, write_manifest

    m = {"format": FORMAT, "format_version": FORMAT_VERSION, "files": {}, "note": "ü"}
    assert write_manifest(tmp_path, m) == tmp_path / "manifest.json"
    assert read_manifest(tmp_path) == m
    assert read_manifest(tmp_path / "manifest.json") == m
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]  # no temp file left

    def fail(src, dst):  # interrupted before the rename: the old manifest stays whole, no temp file
        raise OSError("disk full")

    monkeypatch.setattr("edgecpm.bundle.os.replace", fail)
    with pytest.raises(BundleError, match=r"manifest\.json: cannot be written"):
        write_manifest(tmp_path, {**m, "note": "new"})
    monkeypatch.undo()
    assert read_manifest(tmp_path) == m
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]


def test_read_manifest_errors_name_the_file(tmp_path):
    from edgecpm.bundle import read_manifest

    with pytest.raises(BundleError, match=r"nothere[/\\]manifest\.json: not found"):
        read_manifest(tmp_path / "nothere")
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match=r"manifest\.json: not valid JSON"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("[1, 2]")
    with pytest.raises(BundleError, match=r"manifest\.json: not an edgecpm bundle manifest"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text('{"format": "other"}')
    with pytest.raises(BundleError, match="format='other'"):
        read_manifest(tmp_path)
    assert read_manifest(tmp_path, check_format=False) == {"format": "other"}
