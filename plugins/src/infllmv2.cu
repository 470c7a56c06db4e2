// InfLLM v2 sparse attention (DESIGN.md §7): the semantics of export/infllmv2.py, stage by stage.
//
//   compress  -> ck_new   mean of the kernel_size keys of each chunk the new tokens complete
//   stage1    -> score    softmax over visible chunks per query head, summed over the group
//   select    -> blocks   5-chunk max pooling, init/window rules, top-k (ties: lower index), dense
//   attend    -> out      attention over the chosen blocks (decode: split-K; prefill: row tiles)
//
// Draft trees: the step's new rows sit in slots P..P+T-1 but at positions[j] (tree depths), and
// every rule goes by position, as in export/infllmv2.py. Stage 2 walks the chosen blocks' past
// rows, then the new rows, each visible iff new_mask allows it and the block of its *position* is
// chosen. Stage 1: a query whose path is not the slots P..P+t (unaligned; path_scores_kernel)
// scores the chunks overlapping the new rows with compressed keys of its own path.
//
// All arithmetic is fp32 on CUDA cores; inputs are fp32 or fp16. The kernels are written for any
// group size G = Hq / Hkv and head dims D % 8 == 0, D <= 256.
#include <algorithm>

#include "common.cuh"

namespace ecpm {
namespace {

constexpr int S1_THREADS = 256;
constexpr int S1_ROWS = 64;    // (query, head) rows per stage-1 CTA
constexpr int S1_CHUNKS = 32;  // chunks per stage-1 tile (one per lane)
constexpr int SEL_THREADS = 256;
constexpr int ATT_THREADS = 128;
constexpr int ATT_ROWS = 16;  // (query, head) rows per decode CTA (prefill: 64 or 32, see prefill_rows)
constexpr int ATT_KEYS = 32;  // keys per attention tile (one per lane)
constexpr int MAX_SPLITS = 64;
constexpr int PATH_THREADS = 128;

__host__ __device__ inline int64_t lmin(int64_t a, int64_t b) { return a < b ? a : b; }
__host__ __device__ inline int64_t lmax(int64_t a, int64_t b) { return a > b ? a : b; }
__host__ __device__ inline int64_t n_chunks(int64_t len, int ks, int st) { return len < ks ? 0 : (len - ks) / st + 1; }

// Order-preserving map of a float (no NaN) onto uint32: a > b  <=>  key(a) > key(b).
__device__ __forceinline__ unsigned order_key(float v) {
    unsigned u = __float_as_uint(v);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Ordered compaction of one chunk of blockDim.x candidates (candidate i of the chunk belongs to
// thread i): returns the chunk's number of flagged candidates and sets *rank, for a flagged
// thread, to the number of flagged candidates before its own. Every thread of the CTA must call
// it (it synchronises); scratch holds one int per warp.
__device__ int ordered_chunk(bool flagged, int* rank, int* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    const unsigned m = __ballot_sync(0xffffffffu, flagged);
    __syncthreads();  // scratch may still be read by the previous call
    if (lane == 0) scratch[warp] = __popc(m);
    __syncthreads();
    int before = 0, total = 0;
    for (int w = 0; w < nwarps; ++w) {
        before += w < warp ? scratch[w] : 0;
        total += scratch[w];
    }
    *rank = before + __popc(m & ((1u << lane) - 1u));
    return total;
}

// CTA-wide sum of an int (every thread gets the result).
__device__ int block_sum(int v, int* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    v = warp_sum_int(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    int total = 0;
    for (int w = 0; w < nwarps; ++w) total += scratch[w];
    return total;
}

// Dot product of two shared-memory rows of D floats (D a multiple of 4, rows 16-byte aligned).
__device__ __forceinline__ float dot_rows(const float* xr, const float* yr, int D) {
    const float4* x = reinterpret_cast<const float4*>(xr);
    const float4* y = reinterpret_cast<const float4*>(yr);
    float dot = 0.f;
    for (int d = 0; d < D / 4; ++d) {
        const float4 u = x[d], w = y[d];
        dot = fmaf(u.x, w.x, dot);
        dot = fmaf(u.y, w.y, dot);
        dot = fmaf(u.z, w.z, dot);
        dot = fmaf(u.w, w.w, dot);
    }
    return dot;
}

// ---- compress ------------------------------------------------------------------------------------
// One CTA per (new chunk, kv head); the chunk's rows come from the past or the new keys.
template <typename T>
__global__ void compress_kernel(const T* past_k, const T* k, int64_t P, int Hkv, int D, int ks, int st,
                                int64_t first, float* ck_new) {
    const int64_t j = first + blockIdx.x;
    const int h = blockIdx.y;
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float s = 0.f;
        for (int r = 0; r < ks; ++r) {
            const int64_t row = j * st + r;
            const T* src = row < P ? past_k + (row * Hkv + h) * D : k + ((row - P) * Hkv + h) * D;
            s += to_f32(src[d]);
        }
        ck_new[((int64_t)blockIdx.x * Hkv + h) * D + d] = s / (float)ks;
    }
}

// ---- stage 1 -------------------------------------------------------------------------------------
// A CTA takes a tile of S1_CHUNKS chunks and QT consecutive queries (all G heads of each: rows
// (t, g) flattened, handled S1_ROWS at a time). Pass kScore=false writes each row's tile max and
// sum of exponentials; stage1_combine merges the tiles; pass kScore=true recomputes the logits,
// normalises them with the merged max/sum and sums the probabilities over the group.
struct Stage1Args {
    const void* q;
    const float* past_ck;
    const float* ck_new;
    const int32_t* pos;
    const float* path_s;     // [Hkv, T, G, Cn] logits of unaligned queries (path_scores_kernel), or null
    const uint8_t* aligned;  // [T], or null: every query aligned
    int64_t T, C, nc, Cn;
    int64_t qblock0;  // blockIdx.y offset (launches of more than 65535 query blocks go in pieces)
    int Hq, Hkv, G, D, ks, st, QT;
    float* tile_m;  // [Hkv, T, G, ntiles]
    float* tile_l;
    float* row_m;  // [Hkv, T, G]
    float* row_l;
    float* score;  // [Hkv, T, nc]
};

template <typename T, bool kScore>
__global__ void __launch_bounds__(S1_THREADS) stage1_kernel(Stage1Args a) {
    extern __shared__ float4 smem4[];
    float* smem = reinterpret_cast<float*>(smem4);
    const int D = a.D, G = a.G, ld = D + 4;
    const int h = blockIdx.z, tile = blockIdx.x, ntiles = gridDim.x;
    const int64_t c0 = (int64_t)tile * S1_CHUNKS, t0 = (a.qblock0 + blockIdx.y) * a.QT;
    const int nq = (int)lmin(a.QT, a.T - t0);
    const int n_rows = nq * G;
    float* ck_s = smem;                     // [S1_CHUNKS][ld]
    float* q_s = ck_s + S1_CHUNKS * ld;     // [S1_ROWS][ld]
    float* s_s = q_s + S1_ROWS * ld;        // [S1_ROWS][S1_CHUNKS]
    float* acc_s = s_s + S1_ROWS * S1_CHUNKS;  // [QT][S1_CHUNKS]
    const T* q = static_cast<const T*>(a.q);
    const float scale = rsqrtf((float)D);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;

    for (int i = threadIdx.x; i < S1_CHUNKS * (D / 4); i += blockDim.x) {
        const int c = i / (D / 4), d4 = i % (D / 4);
        const int64_t cg = c0 + c;
        float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
        if (cg < a.nc) {
            const float* src = cg < a.C ? a.past_ck + (cg * a.Hkv + h) * D : a.ck_new + ((cg - a.C) * a.Hkv + h) * D;
            v = reinterpret_cast<const float4*>(src)[d4];
        }
        reinterpret_cast<float4*>(ck_s + c * ld)[d4] = v;
    }
    if (kScore)
        for (int i = threadIdx.x; i < a.QT * S1_CHUNKS; i += blockDim.x) acc_s[i] = 0.f;

    constexpr int V = 16 / sizeof(T);
    for (int r0 = 0; r0 < n_rows; r0 += S1_ROWS) {
        __syncthreads();  // ck_s ready / previous piece done with q_s and s_s
        for (int i = threadIdx.x; i < S1_ROWS * (D / V); i += blockDim.x) {
            const int r = i / (D / V), dv = i % (D / V);
            float* dst = q_s + r * ld + dv * V;
            if (r0 + r < n_rows) {
                const int64_t t = t0 + (r0 + r) / G;
                const int head = h * G + (r0 + r) % G;
                load16_f32(q + (t * a.Hq + head) * D + dv * V, dst);
            } else {
#pragma unroll
                for (int e = 0; e < V; ++e) dst[e] = 0.f;
            }
        }
        __syncthreads();
        // Logits: a warp shares one row (q broadcast), lanes walk the chunks.
        for (int i = threadIdx.x; i < S1_ROWS * S1_CHUNKS; i += blockDim.x) {
            const int r = i / S1_CHUNKS, c = i % S1_CHUNKS;
            const int64_t cg = c0 + c;
            float s = -CUDART_INF_F;
            if (r0 + r < n_rows && cg < a.nc) {
                const int64_t t = t0 + (r0 + r) / G;
                if (cg * a.st + a.ks - 1 <= (int64_t)a.pos[t]) {
                    if (cg >= a.C && a.aligned != nullptr && !a.aligned[t])  // a chunk of the query's own path
                        s = a.path_s[(((int64_t)h * a.T + t) * G + (r0 + r) % G) * a.Cn + (cg - a.C)];
                    else
                        s = dot_rows(q_s + r * ld, ck_s + c * ld, D) * scale;
                }
            }
            s_s[i] = s;
        }
        __syncthreads();
        // One warp per row; S1_CHUNKS == 32, one chunk per lane.
        for (int r = warp; r < S1_ROWS && r0 + r < n_rows; r += S1_THREADS / 32) {
            const int flat = r0 + r;
            const int64_t row_id = ((int64_t)h * a.T + t0 + flat / G) * G + flat % G;
            const float s = s_s[r * S1_CHUNKS + lane];
            if (!kScore) {
                const float m = warp_max(s);
                const float l = warp_sum(exp_diff(s, m));
                if (lane == 0) {
                    a.tile_m[row_id * ntiles + tile] = m;
                    a.tile_l[row_id * ntiles + tile] = l;
                }
            } else {
                const float m = a.row_m[row_id], l = a.row_l[row_id];
                s_s[r * S1_CHUNKS + lane] = l > 0.f ? expf(s - m) / l : 0.f;  // expf(-inf) = 0
            }
        }
        if (kScore) {
            __syncthreads();
            // Sum the group's probabilities: thread (query, chunk) adds its query's rows of this piece.
            for (int i = threadIdx.x; i < nq * S1_CHUNKS; i += blockDim.x) {
                const int tq = i / S1_CHUNKS, c = i % S1_CHUNKS;
                const int lo = max(tq * G, r0), hi = min(tq * G + G, min(r0 + S1_ROWS, n_rows));
                float sum = 0.f;
                for (int flat = lo; flat < hi; ++flat) sum += s_s[(flat - r0) * S1_CHUNKS + c];
                acc_s[i] += sum;
            }
        }
    }
    if (kScore) {
        __syncthreads();
        for (int i = threadIdx.x; i < nq * S1_CHUNKS; i += blockDim.x) {
            const int tq = i / S1_CHUNKS, c = i % S1_CHUNKS;
            const int64_t cg = c0 + c;
            if (cg < a.nc) a.score[((int64_t)h * a.T + t0 + tq) * a.nc + cg] = acc_s[i];
        }
    }
}

// Draft trees, stage 1: one CTA per query t. The query is aligned iff positions[t] = P + t and every
// new row i <= t is visible to it and at position P + i (every query of a plain step); else, for
// each kv head and each chunk c >= C (one overlapping the new rows) visible at positions[t], its
// compressed key is rebuilt from the query's own path -- the chunk's past rows plus the new rows
// new_mask shows it whose positions fall in the chunk -- and scored against the group's heads.
struct PathArgs {
    const void *q, *past_k, *k;
    const int32_t* pos;
    const uint8_t* mask;  // [T, T]
    int64_t T, P, C, nc, Cn;
    int Hq, Hkv, G, D, ks, st;
    float* path_s;     // [Hkv, T, G, Cn]
    uint8_t* aligned;  // [T]
};

template <typename T>
__global__ void __launch_bounds__(PATH_THREADS) path_scores_kernel(PathArgs a) {
    __shared__ float ck_s[256];  // D <= 256
    const int64_t t = blockIdx.x;
    const int64_t p = a.pos[t];
    int bad = p != a.P + t;
    for (int64_t i = threadIdx.x; i <= t && !bad; i += blockDim.x)
        bad = !(a.mask[t * a.T + i] && a.pos[i] == a.P + i);
    const bool aligned = !__syncthreads_or(bad);
    if (threadIdx.x == 0) a.aligned[t] = aligned;
    if (aligned) return;
    const T* past_k = static_cast<const T*>(a.past_k);
    const T* k = static_cast<const T*>(a.k);
    const T* q = static_cast<const T*>(a.q);
    const float scale = rsqrtf((float)a.D);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    for (int h = 0; h < a.Hkv; ++h) {
        for (int64_t c = a.C; c < a.nc && c * a.st + a.ks - 1 <= p; ++c) {
            const int64_t lo = c * a.st, hi = lo + a.ks;
            __syncthreads();  // ck_s is free
            for (int d = threadIdx.x; d < a.D; d += blockDim.x) {
                float sum = 0.f;
                for (int64_t r = lo; r < hi && r < a.P; ++r) sum += to_f32(past_k[(r * a.Hkv + h) * a.D + d]);
                for (int64_t i = 0; i < a.T; ++i)
                    if (a.mask[t * a.T + i] && a.pos[i] >= lo && a.pos[i] < hi)
                        sum += to_f32(k[(i * a.Hkv + h) * a.D + d]);
                ck_s[d] = sum / (float)a.ks;
            }
            __syncthreads();
            for (int g = warp; g < a.G; g += nwarps) {
                const T* qr = q + (t * a.Hq + h * a.G + g) * a.D;
                float dot = 0.f;
                for (int d = lane; d < a.D; d += 32) dot = fmaf(to_f32(qr[d]), ck_s[d], dot);
                dot = warp_sum(dot);
                if (lane == 0) a.path_s[(((int64_t)h * a.T + t) * a.G + g) * a.Cn + (c - a.C)] = dot * scale;
            }
        }
    }
}

// Merges each row's per-tile (max, sum of exp) into the row's softmax max and denominator.
__global__ void stage1_combine(const float* tile_m, const float* tile_l, int64_t rows, int ntiles, float* row_m,
                               float* row_l) {
    const int64_t r = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= rows) return;
    float m = -CUDART_INF_F;
    for (int i = 0; i < ntiles; ++i) m = fmaxf(m, tile_m[r * ntiles + i]);
    float l = 0.f;
    if (m != -CUDART_INF_F)
        for (int i = 0; i < ntiles; ++i) l += tile_l[r * ntiles + i] * exp_diff(tile_m[r * ntiles + i], m);
    row_m[r] = m;
    row_l[r] = l;
}

// ---- select --------------------------------------------------------------------------------------
// One CTA per (query, kv head). The k-th largest block key is found by a radix search over the 32
// key bits (k counts, no sort); the blocks above it are taken, then the lowest-indexed blocks equal
// to it until k are taken: exactly a stable descending sort's first k (ties to the lower index).
struct SelectArgs {
    const float* score;
    const int32_t* pos;
    int64_t T, nc, nb;
    int Hkv, ks, st, B, init, local, topk, dense_len, sem;
    uint8_t* blocks;
    int32_t* list;
    int32_t* count;
};

__global__ void __launch_bounds__(SEL_THREADS) select_kernel(SelectArgs a) {
    extern __shared__ unsigned key_s[];  // [nb] block keys, then reused as chosen flags
    __shared__ int scratch[32];
    const int64_t t = blockIdx.x;
    const int h = blockIdx.y;
    const int64_t nb = a.nb, qb = a.pos[t] / a.B;
    const float* sc = a.score + ((int64_t)h * a.T + t) * a.nc;
    const int per = a.B / a.st;  // chunks per block
    const bool v2 = a.sem == 2;

    for (int64_t b = threadIdx.x; b < nb; b += blockDim.x) {
        float v = -CUDART_INF_F;
        const int64_t lo = lmax(per * b - 1, 0), hi = lmin(per * b + per, a.nc);
        for (int64_t c = lo; c < hi; ++c) v = fmaxf(v, sc[c]);
        if (b < a.init) v = CUDART_INF_F;
        const bool window = v2 ? (b >= qb - a.local && b <= qb) : (b > qb - a.local && b <= qb);
        if (window) v = v2 ? CUDART_INF_F : -CUDART_INF_F;
        key_s[b] = order_key(v);
    }
    __syncthreads();

    const int64_t k = lmin((int64_t)a.topk + (v2 ? a.local : 0), nb);
    unsigned thr = 0;
    int64_t need_eq = 0;
    if (k > 0) {
        for (int bit = 31; bit >= 0; --bit) {
            const unsigned cand = thr | (1u << bit);
            int c = 0;
            for (int64_t b = threadIdx.x; b < nb; b += blockDim.x) c += key_s[b] >= cand;
            if (block_sum(c, scratch) >= k) thr = cand;
        }
        int gt = 0;
        for (int64_t b = threadIdx.x; b < nb; b += blockDim.x) gt += key_s[b] > thr;
        need_eq = k - block_sum(gt, scratch);
    }
    // Decide every block, in index order (ranks of the keys equal to the threshold matter).
    const bool dense = (int64_t)a.pos[t] + 1 < a.dense_len;
    uint8_t* out = a.blocks + ((int64_t)h * a.T + t) * nb;
    int64_t eq_before = 0;
    for (int64_t base = 0; base < nb; base += blockDim.x) {
        const int64_t b = base + threadIdx.x;
        const unsigned key = b < nb ? key_s[b] : 0u;
        const bool eq = k > 0 && b < nb && key == thr;
        int rank;
        const int n_eq = ordered_chunk(eq, &rank, scratch);
        const bool top = k > 0 && b < nb && (key > thr || (eq && eq_before + rank < need_eq));
        eq_before += n_eq;
        if (b < nb) {
            bool chosen = top && (v2 ? b <= qb : b < qb);
            if (!v2) chosen = chosen || (b > qb - a.local && b <= qb);
            chosen = chosen || (dense && b <= qb);
            out[b] = chosen;
        }
    }
    if (a.list == nullptr) return;
    __syncthreads();  // the flags written above are read back below
    int32_t* list = a.list + ((int64_t)h * a.T + t) * nb;
    int64_t n = 0;
    for (int64_t base = 0; base < nb; base += blockDim.x) {
        const int64_t b = base + threadIdx.x;
        const bool chosen = b < nb && out[b];
        int rank;
        const int n_chunk = ordered_chunk(chosen, &rank, scratch);
        if (chosen) list[n + rank] = (int32_t)b;
        n += n_chunk;
    }
    if (threadIdx.x == 0) a.count[(int64_t)h * a.T + t] = (int32_t)n;
}

// ---- stage 2 -------------------------------------------------------------------------------------
// A CTA owns up to ATT_ROWS (query, head) rows of one kv head and keeps their running max, sum and
// fp32 output accumulators in shared memory (flash-attention style online softmax). Keys arrive in
// tiles of ATT_KEYS rows of the chosen blocks.
//   kList (decode): rows = heads of one query; blockIdx.x splits the query's block list; the
//                   partial results are merged by attend_combine.
//   !kList (prefill): rows = consecutive flattened (query, head) rows; the CTA walks the union of
//                   its queries' blocks, masking the blocks a row did not choose.
struct AttnArgs {
    const void *q, *k, *v, *past_k, *past_v;
    const uint8_t* new_mask;  // [T, T]
    const int32_t* list;      // [Hkv, T, nb]
    const int32_t* count;     // [Hkv, T]
    const uint8_t* blocks;    // [Hkv, T, nb] (prefill)
    const int32_t* pos;       // [T]: a new row's block is positions[j] / B; prefill: bounds the blocks to walk
    void* out;                // [T, Hq, D]
    float* part_acc;          // [Hkv, T, G, splits, D] (decode with splits > 1)
    float* part_ml;           // [Hkv, T, G, splits, 2]
    int64_t T, P, nb;
    int64_t y0;  // blockIdx.y offset (launches of more than 65535 row groups go in pieces)
    int Hq, Hkv, G, D, B, splits, head_groups;
};

template <typename T>
__device__ void load_kv_tile(const AttnArgs& a, int h, int64_t row0, int64_t row_end, float* k_s, float* v_s) {
    constexpr int V = 16 / sizeof(T);
    const int D = a.D, ld = D + 4;
    for (int i = threadIdx.x; i < ATT_KEYS * (D / V); i += blockDim.x) {
        const int r = i / (D / V), dv = i % (D / V);
        const int64_t row = row0 + r;
        float* kd = k_s + r * ld + dv * V;
        float* vd = v_s + r * D + dv * V;
        if (row < row_end) {
            const bool past = row < a.P;
            const int64_t off = ((past ? row : row - a.P) * a.Hkv + h) * D + dv * V;
            load16_f32(static_cast<const T*>(past ? a.past_k : a.k) + off, kd);
            load16_f32(static_cast<const T*>(past ? a.past_v : a.v) + off, vd);
        } else {
#pragma unroll
            for (int e = 0; e < V; ++e) kd[e] = vd[e] = 0.f;
        }
    }
}

struct AttnSmem {
    float *q, *k, *v, *s, *acc, *m, *l, *alpha;
    int64_t* row_t;  // query of each row (-1: unused row)
    int* row_head;
    uint8_t* row_sel;  // prefill: did the row's query choose the current block
    int32_t* blist;    // prefill: blocks of the current chunk of the union
};

__host__ __device__ inline size_t attn_smem_bytes(int D, int rows) {
    const int ld = D + 4;
    return sizeof(float) * ((size_t)rows * ld + (size_t)ATT_KEYS * ld + (size_t)ATT_KEYS * D + rows * ATT_KEYS +
                            (size_t)rows * D + 3 * rows) +
           sizeof(int64_t) * rows + sizeof(int) * rows + rows + sizeof(int32_t) * ATT_THREADS + 64;
}

template <int ATT_ROWS>
__device__ AttnSmem carve_attn_smem(char* base, int D) {
    const int ld = D + 4;
    AttnSmem s;
    float* f = reinterpret_cast<float*>(base);
    s.q = f;
    s.k = s.q + ATT_ROWS * ld;
    s.v = s.k + ATT_KEYS * ld;
    s.s = s.v + ATT_KEYS * D;
    s.acc = s.s + ATT_ROWS * ATT_KEYS;
    s.m = s.acc + ATT_ROWS * D;
    s.l = s.m + ATT_ROWS;
    s.alpha = s.l + ATT_ROWS;
    char* p = reinterpret_cast<char*>(s.alpha + ATT_ROWS);
    p = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(p) + 7) & ~uintptr_t(7));
    s.row_t = reinterpret_cast<int64_t*>(p);
    s.row_head = reinterpret_cast<int*>(s.row_t + ATT_ROWS);
    s.blist = reinterpret_cast<int32_t*>(s.row_head + ATT_ROWS);
    s.row_sel = reinterpret_cast<uint8_t*>(s.blist + ATT_THREADS);
    return s;
}

// Did query t choose block b for kv head h? decode: binary search in its ascending block list.
template <bool kList>
__device__ bool block_chosen(const AttnArgs& a, int h, int64_t t, int64_t b) {
    if (b < 0 || b >= a.nb) return false;
    const int64_t ht = (int64_t)h * a.T + t;
    if (!kList) return a.blocks[ht * a.nb + b] != 0;
    const int32_t* list = a.list + ht * a.nb;
    int64_t lo = 0, hi = a.count[ht];
    while (lo < hi) {
        const int64_t mid = (lo + hi) / 2;
        if (list[mid] < b) lo = mid + 1; else hi = mid;
    }
    return lo < a.count[ht] && list[lo] == b;
}

// Adds the keys [row0, row_end) to the CTA's rows: past rows of block b (b >= 0), or new rows
// (b = -1, rows >= P), each visible iff new_mask allows it and the block of its position is chosen.
template <typename T, bool kList, int ATT_ROWS>
__device__ void attend_tile(const AttnArgs& a, const AttnSmem& sm, int h, int64_t b, int64_t row0, int64_t row_end) {
    const int D = a.D, ld = D + 4;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();  // the previous tile is fully consumed
    load_kv_tile<T>(a, h, row0, row_end, sm.k, sm.v);
    if (!kList && b >= 0 && threadIdx.x < ATT_ROWS) {
        const int64_t t = sm.row_t[threadIdx.x];
        sm.row_sel[threadIdx.x] = t >= 0 && a.blocks[((int64_t)h * a.T + t) * a.nb + b];
    }
    __syncthreads();
    const float scale = rsqrtf((float)D);
    for (int i = threadIdx.x; i < ATT_ROWS * ATT_KEYS; i += blockDim.x) {
        const int r = i / ATT_KEYS, c = i % ATT_KEYS;
        const int64_t t = sm.row_t[r], row = row0 + c;
        bool visible = t >= 0 && row < row_end;
        if (visible && b >= 0) visible = kList || sm.row_sel[r];
        if (visible && b < 0) {
            const int64_t j = row - a.P;
            visible = a.new_mask[t * a.T + j] != 0 && block_chosen<kList>(a, h, t, a.pos[j] / a.B);
        }
        float s = -CUDART_INF_F;
        if (visible) {
            s = dot_rows(sm.q + r * ld, sm.k + c * ld, D) * scale;
        }
        sm.s[i] = s;
    }
    __syncthreads();
    // Online softmax, one warp per row and one key per lane (ATT_KEYS == 32).
    for (int r = warp; r < ATT_ROWS; r += ATT_THREADS / 32) {
        const float s = sm.s[r * ATT_KEYS + lane];
        const float m_old = sm.m[r];
        const float m_new = fmaxf(m_old, warp_max(s));
        const float p = exp_diff(s, m_new);
        const float sum = warp_sum(p);
        sm.s[r * ATT_KEYS + lane] = p;
        if (lane == 0) {
            const float alpha = exp_diff(m_old, m_new);
            sm.alpha[r] = alpha;
            sm.l[r] = sm.l[r] * alpha + sum;
            sm.m[r] = m_new;
        }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < ATT_ROWS * D; i += blockDim.x) {
        const int r = i / D, d = i % D;
        float o = sm.acc[i] * sm.alpha[r];
        const float* p = sm.s + r * ATT_KEYS;
#pragma unroll 8
        for (int c = 0; c < ATT_KEYS; ++c) o = fmaf(p[c], sm.v[c * D + d], o);
        sm.acc[i] = o;
    }
}

// The past rows of block b (its new rows, if any, are walked by attend_new_rows, by position).
template <typename T, bool kList, int ATT_ROWS>
__device__ void attend_block(const AttnArgs& a, const AttnSmem& sm, int h, int64_t b) {
    const int64_t end = lmin((b + 1) * a.B, a.P);
    for (int64_t row0 = b * a.B; row0 < end; row0 += ATT_KEYS)
        attend_tile<T, kList, ATT_ROWS>(a, sm, h, b, row0, lmin(row0 + ATT_KEYS, end));
}

// The new rows any of the queries [t_first, t_last] may see (new_mask), in tiles.
template <typename T, bool kList, int ATT_ROWS>
__device__ void attend_new_rows(const AttnArgs& a, const AttnSmem& sm, int h, int64_t t_first, int64_t t_last) {
    __shared__ int range_s[2];
    __syncthreads();  // range_s and the tiles' shared memory are free
    if (threadIdx.x == 0) range_s[0] = 0x7fffffff, range_s[1] = -1;
    __syncthreads();
    int lo = 0x7fffffff, hi = -1;
    const int64_t n = (t_last - t_first + 1) * a.T;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x)
        if (a.new_mask[t_first * a.T + i]) {
            const int j = (int)(i % a.T);
            lo = min(lo, j);
            hi = max(hi, j);
        }
    if (hi >= 0) {
        atomicMin(&range_s[0], lo);
        atomicMax(&range_s[1], hi);
    }
    __syncthreads();
    const int64_t j_lo = range_s[0], j_hi = (int64_t)range_s[1] + 1;
    for (int64_t j0 = j_lo; j0 < j_hi; j0 += ATT_KEYS)
        attend_tile<T, kList, ATT_ROWS>(a, sm, h, -1, a.P + j0, a.P + lmin(j0 + ATT_KEYS, j_hi));
}

