// edgecpm's onnxruntime custom-op library: the exact CPU kernels of `edgecpm::TernaryMatMul`, of
// `edgecpm::QuantMatMul` (int8 / int4 weights), of `edgecpm::HeadMatMul` (a tied fp32 LM head) and
// of `edgecpm::Attention` (fused GQA attention over the KV arena), in that order.
//
// y[m, n] = sum_k x[m, k] * W[n, k], W[n, k] = (code - 1) * scales[n, k / group_size], with the
// codes read straight from the bundle's 2-bit words (edgecpm.export.ternary: 16 codes per uint32,
// lowest bits first along the input, padding codes past K are 1). Activations stay fp32 and every
// product is exact (the weights are -1, 0 or +1 before the scale), so the result differs from the
// dense fp32 matmul only in summation order: no activation rounding, unlike MatMulNBits' int8 path.
//
// Decode (one token) reads each weight once, so the work per 16 weights is kept to three vector
// instructions: shift the broadcast word so that lane i holds code i in its low bits, look the
// weight up with a 16-entry permute (vpermps reads the low four bits: code i plus four times the
// next code, hence the table repeats -1, 0, 1), and fuse-multiply-add the 16 inputs. Tasks of 16
// rows go to onnxruntime's intra-op threads; within one, 4 rows x 4 tokens at a time, so in prefill
// each decoded word serves 4 tokens and each loaded input 4 rows (prefill is then as fast as fp32's
// GEMM: the multiply-adds are the bound).
//
// Paths: AVX-512F, AVX2+FMA, portable C++ (groups that are not whole words take it too). The
// library is built on first use by runtimes/onnxruntime_ops.py; EDGECPM_ORT_ISA=avx2|scalar caps
// the path (tests use it to check each one on one machine).

#define ORT_API_MANUAL_INIT
#include "onnxruntime_lite_custom_op.h"
#undef ORT_API_MANUAL_INIT

#include <algorithm>
#include <cmath>
#include <utility>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <vector>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace {

#if defined(__x86_64__)
// ---- Several tokens: a dequantized panel of rows times the tokens (both weight formats) ---------
//
// Prefill and long verification: a task's rows are dequantized once into a row-major fp32 panel
// that every token reuses, and the product runs as an outer-product tile: RT rows x TV vectors of 16
// tokens of accumulators, per k one broadcast weight per row and one load per 16 tokens — bound by
// the multiply-adds, like an fp32 GEMM, whatever the code format. The tokens are packed k-major in
// blocks of 32 (xp[(block * K + k) * 32 + t], zero past M), the panel's rows padded to a stride that
// is not a multiple of 4 KiB (rows a power of two apart would fight over one L1 set).
constexpr int64_t kPanelRows = 24, kTokens = 32;
constexpr int64_t kPanelTokens = 16;  // from this many tokens on the panel is faster (measured on the 0.5B head)

inline int64_t panel_stride(int64_t K) { return K + 16; }

struct Gemm {
  const float* xp;  // the tokens, packed: see above
  float* y;         // [M, N]
  int64_t M, K, N;
};

// x [M, K] packed for gemm_tile, input k going to place order(k) (< K).
template <typename Order>
std::vector<float> pack_tokens(const float* x, int64_t M, int64_t K, Order order) {
  std::vector<float> xp(size_t((M + kTokens - 1) / kTokens * K * kTokens), 0.f);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) xp[size_t(((m / kTokens) * K + order(k)) * kTokens + m % kTokens)] = x[m * K + k];
  return xp;
}

template <int RT, int TV>
__attribute__((target("avx512f"))) void gemm_tile_avx512(const Gemm& p, const float* panel, int64_t n,
                                                         int64_t block) {
  __m512 acc[RT][TV];
  for (auto& row : acc)
    for (auto& v : row) v = _mm512_setzero_ps();
  const float* x = p.xp + block * p.K * kTokens;
  const int64_t stride = panel_stride(p.K);
  for (int64_t k = 0; k < p.K; ++k) {
    __m512 xt[TV];
    for (int v = 0; v < TV; ++v) xt[v] = _mm512_loadu_ps(x + k * kTokens + 16 * v);
#pragma GCC unroll 24  // the accumulators must stay in registers
    for (int r = 0; r < RT; ++r) {
      const __m512 w = _mm512_set1_ps(panel[r * stride + k]);
      for (int v = 0; v < TV; ++v) acc[r][v] = _mm512_fmadd_ps(w, xt[v], acc[r][v]);
    }
  }
  // acc[r][v] lane i is y[m0 + 16 v + i, n + r]: scattered down the column, tokens past M masked.
  const __m512i down = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                          _mm512_set1_epi32(int(p.N)));
  const int64_t m0 = block * kTokens;
  for (int v = 0; v < TV; ++v) {
    const int64_t live = std::min<int64_t>(16, p.M - m0 - 16 * v);
    if (live <= 0) break;
    const __mmask16 mask = live >= 16 ? 0xFFFF : __mmask16((1u << live) - 1);
    for (int r = 0; r < RT; ++r)
      _mm512_mask_i32scatter_ps(p.y + (m0 + 16 * v) * p.N + n + r, mask, down, acc[r][v], 4);
  }
}

// The product of `rows` (<= kPanelRows) panel rows, y columns n .., with every token.
__attribute__((target("avx512f"))) void panel_products(const Gemm& p, const float* panel, int64_t n, int64_t rows) {
  const int64_t stride = panel_stride(p.K);
  for (int64_t b = 0; b * kTokens < p.M; ++b) {
    int64_t r = 0;
    if (p.M - b * kTokens > 16) {  // two vectors of tokens
      for (; r + 12 <= rows; r += 12) gemm_tile_avx512<12, 2>(p, panel + r * stride, n + r, b);
      for (; r < rows; ++r) gemm_tile_avx512<1, 2>(p, panel + r * stride, n + r, b);
    } else {
      for (; r + 24 <= rows; r += 24) gemm_tile_avx512<24, 1>(p, panel + r * stride, n + r, b);
      for (; r < rows; ++r) gemm_tile_avx512<1, 1>(p, panel + r * stride, n + r, b);
    }
  }
}

// Rows n0 .. n1 through panels of kPanelRows: dequantize(n, out) writes row n into out[0 .. K).
template <typename Dequantize>
__attribute__((target("avx512f"))) void panel_rows(const Gemm& p, int64_t n0, int64_t n1, Dequantize dequantize) {
  thread_local std::vector<float> panel;
  const int64_t stride = panel_stride(p.K);
  panel.resize(size_t(kPanelRows * stride));
  for (int64_t n = n0; n < n1; n += kPanelRows) {
    const int64_t rows = std::min(kPanelRows, n1 - n);
    for (int64_t r = 0; r < rows; ++r) dequantize(n + r, panel.data() + r * stride);
    panel_products(p, panel.data(), n, rows);
  }
}

#endif

// ---- TernaryMatMul ------------------------------------------------------------------------------

// The AVX-512 VNNI decode path's view of the tokens (see "AVX-512 VNNI" below): per token, per chunk
// of 256 inputs (16 words), 3 digits x 4 shifts x 64 signed bytes, and per word the value of one
// integer step and the sum of its 16 integers.
struct Digits {
  const int8_t* d = nullptr;   // [M, chunks, 3, 4, 64]
  const float* step = nullptr;  // [M, chunks * 16]
  const int32_t* sum = nullptr;  // [M, chunks * 16]
  int64_t chunks = 0;
};

struct Problem {
  const float* x;           // [M, K]
  const uint32_t* packed;   // [N, words]
  const float* scales;      // [N, groups]
  float* y;                 // [M, N]
  int64_t M, K, N, words, groups, group_size;
  Gemm gemm;                // several tokens on AVX-512: x packed for the panel path (gemm.xp), else null
  Digits digits;            // a few tokens on AVX-512 VNNI: x as block integers (see Digits), else null
};

float weight(const uint32_t* codes, int64_t k) {
  return float(int((codes[k / 16] >> (2 * (k % 16))) & 3u) - 1);
}

void rows_scalar(const Problem& p, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint32_t* codes = p.packed + n * p.words;
    for (int64_t m = 0; m < p.M; ++m) {
      const float* x = p.x + m * p.K;
      float y = 0.f;
      for (int64_t j = 0; j < p.groups; ++j) {
        float acc = 0.f;
        for (int64_t k = j * p.group_size; k < (j + 1) * p.group_size; ++k) acc += weight(codes, k) * x[k];
        y += acc * p.scales[n * p.groups + j];
      }
      p.y[m * p.N + n] = y;
    }
  }
}

#if defined(__x86_64__)
// ---- AVX-512F: one word = one vector of 16 weights --------------------------------------------
__attribute__((target("avx512f"))) inline __m512 weights16(uint32_t word, __m512i shifts, __m512 table) {
  return _mm512_permutexvar_ps(_mm512_srlv_epi32(_mm512_set1_epi32(int(word)), shifts), table);
}

