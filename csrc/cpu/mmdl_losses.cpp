// C++ CPU backend of the fused MMDL losses (docs/method.md §4 Eq. 4 and 5); the
// formulas are atop csrc/cuda/mmdl_losses.cu. The counted samples of each
// image (the others, such as the -1 padding of classes with fewer than k
// pixels, are skipped without a read) are listed once, in order, and their
// embeddings gathered once, channel by channel (a channel-major map is read a
// plane at a time, so each plane's lines are fetched once for all samples),
// into a [D][samples] matrix; then kTile samples at a time, all C*M squared
// distances by a register-blocked loop whose vector lanes are samples, built
// for each instruction set (multiversion.h).
// Backward recomputes the distances (nothing of size samples x C is kept
// between the passes), writes one gradient row per counted sample and a
// partial mode gradient per chunk of kChunk counted samples, then adds the
// rows into the gradient map (each element's terms in sample order) and the
// partials in chunk order: deterministic, whatever the thread count. Also
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
#include "mode_panels.h"
#include "multiversion.h"
#include "vec.h"
#include "../host.h"
#include "../../kernels/nan_rules.h"

namespace drsl_fast {
namespace {

constexpr int64_t kTile = 64;
// The distances' register block (mode_panels.h) has samples as its lanes.
static_assert(kTile % (kBlockVecs * kWidth<float, 64>) == 0, "a run's tile is whole blocks at every width");
// Counted samples per partial mode gradient: fixed, so the summation order is too.
constexpr int64_t kChunk = 1024;

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

// Consecutive counted samples of one image: positions [begin, end) of the list.
struct Run {
  int64_t begin, end;
};

// The flat ids of the counted samples, image by image in order, and the
// image's runs of at most `size` of them (the last run of an image may be
// shorter): the units of work, fixed by the samples alone.
struct CountedSamples {
  std::vector<int64_t> slot;
  std::vector<int64_t> first;  // image b's samples are slot[first[b]:first[b + 1]]

  template <typename scalar_t, typename acc_t>
  explicit CountedSamples(const Samples<scalar_t, acc_t>& s) : first{0} {
    for (int64_t b = 0; b < s.B; ++b) {
      for (int64_t o = b * s.S; o < (b + 1) * s.S; ++o)
        if (s.counts(o)) slot.push_back(o);
      first.push_back(static_cast<int64_t>(slot.size()));
    }
  }

  std::vector<Run> runs(int64_t size) const {
    std::vector<Run> out;
    for (int64_t b = 0; b + 1 < static_cast<int64_t>(first.size()); ++b)
      for (int64_t k = first[b]; k < first[b + 1]; k += size) out.push_back({k, std::min(k + size, first[b + 1])});
    return out;
  }
};

// The embeddings of the counted samples (list order) as [D][ld] in the
// accumulation dtype; ld leaves kTile zeros after each channel's values, so
// that a block of lanes may read past the last sample (at most a block, which
// kTile holds). A channel-major map is read a plane at a time, other layouts
// a sample's row at a time.
template <typename acc_t>
struct GatheredSamples {
  int64_t ld;
  std::vector<acc_t> values;