// ATT_ROWS: the (query, head) rows a CTA owns (<= ATT_THREADS).
template <typename T, bool kList, int ATT_ROWS>
__global__ void attend_kernel(AttnArgs a) {
    extern __shared__ float4 smem4[];
    const AttnSmem sm = carve_attn_smem<ATT_ROWS>(reinterpret_cast<char*>(smem4), a.D);
    const int D = a.D, G = a.G, ld = D + 4;
    const int h = blockIdx.z;
    constexpr int V = 16 / sizeof(T);

    // Which (query, head) rows this CTA owns.
    int64_t t_first = 0, t_last = 0;
    if (threadIdx.x < ATT_ROWS) {
        const int r = threadIdx.x;
        int64_t t = -1;
        int g = 0;
        if (kList) {
            t = (a.y0 + blockIdx.y) / a.head_groups;
            g = (int)((a.y0 + blockIdx.y) % a.head_groups) * ATT_ROWS + r;
            if (g >= G) t = -1;
        } else {
            const int64_t flat = (a.y0 + blockIdx.y) * ATT_ROWS + r;
            if (flat < a.T * G) t = flat / G, g = (int)(flat % G);
        }
        sm.row_t[r] = t;
        sm.row_head[r] = h * G + g;
        sm.m[r] = -CUDART_INF_F;
        sm.l[r] = 0.f;
    }
    for (int i = threadIdx.x; i < ATT_ROWS * D; i += blockDim.x) sm.acc[i] = 0.f;
    __syncthreads();
    for (int i = threadIdx.x; i < ATT_ROWS * (D / V); i += blockDim.x) {
        const int r = i / (D / V), dv = i % (D / V);
        float* dst = sm.q + r * ld + dv * V;
        const int64_t t = sm.row_t[r];
        if (t >= 0) {
            load16_f32(static_cast<const T*>(a.q) + (t * a.Hq + sm.row_head[r]) * D + dv * V, dst);
        } else {
#pragma unroll
            for (int e = 0; e < V; ++e) dst[e] = 0.f;
        }
    }
    // (attend_tile synchronises before its first use of sm.q)

    if (kList) {
        const int64_t t = (a.y0 + blockIdx.y) / a.head_groups;
        const int64_t n = a.count[(int64_t)h * a.T + t];
        const int64_t per = (n + a.splits - 1) / a.splits;
        const int64_t i0 = blockIdx.x * per, i1 = lmin(n, i0 + per);
        const int32_t* list = a.list + ((int64_t)h * a.T + t) * a.nb;
        for (int64_t i = i0; i < i1; ++i) attend_block<T, true, ATT_ROWS>(a, sm, h, list[i]);
        if (blockIdx.x == 0) attend_new_rows<T, true, ATT_ROWS>(a, sm, h, t, t);  // one split takes them
    } else {
        // The union of the rows' blocks holding past rows, one chunk of ATT_THREADS candidate
        // blocks at a time; chosen blocks never exceed the query's own block (positions bound the
        // walk). Then the new rows.
        t_first = sm.row_t[0];  // row 0 always holds a query (the grid covers T * G rows)
        t_last = t_first;
        for (int r = 1; r < ATT_ROWS; ++r) t_last = lmax(t_last, sm.row_t[r]);
        int64_t b_max = 0;
        for (int64_t t = t_first; t <= t_last; ++t) b_max = lmax(b_max, a.pos[t] / a.B);
        b_max = lmin(b_max, lmin(a.nb, (a.P + a.B - 1) / a.B) - 1);  // -1 without past rows
        for (int64_t base = 0; base <= b_max; base += blockDim.x) {
            const int64_t b = base + threadIdx.x;
            bool any = false;
            if (b <= b_max)
                for (int64_t t = t_first; t <= t_last && !any; ++t) any = a.blocks[((int64_t)h * a.T + t) * a.nb + b];
            int rank;
            const int n = ordered_chunk(any, &rank, reinterpret_cast<int*>(sm.s));  // s is free between tiles
            if (any) sm.blist[rank] = (int32_t)b;
            __syncthreads();  // blist complete
            for (int i = 0; i < n; ++i) attend_block<T, false, ATT_ROWS>(a, sm, h, sm.blist[i]);
            __syncthreads();  // blist and s are rewritten by the next chunk
        }
        attend_new_rows<T, false, ATT_ROWS>(a, sm, h, t_first, t_last);
    }
    __syncthreads();

    // Results: partial (max, sum, unnormalised accumulators) per split, or the final output.
    const bool partial = kList && a.splits > 1;
    for (int i = threadIdx.x; i < ATT_ROWS * D; i += blockDim.x) {
        const int r = i / D, d = i % D;
        const int64_t t = sm.row_t[r];
        if (t < 0) continue;
        const int g = sm.row_head[r] - h * G;
        if (partial) {
            const int64_t slot = (((int64_t)h * a.T + t) * G + g) * a.splits + blockIdx.x;
            a.part_acc[slot * D + d] = sm.acc[i];
            if (d == 0) {
                a.part_ml[slot * 2] = sm.m[r];
                a.part_ml[slot * 2 + 1] = sm.l[r];
            }
        } else {
            const float l = sm.l[r];
            static_cast<T*>(a.out)[(t * a.Hq + sm.row_head[r]) * D + d] = from_f32<T>(l > 0.f ? sm.acc[i] / l : 0.f);
        }
    }
}

