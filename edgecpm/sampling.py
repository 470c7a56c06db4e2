"""Sampling parameters and the token sampler (numpy, vectorized over the vocabulary)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if not (isinstance(self.temperature, (int, float)) and self.temperature >= 0):
            raise ValueError(f"temperature={self.temperature!r}: must be >= 0 (0 means greedy)")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p={self.top_p!r}: must be in (0, 1]")
        if not (isinstance(self.top_k, (int, np.integer)) and self.top_k >= 0):
            raise ValueError(f"top_k={self.top_k!r}: must be an integer >= 0 (0 disables it)")
        if self.seed is not None and not (isinstance(self.seed, (int, np.integer)) and not isinstance(self.seed, bool)
                                          and 0 <= self.seed < 2**64):
            raise ValueError(f"seed={self.seed!r}: must be an integer in [0, 2**64) (or None for a random seed)")
        if not (isinstance(self.repetition_penalty, (int, float)) and self.repetition_penalty > 0):
            raise ValueError(f"repetition_penalty={self.repetition_penalty!r}: must be > 0 (1.0 disables it)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class Sampler:
    """Turns a logits row into a token id. Keeps the set of seen ids for the repetition penalty
    as a boolean mask so each step costs O(vocab) numpy work, not O(history) Python work.

    `constraint` (structured output, e.g. edgecpm.structured.JsonConstraint): only the tokens it
    allows can be drawn, and every observed token advances it."""

    def __init__(self, params: SamplingParams, vocab_size: int, history: list[int] | np.ndarray = (),
                 constraint=None):
        self.params = params
        self.constraint = constraint
        self.rng = np.random.default_rng(params.seed)
        self.seen = np.zeros(vocab_size, dtype=bool)
        if params.repetition_penalty != 1.0:
            self.seen[np.asarray(history, dtype=np.int64)] = True

    @property
    def plain_greedy(self) -> bool:
        """Greedy with nothing that changes as tokens are observed (no penalty, no constraint): the
        token picked from a logits row is its argmax, so many rows can be picked at once."""
        return self.params.greedy and self.params.repetition_penalty == 1.0 and self.constraint is None

    def observe(self, token: int) -> None:
        if self.constraint is not None:
            self.constraint.advance(token)
        if self.params.repetition_penalty != 1.0:
            self.seen[token] = True

    def probs(self, logits: np.ndarray) -> np.ndarray:
        """The distribution the sampler draws from (after penalty, temperature, top-k, top-p)."""
        logits = self._penalized(logits)
        p = self.params
        logits = logits.astype(np.float64) / p.temperature
        if p.top_k and p.top_k < logits.size:
            kth = np.partition(logits, -p.top_k)[-p.top_k]
            logits = np.where(logits < kth, -np.inf, logits)
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        if p.top_p < 1.0:
            order = np.argsort(-probs, kind="stable")
            cum = np.cumsum(probs[order])
            # Keep the smallest prefix whose mass reaches top_p (always at least one token).
            cut = int(np.searchsorted(cum, p.top_p)) + 1
            keep = np.zeros_like(probs, dtype=bool)
            keep[order[:cut]] = True
            probs = np.where(keep, probs, 0.0)
            probs /= probs.sum()
        return probs

    def __call__(self, logits: np.ndarray) -> int:
        if self.params.greedy:
            return int(np.argmax(self._penalized(logits)))
        probs = self.probs(logits)
        return int(self.rng.choice(probs.size, p=probs))

    def _penalized(self, logits: np.ndarray) -> np.ndarray:
        if self.constraint is not None:
            logits = np.where(self.constraint.allowed(), logits, -np.inf)
        rp = self.params.repetition_penalty
        if rp == 1.0:
            return logits
        # CTRL/HF rule: divide positive logits of seen tokens by the penalty, multiply negative ones.
        penalized = np.where(logits > 0, logits / rp, logits * rp)
        return np.where(self.seen, penalized, logits)
