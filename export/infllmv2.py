"""InfLLM v2 sparse attention in torch (DESIGN.md §7): the `edgecpm::infllmv2_attention` op.

The op's contract is `edgecpm.export.custom_ops.INFLLMV2` (inputs, outputs, attributes); this
module is its torch implementation, a real CPU kernel registered with `torch.library.custom_op`.

Work per call, for queries at positions p (the new tokens) over S = P + T cached keys:
1. compressed keys of the chunks the new tokens complete (chunk j = mean of rows [16j, 16j+32));
2. stage 1: per query and kv head, softmax(q·ck/sqrt(d)) over visible chunks, summed over the
   group's query heads; blocks of 64 tokens score the max of their 5 overlapping chunks;
3. top-k blocks (+ init blocks, + the sliding window), per query; dense below dense_len;
4. stage 2: attention over the selected tokens only. Queries are processed in runs of up to 64
   consecutive positions; each run gathers the union of its queries' blocks, so a decode step at
   64K context reads ~6K keys instead of 64K.

Draft trees (DESIGN.md §7): the T new rows sit in cache slots P..P+T-1 but their positions are
tree depths, so slot and position differ. Every rule is applied by *position*, as if the query's
own path (its ancestors by the step's attn_mask) had been decoded one token at a time:
- stage 2: past row r belongs to block r // 64 (past rows sit at their positions); new row j
  belongs to block positions[j] // 64 and is visible to query t iff attn_mask[t, j] and that
  block is selected for t. For a plain step (positions P + j, causal mask) this is the slot rule.
- stage 1: a query whose path is not the slots P..P+t ("unaligned": a tree node off the first
  branch) scores the chunks that overlap the new rows with compressed keys of its own path
  (past rows + its ancestors by position), never with the slot-ordered ck_new, which mixes in
  siblings. Aligned queries (every query of a plain step) use ck_new as before.
ck_new itself stays slot-ordered: the runtime appends it for plain steps and recomputes the
chunks of a tree's accepted path after compacting it.
"""

from __future__ import annotations

import math
import threading

import torch

from edgecpm.config import SparseConfig

RUN = 64  # queries sharing one gathered key set in stage 2

# Stage 2 copies the selected rows into buffers kept between calls: a fresh multi-MB allocation
# per call costs more in page faults than the copy itself (measured 5x at 64K context).
_scratch = threading.local()


