"""Bundle integrity (DESIGN.md §5, §13): bit rot caught by a forced re-hash (load_bundle(verify=True),
Session(verify=True), `edgecpm verify`), a manifest whose file list, hashes or keys are missing or
whose config disagrees with its graph refused with a BundleError naming manifest.json, and a damaged
cached demo bundle named for deletion."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

import edgecpm
from edgecpm.bundle import MANIFEST, STAMP, load_bundle, verify_bundle
from edgecpm.cli import build_parser, main
from edgecpm.errors import BundleError, ConfigError

pytest.importorskip("onnxruntime")
pytest.importorskip("torch")
from edgecpm.export.exporter import export_bundle


@pytest.fixture(scope="module")
def source(make_checkpoint, tmp_path_factory):
    return export_bundle(make_checkpoint(with_tokenizer=True), tmp_path_factory.mktemp("src") / "b", progress=False)


@pytest.fixture
def bundle(source, tmp_path):
    dst = shutil.copytree(source, tmp_path / "b")
    (dst / STAMP).unlink(missing_ok=True)
    return dst


def _flip_keeping_mtime(path, offset=100):
    st = path.stat()
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x01
    path.write_bytes(raw)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _edit(bundle, change):
    m = json.loads((bundle / MANIFEST).read_text())
    change(m)
    (bundle / MANIFEST).write_text(json.dumps(m))


# ---- bit rot: same size, same mtime -------------------------------------------------------------

def test_bit_rot_is_caught_by_a_forced_rehash(bundle, capsys):
    load_bundle(bundle)  # hashes and stamps
    _flip_keeping_mtime(bundle / "decoder.onnx.data")
    load_bundle(bundle)  # the stamp still matches: not re-hashed (the documented fast path)
    with pytest.raises(BundleError, match=r"decoder\.onnx\.data: sha256 mismatch"):
        load_bundle(bundle, verify=True)
    with pytest.raises(BundleError, match=r"decoder\.onnx\.data: sha256 mismatch"):
        edgecpm.Session(bundle, verify=True)
    # A failed check drops the stamp: the next plain load hashes and refuses the bundle.
    assert not (bundle / STAMP).exists()
    with pytest.raises(BundleError, match="sha256 mismatch"):
        load_bundle(bundle)


def test_verify_bundle_reports_bit_rot_and_drops_the_stamp(bundle):
    load_bundle(bundle)
    _flip_keeping_mtime(bundle / "decoder.onnx.data")
    load_bundle(bundle)  # stamp still valid
    report = verify_bundle(bundle)
    assert not report.ok and report.problems == ["decoder.onnx.data: sha256 mismatch (corrupted)"]
    assert not (bundle / STAMP).exists()
    with pytest.raises(BundleError, match=r"decoder\.onnx\.data: sha256 mismatch"):
        load_bundle(bundle)


def test_verify_cli_ok_then_lists_every_bad_file(bundle, capsys):
    files = json.loads((bundle / MANIFEST).read_text())["files"]
    assert main(["verify", str(bundle)]) == 0
    out = capsys.readouterr().out
    total = sum(r["size"] for r in files.values())
    assert out.strip() == f"{bundle}: OK, {len(files)} files, {total} bytes match manifest.json (sha256)"
    assert (bundle / STAMP).exists()

    _flip_keeping_mtime(bundle / "decoder.onnx.data")
    _flip_keeping_mtime(bundle / "tokenizer.json", offset=10)
    (bundle / "generation_config.json").unlink()
    (bundle / "tokenizer_config.json").write_text("{}")
    assert main(["verify", str(bundle)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"edgecpm: error: {bundle}: 4 of {len(files)} files do not match manifest.json:")
    for line in ("  generation_config.json: missing",
                 f"  tokenizer_config.json: 2 bytes, manifest.json says {files['tokenizer_config.json']['size']}",
                 "  decoder.onnx.data: sha256 mismatch (corrupted)",
                 "  tokenizer.json: sha256 mismatch (corrupted)"):
        assert line in err.splitlines(), err
    assert "Traceback" not in err


def test_verify_help_has_examples(capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["verify", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "edgecpm verify bundle-0.5B/" in out


def test_verify_not_a_bundle(tmp_path, capsys):
    assert main(["verify", str(tmp_path)]) == 2
    assert f"{tmp_path}: no manifest.json" in capsys.readouterr().err


def test_verify_covers_engines(bundle):
    engine = bundle / "engines" / "gpu-trt10.engine"
    engine.parent.mkdir()
    engine.write_bytes(b"serialized engine")
    import hashlib

    rec = {"file": "engines/gpu-trt10.engine", "gpu": "GPU", "compute_capability": "8.7", "tensorrt": "10",
           "size": engine.stat().st_size, "sha256": hashlib.sha256(engine.read_bytes()).hexdigest()}
    _edit(bundle, lambda m: m.update(engines=[rec]))
    n = len(json.loads((bundle / MANIFEST).read_text())["files"]) + 1
    assert verify_bundle(bundle).ok and verify_bundle(bundle).files == n
    _flip_keeping_mtime(engine, offset=3)
    assert verify_bundle(bundle).problems == ["engines/gpu-trt10.engine: sha256 mismatch (corrupted)"]
    engine.unlink()
    assert verify_bundle(bundle).problems == ["engines/gpu-trt10.engine: missing"]
    load_bundle(bundle)  # an engine is checked by the backend that runs it, not by every load


# ---- the manifest itself ------------------------------------------------------------------------

def test_zeroed_hashes_are_refused_even_with_a_stamp(bundle):
    load_bundle(bundle)  # stamped
    _edit(bundle, lambda m: [r.update(sha256="0" * 64) for r in m["files"].values()])
    with pytest.raises(BundleError, match="sha256 mismatch"):
        edgecpm.Session(bundle)


def _drop(*path):
    def change(m):
        d = m
        for key in path[:-1]:
            d = d[key]
        del d[path[-1]]
    return change


def _set(value, *path):
    def change(m):
        d = m
        for key in path[:-1]:
            d = d[key]
        d[path[-1]] = value
    return change


def _sparse(m):
    m["config"]["sparse_config"] = {"dense_len": 64, "window_size": 64, "topk": 1}


DAMAGED = {
    "no files": (_drop("files"), "required key(s) 'files' missing"),
    "no graphs": (_drop("graphs"), "required key(s) 'graphs' missing"),
    "no config": (_drop("config"), "required key(s) 'config' missing"),
    "no dtype": (_drop("dtype"), "required key(s) 'dtype' missing"),
    "bad dtype": (_set("int3", "dtype"), "\"dtype\" must be one of fp32, fp16, bf16, got 'int3'"),
    "files empty": (_set({}, "files"),
                    ('"files" has no size/sha256 record for decoder.onnx, decoder.onnx.data, generation_config.json, '
                    "tokenizer.json, tokenizer_config.json (graph \"decoder\"'s file, graph \"decoder\"'s external "
                    "weights, a tokenizer file, a tokenizer file, a tokenizer file)")),
    "files a list": (_set([], "files"), '"files" must be an object, got list'),
    "weights unlisted": (_drop("files", "decoder.onnx.data"),
                         ("\"files\" has no size/sha256 record for decoder.onnx.data (graph \"decoder\"'s external "
                         "weights)")),
    "tokenizer unlisted": (_drop("files", "tokenizer.json"),
                           '"files" has no size/sha256 record for tokenizer.json (a tokenizer file)'),
    "graph file unlisted": (_set("other.onnx", "graphs", "decoder", "file"),
                            '"files" has no size/sha256 record for other.onnx, other.onnx.data'),
    "no sha256": (_drop("files", "decoder.onnx", "sha256"),
                  "\"files\" entry 'decoder.onnx' has no valid sha256 (64 lowercase hex digits), got None"),
    "short sha256": (_set("abc", "files", "decoder.onnx", "sha256"),
                     "\"files\" entry 'decoder.onnx' has no valid sha256 (64 lowercase hex digits), got 'abc'"),
    "no size": (_drop("files", "decoder.onnx", "size"), "\"files\" entry 'decoder.onnx' has no valid size (bytes)"),
    "size a string": (_set("12", "files", "decoder.onnx", "size"),
                      "\"files\" entry 'decoder.onnx' has no valid size (bytes), got '12'"),
    "record not an object": (_set("x", "files", "decoder.onnx"),
                             "\"files\" entry 'decoder.onnx' must be an object with size and sha256"),
    "path outside": (_set({"size": 1, "sha256": "0" * 64}, "files", "../secret"),
                     "\"files\" entry '../secret' must name a file inside the bundle, got '../secret'"),
    "no decoder graph": (_set({}, "graphs"), '"graphs" has no "decoder" entry'),
    "graph inputs missing": (_drop("graphs", "decoder", "inputs"),
                             'graph "decoder" "inputs" must be a list of {"name", "dtype", "shape"} objects'),
    "more layers in config": (_set(3, "config", "num_hidden_layers"),
                              ('"config" has num_hidden_layers 3 but graph "decoder" lists 2 past_key.* '
                              "inputs (0, 1)")),
    "fewer layers in config": (_set(1, "config", "num_hidden_layers"),
                               '"config" has num_hidden_layers 1 but graph "decoder" lists 2 past_key.*'),
    "kv heads changed": (_set(1, "config", "num_key_value_heads"),
                         'graph "decoder" input past_key.0 has shape ["P", 2, 16], but "config" needs ["P", 1, 16]'),
    "vocab changed": (_set(80000, "config", "vocab_size"),
                      'graph "decoder" output logits has shape ["N", 73448], but vocab_size is 80000'),
    "sparse config, dense graph": (_sparse, 'graph "decoder" lacks past_ckey.0, past_ckey.1, ckey.0, ckey.1'),
    "engine without hash": (_set([{"file": "engines/x.engine", "size": 5}], "engines"),
                            "\"engines\" entry 0 (engines/x.engine) has no valid sha256"),
    "engines not a list": (_set({"file": "engines/x.engine"}, "engines"),
                           '"engines" must be a list of engine records'),
    "tokenizer files not a list": (_set({"files": "tokenizer.json"}, "tokenizer"),
                                   '"tokenizer.files" must be a list of file names'),
}


@pytest.mark.parametrize("case", sorted(DAMAGED))
def test_damaged_manifest_is_refused(bundle, case):
    change, message = DAMAGED[case]
    _edit(bundle, change)
    for load in (load_bundle, edgecpm.Session, verify_bundle):
        with pytest.raises(BundleError) as e:
            load(bundle)
        msg = str(e.value)
        assert msg.startswith(f"{bundle / MANIFEST}: ") and message in msg, msg
        assert msg.endswith("re-export the bundle (or re-copy it whole)")


def test_manifest_config_with_a_bad_value(bundle):
    _edit(bundle, _set("big", "config", "hidden_size"))
    with pytest.raises(ConfigError) as e:
        edgecpm.Session(bundle)
    assert str(e.value) == f'{bundle / MANIFEST} ("config"): "hidden_size" must be a positive integer, got "big"'


def test_frspec_table_must_be_listed(make_checkpoint, tmp_path):
    freq = tmp_path / "freq.npy"
    np.save(freq, np.arange(64, dtype=np.int32))
    draft = export_bundle(make_checkpoint(), tmp_path / "draft", frspec=freq, progress=False)
    load_bundle(draft)
    good = (draft / MANIFEST).read_text()
    _edit(draft, _drop("files", "freq.npy"))
    with pytest.raises(BundleError, match=r'"files" has no size/sha256 record for freq\.npy \(the FR-Spec table of '):
        load_bundle(draft)
    (draft / MANIFEST).write_text(good)
    _edit(draft, _set({"frspec": {"file": "freq.npy", "r": 32}}, "spec"))
    with pytest.raises(BundleError, match=r"output logits has shape \[.N., 64\], but spec\.frspec\.r is 32"):
        load_bundle(draft)


# ---- the demo's cache ---------------------------------------------------------------------------

def test_damaged_demo_cache_names_the_folder_to_delete(make_checkpoint, tmp_path, monkeypatch, capsys):
    shutil.copytree(make_checkpoint(tie=False, with_tokenizer=True), tmp_path / "models" / "target")
    monkeypatch.setenv("EDGECPM_CACHE", str(tmp_path / "cache"))
    args = ["demo", "--models", str(tmp_path / "models"), "--max-new-tokens", "2"]
    assert main(args) == 0
    capsys.readouterr()
    (cached,) = (tmp_path / "cache" / "demo").iterdir()
    _flip_keeping_mtime(cached / "decoder.onnx.data")  # bit rot: same size and mtime
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"the cached demo bundle {cached} is damaged" in err and "decoder.onnx.data: sha256 mismatch" in err
    assert f"Delete that folder (rm -r '{cached}') and run `edgecpm demo` again" in err
    shutil.rmtree(cached)
    assert main(args) == 0  # re-exported


def test_verify_runs_without_torch(bundle):
    from conftest import run_without_torch

    out = run_without_torch(f"""
        from edgecpm.cli import main
        assert main(["verify", {str(bundle)!r}]) == 0
    """)
    assert out.returncode == 0, out.stderr
    assert ": OK, " in out.stdout
