"""An independent brute-force InfLLM v2 reference, written from DESIGN.md §7 as plainly as
possible: one query and one kv head at a time, Python loops, float64. Deliberately shares no code
with edgecpm.export.infllmv2."""

from __future__ import annotations

import math

import numpy as np


def reference(q, k_all, v_all, pos0, cfg):
    """q [T, Hq, d] roped queries at positions pos0..pos0+T-1; k_all, v_all [S, Hk, d] the whole cache
    including the new tokens (plain causal step). Returns (out [T, Hq, d], selected block sets
    {(t, g): sorted list of blocks attended})."""
    q, k_all, v_all = (np.asarray(x, dtype=np.float64) for x in (q, k_all, v_all))
    T, Hq, d = q.shape
    S, Hk, _ = k_all.shape
    G = Hq // Hk
    st, ks, B = cfg["kernel_stride"], cfg["kernel_size"], cfg["block_size"]
    nc = max((S - ks) // st + 1, 0)
    ck = np.array([k_all[j * st : j * st + ks].mean(0) for j in range(nc)]).reshape(nc, Hk, d)
    nb = math.ceil(S / B)
    local = cfg["window_size"] // B
    v2 = cfg.get("semantics", "v1") == "v2"
    out = np.zeros((T, Hq, d))
    chosen = {}
    for t in range(T):
        p = pos0 + t
        qb = p // B
        for g in range(Hk):
            if p + 1 < cfg["dense_len"]:
                keep = set(range(qb + 1))  # dense query: every causal block
            else:
                scores = np.zeros(nc)
                for h in range(g * G, (g + 1) * G):
                    s = np.array([q[t, h] @ ck[j, g] / math.sqrt(d) if j * st + ks - 1 <= p else -np.inf
                                  for j in range(nc)])
                    if nc and np.isfinite(s).any():
                        e = np.exp(s - s[np.isfinite(s)].max())
                        scores += e / e.sum()
                blk = np.full(nb, -np.inf)
                for b in range(nb):
                    lo, hi = max(4 * b - 1, 0), min(4 * b + 4, nc)
                    if lo < hi:
                        blk[b] = scores[lo:hi].max()
                blk[: cfg["init_blocks"]] = np.inf
                if v2:
                    for b in range(max(qb - local, 0), min(qb + 1, nb)):
                        blk[b] = np.inf
                    kk = min(cfg["topk"] + local, nb)
                else:
                    for b in range(max(qb - local + 1, 0), min(qb + 1, nb)):
                        blk[b] = -np.inf
                    kk = min(cfg["topk"], nb)
                order = sorted(range(nb), key=lambda b: -blk[b])[:kk]
                keep = {b for b in order if (b <= qb if v2 else b < qb)}
                if not v2:
                    keep |= set(range(max(qb - local + 1, 0), qb + 1))
            chosen[(t, g)] = sorted(keep)
            rows = [r for r in range(S) if r // B in keep and r <= p]
            for h in range(g * G, (g + 1) * G):
                s = np.array([q[t, h] @ k_all[r, g] / math.sqrt(d) for r in rows])
                w = np.exp(s - s.max())
                w /= w.sum()
                out[t, h] = w @ v_all[rows, g]
    return out, chosen
