"""edgecpm.Tokenizer on the MiniCPM4 tokenizer files (DESIGN.md §3, §4)."""

from __future__ import annotations

import json
import random
import shutil

import pytest
from conftest import SHARED, needs_shared

from edgecpm import Tokenizer
from edgecpm.errors import ConfigError

pytestmark = needs_shared

BOS, EOS, IM_END, IM_START = 1, 2, 73440, 73441

PIECES = [
    "def f(x):\n    return x + 1\n",
    "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}",
    'print("héllo, wörld")',
    "SELECT id FROM t WHERE x >= 3;",
    "<table><tr><td>1</td></tr></table>",
    "<table>",
    "...",
    "---",
    "....",
    "-----",
    "你好，世界！",
    "机器学习是人工智能的一个分支。",
    "日本語のテキスト",
    "한국어 문장",
    "《红楼梦》",
    "１２３",
    "😀",
    "🎉👍🏽",
    "👨\u200d👩\u200d👧",
    "🇨🇳",
    "𠀀",
    " ",
    "  ",
    "     ",
    "\t",
    "\t\t",
    "\n",
    "\n\n\n",
    "\r\n",
    " \n\t ",
    "The quick brown fox jumps over the lazy dog.",
    "It's 3.14159 -- roughly.",
    "2024-05-01 12:00:00",
    "https://example.com/a?b=c&d=e",
    "camelCase snake_case",
    "Привет, мир",
    "∑∫√∞",
    "e\u0301",
]
SEPARATORS = ["", " ", "  ", "\n", "\t", "\n\n", " \t "]


def _texts(n: int = 300) -> list[str]:
    rng = random.Random(1234)
    texts = list(PIECES)
    while len(texts) < n:
        parts = rng.choices(PIECES, k=rng.randint(2, 7))
        text = "".join(p + rng.choice(SEPARATORS) for p in parts)
        if rng.random() < 0.25:
            text = rng.choice([" ", "  ", "\n", "\t"]) + text
        texts.append(text)
    assert not any("\u2581" in t for t in texts)
    return texts


TEXTS = _texts()


@pytest.fixture(scope="module")
def tok_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    shutil.copy(SHARED / "tokenizer.json", folder / "tokenizer.json")
    for f in ("tokenizer_config.json", "generation_config.json", "config.json"):
        shutil.copy(SHARED / "MiniCPM4-0.5B" / f, folder / f)
    return folder


@pytest.fixture(scope="module")
def tok(tok_folder) -> Tokenizer:
    return Tokenizer.from_pretrained(tok_folder)


def test_texts_are_varied():
    assert len(set(TEXTS)) >= 290


def test_round_trip(tok):
    bad = [t for t in TEXTS if tok.decode(tok.encode(t, add_bos=False)) != t]
    assert not bad, f"{len(bad)} texts do not round-trip, e.g. {bad[:3]!r}"


def test_user_defined_pieces_are_whole(tok):
    for piece in ("<table>", "...", "---", "\n", "\t"):
        ids = tok.encode("x" + piece + "y", add_bos=False)
        assert tok.token_to_id(piece) in ids, piece


def test_no_dummy_prefix(tok):
    ids = tok.encode("Hello", add_bos=False)
    assert not tok.decode(ids[:1]).startswith(" ")
    assert tok.encode(" Hello", add_bos=False) != ids


def test_bos_added_exactly_once(tok):
    for text in TEXTS[:50] + ["", "<s>"]:
        plain = tok.encode(text, add_bos=False)
        with_bos = tok.encode(text, add_bos=True)
        assert with_bos == [BOS] + plain
        assert with_bos.count(BOS) == 1 + plain.count(BOS)
    assert tok.encode("hi") == tok.encode("hi", add_bos=True)  # default adds BOS
    assert tok.bos_token_id == BOS and tok.add_bos_token


def test_eos_ids(tok):
    assert EOS in tok.eos_token_ids and IM_END in tok.eos_token_ids
    assert len(tok.eos_token_ids) == len(set(tok.eos_token_ids))


def test_special_ids(tok):
    assert tok.token_to_id("<|im_start|>") == IM_START
    assert tok.token_to_id("<|im_end|>") == IM_END
    assert tok.encode("<|im_start|>", add_bos=False) == [IM_START]
    assert tok.encode("<|im_end|>", add_bos=False) == [IM_END]


