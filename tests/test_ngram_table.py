"""The corpus n-gram table (edgecpm.ngram_table) and the n-gram drafter's confidences: what it
looks up and stores, how the drafter combines it with the context, and that greedy output stays
exactly plain decoding's whatever the table says."""

from __future__ import annotations

import numpy as np
import pytest

import edgecpm
from edgecpm.drafters import CONTEXT_CONFIDENCE, CORPUS_CONFIDENCE, FLOOR_FROM, NgramDrafter, SpecConfig
from edgecpm.errors import ConfigError
from edgecpm.ngram_table import NgramTable, ngram_key

torch = pytest.importorskip("torch")
PROMPT = [1, 17, 250, 33, 4, 99, 7, 17, 250]


def test_lookup_takes_the_longest_match_and_its_most_frequent_next():
    docs = [[1, 2, 3, 9, 1, 2, 3, 9], [5, 2, 3, 7, 4, 2, 3, 8, 6, 2, 3, 8]]
    t = NgramTable.from_sequences(docs, vocab_size=16, ngram_max=3, min_count=1)
    # (1, 2, 3) -> 9 twice: the 3-gram wins over (2, 3), which went on with 9 twice and 8 twice.
    assert t.lookup([1, 2, 3]) == (9, 3, 2, 2)
    # (2, 3) alone: 9 and 8 tie at 2 of 5, the lower id wins.
    assert t.lookup([0, 2, 3]) == (8, 2, 2, 5)
    assert t.lookup([4]) == (2, 1, 1, 1)
    assert t.lookup([15]) is None and t.lookup([]) is None
    # No n-gram crosses two documents: the first ends in 9, the second starts with 5.
    assert t.lookup([9])[0] == 1  # (9) -> 1 inside the first document, never 5


def test_min_count_drops_rare_ngrams():
    t = NgramTable.from_sequences([[1, 2, 1, 2, 1, 3]], vocab_size=8, ngram_max=2, min_count=2)
    assert t.lookup([2, 1]) == (2, 1, 2, 3)  # (2, 1) -> 2 and -> 3 once each: dropped, (1) answers
    assert t.lookup([0, 1]) == (2, 1, 2, 3)  # (1) -> 2 twice of 3: kept
    assert t.lookup([3]) is None


def test_keys_match_the_python_hash():
    seq = [7, 3, 5, 1]
    t = NgramTable.from_sequences([seq], vocab_size=8, ngram_max=3, min_count=1)
    assert set(t.keys.tolist()) == {ngram_key(seq[i : i + n]) for n in (1, 2, 3) for i in range(len(seq) - n)}


def test_save_load_and_refusals(tmp_path):
    t = NgramTable.from_sequences([[1, 2, 3, 1, 2, 4]], vocab_size=8, min_count=1)
    t.save(tmp_path / "t.npz")
    u = NgramTable.load(tmp_path / "t.npz")
    assert (u.ngram_max, u.vocab_size, len(u)) == (t.ngram_max, t.vocab_size, len(t))
    assert u.lookup([1, 2]) == t.lookup([1, 2])
    np.save(tmp_path / "bad.npy", np.array([{"x": 1}], dtype=object))
    for bad in (tmp_path / "bad.npy", tmp_path / "missing.npz"):
        with pytest.raises(ConfigError):
            NgramTable.load(bad)
    with pytest.raises(ValueError, match="token ids"):
        NgramTable.from_sequences([[1, 9]], vocab_size=8)


def test_build_from_text_files(tmp_path):
    class Chars:  # a character tokenizer
        vocab_size = 128

        def encode(self, text, add_bos=True):
            return [ord(c) for c in text]

    (tmp_path / "a.txt").write_text("abcabd\x1exyz")
    t = NgramTable.build(Chars(), [tmp_path], ngram_max=2, min_count=1)
    assert t.lookup([ord("a"), ord("b")])[0] == ord("c")
    assert t.lookup([ord("d")]) is None  # the document ends there: "d" -> "x" crosses the separator
    with pytest.raises(ConfigError):
        NgramTable.build(Chars(), [tmp_path / "none"])


def _table(tmp_path, docs, vocab=16, **kw):
    path = tmp_path / "t.npz"
    NgramTable.from_sequences(docs, vocab_size=vocab, min_count=1, **kw).save(path)
    return str(path)


