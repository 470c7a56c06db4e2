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

// A CUDA call of ours failed: report it as ECPM_ERR_CUDA and take its error out of the thread's
// last-error slot (it is reported through our status; a pending error of another library was
// already overwritten by it).
inline int cuda_failed() {
    (void)cudaGetLastError();
    return ECPM_ERR_CUDA;
}

// Largest grid.y / grid.z of a launch: callers with more rows launch in pieces.
constexpr unsigned kMaxGridYZ = 65535;

// kernel<<<grid, block, smem, stream>>>(args...) with the status of *this* launch: cudaLaunchKernelEx
// returns it, so an error another library left pending is neither reported as ours nor cleared.
// An empty grid launches nothing; a grid.y/z over the limit is a caller bug (ECPM_ERR_ARG).
template <typename... Params, typename... Args>
inline int launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                  Args&&... args) {
    if (grid.x == 0 || grid.y == 0 || grid.z == 0) return ECPM_OK;
    if (grid.y > kMaxGridYZ || grid.z > kMaxGridYZ) return ECPM_ERR_ARG;
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = grid;
    cfg.blockDim = block;
    cfg.dynamicSmemBytes = smem;
    cfg.stream = stream;
    return cudaLaunchKernelEx(&cfg, kernel, static_cast<Args&&>(args)...) == cudaSuccess ? ECPM_OK : cuda_failed();
}

// Every kernel of ours launches through launch(): no triple-chevron launches, no status read from
// the thread's last-error slot (cudaPeekAtLastError would report an error another library left
// pending as ours).

// Dynamic shared memory above the default 48 KiB needs an opt-in per kernel.
template <typename K> inline int allow_smem(K kernel, size_t bytes) {
    if (bytes <= 48 * 1024) return ECPM_OK;
    return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes) == cudaSuccess
               ? ECPM_OK
               : cuda_failed();
}

inline int device_attr(cudaDeviceAttr attr, int fallback) {
    int dev = 0, value = 0;
    if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&value, attr, dev) != cudaSuccess) {
        (void)cudaGetLastError();  // our query failed: do not leave its error behind
        return fallback;
    }
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