// Merges the splits of each (query, head) row: one CTA per row, threads over D.
template <typename T>
__global__ void attend_combine(AttnArgs a) {
    const int64_t row = blockIdx.x;  // (h, t, g) flattened as [Hkv, T, G]
    const int G = a.G, D = a.D;
    const int g = (int)(row % G);
    const int64_t t = (row / G) % a.T;
    const int h = (int)(row / G / a.T);
    const float* ml = a.part_ml + row * a.splits * 2;
    float m = -CUDART_INF_F;
    for (int s = 0; s < a.splits; ++s) m = fmaxf(m, ml[2 * s]);
    float l = 0.f;
    for (int s = 0; s < a.splits; ++s) l += ml[2 * s + 1] * exp_diff(ml[2 * s], m);
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float o = 0.f;
        for (int s = 0; s < a.splits; ++s) o += a.part_acc[(row * a.splits + s) * D + d] * exp_diff(ml[2 * s], m);
        static_cast<T*>(a.out)[(t * a.Hq + h * G + g) * D + d] = from_f32<T>(l > 0.f ? o / l : 0.f);
    }
}

// ---- small kernels -------------------------------------------------------------------------------
template <typename S>
__global__ void convert_index_kernel(const S* src, int32_t* dst, int64_t n) {
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        dst[i] = (int32_t)src[i];
}
template <typename S>
__global__ void convert_mask_kernel(const S* src, uint8_t* dst, int64_t n) {
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        dst[i] = src[i] != 0;
}
__global__ void gather_rows_kernel(char* base, int64_t slab_stride, int64_t row_bytes, int64_t start,
                                   const int32_t* rows, int32_t n_rows) {
    // One CTA per slab; rows move strictly downwards (rows[i] >= start + i, ascending), so copying
    // in ascending order never overwrites a row before it is read.
    char* slab = base + (int64_t)blockIdx.x * slab_stride;
    for (int32_t i = 0; i < n_rows; ++i) {
        const int64_t src = rows[i];
        if (src != start + i)
            for (int64_t j = threadIdx.x; j < row_bytes; j += blockDim.x)
                slab[(start + i) * row_bytes + j] = slab[src * row_bytes + j];
        __syncthreads();
    }
}