  template <typename scalar_t>
  GatheredSamples(const Samples<scalar_t, acc_t>& s, const CountedSamples& list)
      : ld(static_cast<int64_t>(list.slot.size()) + kTile), values(s.D * ld) {
    const int64_t n = ld - kTile;
    std::vector<int64_t> start(n);  // where each sample's row starts
    for (int64_t b = 0; b < s.B; ++b)
      for (int64_t k = list.first[b]; k < list.first[b + 1]; ++k) start[k] = s.L.offset(b, 0, s.index[list.slot[k]]);
    if (s.L.pixel == 1) {
      at::parallel_for(0, s.D, 1, [&](int64_t d0, int64_t d1) {
        for (int64_t d = d0; d < d1; ++d)
          for (int64_t k = 0; k < n; ++k) values[d * ld + k] = static_cast<acc_t>(s.emb[start[k] + d * s.L.channel]);
      });
    } else {
      at::parallel_for(0, n, kTile, [&](int64_t k0, int64_t k1) {
        for (int64_t k = k0; k < k1; ++k)
          for (int64_t d = 0; d < s.D; ++d) values[d * ld + k] = static_cast<acc_t>(s.emb[start[k] + d * s.L.channel]);
      });
    }
  }
};

// dist[k][j] = sum_d (tile[d * ld + j] - R[k][d])^2 for the modes k of the
// panels (mode_panels) and the samples j < n, rounded up to a whole block of
// lanes ([panels * kBlockModes][kTile]); channels in order, on vectors of kBytes.
template <int64_t kBytes, typename acc_t>
DRSL_ALWAYS_INLINE void tile_distances_impl(const acc_t* __restrict__ tile, int64_t ld, int64_t n, int64_t D,
                                            const acc_t* __restrict__ panel, int64_t panels,
                                            acc_t* __restrict__ dist) {
  using V = typename VecOf<acc_t, kBytes>::type;
  constexpr int64_t W = kWidth<acc_t, kBytes>;
  for (int64_t j0 = 0; j0 < n; j0 += kBlockVecs * W) {
    for (int64_t q = 0; q < panels; ++q) {
      V acc[kBlockVecs][kBlockModes] = {};
      accumulate_panel(tile, ld, j0, D, panel + q * D * kBlockModes, acc, [](V& a, const V& x, acc_t rk) {
        const V t = x - rk;
        a += t * t;
      });
#pragma GCC unroll 6
      for (int64_t k = 0; k < kBlockModes; ++k)
#pragma GCC unroll 2
        for (int64_t i = 0; i < kBlockVecs; ++i) store_vec(dist + (q * kBlockModes + k) * kTile + j0 + i * W, acc[i][k]);
    }
  }
}

// One sample's gradient terms: for each class c with g[c] != 0 and its
// winning mode r = R[c, mstar[c]], ge += 2 g[c] (e - r) (ge may be null)
// and part[c, mstar[c]] += 2 g[c] (r - e) (part may be null).
template <typename acc_t>
DRSL_ALWAYS_INLINE void sample_gradient_impl(const acc_t* __restrict__ e, const acc_t* __restrict__ g,
                                             const uint8_t* __restrict__ mstar, const acc_t* __restrict__ modes,
                                             int64_t C, int64_t M, int64_t D, acc_t* __restrict__ ge,
                                             acc_t* __restrict__ part) {
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

// argmin_m sum_d (e[d] - r[m][d])^2 over the M rows of class_modes (ties:
// the lowest m; NaN wins). Each sum runs on 32-byte vectors whatever the
// build, so the AVX2 and AVX-512 builds agree: two accumulators (lane i of
// accumulator a sums the channels d = 2 W k + a W + i in order), added, then
// their lanes in pairs, then the channels past the last whole pair of vectors.
template <typename acc_t>
DRSL_ALWAYS_INLINE uint8_t nearest_mode_impl(const acc_t* __restrict__ e, const acc_t* __restrict__ class_modes,
                                             int64_t M, int64_t D) {
  using V = typename VecOf<acc_t>::type;
  constexpr int64_t W = kWidth<acc_t>;
  acc_t best = acc_t(0);
  uint8_t winner = 0;
  for (int64_t m = 0; m < M; ++m) {
    const acc_t* r = class_modes + m * D;
    V acc[2] = {};
    int64_t d = 0;
    for (; d + 2 * W <= D; d += 2 * W) {
#pragma GCC unroll 2
      for (int64_t a = 0; a < 2; ++a) {
        const V t = load_vec<V>(e + d + a * W) - load_vec<V>(r + d + a * W);
        acc[a] += t * t;
      }
    }
    V lanes = acc[0] + acc[1];
    for (int64_t half = W / 2; half >= 1; half /= 2)
      for (int64_t i = 0; i < half; ++i) lanes[i] += lanes[i + half];
    acc_t dist = lanes[0];
    for (; d < D; ++d) {
      const acc_t t = e[d] - r[d];
      dist += t * t;
    }
    if (m == 0 || replaces_min(dist, best)) {
      best = dist;
      winner = static_cast<uint8_t>(m);
    }
  }
  return winner;
}

// The loops above, built for each instruction set (multiversion.h).
#define DRSL_HOT_LOOPS(build, target, bytes)                                                                         \
  template <typename acc_t>                                                                                          \
  target void tile_distances_##build(const acc_t* tile, int64_t ld, int64_t n, int64_t D, const acc_t* panel,       \
                                     int64_t panels, acc_t* dist) {                                                  \
    tile_distances_impl<bytes>(tile, ld, n, D, panel, panels, dist);                                                 \
  }                                                                                                                  \
  template <typename acc_t>                                                                                          \
  target void sample_gradient_##build(const acc_t* e, const acc_t* g, const uint8_t* mstar, const acc_t* modes,      \
                                      int64_t C, int64_t M, int64_t D, acc_t* ge, acc_t* part) {                     \
    sample_gradient_impl(e, g, mstar, modes, C, M, D, ge, part);                                                     \
  }                                                                                                                  \
  template <typename acc_t>                                                                                          \
  target uint8_t nearest_mode_##build(const acc_t* e, const acc_t* class_modes, int64_t M, int64_t D) {              \
    return nearest_mode_impl(e, class_modes, M, D);                                                                  \
  }
