// CUDA backend of consistency_triplets (docs/method.md §4 Eq. 6, DRSL+). The
// source pixels are grouped by (class, mode) as kernels/consistency_triplets.h
// describes, with one device sort instead of the CPU's counting sort:
//   source_group_kernel      the group of every source pixel (int32 keys)
//   at::sort (stable)        order = the pixels by key, equal keys by position
//   group_start_kernel       start[g] = first sorted key >= g, for g = 0 .. C*M
//                            (a binary search each; start[C*M] ends the labelled pixels)
//   consistency_triplets_kernel   one thread per anchor: draw_triplet, and an
//                            atomic add per skip
// The grouping is the CPU's exactly (a stable sort is unique), so both backends
// give the same triplets for the same draws. No host synchronisation.
//
// The device half compiles without ATen (tests/cuda_on_cpu runs it on the CPU;
// DRSL_FAST_KERNELS_ONLY).
#include <cstdint>

#include "../../kernels/consistency_triplets.h"
#include "../../kernels/cuda/load_store.cuh"

namespace drsl_fast {
namespace cuda {

constexpr int kTripletThreads = 256;

template <typename label_t>
__global__ void source_group_kernel(const label_t* __restrict__ label, const uint8_t* __restrict__ mode, int64_t n,
                                    int64_t C, int64_t M, int32_t* __restrict__ key) {
  const int64_t f = thread_index();
  if (f < n) key[f] = static_cast<int32_t>(source_group(static_cast<int64_t>(label[f]), mode[f], C, M));
}

// start[g] for g = 0 .. groups, groups = C * M (the key of the pixels that do not count).
__global__ void group_start_kernel(const int32_t* __restrict__ sorted, int64_t n, int64_t groups,
                                   int64_t* __restrict__ start) {
  const int64_t g = thread_index();
  if (g > groups) return;
  int64_t low = 0, high = n;  // the first position whose key is >= g
  while (low < high) {
    const int64_t mid = low + (high - low) / 2;
    if (sorted[mid] < g) low = mid + 1;
    else high = mid;
  }
  start[g] = low;
}

__global__ void consistency_triplets_kernel(const int64_t* __restrict__ index, const int64_t* __restrict__ label,
                                            const uint8_t* __restrict__ mode, const double* __restrict__ draws,
                                            int64_t anchors, int64_t S, const int64_t* __restrict__ start,
                                            const int64_t* __restrict__ order, int64_t C, int64_t M,
                                            int64_t target_pixels, int64_t* __restrict__ anchor,
                                            int64_t* __restrict__ positive, int64_t* __restrict__ negative,
                                            bool* __restrict__ valid, unsigned long long* __restrict__ skipped) {
  const int64_t i = thread_index();
  if (i >= anchors) return;
  const Triplet t = draw_triplet(i / S, index[i], label[i], mode[i], draws[i], draws[anchors + i], start, order, C,
                                 M, target_pixels);
  anchor[i] = t.anchor;
  positive[i] = t.positive;
  negative[i] = t.negative;
  valid[i] = t.valid;
  // Skips are rare (an anchor whose group has no source pixel): one atomic each.
  if (t.no_positive) atomicAdd(skipped, 1ull);
  if (t.no_negative) atomicAdd(skipped + 1, 1ull);
}

}  // namespace cuda
}  // namespace drsl_fast

#ifndef DRSL_FAST_KERNELS_ONLY
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../host.h"
#include "launch.h"

namespace drsl_fast {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> consistency_triplets_cuda(
    const at::Tensor& anchor_index, const at::Tensor& anchor_label, const at::Tensor& anchor_mode,
    const at::Tensor& source_label, const at::Tensor& source_mode, const at::Tensor& draws, int64_t num_classes,
    int64_t num_modes, int64_t target_pixels) {
  const TripletProblem p = triplet_problem(anchor_index, anchor_label, anchor_mode, source_label, source_mode, draws,
                                           num_classes, num_modes, target_pixels);
  const c10::cuda::CUDAGuard guard(anchor_index.device());
  auto [anchor, positive, negative, valid, skipped] = p.outputs();
  const int64_t n = p.Bs * p.P, anchors = p.Bt * p.S, groups = p.C * p.M;
  if (anchors == 0) return {anchor, positive, negative, valid, skipped};
  const auto options = anchor_index.options();
  at::Tensor key = at::empty({n}, options.dtype(at::kInt));
  if (n > 0) {
    AT_DISPATCH_INTEGRAL_TYPES(p.source_label.scalar_type(), "consistency_triplets_cuda", [&] {
      launch(cuda::source_group_kernel<scalar_t>, dim3(blocks_for(n, cuda::kTripletThreads)), cuda::kTripletThreads,
             0, p.source_label.const_data_ptr<scalar_t>(), p.source_mode.const_data_ptr<uint8_t>(), n, p.C, p.M,
             key.mutable_data_ptr<int32_t>());
    });
  }
  const auto [sorted, order] = at::sort(key, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  at::Tensor start = at::empty({groups + 1}, options);
  launch(cuda::group_start_kernel, dim3(blocks_for(groups + 1, cuda::kTripletThreads)), cuda::kTripletThreads, 0,
         sorted.const_data_ptr<int32_t>(), n, groups, start.mutable_data_ptr<int64_t>());
  launch(cuda::consistency_triplets_kernel, dim3(blocks_for(anchors, cuda::kTripletThreads)), cuda::kTripletThreads,
         0, p.anchor_index.const_data_ptr<int64_t>(), p.anchor_label.const_data_ptr<int64_t>(),
         p.anchor_mode.const_data_ptr<uint8_t>(), p.draws.const_data_ptr<double>(), anchors, p.S,
         start.const_data_ptr<int64_t>(), order.const_data_ptr<int64_t>(), p.C, p.M, p.target_pixels,
         anchor.mutable_data_ptr<int64_t>(), positive.mutable_data_ptr<int64_t>(),
         negative.mutable_data_ptr<int64_t>(), valid.mutable_data_ptr<bool>(),
         reinterpret_cast<unsigned long long*>(skipped.mutable_data_ptr<int64_t>()));
  return {anchor, positive, negative, valid, skipped};
}

TORCH_LIBRARY_IMPL(drsl_fast, CUDA, m) { m.impl("consistency_triplets", &consistency_triplets_cuda); }

}  // namespace drsl_fast
#endif  // DRSL_FAST_KERNELS_ONLY