def scratch(name: str, rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    """A [rows, cols] buffer reused across calls on this thread (grown when too small)."""
    buf = getattr(_scratch, name, None)
    # A buffer made under torch.inference_mode (the torch backend) cannot be written outside it.
    stale = buf is not None and buf.is_inference() and not torch.is_inference_mode_enabled()
    if buf is None or stale or buf.dtype != dtype or buf.numel() < rows * cols:
        buf = torch.empty(rows * cols, dtype=dtype)
        setattr(_scratch, name, buf)
    return buf[: rows * cols].view(rows, cols)


def new_chunks(past_k: torch.Tensor, k: torch.Tensor, cfg: SparseConfig) -> torch.Tensor:
    """Mean-pooled keys [Cn, Hkv, D] (fp32) of the chunks completed by appending k to past_k.
    Reads only the last kernel_size past rows: O(new tokens) work per step."""
    P, T = past_k.shape[0], k.shape[0]
    first, last = cfg.n_chunks(P), cfg.n_chunks(P + T)
    if last == first:
        return k.new_zeros((0, *k.shape[1:]), dtype=torch.float32)
    start = first * cfg.kernel_stride
    tail = torch.cat([past_k[start:], k]).float() if start < P else k[start - P :].float()
    windows = tail.unfold(0, cfg.kernel_size, cfg.kernel_stride)  # [Cn, Hkv, D, kernel]
    return windows.mean(-1)


def aligned_queries(pos: torch.Tensor, attn_mask: torch.Tensor, P: int) -> torch.Tensor:
    """bool [T]: query t's path is the slots P..P+t (positions[t] = P + t, and every new row i <= t
    is visible to it and sits at position P + i). Every query of a plain step is aligned; in a
    draft tree, the first branch."""
    T = pos.shape[0]
    at_slot = pos == P + torch.arange(T)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    return at_slot & (~causal | (attn_mask & at_slot[None, :])).all(1)


def path_chunk_logits(q: torch.Tensor, past_k: torch.Tensor, k: torch.Tensor, pos: torch.Tensor,
                      attn_mask: torch.Tensor, cfg: SparseConfig):
    """Stage-1 logits of the chunks overlapping the new rows (indices n_chunks(P) .. n_chunks(P+T))
    for the unaligned queries, each chunk the mean of the query's own path rows: the past rows of
    the chunk and the new rows it sees (attn_mask) whose positions fall in the chunk.
    Returns (queries [Tn], logits [Hkv, G, Tn, Cn]) or None when every query is aligned."""
    P, T = past_k.shape[0], k.shape[0]
    queries = (~aligned_queries(pos, attn_mask, P)).nonzero().flatten()
    first, last = cfg.n_chunks(P), cfg.n_chunks(P + T)
    if queries.numel() == 0 or last == first:
        return None
    st, ks = cfg.kernel_stride, cfg.kernel_size
    lo = torch.arange(first, last) * st  # first row (= position) of each chunk
    past_sum = torch.stack([past_k[a : min(a + ks, P)].float().sum(0) for a in lo.tolist()])  # [Cn, Hkv, D]
    inside = (pos[None, :] >= lo[:, None]) & (pos[None, :] < lo[:, None] + ks)  # [Cn, T]: row j in chunk c
    w = (attn_mask[queries][:, None, :] & inside[None]).float()  # [Tn, Cn, T]
    ck = (past_sum + torch.einsum("tcj,jhd->tchd", w, k.float())) / ks  # [Tn, Cn, Hkv, D]
    Tn, (_, Hq, D), Hkv = queries.numel(), q.shape, k.shape[1]
    qg = q[queries].float().reshape(Tn, Hkv, Hq // Hkv, D)
    return queries, torch.einsum("thgd,tchd->hgtc", qg, ck) / math.sqrt(D)


def block_scores(q: torch.Tensor, ck: torch.Tensor, pos: torch.Tensor, S: int, cfg: SparseConfig,
                 path=None) -> torch.Tensor:
    """Stage 1: [Hkv, T, nb] block scores (before init/window/top-k) for queries q [T, Hq, D].
    path: path_chunk_logits(...) for a draft tree (replaces the new chunks' logits of its queries)."""
    T, Hq, D = q.shape
    Hkv, nc = ck.shape[1], ck.shape[0]
    G = Hq // Hkv
    nb = math.ceil(S / cfg.block_size)
    qg = q.float().reshape(T, Hkv, G, D).permute(1, 2, 0, 3)  # [Hkv, G, T, D]
    s = torch.einsum("hgtd,chd->hgtc", qg, ck) / math.sqrt(D)  # [Hkv, G, T, nc]
    if path is not None:
        queries, logits = path
        s[:, :, queries, nc - logits.shape[-1] :] = logits
    chunk_end = torch.arange(nc) * cfg.kernel_stride + cfg.kernel_size - 1
    s = s.masked_fill(chunk_end[None, :] > pos[:, None], float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0).sum(1)  # [Hkv, T, nc]; no visible chunk -> zeros
    # Block b pools chunks [4b-1, 4b+3]: max over its 4 own chunks and the one before.
    per = cfg.block_size // cfg.kernel_stride
    padded = torch.full((Hkv, T, nb * per), float("-inf"))
    padded[..., :nc] = p
    own = padded.reshape(Hkv, T, nb, per)
    before = torch.cat([torch.full((Hkv, T, 1), float("-inf")), own[..., :-1, -1]], dim=-1)
    return torch.maximum(own.amax(-1), before)


def select_blocks(blk: torch.Tensor, pos: torch.Tensor, cfg: SparseConfig) -> torch.Tensor:
    """Top-k selection with init blocks and the window: bool [Hkv, T, nb] of blocks to attend."""
    Hkv, T, nb = blk.shape
    qb = (pos // cfg.block_size)[:, None]  # [T, 1]
    b = torch.arange(nb)[None, :]  # [1, nb]
    local = cfg.window_size // cfg.block_size
    blk = blk.clone()
    blk[..., : cfg.init_blocks] = float("inf")
    if cfg.semantics == "v1":
        window = (b > qb - local) & (b <= qb)
        blk = blk.masked_fill(window, float("-inf"))
        k = min(cfg.topk, nb)
    else:  # v2: the window competes inside top-k with +inf scores
        window = (b >= qb - local) & (b <= qb)
        blk = blk.masked_fill(window, float("inf"))
        k = min(cfg.topk + local, nb)
    # Overlapping pooling makes exact ties common (two blocks share a boundary chunk): the lower
    # block index wins, as ONNX TopK specifies, hence a stable sort instead of torch.topk.
    top = blk.sort(dim=-1, descending=True, stable=True).indices[..., :k]  # [Hkv, T, k]
    chosen = torch.zeros(Hkv, T, nb, dtype=torch.bool).scatter_(-1, top, True)
    chosen &= (b < qb) if cfg.semantics == "v1" else (b <= qb)
    if cfg.semantics == "v1":
        chosen |= window
    dense = (pos + 1 < cfg.dense_len)[:, None] & (b <= qb)  # dense queries: every causal block
    return chosen | dense


class BlockRows:
    """The rows of the selected blocks (sorted ids) for stage 2: the past rows of those blocks (by
    cache row, = position), then the new rows whose *positions* fall in them (ascending). Whole
    past blocks are copied 64 rows at a time straight from the cache; the block the cache ends in
    and the new rows are gathered row by row. For a plain step this is the blocks' rows in order."""

    def __init__(self, blocks: torch.Tensor, P: int, new_blocks: torch.Tensor, B: int):
        self.full = P // B
        self.whole = blocks[blocks < self.full]
        self.past_blocks = blocks[blocks * B < P]  # blocks with past rows (the last one maybe partial)
        rows = (self.past_blocks[self.past_blocks >= self.full, None] * B + torch.arange(B)).flatten()
        self.past_rows = rows[rows < P]
        self.new_rows = torch.isin(new_blocks, blocks).nonzero().flatten()  # new_blocks: block of each new row
        self.B = B
        self.n_past = self.whole.numel() * B + self.past_rows.numel()
        self.count = self.n_past + self.new_rows.numel()

    def gather(self, past: torch.Tensor, new: torch.Tensor, h: int, name: str) -> torch.Tensor:
        """[U, D] rows of kv head h, in the scratch buffer `name` (valid until its next use)."""
        B, full, D = self.B, self.full, past.shape[2]
        out = scratch(name, self.count, D, past.dtype)
        n, m = self.whole.numel() * B, self.past_rows.numel()
        torch.index_select(past[: full * B, h].unflatten(0, (full, B)), 0, self.whole, out=out[:n].view(-1, B, D))
        torch.index_select(past[:, h], 0, self.past_rows, out=out[n : n + m])
        torch.index_select(new[:, h], 0, self.new_rows, out=out[n + m :])
        return out


def sparse_attend(q, k, v, past_k, past_v, pos, attn_mask, blocks, cfg: SparseConfig) -> torch.Tensor:
    """Stage 2 over the selected blocks. Returns [T, Hq, D] in q's dtype."""
    T, Hq, D = q.shape
    P, Hkv = past_k.shape[0], past_k.shape[1]
    G = Hq // Hkv
    B = cfg.block_size
    out = torch.empty(T, Hkv, G, D, dtype=q.dtype)
    scale = 1.0 / math.sqrt(D)
    new_blocks = pos // B  # a new row's block is that of its position (a tree slot is not one)
    for t0 in range(0, T, RUN):
        t1 = min(t0 + RUN, T)
        for h in range(Hkv):
            sel = blocks[h, t0:t1]  # [Tr, nb]
            used = sel.any(0).nonzero().flatten()
            rows = BlockRows(used, P, new_blocks, B)
            keys = rows.gather(past_k, k, h, "keys").float()  # [U, D]
            vals = rows.gather(past_v, v, h, "values").float()
            # Visibility per query: a past row's block was selected (past rows come in block
            # order, so row i is in block past_blocks[i // B]) ...
            visible = torch.empty(t1 - t0, rows.count, dtype=torch.bool)
            visible[:, : rows.n_past] = sel[:, rows.past_blocks].repeat_interleave(B, dim=1)[:, : rows.n_past]
            # ... a new row's needs the block of its position selected and the step's mask (causal
            # for plain steps, ancestors for a draft tree).
            visible[:, rows.n_past :] = sel[:, new_blocks[rows.new_rows]] & attn_mask[t0:t1][:, rows.new_rows]
            qh = q[t0:t1, h * G : (h + 1) * G].float().reshape(-1, D)  # [Tr*G, D]
            s = (qh @ keys.T).view(t1 - t0, G, -1) * scale
            s = s.masked_fill(~visible[:, None, :], float("-inf"))
            p = torch.softmax(s, -1).view(-1, rows.count)
            out[t0:t1, h] = (p @ vals).view(t1 - t0, G, D).to(q.dtype)
    return out.reshape(T, Hq, D)


@torch.library.custom_op("edgecpm::infllmv2_attention", mutates_args=())
def infllmv2_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past_k: torch.Tensor,
                       past_v: torch.Tensor, past_ck: torch.Tensor, position_ids: torch.Tensor,
                       attn_mask: torch.Tensor, kernel_size: int, kernel_stride: int, block_size: int,
                       init_blocks: int, window_size: int, topk: int, dense_len: int,
                       semantics: int) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, Hq, D], k/v [T, Hkv, D], past_k/v [P, Hkv, D], past_ck [nc(P), Hkv, D] fp32,
    position_ids [T] (in [P, P + T)), attn_mask [T, T] bool -> (out [T, Hq, D], new compressed
    keys [Cn, Hkv, D], slot-ordered)."""
    cfg = SparseConfig(kernel_size=kernel_size, kernel_stride=kernel_stride, block_size=block_size,
                       init_blocks=init_blocks, window_size=window_size, topk=topk, dense_len=dense_len,
                       semantics=f"v{semantics}")
    ck_new = new_chunks(past_k, k, cfg)
    S = past_k.shape[0] + k.shape[0]
    path = path_chunk_logits(q, past_k, k, position_ids, attn_mask, cfg)  # None for plain steps
    blk = block_scores(q, torch.cat([past_ck.float(), ck_new]), position_ids, S, cfg, path)
    blocks = select_blocks(blk, position_ids, cfg)
    return sparse_attend(q, k, v, past_k, past_v, position_ids, attn_mask, blocks, cfg), ck_new


@infllmv2_attention.register_fake
def _(q, k, v, past_k, past_v, past_ck, position_ids, attn_mask, kernel_size, kernel_stride, block_size,
      init_blocks, window_size, topk, dense_len, semantics):
    n_new = torch.library.get_ctx().new_dynamic_size()
    return torch.empty_like(q), q.new_empty((n_new, k.shape[1], k.shape[2]), dtype=torch.float32)


def sparse_attention(q, k, v, past_k, past_v, past_ck, position_ids, attn_mask, cfg: SparseConfig):
    """Model-facing call: unpacks the config into the op's attributes."""
    return torch.ops.edgecpm.infllmv2_attention(
        q, k, v, past_k, past_v, past_ck, position_ids, attn_mask, cfg.kernel_size, cfg.kernel_stride,
        cfg.block_size, cfg.init_blocks, cfg.window_size, cfg.topk, cfg.dense_len, int(cfg.semantics[1:]))
