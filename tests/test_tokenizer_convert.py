"""convert_sentencepiece against sentencepiece itself and a known-good tokenizer.json (MiniCPM4);
load_tokenizer and the export step, which turn a tokenizer.model-only checkpoint into tokenizer.json."""

from __future__ import annotations

import json
import random
import shutil
import sys
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared" / "minicpm4"
pytestmark = pytest.mark.skipif(not SHARED.is_dir(), reason=f"MiniCPM4 reference data not found at {SHARED}")
spm = pytest.importorskip(
    "sentencepiece", reason="sentencepiece not installed (pip install 'edgecpm[export]')"
)

from tokenizers import Tokenizer

from edgecpm.errors import ConfigError
from edgecpm.export.tokenizer_convert import convert_sentencepiece

BOS = 1

# Hand-picked fragments; none contains text that `tokenizers` would match as a *special* token
# ("<s>", "<|im_end|>", ...): sentencepiece reads those as plain text, see test_special_token_text.
FRAGMENTS = [
    # code
    "def f(x):\n    return x + 1",
    "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}",
    '```python\nprint("hi")\n```',
    "SELECT * FROM t WHERE id=42;",
    '<div class="a">x</div>',
    '{"key": [1, 2.5, null], "b": true}',
    "if a != b && c >= d:\n\t\tpass",
    "x = y ** 2  # comment",
    "#include <stdio.h>",
    "fn main() -> Result<(), Box<dyn Error>> {}",
    "    indented    code",
    "a=b+c-d*e/f%g",
    # Chinese / Japanese / Korean and full-width punctuation (many are user-defined pieces)
    "你好，世界！",
    "今天天气很好。。。我们去公园吧",
    "机器学习是人工智能的一个分支。",
    "日本語のテキストです。",
    "カタカナとひらがな",
    "한국어 문장입니다.",
    "《红楼梦》【第一回】『引用』",
    "１２３４５６７８９０",
    "價格：￥１００，折扣％２０",
    "繁體中文測試；＝＜＞－＋／｜",
    "。。。。。。。",
    "問題？答案！、",
    # emoji
    "😀🎉👍🏽",
    "👨\u200d👩\u200d👧\u200d👦 family",
    "🇨🇳🇺🇸",
    "❤️\u200d🔥",
    "🫐🌪🧜",
    # whitespace runs
    " ",
    "  ",
    "   ",
    "\t",
    "\t\t",
    "\n",
    "\n\n",
    "\n\n\n",
    "\r\n",
    " \n ",
    "\u3000",
    "\u00a0",
    "        ",
    # digits
    "3.14159",
    "2024-05-01",
    "1,000,000",
    "0x1F",
    "12345678901234567890",
    "v1.2.3",
    # user-defined pieces, HTML-like and punctuation runs
    "<table><tr><td>1</td></tr></table>",
    "<tbody/><br/></br><br>",
    "<!DOCTYPE>",
    "<!-- note -->",
    "<!--->",
    "<h1>Title</h1><h2>Sub</h2>",
    "<strong>bold</strong><b>b</b>",
    "<p>para</p><li>item</li>",
    "<img>pic</img><img/>",
    "<reserved_500><reserved_12>",
    "<SEP><CLS>",
    "...",
    "....",
    ".....",
    "---",
    "--->",
    "------",
    "+-=",
    "!?!?",
    "‼㊣",
    "<unused1>",
    "<0x41>",
    # prose and mixed case
    "The quick brown fox jumps over the lazy dog.",
    "It's a well-known fact: tokenizers don't always agree -- check them!",
    "Transformers process sequences of tokens, not characters.",
    "Hello World",
    "HELLO world",
    "camelCaseIdentifier",
    "snake_case_name",
    "MiXeD CaSe",
    "iPhone McDonald",
    # URLs
    "https://example.com/path?q=1&r=2#frag",
    "http://www.example.org/",
    "user@example.org",
    "ftp://files.example.net/a/b.tar.gz",
    # other scripts and rare characters (some only reachable through byte fallback)
    "Привет мир",
    "Γειά σου",
    "مرحبا",
    "नमस्ते",
    "สวัสดี",
    "∑∫√∞≠≈",
    "╮╯",
    "e\u0301",
    "zero\u200bwidth",
    "𠀀𠀁",
    "\ue000",
    "\x00\x1b\x7f",
    "\x0b\x0c",
]

