// C++ CPU backend of the mode-distance op (docs/method.md §3); see
// the top of csrc/cuda/mode_distance.cu for the formulas. Pixels are processed in
// tiles of kTile, converted once to the accumulation type; the inner loops run
// over contiguous tile memory so the compiler vectorises them, and the hot
// loops are also built for AVX2+FMA, picked at run time.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <optional>
#include <vector>

#include "chunk_sum.h"
#include "multiversion.h"
#include "../host.h"
#include "../../kernels/nan_rules.h"

namespace drsl_fast {
namespace {

constexpr int64_t kTile = 64;
// Pixels per partial sum of the mode gradient. Fixed (not tied to the thread
// count), so the summation order, and the result, never change.
constexpr int64_t kModeGradChunk = 4096;

// 32-byte vectors (GCC/Clang vector extensions): one AVX register in the
// Haswell clones below, two SSE registers in the default ones.
typedef float float_vec __attribute__((vector_size(32)));
typedef double double_vec __attribute__((vector_size(32)));
template <typename acc_t> struct VecOf;
template <> struct VecOf<float> { using type = float_vec; };
template <> struct VecOf<double> { using type = double_vec; };

template <typename V, typename T>
DRSL_ALWAYS_INLINE V load_vec(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

// out[j] = ||tile[:, j] - r||^2 for the kTile pixels of a [D][kTile] tile,
// four vectors of pixels at a time. Always inlined, so that each target clone
// compiles its own copy.
template <typename acc_t>
DRSL_ALWAYS_INLINE void squared_distances_impl(const acc_t* __restrict__ tile, const acc_t* __restrict__ r, int64_t D,
                                               acc_t* __restrict__ out) {
  using V = typename VecOf<acc_t>::type;
  constexpr int64_t kWidth = sizeof(V) / sizeof(acc_t);
  constexpr int64_t kBlock = 4 * kWidth;
  static_assert(kTile % kBlock == 0, "tile must hold whole vector blocks");
  for (int64_t j0 = 0; j0 < kTile; j0 += kBlock) {
    V acc0 = {}, acc1 = {}, acc2 = {}, acc3 = {};
    for (int64_t d = 0; d < D; ++d) {
      const acc_t rd = r[d];
      const acc_t* row = tile + d * kTile + j0;
      const V t0 = load_vec<V>(row) - rd;
      const V t1 = load_vec<V>(row + kWidth) - rd;
      const V t2 = load_vec<V>(row + 2 * kWidth) - rd;
      const V t3 = load_vec<V>(row + 3 * kWidth) - rd;
      acc0 += t0 * t0;
      acc1 += t1 * t1;
      acc2 += t2 * t2;
      acc3 += t3 * t3;
    }
    std::memcpy(out + j0, &acc0, sizeof(V));
    std::memcpy(out + j0 + kWidth, &acc1, sizeof(V));
    std::memcpy(out + j0 + 2 * kWidth, &acc2, sizeof(V));
    std::memcpy(out + j0 + 3 * kWidth, &acc3, sizeof(V));
  }
}

// Backward over one tile of n pixels ([n][D] in `tile`): adds
// g (e - r[c, mstar]) to grad_tile ([n][D], optional) and g (r[c, mstar] - e)
// to the chunk's partial mode gradient (C, M, D) (optional).
template <typename acc_t>
DRSL_ALWAYS_INLINE void backward_tile_impl(const acc_t* __restrict__ tile, int64_t n, int64_t D, int64_t C, int64_t M,
                                           const acc_t* __restrict__ grad_dmin, const uint8_t* __restrict__ mstar,
                                           int64_t out_offset, int64_t class_stride, int64_t pixel_stride,
                                           const acc_t* __restrict__ modes, acc_t* __restrict__ grad_tile,
                                           acc_t* __restrict__ partial) {
  for (int64_t j = 0; j < n; ++j) {
    const acc_t* e = tile + j * D;
    acc_t* ge = grad_tile == nullptr ? nullptr : grad_tile + j * D;
    for (int64_t c = 0; c < C; ++c) {
      const int64_t o = out_offset + c * class_stride + j * pixel_stride;
      const acc_t g = grad_dmin[o];
      if (g == acc_t(0)) continue;
      const int64_t centre = c * M + mstar[o];
      const acc_t* r = modes + centre * D;
      acc_t* pr = partial == nullptr ? nullptr : partial + centre * D;
      if (ge != nullptr && pr != nullptr) {
        for (int64_t d = 0; d < D; ++d) {
          const acc_t step = g * (e[d] - r[d]);
          ge[d] += step;
          pr[d] -= step;
        }
      } else if (ge != nullptr) {
        for (int64_t d = 0; d < D; ++d) ge[d] += g * (e[d] - r[d]);
      } else {
        for (int64_t d = 0; d < D; ++d) pr[d] += g * (r[d] - e[d]);
      }
    }
  }
}

// The float and double instances of the hot loops above.
#define DRSL_HOT_LOOPS(acc_t)                                                                                      \
  DRSL_MULTIVERSIONED(void squared_distances(const acc_t* tile, const acc_t* r, int64_t D, acc_t* out) {          \
    squared_distances_impl(tile, r, D, out);                                                                       \
  })                                                                                                               \
  DRSL_MULTIVERSIONED(void backward_tile(const acc_t* tile, int64_t n, int64_t D, int64_t C, int64_t M,            \
                                         const acc_t* grad_dmin, const uint8_t* mstar, int64_t out_offset,         \
                                         int64_t class_stride, int64_t pixel_stride, const acc_t* modes,           \
                                         acc_t* grad_tile, acc_t* partial) {                                       \
    backward_tile_impl(tile, n, D, C, M, grad_dmin, mstar, out_offset, class_stride, pixel_stride, modes,          \
                       grad_tile, partial);                                                                        \
  })
DRSL_HOT_LOOPS(float)
DRSL_HOT_LOOPS(double)
#undef DRSL_HOT_LOOPS

// Pixels [p0, p0 + n) of image b as a [D][kTile] tile, zero padded.
template <typename scalar_t, typename acc_t>
void load_channel_major(const scalar_t* emb, PixelLayout L, int64_t b, int64_t p0, int64_t n, int64_t D, acc_t* tile) {
  for (int64_t d = 0; d < D; ++d) {
    const scalar_t* src = emb + L.offset(b, d, p0);
    acc_t* dst = tile + d * kTile;
    for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<acc_t>(src[j * L.pixel]);
    std::fill(dst + n, dst + kTile, acc_t(0));
  }
}

// Pixels [p0, p0 + n) of image b as a [n][D] tile.
template <typename scalar_t, typename acc_t>
void load_pixel_major(const scalar_t* emb, PixelLayout L, int64_t b, int64_t p0, int64_t n, int64_t D, acc_t* tile) {
  for (int64_t d = 0; d < D; ++d) {
    const scalar_t* src = emb + L.offset(b, d, p0);
    for (int64_t j = 0; j < n; ++j) tile[j * D + d] = static_cast<acc_t>(src[j * L.pixel]);
  }
}

template <typename scalar_t, typename acc_t>
void forward(const scalar_t* emb, PixelLayout emb_layout, const acc_t* modes, int64_t C, int64_t M, int64_t D,
             int64_t B, int64_t P, acc_t* dmin, uint8_t* mstar, acc_t* posterior, acc_t posterior_scale,
             PixelLayout out_layout) {
  const int64_t tiles = (P + kTile - 1) / kTile;
  at::parallel_for(0, B * tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> tile(D * kTile), dist(kTile), best(kTile);
    std::vector<uint8_t> winner(kTile);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / tiles;
      const int64_t p0 = (t % tiles) * kTile;
      const int64_t n = std::min(kTile, P - p0);
      load_channel_major(emb, emb_layout, b, p0, n, D, tile.data());
      for (int64_t c = 0; c < C; ++c) {
        squared_distances(tile.data(), modes + c * M * D, D, best.data());
        std::fill(winner.begin(), winner.end(), uint8_t(0));
        for (int64_t m = 1; m < M; ++m) {
          squared_distances(tile.data(), modes + (c * M + m) * D, D, dist.data());
          for (int64_t j = 0; j < kTile; ++j) {
            if (replaces_min(dist[j], best[j])) {  // ties keep the lowest mode; NaN wins
              best[j] = dist[j];
              winner[j] = static_cast<uint8_t>(m);
            }
          }
        }
        for (int64_t j = 0; j < n; ++j) {
          const int64_t o = out_layout.offset(b, c, p0 + j);
          dmin[o] = best[j];
          mstar[o] = winner[j];
          if (posterior != nullptr) posterior[o] = std::exp(posterior_exponent(best[j], posterior_scale));
        }
      }
    }
  });
}

// grad_emb (optional) and per-chunk partial mode gradients (optional, without
// the factor 2), in one pass over the pixels.
template <typename scalar_t, typename acc_t>
void backward(const acc_t* grad_dmin, const uint8_t* mstar, PixelLayout out_layout, const scalar_t* emb,
              PixelLayout emb_layout, const acc_t* modes, int64_t C, int64_t M, int64_t D, int64_t B, int64_t P,
              scalar_t* grad_emb, PixelLayout grad_layout, acc_t* partial) {
  const int64_t chunks = (P + kModeGradChunk - 1) / kModeGradChunk;
  at::parallel_for(0, B * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> tile(kTile * D), grad_tile(kTile * D);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / chunks;
      const int64_t chunk_begin = (t % chunks) * kModeGradChunk;
      const int64_t chunk_end = std::min(P, chunk_begin + kModeGradChunk);
      acc_t* part = partial == nullptr ? nullptr : partial + t * C * M * D;
      for (int64_t p0 = chunk_begin; p0 < chunk_end; p0 += kTile) {
        const int64_t n = std::min(kTile, chunk_end - p0);
        load_pixel_major(emb, emb_layout, b, p0, n, D, tile.data());
        std::fill(grad_tile.begin(), grad_tile.end(), acc_t(0));
        backward_tile(tile.data(), n, D, C, M, grad_dmin, mstar, out_layout.offset(b, 0, p0), out_layout.channel,
                      out_layout.pixel, modes, grad_emb == nullptr ? nullptr : grad_tile.data(), part);
        if (grad_emb != nullptr) {
          for (int64_t d = 0; d < D; ++d) {
            scalar_t* dst = grad_emb + grad_layout.offset(b, d, p0);
            for (int64_t j = 0; j < n; ++j) dst[j * grad_layout.pixel] = static_cast<scalar_t>(acc_t(2) * grad_tile[j * D + d]);
          }
        }
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> mode_distance_cpu(const at::Tensor& emb, const at::Tensor& modes_in,
                                                                 std::optional<double> sigma) {
  const ModeDistanceProblem p = mode_distance_problem(emb, modes_in);
  const ModeDistanceOutputs out = mode_distance_outputs(emb, p, sigma);
  if (out.dmin.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, emb.scalar_type(), "mode_distance_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t scale = sigma ? posterior_scale<acc_t>(*sigma) : acc_t(0);
    forward<scalar_t, acc_t>(p.bdp.const_data_ptr<scalar_t>(), layout_of(p.bdp), p.modes.const_data_ptr<acc_t>(), p.C,
                             p.M, p.D, p.B, p.P, out.dmin.mutable_data_ptr<acc_t>(),
                             out.mstar.mutable_data_ptr<uint8_t>(),
                             sigma ? out.posterior.mutable_data_ptr<acc_t>() : nullptr, scale,
                             per_class_layout(emb, p.C));
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> mode_distance_backward_cpu(const at::Tensor& grad_dmin_in, const at::Tensor& emb,
                                                             const at::Tensor& modes_in, const at::Tensor& mstar_in,
                                                             bool emb_requires_grad, bool modes_requires_grad) {
  const ModeDistanceProblem p = mode_distance_problem(emb, modes_in);
  const auto [grad_dmin, mstar] = backward_inputs(grad_dmin_in, mstar_in, emb, p);
  const at::Tensor& bdp = p.bdp;
  const at::Tensor& modes = p.modes;
  const int64_t B = p.B, P = p.P, C = p.C, M = p.M, D = p.D;

  at::Tensor grad_emb = emb_requires_grad ? empty_like_pixel_viewable(emb) : at::empty({0}, emb.options());
  const int64_t chunks = (P + kModeGradChunk - 1) / kModeGradChunk;
  at::Tensor partial = modes_requires_grad ? at::zeros({B * chunks, C, M, D}, modes.options())
                                           : at::empty({0}, modes.options());
  if (emb_requires_grad || modes_requires_grad) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, emb.scalar_type(), "mode_distance_backward_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const at::Tensor grad_bdp = emb_requires_grad ? as_bdp(grad_emb) : grad_emb;
      backward<scalar_t, acc_t>(grad_dmin.const_data_ptr<acc_t>(), mstar.const_data_ptr<uint8_t>(),
                                per_class_layout(emb, C), bdp.const_data_ptr<scalar_t>(), layout_of(bdp),
                                modes.const_data_ptr<acc_t>(), C, M, D, B, P,
                                emb_requires_grad ? grad_bdp.mutable_data_ptr<scalar_t>() : nullptr,
                                emb_requires_grad ? layout_of(grad_bdp) : PixelLayout{0, 0, 0},
                                modes_requires_grad ? partial.mutable_data_ptr<acc_t>() : nullptr);
    });
  }
  at::Tensor grad_modes = modes_requires_grad ? sum_chunks_in_order(partial, 2.0).to(modes_in.scalar_type())
                                              : at::empty({0}, modes_in.options());
  return {grad_emb, grad_modes};
}

TORCH_LIBRARY_IMPL(drsl_fast, CPU, m) {
  m.impl("mode_distance", &mode_distance_cpu);
  m.impl("mode_distance_backward", &mode_distance_backward_cpu);
}

}  // namespace drsl_fast