// Rows n .. n + R for tokens m0 .. m0 + MT: R * MT accumulators per group, so each decoded word
// serves MT tokens and each loaded input R rows.
template <int R, int MT>
__attribute__((target("avx512f"))) void tile_avx512(const Problem& p, int64_t n, int64_t m0) {
  const __m512i shifts = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512 table = _mm512_setr_ps(-1, 0, 1, 2, -1, 0, 1, 2, -1, 0, 1, 2, -1, 0, 1, 2);
  const uint32_t* codes = p.packed + n * p.words;
  const float* x = p.x + m0 * p.K;
  const int64_t whole = p.K / 16, per_group = p.groups == 1 ? p.words : p.group_size / 16;
  __m512 y[R][MT];
  for (auto& row : y)
    for (auto& v : row) v = _mm512_setzero_ps();
  for (int64_t j = 0; j < p.groups; ++j) {
    const int64_t end = (j + 1) * per_group;
    __m512 acc[R][MT];
    for (auto& row : acc)
      for (auto& v : row) v = _mm512_setzero_ps();
    for (int64_t w = j * per_group; w < end; ++w) {
      // The last, partial word: inputs past K are not read.
      const __mmask16 live = w < whole ? __mmask16(0xFFFF) : __mmask16((1u << (p.K % 16)) - 1);
      __m512 wr[R];
      for (int r = 0; r < R; ++r) {
        // The rows 8 ahead, a cache line every 16 words: the hardware prefetcher alone leaves decode
        // short of memory speed with R row streams (64 MiB of codes, one thread: 17.6 -> 11.0 ms).
        // Into L2 (T1), here and in every decode tile: an L1 prefetch holds one of the core's few
        // line-fill buffers until its line arrives (609 MiB int8 GEMV, one thread: 7.5 -> 9.8 GB/s).
        if (w % 16 == 0) _mm_prefetch(reinterpret_cast<const char*>(codes + (r + 8) * p.words + w), _MM_HINT_T1);
        wr[r] = weights16(codes[r * p.words + w], shifts, table);
      }
      for (int t = 0; t < MT; ++t) {
        const __m512 xt = _mm512_maskz_loadu_ps(live, x + t * p.K + 16 * w);
        for (int r = 0; r < R; ++r) acc[r][t] = _mm512_fmadd_ps(wr[r], xt, acc[r][t]);
      }
    }
    for (int r = 0; r < R; ++r) {
      const __m512 s = _mm512_set1_ps(p.scales[(n + r) * p.groups + j]);
      for (int t = 0; t < MT; ++t) y[r][t] = _mm512_fmadd_ps(acc[r][t], s, y[r][t]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < MT; ++t) p.y[(m0 + t) * p.N + n + r] = _mm512_reduce_add_ps(y[r][t]);
}

template <int R>
__attribute__((target("avx512f"))) void tokens_avx512(const Problem& p, int64_t n) {
  int64_t m = 0;
  for (; m + 4 <= p.M; m += 4) tile_avx512<R, 4>(p, n, m);
  for (; m < p.M; ++m) tile_avx512<R, 1>(p, n, m);
}

// Row n's weights into w[0 .. 16 * words): each word's 16 weights times its group's scale.
__attribute__((target("avx512f"))) void dequantize_ternary_avx512(const Problem& p, int64_t n, float* w) {
  const __m512i shifts = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512 table = _mm512_setr_ps(-1, 0, 1, 2, -1, 0, 1, 2, -1, 0, 1, 2, -1, 0, 1, 2);
  const uint32_t* codes = p.packed + n * p.words;
  const int64_t per_group = p.groups == 1 ? p.words : p.group_size / 16;
  for (int64_t j = 0; j < p.groups; ++j) {
    const __m512 s = _mm512_set1_ps(p.scales[n * p.groups + j]);
    for (int64_t v = j * per_group; v < (j + 1) * per_group; ++v)
      _mm512_storeu_ps(w + 16 * v, _mm512_mul_ps(weights16(codes[v], shifts, table), s));
  }
}

__attribute__((target("avx512f"))) void rows_avx512(const Problem& p, int64_t n0, int64_t n1) {
  if (p.gemm.xp) {
    panel_rows(p.gemm, n0, n1, [&p](int64_t n, float* w) { dequantize_ternary_avx512(p, n, w); });
    return;
  }
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) tokens_avx512<4>(p, n);
  for (; n < n1; ++n) tokens_avx512<1>(p, n);
}

// ---- AVX-512 VNNI: a few tokens as 24-bit block integers times the codes as bytes ---------------
//
// The fp32 decode above spends three vector instructions on 16 weights and cannot keep up with
// memory. Here each token's inputs are written, per word of 16, as integers D = round(x / step), the
// step a power of two just above max|x| / (127 * 2^16): |x - D * step| <= step / 2 <= 2^-23 max|x|,
// one fp32 ulp of the word's largest input (the fp32 path rounds each product to 2^-24 of itself
// instead). D is written as three signed base-256 digits (D = 65536 d1 + 256 d2 + d3, each in [-128, 127]). One vpdpbusd multiplies 64 codes (bytes
// 0..2) by 64 digits and sums them in fours into int32 lanes, exactly; a 64-byte load of codes is 16
// words, lane L = word L, and (codes >> 2s) & 3 puts code 4j + s of each word in its byte j, so the
// digits are stored in that order. Per row and 256 weights: 7 instructions to split the codes, 12
// vpdpbusd, two shifts combining the digits (sum c D < 2^28 fits int32), one subtraction of sum D
// (the codes are w + 1), one conversion and one FMA by the steps and scales -- about 24 instead of
// 48. Integer sums are exact, so the result differs from the exact product only by that rounding of
// x (tested against float64 like the other paths; one-hot rows come back exactly).
constexpr int64_t kChunk = 256, kChunkBytes = 3 * 4 * 64;

// x [K] -> one token's digits (zeroed by the caller), steps and sums; words past K stay zero. Once
// per token and call, before the rows are split among threads, so vectorized: a word is two AVX2
// vectors (every CPU with VNNI has AVX2), a partial last word goes through a zero-padded copy.
__attribute__((target("avx2,fma"))) void make_digits(const float* x, int64_t K, int8_t* d, float* step,
                                                      int32_t* sum) {
  const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256i b128 = _mm256_set1_epi32(128), b255 = _mm256_set1_epi32(255);
  // Bytes in input order 4j + s -> shift-major: s = 0..3, each the word's bytes j = 0..3.
  const __m128i shift_major = _mm_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  for (int64_t w = 0; w * 16 < K; ++w) {
    alignas(32) float pad[16] = {};
    const float* xw = x + w * 16;
    if (K - w * 16 < 16) xw = static_cast<const float*>(std::memcpy(pad, xw, sizeof(float) * (K - w * 16)));
    const __m256 x0 = _mm256_loadu_ps(xw), x1 = _mm256_loadu_ps(xw + 8);
    __m256 top = _mm256_max_ps(_mm256_and_ps(x0, magnitude), _mm256_and_ps(x1, magnitude));
    top = _mm256_max_ps(top, _mm256_permute2f128_ps(top, top, 1));
    top = _mm256_max_ps(top, _mm256_shuffle_ps(top, top, 0x4e));
    top = _mm256_max_ps(top, _mm256_shuffle_ps(top, top, 0xb1));
    const float most = _mm256_cvtss_f32(top);
    // inf / nan (x * 0 is nan): the word's products are nan, as in fp32 (max_ps may drop a nan, so
    // it is looked for first).
    const __m256 probe = _mm256_add_ps(_mm256_mul_ps(x0, _mm256_setzero_ps()), _mm256_mul_ps(x1, _mm256_setzero_ps()));
    const bool finite = !_mm256_movemask_ps(_mm256_cmp_ps(probe, probe, _CMP_UNORD_Q));
    if (!finite || most == 0.f) {
      step[w] = finite ? 0.f : NAN;
      continue;
    }
    // The step: the smallest power of two with |D| <= 127 * 2^16 (d1 in range). A power of two makes
    // x / step and D * step exact scalings: a one-hot input comes back bit for bit.
    int e;
    const float mant = std::frexp(most / (127.f * 65536.f), &e);
    if (mant == 0.5f) --e;
    e = std::max(e, std::numeric_limits<float>::min_exponent - std::numeric_limits<float>::digits);  // denorm_min
    step[w] = std::ldexp(1.f, e);
    // x * 2^-e in two exact halves (2^-e alone may not be a float), rounded half away from zero:
    // |v| < 2^23, so v +- 0.5 is exact.
    const __m256 half = _mm256_set1_ps(std::ldexp(1.f, -e / 2)), rest = _mm256_set1_ps(std::ldexp(1.f, -e - (-e / 2)));
    __m256i D[2];
    for (int i = 0; i < 2; ++i) {
      const __m256 v = _mm256_mul_ps(_mm256_mul_ps(i ? x1 : x0, half), rest);
      const __m256 nudge = _mm256_or_ps(_mm256_andnot_ps(magnitude, v), _mm256_set1_ps(0.5f));
      D[i] = _mm256_cvttps_epi32(_mm256_add_ps(v, nudge));
    }
    const __m256i total = _mm256_add_epi32(D[0], D[1]);
    const __m128i t4 = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
    const __m128i t2 = _mm_add_epi32(t4, _mm_shuffle_epi32(t4, 0x4e));
    sum[w] = _mm_cvtsi128_si32(_mm_add_epi32(t2, _mm_shuffle_epi32(t2, 0xb1)));
    // Signed base-256 digits, lowest first: d = ((D + 128) & 255) - 128, then D = (D - d) / 256.
    __m256i digit[3][2];
    for (int i = 0; i < 2; ++i) {
      __m256i rem = D[i];
      for (int k = 2; k >= 0; --k) {
        digit[k][i] = _mm256_sub_epi32(_mm256_and_si256(_mm256_add_epi32(rem, b128), b255), b128);
        rem = _mm256_srai_epi32(_mm256_sub_epi32(rem, digit[k][i]), 8);  // exact: a multiple of 256
      }
    }
    int8_t* out = d + (w / 16) * kChunkBytes + 4 * (w % 16);
    for (int k = 0; k < 3; ++k) {
      // int32 lanes (inputs 0-7, 8-15) -> 16 bytes in input order -> shift-major.
      const __m256i w16 = _mm256_packs_epi32(digit[k][0], digit[k][1]);  // per half: 0-3, 8-11 | 4-7, 12-15
      const __m256i w8 = _mm256_packs_epi16(w16, w16);
      const __m128i bytes = _mm_unpacklo_epi32(_mm256_castsi256_si128(w8), _mm256_extracti128_si256(w8, 1));
      const __m128i ordered = _mm_shuffle_epi8(bytes, shift_major);
      alignas(16) int32_t groups[4];
      _mm_store_si128(reinterpret_cast<__m128i*>(groups), ordered);
      for (int s = 0; s < 4; ++s) std::memcpy(out + (k * 4 + s) * 64, &groups[s], 4);
    }
  }
}

// Token m's digits, steps and sums, and how the row scales map to words: wg words per scale (one
// scale per row: "infinitely" many), shift = log2(wg) where a scale covers fewer than 16 words.
struct TokenView {
  const int8_t* d;
  const float* step;
  const int32_t* sum;
  int64_t wg;
  int shift;
};

inline TokenView token_view(const Problem& p, int64_t m) {
  const Digits& g = p.digits;
  const int64_t wg = p.groups == 1 ? INT64_MAX : p.group_size / 16;
  return {g.d + m * g.chunks * kChunkBytes, g.step + m * g.chunks * 16, g.sum + m * g.chunks * 16, wg,
          __builtin_ctzll(uint64_t(wg < 16 ? wg : 1))};
}

// Rows n .. n + R, token m.
template <int R>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void tile_vnni(const Problem& p, int64_t n, int64_t m) {
  const auto [d, step, sum, wg, shift] = token_view(p, m);
  // Scales finer than a chunk: lane L takes scale (L / wg) of the chunk's first group.
  const __m512i lane_group = _mm512_srli_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                               shift);
  // A nibble holds two codes: vpshufb looks the first (low two bits) and the second up.
  const __m512i low = _mm512_set1_epi8(15);
  const __m512i code0 = _mm512_broadcast_i32x4(_mm_setr_epi8(0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3));
  const __m512i code1 = _mm512_broadcast_i32x4(_mm_setr_epi8(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3));
  __m512 acc[R];
  for (auto& a : acc) a = _mm512_setzero_ps();
  for (int64_t i = 0; i < p.digits.chunks; ++i) {
    const int64_t live_words = std::min<int64_t>(16, p.words - 16 * i);
    const __mmask16 live = live_words == 16 ? __mmask16(0xFFFF) : __mmask16((1u << live_words) - 1);
    const int8_t* di = d + i * kChunkBytes;
    const int64_t first = wg >= 16 ? (16 * i) / wg : (16 * i) >> shift;  // the chunk's first scale
    const __mmask16 scale_lanes = wg >= 16 ? 1 : __mmask16((1u << ((live_words + wg - 1) >> shift)) - 1);
    const __m512 steps = _mm512_loadu_ps(step + 16 * i);
    const __m512i sums = _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_loadu_si512(sum + 16 * i));
    for (int r = 0; r < R; ++r) {
      const uint32_t* row = p.packed + (n + r) * p.words + 16 * i;
      _mm_prefetch(reinterpret_cast<const char*>(row + 8 * p.words), _MM_HINT_T1);  // the row 8 ahead
      const __m512i codes = _mm512_maskz_loadu_epi32(live, row);
      const __m512i lo = _mm512_and_si512(codes, low), hi = _mm512_and_si512(_mm512_srli_epi16(codes, 4), low);
      const __m512i c[4] = {_mm512_shuffle_epi8(code0, lo), _mm512_shuffle_epi8(code1, lo),
                            _mm512_shuffle_epi8(code0, hi), _mm512_shuffle_epi8(code1, hi)};
      // One accumulator per digit (vpdpbusd's latency would otherwise chain all twelve); the last
      // starts at -sum D, as the codes are w + 1.
      __m512i a[3] = {_mm512_setzero_si512(), _mm512_setzero_si512(), sums};
      for (int s = 0; s < 4; ++s)
        for (int digit = 0; digit < 3; ++digit)
          a[digit] = _mm512_dpbusd_epi32(a[digit], c[s], _mm512_loadu_si512(di + (digit * 4 + s) * 64));
      const __m512i total = _mm512_add_epi32(_mm512_slli_epi32(_mm512_add_epi32(_mm512_slli_epi32(a[0], 8), a[1]), 8),
                                             a[2]);  // sum (c - 1) D
      const float* row_scales = p.scales + (n + r) * p.groups + first;
      const __m512 scale = wg >= 16 ? _mm512_set1_ps(*row_scales)
                                    : _mm512_permutexvar_ps(lane_group, _mm512_maskz_loadu_ps(scale_lanes, row_scales));
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(total), _mm512_mul_ps(steps, scale), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) p.y[m * p.N + n + r] = _mm512_reduce_add_ps(acc[r]);
}

