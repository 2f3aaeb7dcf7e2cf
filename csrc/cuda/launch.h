// Host-side helpers of the CUDA launchers (the second half of every
// csrc/cuda/<op>.cu): ATen storage types and their CUDA twins (same bits, cuda_type), grid
// sizes, and a kernel launch on the current stream, checked.
#pragma once
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <utility>

namespace drsl_fast {

template <typename T> struct CudaTwin { using type = T; };
template <> struct CudaTwin<at::Half> { using type = __half; };
template <> struct CudaTwin<at::BFloat16> { using type = __nv_bfloat16; };
template <typename scalar_t> using cuda_type = typename CudaTwin<scalar_t>::type;

template <typename scalar_t>
const cuda_type<scalar_t>* cuda_ptr(const at::Tensor& t) {
  return reinterpret_cast<const cuda_type<scalar_t>*>(t.const_data_ptr<scalar_t>());
}

template <typename scalar_t>
cuda_type<scalar_t>* mutable_cuda_ptr(at::Tensor& t) {
  return reinterpret_cast<cuda_type<scalar_t>*>(t.mutable_data_ptr<scalar_t>());
}

// Blocks of `threads` threads that cover n items, one thread each.
inline unsigned blocks_for(int64_t n, int threads) {
  return static_cast<unsigned>((n + threads - 1) / threads);
}

// One thread per pixel: grid (ceil(P / threads), B).
inline dim3 pixel_grid(const char* op, int64_t P, int64_t B, int threads) {
  TORCH_CHECK(B <= 65535, op, " (cuda): batch size must be <= 65535, got ", B);
  return dim3(blocks_for(P, threads), static_cast<unsigned>(B));
}

// kernel<<<grid, threads, shared_bytes, current stream>>>(args...), then the launch check.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, int threads, size_t shared_bytes, Args&&... args) {
  kernel<<<grid, threads, shared_bytes, at::cuda::getCurrentCUDAStream()>>>(std::forward<Args>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace drsl_fast
