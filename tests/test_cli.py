"""The edgecpm command line, run in-process through edgecpm.cli.main."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgecpm.cli import build_parser, main

pytest.importorskip("torch")


@pytest.mark.parametrize("command", ["export", "build", "run", "chat", "bench", "freq", "ngrams", "inspect", "demo"])
def test_every_command_has_help_with_examples(command, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([command, "--help"])
    assert e.value.code == 0
    assert "examples:" in capsys.readouterr().out


def test_export_run_inspect(make_checkpoint, tmp_path, capsys):
    ckpt = make_checkpoint(tie=False, with_tokenizer=True)
    assert main(["export", str(ckpt), "-o", str(tmp_path / "b")]) == 0
    assert main(["run", str(tmp_path / "b"), "-p", "Hello", "--max-new-tokens", "5", "--ignore-eos", "--stats"]) == 0
    out = capsys.readouterr()
    assert "finish_reason: length" in out.err and "decode_tokens: 4" in out.err
    assert main(["inspect", str(tmp_path / "b"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "bundle" and info["config"]["layers"] == 2  # test_inspect.py checks the numbers
    assert main(["run", str(tmp_path / "b"), "-p", "Hello", "--temperature", "-1"]) == 2
    assert "temperature" in capsys.readouterr().err


def test_freq_then_frspec_export_then_bench_with_drafts(make_checkpoint, tmp_path, capsys):
    ckpt = make_checkpoint(tie=False, with_tokenizer=True)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("def add(a, b):\n    return a + b\n" * 50)
    (corpus / "b.txt").write_text("The quick brown fox jumps over the lazy dog. " * 40)
    assert main(["freq", "--tokenizer", str(ckpt), str(corpus), "-r", "64", "-o", str(tmp_path / "freq.npy")]) == 0
    table = np.load(tmp_path / "freq.npy")
    assert table.dtype == np.int32 and len(table) == 64 and len(set(table.tolist())) == 64
    assert {2, 73440} <= set(table.tolist()) and 1 not in table  # EOS forced in, BOS (special) not counted
    assert main(["export", str(ckpt), "-o", str(tmp_path / "draft"), "--frspec", str(tmp_path / "freq.npy")]) == 0
    capsys.readouterr()
    assert main(["bench", str(ckpt), "--draft-compare", "ngram", str(tmp_path / "draft"), "--repeats", "1",
                 "--prompt-len", "16", "--new-tokens", "8", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["configs"]) == {"plain", "ngram", str(tmp_path / "draft")}
    assert all(r["decode_tok_s"] > 0 for r in result["configs"].values())


def test_ngrams_table_then_run_with_draft_corpus(make_checkpoint, tmp_path, capsys):
    """`edgecpm ngrams` writes a table; `--draft ngram --draft-corpus` runs default_spec's n-gram
    drafter with it (same greedy text as without: the target decides); without an n-gram drafter,
    or with a file that is not a table, it is a one-line error before any model loads."""
    from edgecpm.cli_options import spec_config
    from edgecpm.ngram_table import NgramTable

    ckpt = make_checkpoint(tie=False, with_tokenizer=True)
    (tmp_path / "corpus.txt").write_text("def add(a, b):\n    return a + b\n" * 50)
    table = tmp_path / "ngrams.npz"
    assert main(["ngrams", "--tokenizer", str(ckpt), str(tmp_path / "corpus.txt"), "-o", str(table)]) == 0
    assert len(NgramTable.load(table)) > 0 and "n-grams of 1-4 tokens" in capsys.readouterr().err
    assert main(["export", str(ckpt), "-o", str(tmp_path / "b")]) == 0
    run = ["run", str(tmp_path / "b"), "-p", "def add(a, b):", "--max-new-tokens", "12", "--ignore-eos"]
    spec = spec_config(build_parser().parse_args([*run, "--draft", "ngram", "--draft-corpus", str(table)]))
    assert spec.corpus == str(table) and spec.ngram_max == 6  # default_spec's drafter, with the table
    capsys.readouterr()
    assert main([*run, "--draft", "ngram"]) == 0
    plain = capsys.readouterr().out
    assert main([*run, "--draft", "ngram", "--draft-corpus", str(table)]) == 0
    assert capsys.readouterr().out == plain
    assert main([*run, "--draft-corpus", str(table)]) == 2
    assert "--draft ngram" in capsys.readouterr().err
    pytest.importorskip("fastapi")
    assert main(["serve", str(tmp_path / "b"), "--draft-corpus", str(table)]) == 2  # refused before serving
    assert "--draft ngram" in capsys.readouterr().err
    (tmp_path / "bad.npz").write_bytes(b"not a table")
    assert main([*run, "--draft", "ngram", "--draft-corpus", str(tmp_path / "bad.npz")]) == 2
    assert "not an n-gram table" in capsys.readouterr().err


def test_errors_are_one_line(tmp_path, capsys):
    assert main(["run", str(tmp_path / "nothing"), "-p", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("edgecpm: error:") and "Traceback" not in err


def test_demo_exports_once_then_reuses_the_cache(make_checkpoint, tmp_path, monkeypatch, capsys):
    import shutil

    ckpt = make_checkpoint(tie=False, with_tokenizer=True)
    for name in ("target", "draft"):
        shutil.copytree(ckpt, tmp_path / "models" / name)
    monkeypatch.setenv("EDGECPM_CACHE", str(tmp_path / "cache"))
    args = ["demo", "--models", str(tmp_path / "models"), "--max-new-tokens", "6"]
    assert main(args) == 0
    first = capsys.readouterr()
    assert first.err.count("exporting") == 2 and "tokens per step" in first.err
    assert main(args) == 0
    assert "exporting" not in capsys.readouterr().err