__attribute__((target("avx512f,avx512bw,avx512vnni"))) void rows_vnni(const Problem& p, int64_t n0, int64_t n1) {
  if (p.gemm.xp) {
    rows_avx512(p, n0, n1);
    return;
  }
  for (int64_t m = 0; m < p.M; ++m) {
    int64_t n = n0;
    for (; n + 4 <= n1; n += 4) tile_vnni<4>(p, n, m);
    for (; n < n1; ++n) tile_vnni<1>(p, n, m);
  }
}

// The scale layouts the VNNI path reads: one per row, whole chunks per scale, or a power of two of
// scales per chunk.
bool vnni_groups(const Problem& p) {
  if (p.groups == 1) return true;
  if (p.group_size % 16) return false;
  const int64_t wg = p.group_size / 16;
  return wg % 16 == 0 || (wg & (wg - 1)) == 0;
}

// ---- AVX-VNNI (256 bits: laptop CPUs without AVX-512): the same integer decode, 8 words a load --
// The digits of a chunk are read as two halves of 32 bytes (words 0-7, then 8-15).
__attribute__((target("avx2,fma"))) float hsum8(__m256 v);

template <int R>
__attribute__((target("avx2,fma,avxvnni"))) void tile_vnni256(const Problem& p, int64_t n, int64_t m) {
  const auto [d, step, sum, wg, shift] = token_view(p, m);
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i lane_group = _mm256_srli_epi32(lane, shift);
  const __m256i low = _mm256_set1_epi8(15);
  const __m256i code0 = _mm256_broadcastsi128_si256(_mm_setr_epi8(0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3));
  const __m256i code1 = _mm256_broadcastsi128_si256(_mm_setr_epi8(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3));
  __m256 acc[R];
  for (auto& a : acc) a = _mm256_setzero_ps();
  for (int64_t v = 0; v * 8 < p.words; ++v) {  // half chunk v: words 8v .. 8v + 8
    const int64_t i = v / 2, h = v % 2, live_words = std::min<int64_t>(8, p.words - 8 * v);
    const __m256i live = _mm256_cmpgt_epi32(_mm256_set1_epi32(int(live_words)), lane);
    const int8_t* di = d + i * kChunkBytes + 32 * h;
    const int64_t first = wg >= 16 ? (8 * v) / wg : (8 * v) >> shift;  // the half's first scale
    const int64_t scales_read = wg >= 16 ? 1 : (live_words + wg - 1) >> shift;
    const __m256i scale_lanes = _mm256_cmpgt_epi32(_mm256_set1_epi32(int(scales_read)), lane);
    const __m256 steps = _mm256_loadu_ps(step + 8 * v);
    const __m256i sums = _mm256_sub_epi32(_mm256_setzero_si256(),
                                          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(sum + 8 * v)));
    for (int r = 0; r < R; ++r) {
      const uint32_t* row = p.packed + (n + r) * p.words + 8 * v;
      if (h == 0) _mm_prefetch(reinterpret_cast<const char*>(row + 8 * p.words), _MM_HINT_T1);
      const __m256i codes = _mm256_maskload_epi32(reinterpret_cast<const int*>(row), live);
      const __m256i lo = _mm256_and_si256(codes, low), hi = _mm256_and_si256(_mm256_srli_epi16(codes, 4), low);
      const __m256i c[4] = {_mm256_shuffle_epi8(code0, lo), _mm256_shuffle_epi8(code1, lo),
                            _mm256_shuffle_epi8(code0, hi), _mm256_shuffle_epi8(code1, hi)};
      __m256i a[3] = {_mm256_setzero_si256(), _mm256_setzero_si256(), sums};
      for (int s = 0; s < 4; ++s)
        for (int digit = 0; digit < 3; ++digit)
          a[digit] = _mm256_dpbusd_avx_epi32(
              a[digit], c[s], _mm256_loadu_si256(reinterpret_cast<const __m256i*>(di + (digit * 4 + s) * 64)));
      const __m256i total = _mm256_add_epi32(_mm256_slli_epi32(_mm256_add_epi32(_mm256_slli_epi32(a[0], 8), a[1]), 8),
                                             a[2]);  // sum (c - 1) D
      const float* row_scales = p.scales + (n + r) * p.groups + first;
      const __m256 scale = wg >= 16 ? _mm256_set1_ps(*row_scales)
                                    : _mm256_permutevar8x32_ps(_mm256_maskload_ps(row_scales, scale_lanes), lane_group);
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(total), _mm256_mul_ps(steps, scale), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) p.y[m * p.N + n + r] = hsum8(acc[r]);
}

__attribute__((target("avx2,fma,avxvnni"))) void rows_vnni256(const Problem& p, int64_t n0, int64_t n1) {
  for (int64_t m = 0; m < p.M; ++m) {
    int64_t n = n0;
    for (; n + 4 <= n1; n += 4) tile_vnni256<4>(p, n, m);
    for (; n < n1; ++n) tile_vnni256<1>(p, n, m);
  }
}

// ---- AVX2 + FMA: one word = two vectors of 8 weights --------------------------------------------
__attribute__((target("avx2,fma"))) float hsum8(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}

// Rows n .. n + R for tokens m0 .. m0 + MT, as tile_avx512; 2 x 2 fits AVX2's 16 registers.
template <int R, int MT>
__attribute__((target("avx2,fma"))) void tile_avx2(const Problem& p, int64_t n, int64_t m0) {
  const __m256i lo = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14), hi = _mm256_setr_epi32(16, 18, 20, 22, 24, 26, 28, 30);
  const __m256 table = _mm256_setr_ps(-1, 0, 1, 2, -1, 0, 1, 2);  // vpermps reads the low three bits
  const uint32_t* codes = p.packed + n * p.words;
  const float* x = p.x + m0 * p.K;
  const int64_t whole = p.K / 16, per_group = p.groups == 1 ? p.words : p.group_size / 16;
  // Loads of the last, partial word: only the inputs below K.
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), left = _mm256_set1_epi32(int(p.K % 16));
  const __m256i live_lo = _mm256_cmpgt_epi32(left, lane);
  const __m256i live_hi = _mm256_cmpgt_epi32(left, _mm256_add_epi32(lane, _mm256_set1_epi32(8)));
  __m256 y[R][MT];
  for (auto& row : y)
    for (auto& v : row) v = _mm256_setzero_ps();
  for (int64_t j = 0; j < p.groups; ++j) {
    const int64_t end = (j + 1) * per_group;
    __m256 a0[R][MT], a1[R][MT];  // inputs 0-7 and 8-15 of each word
    for (int r = 0; r < R; ++r)
      for (int t = 0; t < MT; ++t) a0[r][t] = a1[r][t] = _mm256_setzero_ps();
    for (int64_t w = j * per_group; w < end; ++w) {
      __m256 u[R], v[R];
      for (int r = 0; r < R; ++r) {
        if (w % 16 == 0) _mm_prefetch(reinterpret_cast<const char*>(codes + (r + 8) * p.words + w), _MM_HINT_T1);
        const __m256i word = _mm256_set1_epi32(int(codes[r * p.words + w]));
        u[r] = _mm256_permutevar8x32_ps(table, _mm256_srlv_epi32(word, lo));
        v[r] = _mm256_permutevar8x32_ps(table, _mm256_srlv_epi32(word, hi));
      }
      for (int t = 0; t < MT; ++t) {
        const float* xw = x + t * p.K + 16 * w;
        const __m256 x0 = w < whole ? _mm256_loadu_ps(xw) : _mm256_maskload_ps(xw, live_lo);
        const __m256 x1 = w < whole ? _mm256_loadu_ps(xw + 8) : _mm256_maskload_ps(xw + 8, live_hi);
        for (int r = 0; r < R; ++r) {
          a0[r][t] = _mm256_fmadd_ps(u[r], x0, a0[r][t]);
          a1[r][t] = _mm256_fmadd_ps(v[r], x1, a1[r][t]);
        }
      }
    }
    for (int r = 0; r < R; ++r) {
      const __m256 s = _mm256_set1_ps(p.scales[(n + r) * p.groups + j]);
      for (int t = 0; t < MT; ++t) y[r][t] = _mm256_fmadd_ps(_mm256_add_ps(a0[r][t], a1[r][t]), s, y[r][t]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < MT; ++t) p.y[(m0 + t) * p.N + n + r] = hsum8(y[r][t]);
}

template <int R>
__attribute__((target("avx2,fma"))) void tokens_avx2(const Problem& p, int64_t n) {
  int64_t m = 0;
  for (; m + 2 <= p.M; m += 2) tile_avx2<R, 2>(p, n, m);
  for (; m < p.M; ++m) tile_avx2<R, 1>(p, n, m);
}

__attribute__((target("avx2,fma"))) void rows_avx2(const Problem& p, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + 2 <= n1; n += 2) tokens_avx2<2>(p, n);
  for (; n < n1; ++n) tokens_avx2<1>(p, n);
}
#endif