SEPARATORS = ["", "", " ", "  ", "\n", "\t", " \n", "\n\n", "   ", " \t "]
CODEPOINT_RANGES = [
    (0x21, 0x7E),
    (0xA0, 0x24F),
    (0x370, 0x3FF),
    (0x400, 0x4FF),
    (0x3040, 0x30FF),
    (0x4E00, 0x9FFF),
    (0xAC00, 0xD7A3),
    (0x1F300, 0x1FAFF),
    (0x20000, 0x2A6DF),
    (0xFF01, 0xFF5E),
]


def _texts() -> list[str]:
    rng = random.Random(20240601)
    texts = ["", *FRAGMENTS]
    for _ in range(500):  # random compositions, sometimes with leading/trailing whitespace
        parts = rng.choices(FRAGMENTS, k=rng.randint(1, 8))
        text = "".join(p + rng.choice(SEPARATORS) for p in parts)
        if rng.random() < 0.3:
            text = rng.choice([" ", "  ", "\n", "\t"]) + text
        if rng.random() < 0.3:
            text += rng.choice([" ", "   ", "\n", " \t"])
        texts.append(text)
    for _ in range(60):  # random code points (many not in the vocab: byte fallback)
        chars = []
        for _ in range(rng.randint(1, 24)):
            lo, hi = rng.choice(CODEPOINT_RANGES)
            chars.append(chr(rng.randint(lo, hi)) if rng.random() < 0.85 else rng.choice(" \n\t"))
        texts.append("".join(chars))
    return texts


TEXTS = _texts()


@pytest.fixture(scope="module")
def added_tokens() -> dict[str, int]:
    return json.loads((SHARED / "MiniCPM4-0.5B" / "added_tokens.json").read_text())


@pytest.fixture(scope="module")
def converted(added_tokens) -> Tokenizer:
    return convert_sentencepiece(SHARED / "tokenizer.model", added_tokens)


@pytest.fixture(scope="module")
def converted_no_bos(added_tokens) -> Tokenizer:
    return convert_sentencepiece(str(SHARED / "tokenizer.model"), added_tokens, add_bos=False)


@pytest.fixture(scope="module")
def reference() -> Tokenizer:
    return Tokenizer.from_file(str(SHARED / "tokenizer.json"))


@pytest.fixture(scope="module")
def sp():
    return spm.SentencePieceProcessor(model_file=str(SHARED / "tokenizer.model"))


def test_texts_are_varied():
    assert len(TEXTS) > 600 and len(set(TEXTS)) > 550


def test_structure_matches_reference(converted):
    ours = json.loads(converted.to_str())
    ref = json.loads((SHARED / "tokenizer.json").read_text())
    for key in ("normalizer", "pre_tokenizer", "post_processor", "decoder", "added_tokens"):
        assert ours[key] == ref[key], key
    assert ours["pre_tokenizer"]["prepend_scheme"] == "never"  # no dummy prefix
    ref_model, our_model = ref["model"], ours["model"]
    assert our_model["vocab"] == ref_model["vocab"]
    assert our_model["merges"] == ref_model["merges"]
    # The reference leaves unk_token unset; we name <unk> (never used: every byte has a piece).
    assert our_model.pop("unk_token") == "<unk>" and ref_model.pop("unk_token") is None
    rest = {k: v for k, v in our_model.items() if k not in ("vocab", "merges")}
    assert rest == {k: v for k, v in ref_model.items() if k not in ("vocab", "merges")}


def test_vocab_size_and_added_ids(converted, converted_no_bos, reference, sp, added_tokens):
    assert sp.get_piece_size() == 73440
    assert converted.get_vocab_size(with_added_tokens=False) == sp.get_piece_size()
    assert converted.get_vocab_size() == reference.get_vocab_size() == 73448
    assert converted_no_bos.get_vocab_size() == 73448
    assert len(added_tokens) == 8
    for content, token_id in added_tokens.items():
        assert converted.token_to_id(content) == token_id == reference.token_to_id(content)
    for token_id in range(sp.get_piece_size()):
        assert converted.id_to_token(token_id) == sp.id_to_piece(token_id)
    decoder = converted.get_added_tokens_decoder()
    assert {i for i, t in decoder.items() if t.special} == {0, 1, 2, *added_tokens.values()}
    assert sum(not t.special for t in decoder.values()) == 1086  # user-defined pieces
    assert converted.post_processor is not None and converted_no_bos.post_processor is None


