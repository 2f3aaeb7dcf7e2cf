// Reduction of per-chunk partial gradients for the CPU backends.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

namespace drsl_fast {

// scale * partial.sum(0), adding the chunks in index order: the result does
// not depend on the thread count (partial is (chunks, ...), float or double).
inline at::Tensor sum_chunks_in_order(const at::Tensor& partial, double scale) {
  const at::Tensor src = partial.contiguous();
  at::Tensor out = at::empty(src.sizes().slice(1), src.options());
  const int64_t chunks = src.size(0), width = out.numel();
  AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "sum_chunks_in_order", [&] {
    const scalar_t* in = src.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, width, 1024, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        scalar_t sum = scalar_t(0);
        for (int64_t t = 0; t < chunks; ++t) sum += in[t * width + i];
        dst[i] = static_cast<scalar_t>(scale) * sum;
      }
    });
  });
  return out;
}

}  // namespace drsl_fast