DRSL_FOR_EACH_CPU_BUILD(DRSL_HOT_LOOPS)
#undef DRSL_HOT_LOOPS

// The builds of the loops for the instruction set of this call (read once).
template <typename acc_t>
struct HotLoops {
  CpuBuild build = cpu_build();
  decltype(&tile_distances_baseline<acc_t>) tile_distances =
      for_cpu_build(&tile_distances_avx512<acc_t>, &tile_distances_avx2<acc_t>, &tile_distances_baseline<acc_t>, build);
  decltype(&sample_gradient_baseline<acc_t>) sample_gradient = for_cpu_build(
      &sample_gradient_avx512<acc_t>, &sample_gradient_avx2<acc_t>, &sample_gradient_baseline<acc_t>, build);
  decltype(&nearest_mode_baseline<acc_t>) nearest_mode = for_cpu_build(
      &nearest_mode_avx512<acc_t>, &nearest_mode_avx2<acc_t>, &nearest_mode_baseline<acc_t>, build);
};

// The distances of kTile samples to every mode: the per-thread buffers of both passes.
template <typename acc_t>
struct TileDistances {
  std::vector<acc_t> panel, dist;
  int64_t panels, D;

  TileDistances(const acc_t* modes, int64_t C, int64_t M, int64_t D)
      : panel(mode_panels(modes, C * M, D)), dist(panel_count(C * M) * kBlockModes * kTile),
        panels(panel_count(C * M)), D(D) {}

  // The distances of the samples [k, k + n) of the list (n <= kTile).
  void compute(const GatheredSamples<acc_t>& samples, const HotLoops<acc_t>& loops, int64_t k, int64_t n) {
    loops.tile_distances(samples.values.data() + k, samples.ld, n, D, panel.data(), panels, dist.data());
  }
};

// exp(x), where x lies below every value whose exp rounds to a nonzero number
// straight to 0: the same result, without libm's underflow path (about ten
// times the cost of an exp, and taken for most classes of a sample far from
// their modes).
template <typename acc_t>
inline acc_t exp_or_zero(acc_t x) {
  constexpr acc_t kZeroBelow = sizeof(acc_t) == 4 ? acc_t(-110) : acc_t(-760);
  return x < kZeroBelow ? acc_t(0) : std::exp(x);
}

// Everything one sample's losses and their derivatives need.
template <typename acc_t>
struct SampleTerms {
  acc_t triplet, ce;
  int64_t negative;  // the nearest wrong class, -1 when C == 1
  bool hinge_active;
};

// From the tile distances of sample j: dmin[c], mstar[c], the posterior logits
// z[c] = s exp(-dmin[c] / (2 sigma^2)) and their softmax prob[c] (unless
// prob is null); then Eq. 4, 5. NaN propagates as in the reference
// (kernels/nan_rules.h): the minima keep it, so does the hinge; with C = 1
// the nearest wrong class is at +inf.
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
    z[c] = acc_t(p.scale) * exp_or_zero(posterior_exponent(dmin[c], -inv_two_var));
    z_max = std::max(z_max, z[c]);
  }
  // softmax as exp(z - z_max) / sum; the classes far from every mode have
  // z = 0 exactly and share one exp
  const acc_t at_zero = std::exp(-z_max);
  acc_t total = acc_t(0);
  for (int64_t c = 0; c < C; ++c) {
    const acc_t ez = z[c] == acc_t(0) ? at_zero : std::exp(z[c] - z_max);
    total += ez;
    if (prob != nullptr) prob[c] = ez;
  }
  if (prob != nullptr)
    for (int64_t c = 0; c < C; ++c) prob[c] /= total;
  t.ce = z_max + std::log(total) - z[y];
  return t;
}

