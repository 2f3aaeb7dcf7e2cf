// Device kernels of the class-balanced pseudo-label ops (docs/method.md §5). No ATen:
// the host launchers live in csrc/cuda/pseudo_labels_cuda.cu, and
// kernels/cuda/pascal_sm61.cu compiles these kernels alone for sm_61.
//
// confidence_histogram_kernel: per pixel, k = argmax_c x[c] (ties: lowest),
//   conf = x[k] (probabilities) or 1 / sum_c exp(x[c] - x[k]) (logits);
//   counts[k, confidence_bin(conf)] += 1 (kernels/confidence_bins.h).
// select_labels_kernel: y = argmax_c x[c] / t[c] (ties: lowest), 255 where
//   the largest ratio is below 1 or NaN.
// Maxima propagate NaN and keep the first, as torch.max (kernels/nan_rules.h).
#pragma once
#include <cstdint>
#include "../confidence_bins.h"
#include "../nan_rules.h"
#include "../pixel_layout.h"
#include "load_store.cuh"

namespace drsl_fast {
namespace cuda {

constexpr int kPseudoLabelThreads = 256;

// One thread per pixel; grid = (ceil(P / blockDim), B).
template <typename scalar_t>
__global__ void confidence_histogram_kernel(const scalar_t* __restrict__ x, PixelLayout layout, int C, int64_t P,
                                            bool from_logits, int mantissa_bits,
                                            unsigned long long* __restrict__ counts) {
  const int64_t b = blockIdx.y;
  const int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (p >= P) return;
  const scalar_t* px = x + layout.offset(b, 0, p);
  float best = load_as<float>(px[0]);
  int cls = 0;
  for (int c = 1; c < C; ++c) {
    const float v = load_as<float>(px[c * layout.channel]);
    if (replaces_max(v, best)) {  // ties keep the lowest class; NaN wins
      best = v;
      cls = c;
    }
  }
  float conf = best;
  if (from_logits) {
    float sum = 0.0f;
    for (int c = 0; c < C; ++c) sum += expf(load_as<float>(px[c * layout.channel]) - best);
    conf = 1.0f / sum;
  }
  atomicAdd(counts + cls * confidence_num_bins(mantissa_bits) + confidence_bin(conf, mantissa_bits), 1ull);
}

// One thread per pixel; grid = (ceil(P / blockDim), B). labels: (B, P).
template <typename scalar_t>
__global__ void select_labels_kernel(const scalar_t* __restrict__ x, PixelLayout layout, int C, int64_t P,
                                     const float* __restrict__ thresholds, uint8_t* __restrict__ labels) {
  const int64_t b = blockIdx.y;
  const int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (p >= P) return;
  const scalar_t* px = x + layout.offset(b, 0, p);
  float best = load_as<float>(px[0]) / thresholds[0];
  int cls = 0;
  for (int c = 1; c < C; ++c) {
    const float ratio = load_as<float>(px[c * layout.channel]) / thresholds[c];
    if (replaces_max(ratio, best)) {  // ties keep the lowest class; NaN wins
      best = ratio;
      cls = c;
    }
  }
  labels[b * P + p] = best >= 1.0f ? static_cast<uint8_t>(cls) : uint8_t(255);
}

}  // namespace cuda
}  // namespace drsl_fast
