// Ternary (BitCPM4) matmul, the lead's TernaryMatMul contract (see edgecpm_kernels.h):
//   y [M, N] = x [M, K] @ W^T,  W[n, k] = (code(n, k) - 1) * scales[n, k / group_size],
//   code(n, k) = (packed[n, k / 16] >> (2 * (k % 16))) & 3,  fp32 accumulation, y in x's dtype.
//
// Decode (gemv) is bound by reading the packed weights (2 bits each, 8x fewer bytes than fp16):
// a warp streams 1-4 weight rows with 128-bit loads (64 codes per lane per row), uses each weight
// word it loads for every row of x (M <= 4) and each input for every weight row it holds, and
// turns codes into floats without int->float conversions:
// __byte_perm puts a code into the mantissa of 2^23 (float bits 0x4B0000cc = 2^23 + c) and one
// subtraction gives c - 1 exactly.
// Prefill (gemm) dequantizes 64x64 weight tiles into shared memory (exact: (c - 1) * s is +-s or
// 0) and multiplies with tensor cores (fp16, fp32 accumulators) or CUDA cores (fp32).
#include <mma.h>

#include <algorithm>

#include "common.cuh"

namespace ecpm {
namespace {

constexpr int GEMV_WARPS = 8;
// Weight rows per warp for MR rows of x: MR x rows accumulators stay at 4, which ptxas keeps in
// registers (4 weight rows for each of 3-4 x rows spilled hundreds of bytes, CUDA 13, sm_87/90/110).
__host__ __device__ constexpr int gemv_rows_per_warp(int mr) { return mr == 1 ? 4 : mr == 2 ? 2 : 1; }

__device__ __forceinline__ float code_minus_one(unsigned four_codes, int i) {
    // four_codes holds one 2-bit code in the low bits of each byte; take byte i.
    return __uint_as_float(__byte_perm(four_codes, 0x4B000000u, 0x7540u | (unsigned)i)) - 8388609.f;
}

// sum_{c < 16} x[c] * (code_c - 1) for the 16 codes of one packed word.
__device__ __forceinline__ float dot16(unsigned word, const float* x) {
    float s = 0.f;
#pragma unroll
    for (int sh = 0; sh < 4; ++sh) {
        const unsigned b = (word >> (2 * sh)) & 0x03030303u;  // codes 4i + sh, i = 0..3
#pragma unroll
        for (int i = 0; i < 4; ++i) s = fmaf(code_minus_one(b, i), x[4 * i + sh], s);
    }
    return s;
}

__device__ __forceinline__ unsigned word_of(const uint4& w, int j) { return j == 0 ? w.x : j == 1 ? w.y : j == 2 ? w.z : w.w; }

// Fast path: K % 64 == 0, group_size % 16 == 0 (a packed word's 16 codes share one scale; with
// group_size % 64 == 0 a lane's 64 codes do, and the scale is applied once per step). A warp owns
// gemv_rows_per_warp(MR) rows; lane l reads 16 bytes (64 codes) of each row per step, steps 32 x
// 64 codes apart, so a warp's loads of a row are 512 contiguous bytes. The MR rows of x (MR <= ECPM_GEMV_MAX_M)
// are all served by each weight word as it is loaded: the weights are streamed once per call, not
// once per row of x (speculative verification and small batches run M = 2..4).
template <typename T, bool kPerWord, int MR>
__global__ void __launch_bounds__(GEMV_WARPS * 32, (kPerWord || MR > 1) ? 2 : 3)
    gemv_kernel(const T* __restrict__ x, const uint4* __restrict__ packed, const T* __restrict__ scales,
                T* __restrict__ y, int64_t N, int64_t K, int64_t gs) {
    constexpr int V = 16 / sizeof(T), ROWS = gemv_rows_per_warp(MR);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int64_t n0 = ((int64_t)blockIdx.x * GEMV_WARPS + warp) * ROWS;
    if (n0 >= N) return;  // whole warps leave together
    const int64_t kq = K / 64, groups = K / gs;
    const int rows = (int)(N - n0 < ROWS ? N - n0 : ROWS);

    float acc[MR][ROWS] = {};
    uint4 w[ROWS], next[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r)
        next[r] = (lane < kq && r < rows) ? __ldcs(packed + (n0 + r) * kq + lane) : make_uint4(0, 0, 0, 0);
    for (int64_t it = lane; it < kq; it += 32) {
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            w[r] = next[r];  // the next step's words are loaded while these are used
            next[r] = (it + 32 < kq && r < rows) ? __ldcs(packed + (n0 + r) * kq + it + 32) : make_uint4(0, 0, 0, 0);
        }
        const int64_t k0 = it * 64;
        float part[MR][ROWS] = {};
#pragma unroll  // unrolled: each word stays a register (a runtime j spills on sm_110)
        for (int j = 0; j < 4; ++j) {  // one packed word (16 codes) of each row at a time
            float sc[ROWS];  // groups of 16 or 32 codes: each word's scale
#pragma unroll
            for (int r = 0; r < ROWS; ++r)
                sc[r] = kPerWord && r < rows ? to_f32(scales[(n0 + r) * groups + (k0 + 16 * j) / gs]) : 0.f;
#pragma unroll
            for (int m = 0; m < MR; ++m) {
                float xs[16];
#pragma unroll
                for (int e = 0; e < 16 / V; ++e) load16_f32(x + m * K + k0 + 16 * j + e * V, xs + e * V);
#pragma unroll
                for (int r = 0; r < ROWS; ++r) {
                    const float d = dot16(word_of(w[r], j), xs);
                    part[m][r] = kPerWord ? fmaf(d, sc[r], part[m][r]) : part[m][r] + d;
                }
            }
        }
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            const float s = kPerWord || r >= rows ? 1.f : to_f32(scales[(n0 + r) * groups + k0 / gs]);
#pragma unroll
            for (int m = 0; m < MR; ++m) acc[m][r] = fmaf(part[m][r], s, acc[m][r]);
        }
    }
#pragma unroll
    for (int m = 0; m < MR; ++m)
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            const float v = warp_sum(acc[m][r]);
            if (lane == 0 && r < rows) y[m * N + n0 + r] = from_f32<T>(v);
        }
}

