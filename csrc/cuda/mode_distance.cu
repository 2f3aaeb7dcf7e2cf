// CUDA backend of the mode-distance op (docs/method.md §3): first the device
// kernels, free of ATen, then their launchers. kernels/cuda/pascal_sm61.cu
// compiles the kernels alone for sm_61 (it defines DRSL_FAST_KERNELS_ONLY).
//
// For embedding e and mode centres r[c, m]:
//   d[c, m]  = ||e - r[c, m]||^2
//   dmin[c]  = min_m d[c, m],  mstar[c] = argmin_m d[c, m] (ties: lowest m)
//   P[c]     = exp(-dmin[c] / (2 sigma^2))     (optional, fused)
// Backward flows only through the winning mode:
//   dL/de        = 2 sum_c g[c] (e - r[c, mstar[c]])
//   dL/dr[c, m]  = 2 sum_{pixels with mstar[c] == m} g[c] (r[c, m] - e)
#include <cstdint>

#include "../../kernels/cuda/load_store.cuh"
#include "../../kernels/nan_rules.h"
#include "../../kernels/pixel_layout.h"

namespace drsl_fast {
namespace cuda {

constexpr int kForwardThreads = 128;
constexpr int kGradEmbThreads = 128;
// Pixels summed by one block of the mode-gradient kernel. Fixed, so the
// reduction order (and therefore the result) does not depend on the GPU.
constexpr int kModeGradChunk = 1024;
// Modes are staged in shared memory when C*M*D*sizeof(acc_t) fits this budget.
constexpr int kModesSharedBytes = 32 * 1024;

// One thread per pixel; grid = (ceil(P / blockDim), B).
template <typename scalar_t, typename acc_t>
__global__ void mode_distance_forward_kernel(
    const scalar_t* __restrict__ emb, PixelLayout emb_layout,
    const acc_t* __restrict__ modes, int C, int M, int D, int64_t P,
    bool modes_in_shared,
    acc_t* __restrict__ dmin, uint8_t* __restrict__ mstar,
    acc_t* __restrict__ posterior, acc_t posterior_scale, PixelLayout out_layout) {
  extern __shared__ unsigned char shared_bytes[];
  const acc_t* centres = modes;
  if (modes_in_shared) {
    acc_t* staged = reinterpret_cast<acc_t*>(shared_bytes);
    for (int i = threadIdx.x; i < C * M * D; i += blockDim.x) staged[i] = modes[i];
    __syncthreads();
    centres = staged;
  }
  const int64_t b = blockIdx.y, p = thread_index();
  if (p >= P) return;
  const scalar_t* e = emb + emb_layout.offset(b, 0, p);

  for (int c = 0; c < C; ++c) {
    acc_t dist[kMaxModes];
#pragma unroll
    for (int m = 0; m < kMaxModes; ++m) dist[m] = acc_t(0);
    const acc_t* r = centres + static_cast<int64_t>(c) * M * D;
    for (int d = 0; d < D; ++d) {
      const acc_t x = load_as<acc_t>(e[d * emb_layout.channel]);
#pragma unroll
      for (int m = 0; m < kMaxModes; ++m) {
        if (m < M) {
          const acc_t t = x - r[m * D + d];
          dist[m] += t * t;
        }
      }
    }
    acc_t best = dist[0];
    int best_mode = 0;
#pragma unroll
    for (int m = 1; m < kMaxModes; ++m) {
      if (m < M && replaces_min(dist[m], best)) {  // ties keep the lowest mode; NaN wins
        best = dist[m];
        best_mode = m;
      }
    }
    const int64_t o = out_layout.offset(b, c, p);
    dmin[o] = best;
    mstar[o] = static_cast<uint8_t>(best_mode);
    if (posterior != nullptr) posterior[o] = exp_of(posterior_exponent(best, posterior_scale));
  }
}

// dL/de, one thread per pixel; grid = (ceil(P / blockDim), B).
template <typename scalar_t, typename acc_t>
__global__ void mode_distance_grad_emb_kernel(
    const acc_t* __restrict__ grad_dmin, const uint8_t* __restrict__ mstar, PixelLayout out_layout,
    const scalar_t* __restrict__ emb, PixelLayout emb_layout,
    const acc_t* __restrict__ modes, int C, int M, int D, int64_t P,
    scalar_t* __restrict__ grad_emb, PixelLayout grad_layout) {
  const int64_t b = blockIdx.y, p = thread_index();
  if (p >= P) return;
  const scalar_t* e = emb + emb_layout.offset(b, 0, p);
  scalar_t* ge = grad_emb + grad_layout.offset(b, 0, p);
  const int64_t o = out_layout.offset(b, 0, p);
  for (int d = 0; d < D; ++d) {
    const acc_t x = load_as<acc_t>(e[d * emb_layout.channel]);
    acc_t acc = acc_t(0);
    for (int c = 0; c < C; ++c) {
      const int64_t oc = o + c * out_layout.channel;
      const acc_t g = grad_dmin[oc];
      const acc_t r = modes[(static_cast<int64_t>(c) * M + mstar[oc]) * D + d];
      acc += g * (x - r);
    }
    ge[d * grad_layout.channel] = store_as<scalar_t>(acc_t(2) * acc);
  }
}

// Partial dL/dr over one chunk of kModeGradChunk pixels of one image, for one
// class; thread d owns channel d (blockDim >= D). Writes
// partial[(b * chunks + chunk), c, m, d]; the host sums partials over their
// first axis in a fixed order, so the mode gradient is deterministic.
// grid = (chunks, C, B).
template <typename scalar_t, typename acc_t>
__global__ void mode_distance_grad_modes_kernel(
    const acc_t* __restrict__ grad_dmin, const uint8_t* __restrict__ mstar, PixelLayout out_layout,
    const scalar_t* __restrict__ emb, PixelLayout emb_layout,
    const acc_t* __restrict__ modes, int C, int M, int D, int64_t P,
    acc_t* __restrict__ partial) {
  const int d = threadIdx.x;
  if (d >= D) return;
  const int c = blockIdx.y;
  const int64_t b = blockIdx.z;
  const int64_t chunk = blockIdx.x;
  const int64_t begin = chunk * kModeGradChunk;
  const int64_t end = begin + kModeGradChunk < P ? begin + kModeGradChunk : P;

  acc_t sum[kMaxModes];
#pragma unroll
  for (int m = 0; m < kMaxModes; ++m) sum[m] = acc_t(0);
  const acc_t* r = modes + static_cast<int64_t>(c) * M * D + d;
  for (int64_t p = begin; p < end; ++p) {
    const int64_t o = out_layout.offset(b, c, p);
    const acc_t g = grad_dmin[o];
    const int winner = mstar[o];
    const acc_t x = load_as<acc_t>(emb[emb_layout.offset(b, d, p)]);
#pragma unroll
    for (int m = 0; m < kMaxModes; ++m) {
      if (m == winner) sum[m] += g * (r[m * D] - x);
    }
  }
  acc_t* out = partial + ((b * gridDim.x + chunk) * C + c) * static_cast<int64_t>(M) * D + d;
  for (int m = 0; m < M; ++m) out[m * D] = acc_t(2) * sum[m];
}

}  // namespace cuda
}  // namespace drsl_fast

