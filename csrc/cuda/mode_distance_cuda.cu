// CUDA launchers of the mode-distance op (docs/method.md §3). The kernels themselves
// are in kernels/cuda/mode_distance.cuh, free of ATen.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <type_traits>

#include "../../kernels/cuda/mode_distance.cuh"
#include "../mode_distance.h"
#include "device_pointers.h"

namespace drsl_fast {
namespace {

dim3 pixel_grid(int64_t P, int64_t B, int threads) {
  TORCH_CHECK(B <= 65535, "mode_distance (cuda): batch size must be <= 65535, got ", B);
  return dim3(static_cast<unsigned>((P + threads - 1) / threads), static_cast<unsigned>(B));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mode_distance_cuda(const at::Tensor& emb, const at::Tensor& modes_in,
                                                                  std::optional<double> sigma) {
  check_sigma(sigma);
  const c10::cuda::CUDAGuard guard(emb.device());
  const ModeDistanceProblem p = mode_distance_problem(emb, modes_in);
  const at::Tensor& bdp = p.bdp;
  const at::Tensor& modes = p.modes;
  const auto acc_dtype = p.acc_dtype;
  const int64_t B = p.B, P = p.P, C = p.C, M = p.M, D = p.D;
  const auto shape = per_class_shape(emb, C);
  at::Tensor dmin = at::empty(shape, emb.options().dtype(acc_dtype));
  at::Tensor mstar = at::empty(shape, emb.options().dtype(at::kByte));
  at::Tensor posterior = at::empty(sigma ? shape : std::vector<int64_t>{0}, dmin.options());
  if (dmin.numel() == 0) return {dmin, mstar, posterior};
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, emb.scalar_type(), "mode_distance_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const acc_t scale = sigma ? posterior_scale<acc_t>(*sigma) : acc_t(0);
    const size_t modes_bytes = static_cast<size_t>(C * M * D) * sizeof(acc_t);
    const bool in_shared = modes_bytes <= cuda::kModesSharedBytes;
    cuda::mode_distance_forward_kernel<<<pixel_grid(P, B, cuda::kForwardThreads), cuda::kForwardThreads,
                                         in_shared ? modes_bytes : 0, stream>>>(
        cuda_ptr<scalar_t>(bdp), layout_of(bdp), modes.const_data_ptr<acc_t>(), C, M, D, P, in_shared,
        dmin.mutable_data_ptr<acc_t>(), mstar.mutable_data_ptr<uint8_t>(),
        sigma ? posterior.mutable_data_ptr<acc_t>() : nullptr, scale, per_class_layout(emb, C));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {dmin, mstar, posterior};
}

std::tuple<at::Tensor, at::Tensor> mode_distance_backward_cuda(const at::Tensor& grad_dmin_in, const at::Tensor& emb,
                                                              const at::Tensor& modes_in, const at::Tensor& mstar_in,
                                                              bool emb_requires_grad, bool modes_requires_grad) {
  const c10::cuda::CUDAGuard guard(emb.device());
  const ModeDistanceProblem p = mode_distance_problem(emb, modes_in);
  const auto [grad_dmin, mstar] = backward_inputs(grad_dmin_in, mstar_in, emb, p);
  const at::Tensor& bdp = p.bdp;
  const at::Tensor& modes = p.modes;
  const int64_t B = p.B, P = p.P, C = p.C, M = p.M, D = p.D;
  TORCH_CHECK(D <= 1024, "mode_distance_backward (cuda): D must be <= 1024, got ", D);
  const PixelLayout out_layout = per_class_layout(emb, C);
  const auto stream = at::cuda::getCurrentCUDAStream();

  at::Tensor grad_emb = emb_requires_grad ? empty_like_pixel_viewable(emb) : at::empty({0}, emb.options());
  at::Tensor grad_modes = at::empty({0}, modes_in.options());
  if (P == 0 || B == 0) {
    if (modes_requires_grad) grad_modes = at::zeros_like(modes_in);
    if (emb_requires_grad) grad_emb.zero_();
    return {grad_emb, grad_modes};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, emb.scalar_type(), "mode_distance_backward_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    if (emb_requires_grad) {
      at::Tensor grad_bdp = as_bdp(grad_emb);
      cuda::mode_distance_grad_emb_kernel<<<pixel_grid(P, B, cuda::kGradEmbThreads), cuda::kGradEmbThreads, 0,
                                            stream>>>(
          grad_dmin.const_data_ptr<acc_t>(), mstar.const_data_ptr<uint8_t>(), out_layout, cuda_ptr<scalar_t>(bdp),
          layout_of(bdp), modes.const_data_ptr<acc_t>(), C, M, D, P, mutable_cuda_ptr<scalar_t>(grad_bdp),
          layout_of(grad_bdp));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (modes_requires_grad) {
      const int64_t chunks = (P + cuda::kModeGradChunk - 1) / cuda::kModeGradChunk;
      TORCH_CHECK(B <= 65535 && C <= 65535, "mode_distance_backward (cuda): B and C must be <= 65535");
      at::Tensor partial = at::empty({B * chunks, C, M, D}, modes.options());
      const int threads = static_cast<int>((D + 31) / 32 * 32);
      cuda::mode_distance_grad_modes_kernel<<<dim3(chunks, C, B), threads, 0, stream>>>(
          grad_dmin.const_data_ptr<acc_t>(), mstar.const_data_ptr<uint8_t>(), out_layout, cuda_ptr<scalar_t>(bdp),
          layout_of(bdp), modes.const_data_ptr<acc_t>(), C, M, D, P, partial.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      // ATen's reduction over the first axis has a fixed order: deterministic.
      grad_modes = partial.sum(0).to(modes_in.scalar_type());
    }
  });
  return {grad_emb, grad_modes};
}

}  // namespace

TORCH_LIBRARY_IMPL(drsl_fast, CUDA, m) {
  m.impl("mode_distance", &mode_distance_cuda);
  m.impl("mode_distance_backward", &mode_distance_backward_cuda);
}

}  // namespace drsl_fast
