/*
 * edgecpm CUDA kernels behind a plain C ABI (DESIGN.md §7, §8, §11).
 *
 * Every function takes raw device pointers, sizes and a cudaStream_t, enqueues its work on that
 * stream without synchronising, allocates nothing, and returns an ecpm_status. The TensorRT
 * plugins (plugins/src/plugins/) and the GPU check (plugins/tests/gpu_check.py, via ctypes) are
 * the two callers; both see exactly these semantics.
 *
 * Layouts are those of the decoder graph (DESIGN.md §6): token-major, contiguous, row-major.
 *   q        [T, Hq, D]      k, v        [T, Hkv, D]      past_k, past_v [P, Hkv, D]
 *   past_ck  [C, Hkv, D] f32 (C = n_chunks(P))             ck_new [Cn, Hkv, D] f32
 *   positions [T] int32     new_mask [T, T] uint8 (nonzero = key j visible to query i)
 * positions lie in [P, P + T). Past row r is at position r; new row j sits in cache slot P + j but
 * at positions[j], which differ for a draft tree (P + depth): every rule goes by position
 * (DESIGN.md §7), so tree verification equals decoding each node's path one token at a time.
 * Element type of q/k/v/past_k/past_v/out (and of x/scales/y for ternary): ECPM_F32 or ECPM_F16.
 * Accumulation and softmax are always fp32.
 */
#ifndef EDGECPM_KERNELS_H
#define EDGECPM_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#include <cuda_runtime_api.h>

