// CUDA launchers of the fused MMDL losses (docs/method.md §4 Eq. 4, 5); kernels in
// kernels/cuda/mmdl_losses.cuh. The per-sample embedding gradients are added
// into the full gradient with index_put_(accumulate) (repeated pixels add up);
// the mode gradient is accumulated with atomics (not bitwise deterministic).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <type_traits>

#include "../../kernels/cuda/mmdl_losses.cuh"
#include "../mmdl_losses.h"
#include "device_pointers.h"

namespace drsl_fast {
namespace {

std::tuple<at::Tensor, at::Tensor> mmdl_losses_cuda(const at::Tensor& emb, const at::Tensor& index_in,
                                                    const at::Tensor& label_in, const at::Tensor& modes_in,
                                                    double sigma, double alpha, double scale) {
  check_loss_params(sigma, alpha, scale);
  const c10::cuda::CUDAGuard guard(emb.device());
  const SampleProblem p = sample_problem("mmdl_losses", emb, index_in, label_in, modes_in);
  const at::Tensor &bdp = p.bdp, &modes = p.modes, &index = p.index, &label = p.label;
  const auto acc_dtype = p.acc_dtype;
  const int64_t B = p.B, S = p.S, P = p.P;
  at::Tensor triplet = at::empty({B, S}, emb.options().dtype(acc_dtype));
  at::Tensor ce = at::empty({B, S}, triplet.options());
  if (triplet.numel() == 0) return {triplet, ce};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, emb.scalar_type(), "mmdl_losses_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    cuda::mmdl_losses_forward_kernel<<<sample_blocks(B * S, cuda::kSampleThreads), cuda::kSampleThreads, 0,
                                       at::cuda::getCurrentCUDAStream()>>>(
        cuda_ptr<scalar_t>(bdp), layout_of(bdp), index.const_data_ptr<int64_t>(), label.const_data_ptr<int64_t>(),
        modes.const_data_ptr<acc_t>(), B, S, P, modes.size(0), modes.size(1), modes.size(2),
        -posterior_scale<acc_t>(sigma), acc_t(alpha), acc_t(scale), triplet.mutable_data_ptr<acc_t>(),
        ce.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {triplet, ce};
}

std::tuple<at::Tensor, at::Tensor> mmdl_losses_backward_cuda(
    const at::Tensor& grad_triplet_in, const at::Tensor& grad_ce_in, const at::Tensor& emb,
    const at::Tensor& index_in, const at::Tensor& label_in, const at::Tensor& modes_in, double sigma, double alpha,
    double scale, bool emb_requires_grad, bool modes_requires_grad) {
  check_loss_params(sigma, alpha, scale);
  const c10::cuda::CUDAGuard guard(emb.device());
  const SampleProblem p = sample_problem("mmdl_losses_backward", emb, index_in, label_in, modes_in);
  const at::Tensor &bdp = p.bdp, &modes = p.modes, &index = p.index, &label = p.label;
  const auto acc_dtype = p.acc_dtype;
  const int64_t B = p.B, S = p.S, P = p.P, C = p.C, M = p.M, D = p.D;
  const at::Tensor grad_triplet = grad_triplet_in.to(acc_dtype).expand({B, S}).contiguous();
  const at::Tensor grad_ce = grad_ce_in.to(acc_dtype).expand({B, S}).contiguous();
  at::Tensor sample_grad = at::empty({emb_requires_grad ? B * S : 0, D}, modes.options());
  at::Tensor grad_modes = at::zeros(modes_requires_grad ? modes.sizes() : at::IntArrayRef{0}, modes.options());
  if ((emb_requires_grad || modes_requires_grad) && B * S > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, emb.scalar_type(), "mmdl_losses_backward_cuda", [&] {
      using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
      cuda::mmdl_losses_backward_kernel<<<sample_blocks(B * S, cuda::kSampleThreads), cuda::kSampleThreads, 0,
                                          at::cuda::getCurrentCUDAStream()>>>(
          grad_triplet.const_data_ptr<acc_t>(), grad_ce.const_data_ptr<acc_t>(), cuda_ptr<scalar_t>(bdp),
          layout_of(bdp), index.const_data_ptr<int64_t>(), label.const_data_ptr<int64_t>(),
          modes.const_data_ptr<acc_t>(), B, S, P, C, M, D, -posterior_scale<acc_t>(sigma), acc_t(alpha), acc_t(scale),
          emb_requires_grad ? sample_grad.mutable_data_ptr<acc_t>() : nullptr,
          modes_requires_grad ? grad_modes.mutable_data_ptr<acc_t>() : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  at::Tensor grad_emb = at::empty({0}, emb.options());
  if (emb_requires_grad) {
    at::Tensor grad_acc = at::zeros({bdp.size(0), D, P}, modes.options());
    if (B * S > 0) {
      // Samples that do not count have zero rows; send them to pixel 0.
      const at::Tensor counts = (index >= 0) & (index < P) & (label >= 0) & (label < C);
      const at::Tensor pixel = at::where(counts, index, at::zeros_like(index)).reshape({-1});
      const at::Tensor image = at::arange(B, index.options()).repeat_interleave(S);
      const c10::List<std::optional<at::Tensor>> where_to{image, std::nullopt, pixel};  // [image, :, pixel]
      grad_acc.index_put_(where_to, sample_grad, /*accumulate=*/true);
    }
    grad_emb = at::empty(emb.sizes(), emb.options().memory_format(emb.dim() == 4 ? emb.suggest_memory_format()
                                                                               : at::MemoryFormat::Contiguous));
    if (emb.dim() == 2) grad_emb = at::empty_like(emb);
    as_bdp(grad_emb).copy_(grad_acc);
  }
  return {grad_emb, modes_requires_grad ? grad_modes.to(modes_in.scalar_type()) : at::empty({0}, modes_in.options())};
}

at::Tensor label_mode_cuda(const at::Tensor& emb, const at::Tensor& index_in, const at::Tensor& label_in,
                           const at::Tensor& modes_in) {
  const c10::cuda::CUDAGuard guard(emb.device());
  const SampleProblem p = sample_problem("label_mode", emb, index_in, label_in, modes_in);
  const at::Tensor &bdp = p.bdp, &modes = p.modes, &index = p.index, &label = p.label;
  const int64_t B = p.B, S = p.S;
  at::Tensor mode = at::empty({B, S}, index.options().dtype(at::kByte));
  if (mode.numel() == 0) return mode;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, emb.scalar_type(), "label_mode_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    cuda::label_mode_kernel<<<sample_blocks(B * S, cuda::kSampleThreads), cuda::kSampleThreads, 0,
                              at::cuda::getCurrentCUDAStream()>>>(
        cuda_ptr<scalar_t>(bdp), layout_of(bdp), index.const_data_ptr<int64_t>(), label.const_data_ptr<int64_t>(),
        modes.const_data_ptr<acc_t>(), B, S, bdp.size(2), modes.size(0), modes.size(1), modes.size(2),
        mode.mutable_data_ptr<uint8_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return mode;
}

}  // namespace

TORCH_LIBRARY_IMPL(drsl_fast, CUDA, m) {
  m.impl("mmdl_losses", &mmdl_losses_cuda);
  m.impl("mmdl_losses_backward", &mmdl_losses_backward_cuda);
  m.impl("label_mode", &label_mode_cuda);
}

}  // namespace drsl_fast
