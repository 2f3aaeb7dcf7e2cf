// CUDA launchers of the ADVENT/IntraDA entropy map (docs/method.md §7). The kernels
// themselves are in kernels/cuda/entropy.cuh, free of ATen.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <type_traits>

#include "../../kernels/cuda/entropy.cuh"
#include "../entropy.h"
#include "../pixel_view.h"
#include "device_pointers.h"

namespace drsl_fast {
namespace {

dim3 pixel_grid(int64_t P, int64_t B) {
  TORCH_CHECK(B <= 65535, "entropy_map (cuda): batch size must be <= 65535, got ", B);
  return dim3(static_cast<unsigned>((P + cuda::kEntropyThreads - 1) / cuda::kEntropyThreads), static_cast<unsigned>(B));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> entropy_map_cuda(const at::Tensor& logits, bool with_map) {
  check_logits(logits);
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor bcp = as_bdp(logits);
  const int64_t B = bcp.size(0), C = bcp.size(1), P = bcp.size(2);
  const auto options = logits.options().dtype(accumulate_dtype(logits));
  at::Tensor map = with_map ? at::empty(logits.sizes(), options) : at::empty({0}, options);
  at::Tensor pixel = at::empty({B, logits.size(2), logits.size(3)}, options);
  if (pixel.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "entropy_map_cuda", [&] {
      using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
      cuda::entropy_map_kernel<<<pixel_grid(P, B), cuda::kEntropyThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          cuda_ptr<scalar_t>(bcp), layout_of(bcp),
          static_cast<int>(C), P, static_cast<acc_t>(-1.0 / std::log2(static_cast<double>(C))),
          with_map ? map.mutable_data_ptr<acc_t>() : nullptr, pixel.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  at::Tensor score = pixel.numel() > 0 ? pixel.flatten(1).mean(1) / static_cast<double>(C)
                                       : at::full({B}, NAN, options);
  return {map, pixel, score};
}

at::Tensor entropy_map_backward_cuda(const at::Tensor& logits, const at::Tensor& grad_map_in,
                                     const at::Tensor& grad_pixel_in) {
  const c10::cuda::CUDAGuard guard(logits.device());
  const EntropyBackwardInputs in = entropy_backward_inputs(logits, grad_map_in, grad_pixel_in);
  const at::Tensor &bcp = in.bcp, &grad_map = in.grad_map, &grad_pixel = in.grad_pixel;
  const bool with_map_grad = in.with_map_grad;
  const int64_t B = in.B, C = in.C, P = in.P;
  at::Tensor grad_logits = empty_like_pixel_viewable(logits);
  if (grad_logits.numel() == 0) return grad_logits;
  at::Tensor grad_bcp = as_bdp(grad_logits);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "entropy_map_backward_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    cuda::entropy_map_backward_kernel<<<pixel_grid(P, B), cuda::kEntropyThreads, 0,
                                        at::cuda::getCurrentCUDAStream()>>>(
        cuda_ptr<scalar_t>(bcp), layout_of(bcp),
        static_cast<int>(C), P, static_cast<acc_t>(-1.0 / std::log2(static_cast<double>(C))),
        with_map_grad ? grad_map.const_data_ptr<acc_t>() : nullptr, grad_pixel.const_data_ptr<acc_t>(),
        mutable_cuda_ptr<scalar_t>(grad_bcp), layout_of(grad_bcp));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_logits;
}

}  // namespace

TORCH_LIBRARY_IMPL(drsl_fast, CUDA, m) {
  m.impl("entropy_map", &entropy_map_cuda);
  m.impl("entropy_map_backward", &entropy_map_backward_cuda);
}

}  // namespace drsl_fast
