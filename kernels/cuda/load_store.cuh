// Device helpers of every kernel: conversions between storage types (float,
// double, half, bfloat16) and the accumulation type (fp32; fp64 for fp64
// storage), and the pixel of a thread. No ATen: this header must compile alone.
#pragma once
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include <cstdint>

// `type name[]`: the kernel's dynamic shared memory. A macro, so that the CPU
// emulation of the kernels (tests/cuda_on_cpu) can give it storage of its own.
#ifndef DRSL_DYNAMIC_SHARED
#define DRSL_DYNAMIC_SHARED(type, name) extern __shared__ __align__(16) type name[]
#endif

// Stops the kernel where `cond` is false (a trap: the next synchronising
// CUDA call reports the kernel's failure), where it would otherwise
// read out of bounds. A trap rather than a device-side assert: the assert's
// message is a function call, whose saved registers made the fp32 backward
// kernels spill (252 bytes on sm_61). A macro, so that the CPU emulation of
// the kernels can record the failure instead.
#ifndef DRSL_DEVICE_CHECK
#define DRSL_DEVICE_CHECK(cond) \
  do {                          \
    if (!(cond)) __trap();      \
  } while (0)
#endif

namespace drsl_fast {
namespace cuda {

template <typename acc_t> __device__ __forceinline__ acc_t load_as(float v) { return static_cast<acc_t>(v); }
template <typename acc_t> __device__ __forceinline__ acc_t load_as(double v) { return static_cast<acc_t>(v); }
template <typename acc_t> __device__ __forceinline__ acc_t load_as(__half v) { return static_cast<acc_t>(__half2float(v)); }
template <typename acc_t> __device__ __forceinline__ acc_t load_as(__nv_bfloat16 v) { return static_cast<acc_t>(__bfloat162float(v)); }

template <typename T> __device__ __forceinline__ T store_as(float v);
template <> __device__ __forceinline__ float store_as<float>(float v) { return v; }
template <> __device__ __forceinline__ __half store_as<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 store_as<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <typename T> __device__ __forceinline__ T store_as(double v) { return static_cast<T>(v); }

__device__ __forceinline__ float exp_of(float v) { return expf(v); }
__device__ __forceinline__ double exp_of(double v) { return exp(v); }

// The index of this thread along x over all blocks: its pixel or its sample
// where one thread handles one.
__device__ __forceinline__ int64_t thread_index() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}

}  // namespace cuda
}  // namespace drsl_fast
