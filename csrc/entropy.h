// Host-side checks and backward inputs shared by the CPU and CUDA backends of
// the entropy-map op (docs/method.md §7).
#pragma once
#include <ATen/ATen.h>

#include "pixel_view.h"

namespace drsl_fast {

inline void check_logits(const at::Tensor& logits) {
  TORCH_CHECK(logits.dim() == 4, "entropy_map: expected (B, C, H, W) logits, got ", logits.sizes());
  TORCH_CHECK(logits.size(1) >= 2, "entropy_map: needs C >= 2 classes (it divides by log2 C), got ", logits.size(1));
}

// The backward's validated inputs: logits as (B, C, P), the map gradient
// (empty when the map got none) and the pixel-entropy gradient in the
// accumulation dtype, contiguous.
struct EntropyBackwardInputs {
  at::Tensor bcp, grad_map, grad_pixel;
  bool with_map_grad;
  int64_t B, C, P;
};

inline EntropyBackwardInputs entropy_backward_inputs(const at::Tensor& logits, const at::Tensor& grad_map,
                                                     const at::Tensor& grad_pixel) {
  check_logits(logits);
  const at::Tensor bcp = as_bdp(logits);
  const int64_t B = bcp.size(0), C = bcp.size(1), P = bcp.size(2);
  const auto acc_dtype = accumulate_dtype(logits);
  const bool with_map_grad = grad_map.numel() > 0;
  TORCH_CHECK(!with_map_grad || grad_map.sizes() == logits.sizes(), "entropy_map_backward: grad_map must be ",
              logits.sizes(), " or empty, got ", grad_map.sizes());
  TORCH_CHECK(grad_pixel.numel() == B * P, "entropy_map_backward: grad_pixel must be (B, H, W)");
  return {bcp, with_map_grad ? grad_map.to(acc_dtype).contiguous() : grad_map,
          grad_pixel.to(acc_dtype).contiguous(), with_map_grad, B, C, P};
}

}  // namespace drsl_fast