using RowsFn = void (*)(const Problem&, int64_t, int64_t);

// The widest path this CPU has, capped by EDGECPM_ORT_ISA (avx512vnni > avx512 > avx2vnni > avx2 >
// scalar; an unknown name gives scalar). The "vnni" paths are TernaryMatMul's integer decode; the
// other kernels read avx512vnni as avx512 and avx2vnni as avx2.
const char* isa() {
  static const char* const levels[] = {"avx512vnni", "avx512", "avx2vnni", "avx2", "scalar"};
  const char* cap = std::getenv("EDGECPM_ORT_ISA");
  int from = 0;
  while (cap && from < 4 && std::string(cap) != levels[from]) ++from;
#if defined(__x86_64__)
  const bool avx512 = __builtin_cpu_supports("avx512f"), avx2 = __builtin_cpu_supports("avx2") &&
                                                                 __builtin_cpu_supports("fma");
  const bool has[] = {avx512 && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vnni"), avx512,
                      avx2 && __builtin_cpu_supports("avxvnni"), avx2};
  for (int i = from; i < 4; ++i)
    if (has[i]) return levels[i];
#endif
  return "scalar";
}

bool is_avx512(const std::string& path) { return path == "avx512" || path == "avx512vnni"; }
bool is_avx2(const std::string& path) { return path == "avx2" || path == "avx2vnni"; }

RowsFn rows_fn(const std::string& path, const Problem& p) {
  if (p.groups > 1 && p.group_size % 16) return rows_scalar;  // groups that split words
#if defined(__x86_64__)
  if (path == "avx512vnni" && vnni_groups(p)) return rows_vnni;
  if (is_avx512(path)) return rows_avx512;
  if (path == "avx2vnni" && vnni_groups(p) && p.M < kPanelTokens) return rows_vnni256;
  if (is_avx2(path)) return rows_avx2;
#endif
  return rows_scalar;
}

constexpr int64_t kRowsPerTask = 16;

// Runs fn(p, n0, n1) over the rows of y in tasks of `rows` on onnxruntime's intra-op threads.
template <typename P>
OrtStatus* parallel_rows(const OrtApi* api, OrtKernelContext* ctx, const P& p,
                         void (*fn)(const P&, int64_t, int64_t), int64_t rows) {
  struct Job {
    const P* p;
    void (*fn)(const P&, int64_t, int64_t);
    int64_t rows;
  } job{&p, fn, rows};
  auto run = [](void* data, size_t task) {
    const Job& j = *static_cast<const Job*>(data);
    const int64_t n0 = int64_t(task) * j.rows;
    j.fn(*j.p, n0, std::min(n0 + j.rows, j.p->N));
  };
  return api->KernelContext_ParallelFor(ctx, run, size_t((p.N + rows - 1) / rows), 0, &job);
}

struct TernaryMatMul {
  TernaryMatMul(const OrtApi* api, const OrtKernelInfo* info) : api_(api), isa_(isa()) {
    Ort::ConstKernelInfo ki(info);
    in_features_ = ki.GetAttribute<int64_t>("in_features");
    group_size_ = ki.GetAttribute<int64_t>("group_size");
  }

  Ort::Status Compute(OrtKernelContext* ctx, const Ort::Custom::Tensor<float>& x,
                      const Ort::Custom::Tensor<uint32_t>& packed, const Ort::Custom::Tensor<float>& scales,
                      Ort::Custom::Tensor<float>& y) {
    const std::vector<int64_t>& xs = x.Shape();
    const std::vector<int64_t>& ps = packed.Shape();
    const std::vector<int64_t>& ss = scales.Shape();
    const int64_t K = in_features_;
    if (xs.empty() || xs.back() != K || ps.size() != 2 || ps[1] != (K + 15) / 16 || group_size_ <= 0 ||
        K % group_size_ || ss.size() != 2 || ss[0] != ps[0] || ss[1] != K / group_size_)
      return Ort::Status("TernaryMatMul: x [.., K], packed [N, ceil(K/16)] and scales [N, K/group_size] do not "
                         "agree with in_features / group_size", ORT_INVALID_ARGUMENT);
    std::vector<int64_t> ys(xs);
    ys.back() = ps[0];
    Problem p{x.Data(), packed.Data(), scales.Data(), y.Allocate(ys),
              x.NumberOfElement() / K, K, ps[0], ps[1], K / group_size_, group_size_};
    const RowsFn fn = rows_fn(isa_, p);
    int64_t rows = kRowsPerTask;
    std::vector<float> xp, steps;
    std::vector<int8_t> digits;
    std::vector<int32_t> sums;
#if defined(__x86_64__)
    if ((fn == rows_avx512 || fn == rows_vnni) && p.M >= kPanelTokens) {  // the panel path (see Gemm)
      xp = pack_tokens(p.x, p.M, K, [](int64_t k) { return k; });
      p.gemm = {xp.data(), p.y, p.M, K, p.N};
      rows = kPanelRows;
    } else if (fn == rows_vnni || fn == rows_vnni256) {  // the integer decode (see AVX-512 VNNI)
      const int64_t chunks = (p.words + 15) / 16;
      digits.assign(size_t(p.M * chunks * kChunkBytes), 0);
      steps.assign(size_t(p.M * chunks * 16), 0.f);
      sums.assign(size_t(p.M * chunks * 16), 0);
      for (int64_t m = 0; m < p.M; ++m)
        make_digits(p.x + m * K, K, digits.data() + m * chunks * kChunkBytes, steps.data() + m * chunks * 16,
                    sums.data() + m * chunks * 16);
      p.digits = {digits.data(), steps.data(), sums.data(), chunks};
    }
#endif
    return Ort::Status(parallel_rows(api_, ctx, p, fn, rows));
  }

  const OrtApi* api_;
  std::string isa_;
  int64_t in_features_ = 0, group_size_ = 0;
};

// ---- QuantMatMul: int8 / int4 weight-only linears in MatMulNBits' layout ---------------------
//
// y[m, n] = sum_k x[m, k] * W[n, k], W[n, k] = (q[n, k] - z[n, b]) * s[n, b], b = k / block: the
// bundle's codes, scales and zero points (export/quant_ops.py) read in place. Each weight is
// dequantized exactly as the op's reference function does it ((q - z) in fp32, times the scale),
// then multiplied by the fp32 activations: the result differs from the reference's dense fp32 matmul
// only in summation order. (onnxruntime's MatMulNBits takes fp32 activations too at
// accuracy_level 0, but its 8-bit path then runs at a fraction of memory speed; measured in
// benchmarks/quantized.py.)
//
// int4 per 32 weights (16 bytes): widen the bytes to 16 lanes, look the low nibbles up in a 16-entry
// table of the block's dequantized values (vpermps reads the low four bits of each lane), shift and
// look the high nibbles up, two FMAs. The low nibble holds the even input, so each token's inputs
// are first split into even and odd halves per 32 (once per call, K floats a token).
// int8 per 16 weights: widen, subtract the zero point, convert, scale, FMA.
// Tiles of R rows x MT tokens as TernaryMatMul's; from kPanelTokens tokens on, the panel GEMM above.
// AVX2 + FMA (8 lanes: int4 widens 8 bytes, masks and shifts the nibbles, inputs split per 16; no
// panel), used on AVX-512 machines too for int4 blocks of 16; portable C++ otherwise.

struct QProblem {
  const float* x;         // [M, K]; for int4 split per `split` inputs: the even ones, then the odd
  const uint8_t* codes;   // [N, nb, blob]
  const float* scales;    // [N, nb]
  const uint8_t* zeros;   // [N, zstride]
  float* y;               // [M, N]
  int64_t M, K, N, nb, block, bits, blob, zstride;
  int64_t split;  // int4 on a vector path: 32 (AVX-512) or 16 (AVX2) inputs a split; else 0 (x as given)
  Gemm gemm;  // several tokens: x packed for the panel path (gemm.xp), else gemm.xp null
};

inline int zero_point(const QProblem& p, int64_t n, int64_t b) {
  const uint8_t* z = p.zeros + n * p.zstride;
  return p.bits == 8 ? z[b] : (z[b / 2] >> (4 * (b & 1))) & 15;
}

// Where input k sits in p.x.
inline int64_t input_of(const QProblem& p, int64_t k) {
  if (!p.split) return k;
  const int64_t i = k % p.split;
  return k - i + (i % 2) * (p.split / 2) + i / 2;
}

void qrows_scalar(const QProblem& p, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t m = 0; m < p.M; ++m) {
      const float* x = p.x + m * p.K;
      float y = 0.f;
      for (int64_t b = 0; b < p.nb; ++b) {
        const uint8_t* c = p.codes + (n * p.nb + b) * p.blob;
        const float s = p.scales[n * p.nb + b], z = float(zero_point(p, n, b));
        for (int64_t i = 0; i < p.block; ++i) {
          const int q = p.bits == 8 ? c[i] : (c[i / 2] >> (4 * (i & 1))) & 15;
          y += ((float(q) - z) * s) * x[input_of(p, b * p.block + i)];
        }
      }
      p.y[m * p.N + n] = y;
    }
}

