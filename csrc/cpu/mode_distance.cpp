// C++ CPU backend of the mode-distance op (docs/method.md §3); see
// the top of csrc/cuda/mode_distance.cu for the formulas. The forward takes
// pixels in tiles of kTile, converted once to the accumulation type, and
// computes every squared distance of the tile at once from the expansion
// ||e - r||^2 = ||e||^2 - 2 e.r + ||r||^2: the products e.r of all C*M modes
// form one small matrix product, run by a register-blocked kernel over the
// [D][kTile] tile and the modes packed in panels. Minima too close to the
// cancellation of that expansion are recomputed directly (kTrustRatio). The
// backward transposes each tile to pixel-major in registers and adds each
// class's winning-mode term to a block of channels of a pixel held in
// registers. The hot loops are built for AVX-512, AVX2+FMA and the baseline
// instruction set (multiversion.h); the forward's product runs on 64-byte
// vectors in the AVX-512 build.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
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
// The forward's register block (mode_panels.h) has pixels as its lanes.
// The expanded distance is trusted when dmin >= kTrustRatio * (||e||^2 +
// max_m ||r[c, m]||^2). Its rounding error is at most about
// 2 (D + 1) u (||e||^2 + ||r||^2) (u the unit roundoff; of order sqrt(D) u
// in practice), so then at most 4 (D + 1) u dmin: 1.6e-5 relative for fp32
// at D = 64 in the worst case, about 1e-6 in practice, and the winner is a
// minimiser to that precision. Anything closer (cancellation: e near a mode,
// e == r), and any non-finite value, is recomputed as sum_d (e_d - r_d)^2
// over the class's modes.
constexpr double kTrustRatio = 0.5;
// Pixels per partial sum of the mode gradient. Fixed (not tied to the thread
// count), so the summation order, and the result, never change.
constexpr int64_t kModeGradChunk = 4096;

// Vectors (vec.h): the forward's product runs on the widest vectors of each
// build, everything else on 32-byte ones.
// The winning mode of each lane, as the integer vectors comparisons give.
template <typename acc_t> using ModeIndex = std::conditional_t<sizeof(acc_t) == 4, int32_t, int64_t>;
// The backward handles the channels in blocks of kGradBlockBytes; rows of its
// tiles are padded with zeros to a whole number of blocks.
constexpr int64_t kGradBlockBytes = 128;

// The modes R (C*M rows of D) laid out for the product e.r of §3's expansion
// ||e - r||^2 = ||e||^2 - 2 e.r + ||r||^2: panels (mode_panels.h), with
// ||r||^2 per mode and its maximum over each class's modes (NaN if any is NaN).
template <typename acc_t>
struct PackedModes {
  int64_t panels;
  std::vector<acc_t> panel, norm, class_max_norm;

  PackedModes(const acc_t* modes, int64_t C, int64_t M, int64_t D)
      : panels(panel_count(C * M)), panel(mode_panels(modes, C * M, D)), norm(panels * kBlockModes, acc_t(0)),
        class_max_norm(C) {
    for (int64_t k = 0; k < C * M; ++k) {
      acc_t sum = acc_t(0);
      for (int64_t d = 0; d < D; ++d) sum += modes[k * D + d] * modes[k * D + d];
      norm[k] = sum;
      if (k % M == 0 || replaces_max(sum, class_max_norm[k / M])) class_max_norm[k / M] = sum;
    }
  }
};

