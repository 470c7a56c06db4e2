"""A corpus n-gram table: what the n-gram drafter proposes where the context itself has no match.

Prompt lookup (`edgecpm.drafters.NgramDrafter`) only knows the context; where its longest match is
a single token it guesses poorly. A table of a corpus's n-grams (retrieval drafting, as in REST,
He et al. 2023) knows how text like the model's training text goes on: for every n-gram of 1 to
`ngram_max` tokens of the corpus, the token that followed it most often. The drafter asks it when
the context has no match of 2 tokens or more. It only proposes: the target still decides every
token, so the output does not depend on the table.

Storage: an .npz of plain arrays (never pickle): `keys` uint64 (sorted), `next` int32, `count`
int32 (how often `next` followed), `total` int32 (how often anything did), `meta` int64
[ngram_max, vocab_size]. A key is a 64-bit hash of the n-gram and its length
(`ngram_key`); a hash collision can only make a guess wrong, never an output.

    table = NgramTable.build(tokenizer, ["corpus/train.txt"])     # or from_sequences(id lists)
    table.save("ngrams.npz");  SpecConfig(draft="ngram", corpus="ngrams.npz")
"""

from __future__ import annotations

import array
import bisect
from pathlib import Path

import numpy as np

from edgecpm.errors import ConfigError

_PRIME = 0x100000001B3  # FNV-1a's 64-bit prime: keys mix as key * P + (token + 1), mod 2**64
_MASK = (1 << 64) - 1
DOC_SEPARATOR = "\x1e"  # in a text file, the record separator splits documents (no n-gram crosses it)


def ngram_key(tokens) -> int:
    """The table key of an n-gram (a list of ids), as NgramTable.from_sequences computes it."""
    k = len(tokens)
    for t in tokens:
        k = (k * _PRIME + int(t) + 1) & _MASK
    return k