def test_ids_match_reference_and_sentencepiece(converted, converted_no_bos, reference, sp):
    mismatches, n_tokens = [], 0
    for text in TEXTS:
        want = sp.encode(text)
        n_tokens += len(want)
        got = {
            "converted": converted.encode(text).ids,
            "reference": reference.encode(text).ids,
            "converted, add_special_tokens=False": [BOS]
            + converted.encode(text, add_special_tokens=False).ids,
            "reference, add_special_tokens=False": [BOS]
            + reference.encode(text, add_special_tokens=False).ids,
            "converted add_bos=False": [BOS] + converted_no_bos.encode(text).ids,
        }
        for name, ids in got.items():
            if ids != [BOS] + want:
                mismatches.append((text, name, ids, [BOS] + want))
    assert not mismatches, f"{len(mismatches)} mismatches, first: {mismatches[:3]}"
    assert n_tokens > 15_000


def test_decode_round_trip(converted, reference, sp):
    for text in TEXTS:
        ids = converted.encode(text).ids
        assert converted.decode(ids) == text
        assert converted.decode(ids) == reference.decode(ids)
        assert converted.decode(ids, skip_special_tokens=False) == "<s>" + text
        assert sp.decode(ids[1:]) == text


def test_special_token_text(converted, reference, added_tokens):
    """Text holding special tokens (chat template): matched whole, like the reference does."""
    chat = "<|im_start|>user\n你好 <table>...<|im_end|>\n<|im_start|>assistant\n<s>x</s><unk>"
    for text in (chat, "<|fim_prefix|>a<|fim_suffix|>b<|fim_middle|>", "<|tool_call|><|execute_start|>"):
        ids = converted.encode(text).ids
        assert ids == reference.encode(text).ids
        assert converted.decode(ids, skip_special_tokens=False) == "<s>" + text
    ids = converted.encode(chat).ids
    assert ids[:3] == [BOS, added_tokens["<|im_start|>"], converted.token_to_id("user")]
    assert ids.count(added_tokens["<|im_end|>"]) == 1
    assert ids[-4:] == [1, converted.token_to_id("x"), 2, 0]  # <s> </s> <unk> in text: special here


def test_added_token_ids_must_continue_vocab():
    with pytest.raises(ValueError, match="next free id"):
        convert_sentencepiece(SHARED / "tokenizer.model", {"<|gap|>": 80000})
    with pytest.raises(ValueError, match="already has id"):
        convert_sentencepiece(SHARED / "tokenizer.model", {"<s>": 5})


def test_missing_sentencepiece_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "sentencepiece", None)
    with pytest.raises(ImportError, match=r"pip install 'edgecpm\[export\]'"):
        convert_sentencepiece(SHARED / "tokenizer.model")


@pytest.fixture
def sp_checkpoint(make_checkpoint, tmp_path):
    """A tiny checkpoint whose tokenizer is a SentencePiece tokenizer.model only."""
    from conftest import copy_checkpoint

    folder = copy_checkpoint(make_checkpoint(with_tokenizer=True), tmp_path / "ckpt")
    (folder / "tokenizer.json").unlink()
    shutil.copy(SHARED / "tokenizer.model", folder / "tokenizer.model")
    shutil.copy(SHARED / "MiniCPM4-0.5B" / "added_tokens.json", folder / "added_tokens.json")
    return folder


def test_load_tokenizer_converts(sp_checkpoint, reference):
    from edgecpm.export.tokenizer_convert import load_tokenizer

    tok = load_tokenizer(sp_checkpoint)
    for text in TEXTS[:200]:
        assert tok.encode(text, add_bos=False) == reference.encode(text, add_special_tokens=False).ids
    assert {2, 73440} <= set(tok.eos_token_ids)
    (sp_checkpoint / "added_tokens.json").write_text("{oops")
    with pytest.raises(ConfigError, match=r"added_tokens\.json: not valid JSON"):
        load_tokenizer(sp_checkpoint)


def test_export_writes_tokenizer_json(sp_checkpoint, reference, tmp_path):
    """Conversion happens at export: the bundle carries tokenizer.json, read by the device side."""
    pytest.importorskip("torch")
    pytest.importorskip("onnx")
    import edgecpm
    from edgecpm.export.exporter import export_bundle

    bundle = export_bundle(sp_checkpoint, tmp_path / "bundle", progress=False)
    assert (bundle / "tokenizer.json").exists() and not (bundle / "tokenizer.model").exists()
    assert "tokenizer.json" in edgecpm.bundle.read_manifest(bundle)["files"]
    tok = edgecpm.Tokenizer.from_pretrained(bundle)
    for text in TEXTS[:200]:
        assert tok.encode(text, add_bos=False) == reference.encode(text, add_special_tokens=False).ids