// One tile of the forward on a [D][kTile] tile of pixels: their squared norms
// (norm_e, kTile), the expanded distances ||e||^2 + ||r||^2 - 2 e.r of every
// (mode, pixel) into dist ([panels * kBlockModes][kTile]), and per class the
// smallest of them and its mode (best, winner: [C][kTile]; ties keep the
// lowest mode, NaN wins). Where that minimum is not trusted (kTrustRatio
// against ||e||^2 + class_max_norm[c], or anything non-finite) the winner is
// -1; returns whether there is any. The product runs on vectors of
// kProductBytes, the rest on 32-byte ones. Always inlined, so that each build
// (multiversion.h) compiles its own copy.
template <int64_t kProductBytes, typename acc_t>
DRSL_ALWAYS_INLINE bool forward_tile_impl(const acc_t* __restrict__ tile, int64_t D, const acc_t* __restrict__ panel,
                                          const acc_t* __restrict__ norm_r, int64_t panels, int64_t C, int64_t M,
                                          const acc_t* __restrict__ class_max_norm, acc_t* __restrict__ norm_e,
                                          acc_t* __restrict__ dist, acc_t* __restrict__ best,
                                          ModeIndex<acc_t>* __restrict__ winner) {
  using V = typename VecOf<acc_t>::type;
  using Mask = decltype(V{} < V{});
  constexpr int64_t W = kWidth<acc_t>;
  using ProductV = typename VecOf<acc_t, kProductBytes>::type;
  constexpr int64_t kProductW = kWidth<acc_t, kProductBytes>;
  constexpr int64_t kPixels = kBlockVecs * kProductW;
  static_assert(kTile % kPixels == 0, "tile must hold whole register blocks");
  for (int64_t j0 = 0; j0 < kTile; j0 += W) {
    V sum = {};
    for (int64_t d = 0; d < D; ++d) {
      const V e = load_vec<V>(tile + d * kTile + j0);
      sum += e * e;
    }
    store_vec(norm_e + j0, sum);
  }
  for (int64_t j0 = 0; j0 < kTile; j0 += kPixels) {
    ProductV ne[kBlockVecs];
    for (int64_t i = 0; i < kBlockVecs; ++i) ne[i] = load_vec<ProductV>(norm_e + j0 + i * kProductW);
    for (int64_t q = 0; q < panels; ++q) {
      ProductV acc[kBlockVecs][kBlockModes] = {};
      accumulate_panel(tile, kTile, j0, D, panel + q * D * kBlockModes, acc,
                       [](ProductV& a, const ProductV& e, acc_t rk) { a += rk * e; });
#pragma GCC unroll 8
      for (int64_t k = 0; k < kBlockModes; ++k) {
        const acc_t nr = norm_r[q * kBlockModes + k];
#pragma GCC unroll 4
        for (int64_t i = 0; i < kBlockVecs; ++i) {
          const ProductV expanded = (ne[i] + nr) - (acc[i][k] + acc[i][k]);
          store_vec(dist + (q * kBlockModes + k) * kTile + j0 + i * kProductW, expanded);
        }
      }
    }
  }
  const acc_t trust = static_cast<acc_t>(kTrustRatio);
  const acc_t largest = std::numeric_limits<acc_t>::max();
  Mask untrusted = {};
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t j0 = 0; j0 < kTile; j0 += W) {
      V low = load_vec<V>(dist + c * M * kTile + j0);
      Mask mode = {};
      for (int64_t m = 1; m < M; ++m) {
        const V candidate = load_vec<V>(dist + (c * M + m) * kTile + j0);
        // replaces_min of kernels/nan_rules.h, lane by lane
        const Mask take = (candidate < low) | ((candidate != candidate) & (low == low));
        low = take ? candidate : low;
        mode = take ? (Mask{} + static_cast<ModeIndex<acc_t>>(m)) : mode;
      }
      const V bound = load_vec<V>(norm_e + j0) + class_max_norm[c];
      const Mask check = ~((bound <= largest) & (low >= trust * bound));
      untrusted |= check;
      store_vec(best + c * kTile + j0, low);
      store_vec(winner + c * kTile + j0, check ? (Mask{} - 1) : mode);
    }
  }
  bool any = false;
  for (int64_t i = 0; i < W; ++i) any |= untrusted[i] != 0;
  return any;
}

// Interleavings of two vectors' low halves and high halves, lane by lane:
// the steps of an in-register transpose.
template <typename acc_t> struct Zip;
typedef int32_t int32_vec __attribute__((vector_size(32)));
typedef int64_t int64_vec __attribute__((vector_size(32)));
template <> struct Zip<float> {
  static constexpr int32_vec low = {0, 8, 1, 9, 2, 10, 3, 11}, high = {4, 12, 5, 13, 6, 14, 7, 15};
};
template <> struct Zip<double> {
  static constexpr int64_vec low = {0, 4, 1, 5}, high = {2, 6, 3, 7};
};

