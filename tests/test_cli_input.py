"""Bad input on the command line gives one clear line, never a traceback (DESIGN.md §13)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from edgecpm.cli import main

pytest.importorskip("torch", reason="the tiny checkpoints are written and exported with torch")


@pytest.fixture(scope="module")
def bundle(make_checkpoint, tmp_path_factory):
    pytest.importorskip("onnxruntime")
    from edgecpm.export.exporter import export_bundle

    ckpt = make_checkpoint(tie=False, with_tokenizer=True)
    return export_bundle(ckpt, tmp_path_factory.mktemp("cli") / "b", progress=False)


def edgecpm(*args, stdin: bytes = b"") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgecpm.cli", *map(str, args)], input=stdin, capture_output=True,
                          timeout=300, check=False)


def test_run_refuses_non_utf8_stdin(bundle):
    r = edgecpm("run", bundle, "-p", "-", "--max-new-tokens", "2", stdin=b"caf\xe9 au lait\n")
    assert r.returncode == 2
    assert b"-p -: stdin is not UTF-8 text (byte 0xe9 at offset 3)" in r.stderr and b"Traceback" not in r.stderr


def test_chat_replaces_non_utf8_and_goes_on(bundle):
    r = edgecpm("chat", bundle, "--max-new-tokens", "3", "--ignore-eos", stdin=b"caf\xe9\nhello\n")
    assert r.returncode == 0, r.stderr
    assert r.stderr.count(b"not UTF-8: its undecodable bytes were replaced by U+FFFD") == 1
    assert r.stdout.count(b"> ") >= 3  # both turns answered, then the prompt for a third


def test_chat_says_how_to_continue_when_the_budget_is_full(bundle):
    # A budget of ~40 tokens: the first turn fits, the second does not.
    from edgecpm.session import Session

    per_token = Session(bundle).memory()["kv_bytes_per_token"]
    r = edgecpm("chat", bundle, "--kv-budget", 40 * per_token, "--max-new-tokens", "8", "--ignore-eos",
                stdin=b"hi\n" + b"tell me a long story about the sea " * 3 + b"\n/reset\nhi\n")
    assert r.returncode == 0, r.stderr
    assert b"fills the KV budget" in r.stderr and b"/reset starts a new chat" in r.stderr
    assert b"--kv-policy window" in r.stderr and b"Traceback" not in r.stderr


def test_seed_names_the_argument(bundle, capsys):
    assert main(["run", str(bundle), "-p", "x", "--seed", "-1"]) == 2
    assert "seed=-1: must be an integer in [0, 2**64)" in capsys.readouterr().err


def test_bench_checks_every_drafter_before_measuring(bundle, make_checkpoint, tmp_path, capsys):
    other = make_checkpoint(tie=False, vocab_size=600)
    assert main(["bench", str(bundle), "--draft-compare", "ngram", str(bundle), str(tmp_path / "nope"),
                 "--repeats", "1", "--new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and "expected 'ngram' or a draft bundle/checkpoint folder" in err
    assert "decode" not in err  # nothing was measured first
    assert main(["bench", str(bundle), "--draft-compare", "ngram", str(other), "--repeats", "1"]) == 2
    err = capsys.readouterr().err
    assert "draft vocabulary 600 differs from the target's" in err and "decode" not in err
