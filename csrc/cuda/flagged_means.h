// Host half of kernels/cuda/flagged_means.cuh: the means and count that end
// the CUDA mmdl_losses (reduction "mean") and consistency_hinge, one launch.
#pragma once
#include <ATen/ATen.h>

#include <tuple>

#include "../../kernels/cuda/flagged_means.cuh"
#include "launch.h"

namespace drsl_fast {

// mean(a), mean(b) over the flagged items (0-d, in a's and b's dtype, float
// or double; 0 when none is flagged; undefined where a or b is) and the number
// flagged (0-d int64). a and b hold 0 where an item is not flagged.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> flagged_means_cuda(const at::Tensor& a, const at::Tensor& b,
                                                                         const at::Tensor& flagged) {
  const at::Tensor flags = flagged.contiguous();
  at::Tensor count = at::empty({}, flags.options().dtype(at::kLong));
  const at::Tensor& like = a.defined() ? a : b;
  const auto dtype = like.defined() ? like.scalar_type() : at::kFloat;
  at::Tensor mean_a = a.defined() ? at::empty({}, a.options()) : at::Tensor();
  at::Tensor mean_b = b.defined() ? at::empty({}, b.options()) : at::Tensor();
  const at::Tensor values_a = a.defined() ? a.contiguous() : a, values_b = b.defined() ? b.contiguous() : b;
  AT_DISPATCH_FLOATING_TYPES(dtype, "flagged_means_cuda", [&] {
    const auto in = [](const at::Tensor& t) { return t.defined() ? t.const_data_ptr<scalar_t>() : nullptr; };
    const auto out = [](at::Tensor& t) { return t.defined() ? t.mutable_data_ptr<scalar_t>() : nullptr; };
    launch(cuda::flagged_means_kernel<scalar_t>, dim3(1), cuda::kMeanThreads, 0, in(values_a), in(values_b),
           flags.const_data_ptr<bool>(), flags.numel(), out(mean_a), out(mean_b), count.mutable_data_ptr<int64_t>());
  });
  return {mean_a, mean_b, count};
}

}  // namespace drsl_fast
