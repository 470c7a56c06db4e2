"""Ouroboros phrase reuse (edgecpm.drafters.PhrasePool, SpecConfig.phrases): rejected draft tails
come back whole, phrase checks leave the draft model's own chain unchanged with fewer calls, and
decoding stays exact (greedy) and lossless (sampling)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_speculative import TrigramBackend, V, check_two_token_distribution

import edgecpm
from edgecpm.drafters import ModelDrafter, PhrasePool, SpecConfig
from edgecpm.kv_cache import KVCache

torch = pytest.importorskip("torch")
PROMPT = [1, 17, 250, 33, 4, 99, 7, 17, 250]


def test_pool_files_the_rejected_tail_and_returns_it_whole():
    pool = PhrasePool(SpecConfig(depth=4, ngram_min=2))
    context = np.array([9, 8, 7, 6])
    pool.update(context)
    pool.remember(context, [40, 41, 42, 43])
    # The target accepted 40, then said 50: 41 42 43 were rejected after (40, 41)...
    pool.update(np.array([9, 8, 7, 6, 40, 50]))
    assert pool.rejected[(40, 41)] == [42, 43] and pool.rejected[(41, 42)] == [43]
    # ...and come back whole when a later draft ends in that n-gram (the context knows nothing more).
    assert pool.guess([1, 2, 40, 41], limit=4) == [42, 43]
    assert pool.guess([1, 2, 40, 41], limit=1) == [42]
    # The generated text comes first: 40 is followed by 50 in the context.
    assert pool.guess([6, 40], limit=1) == [50]


def calls_and_drafts(ckpt, spec, n=40, prompt=PROMPT):
    """Generate with a ModelDrafter; its proposals and the number of draft backend calls."""
    s = edgecpm.Session(ckpt, draft=spec)
    drafts, calls = [], [0]
    forward, propose = s.draft_backend.forward, s.drafter.propose

    def counted(*a, **k):
        calls[0] += 1
        return forward(*a, **k)

    def recorded(context):
        tree = propose(context)
        drafts.append(tree.tokens.tolist())
        return tree

    s.draft_backend.forward, s.drafter.propose = counted, recorded
    g = s.generate(prompt, max_new_tokens=n, ignore_eos=True)
    return g, drafts, calls[0], s.drafter


@pytest.fixture(scope="module")
def target(make_checkpoint):
    return make_checkpoint(tie=False)


@pytest.fixture(scope="module")
def draft(make_checkpoint):
    return make_checkpoint()  # the same embedding, its own (tied) LM head: it agrees only sometimes


def test_phrase_checks_keep_the_chain_with_fewer_calls(target, draft):
    """One call checks a guessed phrase; only the tokens the draft model itself would pick are
    kept, so every chain equals the phrase-less drafter's, at fewer calls on repetitive text."""
    plain = SpecConfig(draft=str(draft), depth=4, tree_size=4)
    _, plain_drafts, plain_calls, _ = calls_and_drafts(target, plain)
    _, drafts, n_calls, _ = calls_and_drafts(target, SpecConfig(**{**plain.__dict__, "phrases": True}))
    assert drafts == plain_drafts
    assert n_calls < plain_calls


def test_a_partly_wrong_phrase_keeps_only_the_draft_models_tokens():
    """A phrase right for one token, then wrong: the call keeps that token and drops the rows of
    the rest, so the chain equals the draft model's own (the wind-tunnel draft model)."""
    models = Path(__file__).resolve().parents[1] / "samples" / "wind_tunnel"
    if not (models / "draft" / "model.safetensors").exists():
        pytest.skip("no wind-tunnel weights")
    prompt = np.array(edgecpm.Tokenizer.from_pretrained(models / "target").encode("def main(argv):\n    parser = "))
    plain = SpecConfig(draft=str(models / "draft"), depth=6, tree_size=6)
    want = edgecpm.Session(models / "target", draft=plain).drafter.propose(prompt).tokens.tolist()
    s = edgecpm.Session(models / "target", draft=SpecConfig(**{**plain.__dict__, "phrases": True}))
    phrase = [want[1], want[2] + 1, want[3], want[4]]  # after the first draft token
    s.drafter.phrases.guess = lambda seq, limit: phrase[:limit] if len(seq) == plain.ngram_max + 1 else []
    calls, forward = [], s.draft_backend.forward
    s.draft_backend.forward = lambda ids, *a, **k: calls.append(len(ids)) or forward(ids, *a, **k)
    assert s.drafter.propose(prompt).tokens.tolist() == want
    assert calls[1:] == [5, 1, 1, 1]  # prefill, the phrase (1 kept), then one token per call
    # The draft's cache holds the context and the chain (but its last token): the next step's
    # prefill reuses the accepted part of it.
    assert s.draft_cache.ids.tolist() == prompt.tolist() + want[:-1]


def test_phrases_greedy_identical(target, draft):
    want = edgecpm.Session(target).generate(PROMPT, max_new_tokens=40, ignore_eos=True).token_ids
    g, drafts, _, drafter = calls_and_drafts(target, SpecConfig(draft=str(draft), depth=3, tree_size=8, phrases=True))
    assert g.token_ids == want
    assert drafter.phrases.rejected  # verification rejected drafts: the pool was in use
    assert max(map(len, drafts)) > 3  # phrases extended chains past the draft model's depth


def test_ouroboros_sampling_is_lossless():
    """A phrase-reusing ModelDrafter on a toy trigram draft model: the first two sampled tokens
    follow the target's own distribution (chi-square), and the drafts were accepted often."""
    rng = np.random.default_rng(0)
    table = rng.normal(0, 1.0, size=(V, V, V))
    draft_backend = TrigramBackend(rng.normal(0, 1.0, size=(V, V, V)) + 0.5 * table)
    spec = SpecConfig(depth=2, tree_size=3, phrases=True)
    drafter = ModelDrafter(draft_backend, KVCache(draft_backend.config, 64, np.float32), spec, None)
    s = edgecpm.Session.from_backend(TrigramBackend(table), kv_budget=64 * 64, draft=SpecConfig(draft=drafter))
    check_two_token_distribution(s, table, 6000)
