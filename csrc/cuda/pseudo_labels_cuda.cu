// CUDA launchers of the class-balanced pseudo-label ops (docs/method.md §5). The
// kernels themselves are in kernels/cuda/pseudo_labels.cuh, free of ATen.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../../kernels/cuda/pseudo_labels.cuh"
#include "../pixel_view.h"
#include "device_pointers.h"

namespace drsl_fast {
namespace {

dim3 pixel_grid(int64_t P, int64_t B) {
  TORCH_CHECK(B <= 65535, "pseudo-label ops (cuda): batch size must be <= 65535, got ", B);
  return dim3(static_cast<unsigned>((P + cuda::kPseudoLabelThreads - 1) / cuda::kPseudoLabelThreads),
              static_cast<unsigned>(B));
}

void check_scores(const at::Tensor& scores, const char* op) {
  TORCH_CHECK(scores.dim() == 4, op, ": expected (B, C, H, W) scores, got ", scores.sizes());
  TORCH_CHECK(scores.size(1) >= 1 && scores.size(1) <= 255, op, ": need 1 <= C <= 255, got C=", scores.size(1));
}

at::Tensor confidence_histogram_cuda(const at::Tensor& scores, bool from_logits, int64_t mantissa_bits) {
  check_scores(scores, "confidence_histogram");
  TORCH_CHECK(mantissa_bits >= 0 && mantissa_bits <= kMaxMantissaBits,
              "confidence_histogram: mantissa_bits must be in [0, ", kMaxMantissaBits, "]");
  const c10::cuda::CUDAGuard guard(scores.device());
  const at::Tensor bcp = as_bdp(scores);
  const int64_t B = bcp.size(0), C = bcp.size(1), P = bcp.size(2);
  at::Tensor counts = at::zeros({C, confidence_num_bins(static_cast<int>(mantissa_bits))},
                                scores.options().dtype(at::kLong));
  if (B * P == 0) return counts;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "confidence_histogram_cuda", [&] {
    cuda::confidence_histogram_kernel<<<pixel_grid(P, B), cuda::kPseudoLabelThreads, 0,
                                        at::cuda::getCurrentCUDAStream()>>>(
        cuda_ptr<scalar_t>(bcp), layout_of(bcp), static_cast<int>(C), P, from_logits,
        static_cast<int>(mantissa_bits), reinterpret_cast<unsigned long long*>(counts.mutable_data_ptr<int64_t>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return counts;
}

at::Tensor select_labels_cuda(const at::Tensor& probs, const at::Tensor& thresholds_in) {
  check_scores(probs, "select_labels");
  const int64_t C = probs.size(1);
  TORCH_CHECK(thresholds_in.dim() == 1 && thresholds_in.size(0) == C, "select_labels: thresholds must be (", C,
              ",), got ", thresholds_in.sizes());
  const c10::cuda::CUDAGuard guard(probs.device());
  const at::Tensor thresholds = thresholds_in.to(at::kFloat).contiguous();
  const at::Tensor bcp = as_bdp(probs);
  const int64_t B = bcp.size(0), P = bcp.size(2);
  at::Tensor labels = at::empty({B, probs.size(2), probs.size(3)}, probs.options().dtype(at::kByte));
  if (labels.numel() == 0) return labels;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, probs.scalar_type(), "select_labels_cuda", [&] {
    cuda::select_labels_kernel<<<pixel_grid(P, B), cuda::kPseudoLabelThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        cuda_ptr<scalar_t>(bcp), layout_of(bcp), static_cast<int>(C), P, thresholds.const_data_ptr<float>(),
        labels.mutable_data_ptr<uint8_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return labels;
}

}  // namespace

TORCH_LIBRARY_IMPL(drsl_fast, CUDA, m) {
  m.impl("confidence_histogram", &confidence_histogram_cuda);
  m.impl("select_labels", &select_labels_cuda);
}

}  // namespace drsl_fast