def test_drafter_takes_the_likelier_guess(tmp_path):
    corpus = _table(tmp_path, [[5, 9, 5, 9, 5, 9, 5, 9]])
    spec = SpecConfig(depth=3, tree_size=3, ngram_min=1, corpus=corpus)
    # No context match for 5 (it is new in the context): the corpus says 9, then 5, then 9.
    assert NgramDrafter(spec).propose([1, 2, 5]).tokens.tolist() == [9, 5, 9]
    # A 3-token context match (0.75 x share 1) beats the corpus's 1-token guess (0.3).
    assert NgramDrafter(spec).propose([4, 6, 5, 3, 4, 6, 5]).tokens.tolist() == [3, 4, 6]
    # Without the table the same drafter copies the context only.
    assert NgramDrafter(SpecConfig(depth=3, tree_size=3, ngram_min=1)).propose([1, 2, 5]).tokens.tolist() == []


def test_min_confidence_stops_the_chain():
    ctx = [1, 2, 3, 4, 5, 6, 1, 2]  # (1, 2) -> 3 -> 4 ...: 2- then 3- then 4-token matches
    full = NgramDrafter(SpecConfig(depth=4, tree_size=4)).propose(ctx).tokens.tolist()
    assert full == [3, 4, 5, 6]
    # chances: 0.55, then x 0.75, x 0.9, x 0.9 -> 0.55, 0.41, 0.37, 0.33
    assert CONTEXT_CONFIDENCE[2] == 0.55 and CONTEXT_CONFIDENCE[3] == 0.75 and CONTEXT_CONFIDENCE[4] == 0.9
    assert FLOOR_FROM == 2  # the first two tokens are always drafted
    for floor, n in ((0.3, 4), (0.35, 3), (0.4, 2), (0.5, 2), (0.9, 2)):
        got = NgramDrafter(SpecConfig(depth=4, tree_size=4, min_confidence=floor)).propose(ctx).tokens.tolist()
        assert got == full[:n], floor
    assert CORPUS_CONFIDENCE[4] < CONTEXT_CONFIDENCE[4]


def test_spec_config_checks():
    with pytest.raises(ValueError, match="corpus"):
        SpecConfig(draft="some/draft", corpus="t.npz")
    for bad in (-0.1, 1.0, "0.3"):
        with pytest.raises(ValueError, match="min_confidence"):
            SpecConfig(min_confidence=bad)


@pytest.fixture(scope="module")
def ckpt(make_checkpoint):
    return make_checkpoint(tie=False)


@pytest.fixture(scope="module")
def greedy(ckpt):
    return edgecpm.Session(ckpt).generate(PROMPT, max_new_tokens=30, ignore_eos=True).token_ids


@pytest.mark.parametrize("table", ["right", "wrong"])
def test_greedy_identical_whatever_the_table_says(ckpt, greedy, table, tmp_path):
    """A table of the very continuation drafts long accepted chains; a table of a shifted one is
    wrong everywhere; the output is plain greedy decoding's either way."""
    ref = PROMPT + greedy
    doc = ref if table == "right" else [(t + 1) % 512 for t in ref]
    corpus = _table(tmp_path, [doc], vocab=512, ngram_max=4)
    s = edgecpm.Session(ckpt, draft=SpecConfig(draft="ngram", depth=6, tree_size=6, ngram_min=1, corpus=corpus,
                                               min_confidence=0.1))
    g = s.generate(PROMPT, max_new_tokens=30, ignore_eos=True)
    assert g.token_ids == greedy
    if table == "right":
        assert g.stats["accepted_per_step"] > 3.0


def test_session_refuses_a_table_of_another_vocabulary(ckpt, tmp_path):
    corpus = _table(tmp_path, [[1, 2, 3]], vocab=1000)  # the model has 512
    with pytest.raises(ConfigError, match="vocabulary"):
        edgecpm.Session(ckpt, draft=SpecConfig(draft="ngram", corpus=corpus))
    smaller = str(tmp_path / "small.npz")  # a tokenizer's vocabulary below the model's padded one
    NgramTable.from_sequences([[1, 2, 3]], vocab_size=500, min_count=1).save(smaller)
    assert edgecpm.Session(ckpt, draft=SpecConfig(draft="ngram", corpus=smaller)).drafter.table.vocab_size == 500
