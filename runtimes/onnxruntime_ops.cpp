// edgecpm's onnxruntime custom-op library: the exact CPU kernel of `edgecpm::TernaryMatMul`.
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
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace {

struct Problem {
  const float* x;           // [M, K]
  const uint32_t* packed;   // [N, words]
  const float* scales;      // [N, groups]
  float* y;                 // [M, N]
  int64_t M, K, N, words, groups, group_size;
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
      for (int r = 0; r < R; ++r) wr[r] = weights16(codes[r * p.words + w], shifts, table);
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

__attribute__((target("avx512f"))) void rows_avx512(const Problem& p, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) tokens_avx512<4>(p, n);
  for (; n < n1; ++n) tokens_avx512<1>(p, n);
}

// ---- AVX2 + FMA: one word = two vectors of 8 weights --------------------------------------------
__attribute__((target("avx2,fma"))) inline float hsum8(__m256 v) {
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

// The widest path this CPU has, capped by EDGECPM_ORT_ISA.
const char* isa() {
  const char* cap = std::getenv("EDGECPM_ORT_ISA");
  const std::string want = cap ? cap : "avx512";
#if defined(__x86_64__)
  if (want == "avx512" && __builtin_cpu_supports("avx512f")) return "avx512";
  if ((want == "avx512" || want == "avx2") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
    return "avx2";
#endif
  return "scalar";
}

RowsFn rows_fn(const std::string& path, const Problem& p) {
  if (p.groups > 1 && p.group_size % 16) return rows_scalar;  // groups that split words
#if defined(__x86_64__)
  if (path == "avx512") return rows_avx512;
  if (path == "avx2") return rows_avx2;
#endif
  return rows_scalar;
}

constexpr int64_t kRowsPerTask = 16;

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
    struct Job {
      const Problem* p;
      RowsFn fn;
    } job{&p, rows_fn(isa_, p)};
    auto run = [](void* data, size_t task) {
      const Job& j = *static_cast<const Job*>(data);
      const int64_t n0 = int64_t(task) * kRowsPerTask;
      j.fn(*j.p, n0, std::min(n0 + kRowsPerTask, j.p->N));
    };
    const size_t tasks = size_t((p.N + kRowsPerTask - 1) / kRowsPerTask);
    return Ort::Status(api_->KernelContext_ParallelFor(ctx, run, tasks, 0, &job));
  }

  const OrtApi* api_;
  std::string isa_;
  int64_t in_features_ = 0, group_size_ = 0;
};

}  // namespace

#define EDGECPM_EXPORT extern "C" __attribute__((visibility("default")))

// The kernel path this library runs on this machine: "avx512", "avx2" or "scalar".
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
  static bool added = (domain.Add(op.get()), true);
  (void)added;
  try {
    Ort::UnownedSessionOptions(options).Add(domain);
  } catch (const Ort::Exception& e) {
    return api->CreateStatus(ORT_FAIL, e.what());
  }
  return nullptr;
}