// out[j][i] = in[i][j] for i < rows, j < cols (cols a multiple of the vector
// width; rows and strides in elements), by blocks of W x W held in registers:
// log2(W) rounds of zipping row i with row i + W/2 leave the columns in order.
template <typename acc_t>
DRSL_ALWAYS_INLINE void transpose_impl(const acc_t* __restrict__ in, int64_t in_stride, int64_t rows, int64_t cols,
                                       acc_t* __restrict__ out, int64_t out_stride) {
  using V = typename VecOf<acc_t>::type;
  constexpr int64_t W = kWidth<acc_t>;
  const int64_t full = rows / W * W;
  for (int64_t i0 = 0; i0 < full; i0 += W) {
    for (int64_t j0 = 0; j0 < cols; j0 += W) {
      V v[W], zipped[W];
#pragma GCC unroll 8
      for (int64_t i = 0; i < W; ++i) v[i] = load_vec<V>(in + (i0 + i) * in_stride + j0);
#pragma GCC unroll 3
      for (int64_t round = 1; round < W; round *= 2) {
#pragma GCC unroll 4
        for (int64_t i = 0; i < W / 2; ++i) {
          zipped[2 * i] = __builtin_shuffle(v[i], v[i + W / 2], Zip<acc_t>::low);
          zipped[2 * i + 1] = __builtin_shuffle(v[i], v[i + W / 2], Zip<acc_t>::high);
        }
#pragma GCC unroll 8
        for (int64_t i = 0; i < W; ++i) v[i] = zipped[i];
      }
#pragma GCC unroll 8
      for (int64_t j = 0; j < W; ++j) store_vec(out + (j0 + j) * out_stride + i0, v[j]);
    }
  }
  for (int64_t i = full; i < rows; ++i) {
    for (int64_t j = 0; j < cols; ++j) out[j * out_stride + i] = in[i * in_stride + j];
  }
}

// The nonzero terms of one tile's gradient, per pixel j of the tile and in
// class order: count[j] pairs at [j * C, j * C + count[j]) of the dmin
// gradient g and `row`, the offset of the class's winning mode in the
// padded modes ([C*M][Dp]). Gathered once per tile from the class-major
// gradient and mstar, so the backward's loop over blocks of channels reads
// them contiguously.
template <typename acc_t>
struct TileTerms {
  std::vector<acc_t> g;
  std::vector<int32_t> row, count;
  explicit TileTerms(int64_t C) : g(kTile * C), row(kTile * C), count(kTile) {}
};

// Fills `terms` for pixels [0, n) of a tile (grad and mstar of class c, pixel
// j at [c * class_stride + j * pixel_stride]). A zero gradient adds nothing,
// even against a non-finite distance, and is left out. Returns false if an
// mstar is not a mode index (>= M): then the terms must not be used.
template <typename acc_t>
bool gather_terms(const acc_t* __restrict__ grad, const uint8_t* __restrict__ mstar, int64_t class_stride,
                  int64_t pixel_stride, int64_t n, int64_t C, int64_t M, int64_t Dp, TileTerms<acc_t>& terms) {
  std::fill(terms.count.begin(), terms.count.begin() + n, 0);
  bool valid = true;
  for (int64_t c = 0; c < C; ++c) {
    const acc_t* gc = grad + c * class_stride;
    const uint8_t* mc = mstar + c * class_stride;
    for (int64_t j = 0; j < n; ++j) {  // without branches: gradients are often sparse
      const acc_t g = gc[j * pixel_stride];
      const int64_t mode = mc[j * pixel_stride];
      const int64_t t = j * C + terms.count[j];
      valid &= mode < M;
      terms.g[t] = g;
      terms.row[t] = static_cast<int32_t>((c * M + mode) * Dp);
      terms.count[j] += g != acc_t(0);
    }
  }
  return valid;
}

