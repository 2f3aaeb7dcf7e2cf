// Autograd of drsl_fast::consistency_hinge (docs/method.md §4 Eq. 6), for every
// backend that registers the op's kernels (CPU, CUDA): the forward saves the
// embeddings, the triplets and the number of counted triplets; the backward
// calls drsl_fast::consistency_hinge_backward, which rereads the rows. `used`
// is an integer output without a gradient. In C++ so that a call issues no
// Python beyond the op's own wrapper.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <tuple>

namespace drsl_fast {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using Forward = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                   const at::Tensor&, const at::Tensor&, double);
using Backward = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                    const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                    const at::Tensor&, double, bool, bool);

class ConsistencyHingeFunction : public torch::autograd::Function<ConsistencyHingeFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& target_emb, const at::Tensor& source_emb,
                               const at::Tensor& anchor, const at::Tensor& positive, const at::Tensor& negative,
                               double beta) {
    static const auto op =
        c10::Dispatcher::singleton().findSchemaOrThrow("drsl_fast::consistency_hinge", "").typed<Forward>();
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [loss, used] = op.call(target_emb, source_emb, anchor, positive, negative, beta);
    ctx->save_for_backward({target_emb, source_emb, anchor, positive, negative, used});
    ctx->saved_data["beta"] = beta;
    ctx->mark_non_differentiable({used});
    ctx->set_materialize_grads(false);
    return {loss, used};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op =
        c10::Dispatcher::singleton().findSchemaOrThrow("drsl_fast::consistency_hinge_backward", "").typed<Backward>();
    const bool target_grad = ctx->needs_input_grad(0), source_grad = ctx->needs_input_grad(1);
    if (!grads[0].defined() || !(target_grad || source_grad)) return variable_list(6);
    const variable_list s = ctx->get_saved_variables();
    auto [grad_target, grad_source] = op.call(grads[0], s[5], s[0], s[1], s[2], s[3], s[4],
                                              ctx->saved_data["beta"].toDouble(), target_grad, source_grad);
    return {target_grad ? grad_target : at::Tensor(), source_grad ? grad_source : at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> consistency_hinge_autograd(const at::Tensor& target_emb,
                                                              const at::Tensor& source_emb, const at::Tensor& anchor,
                                                              const at::Tensor& positive, const at::Tensor& negative,
                                                              double beta) {
  const variable_list out = ConsistencyHingeFunction::apply(target_emb, source_emb, anchor, positive, negative, beta);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(drsl_fast, Autograd, m) { m.impl("consistency_hinge", &consistency_hinge_autograd); }

}  // namespace drsl_fast