def test_chat_template(tok):
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    want = [BOS] + tok.encode("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", add_bos=False)
    assert ids == want
    assert ids[1] == IM_START and IM_END in ids
    assert ids.count(BOS) == 1


def test_chat_template_multi_turn(tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "你好"},
            {"role": "assistant", "content": "Hi!"}, {"role": "user", "content": "...---"}]
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in msgs)
    assert tok.apply_chat_template(msgs, add_generation_prompt=False) == [BOS] + tok.encode(text, add_bos=False)
    assert tok.apply_chat_template(msgs) == [BOS] + tok.encode(text + "<|im_start|>assistant\n", add_bos=False)


STREAM_TEXTS = [
    "你好，世界！😀 emoji 🎉👍🏽 and CJK 機器學習",
    "👨\u200d👩\u200d👧\u200d👦 family 🇨🇳🇺🇸 𠀀𠀁",
    "mixed: ∑∫√ Привет 한국어 <table> ... --- \n\t done",
    "🫐🌪🧜" * 3,
]


@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_stream_decoder(tok, text):
    ids = tok.encode(text, add_bos=False)
    assert len(ids) > 5
    dec = tok.stream_decoder()
    pieces = [dec.add(i) for i in ids]
    assert "".join(pieces) == tok.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces), pieces


def test_stream_texts_need_byte_fallback(tok):
    """The streaming texts really contain characters split over several byte tokens."""
    split = [t for t in STREAM_TEXTS if any("\ufffd" in tok.decode([i]) for i in tok.encode(t, add_bos=False))]
    assert len(split) >= 2


def test_stream_decoder_holds_incomplete_bytes(tok):
    """A character split over byte-fallback tokens comes out whole, once complete."""
    ch = "𠀀"
    ids = tok.encode(ch, add_bos=False)
    assert len(ids) > 1, "expected byte fallback for a rare CJK extension character"
    dec = tok.stream_decoder()
    pieces = [dec.add(i) for i in ids]
    assert pieces[:-1] == [""] * (len(ids) - 1) and pieces[-1] == ch


def test_from_pretrained_without_tokenizer(tmp_path):
    with pytest.raises(ConfigError) as e:
        Tokenizer.from_pretrained(tmp_path)
    assert str(tmp_path) in str(e.value)


def test_from_pretrained_bad_tokenizer_config(tok_folder, tmp_path):
    folder = tmp_path / "t"
    shutil.copytree(tok_folder, folder)
    (folder / "tokenizer_config.json").chmod(0o644)
    (folder / "tokenizer_config.json").write_text("{oops")
    with pytest.raises(ConfigError) as e:
        Tokenizer.from_pretrained(folder)
    assert "tokenizer_config.json" in str(e.value)


def test_save_and_reload(tok, tmp_path):
    tok.save(tmp_path)
    again = Tokenizer.from_pretrained(tmp_path)
    for t in TEXTS[:40]:
        assert again.encode(t) == tok.encode(t)
    assert set(again.eos_token_ids) == set(tok.eos_token_ids)
    assert again.apply_chat_template([{"role": "user", "content": "hi"}]) == tok.apply_chat_template(
        [{"role": "user", "content": "hi"}])


@pytest.fixture
def sp_only_folder(tmp_path):
    """A checkpoint's tokenizer files without tokenizer.json: SentencePiece tokenizer.model only."""
    shutil.copy(SHARED / "tokenizer.model", tmp_path / "tokenizer.model")
    for f in ("added_tokens.json", "tokenizer_config.json"):
        shutil.copy(SHARED / "MiniCPM4-0.5B" / f, tmp_path / f)
    assert not (tmp_path / "tokenizer.json").exists()
    return tmp_path


def test_sentencepiece_model_only_is_a_clear_error(sp_only_folder):
    """The device side never converts tokenizer.model: it says to export or to use torch."""
    with pytest.raises(ConfigError) as e:
        Tokenizer.from_pretrained(sp_only_folder)
    msg = str(e.value)
    assert str(sp_only_folder) in msg and "tokenizer.model" in msg
    assert "edgecpm export" in msg and "torch" in msg