// Any shape: a warp per (m, n), lanes over k. Exact, slow; for shapes the fast paths refuse.
template <typename T>
__global__ void gemv_generic_kernel(const T* x, const uint32_t* packed, const T* scales, T* y, int64_t M, int64_t N,
                                    int64_t K, int64_t gs) {
    const int lane = threadIdx.x & 31;
    const int64_t row = (int64_t)blockIdx.x * (blockDim.x / 32) + (threadIdx.x >> 5);
    if (row >= M * N) return;
    const int64_t m = row / N, n = row % N, kw = (K + 15) / 16, groups = K / gs;
    float acc = 0.f;
    for (int64_t k = lane; k < K; k += 32) {
        const unsigned code = (packed[n * kw + k / 16] >> (2 * (k % 16))) & 3u;
        acc = fmaf(to_f32(x[m * K + k]) * ((float)code - 1.f), to_f32(scales[n * groups + k / gs]), acc);
    }
    acc = warp_sum(acc);
    if (lane == 0) y[m * N + n] = from_f32<T>(acc);
}

// ---- gemm ----------------------------------------------------------------------------------------
constexpr int TM = 64, TN = 64, TK = 64;

// Dequantized weight tile: ws[n][k] = W[n0 + n, k0 + k] (0 outside the matrix). 16 codes per thread
// step: one packed word.
template <typename S, typename T>
__device__ void dequant_tile(const uint32_t* packed, const T* scales, int64_t N, int64_t K, int64_t gs, int64_t n0,
                             int64_t k0, S* ws, int ld) {
    const int64_t kw = (K + 15) / 16, groups = K / gs;
    for (int i = threadIdx.x; i < TN * (TK / 16); i += blockDim.x) {
        const int n = i / (TK / 16), j = i % (TK / 16);
        const int64_t gn = n0 + n, gk = k0 + j * 16;
        const unsigned word = (gn < N && gk < K) ? packed[gn * kw + gk / 16] : 0x55555555u;  // code 1 -> 0
        for (int c = 0; c < 16; ++c) {
            const int64_t k = gk + c;
            float v = 0.f;
            if (gn < N && k < K) v = ((float)((word >> (2 * c)) & 3u) - 1.f) * to_f32(scales[gn * groups + k / gs]);
            ws[n * ld + j * 16 + c] = S(v);
        }
    }
}