#ifdef __cplusplus
extern "C" {
#endif

#define ECPM_API __attribute__((visibility("default")))

typedef enum ecpm_status {
    ECPM_OK = 0,
    ECPM_ERR_ARG = 1,       /* a size, pointer or setting the kernels do not accept */
    ECPM_ERR_CUDA = 2,      /* a CUDA launch or runtime error of this call (errors other code left
                               pending are neither reported as ours nor cleared) */
    ECPM_ERR_WORKSPACE = 3, /* workspace smaller than the *_workspace_size() answer */
} ecpm_status;

typedef enum ecpm_dtype { ECPM_F32 = 0, ECPM_F16 = 1 } ecpm_dtype;

/* The InfLLMv2Attention attributes (export/custom_ops.py); semantics is 1 or 2. */
typedef struct ecpm_infllmv2_config {
    int32_t kernel_size, kernel_stride, block_size, init_blocks, window_size, topk, dense_len, semantics;
} ecpm_infllmv2_config;

/* Static problem sizes of one InfLLMv2Attention call. */
typedef struct ecpm_attn_dims {
    int64_t T;   /* new tokens (queries) */
    int64_t P;   /* past tokens in the cache */
    int32_t Hq;  /* query heads */
    int32_t Hkv; /* kv heads; Hq % Hkv == 0, any group size G = Hq / Hkv */
    int32_t D;   /* head dim; D % 8 == 0 and D <= 256 */
} ecpm_attn_dims;

ECPM_API const char* ecpm_status_string(int status);
ECPM_API int ecpm_version(void); /* 100 * major + minor of this ABI (1.1 -> 101) */

/* Complete compressed-key chunks among `length` keys: 0 below kernel_size, else
 * (length - kernel_size) / kernel_stride + 1. Host-side helper. */
ECPM_API int64_t ecpm_infllmv2_n_chunks(const ecpm_infllmv2_config* cfg, int64_t length);
/* Checks the config (ratios of DESIGN.md §7, positive sizes, semantics 1/2). */
ECPM_API int ecpm_infllmv2_check_config(const ecpm_infllmv2_config* cfg);

/* ---- InfLLM v2, stage by stage (each one testable alone) ------------------------------- */

/* Compressed keys of the chunks the T new keys complete: ck_new [Cn, Hkv, D] f32 with
 * Cn = n_chunks(P + T) - n_chunks(P). Reads only the last kernel_size past rows. */
ECPM_API int ecpm_infllmv2_compress(ecpm_dtype dtype, const void* past_k, const void* k, ecpm_attn_dims dims,
                                    const ecpm_infllmv2_config* cfg, float* ck_new, cudaStream_t stream);

/* Stage 1: score [Hkv, T, nc] f32, nc = n_chunks(P + T): per query t and kv head h,
 * sum over the group's query heads of softmax_j(q . ck_j / sqrt(D)) over the chunks visible at
 * positions[t] (chunk j visible iff j*stride + kernel_size - 1 <= positions[t]); all zeros for a
 * query that sees no chunk. ck_new may be NULL when Cn == 0.
 * Draft trees (new_mask != NULL): a query is aligned iff positions[t] = P + t and every new row
 * i <= t is visible to it and at position P + i (all queries of a plain step). An unaligned query
 * scores each chunk j >= n_chunks(P) with the mean of its own path's rows instead of ck_new: the
 * chunk's past rows plus the new rows new_mask shows it at positions in [j*stride, j*stride +
 * kernel_size). new_mask == NULL: every query aligned (past_k and k are then not read). */
ECPM_API size_t ecpm_infllmv2_stage1_workspace_size(ecpm_attn_dims dims, const ecpm_infllmv2_config* cfg);
ECPM_API int ecpm_infllmv2_stage1(ecpm_dtype dtype, const void* q, const void* past_k, const void* k,
                                  const float* past_ck, const float* ck_new, const int32_t* positions,
                                  const uint8_t* new_mask, ecpm_attn_dims dims, const ecpm_infllmv2_config* cfg,
                                  float* score, void* workspace, size_t workspace_bytes, cudaStream_t stream);

/* Block pooling (a block scores the max of its own chunks and the one before), init blocks,
 * window, top-k (ties to the lower block index), v1/v2 rules, dense below dense_len.
 * blocks [Hkv, T, nb] uint8 (1 = attend), nb = ceil((P + T) / block_size).
 * If list != NULL: list [Hkv, T, nb] int32 holds the chosen blocks ascending, count [Hkv, T]. */
ECPM_API int ecpm_infllmv2_select(const float* score, const int32_t* positions, ecpm_attn_dims dims,
                                  const ecpm_infllmv2_config* cfg, uint8_t* blocks, int32_t* list, int32_t* count,
                                  cudaStream_t stream);

/* Stage 2 over the chosen blocks, scale 1/sqrt(D), fp32 softmax. Past row r is visible iff block
 * r / block_size is chosen; new row j iff new_mask[t][j] and block positions[j] / block_size (its
 * position's, not its slot's) is chosen. out [T, Hq, D] in dtype.
 * decode: few queries; splits each query's block list over many CTAs (needs list + count).
 * prefill: many queries; CTAs of consecutive (query, head) rows walk the union of their blocks
 * (needs blocks). Both then walk the new rows; both are exact for any T; forward() picks by T. */
ECPM_API size_t ecpm_infllmv2_decode_workspace_size(ecpm_attn_dims dims, const ecpm_infllmv2_config* cfg);
ECPM_API int ecpm_infllmv2_attend_decode(ecpm_dtype dtype, const void* q, const void* k, const void* v,
                                         const void* past_k, const void* past_v, const uint8_t* new_mask,
                                         const int32_t* list, const int32_t* count, const int32_t* positions,
                                         ecpm_attn_dims dims, const ecpm_infllmv2_config* cfg, void* out,
                                         void* workspace, size_t workspace_bytes, cudaStream_t stream);
ECPM_API int ecpm_infllmv2_attend_prefill(ecpm_dtype dtype, const void* q, const void* k, const void* v,
                                          const void* past_k, const void* past_v, const uint8_t* new_mask,
                                          const uint8_t* blocks, const int32_t* positions, ecpm_attn_dims dims,
                                          const ecpm_infllmv2_config* cfg, void* out, cudaStream_t stream);

/* ---- InfLLM v2, the whole op (what the plugin enqueues) ---------------------------------- */
/* Largest T that takes the decode (split) path in forward(). */
#define ECPM_DECODE_MAX_T 8
ECPM_API size_t ecpm_infllmv2_workspace_size(ecpm_attn_dims dims, const ecpm_infllmv2_config* cfg);
ECPM_API int ecpm_infllmv2_forward(ecpm_dtype dtype, const void* q, const void* k, const void* v, const void* past_k,
                                   const void* past_v, const float* past_ck, const int32_t* positions,
                                   const uint8_t* new_mask, ecpm_attn_dims dims, const ecpm_infllmv2_config* cfg,
                                   void* out, float* ck_new, void* workspace, size_t workspace_bytes,
                                   cudaStream_t stream);

/* ---- small helpers the plugin and the runtime use --------------------------------------- */
/* dst[i] = (int32) src[i] for src of 4 or 8 bytes per element (int32 / int64). */
ECPM_API int ecpm_convert_index(const void* src, int src_bytes, int32_t* dst, int64_t n, cudaStream_t stream);
/* dst[i] = src[i] != 0 for src of 1 or 4 bytes per element (bool / int32). */
ECPM_API int ecpm_convert_mask(const void* src, int src_bytes, uint8_t* dst, int64_t n, cudaStream_t stream);
/* KV compaction after speculative verification: for each of n_slabs slabs (a layer's K or V,
 * slab_stride bytes apart), rows[i] -> row start + i (row_bytes each). rows ascending, >= start. */
ECPM_API int ecpm_gather_rows(void* base, int64_t n_slabs, int64_t slab_stride, int64_t row_bytes, int64_t start,
                              const int32_t* rows, int32_t n_rows, cudaStream_t stream);

/* ---- Ternary (BitCPM4) ---------------------------------------------------------------------
 * y [M, N] = x [M, K] @ W^T, W[n, k] = (code(n, k) - 1) * scales[n, k / group_size], where
 * code(n, k) = (packed[n * ceil(K/16) + k/16] >> (2 * (k % 16))) & 3 (must be 0, 1 or 2).
 * scales [N, K / group_size] and y in x's dtype; fp32 accumulation.
 * gemv: decode (M small, memory-bound: 128-bit loads of packed words, each read once for all M <= 4
 *       rows of x; larger M in launches of 4 rows).
 * gemm: prefill (tiles dequantized to shared memory; tensor cores for fp16).
 * The GEMV's fast path needs K % 64 == 0 and group_size % 16 == 0; other shapes use an exact generic kernel. */
#define ECPM_GEMV_MAX_M 4
ECPM_API int ecpm_ternary_gemv(ecpm_dtype dtype, const void* x, const uint32_t* packed, const void* scales, void* y,
                               int64_t M, int64_t N, int64_t K, int64_t group_size, cudaStream_t stream);
ECPM_API int ecpm_ternary_gemm(ecpm_dtype dtype, const void* x, const uint32_t* packed, const void* scales, void* y,
                               int64_t M, int64_t N, int64_t K, int64_t group_size, cudaStream_t stream);
/* Picks gemv for M <= ECPM_GEMV_MAX_M, gemm otherwise. */
ECPM_API int ecpm_ternary_matmul(ecpm_dtype dtype, const void* x, const uint32_t* packed, const void* scales, void* y,
                                 int64_t M, int64_t N, int64_t K, int64_t group_size, cudaStream_t stream);

#ifdef __cplusplus
}
#endif

#endif /* EDGECPM_KERNELS_H */