def test_from_sentencepiece_model_only_on_torch(tok, sp_only_folder):
    """The torch backend's load_tokenizer converts tokenizer.model like the reference tokenizer.json."""
    pytest.importorskip("sentencepiece", reason="converting tokenizer.model needs sentencepiece")
    pytest.importorskip("torch")
    from edgecpm.runtimes.torch import load_tokenizer

    conv = load_tokenizer(sp_only_folder)
    assert isinstance(conv, Tokenizer)
    diffs = [t for t in TEXTS if conv.encode(t) != tok.encode(t)]
    assert not diffs, f"{len(diffs)} texts differ, e.g. {diffs[:3]!r}"
    chat = [{"role": "user", "content": "hi"}]
    assert conv.apply_chat_template(chat) == tok.apply_chat_template(chat)
    # EOS from tokenizer_config.json's eos_token (<|im_end|>) even without config/generation files.
    assert IM_END in conv.eos_token_ids
    assert json.loads((SHARED / "MiniCPM4-0.5B" / "added_tokens.json").read_text())["<|im_end|>"] == IM_END


def test_load_tokenizer_prefers_tokenizer_json(tok, tok_folder):
    pytest.importorskip("torch")
    from edgecpm.runtimes.torch import load_tokenizer

    again = load_tokenizer(tok_folder)
    assert again.encode(TEXTS[0]) == tok.encode(TEXTS[0]) and again.eos_token_ids == tok.eos_token_ids


def test_stream_decoder_flush_shows_an_incomplete_character(tok):
    ids = tok.encode("ok 𠀀", add_bos=False)  # the rare character is byte-fallback pieces
    dec = tok.stream_decoder()
    shown = "".join(dec.add(t) for t in ids[:-1])  # its last byte never arrives
    assert shown == "ok "
    assert dec.flush() == tok.decode(ids[:-1])[len("ok "):] and "\ufffd" in tok.decode(ids[:-1])


# ---- decode: the default leaves special tokens out; bad ids are a ValueError -------------------

def test_decode_round_trips_with_the_bos_encode_adds(tok):
    """decode(encode(text)) == text with the default add_bos=True: decode skips special tokens."""
    assert tok.decode(tok.encode("Hello")) == "Hello"
    bad = [t for t in TEXTS if tok.decode(tok.encode(t)) != t]
    assert not bad, f"{len(bad)} texts do not round-trip, e.g. {bad[:3]!r}"
    ids = tok.encode("hi") + [IM_END]
    assert tok.decode(ids, skip_special_tokens=False) == "<s>hi<|im_end|>"
    assert tok.decode(ids) == "hi"


def test_decode_matches_the_text_of_a_generation(tok):
    """The stream decoder (the text of generate/stream/chat) and decode agree, specials and all."""
    ids = tok.encode("你好 ok") + [IM_END, EOS]
    dec = tok.stream_decoder()
    assert "".join(dec.add(i) for i in ids) + dec.flush() == tok.decode(ids) == "你好 ok"


@pytest.mark.parametrize("ids, bad", [([-1], "[-1]"), ([5, 73448], "[73448]"), ([1, 2**40, -3], "[1099511627776, -3]")])
def test_decode_out_of_range_ids(tok, ids, bad):
    with pytest.raises(ValueError) as e:
        tok.decode(ids)
    assert str(e.value) == f"decode: token ids {bad} lie outside the tokenizer's vocabulary [0, 73448)"


@pytest.mark.parametrize("ids", [[1.5], ["a"], 5])
def test_decode_non_integer_ids(tok, ids):
    with pytest.raises(ValueError, match="decode: expects a list of integer token ids"):
        tok.decode(ids)


def test_decode_numpy_ids(tok):
    import numpy as np

    ids = tok.encode("numpy ids")
    assert tok.decode(np.asarray(ids, dtype=np.int64)) == "numpy ids"


def test_chat_template_bos_token_variable(tok):
    """A template that writes {{ bos_token }} gets the BOS text, not the empty string."""
    t = Tokenizer(tok._tok, {**tok.config, "chat_template": "{{ bos_token }}" + tok.chat_template}, tok.eos_token_ids)
    assert t.render_chat([{"role": "user", "content": "hi"}]).startswith("<s><|im_start|>user")
    assert t.apply_chat_template([{"role": "user", "content": "hi"}]) == tok.apply_chat_template(
        [{"role": "user", "content": "hi"}])
