"""The sampler: parameter checks, the distribution it draws from, and the draws themselves."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from edgecpm.sampling import Sampler, SamplingParams


def _softmax(x):
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


def _logits(n=16, seed=0):
    return np.random.default_rng(seed).normal(0, 2.0, n).astype(np.float32)


@pytest.mark.parametrize("kw, name", [
    ({"temperature": -1.0}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_p": -0.2}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"top_k": 2.5}, "top_k"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"repetition_penalty": -1.0}, "repetition_penalty"),
])
def test_invalid_params(kw, name):
    with pytest.raises(ValueError) as e:
        SamplingParams(**kw)
    assert name in str(e.value)


def test_valid_edges():
    SamplingParams(temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.0)
    SamplingParams(temperature=2.0, top_p=1e-6, top_k=1, repetition_penalty=0.5)
    assert SamplingParams().greedy and not SamplingParams(temperature=0.7).greedy


@pytest.mark.parametrize("temperature", [0.25, 1.0, 3.0])
def test_temperature(temperature):
    logits = _logits()
    p = Sampler(SamplingParams(temperature=temperature), logits.size).probs(logits)
    np.testing.assert_allclose(p, _softmax(logits.astype(np.float64) / temperature), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("k", [1, 3, 7, 16, 40])
def test_top_k(k):
    logits = _logits(16, seed=k)
    p = Sampler(SamplingParams(temperature=1.0, top_k=k), logits.size).probs(logits)
    keep = min(k, logits.size)
    top = np.argsort(-logits)[:keep]
    assert set(np.flatnonzero(p)) == set(top.tolist())
    want = np.zeros(logits.size)
    want[top] = _softmax(logits[top])
    np.testing.assert_allclose(p, want, rtol=1e-9, atol=1e-12)


def _nucleus(probs, top_p):
    """Reference: the smallest set of most likely tokens whose mass reaches top_p."""
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    kept, mass = [], 0.0
    for i in order:
        kept.append(i)
        mass += probs[i]
        if mass >= top_p:
            break
    return set(kept)


@pytest.mark.parametrize("seed", range(6))
def test_top_p(seed):
    logits = _logits(12, seed=seed)
    full = _softmax(logits)
    cum = np.cumsum(np.sort(full)[::-1])
    # Thresholds well inside a gap of the cumulative mass (no float ties), incl. one below the top token.
    targets = [full.max() * 0.5] + [float((a + b) / 2) for a, b in itertools.pairwise(cum)][:6]
    for top_p in targets:
        p = Sampler(SamplingParams(temperature=1.0, top_p=top_p), logits.size).probs(logits)
        kept = _nucleus(full, top_p)
        assert set(np.flatnonzero(p)) == kept, top_p
        idx = sorted(kept)
        np.testing.assert_allclose(p[idx], full[idx] / full[idx].sum(), rtol=1e-9)
        assert p.sum() == pytest.approx(1.0)


def test_top_k_then_top_p():
    logits = _logits(20, seed=7)
    p = Sampler(SamplingParams(temperature=1.0, top_k=5, top_p=0.9), logits.size).probs(logits)
    top5 = np.argsort(-logits)[:5]
    k_probs = np.zeros(logits.size)
    k_probs[top5] = _softmax(logits[top5])
    assert set(np.flatnonzero(p)) == _nucleus(k_probs, 0.9)


def test_repetition_penalty_probs():
    logits = np.array([3.0, -2.0, 1.5, -0.5, 0.25, 2.0], dtype=np.float32)
    seen = [0, 1, 4]
    rp = 1.7
    s = Sampler(SamplingParams(temperature=1.0, repetition_penalty=rp), logits.size, history=seen)
    want = logits.astype(np.float64).copy()
    for i in seen:
        want[i] = want[i] / rp if want[i] > 0 else want[i] * rp
    np.testing.assert_allclose(s.probs(logits), _softmax(want), rtol=1e-6)


def test_repetition_penalty_greedy_and_observe():
    logits = np.array([3.0, 2.0, -1.0, -0.5], dtype=np.float32)
    s = Sampler(SamplingParams(repetition_penalty=2.0), logits.size)
    assert s(logits) == 0  # nothing seen yet
    s.observe(0)  # 3.0 / 2 = 1.5 < 2.0
    assert s(logits) == 1
    neg = np.array([-0.5, -0.8, -5.0], dtype=np.float32)
    s2 = Sampler(SamplingParams(repetition_penalty=2.0), neg.size, history=[0])
    assert s2(neg) == 1  # -0.5 * 2 = -1.0 < -0.8: negative logits are multiplied


def test_no_penalty_ignores_history():
    logits = _logits(10, seed=3)
    a = Sampler(SamplingParams(temperature=1.0), 10, history=[1, 2, 3]).probs(logits)
    b = Sampler(SamplingParams(temperature=1.0), 10).probs(logits)
    np.testing.assert_array_equal(a, b)


def test_greedy_is_argmax():
    for seed in range(5):
        logits = _logits(50, seed=seed)
        assert Sampler(SamplingParams(), 50)(logits) == int(np.argmax(logits))


def _chi2_critical(df: int, alpha: float) -> float:
    try:
        from scipy.stats import chi2

        return float(chi2.ppf(1 - alpha, df))
    except ImportError:  # Wilson-Hilferty approximation (a few % off, fine for a bound)
        from statistics import NormalDist

        z = NormalDist().inv_cdf(1 - alpha)
        return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0, seed=11),
    SamplingParams(temperature=0.7, top_k=5, seed=12),
    SamplingParams(temperature=1.3, top_p=0.8, seed=13),
])
def test_empirical_frequencies(params):
    vocab, n = 8, 20_000
    logits = _logits(vocab, seed=5) * 0.5
    s = Sampler(params, vocab)
    p = s.probs(logits)
    counts = np.bincount([s(logits) for _ in range(n)], minlength=vocab)
    assert counts[p == 0].sum() == 0, "drew a token outside top-k/top-p"
    support = p > 0
    expected = p[support] * n
    stat = float(((counts[support] - expected) ** 2 / expected).sum())
    df = int(support.sum()) - 1
    bound = _chi2_critical(df, 1e-4)
    assert stat < bound, f"chi-square {stat:.1f} >= {bound:.1f} (df {df})"


def test_seeded_draws_repeat():
    logits = _logits(30, seed=2)
    a = Sampler(SamplingParams(temperature=1.0, seed=5), 30)
    b = Sampler(SamplingParams(temperature=1.0, seed=5), 30)
    c = Sampler(SamplingParams(temperature=1.0, seed=6), 30)
    da, db, dc = ([x(logits) for _ in range(50)] for x in (a, b, c))
    assert da == db and da != dc