// fp16: tensor cores (wmma 16x16x16, fp32 accumulators); 4 warps, each a 32x32 quarter of the tile.
__global__ void __launch_bounds__(128) gemm_f16_kernel(const __half* x, const uint32_t* packed, const __half* scales,
                                                       __half* y, int64_t M, int64_t N, int64_t K, int64_t gs) {
    using namespace nvcuda;
    constexpr int LD = TK + 8;  // halves; keeps rows 16-byte aligned and spreads banks
    __shared__ __align__(32) __half xs[TM * LD];
    __shared__ __align__(32) __half ws[TN * LD];
    __shared__ __align__(32) float out[TM * (TN + 4)];
    const int warp = threadIdx.x >> 5;
    const int wm = (warp / 2) * 32, wn = (warp % 2) * 32;
    const int64_t m0 = (int64_t)blockIdx.y * TM, n0 = (int64_t)blockIdx.x * TN;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
    for (int i = 0; i < 2; ++i)
        for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);

    for (int64_t k0 = 0; k0 < K; k0 += TK) {
        __syncthreads();
        for (int i = threadIdx.x; i < TM * TK; i += blockDim.x) {
            const int m = i / TK, k = i % TK;
            xs[m * LD + k] = (m0 + m < M && k0 + k < K) ? x[(m0 + m) * K + k0 + k] : __float2half(0.f);
        }
        dequant_tile<__half>(packed, scales, N, K, gs, n0, k0, ws, LD);
        __syncthreads();
        for (int kk = 0; kk < TK; kk += 16) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> a[2];
            wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> b[2];
            for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(a[i], xs + (wm + 16 * i) * LD + kk, LD);
            // B[k][n] = W[n][k]: column-major with leading dimension LD is exactly ws[n][k].
            for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(b[j], ws + (wn + 16 * j) * LD + kk, LD);
            for (int i = 0; i < 2; ++i)
                for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
        }
    }
    for (int i = 0; i < 2; ++i)
        for (int j = 0; j < 2; ++j)
            wmma::store_matrix_sync(out + (wm + 16 * i) * (TN + 4) + wn + 16 * j, acc[i][j], TN + 4,
                                    wmma::mem_row_major);
    __syncthreads();
    for (int i = threadIdx.x; i < TM * TN; i += blockDim.x) {
        const int m = i / TN, n = i % TN;
        if (m0 + m < M && n0 + n < N) y[(m0 + m) * N + n0 + n] = __float2half_rn(out[m * (TN + 4) + n]);
    }
}

// fp32: CUDA cores, 256 threads, a 4x4 block of outputs each.
__global__ void __launch_bounds__(256) gemm_f32_kernel(const float* x, const uint32_t* packed, const float* scales,
                                                       float* y, int64_t M, int64_t N, int64_t K, int64_t gs) {
    constexpr int LD = TK + 1;
    __shared__ float xs[TM * LD];  // xs[m][k]
    __shared__ float ws[TN * LD];  // ws[n][k]
    const int tm = (threadIdx.x / 16) * 4, tn = (threadIdx.x % 16) * 4;
    const int64_t m0 = (int64_t)blockIdx.y * TM, n0 = (int64_t)blockIdx.x * TN;
    float acc[4][4] = {};
    for (int64_t k0 = 0; k0 < K; k0 += TK) {
        __syncthreads();
        for (int i = threadIdx.x; i < TM * TK; i += blockDim.x) {
            const int m = i / TK, k = i % TK;
            xs[m * LD + k] = (m0 + m < M && k0 + k < K) ? x[(m0 + m) * K + k0 + k] : 0.f;
        }
        dequant_tile<float>(packed, scales, N, K, gs, n0, k0, ws, LD);
        __syncthreads();
        for (int k = 0; k < TK; ++k) {
            float a[4], b[4];
            for (int i = 0; i < 4; ++i) a[i] = xs[(tm + i) * LD + k];
            for (int j = 0; j < 4; ++j) b[j] = ws[(tn + j) * LD + k];
            for (int i = 0; i < 4; ++i)
                for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
        }
    }
    for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j)
            if (m0 + tm + i < M && n0 + tn + j < N) y[(m0 + tm + i) * N + n0 + tn + j] = acc[i][j];
}

bool args_ok(const void* x, const uint32_t* packed, const void* scales, const void* y, int64_t M, int64_t N, int64_t K,
             int64_t gs) {
    return x && packed && scales && y && M >= 0 && N > 0 && K > 0 && gs > 0 && K % gs == 0;
}

template <typename T, int MR>
int gemv_launch(bool per_word, const T* x, const uint4* packed, const T* scales, T* y, int64_t N, int64_t K, int64_t gs,
                cudaStream_t stream) {
    const dim3 grid((unsigned)ceil_div(N, GEMV_WARPS * gemv_rows_per_warp(MR)));
    return launch(per_word ? gemv_kernel<T, true, MR> : gemv_kernel<T, false, MR>, grid, dim3(GEMV_WARPS * 32), 0,
                  stream, x, packed, scales, y, N, K, gs);
}

