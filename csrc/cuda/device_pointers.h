// ATen storage types and their CUDA twins (same bits), for the CUDA launchers.
#pragma once
#include <ATen/ATen.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace drsl_fast {

template <typename T> struct CudaTwin { using type = T; };
template <> struct CudaTwin<at::Half> { using type = __half; };
template <> struct CudaTwin<at::BFloat16> { using type = __nv_bfloat16; };

template <typename scalar_t>
const typename CudaTwin<scalar_t>::type* cuda_ptr(const at::Tensor& t) {
  return reinterpret_cast<const typename CudaTwin<scalar_t>::type*>(t.const_data_ptr<scalar_t>());
}

template <typename scalar_t>
typename CudaTwin<scalar_t>::type* mutable_cuda_ptr(at::Tensor& t) {
  return reinterpret_cast<typename CudaTwin<scalar_t>::type*>(t.mutable_data_ptr<scalar_t>());
}

inline unsigned sample_blocks(int64_t samples, int threads) {
  return static_cast<unsigned>((samples + threads - 1) / threads);
}

}  // namespace drsl_fast