// ---- host side -----------------------------------------------------------------------------------
bool dims_ok(const ecpm_attn_dims& d) {
    return d.T >= 0 && d.P >= 0 && d.Hkv > 0 && d.Hq > 0 && d.Hq % d.Hkv == 0 && d.D > 0 && d.D % 8 == 0 &&
           d.D <= 256 && d.T <= 0x7fffffff;
}

struct Sizes {
    int64_t S, C, nc, Cn, nb;
    int64_t cn_bound;  // >= Cn for any P: sizes the tree logits whatever the cache length
    int G, local, ntiles, QT;
};

Sizes sizes(const ecpm_attn_dims& d, const ecpm_infllmv2_config& c) {
    Sizes s;
    s.S = d.P + d.T;
    s.C = n_chunks(d.P, c.kernel_size, c.kernel_stride);
    s.nc = n_chunks(s.S, c.kernel_size, c.kernel_stride);
    s.Cn = s.nc - s.C;
    s.cn_bound = d.T / c.kernel_stride + 1;
    s.nb = ceil_div(s.S, c.block_size);
    s.G = d.Hq / d.Hkv;
    s.local = c.window_size / c.block_size;
    s.ntiles = (int)ceil_div(std::max<int64_t>(s.nc, 1), S1_CHUNKS);
    s.QT = std::max(1, S1_ROWS / s.G);
    return s;
}

