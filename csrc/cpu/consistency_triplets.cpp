// C++ CPU backend of consistency_triplets (docs/method.md §4 Eq. 6, DRSL+): the
// source pixels grouped by (class, mode) with one stable counting sort (a
// pass to count each group, a prefix sum, a pass to place the pixels in
// order), then every anchor's positive and negative by
// kernels/consistency_triplets.h. O(source pixels + groups + anchors).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <vector>

#include "../../kernels/consistency_triplets.h"
#include "../host.h"

namespace drsl_fast {
namespace {

// start (C * M + 1 entries) and order of kernels/consistency_triplets.h over the n source pixels.
template <typename label_t>
void group_source_pixels(const label_t* label, const uint8_t* mode, int64_t n, int64_t C, int64_t M, int64_t* start,
                         int64_t* order) {
  const int64_t groups = C * M + 1;  // the last holds the pixels that do not count
  std::vector<int64_t> fill(groups, 0);
  for (int64_t f = 0; f < n; ++f) ++fill[source_group(static_cast<int64_t>(label[f]), mode[f], C, M)];
  int64_t running = 0;
  for (int64_t g = 0; g < groups; ++g) {
    start[g] = running;
    running += fill[g];
    fill[g] = start[g];
  }
  for (int64_t f = 0; f < n; ++f) order[fill[source_group(static_cast<int64_t>(label[f]), mode[f], C, M)]++] = f;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> consistency_triplets_cpu(
    const at::Tensor& anchor_index, const at::Tensor& anchor_label, const at::Tensor& anchor_mode,
    const at::Tensor& source_label, const at::Tensor& source_mode, const at::Tensor& draws, int64_t num_classes,
    int64_t num_modes, int64_t target_pixels) {
  const TripletProblem p = triplet_problem(anchor_index, anchor_label, anchor_mode, source_label, source_mode, draws,
                                           num_classes, num_modes, target_pixels);
  auto [anchor, positive, negative, valid, skipped] = p.outputs();
  const int64_t n = p.Bs * p.P;
  std::vector<int64_t> start(p.C * p.M + 1), order(n);
  AT_DISPATCH_INTEGRAL_TYPES(p.source_label.scalar_type(), "consistency_triplets_cpu", [&] {
    group_source_pixels(p.source_label.const_data_ptr<scalar_t>(), p.source_mode.const_data_ptr<uint8_t>(), n, p.C,
                        p.M, start.data(), order.data());
  });
  const int64_t* index = p.anchor_index.const_data_ptr<int64_t>();
  const int64_t* label = p.anchor_label.const_data_ptr<int64_t>();
  const uint8_t* mode = p.anchor_mode.const_data_ptr<uint8_t>();
  const double* u = p.draws.const_data_ptr<double>();
  int64_t* out_anchor = anchor.mutable_data_ptr<int64_t>();
  int64_t* out_positive = positive.mutable_data_ptr<int64_t>();
  int64_t* out_negative = negative.mutable_data_ptr<int64_t>();
  bool* out_valid = valid.mutable_data_ptr<bool>();
  int64_t* skips = skipped.mutable_data_ptr<int64_t>();
  const int64_t anchors = p.Bt * p.S;
  for (int64_t i = 0; i < anchors; ++i) {
    const Triplet t = draw_triplet(i / p.S, index[i], label[i], mode[i], u[i], u[anchors + i], start.data(),
                                   order.data(), p.C, p.M, p.target_pixels);
    out_anchor[i] = t.anchor;
    out_positive[i] = t.positive;
    out_negative[i] = t.negative;
    out_valid[i] = t.valid;
    skips[0] += t.no_positive;
    skips[1] += t.no_negative;
  }
  return {anchor, positive, negative, valid, skipped};
}

TORCH_LIBRARY_IMPL(drsl_fast, CPU, m) { m.impl("consistency_triplets", &consistency_triplets_cpu); }

}  // namespace drsl_fast
