// C++ CPU backend of the fused MMDL losses (docs/method.md §4 Eq. 4 and 5); the
// formulas are in kernels/cuda/mmdl_losses.cuh. Samples are gathered from the
// embeddings in place, kTile at a time, into a [D][kTile] tile; all C*M squared
// distances of the tile are computed with the samples as the vectorised inner
// axis. Backward recomputes the distances (nothing of size samples x C is kept
// between the passes), writes one gradient row per sample and per-chunk partial
// mode gradients, then adds them up in a fixed order (deterministic). Also
// label_mode, the nearest mode of a sample's own class (as in the CUDA and
// Triton files of these losses).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "chunk_sum.h"
#include "../mmdl_losses.h"
#include "../../kernels/nan_rules.h"

namespace drsl_fast {
namespace {

constexpr int64_t kTile = 64;
// Samples per partial mode gradient: fixed, so the summation order is too.
constexpr int64_t kChunk = 1024;

struct LossParams {
  double sigma, alpha, scale;

  // 1 / (2 sigma^2) in the accumulation type (+inf where it overflows).
  template <typename acc_t>
  acc_t inv_two_var() const {
    return -posterior_scale<acc_t>(sigma);
  }
};

// Samples [s0, s0 + n) of image b as a [D][kTile] tile; invalid ones (and the
// padding up to kTile) read as 0. pixel[j] is the sample's pixel or -1.
template <typename scalar_t, typename acc_t>
void gather_tile(const scalar_t* emb, PixelLayout L, int64_t b, const int64_t* pixel, int64_t n, int64_t D,
                 acc_t* tile) {
  for (int64_t d = 0; d < D; ++d) {
    acc_t* row = tile + d * kTile;
    for (int64_t j = 0; j < n; ++j) row[j] = pixel[j] < 0 ? acc_t(0) : static_cast<acc_t>(emb[L.offset(b, d, pixel[j])]);
    std::fill(row + n, row + kTile, acc_t(0));
  }
}

// dist[cm][j] = ||tile[:, j] - modes[cm]||^2 for every centre cm of C*M.
template <typename acc_t>
void tile_distances(const acc_t* __restrict__ tile, const acc_t* __restrict__ modes, int64_t CM, int64_t D,
                    acc_t* __restrict__ dist) {
  for (int64_t cm = 0; cm < CM; ++cm) {
    acc_t* out = dist + cm * kTile;
    std::fill(out, out + kTile, acc_t(0));
    const acc_t* r = modes + cm * D;
    for (int64_t d = 0; d < D; ++d) {
      const acc_t rd = r[d];
      const acc_t* row = tile + d * kTile;
      for (int64_t j = 0; j < kTile; ++j) {
        const acc_t t = row[j] - rd;
        out[j] += t * t;
      }
    }
  }
}

// Everything one sample's losses and their derivatives need.
template <typename acc_t>
struct SampleTerms {
  acc_t triplet, ce;
  int64_t negative;  // the nearest wrong class, -1 when C == 1
  bool hinge_active;
};

// From the tile distances of sample j: dmin[c], mstar[c], the posterior logits
// z[c] = s exp(-dmin[c] / (2 sigma^2)) and, as softmax, prob[c]; then Eq. 4, 5.
// NaN propagates as in the reference (kernels/nan_rules.h): the minima keep
// it, so does the hinge; with C = 1 the nearest wrong class is at +inf.
template <typename acc_t>
SampleTerms<acc_t> sample_terms(const acc_t* dist, int64_t j, int64_t C, int64_t M, int64_t y, const LossParams& p,
                                acc_t* dmin, uint8_t* mstar, acc_t* z, acc_t* prob) {
  const acc_t inv_two_var = p.inv_two_var<acc_t>();
  for (int64_t c = 0; c < C; ++c) {
    acc_t best = dist[(c * M) * kTile + j];
    uint8_t winner = 0;
    for (int64_t m = 1; m < M; ++m) {
      const acc_t v = dist[(c * M + m) * kTile + j];
      if (replaces_min(v, best)) {  // ties keep the lowest mode; NaN wins
        best = v;
        winner = static_cast<uint8_t>(m);
      }
    }
    dmin[c] = best;
    mstar[c] = winner;
  }
  SampleTerms<acc_t> t{acc_t(0), acc_t(0), -1, false};
  acc_t nearest_wrong = std::numeric_limits<acc_t>::infinity();
  for (int64_t c = 0; c < C; ++c) {
    if (c != y && replaces_min(dmin[c], nearest_wrong)) {
      nearest_wrong = dmin[c];
      t.negative = c;
    }
  }
  const acc_t hinge = dmin[y] - nearest_wrong + acc_t(p.alpha);
  t.hinge_active = hinge > acc_t(0);
  t.triplet = relu_keep_nan(hinge);
  acc_t z_max = -std::numeric_limits<acc_t>::infinity();
  for (int64_t c = 0; c < C; ++c) {
    z[c] = acc_t(p.scale) * std::exp(posterior_exponent(dmin[c], -inv_two_var));
    z_max = std::max(z_max, z[c]);
  }
  acc_t total = acc_t(0);
  for (int64_t c = 0; c < C; ++c) total += std::exp(z[c] - z_max);
  const acc_t log_sum = z_max + std::log(total);
  for (int64_t c = 0; c < C; ++c) prob[c] = std::exp(z[c] - log_sum);
  t.ce = log_sum - z[y];
  return t;
}

// Pixel of each sample of a tile, -1 when the sample does not count.
void tile_pixels(const int64_t* index, const int64_t* label, int64_t n, int64_t P, int64_t C, int64_t* pixel) {
  for (int64_t j = 0; j < n; ++j) {
    const bool valid = index[j] >= 0 && index[j] < P && label[j] >= 0 && label[j] < C;
    pixel[j] = valid ? index[j] : -1;
  }
}

template <typename scalar_t, typename acc_t>
void forward(const scalar_t* emb, PixelLayout L, const int64_t* index, const int64_t* label, const acc_t* modes,
             int64_t B, int64_t S, int64_t P, int64_t C, int64_t M, int64_t D, const LossParams& params,
             acc_t* triplet, acc_t* ce) {
  const int64_t tiles = (S + kTile - 1) / kTile;
  at::parallel_for(0, B * tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> tile(D * kTile), dist(C * M * kTile), dmin(C), z(C), prob(C);
    std::vector<uint8_t> mstar(C);
    int64_t pixel[kTile];
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / tiles, s0 = (t % tiles) * kTile, n = std::min(kTile, S - s0);
      const int64_t o = b * S + s0;
      tile_pixels(index + o, label + o, n, P, C, pixel);
      gather_tile(emb, L, b, pixel, n, D, tile.data());
      tile_distances(tile.data(), modes, C * M, D, dist.data());
      for (int64_t j = 0; j < n; ++j) {
        if (pixel[j] < 0) {
          triplet[o + j] = acc_t(0);
          ce[o + j] = acc_t(0);
          continue;
        }
        const auto terms = sample_terms(dist.data(), j, C, M, label[o + j], params, dmin.data(), mstar.data(),
                                        z.data(), prob.data());
        triplet[o + j] = terms.triplet;
        ce[o + j] = terms.ce;
      }
    }
  });
}