size_t stage1_smem(int D, int QT) {
    return sizeof(float) * ((size_t)(S1_CHUNKS + S1_ROWS) * (D + 4) + S1_ROWS * S1_CHUNKS + (size_t)QT * S1_CHUNKS);
}

int decode_splits(const ecpm_attn_dims& d, const Sizes& s) {
    const int64_t units = d.T * d.Hkv * ceil_div(s.G, ATT_ROWS);
    const int64_t want = ceil_div(2 * (int64_t)device_sms(), std::max<int64_t>(units, 1));
    return (int)std::max<int64_t>(1, std::min<int64_t>({want, s.nb, MAX_SPLITS}));
}

AttnArgs attn_args(const void* q, const void* k, const void* v, const void* past_k, const void* past_v,
                   const uint8_t* new_mask, const ecpm_attn_dims& d, const ecpm_infllmv2_config& c, const Sizes& s,
                   void* out) {
    AttnArgs a{};
    a.q = q, a.k = k, a.v = v, a.past_k = past_k, a.past_v = past_v, a.new_mask = new_mask, a.out = out;
    a.T = d.T, a.P = d.P, a.nb = s.nb, a.Hq = d.Hq, a.Hkv = d.Hkv, a.G = s.G, a.D = d.D, a.B = c.block_size;
    a.head_groups = (int)ceil_div(s.G, ATT_ROWS);
    a.splits = 1;
    return a;
}

}  // namespace
}  // namespace ecpm

