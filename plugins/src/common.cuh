// Small device/host helpers shared by the kernel translation units.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math_constants.h>
#include <stdint.h>

#include "edgecpm_kernels.h"

namespace ecpm {

// ---- element types: the kernels are templated on the storage type, compute in fp32 -------------
__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }

template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half_rn(x); }

// 16 bytes of T converted to floats (8 halves or 4 floats): the unit of vectorized loads.
template <typename T> struct Vec16 { static constexpr int N = 16 / sizeof(T); };

__device__ __forceinline__ void load16_f32(const float* src, float* dst) {
    float4 v = *reinterpret_cast<const float4*>(src);
    dst[0] = v.x; dst[1] = v.y; dst[2] = v.z; dst[3] = v.w;
}
__device__ __forceinline__ void load16_f32(const __half* src, float* dst) {
    uint4 v = *reinterpret_cast<const uint4*>(src);
    const __half2* h = reinterpret_cast<const __half2*>(&v);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        float2 f = __half22float2(h[i]);
        dst[2 * i] = f.x;
        dst[2 * i + 1] = f.y;
    }
}

// ---- warp reductions -----------------------------------------------------------------------------
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ int warp_sum_int(int v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// exp(a - b) that is 0 when a is -inf (also when both are -inf, where the difference is NaN).
// expf, not __expf: block selection compares these values, keep them close to torch's.
__device__ __forceinline__ float exp_diff(float a, float b) { return a == -CUDART_INF_F ? 0.f : expf(a - b); }

// ---- host helpers ------------------------------------------------------------------------------
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline size_t align_up(size_t n, size_t a = 256) { return (n + a - 1) / a * a; }

// Launch status: a failed launch (bad configuration, no device) is reported as ECPM_ERR_CUDA.
inline int launch_status() { return cudaGetLastError() == cudaSuccess ? ECPM_OK : ECPM_ERR_CUDA; }

// Dynamic shared memory above the default 48 KiB needs an opt-in per kernel.
template <typename K> inline int allow_smem(K kernel, size_t bytes) {
    if (bytes <= 48 * 1024) return ECPM_OK;
    return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes) == cudaSuccess
               ? ECPM_OK
               : ECPM_ERR_CUDA;
}

inline int device_attr(cudaDeviceAttr attr, int fallback) {
    int dev = 0, value = 0;
    if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&value, attr, dev) != cudaSuccess) return fallback;
    return value;
}
// Shared memory a block may opt into (Orin 163 KiB, H100 227 KiB); 48 KiB if unknown.
inline size_t device_smem_optin() { return (size_t)device_attr(cudaDevAttrMaxSharedMemoryPerBlockOptin, 48 * 1024); }

// A guess of 16 SMs when unknown keeps launches valid; a real error surfaces at launch.
inline int device_sms() { return device_attr(cudaDevAttrMultiProcessorCount, 16); }

// A simple bump allocator over a caller-provided workspace (256-byte aligned pieces).
struct Workspace {
    char* base;
    size_t size, used = 0;
    bool ok = true;
    template <typename T> T* take(size_t n) {
        size_t bytes = align_up(n * sizeof(T));
        if (used + bytes > size) {
            ok = false;
            return nullptr;
        }
        T* p = reinterpret_cast<T*>(base + used);
        used += bytes;
        return p;
    }
};

}  // namespace ecpm
