// CUDA backend of the ADVENT/IntraDA entropy map (docs/method.md §7): first the
// device kernels, free of ATen, then their launchers. kernels/cuda/pascal_sm61.cu
// compiles the kernels alone for sm_61 (it defines DRSL_FAST_KERNELS_ONLY).
//
// With p = softmax_c(x), s = -1 / log2(C) and eps = 1e-30:
//   map[c]   = s p_c log2(p_c + eps),   pixel = sum_c map[c]
// Backward, with g_c = grad_map[c] + grad_pixel:
//   a_c      = g_c s (log2(p_c + eps) + p_c / ((p_c + eps) ln 2))
//   dL/dx_c  = p_c (a_c - sum_k p_k a_k)
#include <cstdint>

#include "../../kernels/cuda/load_store.cuh"
#include "../../kernels/pixel_layout.h"

namespace drsl_fast {
namespace cuda {

constexpr int kEntropyThreads = 128;

__device__ __forceinline__ float log2_of(float v) { return log2f(v); }
__device__ __forceinline__ double log2_of(double v) { return log2(v); }

// The softmax over the C classes of one pixel (channel stride `stride`).
template <typename scalar_t, typename acc_t>
struct PixelSoftmax {
  const scalar_t* px;
  int64_t stride;
  acc_t best, inv_sum;

  __device__ PixelSoftmax(const scalar_t* px, int64_t stride, int C) : px(px), stride(stride) {
    best = load_as<acc_t>(px[0]);
    for (int c = 1; c < C; ++c) best = max(best, load_as<acc_t>(px[c * stride]));
    acc_t sum = acc_t(0);
    for (int c = 0; c < C; ++c) sum += exp_of(load_as<acc_t>(px[c * stride]) - best);
    inv_sum = acc_t(1) / sum;
  }

  __device__ acc_t operator[](int c) const { return exp_of(load_as<acc_t>(px[c * stride]) - best) * inv_sum; }
};

// a_c of the backward from p_c and g_c.
template <typename acc_t>
__device__ __forceinline__ acc_t grad_weight(acc_t prob, acc_t g, acc_t scale) {
  const acc_t q = prob + acc_t(1e-30);
  return g * scale * (log2_of(q) + prob / q * acc_t(1.4426950408889634));
}

// One thread per pixel; grid = (ceil(P / blockDim), B). map (optional) is
// contiguous (B, C, P), pixel_entropy (B, P).
template <typename scalar_t, typename acc_t>
__global__ void entropy_map_kernel(const scalar_t* __restrict__ x, PixelLayout layout, int C, int64_t P, acc_t scale,
                                   acc_t* __restrict__ map, acc_t* __restrict__ pixel_entropy) {
  const int64_t b = blockIdx.y, p = thread_index();
  if (p >= P) return;
  const PixelSoftmax<scalar_t, acc_t> prob(x + layout.offset(b, 0, p), layout.channel, C);
  acc_t total = acc_t(0);
  for (int c = 0; c < C; ++c) {
    const acc_t pc = prob[c];
    const acc_t v = scale * pc * log2_of(pc + acc_t(1e-30));
    total += v;
    if (map != nullptr) map[(b * C + c) * P + p] = v;
  }
  pixel_entropy[b * P + p] = total;
}

// One thread per pixel; grid = (ceil(P / blockDim), B). grad_map (optional)
// is contiguous (B, C, P), grad_pixel (B, P). Two passes over the classes:
// sum_k p_k a_k, then the gradient (recomputing p and a).
template <typename scalar_t, typename acc_t>
__global__ void entropy_map_backward_kernel(const scalar_t* __restrict__ x, PixelLayout layout, int C, int64_t P,
                                            acc_t scale, const acc_t* __restrict__ grad_map,
                                            const acc_t* __restrict__ grad_pixel, scalar_t* __restrict__ grad_x,
                                            PixelLayout grad_layout) {
  const int64_t b = blockIdx.y, p = thread_index();
  if (p >= P) return;
  const PixelSoftmax<scalar_t, acc_t> prob(x + layout.offset(b, 0, p), layout.channel, C);
  const acc_t* gm = grad_map == nullptr ? nullptr : grad_map + b * C * P + p;
  const acc_t gp = grad_pixel[b * P + p];
  acc_t weighted = acc_t(0);
  for (int c = 0; c < C; ++c) {
    const acc_t pc = prob[c];
    weighted += pc * grad_weight(pc, gp + (gm ? gm[c * P] : acc_t(0)), scale);
  }
  scalar_t* gx = grad_x + grad_layout.offset(b, 0, p);
  for (int c = 0; c < C; ++c) {
    const acc_t pc = prob[c];
    const acc_t a = grad_weight(pc, gp + (gm ? gm[c * P] : acc_t(0)), scale);
    gx[c * grad_layout.channel] = store_as<scalar_t>(pc * (a - weighted));
  }
}

}  // namespace cuda
}  // namespace drsl_fast

