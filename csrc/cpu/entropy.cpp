// C++ CPU backend of the ADVENT/IntraDA entropy map (docs/method.md §7); see
// the top of csrc/cuda/entropy.cu for the formulas. Pixels are processed in tiles of
// kTile: the tile's logits are read once into contiguous [C][kTile] memory
// (the accumulation type), and the softmax, the map, the pixel entropy and,
// in backward, the gradient are computed from it.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../host.h"

namespace drsl_fast {
namespace {

constexpr int64_t kTile = 64;
constexpr double kEps = 1e-30;

// Softmax of a [C][kTile] tile in place (first n pixels).
template <typename acc_t>
void softmax_tile(acc_t* tile, int64_t C, int64_t n, acc_t* best, acc_t* sum) {
  std::copy(tile, tile + n, best);
  for (int64_t c = 1; c < C; ++c)
    for (int64_t j = 0; j < n; ++j) best[j] = std::max(best[j], tile[c * kTile + j]);
  std::fill(sum, sum + n, acc_t(0));
  for (int64_t c = 0; c < C; ++c) {
    acc_t* row = tile + c * kTile;
    for (int64_t j = 0; j < n; ++j) {
      row[j] = std::exp(row[j] - best[j]);
      sum[j] += row[j];
    }
  }
  for (int64_t j = 0; j < n; ++j) sum[j] = acc_t(1) / sum[j];
  for (int64_t c = 0; c < C; ++c)
    for (int64_t j = 0; j < n; ++j) tile[c * kTile + j] *= sum[j];
}

template <typename scalar_t, typename acc_t>
void load_tile(const scalar_t* x, PixelLayout L, int64_t b, int64_t C, int64_t p0, int64_t n, acc_t* tile) {
  for (int64_t c = 0; c < C; ++c) {
    const scalar_t* src = x + L.offset(b, c, p0);
    for (int64_t j = 0; j < n; ++j) tile[c * kTile + j] = static_cast<acc_t>(src[j * L.pixel]);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> entropy_map_cpu(const at::Tensor& logits, bool with_map) {
  check_logits(logits);
  const at::Tensor bcp = as_bdp(logits);
  const int64_t B = bcp.size(0), C = bcp.size(1), P = bcp.size(2);
  at::Tensor map, pixel;
  std::tie(map, pixel) = entropy_outputs(logits, with_map);
  if (pixel.numel() > 0) {
    const int64_t tiles_per_image = (P + kTile - 1) / kTile;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "entropy_map_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* x = bcp.const_data_ptr<scalar_t>();
      const PixelLayout L = layout_of(bcp);
      acc_t* map_out = with_map ? map.mutable_data_ptr<acc_t>() : nullptr;
      acc_t* pixel_out = pixel.mutable_data_ptr<acc_t>();
      const acc_t scale = acc_t(-1) / std::log2(static_cast<acc_t>(C));
      at::parallel_for(0, B * tiles_per_image, 1, [&](int64_t begin, int64_t end) {
        std::vector<acc_t> tile(C * kTile), best(kTile), sum(kTile);
        for (int64_t t = begin; t < end; ++t) {
          const int64_t b = t / tiles_per_image, p0 = (t % tiles_per_image) * kTile;
          const int64_t n = std::min(kTile, P - p0);
          load_tile(x, L, b, C, p0, n, tile.data());
          softmax_tile(tile.data(), C, n, best.data(), sum.data());
          acc_t* total = pixel_out + b * P + p0;
          std::fill(total, total + n, acc_t(0));
          for (int64_t c = 0; c < C; ++c) {
            const acc_t* p = tile.data() + c * kTile;
            acc_t* dst = map_out == nullptr ? nullptr : map_out + (b * C + c) * P + p0;
            for (int64_t j = 0; j < n; ++j) {
              const acc_t v = scale * p[j] * std::log2(p[j] + acc_t(kEps));
              total[j] += v;
              if (dst != nullptr) dst[j] = v;
            }
          }
        }
      });
    });
  }
  return {map, pixel, image_scores(pixel, C)};
}

at::Tensor entropy_map_backward_cpu(const at::Tensor& logits, const at::Tensor& grad_map_in,
                                    const at::Tensor& grad_pixel_in) {
  const EntropyBackwardInputs in = entropy_backward_inputs(logits, grad_map_in, grad_pixel_in);
  const at::Tensor &bcp = in.bcp, &grad_map = in.grad_map, &grad_pixel = in.grad_pixel;
  const bool with_map_grad = in.with_map_grad;
  const int64_t B = in.B, C = in.C, P = in.P;
  at::Tensor grad_logits = empty_like_pixel_viewable(logits);
  if (grad_logits.numel() == 0) return grad_logits;
  at::Tensor grad_bcp = as_bdp(grad_logits);
  const int64_t tiles_per_image = (P + kTile - 1) / kTile;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "entropy_map_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x = bcp.const_data_ptr<scalar_t>();
    const PixelLayout L = layout_of(bcp), G = layout_of(grad_bcp);
    scalar_t* out = grad_bcp.mutable_data_ptr<scalar_t>();
    const acc_t* gmap = with_map_grad ? grad_map.const_data_ptr<acc_t>() : nullptr;
    const acc_t* gpix = grad_pixel.const_data_ptr<acc_t>();
    const acc_t scale = acc_t(-1) / std::log2(static_cast<acc_t>(C));
    const acc_t inv_ln2 = acc_t(1) / std::log(acc_t(2));
    at::parallel_for(0, B * tiles_per_image, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> tile(C * kTile), a(C * kTile), best(kTile), sum(kTile);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t b = t / tiles_per_image, p0 = (t % tiles_per_image) * kTile;
        const int64_t n = std::min(kTile, P - p0);
        load_tile(x, L, b, C, p0, n, tile.data());
        softmax_tile(tile.data(), C, n, best.data(), sum.data());
        // a_c = g_c dmap_c/dp_c; sum = sum_c p_c a_c
        std::fill(sum.begin(), sum.end(), acc_t(0));
        for (int64_t c = 0; c < C; ++c) {
          const acc_t* p = tile.data() + c * kTile;
          acc_t* ac = a.data() + c * kTile;
          const acc_t* gm = gmap == nullptr ? nullptr : gmap + (b * C + c) * P + p0;
          for (int64_t j = 0; j < n; ++j) {
            const acc_t g = gpix[b * P + p0 + j] + (gm == nullptr ? acc_t(0) : gm[j]);
            const acc_t q = p[j] + acc_t(kEps);
            ac[j] = g * scale * (std::log2(q) + p[j] / q * inv_ln2);
            sum[j] += p[j] * ac[j];
          }
        }
        for (int64_t c = 0; c < C; ++c) {
          const acc_t* p = tile.data() + c * kTile;
          const acc_t* ac = a.data() + c * kTile;
          scalar_t* dst = out + G.offset(b, c, p0);
          for (int64_t j = 0; j < n; ++j) dst[j * G.pixel] = static_cast<scalar_t>(p[j] * (ac[j] - sum[j]));
        }
      }
    });
  });
  return grad_logits;
}

TORCH_LIBRARY_IMPL(drsl_fast, CPU, m) {
  m.impl("entropy_map", &entropy_map_cpu);
  m.impl("entropy_map_backward", &entropy_map_backward_cpu);
}

}  // namespace drsl_fast