#if defined(__x86_64__)
template <int R, int MT>
__attribute__((target("avx512f"))) void qtile_int4_avx512(const QProblem& p, int64_t n, int64_t m0) {
  const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  __m512 acc[R][MT];
  for (auto& row : acc)
    for (auto& v : row) v = _mm512_setzero_ps();
  for (int64_t b = 0; b < p.nb; ++b) {
    __m512 table[R];  // table[r][q] = (q - z) * s: the dequantized value of code q in this block
    const uint8_t* c[R];
    for (int r = 0; r < R; ++r) {
      const float s = p.scales[(n + r) * p.nb + b];
      table[r] = _mm512_mul_ps(_mm512_sub_ps(iota, _mm512_set1_ps(float(zero_point(p, n + r, b)))),
                               _mm512_set1_ps(s));
      c[r] = p.codes + ((n + r) * p.nb + b) * p.blob;
    }
    for (int64_t i = 0; i < p.block; i += 32) {
      __m512 lo[R], hi[R];
      for (int r = 0; r < R; ++r) {
        if (i % 128 == 0) _mm_prefetch(reinterpret_cast<const char*>(c[r] + i / 2 + 8 * p.nb * p.blob), _MM_HINT_T1);
        const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c[r] + i / 2)));
        lo[r] = _mm512_permutexvar_ps(v, table[r]);
        hi[r] = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), table[r]);
      }
      for (int t = 0; t < MT; ++t) {
        const float* x = p.x + (m0 + t) * p.K + b * p.block + i;
        const __m512 even = _mm512_loadu_ps(x), odd = _mm512_loadu_ps(x + 16);
        for (int r = 0; r < R; ++r) acc[r][t] = _mm512_fmadd_ps(hi[r], odd, _mm512_fmadd_ps(lo[r], even, acc[r][t]));
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < MT; ++t) p.y[(m0 + t) * p.N + n + r] = _mm512_reduce_add_ps(acc[r][t]);
}

template <int R, int MT>
__attribute__((target("avx512f"))) void qtile_int8_avx512(const QProblem& p, int64_t n, int64_t m0) {
  __m512 acc[R][MT];
  for (auto& row : acc)
    for (auto& v : row) v = _mm512_setzero_ps();
  for (int64_t b = 0; b < p.nb; ++b) {
    __m512i z[R];
    __m512 s[R];
    const uint8_t* c[R];
    for (int r = 0; r < R; ++r) {
      z[r] = _mm512_set1_epi32(zero_point(p, n + r, b));
      s[r] = _mm512_set1_ps(p.scales[(n + r) * p.nb + b]);
      c[r] = p.codes + ((n + r) * p.nb + b) * p.blob;
    }
    for (int64_t i = 0; i < p.block; i += 16) {
      __m512 w[R];
      for (int r = 0; r < R; ++r) {
        if (i % 64 == 0) _mm_prefetch(reinterpret_cast<const char*>(c[r] + i + 8 * p.nb * p.blob), _MM_HINT_T1);
        const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c[r] + i)));
        w[r] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(v, z[r])), s[r]);
      }
      for (int t = 0; t < MT; ++t) {
        const __m512 x = _mm512_loadu_ps(p.x + (m0 + t) * p.K + b * p.block + i);
        for (int r = 0; r < R; ++r) acc[r][t] = _mm512_fmadd_ps(w[r], x, acc[r][t]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < MT; ++t) p.y[(m0 + t) * p.N + n + r] = _mm512_reduce_add_ps(acc[r][t]);
}

// Few tokens (decode, short verification): each weight is read once, dequantized in registers.
template <int R, int MT>
__attribute__((target("avx512f"))) void qtile_avx512(const QProblem& p, int64_t n, int64_t m0) {
  if (p.bits == 4)
    qtile_int4_avx512<R, MT>(p, n, m0);
  else
    qtile_int8_avx512<R, MT>(p, n, m0);
}

template <int R>
__attribute__((target("avx512f"))) void qtokens_avx512(const QProblem& p, int64_t n) {
  int64_t m = 0;
  for (; m + 4 <= p.M; m += 4) qtile_avx512<R, 4>(p, n, m);
  for (; m < p.M; ++m) qtile_avx512<R, 1>(p, n, m);
}

// Row n's weights, dequantized into w[0 .. K) in x's input order (int4: split even / odd per 32).
__attribute__((target("avx512f"))) void dequantize_row_avx512(const QProblem& p, int64_t n, float* w) {
  const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int64_t b = 0; b < p.nb; ++b) {
    const uint8_t* c = p.codes + (n * p.nb + b) * p.blob;
    const float s = p.scales[n * p.nb + b];
    const int z = zero_point(p, n, b);
    float* out = w + b * p.block;
    if (p.bits == 4) {
      const __m512 table = _mm512_mul_ps(_mm512_sub_ps(iota, _mm512_set1_ps(float(z))), _mm512_set1_ps(s));
      for (int64_t i = 0; i < p.block; i += 32) {
        const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c + i / 2)));
        _mm512_storeu_ps(out + i, _mm512_permutexvar_ps(v, table));
        _mm512_storeu_ps(out + i + 16, _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), table));
      }
    } else {
      for (int64_t i = 0; i < p.block; i += 16) {
        const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c + i)));
        _mm512_storeu_ps(out + i, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(v, _mm512_set1_epi32(z))),
                                                _mm512_set1_ps(s)));
      }
    }
  }
}

__attribute__((target("avx512f"))) void qrows_avx512(const QProblem& p, int64_t n0, int64_t n1) {
  if (!p.gemm.xp) {
    int64_t n = n0;
    for (; n + 4 <= n1; n += 4) qtokens_avx512<4>(p, n);
    for (; n < n1; ++n) qtokens_avx512<1>(p, n);
    return;
  }
  panel_rows(p.gemm, n0, n1, [&p](int64_t n, float* w) { dequantize_row_avx512(p, n, w); });
}
#endif

#if defined(__x86_64__)
// ---- AVX2 + FMA: 8 lanes; int4 per 16 inputs (8 bytes): low nibbles the even, high the odd ones ----
template <int R, int MT>
__attribute__((target("avx2,fma"))) void qtile_avx2(const QProblem& p, int64_t n, int64_t m0) {
  __m256 acc[R][MT];
  for (auto& row : acc)
    for (auto& v : row) v = _mm256_setzero_ps();
  const int64_t step = p.bits == 4 ? 16 : 8;  // inputs per load of 8 bytes
  for (int64_t b = 0; b < p.nb; ++b) {
    __m256i z[R];
    __m256 s[R];
    const uint8_t* c[R];
    for (int r = 0; r < R; ++r) {
      z[r] = _mm256_set1_epi32(zero_point(p, n + r, b));
      s[r] = _mm256_set1_ps(p.scales[(n + r) * p.nb + b]);
      c[r] = p.codes + ((n + r) * p.nb + b) * p.blob;
    }
    for (int64_t i = 0; i < p.block; i += step) {
      const int64_t byte = p.bits == 4 ? i / 2 : i;
      __m256 lo[R], hi[R];
      for (int r = 0; r < R; ++r) {
        if (byte % 64 == 0) _mm_prefetch(reinterpret_cast<const char*>(c[r] + byte + 8 * p.nb * p.blob), _MM_HINT_T1);
        const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(c[r] + byte)));
        if (p.bits == 4) {
          lo[r] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_and_si256(v, _mm256_set1_epi32(15)), z[r])),
                                s[r]);
          hi[r] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(v, 4), z[r])), s[r]);
        } else {
          lo[r] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(v, z[r])), s[r]);
        }
      }
      for (int t = 0; t < MT; ++t) {
        const float* x = p.x + (m0 + t) * p.K + b * p.block + i;
        const __m256 x0 = _mm256_loadu_ps(x);
        for (int r = 0; r < R; ++r) acc[r][t] = _mm256_fmadd_ps(lo[r], x0, acc[r][t]);
        if (p.bits == 4) {
          const __m256 x1 = _mm256_loadu_ps(x + 8);
          for (int r = 0; r < R; ++r) acc[r][t] = _mm256_fmadd_ps(hi[r], x1, acc[r][t]);
        }
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < MT; ++t) p.y[(m0 + t) * p.N + n + r] = hsum8(acc[r][t]);
}

template <int R>
__attribute__((target("avx2,fma"))) void qtokens_avx2(const QProblem& p, int64_t n) {
  int64_t m = 0;
  for (; m + 2 <= p.M; m += 2) qtile_avx2<R, 2>(p, n, m);
  for (; m < p.M; ++m) qtile_avx2<R, 1>(p, n, m);
}

__attribute__((target("avx2,fma"))) void qrows_avx2(const QProblem& p, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + 2 <= n1; n += 2) qtokens_avx2<2>(p, n);
  for (; n < n1; ++n) qtokens_avx2<1>(p, n);
}
#endif

using QRowsFn = void (*)(const QProblem&, int64_t, int64_t);

// The path for this ISA and layout, and the input split it needs.
std::pair<QRowsFn, int64_t> qrows_fn(const std::string& path, int64_t bits, int64_t block) {
#if defined(__x86_64__)
  if (is_avx512(path) && (bits == 8 || block % 32 == 0)) return {qrows_avx512, bits == 4 ? 32 : 0};
  if (is_avx512(path) || is_avx2(path)) return {qrows_avx2, bits == 4 ? 16 : 0};
#endif
  return {qrows_scalar, 0};
}

struct QuantMatMul {
  QuantMatMul(const OrtApi* api, const OrtKernelInfo* info) : api_(api), isa_(isa()) {
    Ort::ConstKernelInfo ki(info);
    in_features_ = ki.GetAttribute<int64_t>("in_features");
    bits_ = ki.GetAttribute<int64_t>("bits");
    block_ = ki.GetAttribute<int64_t>("block_size");
  }