#ifndef DRSL_FAST_KERNELS_ONLY
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>

#include "../host.h"
#include "launch.h"

namespace drsl_fast {
namespace {

template <typename acc_t>
acc_t entropy_scale(int64_t C) {
  return static_cast<acc_t>(-1.0 / std::log2(static_cast<double>(C)));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> entropy_map_cuda(const at::Tensor& logits, bool with_map) {
  check_logits(logits);
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor bcp = as_bdp(logits);
  const int64_t B = bcp.size(0), C = bcp.size(1), P = bcp.size(2);
  at::Tensor map, pixel;
  std::tie(map, pixel) = entropy_outputs(logits, with_map);
  if (pixel.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "entropy_map_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      launch(cuda::entropy_map_kernel<cuda_type<scalar_t>, acc_t>,
             pixel_grid("entropy_map", P, B, cuda::kEntropyThreads), cuda::kEntropyThreads, 0,
             cuda_ptr<scalar_t>(bcp), layout_of(bcp), static_cast<int>(C), P, entropy_scale<acc_t>(C),
             with_map ? map.mutable_data_ptr<acc_t>() : nullptr, pixel.mutable_data_ptr<acc_t>());
    });
  }
  return {map, pixel, image_scores(pixel, C)};
}

at::Tensor entropy_map_backward_cuda(const at::Tensor& logits, const at::Tensor& grad_map,
                                     const at::Tensor& grad_pixel) {
  const c10::cuda::CUDAGuard guard(logits.device());
  const EntropyBackwardInputs in = entropy_backward_inputs(logits, grad_map, grad_pixel);
  at::Tensor grad_logits = empty_like_pixel_viewable(logits);
  if (grad_logits.numel() == 0) return grad_logits;
  at::Tensor grad_bcp = as_bdp(grad_logits);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "entropy_map_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    launch(cuda::entropy_map_backward_kernel<cuda_type<scalar_t>, acc_t>,
           pixel_grid("entropy_map_backward", in.P, in.B, cuda::kEntropyThreads), cuda::kEntropyThreads, 0,
           cuda_ptr<scalar_t>(in.bcp), layout_of(in.bcp), static_cast<int>(in.C), in.P, entropy_scale<acc_t>(in.C),
           in.with_map_grad ? in.grad_map.const_data_ptr<acc_t>() : nullptr, in.grad_pixel.const_data_ptr<acc_t>(),
           mutable_cuda_ptr<scalar_t>(grad_bcp), layout_of(grad_bcp));
  });
  return grad_logits;
}

TORCH_LIBRARY_IMPL(drsl_fast, CUDA, m) {
  m.impl("entropy_map", &entropy_map_cuda);
  m.impl("entropy_map_backward", &entropy_map_backward_cuda);
}

}  // namespace drsl_fast
#endif  // DRSL_FAST_KERNELS_ONLY