template <typename T>
int gemv_rows(int rows, bool per_word, const T* x, const uint4* packed, const T* scales, T* y, int64_t N, int64_t K,
              int64_t gs, cudaStream_t stream) {
    switch (rows) {
        case 1: return gemv_launch<T, 1>(per_word, x, packed, scales, y, N, K, gs, stream);
        case 2: return gemv_launch<T, 2>(per_word, x, packed, scales, y, N, K, gs, stream);
        case 3: return gemv_launch<T, 3>(per_word, x, packed, scales, y, N, K, gs, stream);
        default: return gemv_launch<T, 4>(per_word, x, packed, scales, y, N, K, gs, stream);
    }
}

template <typename T>
int gemv(const void* x, const uint32_t* packed, const void* scales, void* y, int64_t M, int64_t N, int64_t K,
         int64_t gs, cudaStream_t stream) {
    const bool fast = K % 64 == 0 && gs % 16 == 0 && reinterpret_cast<uintptr_t>(packed) % 16 == 0 &&
                      reinterpret_cast<uintptr_t>(x) % 16 == 0;
    if (!fast)
        return launch(gemv_generic_kernel<T>, dim3((unsigned)ceil_div(M * N, 8)), dim3(256), 0, stream,
                      static_cast<const T*>(x), packed, static_cast<const T*>(scales), static_cast<T*>(y), M, N, K,
                      gs);
    // Rows of x in launches of up to ECPM_GEMV_MAX_M (one launch for decode's M <= 4).
    for (int64_t m0 = 0; m0 < M; m0 += ECPM_GEMV_MAX_M) {
        const int status = gemv_rows<T>((int)std::min<int64_t>(M - m0, ECPM_GEMV_MAX_M), gs % 64 != 0,
                                        static_cast<const T*>(x) + m0 * K, reinterpret_cast<const uint4*>(packed),
                                        static_cast<const T*>(scales), static_cast<T*>(y) + m0 * N, N, K, gs, stream);
        if (status != ECPM_OK) return status;
    }
    return ECPM_OK;
}

}  // namespace
}  // namespace ecpm

using namespace ecpm;

extern "C" {

int ecpm_ternary_gemv(ecpm_dtype dtype, const void* x, const uint32_t* packed, const void* scales, void* y, int64_t M,
                      int64_t N, int64_t K, int64_t group_size, cudaStream_t stream) {
    if (!args_ok(x, packed, scales, y, M, N, K, group_size)) return ECPM_ERR_ARG;
    if (M == 0) return ECPM_OK;
    return dtype == ECPM_F16 ? gemv<__half>(x, packed, scales, y, M, N, K, group_size, stream)
                             : gemv<float>(x, packed, scales, y, M, N, K, group_size, stream);
}

int ecpm_ternary_gemm(ecpm_dtype dtype, const void* x, const uint32_t* packed, const void* scales, void* y, int64_t M,
                      int64_t N, int64_t K, int64_t group_size, cudaStream_t stream) {
    if (!args_ok(x, packed, scales, y, M, N, K, group_size) || ceil_div(M, TM) > kMaxGridYZ) return ECPM_ERR_ARG;
    if (M == 0) return ECPM_OK;
    const dim3 grid((unsigned)ceil_div(N, TN), (unsigned)ceil_div(M, TM));
    if (dtype == ECPM_F16)
        return launch(gemm_f16_kernel, grid, dim3(128), 0, stream, static_cast<const __half*>(x), packed,
                      static_cast<const __half*>(scales), static_cast<__half*>(y), M, N, K, group_size);
    return launch(gemm_f32_kernel, grid, dim3(256), 0, stream, static_cast<const float*>(x), packed,
                  static_cast<const float*>(scales), static_cast<float*>(y), M, N, K, group_size);
}

int ecpm_ternary_matmul(ecpm_dtype dtype, const void* x, const uint32_t* packed, const void* scales, void* y, int64_t M,
                        int64_t N, int64_t K, int64_t group_size, cudaStream_t stream) {
    return M <= ECPM_GEMV_MAX_M ? ecpm_ternary_gemv(dtype, x, packed, scales, y, M, N, K, group_size, stream)
                                : ecpm_ternary_gemm(dtype, x, packed, scales, y, M, N, K, group_size, stream);
}

}  // extern "C"
