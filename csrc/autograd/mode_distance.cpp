// Autograd of drsl_fast::mode_distance (docs/method.md §3), for every backend
// that registers the op's kernels (CPU, CUDA): the forward saves emb, modes,
// mstar and the posterior; the backward adds the posterior's gradient to
// dmin's (P = exp(-dmin / (2 sigma^2)), so dP/ddmin = -P / (2 sigma^2)) and
// calls drsl_fast::mode_distance_backward, whose gradient flows through the
// winning modes only. In C++ rather than Python, so that a call issues no
// Python beyond the op's own wrapper (bench/probe_host_time.py measures it).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "../host.h"

namespace drsl_fast {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using Forward = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                 std::optional<double>);
using Backward = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                    const at::Tensor&, bool, bool);

class ModeDistanceFunction : public torch::autograd::Function<ModeDistanceFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& emb, const at::Tensor& modes,
                               std::optional<double> sigma) {
    static const auto op =
        c10::Dispatcher::singleton().findSchemaOrThrow("drsl_fast::mode_distance", "").typed<Forward>();
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [dmin, mstar, posterior] = op.call(emb, modes, sigma);
    ctx->save_for_backward({emb, modes, mstar, posterior});
    if (sigma) ctx->saved_data["sigma"] = *sigma;
    ctx->mark_non_differentiable({mstar});
    ctx->set_materialize_grads(false);  // an unused output's gradient stays undefined: no zeros to fill
    return {dmin, mstar, posterior};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op =
        c10::Dispatcher::singleton().findSchemaOrThrow("drsl_fast::mode_distance_backward", "").typed<Backward>();
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &emb = saved[0], &modes = saved[1], &mstar = saved[2], &posterior = saved[3];
    at::Tensor grad = grads[0];
    if (ctx->saved_data.count("sigma") > 0 && grads[2].defined()) {
      const double sigma = ctx->saved_data["sigma"].toDouble();
      // -1 / (2 sigma^2) as the posterior's dtype holds it (-inf where it overflows)
      const double scale = posterior.scalar_type() == at::kDouble ? posterior_scale<double>(sigma)
                                                                   : posterior_scale<float>(sigma);
      const at::Tensor through_posterior = grads[2] * posterior * scale;
      grad = grad.defined() ? grad + through_posterior : through_posterior;
    }
    if (!grad.defined()) grad = at::zeros_symint(mstar.sym_sizes(), posterior.options());
    const bool emb_grad = ctx->needs_input_grad(0), modes_grad = ctx->needs_input_grad(1);
    auto [grad_emb, grad_modes] = op.call(grad, emb, modes, mstar, emb_grad, modes_grad);
    return {emb_grad ? grad_emb : at::Tensor(), modes_grad ? grad_modes : at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> mode_distance_autograd(const at::Tensor& emb, const at::Tensor& modes,
                                                                      std::optional<double> sigma) {
  const variable_list out = ModeDistanceFunction::apply(emb, modes, sigma);
  return {out[0], out[1], out[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(drsl_fast, Autograd, m) { m.impl("mode_distance", &mode_distance_autograd); }

}  // namespace drsl_fast
