// Host-side shapes, checks and inputs shared by the CPU and CUDA backends of
// the mode-distance op.
#pragma once
#include <ATen/ATen.h>

#include <cmath>
#include <limits>
#include <optional>
#include <vector>

#include "pixel_view.h"

namespace drsl_fast {

// Shape of the per-class outputs (dmin, mstar, posterior): (B, C, H, W) or (N, C).
inline std::vector<int64_t> per_class_shape(const at::Tensor& emb, int64_t C) {
  if (emb.dim() == 2) return {emb.size(0), C};
  return {emb.size(0), C, emb.size(2), emb.size(3)};
}

// Layout of a contiguous per-class tensor, addressed as (b, c, pixel).
inline PixelLayout per_class_layout(const at::Tensor& emb, int64_t C) {
  if (emb.dim() == 2) return PixelLayout{0, 1, C};
  const int64_t P = emb.size(2) * emb.size(3);
  return PixelLayout{C * P, P, 1};
}

inline void check_mode_distance_inputs(const at::Tensor& emb, const at::Tensor& modes) {
  TORCH_CHECK(emb.dim() == 2 || emb.dim() == 4, "mode_distance: emb must be (B, D, H, W) or (N, D), got ",
              emb.sizes());
  TORCH_CHECK(modes.dim() == 3, "mode_distance: modes must be (C, M, D), got ", modes.sizes());
  TORCH_CHECK(emb.size(1) == modes.size(2), "mode_distance: emb has D=", emb.size(1), " channels but modes have D=",
              modes.size(2));
  TORCH_CHECK(modes.size(1) >= 1 && modes.size(1) <= kMaxModes, "mode_distance: M must be in [1, ", kMaxModes,
              "], got ", modes.size(1));
  TORCH_CHECK(modes.size(0) >= 1, "mode_distance: modes need at least one class");
  TORCH_CHECK(emb.device() == modes.device(), "mode_distance: emb is on ", emb.device(), " but modes on ",
              modes.device());
}

inline void check_sigma(std::optional<double> sigma) {
  TORCH_CHECK(!sigma.has_value() || (std::isfinite(*sigma) && *sigma > 0),
              "mode_distance: sigma must be a finite number > 0, got ", sigma.value_or(0.0));
}

// -1 / (2 sigma^2) in the accumulation type, -inf where it overflows (tiny
// sigma); as posterior_scale of drsl_fast/reference/mode_distance.py.
template <typename acc_t>
inline acc_t posterior_scale(double sigma) {
  const double scale = -0.5 / sigma / sigma;
  constexpr acc_t largest = std::numeric_limits<acc_t>::max();
  return -scale > static_cast<double>(largest) ? -std::numeric_limits<acc_t>::infinity() : static_cast<acc_t>(scale);
}

// One validated mode-distance call: emb viewed as (B, D, P), the modes in the
// accumulation dtype, and the sizes.
struct ModeDistanceProblem {
  at::Tensor bdp;
  at::Tensor modes;
  at::ScalarType acc_dtype;
  int64_t B, P, C, M, D;
};

inline ModeDistanceProblem mode_distance_problem(const at::Tensor& emb, const at::Tensor& modes) {
  check_mode_distance_inputs(emb, modes);
  const at::Tensor bdp = as_bdp(emb);
  const auto acc_dtype = accumulate_dtype(emb);
  const at::Tensor centres = modes.to(acc_dtype).contiguous();
  return {bdp, centres, acc_dtype, bdp.size(0), bdp.size(2), centres.size(0), centres.size(1), centres.size(2)};
}

// The upstream gradient (accumulation dtype) and mstar, both contiguous and
// shaped like the per-class outputs.
inline std::pair<at::Tensor, at::Tensor> backward_inputs(const at::Tensor& grad_dmin, const at::Tensor& mstar,
                                                         const at::Tensor& emb, const ModeDistanceProblem& p) {
  const std::vector<int64_t> shape = per_class_shape(emb, p.C);
  TORCH_CHECK(grad_dmin.sizes() == at::IntArrayRef(shape) && mstar.sizes() == at::IntArrayRef(shape),
              "mode_distance_backward: grad and mstar must be shaped ", at::IntArrayRef(shape));
  return {grad_dmin.to(p.acc_dtype).contiguous(), mstar.contiguous()};
}

}  // namespace drsl_fast