// Writes dL/de of every sample into sample_grad (B*S, D) and the chunk's
// partial dL/dR (C, M, D) into partial (B * chunks, C, M, D), either optional.
template <typename scalar_t, typename acc_t>
void backward(const acc_t* grad_triplet, const acc_t* grad_ce, const scalar_t* emb, PixelLayout L,
              const int64_t* index, const int64_t* label, const acc_t* modes, int64_t B, int64_t S, int64_t P,
              int64_t C, int64_t M, int64_t D, const LossParams& params, acc_t* sample_grad, acc_t* partial) {
  const int64_t chunks = (S + kChunk - 1) / kChunk;
  const acc_t inv_two_var = params.inv_two_var<acc_t>();
  at::parallel_for(0, B * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> tile(D * kTile), dist(C * M * kTile), dmin(C), z(C), prob(C), g(C), e(D);
    std::vector<uint8_t> mstar(C);
    int64_t pixel[kTile];
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / chunks;
      const int64_t chunk_end = std::min(S, (t % chunks + 1) * kChunk);
      acc_t* part = partial == nullptr ? nullptr : partial + t * C * M * D;
      for (int64_t s0 = (t % chunks) * kChunk; s0 < chunk_end; s0 += kTile) {
        const int64_t n = std::min(kTile, chunk_end - s0), o = b * S + s0;
        tile_pixels(index + o, label + o, n, P, C, pixel);
        gather_tile(emb, L, b, pixel, n, D, tile.data());
        tile_distances(tile.data(), modes, C * M, D, dist.data());
        for (int64_t j = 0; j < n; ++j) {
          acc_t* ge = sample_grad == nullptr ? nullptr : sample_grad + (o + j) * D;
          if (ge != nullptr) std::fill(ge, ge + D, acc_t(0));
          if (pixel[j] < 0) continue;
          const int64_t y = label[o + j];
          const auto terms = sample_terms(dist.data(), j, C, M, y, params, dmin.data(), mstar.data(), z.data(),
                                          prob.data());
          // dL/ddmin[c]: Eq. 5 through z[c] (dz/ddmin = -z / (2 sigma^2)), Eq. 4 through the hinge.
          const acc_t gce = grad_ce[o + j], gtri = grad_triplet[o + j];
          for (int64_t c = 0; c < C; ++c) g[c] = -gce * (prob[c] - acc_t(c == y)) * z[c] * inv_two_var;
          if (terms.hinge_active) {
            g[y] += gtri;
            g[terms.negative] -= gtri;
          }
          for (int64_t d = 0; d < D; ++d) e[d] = tile[d * kTile + j];
          for (int64_t c = 0; c < C; ++c) {
            if (g[c] == acc_t(0)) continue;
            const int64_t centre = c * M + mstar[c];
            const acc_t* r = modes + centre * D;
            const acc_t two_g = acc_t(2) * g[c];
            if (ge != nullptr)
              for (int64_t d = 0; d < D; ++d) ge[d] += two_g * (e[d] - r[d]);
            if (part != nullptr) {
              acc_t* pr = part + centre * D;
              for (int64_t d = 0; d < D; ++d) pr[d] += two_g * (r[d] - e[d]);
            }
          }
        }
      }
    }
  });
}