class NgramTable:
    def __init__(self, keys: np.ndarray, next_ids: np.ndarray, counts: np.ndarray, totals: np.ndarray,
                 ngram_max: int, vocab_size: int):
        # array.array holds the columns: a lookup bisects and reads them from Python without a numpy
        # call (a drafter asks per draft token); the numpy names are views of the same memory.
        self._keys = array.array("Q", np.ascontiguousarray(keys, dtype=np.uint64).tobytes())
        self._next = array.array("i", np.ascontiguousarray(next_ids, dtype=np.int32).tobytes())
        self._counts = array.array("i", np.ascontiguousarray(counts, dtype=np.int32).tobytes())
        self._totals = array.array("i", np.ascontiguousarray(totals, dtype=np.int32).tobytes())
        self.keys = np.frombuffer(self._keys, dtype=np.uint64)
        self.next = np.frombuffer(self._next, dtype=np.int32)
        self.counts = np.frombuffer(self._counts, dtype=np.int32)
        self.totals = np.frombuffer(self._totals, dtype=np.int32)
        self.ngram_max, self.vocab_size = int(ngram_max), int(vocab_size)

    def __len__(self) -> int:
        return len(self.keys)

    @classmethod
    def from_sequences(cls, sequences, vocab_size: int, ngram_max: int = 4, min_count: int = 2) -> NgramTable:
        """From token id sequences (documents; no n-gram crosses two). For each n-gram the most
        frequent next token (ties: the lower id), kept if it followed at least `min_count` times."""
        keys, nexts = [], []
        for seq in sequences:
            seq = np.asarray(seq, dtype=np.int64)
            if seq.size and (seq.min() < 0 or seq.max() >= vocab_size):
                raise ValueError(f"token ids must lie in [0, {vocab_size})")
            t1 = seq.astype(np.uint64) + np.uint64(1)
            for n in range(1, ngram_max + 1):
                m = len(seq) - n  # n-grams followed by a token
                if m <= 0:
                    break
                k = np.full(m, n, dtype=np.uint64)
                for j in range(n):  # uint64 arithmetic wraps: the same key as ngram_key
                    k = k * np.uint64(_PRIME) + t1[j : j + m]
                keys.append(k)
                nexts.append(seq[n:])
        if not keys:
            empty = np.zeros(0, np.int32)
            return cls(np.zeros(0, np.uint64), empty, empty, empty, ngram_max, vocab_size)
        key, nxt = np.concatenate(keys), np.concatenate(nexts)
        order = np.lexsort((nxt, key))
        key, nxt = key[order], nxt[order]
        # (key, next) pairs and how often each occurred
        first = np.flatnonzero(np.r_[True, (key[1:] != key[:-1]) | (nxt[1:] != nxt[:-1])])
        pk, pn, pc = key[first], nxt[first], np.diff(np.r_[first, len(key)])
        # per key the most frequent next: sort by key, then count descending, then id ascending
        order = np.lexsort((pn, -pc, pk))
        pk, pn, pc = pk[order], pn[order], pc[order]
        lead = np.flatnonzero(np.r_[True, pk[1:] != pk[:-1]])
        total = np.add.reduceat(pc, lead)
        keep = pc[lead] >= min_count
        lead, total = lead[keep], total[keep]
        return cls(pk[lead], pn[lead].astype(np.int32), pc[lead].astype(np.int32), total.astype(np.int32),
                   ngram_max, vocab_size)

    @classmethod
    def build(cls, tokenizer, paths, ngram_max: int = 4, min_count: int = 2) -> NgramTable:
        """From text files (folders: every file below them, sorted); each file, or each record of a
        file split by DOC_SEPARATOR, is a document."""
        files = sorted(f for p in map(Path, paths) for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file())
        if not files:
            raise ConfigError(f"no files found in {[str(p) for p in paths]}")
        docs = (d for f in files for d in f.read_text(encoding="utf-8", errors="replace").split(DOC_SEPARATOR))
        return cls.from_sequences((tokenizer.encode(d, add_bos=False) for d in docs if d.strip()),
                                  tokenizer.vocab_size, ngram_max, min_count)

    def save(self, path) -> None:
        with open(path, "wb") as f:
            np.savez(f, keys=self.keys, next=self.next, count=self.counts, total=self.totals,
                     meta=np.array([self.ngram_max, self.vocab_size], dtype=np.int64))

    @classmethod
    def load(cls, path) -> NgramTable:
        try:
            with np.load(path, allow_pickle=False) as z:
                keys, nxt, count, total, meta = z["keys"], z["next"], z["count"], z["total"], z["meta"]
        except (OSError, KeyError, ValueError) as e:
            raise ConfigError(f"{path}: not an n-gram table (edgecpm.ngram_table): {e}") from e
        if keys.dtype != np.uint64 or not (len(keys) == len(nxt) == len(count) == len(total)) or meta.shape != (2,):
            raise ConfigError(f"{path}: malformed n-gram table")
        if len(keys) > 1 and np.any(keys[1:] <= keys[:-1]):
            raise ConfigError(f"{path}: n-gram table keys are not sorted and unique")
        return cls(keys, nxt, count, total, int(meta[0]), int(meta[1]))

    def lookup(self, seq: list[int]) -> tuple[int, int, int, int] | None:
        """For the longest suffix of `seq` found in the table: (the token that most often followed
        it, the suffix's length, how often that token followed, how often any did)."""
        top = min(self.ngram_max, len(seq))
        keys = self._keys
        tail = seq[-top:] if top else []
        for n in range(top, 0, -1):
            k = n  # ngram_key(tail[top - n:]), inlined
            for t in tail[top - n :]:
                k = (k * _PRIME + t + 1) & _MASK
            i = bisect.bisect_left(keys, k)
            if i < len(keys) and keys[i] == k:
                return self._next[i], n, self._counts[i], self._totals[i]
        return None
