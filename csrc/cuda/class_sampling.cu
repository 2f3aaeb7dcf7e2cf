// CUDA backend of sample_per_class (docs/method.md §4, §10): one device sort per
// image of int64 keys (class << 48 | random key), ignored pixels last; pixels
// per class by a scatter; the first k of each class's run gathered. ATen
// device primitives only, no host synchronisation.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../host.h"

namespace drsl_fast {
std::tuple<at::Tensor, at::Tensor> sample_per_class_cuda(const at::Tensor& labels, const at::Tensor& keys,
                                                         int64_t num_classes, int64_t k) {
  check_sampling_inputs(labels, keys, num_classes, k);
  const c10::cuda::CUDAGuard guard(labels.device());
  const int64_t B = labels.size(0), P = labels.size(1) * labels.size(2), C = num_classes;
  const auto long_options = labels.options().dtype(at::kLong);
  if (B == 0 || P == 0 || k == 0)
    return {at::full({B, C, k}, -1, long_options), at::zeros({B, C}, long_options)};
  const at::Tensor flat = labels.reshape({B, P}).to(at::kLong);
  const at::Tensor cls = at::where((flat < 0) | (flat >= C), at::full_like(flat, C), flat);
  const at::Tensor order = std::get<1>(at::sort(cls.bitwise_left_shift(kSampleKeyBits).bitwise_or(keys), 1));
  at::Tensor per_class = at::zeros({B, C + 1}, long_options);
  per_class.scatter_add_(1, cls, at::ones_like(cls));
  const at::Tensor start = (per_class.cumsum(1) - per_class).narrow(1, 0, C);
  const at::Tensor count = per_class.narrow(1, 0, C).clamp_max(k);
  const at::Tensor slot = at::arange(k, long_options);
  const at::Tensor position = (start.unsqueeze(2) + slot).clamp_max(P - 1).reshape({B, C * k});
  const at::Tensor index = order.gather(1, position).view({B, C, k});
  return {at::where(slot < count.unsqueeze(2), index, at::full_like(index, -1)), count};
}

TORCH_LIBRARY_IMPL(drsl_fast, CUDA, m) { m.impl("sample_per_class", &sample_per_class_cuda); }

}  // namespace drsl_fast