  Ort::Status Compute(OrtKernelContext* ctx, const Ort::Custom::Tensor<float>& x,
                      const Ort::Custom::Tensor<uint8_t>& codes, const Ort::Custom::Tensor<float>& scales,
                      const Ort::Custom::Tensor<uint8_t>& zeros, Ort::Custom::Tensor<float>& y) {
    const std::vector<int64_t>& xs = x.Shape();
    const std::vector<int64_t>& cs = codes.Shape();
    const int64_t K = in_features_;
    const bool layout = (bits_ == 4 || bits_ == 8) && block_ >= 16 && block_ % 16 == 0 && K % block_ == 0;
    const int64_t nb = layout ? K / block_ : 0, blob = block_ * bits_ / 8, zstride = (nb * bits_ + 7) / 8;
    if (!layout || xs.empty() || xs.back() != K || cs.size() != 3 || cs[1] != nb || cs[2] != blob ||
        scales.NumberOfElement() != cs[0] * nb || zeros.NumberOfElement() != cs[0] * zstride)
      return Ort::Status("QuantMatMul: x [.., K], codes [N, K/block, block*bits/8], scales [N, K/block] and zeros "
                         "[N, ceil(K/block*bits/8)] do not agree with in_features / bits / block_size",
                         ORT_INVALID_ARGUMENT);
    std::vector<int64_t> ys(xs);
    ys.back() = cs[0];
    const int64_t M = x.NumberOfElement() / K;
    const auto [fn, split_width] = qrows_fn(isa_, bits_, block_);
    QProblem p{x.Data(), codes.Data(), scales.Data(), zeros.Data(), y.Allocate(ys), M, K, cs[0], nb, block_,
               bits_, blob, zstride, split_width};
    std::vector<float> split, packed;
#if defined(__x86_64__)
    const bool panel = fn == qrows_avx512 && M >= kPanelTokens;
#else
    const bool panel = false;
#endif
    if (panel) {
      packed = pack_tokens(p.x, M, K, [&p](int64_t k) { return input_of(p, k); });
      p.gemm = {packed.data(), p.y, M, K, p.N};
    } else if (p.split) {  // even inputs then odd ones per split: the nibble order of a code byte
      split.resize(size_t(M * K));
      for (int64_t m = 0; m < M; ++m)
        for (int64_t k = 0; k < K; ++k) split[size_t(m * K + input_of(p, k))] = p.x[m * K + k];
      p.x = split.data();
    }
    return Ort::Status(parallel_rows(api_, ctx, p, fn, kPanelRows));
  }

  const OrtApi* api_;
  std::string isa_;
  int64_t in_features_ = 0, bits_ = 0, block_ = 0;
};

// ---- HeadMatMul: a tied LM head, y = x W^T with W [N, K] fp32 read in place ----------------------
//
// MiniCPM ties its LM head to the embedding. runtimes/onnxruntime.py keeps that matrix unpacked so
// it is held once, and onnxruntime's Gemm then copies all of it into its packed layout on every call
// of two tokens or more: a draft's verification paid for a copy of the whole head that a decode step
// does not (benchmarks/kernels.py, "tied head"). Here each row is read once per call, in place, for
// all tokens: tiles of R rows x MT tokens (R * MT = 16 accumulators), K-long dot products in vector
// lanes, and the 16 lane sums folded into one vector. Past about 16 tokens onnxruntime's packed GEMM
// is faster again; only Session.logits() asks the head for that many rows.

struct HProblem {
  const float* x;  // [M, K]
  const float* w;  // [N, K]
  float* y;        // [M, N]
  int64_t M, K, N;
};

void head_rows_scalar(const HProblem& p, int64_t n0, int64_t n1) {
  for (int64_t m = 0; m < p.M; ++m)
    for (int64_t n = n0; n < n1; ++n) {
      float acc = 0.f;
      for (int64_t k = 0; k < p.K; ++k) acc += p.x[m * p.K + k] * p.w[n * p.K + k];
      p.y[m * p.N + n] = acc;
    }
}

#if defined(__x86_64__)
// Rows n .. n + R, tokens m0 .. m0 + MT: R * MT <= 16 accumulators (padded to 16 with zeros for
// the fold below), or one for the last rows.
template <int R, int MT>
__attribute__((target("avx512f"))) void head_tile_avx512(const HProblem& p, int64_t n, int64_t m0) {
  static_assert(R * MT <= 16, "16 accumulators at most");
  constexpr int kAcc = R * MT == 1 ? 1 : 16;
  __m512 acc[kAcc];
#pragma GCC unroll 16  // the accumulators must stay in registers
  for (int i = 0; i < kAcc; ++i) acc[i] = _mm512_setzero_ps();
  const float* w = p.w + n * p.K;
  const float* x = p.x + m0 * p.K;
  for (int64_t k = 0; k < p.K; k += 16) {
    const __mmask16 live = p.K - k >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (p.K - k)) - 1);
    __m512 xv[MT];
#pragma GCC unroll 16
    for (int m = 0; m < MT; ++m) xv[m] = _mm512_maskz_loadu_ps(live, x + m * p.K + k);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const __m512 wv = _mm512_maskz_loadu_ps(live, w + r * p.K + k);
#pragma GCC unroll 16
      for (int m = 0; m < MT; ++m) acc[r * MT + m] = _mm512_fmadd_ps(wv, xv[m], acc[r * MT + m]);
    }
  }
  if constexpr (kAcc == 16) {
    // The 16 lane sums as one vector, in four rounds of pairwise shuffles and adds (45 instructions
    // instead of 16 horizontal sums of about 10): lane L ends up with the sum of acc[(L % 4) * 4 + L / 4].
    // Written out here, not in a helper taking the array, so that it stays in registers.
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i)  // 128-bit blocks: halves of two vectors
      acc[i] = _mm512_add_ps(_mm512_shuffle_f32x4(acc[2 * i], acc[2 * i + 1], 0x44),
                             _mm512_shuffle_f32x4(acc[2 * i], acc[2 * i + 1], 0xEE));
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i)  // one 128-bit block per vector
      acc[i] = _mm512_add_ps(_mm512_shuffle_f32x4(acc[2 * i], acc[2 * i + 1], 0x88),
                             _mm512_shuffle_f32x4(acc[2 * i], acc[2 * i + 1], 0xDD));
#pragma GCC unroll 2
    for (int i = 0; i < 2; ++i)  // two lanes per vector
      acc[i] = _mm512_add_ps(_mm512_shuffle_ps(acc[2 * i], acc[2 * i + 1], 0x44),
                             _mm512_shuffle_ps(acc[2 * i], acc[2 * i + 1], 0xEE));
    alignas(64) float sums[16];
    _mm512_store_ps(sums, _mm512_add_ps(_mm512_shuffle_ps(acc[0], acc[1], 0x88), _mm512_shuffle_ps(acc[0], acc[1], 0xDD)));
    for (int L = 0; L < 16; ++L) {
      const int i = (L % 4) * 4 + L / 4;
      if (i < R * MT) p.y[(m0 + i % MT) * p.N + n + i / MT] = sums[L];
    }
  } else {
    p.y[m0 * p.N + n] = _mm512_reduce_add_ps(acc[0]);
  }
}

// Blocks of 16 rows: 4 tokens at a time as four 4 x 4 tiles; the 3, 2 or 1 left as four 4 x 3, two
// 8 x 2 or one 16 x 1 (each row read once per call below 8 tokens); the last rows (N not a multiple
// of 16) one by one.
__attribute__((target("avx512f"))) void head_rows_avx512(const HProblem& p, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + 16 <= n1; n += 16) {
    int64_t m = 0;
    for (; m + 4 <= p.M; m += 4)
      for (int r = 0; r < 16; r += 4) head_tile_avx512<4, 4>(p, n + r, m);
    if (p.M - m == 3)
      for (int r = 0; r < 16; r += 4) head_tile_avx512<4, 3>(p, n + r, m);
    else if (p.M - m == 2)
      for (int r = 0; r < 16; r += 8) head_tile_avx512<8, 2>(p, n + r, m);
    else if (p.M - m == 1)
      head_tile_avx512<16, 1>(p, n, m);
  }
  for (; n < n1; ++n)
    for (int64_t m = 0; m < p.M; ++m) head_tile_avx512<1, 1>(p, n, m);
}

// ---- AVX2 + FMA: 8 lanes, 4 rows x 2 tokens (8 accumulators of AVX2's 16 registers) --------------

