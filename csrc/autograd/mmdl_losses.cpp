// Autograd of drsl_fast::mmdl_losses (docs/method.md §4 Eq. 4 and 5), for
// every backend that registers the op's kernels (CPU, CUDA): the forward saves
// its inputs, the backward calls drsl_fast::mmdl_losses_backward, which
// recomputes the distances (nothing of size samples x C is kept between the
// passes). With mean, every counted sample's gradient is the mean's divided by
// max(count, 1), a 0-d gradient the backward spreads over the samples (it
// ignores those that do not count). A loss whose value is unused gets a zero
// gradient; the count has none. In C++ so that a call issues no Python beyond
// the op's own wrapper, and the means are no autograd nodes of their own.
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

using Forward = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                               const at::Tensor&, const at::Tensor&, double, double,
                                                               double, bool);
using Backward = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                    const at::Tensor&, const at::Tensor&, const at::Tensor&, double,
                                                    double, double, bool, bool);

class MMDLLossesFunction : public torch::autograd::Function<MMDLLossesFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& emb, const at::Tensor& index,
                               const at::Tensor& label, const at::Tensor& modes, double sigma, double alpha,
                               double scale, bool mean) {
    static const auto op =
        c10::Dispatcher::singleton().findSchemaOrThrow("drsl_fast::mmdl_losses", "").typed<Forward>();
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [triplet, ce, count] = op.call(emb, index, label, modes, sigma, alpha, scale, mean);
    ctx->save_for_backward({emb, index, label, modes, mean ? count : at::Tensor()});
    ctx->saved_data["sigma"] = sigma;
    ctx->saved_data["alpha"] = alpha;
    ctx->saved_data["scale"] = scale;
    ctx->mark_non_differentiable({count});
    ctx->set_materialize_grads(false);
    return {triplet, ce, count};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op =
        c10::Dispatcher::singleton().findSchemaOrThrow("drsl_fast::mmdl_losses_backward", "").typed<Backward>();
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &emb = saved[0], &index = saved[1], &label = saved[2], &modes = saved[3], &count = saved[4];
    at::Tensor grad_triplet = grads[0], grad_ce = grads[1];
    if (!grad_triplet.defined() || !grad_ce.defined()) {  // one loss unused: zeros for its gradient
      const at::Tensor zeros = at::zeros({}, index.options().dtype(accumulate_dtype(emb)));
      if (!grad_triplet.defined()) grad_triplet = zeros;
      if (!grad_ce.defined()) grad_ce = zeros;
    }
    if (count.defined()) {  // the means: d mean / d sample = 1 / max(count, 1)
      const at::Tensor divisor = count.clamp_min(1);
      grad_triplet = grad_triplet / divisor;
      grad_ce = grad_ce / divisor;
    }
    const bool emb_grad = ctx->needs_input_grad(0), modes_grad = ctx->needs_input_grad(3);
    auto [grad_emb, grad_modes] =
        op.call(grad_triplet, grad_ce, emb, index, label, modes, ctx->saved_data["sigma"].toDouble(),
                ctx->saved_data["alpha"].toDouble(), ctx->saved_data["scale"].toDouble(), emb_grad, modes_grad);
    return {emb_grad ? grad_emb : at::Tensor(), at::Tensor(), at::Tensor(),
            modes_grad ? grad_modes : at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> mmdl_losses_autograd(const at::Tensor& emb, const at::Tensor& index,
                                                                    const at::Tensor& label, const at::Tensor& modes,
                                                                    double sigma, double alpha, double scale,
                                                                    bool mean) {
  const variable_list out = MMDLLossesFunction::apply(emb, index, label, modes, sigma, alpha, scale, mean);
  return {out[0], out[1], out[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(drsl_fast, Autograd, m) { m.impl("mmdl_losses", &mmdl_losses_autograd); }

}  // namespace drsl_fast
