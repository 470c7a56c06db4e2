"""The KV arena (DESIGN.md §9): budget arithmetic, zero-copy views, rollback and compaction."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import tiny_config

from edgecpm.config import ModelConfig
from edgecpm.errors import BudgetError
from edgecpm.kv_cache import KVCache


@pytest.fixture
def cfg() -> ModelConfig:
    return ModelConfig.from_dict(tiny_config())


def _fill(cache: KVCache, n: int, start_value: float) -> None:
    """Write n rows whose every element equals its absolute row index + start_value."""
    for layer in range(len(cache.keys)):
        k, v = cache.slot(layer, n)
        rows = np.arange(cache.length, cache.length + n, dtype=np.float32)[:, None, None] + start_value
        k[...] = rows
        v[...] = -rows
    cache.commit(np.arange(cache.length, cache.length + n))  # ids: the row numbers


def test_from_budget_arithmetic(cfg):
    per = cfg.kv_bytes_per_token(4)
    assert per == 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 4
    c = KVCache.from_budget(cfg, 10 * per + per - 1, np.float32)
    assert c.capacity == 10
    assert c.bytes_allocated == 10 * per <= 11 * per - 1
    c2 = KVCache.from_budget(cfg, f"{10 * per}B", np.float16)
    assert c2.capacity == 20 and c2.bytes_per_token == per // 2
    big = KVCache.from_budget(cfg, "1TiB", np.float32)  # capped by max_position_embeddings
    assert big.capacity == cfg.max_position_embeddings


def test_budget_too_small(cfg):
    per = cfg.kv_bytes_per_token(4)
    with pytest.raises(BudgetError) as e:
        KVCache.from_budget(cfg, per - 1, np.float32)
    assert str(per) in str(e.value) and "kv_budget" in str(e.value)


def test_check_room_message(cfg):
    c = KVCache(cfg, 8, np.float32)
    _fill(c, 5, 0.0)
    c.check_room(3)
    with pytest.raises(BudgetError) as e:
        c.check_room(4)
    msg = str(e.value)
    assert "4" in msg and "3" in msg and "8" in msg and str(c.bytes_per_token) in msg


def test_views_are_zero_copy(cfg):
    c = KVCache(cfg, 8, np.float32)
    _fill(c, 3, 0.0)
    for layer in range(cfg.num_hidden_layers):
        pk, pv = c.past(layer)
        assert pk.shape == (3, cfg.num_key_value_heads, cfg.head_dim)
        assert np.shares_memory(pk, c.arena) and np.shares_memory(pv, c.arena)
        assert pk.flags["C_CONTIGUOUS"] and pv.flags["C_CONTIGUOUS"]
        sk, _ = c.slot(layer, 2)
        assert np.shares_memory(sk, c.arena) and sk.flags["C_CONTIGUOUS"]
        np.testing.assert_array_equal(pk[:, 0, 0], [0, 1, 2])
        np.testing.assert_array_equal(pv[:, 0, 0], [0, -1, -2])


def test_commit_truncate_peak(cfg):
    c = KVCache(cfg, 8, np.float32)
    _fill(c, 6, 0.0)
    assert c.length == 6 and c.free == 2 and c.bytes_in_use == 6 * c.bytes_per_token
    c.truncate(2)
    assert c.length == 2 and c.peak_length == 6
    with pytest.raises(ValueError):
        c.truncate(3)
    with pytest.raises(ValueError):
        c.truncate(-1)
    _fill(c, 1, 100.0)
    np.testing.assert_array_equal(c.past(0)[0][:, 0, 0], [0, 1, 102])


def test_keep_compacts_accepted_rows(cfg):
    c = KVCache(cfg, 16, np.float32)
    _fill(c, 4, 0.0)  # the context: rows 0..3
    _fill(c, 6, 0.0)  # a draft tree: rows 4..9
    c.keep(4, [5, 7, 8])
    assert c.length == 7
    for layer in range(cfg.num_hidden_layers):
        k, v = c.past(layer)
        np.testing.assert_array_equal(k[:, 1, 3], [0, 1, 2, 3, 5, 7, 8])
        np.testing.assert_array_equal(v[:, 0, 0], [0, -1, -2, -3, -5, -7, -8])
    c.keep(7, [])
    assert c.length == 7


def test_keep_of_a_prefix_moves_nothing(cfg):
    """A chain's accepted rows [start, start + n) stay where they are: no copy, the tail is cut, the
    ids stay, and the keep hooks still hear of it."""
    c = KVCache(cfg, 16, np.float32)
    _fill(c, 10, 0.0)
    heard = []
    c.keep_hooks.append(lambda start, rows: heard.append((start, list(rows))))
    before = c.arena.copy()
    c.keep(4, [4, 5, 6])
    assert c.length == 7 and heard == [(4, [4, 5, 6])]
    np.testing.assert_array_equal(c.arena, before)
    np.testing.assert_array_equal(c.ids, np.arange(7))  # _fill commits ids 0, 1, ...
    c.keep(7, [])
    assert c.length == 7 and heard[-1] == (7, [])


def test_keep_prefix_is_keep_of_the_rows(cfg):
    a, b = KVCache(cfg, 16, np.float32), KVCache(cfg, 16, np.float32)
    heard = []
    for c in (a, b):
        _fill(c, 10, 0.0)
        c.keep_hooks.append(lambda start, rows: heard.append((start, list(rows))))
    a.keep_prefix(4, 3)
    b.keep(4, [4, 5, 6])
    assert a.length == b.length == 7 and heard[0] == heard[1]
    np.testing.assert_array_equal(a.arena[:, :, :7], b.arena[:, :, :7])
    np.testing.assert_array_equal(a.ids, b.ids)
    with pytest.raises(ValueError):
        a.keep_prefix(4, 5)  # past the cache's length: keep's check
    assert a.length == 7


@pytest.mark.parametrize("rows", [[3, 5], [5, 5], [6, 5], [4, 10]])
def test_keep_rejects_bad_rows(cfg, rows):
    c = KVCache(cfg, 16, np.float32)
    _fill(c, 10, 0.0)
    with pytest.raises(ValueError):
        c.keep(4, rows)
    assert c.length == 10