template <typename scalar_t, typename acc_t>
void forward(const Samples<scalar_t, acc_t>& s, const LossParams& params, acc_t* triplet, acc_t* ce, bool* counted) {
  const CountedSamples list(s);
  const std::vector<Run> runs = list.runs(kTile);
  const GatheredSamples<acc_t> gathered(s, list);
  const HotLoops<acc_t> loops;
  std::fill(triplet, triplet + s.B * s.S, acc_t(0));  // samples that do not count: 0
  std::fill(ce, ce + s.B * s.S, acc_t(0));
  std::fill(counted, counted + s.B * s.S, false);
  at::parallel_for(0, static_cast<int64_t>(runs.size()), 1, [&](int64_t begin, int64_t end) {
    TileDistances<acc_t> work(s.modes, s.C, s.M, s.D);
    std::vector<acc_t> dmin(s.C), z(s.C);
    std::vector<uint8_t> mstar(s.C);
    for (int64_t t = begin; t < end; ++t) {
      const Run& run = runs[t];
      const int64_t* slot = list.slot.data() + run.begin;
      const int64_t n = run.end - run.begin;
      work.compute(gathered, loops, run.begin, n);
      for (int64_t j = 0; j < n; ++j) {
        const auto terms = sample_terms(work.dist.data(), j, s.C, s.M, s.label[slot[j]], params, dmin.data(),
                                        mstar.data(), z.data(), static_cast<acc_t*>(nullptr));
        triplet[slot[j]] = terms.triplet;
        ce[slot[j]] = terms.ce;
        counted[slot[j]] = true;
      }
    }
  });
}

// Adds the gradient row of every counted sample (rows: one per sample of the
// list, in its order) into grad_bdp at its pixel, each element's terms in
// sample order (deterministic). Channel-major maps one (image, channel) plane
// per task, where a plane's reads and writes stay in the cache; otherwise one
// image per task, a sample's row at a time.
template <typename scalar_t, typename acc_t>
void scatter_rows(const Samples<scalar_t, acc_t>& s, const CountedSamples& list, const acc_t* rows,
                  at::Tensor& grad_bdp) {
  const PixelLayout G = layout_of(grad_bdp);
  scalar_t* out = grad_bdp.mutable_data_ptr<scalar_t>();
  const auto add = [&](int64_t b, int64_t k, int64_t d) {
    scalar_t& dst = out[G.offset(b, d, s.index[list.slot[k]])];
    dst = static_cast<scalar_t>(static_cast<acc_t>(dst) + rows[k * s.D + d]);
  };
  if (G.pixel == 1) {
    at::parallel_for(0, s.B * s.D, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t)
        for (int64_t k = list.first[t / s.D]; k < list.first[t / s.D + 1]; ++k) add(t / s.D, k, t % s.D);
    });
  } else {
    at::parallel_for(0, s.B, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b)
        for (int64_t k = list.first[b]; k < list.first[b + 1]; ++k)
          for (int64_t d = 0; d < s.D; ++d) add(b, k, d);
    });
  }
}