// Backward over one tile of n pixels ([n][Dp] in `tile`, Dp a multiple of
// kGradBlockBytes / sizeof(acc_t)) from its terms (gather_terms): adds
// 2 sum_c g (e - r[c, mstar]) to grad_tile ([n][Dp]) if kEmb and
// g (r[c, mstar] - e) to the chunk's partial mode gradient ([C*M][Dp]) if
// kModes. Each block of channels of a pixel is accumulated in registers over
// the classes.
template <bool kEmb, bool kModes, typename acc_t>
DRSL_ALWAYS_INLINE void backward_tile_impl(const acc_t* __restrict__ tile, int64_t n, int64_t Dp, int64_t C,
                                           const acc_t* __restrict__ g, const int32_t* __restrict__ row,
                                           const int32_t* __restrict__ count, const acc_t* __restrict__ modes,
                                           acc_t* __restrict__ grad_tile, acc_t* __restrict__ partial) {
  using V = typename VecOf<acc_t>::type;
  constexpr int64_t W = kWidth<acc_t>;
  constexpr int64_t kGradVecs = kGradBlockBytes / sizeof(V);
  for (int64_t j = 0; j < n; ++j) {
    const acc_t* gj = g + j * C;
    const int32_t* rj = row + j * C;
    const int64_t terms = count[j];
    for (int64_t d0 = 0; d0 < Dp; d0 += kGradVecs * W) {
      V e[kGradVecs], acc[kGradVecs] = {};
#pragma GCC unroll 4
      for (int64_t i = 0; i < kGradVecs; ++i) e[i] = load_vec<V>(tile + j * Dp + d0 + i * W);
      for (int64_t t = 0; t < terms; ++t) {
        const acc_t gt = gj[t];
        const acc_t* r = modes + rj[t] + d0;
        acc_t* pr = partial + rj[t] + d0;
#pragma GCC unroll 4
        for (int64_t i = 0; i < kGradVecs; ++i) {
          const V step = gt * (e[i] - load_vec<V>(r + i * W));
          if (kEmb) acc[i] += step;
          if (kModes) store_vec(pr + i * W, load_vec<V>(pr + i * W) - step);
        }
      }
      if (kEmb) {
#pragma GCC unroll 4
        for (int64_t i = 0; i < kGradVecs; ++i) store_vec(grad_tile + j * Dp + d0 + i * W, acc[i] + acc[i]);
      }
    }
  }
}

// The hot loops above, built for each instruction set (multiversion.h).
#define DRSL_HOT_LOOPS(build, target, bytes)                                                                        \
  template <typename acc_t>                                                                                         \
  target bool forward_tile_##build(const acc_t* tile, int64_t D, const acc_t* panel, const acc_t* norm_r,           \
                                   int64_t panels, int64_t C, int64_t M, const acc_t* class_max_norm,               \
                                   acc_t* norm_e, acc_t* dist, acc_t* best, ModeIndex<acc_t>* winner) {             \
    return forward_tile_impl<bytes>(tile, D, panel, norm_r, panels, C, M, class_max_norm, norm_e, dist, best,       \
                                    winner);                                                                        \
  }                                                                                                                 \
  template <typename acc_t>                                                                                         \
  target void transpose_##build(const acc_t* in, int64_t in_stride, int64_t rows, int64_t cols, acc_t* out,         \
                                int64_t out_stride) {                                                               \
    transpose_impl(in, in_stride, rows, cols, out, out_stride);                                                     \
  }                                                                                                                 \
  template <typename acc_t>                                                                                         \
  target void backward_tile_##build(const acc_t* tile, int64_t n, int64_t Dp, int64_t C, const acc_t* g,            \
                                    const int32_t* row, const int32_t* count, const acc_t* modes,                   \
                                    acc_t* grad_tile, acc_t* partial) {                                             \
    if (grad_tile != nullptr && partial != nullptr)                                                                 \
      backward_tile_impl<true, true>(tile, n, Dp, C, g, row, count, modes, grad_tile, partial);                     \
    else if (grad_tile != nullptr)                                                                                  \
      backward_tile_impl<true, false>(tile, n, Dp, C, g, row, count, modes, grad_tile, partial);                    \
    else                                                                                                            \
      backward_tile_impl<false, true>(tile, n, Dp, C, g, row, count, modes, grad_tile, partial);                    \
  }