LossParams params_of(double sigma, double alpha, double scale) {
  check_loss_params(sigma, alpha, scale);
  return LossParams{sigma, alpha, scale};
}

std::tuple<at::Tensor, at::Tensor> mmdl_losses_cpu(const at::Tensor& emb, const at::Tensor& index_in,
                                                   const at::Tensor& label_in, const at::Tensor& modes_in,
                                                   double sigma, double alpha, double scale) {
  const LossParams params = params_of(sigma, alpha, scale);
  const SampleProblem p = sample_problem("mmdl_losses", emb, index_in, label_in, modes_in);
  const at::Tensor &bdp = p.bdp, &modes = p.modes, &index = p.index, &label = p.label;
  const auto acc_dtype = p.acc_dtype;
  const int64_t B = p.B, S = p.S, P = p.P, C = p.C, M = p.M, D = p.D;
  at::Tensor triplet = at::empty({B, S}, emb.options().dtype(acc_dtype));
  at::Tensor ce = at::empty({B, S}, triplet.options());
  if (triplet.numel() == 0) return {triplet, ce};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, emb.scalar_type(), "mmdl_losses_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    forward<scalar_t, acc_t>(bdp.const_data_ptr<scalar_t>(), layout_of(bdp), index.const_data_ptr<int64_t>(),
                             label.const_data_ptr<int64_t>(), modes.const_data_ptr<acc_t>(), B, S, P, C, M, D, params,
                             triplet.mutable_data_ptr<acc_t>(), ce.mutable_data_ptr<acc_t>());
  });
  return {triplet, ce};
}

std::tuple<at::Tensor, at::Tensor> mmdl_losses_backward_cpu(
    const at::Tensor& grad_triplet_in, const at::Tensor& grad_ce_in, const at::Tensor& emb,
    const at::Tensor& index_in, const at::Tensor& label_in, const at::Tensor& modes_in, double sigma, double alpha,
    double scale, bool emb_requires_grad, bool modes_requires_grad) {
  const LossParams params = params_of(sigma, alpha, scale);
  const SampleProblem p = sample_problem("mmdl_losses_backward", emb, index_in, label_in, modes_in);
  const at::Tensor &bdp = p.bdp, &modes = p.modes, &index = p.index, &label = p.label;
  const auto acc_dtype = p.acc_dtype;
  const int64_t B = p.B, S = p.S, P = p.P, C = p.C, M = p.M, D = p.D;
  const at::Tensor grad_triplet = grad_triplet_in.to(acc_dtype).expand({B, S}).contiguous();
  const at::Tensor grad_ce = grad_ce_in.to(acc_dtype).expand({B, S}).contiguous();
  const int64_t chunks = (S + kChunk - 1) / kChunk;

  at::Tensor grad_emb = emb_requires_grad ? at::zeros_like(empty_like_pixel_viewable(emb)) : at::empty({0}, emb.options());
  at::Tensor sample_grad = at::empty(emb_requires_grad ? std::vector<int64_t>{B * S, D} : std::vector<int64_t>{0},
                                     modes.options());
  at::Tensor partial = at::zeros(modes_requires_grad ? std::vector<int64_t>{B * chunks, C, M, D}
                                                     : std::vector<int64_t>{0}, modes.options());
  if ((emb_requires_grad || modes_requires_grad) && B * S > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, emb.scalar_type(), "mmdl_losses_backward_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      backward<scalar_t, acc_t>(grad_triplet.const_data_ptr<acc_t>(), grad_ce.const_data_ptr<acc_t>(),
                                bdp.const_data_ptr<scalar_t>(), layout_of(bdp), index.const_data_ptr<int64_t>(),
                                label.const_data_ptr<int64_t>(), modes.const_data_ptr<acc_t>(), B, S, P, C, M, D,
                                params, emb_requires_grad ? sample_grad.mutable_data_ptr<acc_t>() : nullptr,
                                modes_requires_grad ? partial.mutable_data_ptr<acc_t>() : nullptr);
      if (emb_requires_grad) {
        // One image per task, samples in order: repeated pixels add up deterministically.
        at::Tensor grad_bdp = as_bdp(grad_emb);
        const PixelLayout G = layout_of(grad_bdp);
        scalar_t* out = grad_bdp.mutable_data_ptr<scalar_t>();
        const acc_t* rows = sample_grad.const_data_ptr<acc_t>();
        const int64_t* idx = index.const_data_ptr<int64_t>();
        const int64_t* lab = label.const_data_ptr<int64_t>();
        at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
          for (int64_t b = begin; b < end; ++b) {
            for (int64_t s = 0; s < S; ++s) {
              const int64_t o = b * S + s, p = idx[o];
              if (p < 0 || p >= P || lab[o] < 0 || lab[o] >= C) continue;
              for (int64_t d = 0; d < D; ++d) {
                scalar_t& dst = out[G.offset(b, d, p)];
                dst = static_cast<scalar_t>(static_cast<acc_t>(dst) + rows[o * D + d]);
              }
            }
          }
        });
      }
    });
  }
  at::Tensor grad_modes = modes_requires_grad ? sum_chunks_in_order(partial, 1.0).to(modes_in.scalar_type()) : at::empty({0}, modes_in.options());
  return {grad_emb, grad_modes};
}