// Writes dL/de of every counted sample into rows (one per sample of the
// list) and scatters them into grad_bdp (if defined); each chunk's partial
// dL/dR (C, M, D) into partial (chunks, C, M, D), if not null.
template <typename scalar_t, typename acc_t>
void backward(const Samples<scalar_t, acc_t>& s, const CountedSamples& list, const std::vector<Run>& chunks,
              const LossParams& params, const acc_t* grad_triplet, const acc_t* grad_ce, at::Tensor grad_bdp,
              acc_t* partial) {
  const int64_t C = s.C, M = s.M, D = s.D;
  const acc_t inv_two_var = params.inv_two_var<acc_t>();
  const GatheredSamples<acc_t> gathered(s, list);
  const HotLoops<acc_t> loops;
  std::vector<acc_t> rows(grad_bdp.defined() ? static_cast<int64_t>(list.slot.size()) * D : 0);
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t begin, int64_t end) {
    TileDistances<acc_t> work(s.modes, C, M, D);
    std::vector<acc_t> dmin(C), z(C), prob(C), g(C), e(D);
    std::vector<uint8_t> mstar(C);
    for (int64_t t = begin; t < end; ++t) {
      acc_t* part = partial == nullptr ? nullptr : partial + t * C * M * D;
      for (int64_t k0 = chunks[t].begin; k0 < chunks[t].end; k0 += kTile) {
        const int64_t* slot = list.slot.data() + k0;
        const int64_t n = std::min(kTile, chunks[t].end - k0);
        work.compute(gathered, loops, k0, n);
        for (int64_t j = 0; j < n; ++j) {
          const int64_t o = slot[j], y = s.label[o];
          acc_t* ge = rows.empty() ? nullptr : rows.data() + (k0 + j) * D;
          if (ge != nullptr) std::fill(ge, ge + D, acc_t(0));
          const auto terms = sample_terms(work.dist.data(), j, C, M, y, params, dmin.data(), mstar.data(), z.data(),
                                          prob.data());
          // dL/ddmin[c]: Eq. 5 through z[c] (dz/ddmin = -z / (2 sigma^2)), Eq. 4 through the hinge.
          const acc_t gce = grad_ce[o], gtri = grad_triplet[o];
          for (int64_t c = 0; c < C; ++c) g[c] = -gce * (prob[c] - acc_t(c == y)) * z[c] * inv_two_var;
          if (terms.hinge_active) {
            g[y] += gtri;
            g[terms.negative] -= gtri;
          }
          for (int64_t d = 0; d < D; ++d) e[d] = gathered.values[d * gathered.ld + k0 + j];
          loops.sample_gradient(e.data(), g.data(), mstar.data(), s.modes, C, M, D, ge, part);
        }
      }
    }
  });
  if (grad_bdp.defined()) scatter_rows(s, list, rows.data(), grad_bdp);
}

// label_mode (used by Eq. 6): for each sample, the nearest mode of its own class,
// mstar[y] = argmin_m ||e - r[y, m]||^2 (ties: lowest m); 255 for samples that do not count.
constexpr int64_t kLabelModeGrain = 256;

template <typename scalar_t, typename acc_t>
void label_modes(const Samples<scalar_t, acc_t>& s, uint8_t* mode) {
  const HotLoops<acc_t> loops;
  at::parallel_for(0, s.B * s.S, kLabelModeGrain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> rows(kTile * s.D);
    int64_t sample[kTile], start[kTile];
    for (int64_t o0 = begin; o0 < end; o0 += kTile) {
      int64_t n = 0;  // the counted samples of [o0, o0 + kTile) and where their rows start
      for (int64_t o = o0; o < std::min(o0 + kTile, end); ++o) {
        if (!s.counts(o)) {
          mode[o] = 255;
          continue;
        }
        sample[n] = o;
        start[n++] = s.L.offset(o / s.S, 0, s.index[o]);
      }
      // channel by channel, so that a channel-major map is read a plane at a time
      for (int64_t d = 0; d < s.D; ++d)
        for (int64_t j = 0; j < n; ++j) rows[j * s.D + d] = static_cast<acc_t>(s.emb[start[j] + d * s.L.channel]);
      for (int64_t j = 0; j < n; ++j)
        mode[sample[j]] = loops.nearest_mode(rows.data() + j * s.D, s.modes + s.label[sample[j]] * s.M * s.D, s.M, s.D);
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
  const auto options = p.modes.options();
  at::Tensor grad_emb = emb_requires_grad ? empty_like_pixel_viewable(emb).zero_() : at::empty({0}, emb.options());
  at::Tensor partial = at::empty({0, p.C, p.M, p.D}, options);
  if ((emb_requires_grad || modes_requires_grad) && p.B * p.S > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, emb.scalar_type(), "mmdl_losses_backward_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const Samples<scalar_t, acc_t> samples(p);
      const CountedSamples list(samples);
      const std::vector<Run> chunks = list.runs(kChunk);
      if (modes_requires_grad) partial = at::zeros({static_cast<int64_t>(chunks.size()), p.C, p.M, p.D}, options);
      backward(samples, list, chunks, params, grad_triplet.const_data_ptr<acc_t>(), grad_ce.const_data_ptr<acc_t>(),
               emb_requires_grad ? as_bdp(grad_emb) : at::Tensor(),
               modes_requires_grad ? partial.mutable_data_ptr<acc_t>() : nullptr);
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