#ifndef DRSL_FAST_KERNELS_ONLY
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>

#include "../host.h"
#include "launch.h"

namespace drsl_fast {
std::tuple<at::Tensor, at::Tensor, at::Tensor> mode_distance_cuda(const at::Tensor& emb, const at::Tensor& modes,
                                                                  std::optional<double> sigma) {
  const c10::cuda::CUDAGuard guard(emb.device());
  const ModeDistanceProblem p = mode_distance_problem(emb, modes);
  const ModeDistanceOutputs out = mode_distance_outputs(emb, p, sigma);
  if (out.dmin.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, emb.scalar_type(), "mode_distance_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const size_t modes_bytes = static_cast<size_t>(p.C * p.M * p.D) * sizeof(acc_t);
    const bool in_shared = modes_bytes <= cuda::kModesSharedBytes;
    launch(cuda::mode_distance_forward_kernel<cuda_type<scalar_t>, acc_t>,
           pixel_grid("mode_distance", p.P, p.B, cuda::kForwardThreads), cuda::kForwardThreads,
           in_shared ? modes_bytes : 0, cuda_ptr<scalar_t>(p.bdp), layout_of(p.bdp), p.modes.const_data_ptr<acc_t>(),
           p.C, p.M, p.D, p.P, in_shared, out.dmin.mutable_data_ptr<acc_t>(), out.mstar.mutable_data_ptr<uint8_t>(),
           sigma ? out.posterior.mutable_data_ptr<acc_t>() : nullptr, sigma ? posterior_scale<acc_t>(*sigma) : acc_t(0),
           per_class_layout(emb, p.C));
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> mode_distance_backward_cuda(const at::Tensor& grad_dmin_in, const at::Tensor& emb,
                                                              const at::Tensor& modes_in, const at::Tensor& mstar_in,
                                                              bool emb_requires_grad, bool modes_requires_grad) {
  const c10::cuda::CUDAGuard guard(emb.device());
  const ModeDistanceProblem p = mode_distance_problem(emb, modes_in);
  at::Tensor grad_dmin, mstar;
  std::tie(grad_dmin, mstar) = backward_inputs(grad_dmin_in, mstar_in, emb, p);
  TORCH_CHECK(p.D <= 1024, "mode_distance_backward (cuda): D must be <= 1024, got ", p.D);
  const PixelLayout out_layout = per_class_layout(emb, p.C);

  at::Tensor grad_emb = emb_requires_grad ? empty_like_pixel_viewable(emb) : at::empty({0}, emb.options());
  at::Tensor grad_modes = at::empty({0}, modes_in.options());
  if (p.P == 0 || p.B == 0) {
    if (modes_requires_grad) grad_modes = at::zeros_like(modes_in);
    if (emb_requires_grad) grad_emb.zero_();
    return {grad_emb, grad_modes};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, emb.scalar_type(), "mode_distance_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (emb_requires_grad) {
      at::Tensor grad_bdp = as_bdp(grad_emb);
      launch(cuda::mode_distance_grad_emb_kernel<cuda_type<scalar_t>, acc_t>,
             pixel_grid("mode_distance_backward", p.P, p.B, cuda::kGradEmbThreads), cuda::kGradEmbThreads, 0,
             grad_dmin.const_data_ptr<acc_t>(), mstar.const_data_ptr<uint8_t>(), out_layout,
             cuda_ptr<scalar_t>(p.bdp), layout_of(p.bdp), p.modes.const_data_ptr<acc_t>(), p.C, p.M, p.D, p.P,
             mutable_cuda_ptr<scalar_t>(grad_bdp), layout_of(grad_bdp));
    }
    if (modes_requires_grad) {
      const int64_t chunks = blocks_for(p.P, cuda::kModeGradChunk);
      TORCH_CHECK(p.B <= 65535 && p.C <= 65535, "mode_distance_backward (cuda): B and C must be <= 65535");
      at::Tensor partial = at::empty({p.B * chunks, p.C, p.M, p.D}, p.modes.options());
      launch(cuda::mode_distance_grad_modes_kernel<cuda_type<scalar_t>, acc_t>, dim3(chunks, p.C, p.B),
             static_cast<int>((p.D + 31) / 32 * 32), 0, grad_dmin.const_data_ptr<acc_t>(),
             mstar.const_data_ptr<uint8_t>(), out_layout, cuda_ptr<scalar_t>(p.bdp), layout_of(p.bdp),
             p.modes.const_data_ptr<acc_t>(), p.C, p.M, p.D, p.P, partial.mutable_data_ptr<acc_t>());
      // ATen's reduction over the first axis has a fixed order: deterministic.
      grad_modes = partial.sum(0).to(modes_in.scalar_type());
    }
  });
  return {grad_emb, grad_modes};
}

TORCH_LIBRARY_IMPL(drsl_fast, CUDA, m) {
  m.impl("mode_distance", &mode_distance_cuda);
  m.impl("mode_distance_backward", &mode_distance_backward_cuda);
}

}  // namespace drsl_fast
#endif  // DRSL_FAST_KERNELS_ONLY