DRSL_FOR_EACH_CPU_BUILD(DRSL_HOT_LOOPS)
#undef DRSL_HOT_LOOPS

// The builds of the hot loops for the instruction set of this call (read once).
template <typename acc_t>
struct HotLoops {
  CpuBuild build = cpu_build();
  decltype(&forward_tile_baseline<acc_t>) forward_tile =
      for_cpu_build(&forward_tile_avx512<acc_t>, &forward_tile_avx2<acc_t>, &forward_tile_baseline<acc_t>, build);
  decltype(&transpose_baseline<acc_t>) transpose =
      for_cpu_build(&transpose_avx512<acc_t>, &transpose_avx2<acc_t>, &transpose_baseline<acc_t>, build);
  decltype(&backward_tile_baseline<acc_t>) backward_tile =
      for_cpu_build(&backward_tile_avx512<acc_t>, &backward_tile_avx2<acc_t>, &backward_tile_baseline<acc_t>, build);
};

// Requests the cache lines of the next tile of a per-pixel row whose pixels
// are contiguous: row is at pixel p0 of a row of P pixels. The hardware
// prefetcher does not follow the D (or C) rows a tile reads at once.
template <typename T>
inline void prefetch_next_tile(const T* row, int64_t pixel_stride, int64_t p0, int64_t P) {
  if (pixel_stride != 1) return;
  const int64_t count = std::min(kTile, P - p0 - kTile);
  for (int64_t j = 0; j < count; j += 64 / static_cast<int64_t>(sizeof(T))) __builtin_prefetch(row + kTile + j);
}

// Pixels [p0, p0 + n) of image b (of P pixels) as a [D][kTile] tile, zero padded.
template <typename scalar_t, typename acc_t>
void load_channel_major(const scalar_t* emb, PixelLayout L, int64_t b, int64_t p0, int64_t n, int64_t P, int64_t D,
                        acc_t* tile) {
  for (int64_t d = 0; d < D; ++d) {
    const scalar_t* src = emb + L.offset(b, d, p0);
    prefetch_next_tile(src, L.pixel, p0, P);
    acc_t* dst = tile + d * kTile;
    if (L.pixel == 1) {  // a separate loop, so that it vectorises
      for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<acc_t>(src[j]);
    } else {
      for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<acc_t>(src[j * L.pixel]);
    }
    std::fill(dst + n, dst + kTile, acc_t(0));
  }
}

// min_m ||e - r[c, m]||^2 and its mode from the direct formula, for pixel j
// of a [D][kTile] tile: the fallback where the expansion is not trusted.
template <typename acc_t>
std::pair<acc_t, int64_t> direct_min(const acc_t* tile, int64_t j, const acc_t* class_modes, int64_t M, int64_t D) {
  acc_t low = acc_t(0);
  int64_t mode = 0;
  for (int64_t m = 0; m < M; ++m) {
    acc_t sum = acc_t(0);
    for (int64_t d = 0; d < D; ++d) {
      const acc_t t = tile[d * kTile + j] - class_modes[m * D + d];
      sum += t * t;
    }
    if (m == 0 || replaces_min(sum, low)) {  // ties keep the lowest mode; NaN wins
      low = sum;
      mode = m;
    }
  }
  return {low, mode};
}

// One class's row of results for n pixels: dmin, mstar and (if not null) the
// posterior, pixel_stride apart.
template <typename acc_t>
void write_outputs(const acc_t* __restrict__ low, const ModeIndex<acc_t>* __restrict__ mode, int64_t n,
                   int64_t pixel_stride, acc_t* __restrict__ dmin, uint8_t* __restrict__ mstar,
                   acc_t* __restrict__ posterior, acc_t posterior_scale) {
  if (pixel_stride == 1) {
    std::copy(low, low + n, dmin);
    for (int64_t j = 0; j < n; ++j) mstar[j] = static_cast<uint8_t>(mode[j]);
  } else {
    for (int64_t j = 0; j < n; ++j) {
      dmin[j * pixel_stride] = low[j];
      mstar[j * pixel_stride] = static_cast<uint8_t>(mode[j]);
    }
  }
  if (posterior != nullptr) {
    for (int64_t j = 0; j < n; ++j) {
      posterior[j * pixel_stride] = std::exp(posterior_exponent(low[j], posterior_scale));
    }
  }
}

