// C++ CPU backend of the fused MMDL losses (docs/method.md §4 Eq. 4 and 5); the
// formulas are atop csrc/cuda/mmdl_losses.cu. Counted samples (the others,
// such as the -1 padding of classes with fewer than k pixels, are skipped) are
// gathered from the embeddings in place, kTile at a time, into a [D][kTile]
// tile; all C*M squared distances of the tile are computed with the samples as
// the vectorised inner axis. Backward recomputes the distances (nothing of size
// samples x C is kept between the passes), writes one gradient row per sample
// and per-chunk partial mode gradients, then adds them up in a fixed order
// (deterministic). Also
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
#include "../host.h"
#include "../../kernels/nan_rules.h"

namespace drsl_fast {
namespace {

constexpr int64_t kTile = 64;
// Samples per partial mode gradient: fixed, so the summation order is too.
constexpr int64_t kChunk = 1024;
// Samples per task of the forward (no sum across samples there).
constexpr int64_t kForwardChunk = 256;

struct LossParams {
  double sigma, alpha, scale;

  // 1 / (2 sigma^2) in the accumulation type (+inf where it overflows).
  template <typename acc_t>
  acc_t inv_two_var() const {
    return -posterior_scale<acc_t>(sigma);
  }
};

// The pointers and sizes of a SampleProblem, typed for the loops below.
template <typename scalar_t, typename acc_t>
struct Samples {
  const scalar_t* emb;
  PixelLayout L;
  const int64_t *index, *label;
  const acc_t* modes;
  int64_t B, S, P, C, M, D;

  explicit Samples(const SampleProblem& p)
      : emb(p.bdp.const_data_ptr<scalar_t>()), L(layout_of(p.bdp)), index(p.index.const_data_ptr<int64_t>()),
        label(p.label.const_data_ptr<int64_t>()), modes(p.modes.const_data_ptr<acc_t>()), B(p.B), S(p.S), P(p.P),
        C(p.C), M(p.M), D(p.D) {}

