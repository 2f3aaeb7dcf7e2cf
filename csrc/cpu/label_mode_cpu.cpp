// C++ CPU backend of label_mode (SPEC.md §3, used by Eq. 6): for each sample,
// the nearest mode of its own class, mstar[y] = argmin_m ||e - r[y, m]||^2
// (ties: lowest m); 255 for samples that do not count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../drsl_losses.h"
#include "../../kernels/nan_rules.h"

namespace drsl_fast {
namespace {

constexpr int64_t kGrain = 256;

template <typename scalar_t, typename acc_t>
void label_mode_kernel(const scalar_t* emb, PixelLayout L, const int64_t* index, const int64_t* label,
                       const acc_t* modes, int64_t B, int64_t S, int64_t P, int64_t C, int64_t M, int64_t D,
                       uint8_t* mode) {
  at::parallel_for(0, B * S, kGrain, [&](int64_t begin, int64_t end) {
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

TORCH_LIBRARY_IMPL(drsl_fast, CPU, m) { m.impl("label_mode", &label_mode_cpu); }

}  // namespace drsl_fast
