// CUDA backend of the class-balanced pseudo-label ops (docs/method.md §5): first
// the device kernels, free of ATen, then their launchers. kernels/cuda/pascal_sm61.cu
// compiles the kernels alone for sm_61 (it defines DRSL_FAST_KERNELS_ONLY).
//
// confidence_histogram_kernel: per pixel, k = argmax_c x[c] (ties: lowest),
//   conf = x[k] (probabilities) or 1 / sum_c exp(x[c] - x[k]) (logits);
//   counts[k, confidence_bin(conf)] += 1 (kernels/confidence_bins.h).
// select_labels_kernel: y = argmax_c x[c] / t[c] (ties: lowest), 255 where
//   the largest ratio is below 1 or NaN.
// Maxima propagate NaN and keep the first, as torch.max (kernels/nan_rules.h).
#include <cstdint>

#include "../../kernels/confidence_bins.h"
#include "../../kernels/cuda/load_store.cuh"
#include "../../kernels/nan_rules.h"
#include "../../kernels/pixel_layout.h"

namespace drsl_fast {
namespace cuda {

constexpr int kPseudoLabelThreads = 256;

// One thread per pixel; grid = (ceil(P / blockDim), B).
template <typename scalar_t>
__global__ void confidence_histogram_kernel(const scalar_t* __restrict__ x, PixelLayout layout, int C, int64_t P,
                                            bool from_logits, int mantissa_bits,
                                            unsigned long long* __restrict__ counts) {
  const int64_t b = blockIdx.y, p = thread_index();
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
  const int64_t b = blockIdx.y, p = thread_index();
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

#ifndef DRSL_FAST_KERNELS_ONLY
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../host.h"
#include "launch.h"

namespace drsl_fast {
at::Tensor confidence_histogram_cuda(const at::Tensor& scores, bool from_logits, int64_t mantissa_bits) {
  check_histogram_inputs(scores, mantissa_bits);
  const c10::cuda::CUDAGuard guard(scores.device());
  const at::Tensor bcp = as_bdp(scores);
  const int64_t B = bcp.size(0), C = bcp.size(1), P = bcp.size(2);
  const int bits = static_cast<int>(mantissa_bits);
  at::Tensor counts = at::zeros({C, confidence_num_bins(bits)}, scores.options().dtype(at::kLong));
  if (B * P == 0) return counts;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "confidence_histogram_cuda", [&] {
    launch(cuda::confidence_histogram_kernel<cuda_type<scalar_t>>,
           pixel_grid("confidence_histogram", P, B, cuda::kPseudoLabelThreads), cuda::kPseudoLabelThreads, 0,
           cuda_ptr<scalar_t>(bcp), layout_of(bcp), static_cast<int>(C), P, from_logits, bits,
           reinterpret_cast<unsigned long long*>(counts.mutable_data_ptr<int64_t>()));
  });
  return counts;
}

at::Tensor select_labels_cuda(const at::Tensor& probs, const at::Tensor& thresholds_in) {
  const at::Tensor thresholds = checked_thresholds(probs, thresholds_in);
  const c10::cuda::CUDAGuard guard(probs.device());
  const at::Tensor bcp = as_bdp(probs);
  const int64_t B = bcp.size(0), C = bcp.size(1), P = bcp.size(2);
  at::Tensor labels = empty_labels(probs);
  if (labels.numel() == 0) return labels;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, probs.scalar_type(), "select_labels_cuda", [&] {
    launch(cuda::select_labels_kernel<cuda_type<scalar_t>>,
           pixel_grid("select_labels", P, B, cuda::kPseudoLabelThreads), cuda::kPseudoLabelThreads, 0,
           cuda_ptr<scalar_t>(bcp), layout_of(bcp), static_cast<int>(C), P, thresholds.const_data_ptr<float>(),
           labels.mutable_data_ptr<uint8_t>());
  });
  return labels;
}

TORCH_LIBRARY_IMPL(drsl_fast, CUDA, m) {
  m.impl("confidence_histogram", &confidence_histogram_cuda);
  m.impl("select_labels", &select_labels_cuda);
}

}  // namespace drsl_fast
#endif  // DRSL_FAST_KERNELS_ONLY