  // Whether flat sample o counts: its pixel in [0, P) and its label in [0, C).
  bool counts(int64_t o) const { return index[o] >= 0 && index[o] < P && label[o] >= 0 && label[o] < C; }
};

// The embeddings at the n pixels of image b as a [D][kTile] tile; the padding
// up to kTile reads as 0.
template <typename scalar_t, typename acc_t>
void gather_tile(const scalar_t* emb, PixelLayout L, int64_t b, const int64_t* pixel, int64_t n, int64_t D,
                 acc_t* tile) {
  for (int64_t d = 0; d < D; ++d) {
    acc_t* row = tile + d * kTile;
    for (int64_t j = 0; j < n; ++j) row[j] = static_cast<acc_t>(emb[L.offset(b, d, pixel[j])]);
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

// The next (at most kTile) counted samples from flat sample `next` on, before
// `last`, in order: their flat ids (slot) and pixels; moves `next` past them.
// Tiles hold counted samples only: the -1 padding of classes with fewer than
// k pixels (most of the slots on small maps) costs no distance computation.
template <typename scalar_t, typename acc_t>
int64_t next_counted(const Samples<scalar_t, acc_t>& s, int64_t& next, int64_t last, int64_t* slot, int64_t* pixel) {
  int64_t n = 0;
  for (; next < last && n < kTile; ++next) {
    if (s.counts(next)) {
      slot[n] = next;
      pixel[n] = s.index[next];
      ++n;
    }
  }
  return n;
}

template <typename scalar_t, typename acc_t>
void forward(const Samples<scalar_t, acc_t>& s, const LossParams& params, acc_t* triplet, acc_t* ce, bool* counted) {
  const int64_t C = s.C, M = s.M, D = s.D, chunks = (s.S + kForwardChunk - 1) / kForwardChunk;
  at::parallel_for(0, s.B * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> tile(D * kTile), dist(C * M * kTile), dmin(C), z(C), prob(C);
    std::vector<uint8_t> mstar(C);
    int64_t slot[kTile], pixel[kTile];
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / chunks, first = b * s.S + (t % chunks) * kForwardChunk;
      const int64_t last = b * s.S + std::min(s.S, (t % chunks + 1) * kForwardChunk);
      std::fill(triplet + first, triplet + last, acc_t(0));  // samples that do not count: 0
      std::fill(ce + first, ce + last, acc_t(0));
      std::fill(counted + first, counted + last, false);
      for (int64_t next = first, n; (n = next_counted(s, next, last, slot, pixel)) > 0;) {
        gather_tile(s.emb, s.L, b, pixel, n, D, tile.data());
        tile_distances(tile.data(), s.modes, C * M, D, dist.data());
        for (int64_t j = 0; j < n; ++j) {
          const auto terms = sample_terms(dist.data(), j, C, M, s.label[slot[j]], params, dmin.data(), mstar.data(),
                                          z.data(), prob.data());
          triplet[slot[j]] = terms.triplet;
          ce[slot[j]] = terms.ce;
          counted[slot[j]] = true;
        }
      }
    }
  });
}

// Writes dL/de of every sample into sample_grad (B*S, D) and the chunk's
// partial dL/dR (C, M, D) into partial (B * chunks, C, M, D), either optional.
template <typename scalar_t, typename acc_t>
void backward(const Samples<scalar_t, acc_t>& s, const LossParams& params, const acc_t* grad_triplet,
              const acc_t* grad_ce, acc_t* sample_grad, acc_t* partial) {
  const int64_t C = s.C, M = s.M, D = s.D, chunks = (s.S + kChunk - 1) / kChunk;
  const acc_t inv_two_var = params.inv_two_var<acc_t>();
  at::parallel_for(0, s.B * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> tile(D * kTile), dist(C * M * kTile), dmin(C), z(C), prob(C), g(C), e(D);
    std::vector<uint8_t> mstar(C);
    int64_t slot[kTile], pixel[kTile];
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / chunks;
      const int64_t first = b * s.S + (t % chunks) * kChunk, last = b * s.S + std::min(s.S, (t % chunks + 1) * kChunk);
      acc_t* part = partial == nullptr ? nullptr : partial + t * C * M * D;
      // counted samples only, in order (the rows of the others are never read)
      for (int64_t next = first, n; (n = next_counted(s, next, last, slot, pixel)) > 0;) {
        gather_tile(s.emb, s.L, b, pixel, n, D, tile.data());
        tile_distances(tile.data(), s.modes, C * M, D, dist.data());
        for (int64_t j = 0; j < n; ++j) {
          const int64_t o = slot[j];
          acc_t* ge = sample_grad == nullptr ? nullptr : sample_grad + o * D;
          if (ge != nullptr) std::fill(ge, ge + D, acc_t(0));
          const int64_t y = s.label[o];
          const auto terms = sample_terms(dist.data(), j, C, M, y, params, dmin.data(), mstar.data(), z.data(),
                                          prob.data());
          // dL/ddmin[c]: Eq. 5 through z[c] (dz/ddmin = -z / (2 sigma^2)), Eq. 4 through the hinge.
          const acc_t gce = grad_ce[o], gtri = grad_triplet[o];
          for (int64_t c = 0; c < C; ++c) g[c] = -gce * (prob[c] - acc_t(c == y)) * z[c] * inv_two_var;
          if (terms.hinge_active) {
            g[y] += gtri;
            g[terms.negative] -= gtri;
          }
          for (int64_t d = 0; d < D; ++d) e[d] = tile[d * kTile + j];
          for (int64_t c = 0; c < C; ++c) {
            if (g[c] == acc_t(0)) continue;
            const int64_t centre = c * M + mstar[c];
            const acc_t* r = s.modes + centre * D;
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

// Adds the gradient row of every counted sample into grad_bdp at its pixel.
// One image per task, samples in order: repeated pixels add up deterministically.
template <typename scalar_t, typename acc_t>
void scatter_rows(const Samples<scalar_t, acc_t>& s, const acc_t* rows, at::Tensor& grad_bdp) {
  const PixelLayout G = layout_of(grad_bdp);
  scalar_t* out = grad_bdp.mutable_data_ptr<scalar_t>();
  at::parallel_for(0, s.B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      for (int64_t o = b * s.S; o < (b + 1) * s.S; ++o) {
        if (!s.counts(o)) continue;
        for (int64_t d = 0; d < s.D; ++d) {
          scalar_t& dst = out[G.offset(b, d, s.index[o])];
          dst = static_cast<scalar_t>(static_cast<acc_t>(dst) + rows[o * s.D + d]);
        }
      }
    }
  });
}

// label_mode (used by Eq. 6): for each sample, the nearest mode of its own class,
// mstar[y] = argmin_m ||e - r[y, m]||^2 (ties: lowest m); 255 for samples that do not count.
constexpr int64_t kLabelModeGrain = 256;

template <typename scalar_t, typename acc_t>
void label_modes(const Samples<scalar_t, acc_t>& s, uint8_t* mode) {
  at::parallel_for(0, s.B * s.S, kLabelModeGrain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> e(s.D);
    for (int64_t o = begin; o < end; ++o) {
      if (!s.counts(o)) {
        mode[o] = 255;
        continue;
      }
      const int64_t y = s.label[o];
      for (int64_t d = 0; d < s.D; ++d) e[d] = static_cast<acc_t>(s.emb[s.L.offset(o / s.S, d, s.index[o])]);
      acc_t best = acc_t(0);
      uint8_t winner = 0;
      for (int64_t m = 0; m < s.M; ++m) {
        const acc_t* r = s.modes + (y * s.M + m) * s.D;
        acc_t dist = acc_t(0);
        for (int64_t d = 0; d < s.D; ++d) {
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

LossParams params_of(double sigma, double alpha, double scale) {
  check_loss_params(sigma, alpha, scale);
  return LossParams{sigma, alpha, scale};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> mmdl_losses_cpu(const at::Tensor& emb, const at::Tensor& index,
                                                               const at::Tensor& label, const at::Tensor& modes,
                                                               double sigma, double alpha, double scale, bool mean) {
  const LossParams params = params_of(sigma, alpha, scale);
  const SampleProblem p = sample_problem("mmdl_losses", emb, index, label, modes);
  at::Tensor triplet = p.per_sample(emb), ce = p.per_sample(emb), counted = p.flags();
  if (triplet.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, emb.scalar_type(), "mmdl_losses_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      forward(Samples<scalar_t, acc_t>(p), params, triplet.mutable_data_ptr<acc_t>(), ce.mutable_data_ptr<acc_t>(),
              counted.mutable_data_ptr<bool>());
    });
  }
  auto [mean_triplet, mean_ce, count] =
      flagged_means(mean ? triplet : at::Tensor(), mean ? ce : at::Tensor(), counted);
  if (!mean) return {triplet, ce, count};
  return {mean_triplet, mean_ce, count};
}

std::tuple<at::Tensor, at::Tensor> mmdl_losses_backward_cpu(
    const at::Tensor& grad_triplet_in, const at::Tensor& grad_ce_in, const at::Tensor& emb, const at::Tensor& index,
    const at::Tensor& label, const at::Tensor& modes_in, double sigma, double alpha, double scale,
    bool emb_requires_grad, bool modes_requires_grad) {
  const LossParams params = params_of(sigma, alpha, scale);
  const SampleProblem p = sample_problem("mmdl_losses_backward", emb, index, label, modes_in);
  const at::Tensor grad_triplet = grad_triplet_in.to(p.acc_dtype).expand({p.B, p.S}).contiguous();
  const at::Tensor grad_ce = grad_ce_in.to(p.acc_dtype).expand({p.B, p.S}).contiguous();
  const int64_t chunks = (p.S + kChunk - 1) / kChunk;
  const auto options = p.modes.options();
  at::Tensor grad_emb = emb_requires_grad ? empty_like_pixel_viewable(emb).zero_() : at::empty({0}, emb.options());
  at::Tensor sample_grad = at::empty({emb_requires_grad ? p.B * p.S : 0, p.D}, options);
  at::Tensor partial = at::zeros({modes_requires_grad ? p.B * chunks : 0, p.C, p.M, p.D}, options);
  if ((emb_requires_grad || modes_requires_grad) && p.B * p.S > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, emb.scalar_type(), "mmdl_losses_backward_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const Samples<scalar_t, acc_t> samples(p);
      backward(samples, params, grad_triplet.const_data_ptr<acc_t>(), grad_ce.const_data_ptr<acc_t>(),
               emb_requires_grad ? sample_grad.mutable_data_ptr<acc_t>() : nullptr,
               modes_requires_grad ? partial.mutable_data_ptr<acc_t>() : nullptr);
      if (emb_requires_grad) {
        at::Tensor grad_bdp = as_bdp(grad_emb);
        scatter_rows(samples, sample_grad.const_data_ptr<acc_t>(), grad_bdp);
      }
    });
  }
  at::Tensor grad_modes = modes_requires_grad ? sum_chunks_in_order(partial, 1.0).to(modes_in.scalar_type())
                                              : at::empty({0}, modes_in.options());
  return {grad_emb, grad_modes};
}

at::Tensor label_mode_cpu(const at::Tensor& emb, const at::Tensor& index, const at::Tensor& label,
                          const at::Tensor& modes) {
  const SampleProblem p = sample_problem("label_mode", emb, index, label, modes);
  at::Tensor mode = at::empty({p.B, p.S}, p.index.options().dtype(at::kByte));
  if (mode.numel() == 0) return mode;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, emb.scalar_type(), "label_mode_cpu", [&] {
    label_modes(Samples<scalar_t, at::opmath_type<scalar_t>>(p), mode.mutable_data_ptr<uint8_t>());
  });
  return mode;
}

TORCH_LIBRARY_IMPL(drsl_fast, CPU, m) {
  m.impl("mmdl_losses", &mmdl_losses_cpu);
  m.impl("mmdl_losses_backward", &mmdl_losses_backward_cpu);
  m.impl("label_mode", &label_mode_cpu);
}

}  // namespace drsl_fast
