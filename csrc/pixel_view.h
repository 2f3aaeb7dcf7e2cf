// Host-side views of per-pixel tensors as (batch, channel, pixel) with the
// strides of kernels/pixel_layout.h, shared by every op's CPU and CUDA backend.
#pragma once
#include <ATen/ATen.h>

#include "../kernels/pixel_layout.h"

namespace drsl_fast {

// Views a per-pixel tensor, (B, D, H, W) or (N, D), as (B, D, P) without
// copying where the strides allow it (contiguous and channels-last inputs,
// any (N, D) matrix).
inline at::Tensor as_bdp(const at::Tensor& emb) {
  if (emb.dim() == 2) return emb.t().unsqueeze(0);
  return emb.reshape({emb.size(0), emb.size(1), emb.size(2) * emb.size(3)});
}

// A new tensor shaped like emb whose as_bdp() is always a view: same strides
// for (N, D), contiguous or channels-last for (B, D, H, W).
inline at::Tensor empty_like_pixel_viewable(const at::Tensor& emb) {
  if (emb.dim() == 2) return at::empty_like(emb);
  return at::empty(emb.sizes(), emb.options().memory_format(emb.suggest_memory_format()));
}

inline PixelLayout layout_of(const at::Tensor& bdp) {
  return PixelLayout{bdp.stride(0), bdp.stride(1), bdp.stride(2)};
}

inline at::ScalarType accumulate_dtype(const at::Tensor& emb) {
  return emb.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace drsl_fast