using namespace ecpm;

extern "C" {

const char* ecpm_status_string(int status) {
    switch (status) {
        case ECPM_OK: return "ok";
        case ECPM_ERR_ARG: return "invalid argument (sizes, pointers or settings the kernels do not accept)";
        case ECPM_ERR_CUDA: return "CUDA launch/runtime error";
        case ECPM_ERR_WORKSPACE: return "workspace too small";
        default: return "unknown status";
    }
}

int ecpm_version(void) { return 101; }

int64_t ecpm_infllmv2_n_chunks(const ecpm_infllmv2_config* cfg, int64_t length) {
    return n_chunks(length, cfg->kernel_size, cfg->kernel_stride);
}

int ecpm_infllmv2_check_config(const ecpm_infllmv2_config* c) {
    if (c == nullptr || c->kernel_stride <= 0 || c->kernel_size != 2 * c->kernel_stride ||
        c->block_size != 4 * c->kernel_stride || c->window_size < 0 || c->window_size % c->block_size != 0 ||
        c->init_blocks < 0 || c->topk < 0 || (c->semantics != 1 && c->semantics != 2))
        return ECPM_ERR_ARG;
    return ECPM_OK;
}

int ecpm_infllmv2_compress(ecpm_dtype dtype, const void* past_k, const void* k, ecpm_attn_dims d,
                           const ecpm_infllmv2_config* cfg, float* ck_new, cudaStream_t stream) {
    if (ecpm_infllmv2_check_config(cfg) != ECPM_OK || !dims_ok(d)) return ECPM_ERR_ARG;
    const Sizes s = sizes(d, *cfg);
    if (s.Cn == 0) return ECPM_OK;
    const dim3 grid((unsigned)s.Cn, d.Hkv), block(std::min(d.D, 256));
    if (dtype == ECPM_F16)
        return launch(compress_kernel<__half>, grid, block, 0, stream, static_cast<const __half*>(past_k),
                      static_cast<const __half*>(k), d.P, d.Hkv, d.D, cfg->kernel_size, cfg->kernel_stride, s.C,
                      ck_new);
    return launch(compress_kernel<float>, grid, block, 0, stream, static_cast<const float*>(past_k),
                  static_cast<const float*>(k), d.P, d.Hkv, d.D, cfg->kernel_size, cfg->kernel_stride, s.C, ck_new);
}

size_t ecpm_infllmv2_stage1_workspace_size(ecpm_attn_dims d, const ecpm_infllmv2_config* cfg) {
    if (ecpm_infllmv2_check_config(cfg) != ECPM_OK || !dims_ok(d)) return 0;
    const Sizes s = sizes(d, *cfg);
    const size_t rows = (size_t)d.T * d.Hq;
    return 2 * align_up(rows * s.ntiles * sizeof(float)) + 2 * align_up(rows * sizeof(float)) +
           align_up(rows * s.cn_bound * sizeof(float)) + align_up((size_t)d.T);
}

int ecpm_infllmv2_stage1(ecpm_dtype dtype, const void* q, const void* past_k, const void* k, const float* past_ck,
                         const float* ck_new, const int32_t* positions, const uint8_t* new_mask, ecpm_attn_dims d,
                         const ecpm_infllmv2_config* cfg, float* score, void* workspace, size_t workspace_bytes,
                         cudaStream_t stream) {
    if (ecpm_infllmv2_check_config(cfg) != ECPM_OK || !dims_ok(d)) return ECPM_ERR_ARG;
    const Sizes s = sizes(d, *cfg);
    if (s.nc == 0 || d.T == 0) return ECPM_OK;
    Workspace ws{static_cast<char*>(workspace), workspace_bytes};
    const size_t rows = (size_t)d.T * d.Hq;
    Stage1Args a{};
    a.tile_m = ws.take<float>(rows * s.ntiles);
    a.tile_l = ws.take<float>(rows * s.ntiles);
    a.row_m = ws.take<float>(rows);
    a.row_l = ws.take<float>(rows);
    float* path_s = ws.take<float>(rows * s.cn_bound);
    uint8_t* aligned = ws.take<uint8_t>((size_t)d.T);
    if (!ws.ok) return ECPM_ERR_WORKSPACE;
    a.q = q, a.past_ck = past_ck, a.ck_new = ck_new, a.pos = positions, a.score = score;
    a.T = d.T, a.C = s.C, a.nc = s.nc, a.Cn = s.Cn, a.Hq = d.Hq, a.Hkv = d.Hkv, a.G = s.G, a.D = d.D;
    a.ks = cfg->kernel_size, a.st = cfg->kernel_stride, a.QT = s.QT;
    int st = ECPM_OK;
    if (new_mask != nullptr && s.Cn > 0) {  // a draft tree's unaligned queries score their own paths' chunks
        PathArgs pa{};
        pa.q = q, pa.past_k = past_k, pa.k = k, pa.pos = positions, pa.mask = new_mask;
        pa.T = d.T, pa.P = d.P, pa.C = s.C, pa.nc = s.nc, pa.Cn = s.Cn;
        pa.Hq = d.Hq, pa.Hkv = d.Hkv, pa.G = s.G, pa.D = d.D, pa.ks = cfg->kernel_size, pa.st = cfg->kernel_stride;
        pa.path_s = path_s, pa.aligned = aligned;
        st = launch(dtype == ECPM_F16 ? path_scores_kernel<__half> : path_scores_kernel<float>, dim3((unsigned)d.T),
                    dim3(PATH_THREADS), 0, stream, pa);
        a.path_s = path_s, a.aligned = aligned;
    }
    const size_t smem = stage1_smem(d.D, s.QT);
    auto stats = dtype == ECPM_F16 ? stage1_kernel<__half, false> : stage1_kernel<float, false>;
    auto probs = dtype == ECPM_F16 ? stage1_kernel<__half, true> : stage1_kernel<float, true>;
    if (st == ECPM_OK) st = allow_smem(stats, smem);
    if (st == ECPM_OK) st = allow_smem(probs, smem);
    // Query blocks go in pieces of at most 65535 (grid.y).
    const int64_t qblocks = ceil_div(d.T, s.QT);
    for (int64_t y0 = 0; y0 < qblocks && st == ECPM_OK; y0 += kMaxGridYZ) {
        a.qblock0 = y0;
        st = launch(stats, dim3(s.ntiles, (unsigned)lmin(qblocks - y0, kMaxGridYZ), d.Hkv), dim3(S1_THREADS), smem,
                    stream, a);
    }
    if (st == ECPM_OK)
        st = launch(stage1_combine, dim3((unsigned)ceil_div(rows, 256)), dim3(256), 0, stream, a.tile_m, a.tile_l,
                    (int64_t)rows, s.ntiles, a.row_m, a.row_l);
    for (int64_t y0 = 0; y0 < qblocks && st == ECPM_OK; y0 += kMaxGridYZ) {
        a.qblock0 = y0;
        st = launch(probs, dim3(s.ntiles, (unsigned)lmin(qblocks - y0, kMaxGridYZ), d.Hkv), dim3(S1_THREADS), smem,
                    stream, a);
    }
    return st;
}

int ecpm_infllmv2_select(const float* score, const int32_t* positions, ecpm_attn_dims d,
                         const ecpm_infllmv2_config* cfg, uint8_t* blocks, int32_t* list, int32_t* count,
                         cudaStream_t stream) {
    if (ecpm_infllmv2_check_config(cfg) != ECPM_OK || !dims_ok(d) || (list != nullptr) != (count != nullptr))
        return ECPM_ERR_ARG;
    if (d.T == 0) return ECPM_OK;
    const Sizes s = sizes(d, *cfg);
    SelectArgs a{};
    a.score = score, a.pos = positions, a.T = d.T, a.nc = s.nc, a.nb = s.nb, a.Hkv = d.Hkv;
    a.ks = cfg->kernel_size, a.st = cfg->kernel_stride, a.B = cfg->block_size, a.init = cfg->init_blocks;
    a.local = s.local, a.topk = cfg->topk, a.dense_len = cfg->dense_len, a.sem = cfg->semantics;
    a.blocks = blocks, a.list = list, a.count = count;
    const size_t smem = (size_t)s.nb * sizeof(unsigned);
    if (allow_smem(select_kernel, smem) != ECPM_OK) return ECPM_ERR_CUDA;
    return launch(select_kernel, dim3((unsigned)d.T, d.Hkv), dim3(SEL_THREADS), smem, stream, a);
}

size_t ecpm_infllmv2_decode_workspace_size(ecpm_attn_dims d, const ecpm_infllmv2_config* cfg) {
    if (ecpm_infllmv2_check_config(cfg) != ECPM_OK || !dims_ok(d)) return 0;
    const size_t slots = (size_t)d.T * d.Hq * MAX_SPLITS;
    return align_up(slots * d.D * sizeof(float)) + align_up(slots * 2 * sizeof(float));
}

int ecpm_infllmv2_attend_decode(ecpm_dtype dtype, const void* q, const void* k, const void* v, const void* past_k,
                                const void* past_v, const uint8_t* new_mask, const int32_t* list,
                                const int32_t* count, const int32_t* positions, ecpm_attn_dims d,
                                const ecpm_infllmv2_config* cfg, void* out, void* workspace, size_t workspace_bytes,
                                cudaStream_t stream) {
    if (ecpm_infllmv2_check_config(cfg) != ECPM_OK || !dims_ok(d) || list == nullptr || count == nullptr ||
        positions == nullptr)
        return ECPM_ERR_ARG;
    if (d.T == 0) return ECPM_OK;
    const Sizes s = sizes(d, *cfg);
    AttnArgs a = attn_args(q, k, v, past_k, past_v, new_mask, d, *cfg, s, out);
    a.list = list, a.count = count, a.pos = positions;
    a.splits = decode_splits(d, s);
    if (a.splits > 1) {
        Workspace ws{static_cast<char*>(workspace), workspace_bytes};
        const size_t slots = (size_t)d.T * d.Hq * a.splits;
        a.part_acc = ws.take<float>(slots * d.D);
        a.part_ml = ws.take<float>(slots * 2);
        if (!ws.ok) return ECPM_ERR_WORKSPACE;
    }
    const size_t smem = attn_smem_bytes(d.D, ATT_ROWS);
    auto kernel = dtype == ECPM_F16 ? attend_kernel<__half, true, ATT_ROWS> : attend_kernel<float, true, ATT_ROWS>;
    if (allow_smem(kernel, smem) != ECPM_OK) return ECPM_ERR_CUDA;
    int st = ECPM_OK;
    const int64_t groups = d.T * a.head_groups;  // grid.y, in pieces of at most 65535
    for (int64_t y0 = 0; y0 < groups && st == ECPM_OK; y0 += kMaxGridYZ) {
        a.y0 = y0;
        st = launch(kernel, dim3(a.splits, (unsigned)lmin(groups - y0, kMaxGridYZ), d.Hkv), dim3(ATT_THREADS), smem,
                    stream, a);
    }
    if (st == ECPM_OK && a.splits > 1) {
        auto combine = dtype == ECPM_F16 ? attend_combine<__half> : attend_combine<float>;
        st = launch(combine, dim3((unsigned)(d.T * d.Hq)), dim3(std::min(d.D, 256)), 0, stream, a);
    }
    return st;
}

int ecpm_infllmv2_attend_prefill(ecpm_dtype dtype, const void* q, const void* k, const void* v, const void* past_k,
                                 const void* past_v, const uint8_t* new_mask, const uint8_t* blocks,
                                 const int32_t* positions, ecpm_attn_dims d, const ecpm_infllmv2_config* cfg,
                                 void* out, cudaStream_t stream) {
    if (ecpm_infllmv2_check_config(cfg) != ECPM_OK || !dims_ok(d) || blocks == nullptr || positions == nullptr)
        return ECPM_ERR_ARG;
    if (d.T == 0) return ECPM_OK;
    const Sizes s = sizes(d, *cfg);
    AttnArgs a = attn_args(q, k, v, past_k, past_v, new_mask, d, *cfg, s, out);
    a.blocks = blocks, a.pos = positions;
    // More rows per CTA share each loaded key tile among more queries; take 64 where it fits.
    const int rows = attn_smem_bytes(d.D, 64) <= device_smem_optin() ? 64 : 32;
    const size_t smem = attn_smem_bytes(d.D, rows);
    auto kernel = rows == 64 ? (dtype == ECPM_F16 ? attend_kernel<__half, false, 64> : attend_kernel<float, false, 64>)
                             : (dtype == ECPM_F16 ? attend_kernel<__half, false, 32> : attend_kernel<float, false, 32>);
    if (allow_smem(kernel, smem) != ECPM_OK) return ECPM_ERR_CUDA;
    int st = ECPM_OK;
    const int64_t groups = ceil_div(d.T * s.G, rows);  // grid.y, in pieces of at most 65535
    for (int64_t y0 = 0; y0 < groups && st == ECPM_OK; y0 += kMaxGridYZ) {
        a.y0 = y0;
        st = launch(kernel, dim3(1, (unsigned)lmin(groups - y0, kMaxGridYZ), d.Hkv), dim3(ATT_THREADS), smem, stream,
                    a);
    }
    return st;
}

// ---- the whole op ----------------------------------------------------------------------------------
// Workspace: score [Hkv, T, nc] | stage-1 scratch | blocks [Hkv, T, nb] | (decode) list, count,
// split partials.
size_t ecpm_infllmv2_workspace_size(ecpm_attn_dims d, const ecpm_infllmv2_config* cfg) {
    if (ecpm_infllmv2_check_config(cfg) != ECPM_OK || !dims_ok(d)) return 0;
    const Sizes s = sizes(d, *cfg);
    const size_t ht = (size_t)d.Hkv * d.T;
    size_t n = align_up(ht * s.nc * sizeof(float)) + ecpm_infllmv2_stage1_workspace_size(d, cfg) +
               align_up(ht * s.nb);
    if (d.T <= ECPM_DECODE_MAX_T)
        n += align_up(ht * s.nb * sizeof(int32_t)) + align_up(ht * sizeof(int32_t)) +
             ecpm_infllmv2_decode_workspace_size(d, cfg);
    return n;
}

int ecpm_infllmv2_forward(ecpm_dtype dtype, const void* q, const void* k, const void* v, const void* past_k,
                          const void* past_v, const float* past_ck, const int32_t* positions, const uint8_t* new_mask,
                          ecpm_attn_dims d, const ecpm_infllmv2_config* cfg, void* out, float* ck_new,
                          void* workspace, size_t workspace_bytes, cudaStream_t stream) {
    if (ecpm_infllmv2_check_config(cfg) != ECPM_OK || !dims_ok(d)) return ECPM_ERR_ARG;
    if (d.T == 0) return ECPM_OK;
    if (workspace_bytes < ecpm_infllmv2_workspace_size(d, cfg)) return ECPM_ERR_WORKSPACE;
    const Sizes s = sizes(d, *cfg);
    const size_t ht = (size_t)d.Hkv * d.T;
    Workspace ws{static_cast<char*>(workspace), workspace_bytes};
    float* score = ws.take<float>(ht * s.nc);
    const size_t s1_bytes = ecpm_infllmv2_stage1_workspace_size(d, cfg);
    void* s1 = ws.take<char>(s1_bytes);
    uint8_t* blocks = ws.take<uint8_t>(ht * s.nb);
    const bool decode = d.T <= ECPM_DECODE_MAX_T;
    int32_t* list = decode ? ws.take<int32_t>(ht * s.nb) : nullptr;
    int32_t* count = decode ? ws.take<int32_t>(ht) : nullptr;
    const size_t dec_bytes = decode ? ecpm_infllmv2_decode_workspace_size(d, cfg) : 0;
    void* dec = decode ? ws.take<char>(dec_bytes) : nullptr;
    if (!ws.ok) return ECPM_ERR_WORKSPACE;

    int st = ecpm_infllmv2_compress(dtype, past_k, k, d, cfg, ck_new, stream);
    if (st == ECPM_OK)
        st = ecpm_infllmv2_stage1(dtype, q, past_k, k, past_ck, ck_new, positions, new_mask, d, cfg, score, s1,
                                  s1_bytes, stream);
    if (st == ECPM_OK) st = ecpm_infllmv2_select(score, positions, d, cfg, blocks, list, count, stream);
    if (st != ECPM_OK) return st;
    if (decode)
        return ecpm_infllmv2_attend_decode(dtype, q, k, v, past_k, past_v, new_mask, list, count, positions, d, cfg,
                                           out, dec, dec_bytes, stream);
    return ecpm_infllmv2_attend_prefill(dtype, q, k, v, past_k, past_v, new_mask, blocks, positions, d, cfg, out,
                                        stream);
}

// ---- helpers -----------------------------------------------------------------------------------------
static unsigned grid_for(int64_t n) { return (unsigned)std::max<int64_t>(1, std::min<int64_t>(ceil_div(n, 256), 4096)); }

int ecpm_convert_index(const void* src, int src_bytes, int32_t* dst, int64_t n, cudaStream_t stream) {
    if (n <= 0) return n == 0 ? ECPM_OK : ECPM_ERR_ARG;
    if (src_bytes == 8)
        return launch(convert_index_kernel<int64_t>, dim3(grid_for(n)), dim3(256), 0, stream,
                      static_cast<const int64_t*>(src), dst, n);
    if (src_bytes == 4)
        return launch(convert_index_kernel<int32_t>, dim3(grid_for(n)), dim3(256), 0, stream,
                      static_cast<const int32_t*>(src), dst, n);
    return ECPM_ERR_ARG;
}

int ecpm_convert_mask(const void* src, int src_bytes, uint8_t* dst, int64_t n, cudaStream_t stream) {
    if (n <= 0) return n == 0 ? ECPM_OK : ECPM_ERR_ARG;
    if (src_bytes == 1)
        return launch(convert_mask_kernel<uint8_t>, dim3(grid_for(n)), dim3(256), 0, stream,
                      static_cast<const uint8_t*>(src), dst, n);
    if (src_bytes == 4)
        return launch(convert_mask_kernel<int32_t>, dim3(grid_for(n)), dim3(256), 0, stream,
                      static_cast<const int32_t*>(src), dst, n);
    return ECPM_ERR_ARG;
}

int ecpm_gather_rows(void* base, int64_t n_slabs, int64_t slab_stride, int64_t row_bytes, int64_t start,
                     const int32_t* rows, int32_t n_rows, cudaStream_t stream) {
    if (base == nullptr || n_slabs < 0 || n_slabs > 0x7fffffff || row_bytes <= 0 || start < 0 || n_rows < 0)
        return ECPM_ERR_ARG;
    if (n_slabs == 0 || n_rows == 0) return ECPM_OK;
    return launch(gather_rows_kernel, dim3((unsigned)n_slabs), dim3(256), 0, stream, static_cast<char*>(base),
                  slab_stride, row_bytes, start, rows, n_rows);
}

}  // extern "C"
