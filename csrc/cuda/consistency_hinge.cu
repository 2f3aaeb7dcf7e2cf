// CUDA backend of consistency_hinge (docs/method.md §4 Eq. 6, DRSL+); the
// formulas are atop csrc/cpu/consistency_hinge.cpp. One thread per triplet:
//   consistency_hinge_kernel            h of a counted triplet (its three rows
//                                       read in place), relu(h) or 0, and its flag;
//                                       the launcher sums both (a fixed order)
//   consistency_hinge_backward_kernel   w = 2 dL / used read from the device (no
//                                       host synchronisation); the three rows of a
//                                       triplet with h > 0 added into zeroed maps in
//                                       the accumulation dtype with atomics, so the
//                                       order of the additions, and the last bits of
//                                       a gradient with repeated positions, may vary
//                                       from run to run (as index_add_ on a GPU)
//
// The device half compiles without ATen (tests/cuda_on_cpu runs it on the CPU;
// DRSL_FAST_KERNELS_ONLY).
#include <cstdint>

#include "../../kernels/cuda/flagged_means.cuh"
#include "../../kernels/cuda/load_store.cuh"
#include "../../kernels/pixel_layout.h"

namespace drsl_fast {
namespace cuda {

constexpr int kHingeThreads = 128;

template <typename scalar_t>
struct HingeMaps {
  const scalar_t* target;
  PixelLayout target_layout;
  int64_t target_pixels, target_flat;  // P and B * P of the target map
  const scalar_t* source;
  PixelLayout source_layout;
  int64_t source_pixels, source_flat;
  int D;
};

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t read(const scalar_t* emb, const PixelLayout& L, int64_t pixels, int64_t flat, int d) {
  return load_as<acc_t>(emb[L.offset(flat / pixels, d, flat % pixels)]);
}

// Whether triplet (a, pos, neg) counts, and its h when it does.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ bool triplet_hinge(const HingeMaps<scalar_t>& m, int64_t a, int64_t pos, int64_t neg,
                                              acc_t beta, acc_t& h) {
  if (a < 0 || a >= m.target_flat || pos < 0 || pos >= m.source_flat || neg < 0 || neg >= m.source_flat)
    return false;
  acc_t to_positive = 0, to_negative = 0;
  for (int d = 0; d < m.D; ++d) {
    const acc_t e_t = read<scalar_t, acc_t>(m.target, m.target_layout, m.target_pixels, a, d);
    const acc_t dp = e_t - read<scalar_t, acc_t>(m.source, m.source_layout, m.source_pixels, pos, d);
    const acc_t dn = e_t - read<scalar_t, acc_t>(m.source, m.source_layout, m.source_pixels, neg, d);
    to_positive += dp * dp;
    to_negative += dn * dn;
  }
  h = to_positive - to_negative + beta;
  return true;
}

template <typename scalar_t, typename acc_t>
__global__ void consistency_hinge_kernel(HingeMaps<scalar_t> m, const int64_t* __restrict__ anchor,
                                         const int64_t* __restrict__ positive, const int64_t* __restrict__ negative,
                                         int64_t T, acc_t beta, acc_t* __restrict__ hinge, bool* __restrict__ counted) {
  const int64_t i = thread_index();
  if (i >= T) return;
  acc_t h = 0;
  const bool counts = triplet_hinge(m, anchor[i], positive[i], negative[i], beta, h);
  hinge[i] = counts && (h > 0 || h != h) ? h : acc_t(0);  // relu keeps NaN
  counted[i] = counts;
}

// grad_target / grad_source: the maps' (B, D, P) layouts in acc_t, or null when not asked for.
template <typename scalar_t, typename acc_t>
__global__ void consistency_hinge_backward_kernel(HingeMaps<scalar_t> m, const int64_t* __restrict__ anchor,
                                                  const int64_t* __restrict__ positive,
                                                  const int64_t* __restrict__ negative, int64_t T, acc_t beta,
                                                  const acc_t* __restrict__ grad, const int64_t* __restrict__ used,
                                                  acc_t* grad_target, PixelLayout target_grad_layout,
                                                  acc_t* grad_source, PixelLayout source_grad_layout) {
  const int64_t i = thread_index();
  if (i >= T) return;
  const int64_t a = anchor[i], pos = positive[i], neg = negative[i];
  acc_t h = 0;
  if (!triplet_hinge(m, a, pos, neg, beta, h) || !(h > 0)) return;
  const acc_t w = 2 * *grad / static_cast<acc_t>(*used > 1 ? *used : 1);
  for (int d = 0; d < m.D; ++d) {
    const acc_t e_t = read<scalar_t, acc_t>(m.target, m.target_layout, m.target_pixels, a, d);
    const acc_t e_p = read<scalar_t, acc_t>(m.source, m.source_layout, m.source_pixels, pos, d);
    const acc_t e_n = read<scalar_t, acc_t>(m.source, m.source_layout, m.source_pixels, neg, d);
    if (grad_target)
      atomicAdd(grad_target + target_grad_layout.offset(a / m.target_pixels, d, a % m.target_pixels), w * (e_n - e_p));
    if (grad_source) {
      atomicAdd(grad_source + source_grad_layout.offset(pos / m.source_pixels, d, pos % m.source_pixels),
                w * (e_p - e_t));
      atomicAdd(grad_source + source_grad_layout.offset(neg / m.source_pixels, d, neg % m.source_pixels),
                w * (e_t - e_n));
    }
  }
}

}  // namespace cuda
}  // namespace drsl_fast