template <int R, int MT>
__attribute__((target("avx2,fma"))) void head_tile_avx2(const HProblem& p, int64_t n, int64_t m0) {
  __m256 acc[R][MT];
  for (auto& row : acc)
    for (auto& a : row) a = _mm256_setzero_ps();
  const float* w = p.w + n * p.K;
  const float* x = p.x + m0 * p.K;
  int64_t k = 0;
  for (; k + 8 <= p.K; k += 8) {
    __m256 xv[MT];
    for (int m = 0; m < MT; ++m) xv[m] = _mm256_loadu_ps(x + m * p.K + k);
    for (int r = 0; r < R; ++r) {
      const __m256 wv = _mm256_loadu_ps(w + r * p.K + k);
      for (int m = 0; m < MT; ++m) acc[r][m] = _mm256_fmadd_ps(wv, xv[m], acc[r][m]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MT; ++m) {
      float s = hsum8(acc[r][m]);
      for (int64_t j = k; j < p.K; ++j) s += w[r * p.K + j] * x[m * p.K + j];  // K not a multiple of 8
      p.y[(m0 + m) * p.N + n + r] = s;
    }
}

template <int R>
__attribute__((target("avx2,fma"))) void head_rows_tokens_avx2(const HProblem& p, int64_t n) {
  int64_t m = 0;
  for (; m + 2 <= p.M; m += 2) head_tile_avx2<R, 2>(p, n, m);
  for (; m < p.M; ++m) head_tile_avx2<R, 1>(p, n, m);
}

__attribute__((target("avx2,fma"))) void head_rows_avx2(const HProblem& p, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) head_rows_tokens_avx2<4>(p, n);
  for (; n < n1; ++n) head_rows_tokens_avx2<1>(p, n);
}
#endif

using HRowsFn = void (*)(const HProblem&, int64_t, int64_t);

HRowsFn head_rows_fn(const std::string& path) {
#if defined(__x86_64__)
  if (is_avx512(path)) return head_rows_avx512;
  if (is_avx2(path)) return head_rows_avx2;
#endif
  return head_rows_scalar;
}

constexpr int64_t kHeadRowsPerTask = 96;  // a multiple of the AVX-512 blocks' 16 rows

struct HeadMatMul {
  HeadMatMul(const OrtApi* api, const OrtKernelInfo*) : api_(api), isa_(isa()) {}

  Ort::Status Compute(OrtKernelContext* ctx, const Ort::Custom::Tensor<float>& x,
                      const Ort::Custom::Tensor<float>& weight, Ort::Custom::Tensor<float>& y) {
    const std::vector<int64_t>& xs = x.Shape();
    const std::vector<int64_t>& ws = weight.Shape();
    if (xs.empty() || ws.size() != 2 || xs.back() != ws[1] || ws[1] <= 0)
      return Ort::Status("HeadMatMul: x [.., K] and weight [N, K] do not agree", ORT_INVALID_ARGUMENT);
    const int64_t K = ws[1];
    std::vector<int64_t> ys(xs);
    ys.back() = ws[0];
    HProblem p{x.Data(), weight.Data(), y.Allocate(ys), x.NumberOfElement() / K, K, ws[0]};
    if (p.M == 0 || p.N == 0) return Ort::Status(nullptr);
    return Ort::Status(parallel_rows(api_, ctx, p, head_rows_fn(isa_), kHeadRowsPerTask));
  }

  const OrtApi* api_;
  std::string isa_;
};

// ---- Attention: GQA attention over the token-major KV arena, without a score matrix ------------
//
// out[t, (h*G + g)*D + d] = sum_j softmax_j(scale * q[t, h*G+g] . key_j) value_j[h, d] over the P past
// rows (always visible) and the T new rows j with attn_mask[t, j]. One task = one kv head h and a
// block of queries (their G query heads each: R = Bq*G rows of Q); it walks the keys in tiles of
// kKeyTile rows with an online softmax (running max m, sum l and weighted sum per row), so each
// K/V row is read once per task and no [T, P] scores exist. A tile of new keys that no query of the
// block sees (the upper triangle of a causal prefill) is skipped. Plain loops over contiguous
// arrays, compiled once per ISA (target attributes) so the compiler vectorizes them; exp is a
// Cephes-style polynomial (about 1 ulp) that vectorizes too.

constexpr int64_t kKeyTile = 64;
constexpr int64_t kRowsPerBlock = 64;  // R = Bq * G, at least G

struct AttnProblem {
  const float *q, *k, *v, *pk, *pv;  // q [T, Hq, D], k/v [T, Hkv, D], pk/pv [P, Hkv, D]
  const bool* mask;                  // [T, T]
  float* out;                        // [T, Hq * D]
  int64_t T, P, Hq, Hkv, D, G, Bq;
  float scale;
};

struct AttnScratch {
  std::vector<float> q, kt, s, acc, m, l;
  std::vector<unsigned char> vis;
};

__attribute__((always_inline)) inline void exp_inplace(float* x, int64_t n) {
  // x <= 0 (scores minus their running max); below -87 (and -inf, masked) the result is 0.
  for (int64_t j = 0; j < n; ++j) {
    const float xi = x[j];
    const float c = xi < -87.f ? -87.f : xi;
    const float fn = __builtin_floorf(c * 1.44269504088896341f + 0.5f);
    float r = c - fn * 0.693359375f;
    r = r - fn * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.f;
    const int32_t bits = (int32_t(fn) + 127) << 23;
    float two_n;
    __builtin_memcpy(&two_n, &bits, 4);
    x[j] = xi < -87.f ? 0.f : p * two_n;
  }
}

// One tile of n <= kKeyTile key rows (keys/values [n, Hkv, D] from row 0 of `keys`), for the rows of
// task (h, t0 .. t0 + nt); vis[t][j]: row j visible to query t0 + t (nullptr: all visible).
__attribute__((always_inline)) inline void attn_tile(const AttnProblem& p, AttnScratch& w, int64_t h, int64_t nt,
                                                     const float* keys, const float* values, int64_t n,
                                                     const unsigned char* vis) {
  const int64_t D = p.D, G = p.G, R = nt * G, stride = p.Hkv * D;
  float* kt = w.kt.data();  // [D, kKeyTile]
  for (int64_t j = 0; j < n; ++j) {
    const float* kr = keys + j * stride + h * D;
    for (int64_t d = 0; d < D; ++d) kt[d * kKeyTile + j] = kr[d];
  }
  float* s = w.s.data();  // [R, kKeyTile]
  for (int64_t r = 0; r < R; ++r) {
    float* sr = s + r * kKeyTile;
    const float* qr = w.q.data() + r * D;
    for (int64_t j = 0; j < kKeyTile; ++j) sr[j] = 0.f;
    for (int64_t d = 0; d < D; ++d) {
      const float qd = qr[d];
      const float* kd = kt + d * kKeyTile;
      for (int64_t j = 0; j < kKeyTile; ++j) sr[j] += qd * kd[j];
    }
    if (vis) {
      const unsigned char* vr = vis + (r / G) * kKeyTile;
      for (int64_t j = 0; j < n; ++j) sr[j] = vr[j] ? sr[j] : -__builtin_inff();
    }
    float mx = w.m[r];
    for (int64_t j = 0; j < n; ++j) mx = sr[j] > mx ? sr[j] : mx;
    if (mx == -__builtin_inff()) continue;  // nothing visible to this row yet
    const float alpha = w.m[r] == -__builtin_inff() ? 0.f : __builtin_expf(w.m[r] - mx);
    w.m[r] = mx;
    for (int64_t j = 0; j < n; ++j) sr[j] -= mx;
    exp_inplace(sr, n);
    float sum = 0.f;
    for (int64_t j = 0; j < n; ++j) sum += sr[j];
    w.l[r] = w.l[r] * alpha + sum;
    float* ar = w.acc.data() + r * D;
    for (int64_t d = 0; d < D; ++d) ar[d] *= alpha;
    for (int64_t j = 0; j < n; ++j) {
      const float pj = sr[j];
      if (pj == 0.f) continue;
      const float* vr = values + j * stride + h * D;
      for (int64_t d = 0; d < D; ++d) ar[d] += pj * vr[d];
    }
  }
}

#if defined(__x86_64__)
// ---- AVX-512 tile (D a multiple of 16): register-blocked Q.K^T and P.V, vector exp ------------
__attribute__((target("avx512f"))) inline __m512 exp512(__m512 x) {
  const __m512 c = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
  const __m512 fn = _mm512_roundscale_ps(_mm512_mul_ps(c, _mm512_set1_ps(1.44269504088896341f)),
                                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(fn, _mm512_set1_ps(0.693359375f), c);
  r = _mm512_fnmadd_ps(fn, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.f), _CMP_GE_OQ), _mm512_scalef_ps(p, fn));
}

// s[r .. r + RB][0 .. 64) = q rows . kt columns
template <int RB>
__attribute__((target("avx512f"))) inline void qk512(const float* q, const float* kt, float* s, int64_t D) {
  __m512 acc[RB][4];
  for (auto& row : acc)
    for (auto& a : row) a = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; ++d) {
    const float* kd = kt + d * kKeyTile;
    const __m512 k0 = _mm512_loadu_ps(kd), k1 = _mm512_loadu_ps(kd + 16), k2 = _mm512_loadu_ps(kd + 32),
                 k3 = _mm512_loadu_ps(kd + 48);
    for (int i = 0; i < RB; ++i) {
      const __m512 qb = _mm512_set1_ps(q[i * D + d]);
      acc[i][0] = _mm512_fmadd_ps(qb, k0, acc[i][0]);
      acc[i][1] = _mm512_fmadd_ps(qb, k1, acc[i][1]);
      acc[i][2] = _mm512_fmadd_ps(qb, k2, acc[i][2]);
      acc[i][3] = _mm512_fmadd_ps(qb, k3, acc[i][3]);
    }
  }
  for (int i = 0; i < RB; ++i)
    for (int c = 0; c < 4; ++c) _mm512_storeu_ps(s + i * kKeyTile + 16 * c, acc[i][c]);
}

// acc[r .. r + RB][dc .. dc + 16 NC) += p rows . value rows
template <int RB, int NC>
__attribute__((target("avx512f"))) inline void pv512(const float* s, const float* values, int64_t stride, int64_t n,
                                                     float* acc, int64_t D, int64_t dc) {
  __m512 a[RB][NC];
  for (int i = 0; i < RB; ++i)
    for (int c = 0; c < NC; ++c) a[i][c] = _mm512_loadu_ps(acc + i * D + dc + 16 * c);
  for (int64_t j = 0; j < n; ++j) {
    __m512 vr[NC];
    for (int c = 0; c < NC; ++c) vr[c] = _mm512_loadu_ps(values + j * stride + dc + 16 * c);
    for (int i = 0; i < RB; ++i) {
      const __m512 pb = _mm512_set1_ps(s[i * kKeyTile + j]);
      for (int c = 0; c < NC; ++c) a[i][c] = _mm512_fmadd_ps(pb, vr[c], a[i][c]);
    }
  }
  for (int i = 0; i < RB; ++i)
    for (int c = 0; c < NC; ++c) _mm512_storeu_ps(acc + i * D + dc + 16 * c, a[i][c]);
}

template <int RB>
__attribute__((target("avx512f"))) inline void pv512_rows(const float* s, const float* values, int64_t stride,
                                                          int64_t n, float* acc, int64_t D) {
  int64_t dc = 0;
  for (; dc + 64 <= D; dc += 64) pv512<RB, 4>(s, values, stride, n, acc, D, dc);
  for (; dc < D; dc += 16) pv512<RB, 1>(s, values, stride, n, acc, D, dc);
}