// docs/method.md §3 forward. Per tile of pixels: the expanded distances of all
// C*M modes as one product and their minimum per class (forward_tile), the
// untrusted minima recomputed directly, then the outputs.
template <typename scalar_t, typename acc_t>
void forward(const scalar_t* emb, PixelLayout emb_layout, const acc_t* modes, int64_t C, int64_t M, int64_t D,
             int64_t B, int64_t P, acc_t* dmin, uint8_t* mstar, acc_t* posterior, acc_t posterior_scale,
             PixelLayout out_layout) {
  const PackedModes<acc_t> packed(modes, C, M, D);
  const HotLoops<acc_t> loops;
  const int64_t tiles = (P + kTile - 1) / kTile;
  at::parallel_for(0, B * tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> tile(D * kTile), norm_e(kTile), dist(packed.panels * kBlockModes * kTile), best(C * kTile);
    std::vector<ModeIndex<acc_t>> winner(C * kTile);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / tiles;
      const int64_t p0 = (t % tiles) * kTile;
      const int64_t n = std::min(kTile, P - p0);
      load_channel_major(emb, emb_layout, b, p0, n, P, D, tile.data());
      const bool recompute = loops.forward_tile(tile.data(), D, packed.panel.data(), packed.norm.data(), packed.panels,
                                                C, M, packed.class_max_norm.data(), norm_e.data(), dist.data(),
                                                best.data(), winner.data());
      for (int64_t c = 0; c < C; ++c) {
        for (int64_t j = 0; recompute && j < n; ++j) {
          if (winner[c * kTile + j] < 0) {
            const auto [low, mode] = direct_min(tile.data(), j, modes + c * M * D, M, D);
            best[c * kTile + j] = low;
            winner[c * kTile + j] = static_cast<ModeIndex<acc_t>>(mode);
          }
        }
        const int64_t o = out_layout.offset(b, c, p0);
        write_outputs(best.data() + c * kTile, winner.data() + c * kTile, n, out_layout.pixel, dmin + o, mstar + o,
                      posterior == nullptr ? nullptr : posterior + o, posterior_scale);
      }
    }
  });
}

// The channel rows of pixels [p0, p0 + n) of image b, for a transpose to
// read in place, or null where they must be copied first (not acc_t, pixels
// not contiguous, or a partial tile).
template <typename acc_t, typename scalar_t>
const acc_t* direct_rows(const scalar_t* x, PixelLayout L, int64_t b, int64_t p0, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (L.pixel == 1 && n == kTile) return x + L.offset(b, 0, p0);
  }
  return nullptr;
}

// The embedding gradient grad ([D][kTile]) of pixels [p0, p0 + n) of image b.
template <typename scalar_t, typename acc_t>
void store_grad(const acc_t* __restrict__ grad, int64_t n, int64_t D, PixelLayout L, int64_t b, int64_t p0,
                scalar_t* __restrict__ grad_emb) {
  for (int64_t d = 0; d < D; ++d) {
    scalar_t* dst = grad_emb + L.offset(b, d, p0);
    const acc_t* src = grad + d * kTile;
    if (L.pixel == 1) {  // a separate loop, so that it vectorises
      for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<scalar_t>(src[j]);
    } else {
      for (int64_t j = 0; j < n; ++j) dst[j * L.pixel] = static_cast<scalar_t>(src[j]);
    }
  }
}

