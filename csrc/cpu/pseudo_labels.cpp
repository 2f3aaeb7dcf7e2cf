// C++ CPU backend of the class-balanced pseudo-label ops (docs/method.md §5):
// the confidence histogram (bins in kernels/confidence_bins.h) and the label
// selection. Pixels are processed in tiles; the per-class loops run over
// contiguous tile memory so the compiler vectorises them. Histograms are
// counted per fixed chunk of tiles and summed: integer counts, exact.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../../kernels/nan_rules.h"
#include "../host.h"
#include "multiversion.h"

namespace drsl_fast {
namespace {

constexpr int64_t kTile = 256;

// best[j], cls[j] = row[j], c where row[j] replaces best[j] as a maximum
// (ties keep the lowest class; the first NaN wins, as in torch.max); built
// for each instruction set (multiversion.h).
DRSL_ALWAYS_INLINE void keep_larger_impl(const float* __restrict__ row, int32_t c, int64_t n, float* __restrict__ best,
                                         int32_t* __restrict__ cls) {
  for (int64_t j = 0; j < n; ++j) {
    const bool better = replaces_max(row[j], best[j]);
    best[j] = better ? row[j] : best[j];
    cls[j] = better ? c : cls[j];
  }
}
#define DRSL_KEEP_LARGER(build, target, bytes)                                                         \
  target void keep_larger_##build(const float* row, int32_t c, int64_t n, float* best, int32_t* cls) { \
    keep_larger_impl(row, c, n, best, cls);                                                            \
  }
DRSL_FOR_EACH_CPU_BUILD(DRSL_KEEP_LARGER)
#undef DRSL_KEEP_LARGER
using KeepLarger = decltype(&keep_larger_baseline);

// Loads channel c of pixels [p0, p0 + n) of image b as fp32.
template <typename scalar_t>
inline void load_channel(const scalar_t* x, PixelLayout L, int64_t b, int64_t c, int64_t p0, int64_t n, float* dst) {
  const scalar_t* src = x + L.offset(b, c, p0);
  if (L.pixel == 1) {  // contiguous (B, C, H, W): a unit-stride loop the compiler vectorises
    for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<float>(src[j]);
  } else {
    for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<float>(src[j * L.pixel]);
  }
}

// For kTile pixels: best value and its class (first maximum), and, for
// logits, the confidence 1 / sum_c exp(l_c - best) written over `best`.
template <typename scalar_t>
void tile_argmax(const scalar_t* x, PixelLayout L, int64_t b, int64_t C, int64_t p0, int64_t n, bool from_logits,
                 KeepLarger keep_larger, float* row, float* best, int32_t* cls, float* sum) {
  load_channel(x, L, b, 0, p0, n, best);
  std::fill(cls, cls + n, 0);
  for (int64_t c = 1; c < C; ++c) {
    load_channel(x, L, b, c, p0, n, row);
    keep_larger(row, static_cast<int32_t>(c), n, best, cls);
  }
  if (!from_logits) return;
  std::fill(sum, sum + n, 0.0f);
  for (int64_t c = 0; c < C; ++c) {
    load_channel(x, L, b, c, p0, n, row);
    for (int64_t j = 0; j < n; ++j) sum[j] += std::exp(row[j] - best[j]);
  }
  for (int64_t j = 0; j < n; ++j) best[j] = 1.0f / sum[j];
}

}  // namespace

at::Tensor confidence_histogram_cpu(const at::Tensor& scores, bool from_logits, int64_t mantissa_bits) {
  check_histogram_inputs(scores, mantissa_bits);
  const int bits = static_cast<int>(mantissa_bits);
  const int64_t C = scores.size(1), nbins = confidence_num_bins(bits);
  const at::Tensor bcp = as_bdp(scores);
  const int64_t B = bcp.size(0), P = bcp.size(2);
  const int64_t tiles_per_image = (P + kTile - 1) / kTile, tiles = B * tiles_per_image;
  // A fixed number of chunks, each with its own histogram.
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(tiles, at::get_num_threads()));
  at::Tensor partial = at::zeros({chunks, C, nbins}, scores.options().dtype(at::kLong));
  if (tiles > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "confidence_histogram_cpu", [&] {
      const scalar_t* x = bcp.const_data_ptr<scalar_t>();
      const PixelLayout L = layout_of(bcp);
      int64_t* counts = partial.mutable_data_ptr<int64_t>();
      const KeepLarger keep_larger = for_cpu_build(&keep_larger_avx512, &keep_larger_avx2, &keep_larger_baseline);
      at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
        std::vector<float> row(kTile), best(kTile), sum(kTile);
        std::vector<int32_t> cls(kTile);
        for (int64_t chunk = begin; chunk < end; ++chunk) {
          int64_t* hist = counts + chunk * C * nbins;
          for (int64_t t = chunk * tiles / chunks; t < (chunk + 1) * tiles / chunks; ++t) {
            const int64_t b = t / tiles_per_image, p0 = (t % tiles_per_image) * kTile;
            const int64_t n = std::min(kTile, P - p0);
            tile_argmax(x, L, b, C, p0, n, from_logits, keep_larger, row.data(), best.data(), cls.data(), sum.data());
            for (int64_t j = 0; j < n; ++j) ++hist[cls[j] * nbins + confidence_bin(best[j], bits)];
          }
        }
      });
    });
  }
  return chunks == 1 ? partial[0] : partial.sum(0);
}

at::Tensor select_labels_cpu(const at::Tensor& probs, const at::Tensor& thresholds_in) {
  const at::Tensor thresholds = checked_thresholds(probs, thresholds_in);
  const at::Tensor bcp = as_bdp(probs);
  const int64_t B = bcp.size(0), C = bcp.size(1), P = bcp.size(2);
  at::Tensor labels = empty_labels(probs);
  const int64_t tiles_per_image = (P + kTile - 1) / kTile;
  if (labels.numel() == 0) return labels;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, probs.scalar_type(), "select_labels_cpu", [&] {
    const scalar_t* x = bcp.const_data_ptr<scalar_t>();
    const PixelLayout L = layout_of(bcp);
    const float* t = thresholds.const_data_ptr<float>();
    uint8_t* out = labels.mutable_data_ptr<uint8_t>();
    at::parallel_for(0, B * tiles_per_image, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> row(kTile), best(kTile);
      std::vector<int32_t> cls(kTile);
      for (int64_t tile = begin; tile < end; ++tile) {
        const int64_t b = tile / tiles_per_image, p0 = (tile % tiles_per_image) * kTile;
        const int64_t n = std::min(kTile, P - p0);
        for (int64_t c = 0; c < C; ++c) {
          load_channel(x, L, b, c, p0, n, row.data());
          const float tc = t[c];
          for (int64_t j = 0; j < n; ++j) {
            const float ratio = row[j] / tc;
            // ties keep the lowest class; the first NaN wins
            const bool better = c == 0 || replaces_max(ratio, best[j]);
            best[j] = better ? ratio : best[j];
            cls[j] = better ? static_cast<int32_t>(c) : cls[j];
          }
        }
        uint8_t* dst = out + b * P + p0;
        // 255 where the largest ratio is below 1 or NaN
        for (int64_t j = 0; j < n; ++j) dst[j] = best[j] >= 1.0f ? static_cast<uint8_t>(cls[j]) : uint8_t(255);
      }
    });
  });
  return labels;
}

TORCH_LIBRARY_IMPL(drsl_fast, CPU, m) {
  m.impl("confidence_histogram", &confidence_histogram_cpu);
  m.impl("select_labels", &select_labels_cpu);
}

}  // namespace drsl_fast
