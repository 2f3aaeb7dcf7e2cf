// Device kernels of the ADVENT/IntraDA entropy map (docs/method.md §7). No ATen: the
// host launchers live in csrc/cuda/entropy_cuda.cu, and
// kernels/cuda/pascal_sm61.cu compiles these kernels alone for sm_61.
//
// With p = softmax_c(x), s = -1 / log2(C) and eps = 1e-30:
//   map[c]   = s p_c log2(p_c + eps),   pixel = sum_c map[c]
// Backward, with g_c = grad_map[c] + grad_pixel:
//   a_c      = g_c s (log2(p_c + eps) + p_c / ((p_c + eps) ln 2))
//   dL/dx_c  = p_c (a_c - sum_k p_k a_k)
#pragma once
#include <cstdint>
#include "../pixel_layout.h"
#include "load_store.cuh"

namespace drsl_fast {
namespace cuda {

constexpr int kEntropyThreads = 128;

__device__ __forceinline__ float log2_of(float v) { return log2f(v); }
__device__ __forceinline__ double log2_of(double v) { return log2(v); }

// max_c x[c] and 1 / sum_c exp(x[c] - max) of one pixel.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void softmax_stats(const scalar_t* px, int64_t stride, int C, acc_t& best, acc_t& inv_sum) {
  best = load_as<acc_t>(px[0]);
  for (int c = 1; c < C; ++c) best = max(best, load_as<acc_t>(px[c * stride]));
  acc_t sum = acc_t(0);
  for (int c = 0; c < C; ++c) sum += exp_of(load_as<acc_t>(px[c * stride]) - best);
  inv_sum = acc_t(1) / sum;
}

// One thread per pixel; grid = (ceil(P / blockDim), B). map (optional) is
// contiguous (B, C, P), pixel_entropy (B, P).
template <typename scalar_t, typename acc_t>
__global__ void entropy_map_kernel(const scalar_t* __restrict__ x, PixelLayout layout, int C, int64_t P, acc_t scale,
                                   acc_t* __restrict__ map, acc_t* __restrict__ pixel_entropy) {
  const int64_t b = blockIdx.y;
  const int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (p >= P) return;
  const scalar_t* px = x + layout.offset(b, 0, p);
  acc_t best, inv_sum;
  softmax_stats(px, layout.channel, C, best, inv_sum);
  acc_t total = acc_t(0);
  for (int c = 0; c < C; ++c) {
    const acc_t prob = exp_of(load_as<acc_t>(px[c * layout.channel]) - best) * inv_sum;
    const acc_t v = scale * prob * log2_of(prob + acc_t(1e-30));
    total += v;
    if (map != nullptr) map[(b * C + c) * P + p] = v;
  }
  pixel_entropy[b * P + p] = total;
}

// One thread per pixel; grid = (ceil(P / blockDim), B). grad_map (optional)
// is contiguous (B, C, P), grad_pixel (B, P).
template <typename scalar_t, typename acc_t>
__global__ void entropy_map_backward_kernel(const scalar_t* __restrict__ x, PixelLayout layout, int C, int64_t P,
                                            acc_t scale, const acc_t* __restrict__ grad_map,
                                            const acc_t* __restrict__ grad_pixel, scalar_t* __restrict__ grad_x,
                                            PixelLayout grad_layout) {
  const int64_t b = blockIdx.y;
  const int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (p >= P) return;
  const scalar_t* px = x + layout.offset(b, 0, p);
  acc_t best, inv_sum;
  softmax_stats(px, layout.channel, C, best, inv_sum);
  const acc_t inv_ln2 = acc_t(1.4426950408889634);
  const acc_t gp = grad_pixel[b * P + p];
  // two passes: sum_k p_k a_k, then the gradient (recomputing p and a)
  acc_t weighted = acc_t(0);
  for (int c = 0; c < C; ++c) {
    const acc_t prob = exp_of(load_as<acc_t>(px[c * layout.channel]) - best) * inv_sum;
    const acc_t g = gp + (grad_map != nullptr ? grad_map[(b * C + c) * P + p] : acc_t(0));
    const acc_t q = prob + acc_t(1e-30);
    weighted += prob * g * scale * (log2_of(q) + prob / q * inv_ln2);
  }
  scalar_t* gx = grad_x + grad_layout.offset(b, 0, p);
  for (int c = 0; c < C; ++c) {
    const acc_t prob = exp_of(load_as<acc_t>(px[c * layout.channel]) - best) * inv_sum;
    const acc_t g = gp + (grad_map != nullptr ? grad_map[(b * C + c) * P + p] : acc_t(0));
    const acc_t q = prob + acc_t(1e-30);
    const acc_t a = g * scale * (log2_of(q) + prob / q * inv_ln2);
    gx[c * grad_layout.channel] = store_as<scalar_t>(prob * (a - weighted));
  }
}

}  // namespace cuda
}  // namespace drsl_fast