#ifndef DRSL_FAST_KERNELS_ONLY
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "../host.h"
#include "flagged_means.h"
#include "launch.h"

namespace drsl_fast {
namespace {

template <typename scalar_t>
cuda::HingeMaps<cuda_type<scalar_t>> hinge_maps(const HingeProblem& p) {
  return {cuda_ptr<scalar_t>(p.target), layout_of(p.target), p.Pt, p.Nt,
          cuda_ptr<scalar_t>(p.source), layout_of(p.source), p.Ps, p.Ns, static_cast<int>(p.D)};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> consistency_hinge_cuda(const at::Tensor& target_emb, const at::Tensor& source_emb,
                                                          const at::Tensor& anchor, const at::Tensor& positive,
                                                          const at::Tensor& negative, double beta) {
  const HingeProblem p = hinge_problem(target_emb, source_emb, anchor, positive, negative, beta);
  const c10::cuda::CUDAGuard guard(target_emb.device());
  at::Tensor hinge, counted;  // named tensors, not bindings: the dispatch lambda captures them
  std::tie(hinge, counted) = p.per_triplet();
  if (p.T > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, target_emb.scalar_type(), "consistency_hinge_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      launch(cuda::consistency_hinge_kernel<cuda_type<scalar_t>, acc_t>, dim3(blocks_for(p.T, cuda::kHingeThreads)),
             cuda::kHingeThreads, 0, hinge_maps<scalar_t>(p), p.anchor.const_data_ptr<int64_t>(),
             p.positive.const_data_ptr<int64_t>(), p.negative.const_data_ptr<int64_t>(), p.T,
             static_cast<acc_t>(beta), hinge.mutable_data_ptr<acc_t>(), counted.mutable_data_ptr<bool>());
    });
  }
  const auto [mean, unused, used] = flagged_means_cuda(hinge, at::Tensor(), counted);
  return {mean, used};
}

std::tuple<at::Tensor, at::Tensor> consistency_hinge_backward_cuda(
    const at::Tensor& grad, const at::Tensor& used, const at::Tensor& target_emb, const at::Tensor& source_emb,
    const at::Tensor& anchor, const at::Tensor& positive, const at::Tensor& negative, double beta,
    bool target_requires_grad, bool source_requires_grad) {
  const HingeProblem p = hinge_problem(target_emb, source_emb, anchor, positive, negative, beta);
  const c10::cuda::CUDAGuard guard(target_emb.device());
  at::Tensor grad_target, grad_source;  // named tensors, not bindings: the dispatch lambda captures them
  std::tie(grad_target, grad_source) =
      p.zero_gradients(target_emb, source_emb, target_requires_grad, source_requires_grad);
  if (p.T > 0 && (target_requires_grad || source_requires_grad)) {
    const at::Tensor grad_acc = grad.to(p.acc_dtype).contiguous(), count = used.to(at::kLong).contiguous();
    const at::Tensor target_view = target_requires_grad ? as_bdp(grad_target) : at::Tensor();
    const at::Tensor source_view = source_requires_grad ? as_bdp(grad_source) : at::Tensor();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, target_emb.scalar_type(), "consistency_hinge_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      launch(cuda::consistency_hinge_backward_kernel<cuda_type<scalar_t>, acc_t>,
             dim3(blocks_for(p.T, cuda::kHingeThreads)), cuda::kHingeThreads, 0, hinge_maps<scalar_t>(p),
             p.anchor.const_data_ptr<int64_t>(), p.positive.const_data_ptr<int64_t>(),
             p.negative.const_data_ptr<int64_t>(), p.T, static_cast<acc_t>(beta), grad_acc.const_data_ptr<acc_t>(),
             count.const_data_ptr<int64_t>(),
             target_requires_grad ? target_view.mutable_data_ptr<acc_t>() : nullptr,
             target_requires_grad ? layout_of(target_view) : PixelLayout{},
             source_requires_grad ? source_view.mutable_data_ptr<acc_t>() : nullptr,
             source_requires_grad ? layout_of(source_view) : PixelLayout{});
    });
  }
  return {hinge_gradient(grad_target, target_emb), hinge_gradient(grad_source, source_emb)};
}

TORCH_LIBRARY_IMPL(drsl_fast, CUDA, m) {
  m.impl("consistency_hinge", &consistency_hinge_cuda);
  m.impl("consistency_hinge_backward", &consistency_hinge_backward_cuda);
}

}  // namespace drsl_fast
#endif  // DRSL_FAST_KERNELS_ONLY
