// Autograd of drsl_fast::entropy_map (docs/method.md §7), for every backend
// that registers the op's kernels (CPU, CUDA): the forward saves the logits;
// the backward folds the image score's gradient into the pixel entropy's
// (score = sum over the pixels of the pixel entropy / (C H W)) and calls
// drsl_fast::entropy_map_backward. In C++ so that a call issues no Python
// beyond the op's own wrapper.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <tuple>

#include "../host.h"

namespace drsl_fast {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using Forward = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, bool);
using Backward = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&);

class EntropyMapFunction : public torch::autograd::Function<EntropyMapFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& logits, bool with_map) {
    static const auto op =
        c10::Dispatcher::singleton().findSchemaOrThrow("drsl_fast::entropy_map", "").typed<Forward>();
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [map, pixel_entropy, image_score] = op.call(logits, with_map);
    ctx->save_for_backward({logits});
    ctx->set_materialize_grads(false);
    return {map, pixel_entropy, image_score};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op =
        c10::Dispatcher::singleton().findSchemaOrThrow("drsl_fast::entropy_map_backward", "").typed<Backward>();
    const at::Tensor logits = ctx->get_saved_variables()[0];
    // sizes as SymInts: torch.compile traces this with symbolic shapes
    const c10::SymInt B = logits.sym_size(0), C = logits.sym_size(1), H = logits.sym_size(2), W = logits.sym_size(3);
    const auto acc = logits.options().dtype(accumulate_dtype(logits));
    at::Tensor total = grads[1].defined() ? grads[1] : at::zeros_symint({B, H, W}, acc);
    if (grads[2].defined()) total = total + grads[2].unsqueeze(1).unsqueeze(2) / at::Scalar(C * H * W);
    const at::Tensor grad_map = grads[0].defined() && grads[0].sym_numel() > 0 ? grads[0] : at::empty({0}, acc);
    return {op.call(logits, grad_map, total), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> entropy_map_autograd(const at::Tensor& logits, bool with_map) {
  const variable_list out = EntropyMapFunction::apply(logits, with_map);
  return {out[0], out[1], out[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(drsl_fast, Autograd, m) { m.impl("entropy_map", &entropy_map_autograd); }

}  // namespace drsl_fast