// grad_emb (optional) and per-chunk partial mode gradients (optional, without
// the factor 2), in one pass over the pixels: each tile is read channel-major,
// transposed in registers to pixel-major with the channels padded to whole
// register blocks, and its gradient transposed back. Whole tiles of acc_t
// embeddings with contiguous pixels are transposed straight from the tensor,
// the others from a channel-major copy. (Transposing the gradient straight
// into the tensor was slower: its 32-byte pieces of rows a power of two
// apart.)
template <typename scalar_t, typename acc_t>
void backward(const acc_t* grad_dmin, const uint8_t* mstar, PixelLayout out_layout, const scalar_t* emb,
              PixelLayout emb_layout, const acc_t* modes, int64_t C, int64_t M, int64_t D, int64_t B, int64_t P,
              scalar_t* grad_emb, PixelLayout grad_layout, acc_t* partial) {
  constexpr int64_t block = kGradBlockBytes / sizeof(acc_t);
  const HotLoops<acc_t> loops;
  const int64_t Dp = (D + block - 1) / block * block;
  TORCH_CHECK(C * M * Dp <= std::numeric_limits<int32_t>::max(),
              "mode_distance_backward: C * M * D too large for the CPU backend");
  std::vector<acc_t> padded_modes(C * M * Dp, acc_t(0));
  for (int64_t k = 0; k < C * M; ++k) std::copy(modes + k * D, modes + (k + 1) * D, padded_modes.begin() + k * Dp);
  const int64_t chunks = (P + kModeGradChunk - 1) / kModeGradChunk;
  std::atomic<bool> invalid_mstar{false};
  at::parallel_for(0, B * chunks, 1, [&](int64_t begin, int64_t end) {
    // channel_major: [Dp][kTile], the embeddings as read, then their gradient to write
    std::vector<acc_t> channel_major(Dp * kTile), tile(kTile * Dp, acc_t(0)), grad_tile(kTile * Dp), part(C * M * Dp);
    TileTerms<acc_t> terms(C);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / chunks;
      const int64_t chunk_begin = (t % chunks) * kModeGradChunk;
      const int64_t chunk_end = std::min(P, chunk_begin + kModeGradChunk);
      std::fill(part.begin(), part.end(), acc_t(0));
      for (int64_t p0 = chunk_begin; p0 < chunk_end; p0 += kTile) {
        const int64_t n = std::min(kTile, chunk_end - p0);
        if (const acc_t* rows = direct_rows<acc_t>(emb, emb_layout, b, p0, n)) {
          for (int64_t d = 0; d < D; ++d) prefetch_next_tile(rows + d * emb_layout.channel, 1, p0, P);
          loops.transpose(rows, emb_layout.channel, D, kTile, tile.data(), Dp);
        } else {
          load_channel_major(emb, emb_layout, b, p0, n, P, D, channel_major.data());
          loops.transpose(channel_major.data(), kTile, D, kTile, tile.data(), Dp);
        }
        const int64_t o = out_layout.offset(b, 0, p0);
        for (int64_t c = 0; c < C; ++c) {
          prefetch_next_tile(grad_dmin + o + c * out_layout.channel, out_layout.pixel, p0, P);
          prefetch_next_tile(mstar + o + c * out_layout.channel, out_layout.pixel, p0, P);
        }
        if (!gather_terms(grad_dmin + o, mstar + o, out_layout.channel, out_layout.pixel, n, C, M, Dp, terms)) {
          invalid_mstar = true;
          return;
        }
        loops.backward_tile(tile.data(), n, Dp, C, terms.g.data(), terms.row.data(), terms.count.data(),
                            padded_modes.data(), grad_emb == nullptr ? nullptr : grad_tile.data(),
                            partial == nullptr ? nullptr : part.data());
        if (grad_emb != nullptr) {
          loops.transpose(grad_tile.data(), Dp, kTile, Dp, channel_major.data(), kTile);
          store_grad(channel_major.data(), n, D, grad_layout, b, p0, grad_emb);
        }
      }
      if (partial != nullptr) {
        acc_t* dst = partial + t * C * M * D;
        for (int64_t k = 0; k < C * M; ++k) std::copy(part.begin() + k * Dp, part.begin() + k * Dp + D, dst + k * D);
      }
    }
  });
  TORCH_CHECK(!invalid_mstar, "mode_distance_backward: mstar holds a mode index >= M = ", M);
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
  at::Tensor partial = modes_requires_grad ? at::empty({B * chunks, C, M, D}, modes.options())
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