__attribute__((target("avx512f"))) void attn_tile_avx512(const AttnProblem& p, AttnScratch& w, int64_t h, int64_t nt,
                                                         const float* keys, const float* values, int64_t n,
                                                         const unsigned char* vis) {
  const int64_t D = p.D, G = p.G, R = nt * G, stride = p.Hkv * D;
  float* kt = w.kt.data();
  for (int64_t j = 0; j < n; ++j) {
    const float* kr = keys + j * stride + h * D;
    for (int64_t d = 0; d < D; ++d) kt[d * kKeyTile + j] = kr[d];
  }
  float* s = w.s.data();
  const float* q = w.q.data();
  int64_t r = 0;
  for (; r + 4 <= R; r += 4) qk512<4>(q + r * D, kt, s + r * kKeyTile, D);
  for (; r < R; ++r) qk512<1>(q + r * D, kt, s + r * kKeyTile, D);
  const __m512 neg = _mm512_set1_ps(-__builtin_inff());
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  __mmask16 live[4];
  for (int c = 0; c < 4; ++c) live[c] = _mm512_cmplt_epi32_mask(_mm512_add_epi32(lane, _mm512_set1_epi32(16 * c)),
                                                               _mm512_set1_epi32(int(n)));
  // Softmax update per row; a row with nothing visible yet gets p = 0 (alpha 1).
  for (r = 0; r < R; ++r) {
    float* sr = s + r * kKeyTile;
    __m512 sv[4];
    __m512 mv = neg;
    for (int c = 0; c < 4; ++c) {
      __mmask16 m = live[c];
      if (vis)
        m &= _mm512_cmpneq_epi32_mask(
            _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(vis + (r / G) * kKeyTile + 16 * c))),
            _mm512_setzero_si512());
      sv[c] = _mm512_mask_blend_ps(m, neg, _mm512_loadu_ps(sr + 16 * c));
      mv = _mm512_max_ps(mv, sv[c]);
    }
    const float mx = std::max(w.m[r], _mm512_reduce_max_ps(mv));
    float* ar = w.acc.data() + r * D;
    if (mx == -__builtin_inff()) {
      for (int c = 0; c < 4; ++c) _mm512_storeu_ps(sr + 16 * c, _mm512_setzero_ps());
      continue;
    }
    const float alpha = w.m[r] == -__builtin_inff() ? 0.f : __builtin_expf(w.m[r] - mx);
    w.m[r] = mx;
    __m512 sum = _mm512_setzero_ps();
    const __m512 mxv = _mm512_set1_ps(mx);
    for (int c = 0; c < 4; ++c) {
      const __m512 e = exp512(_mm512_sub_ps(sv[c], mxv));
      sum = _mm512_add_ps(sum, e);
      _mm512_storeu_ps(sr + 16 * c, e);
    }
    w.l[r] = w.l[r] * alpha + _mm512_reduce_add_ps(sum);
    if (alpha != 1.f) {
      const __m512 av = _mm512_set1_ps(alpha);
      for (int64_t d = 0; d < D; d += 16) _mm512_storeu_ps(ar + d, _mm512_mul_ps(av, _mm512_loadu_ps(ar + d)));
    }
  }
  const float* vh = values + h * D;
  float* acc = w.acc.data();
  for (r = 0; r + 4 <= R; r += 4) pv512_rows<4>(s + r * kKeyTile, vh, stride, n, acc + r * D, D);
  for (; r < R; ++r) pv512_rows<1>(s + r * kKeyTile, vh, stride, n, acc + r * D, D);
}
#endif

template <typename Tile>
__attribute__((always_inline)) inline void attn_task_impl(const AttnProblem& p, int64_t h, int64_t t0, Tile tile) {
  const int64_t D = p.D, G = p.G, nt = std::min(p.Bq, p.T - t0), R = nt * G;
  AttnScratch w;
  w.q.resize(size_t(R * D));
  w.kt.assign(size_t(D * kKeyTile), 0.f);
  w.s.resize(size_t(R * kKeyTile));
  w.acc.assign(size_t(R * D), 0.f);
  w.m.assign(size_t(R), -__builtin_inff());
  w.l.assign(size_t(R), 0.f);
  w.vis.resize(size_t(nt * kKeyTile));
  for (int64_t t = 0; t < nt; ++t)
    for (int64_t g = 0; g < G; ++g) {
      const float* src = p.q + ((t0 + t) * p.Hq + h * G + g) * D;
      float* dst = w.q.data() + (t * G + g) * D;
      for (int64_t d = 0; d < D; ++d) dst[d] = src[d] * p.scale;
    }
  const int64_t stride = p.Hkv * D;
  for (int64_t j0 = 0; j0 < p.P; j0 += kKeyTile)
    tile(p, w, h, nt, p.pk + j0 * stride, p.pv + j0 * stride, std::min(kKeyTile, p.P - j0), nullptr);
  for (int64_t j0 = 0; j0 < p.T; j0 += kKeyTile) {
    const int64_t n = std::min(kKeyTile, p.T - j0);
    bool any = false;
    for (int64_t t = 0; t < nt; ++t) {
      const bool* mr = p.mask + (t0 + t) * p.T + j0;
      unsigned char* vr = w.vis.data() + t * kKeyTile;
      for (int64_t j = 0; j < n; ++j) {
        vr[j] = mr[j];
        any |= mr[j];
      }
    }
    if (any) tile(p, w, h, nt, p.k + j0 * stride, p.v + j0 * stride, n, w.vis.data());
  }
  for (int64_t t = 0; t < nt; ++t)
    for (int64_t g = 0; g < G; ++g) {
      const int64_t r = t * G + g;
      const float inv = 1.f / w.l[r];  // no visible key: 0 / 0 = NaN, as the reference's softmax
      const float* ar = w.acc.data() + r * D;
      float* dst = p.out + (t0 + t) * p.Hq * D + (h * G + g) * D;
      for (int64_t d = 0; d < D; ++d) dst[d] = ar[d] * inv;
    }
}

using AttnFn = void (*)(const AttnProblem&, int64_t, int64_t);
void attn_task_scalar(const AttnProblem& p, int64_t h, int64_t t0) { attn_task_impl(p, h, t0, attn_tile); }
#if defined(__x86_64__)
__attribute__((target("avx512f"))) void attn_task_avx512(const AttnProblem& p, int64_t h, int64_t t0) {
  if (p.D % 16 == 0)
    attn_task_impl(p, h, t0, attn_tile_avx512);
  else
    attn_task_impl(p, h, t0, [](const AttnProblem& p, AttnScratch& w, int64_t h, int64_t nt, const float* keys,
                                const float* values, int64_t n, const unsigned char* vis)
                                 __attribute__((always_inline)) { attn_tile(p, w, h, nt, keys, values, n, vis); });
}
__attribute__((target("avx2,fma"))) void attn_task_avx2(const AttnProblem& p, int64_t h, int64_t t0) {
  attn_task_impl(p, h, t0, [](const AttnProblem& p, AttnScratch& w, int64_t h, int64_t nt, const float* keys,
                              const float* values, int64_t n, const unsigned char* vis)
                               __attribute__((always_inline)) { attn_tile(p, w, h, nt, keys, values, n, vis); });
}
#endif

AttnFn attn_fn(const std::string& path) {
#if defined(__x86_64__)
  if (is_avx512(path)) return attn_task_avx512;
  if (is_avx2(path)) return attn_task_avx2;
#endif
  return attn_task_scalar;
}

struct Attention {
  Attention(const OrtApi* api, const OrtKernelInfo* info) : api_(api), isa_(isa()) {
    Ort::ConstKernelInfo ki(info);
    scale_ = ki.GetAttribute<float>("scale");
  }

  Ort::Status Compute(OrtKernelContext* ctx, const Ort::Custom::Tensor<float>& q, const Ort::Custom::Tensor<float>& k,
                      const Ort::Custom::Tensor<float>& v, const Ort::Custom::Tensor<float>& past_k,
                      const Ort::Custom::Tensor<float>& past_v, const Ort::Custom::Tensor<bool>& mask,
                      Ort::Custom::Tensor<float>& out) {
    const auto &qs = q.Shape(), &ks = k.Shape(), &vs = v.Shape(), &pks = past_k.Shape(), &pvs = past_v.Shape(),
               &ms = mask.Shape();
    if (qs.size() != 3 || ks.size() != 3 || ks != vs || pks.size() != 3 || pks != pvs || ms.size() != 2 ||
        ks[0] != qs[0] || ks[2] != qs[2] || pks[1] != ks[1] || pks[2] != ks[2] || ms[0] != qs[0] || ms[1] != qs[0] ||
        ks[1] <= 0 || qs[1] % ks[1])
      return Ort::Status("Attention: q [T, Hq, D], k/v [T, Hkv, D], past_k/v [P, Hkv, D] and attn_mask [T, T] "
                         "do not agree (Hq a multiple of Hkv)", ORT_INVALID_ARGUMENT);
    const int64_t T = qs[0], Hq = qs[1], D = qs[2], Hkv = ks[1], G = Hq / Hkv;
    AttnProblem p{q.Data(), k.Data(), v.Data(), past_k.Data(), past_v.Data(), mask.Data(),
                  out.Allocate({T, Hq * D}), T, pks[0], Hq, Hkv, D, G, std::max<int64_t>(1, kRowsPerBlock / G),
                  scale_};
    if (T == 0) return Ort::Status(nullptr);
    struct Job {
      const AttnProblem* p;
      AttnFn fn;
      int64_t blocks;
    } job{&p, attn_fn(isa_), (T + p.Bq - 1) / p.Bq};
    auto run = [](void* data, size_t task) {
      const Job& j = *static_cast<const Job*>(data);
      const int64_t h = int64_t(task) % j.p->Hkv, b = int64_t(task) / j.p->Hkv;
      j.fn(*j.p, h, b * j.p->Bq);
    };
    return Ort::Status(api_->KernelContext_ParallelFor(ctx, run, size_t(job.blocks * Hkv), 0, &job));
  }

  const OrtApi* api_;
  std::string isa_;
  float scale_ = 1.f;
};

}  // namespace

#define EDGECPM_EXPORT extern "C" __attribute__((visibility("default")))

// The kernel path this library runs on this machine: "avx512vnni", "avx512", "avx2vnni", "avx2" or
// "scalar".
EDGECPM_EXPORT const char* edgecpm_ort_ops_isa() { return isa(); }

// onnxruntime's entry point (SessionOptions.register_custom_ops_library).
EDGECPM_EXPORT OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* base) {
  const OrtApi* api = base->GetApi(ORT_API_VERSION);
  if (!api)  // every version's table starts with CreateStatus
    return base->GetApi(1)->CreateStatus(ORT_FAIL, "edgecpm ops: this onnxruntime is older than the headers "
                                                   "the library was built with");
  Ort::InitApi(api);
  static Ort::CustomOpDomain domain{"edgecpm"};
  static std::unique_ptr<Ort::Custom::OrtLiteCustomOp> op{
      Ort::Custom::CreateLiteCustomOp<TernaryMatMul>("TernaryMatMul", "CPUExecutionProvider")};
  static std::unique_ptr<Ort::Custom::OrtLiteCustomOp> attention{
      Ort::Custom::CreateLiteCustomOp<Attention>("Attention", "CPUExecutionProvider")};
  static std::unique_ptr<Ort::Custom::OrtLiteCustomOp> quant{
      Ort::Custom::CreateLiteCustomOp<QuantMatMul>("QuantMatMul", "CPUExecutionProvider")};
  static std::unique_ptr<Ort::Custom::OrtLiteCustomOp> head{
      Ort::Custom::CreateLiteCustomOp<HeadMatMul>("HeadMatMul", "CPUExecutionProvider")};
  static bool added =
      (domain.Add(op.get()), domain.Add(attention.get()), domain.Add(quant.get()), domain.Add(head.get()), true);
  (void)added;
  try {
    Ort::UnownedSessionOptions(options).Add(domain);
  } catch (const Ort::Exception& e) {
    return api->CreateStatus(ORT_FAIL, e.what());
  }
  return nullptr;
}