// label_mode (used by Eq. 6): for each sample, the nearest mode of its own class,
// mstar[y] = argmin_m ||e - r[y, m]||^2 (ties: lowest m); 255 for samples that do not count.
constexpr int64_t kLabelModeGrain = 256;

template <typename scalar_t, typename acc_t>
void label_mode_kernel(const scalar_t* emb, PixelLayout L, const int64_t* index, const int64_t* label,
                       const acc_t* modes, int64_t B, int64_t S, int64_t P, int64_t C, int64_t M, int64_t D,
                       uint8_t* mode) {
  at::parallel_for(0, B * S, kLabelModeGrain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> e(D);
    for (int64_t o = begin; o < end; ++o) {
      const int64_t b = o / S, p = index[o], y = label[o];
      if (p < 0 || p >= P || y < 0 || y >= C) {
        mode[o] = 255;
        continue;
      }
      for (int64_t d = 0; d < D; ++d) e[d] = static_cast<acc_t>(emb[L.offset(b, d, p)]);
      acc_t best = acc_t(0);
      uint8_t winner = 0;
      for (int64_t m = 0; m < M; ++m) {
        const acc_t* r = modes + (y * M + m) * D;
        acc_t dist = acc_t(0);
        for (int64_t d = 0; d < D; ++d) {
          const acc_t t = e[d] - r[d];
          dist += t * t;
        }
        if (m == 0 || replaces_min(dist, best)) {  // ties keep the lowest mode; NaN wins
          best = dist;
          winner = static_cast<uint8_t>(m);
        }
      }
      mode[o] = winner;
    }
  });
}

at::Tensor label_mode_cpu(const at::Tensor& emb, const at::Tensor& index_in, const at::Tensor& label_in,
                          const at::Tensor& modes_in) {
  const SampleProblem p = sample_problem("label_mode", emb, index_in, label_in, modes_in);
  const at::Tensor &bdp = p.bdp, &modes = p.modes, &index = p.index, &label = p.label;
  const int64_t B = p.B, S = p.S;
  at::Tensor mode = at::empty({B, S}, index.options().dtype(at::kByte));
  if (mode.numel() == 0) return mode;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, emb.scalar_type(), "label_mode_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    label_mode_kernel<scalar_t, acc_t>(bdp.const_data_ptr<scalar_t>(), layout_of(bdp), index.const_data_ptr<int64_t>(),
                                       label.const_data_ptr<int64_t>(), modes.const_data_ptr<acc_t>(), B, S,
                                       bdp.size(2), modes.size(0), modes.size(1), modes.size(2),
                                       mode.mutable_data_ptr<uint8_t>());
  });
  return mode;
}

}  // namespace

TORCH_LIBRARY_IMPL(drsl_fast, CPU, m) {
  m.impl("mmdl_losses", &mmdl_losses_cpu);
  m.impl("mmdl_losses_backward", &mmdl_losses_backward_cpu);
  m.impl("label_mode", &label_mode_cpu);
}

}  // namespace drsl_fast
