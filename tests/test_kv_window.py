"""kv_policy="window" (DESIGN.md §9): attention sinks + the most recent tokens, StreamingLLM-style."""

from __future__ import annotations

import numpy as np
import pytest

import edgecpm
from edgecpm.config import ModelConfig
from edgecpm.errors import ConfigError
from edgecpm.generate import causal_mask
from edgecpm.kv_cache import KVCache

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")
from edgecpm.export.exporter import export_bundle

BUDGET_TOKENS = 48


def budget(cfg: ModelConfig) -> int:
    return BUDGET_TOKENS * cfg.kv_bytes_per_token(4)


def test_make_room_keeps_sinks_and_recent_rows():
    cfg = ModelConfig.from_dict({"hidden_size": 8, "num_attention_heads": 2, "num_key_value_heads": 1,
                                 "num_hidden_layers": 2, "intermediate_size": 16, "vocab_size": 32,
                                 "max_position_embeddings": 1000, "model_type": "minicpm"}, "test")
    c = KVCache(cfg, 20, np.float32, "window", sink_tokens=4)
    c.arena[:, :, :20] = np.arange(20, dtype=np.float32)[None, None, :, None, None]  # row r holds r
    c.commit(np.arange(20))
    assert c.make_room(1) and c.evicted == 4 and c.length == 16  # a quarter of the 16 non-sink rows
    kept = c.arena[0, 0, :16, 0, 0].tolist()
    assert kept == [0, 1, 2, 3, *range(8, 20)] and c.position == 20
    assert c.make_room(3) and c.length == 16  # room already there: nothing dropped
    assert not c.make_room(17)  # more than the window beside the sinks
    assert not KVCache(cfg, 20, np.float32).make_room(21)  # the default policy never drops rows
    c.truncate(0)
    assert c.evicted == 0 and c.position == 0


@pytest.fixture(scope="module")
def tiny(make_checkpoint, tmp_path_factory):
    ckpt = make_checkpoint()
    return ckpt, export_bundle(ckpt, tmp_path_factory.mktemp("b") / "b", progress=False)


def test_window_generates_past_the_arena_and_matches_a_reference(tiny):
    ckpt, bundle = tiny
    prompt = [1, *range(5, 25)]  # 21 tokens; the arena holds 48
    cfg = edgecpm.Session(bundle).config
    s = edgecpm.Session(bundle, kv_budget=budget(cfg), kv_policy="window")
    assert s.cache.capacity == BUDGET_TOKENS
    positions = []
    forward = s.backend.forward
    s.backend.forward = lambda ids, pos, *a, **k: (positions.extend(pos.tolist()), forward(ids, pos, *a, **k))[1]
    g = s.generate(prompt, max_new_tokens=100, ignore_eos=True)
    assert len(g.token_ids) == 100 and s.cache.evicted > 0 and s.cache.length <= BUDGET_TOKENS
    assert positions == list(range(len(prompt) + 99))  # positions continue through every eviction
    # The default policy stops at the end of the arena.
    plain = edgecpm.Session(bundle, kv_budget=budget(cfg)).generate(prompt, max_new_tokens=100, ignore_eos=True)
    assert len(plain.token_ids) == BUDGET_TOKENS - len(prompt) + 1
    assert plain.token_ids == g.token_ids[: len(plain.token_ids)]  # identical until the first eviction

    # An independent reference: the sequence's K/V kept as a list of per-token rows, evicted by
    # list slicing, fed to the torch backend one token at a time through a fresh arena per step.
    ref = edgecpm.Session(ckpt, backend="torch")
    ids, rows, n_evicted, out = list(prompt), [], 0, []
    cache = KVCache(cfg, BUDGET_TOKENS + 1, np.float32)
    step_ids = ids
    for _ in range(100):
        if len(rows) + len(step_ids) > BUDGET_TOKENS:  # what the window does: a quarter after the sinks
            drop = (BUDGET_TOKENS - 4) // 4
            rows, n_evicted = rows[:4] + rows[4 + drop :], n_evicted + drop
        cache.truncate(0)
        for j, r in enumerate(rows):
            cache.arena[:, :, j] = r
        cache.commit(np.zeros(len(rows), np.int64))  # ids unused: positions are passed
        pos = np.arange(n_evicted + len(rows), n_evicted + len(rows) + len(step_ids))
        logits = ref.backend.forward(np.asarray(step_ids), pos, causal_mask(len(step_ids)), cache,
                                     np.array([len(step_ids) - 1]))
        rows += [cache.arena[:, :, len(rows) + j].copy() for j in range(len(step_ids))]
        out.append(int(np.argmax(logits[-1])))
        step_ids = [out[-1]]
    assert out == g.token_ids


def test_window_chat_continues_and_other_contexts_restart(tiny):
    _, bundle = tiny
    cfg = edgecpm.Session(bundle).config
    s = edgecpm.Session(bundle, kv_budget=budget(cfg), kv_policy="window")
    first = s.generate([1, *range(5, 25)], max_new_tokens=60, ignore_eos=True)
    assert s.cache.evicted > 0
    history = [1, *range(5, 25), *first.token_ids]
    evicted = s.cache.evicted
    # A continuation of the whole history appends to the arena (no re-prefill)...
    s.generate(history + [7, 8], max_new_tokens=4, ignore_eos=True)
    assert s.cache.evicted >= evicted and s.last.stats["prefill_tokens"] <= 3
    # ...and another prompt starts over.
    s.generate([1, 9, 9, 9], max_new_tokens=2, ignore_eos=True)
    assert s.cache.evicted == 0 and s.cache.length == 5


def test_window_prompt_longer_than_the_arena_streams(tiny):
    _, bundle = tiny
    cfg = edgecpm.Session(bundle).config
    s = edgecpm.Session(bundle, kv_budget=budget(cfg), kv_policy="window")
    g = s.generate([1, *range(3, 3 + 130)], max_new_tokens=5, ignore_eos=True)
    assert len(g.token_ids) == 5 and s.cache.position == 131 + 4
    with pytest.raises(edgecpm.BudgetError):
        edgecpm.Session(bundle, kv_budget=budget(cfg)).generate([1, *range(3, 3 + 130)], max_new_tokens=5)


def test_window_is_refused_where_it_is_not_supported(tiny):
    _, bundle = tiny
    with pytest.raises(ConfigError, match="speculative"):
        edgecpm.Session(bundle, kv_policy="window", draft="ngram")
    with pytest.raises(ValueError, match="kv_policy"):
        edgecpm.Session(bundle, kv_policy="slide")
