// C++ CPU backend of consistency_hinge (docs/method.md §4 Eq. 6, DRSL+). Per
// triplet (anchor e_t in the target map, positive e_p and negative e_n in the
// source map, read in place at their flat positions b * P + p):
//   h = ||e_t - e_p||^2 - ||e_t - e_n||^2 + beta,   loss = sum relu(h) / used,
// over the `used` triplets whose three positions lie in their maps (absent
// ones, -1, are skipped without a read). relu keeps NaN. Backward, with
// w = 2 dL / used for each counted triplet with h > 0:
//   dL/de_t = w (e_n - e_p),  dL/de_p = w (e_p - e_t),  dL/de_n = w (e_t - e_n),
// added into zeroed gradient maps one triplet after the other (a fixed order:
// deterministic), in the accumulation dtype, then cast to the embeddings'.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

#include "../host.h"

namespace drsl_fast {
namespace {

template <typename scalar_t, typename acc_t>
struct Rows {
  const scalar_t* data;
  PixelLayout L;
  int64_t P, D;

  explicit Rows(const at::Tensor& bdp)
      : data(bdp.const_data_ptr<scalar_t>()), L(layout_of(bdp)), P(bdp.size(2)), D(bdp.size(1)) {}

  void read(int64_t flat, acc_t* row) const {
    for (int64_t d = 0; d < D; ++d) row[d] = static_cast<acc_t>(data[L.offset(flat / P, d, flat % P)]);
  }
};

// The flat positions of the triplets.
struct Positions {
  const int64_t *anchor, *positive, *negative;

  explicit Positions(const HingeProblem& p)
      : anchor(p.anchor.const_data_ptr<int64_t>()), positive(p.positive.const_data_ptr<int64_t>()),
        negative(p.negative.const_data_ptr<int64_t>()) {}
};

// Whether the triplet (a, pos, neg) counts; its rows in e_t, e_p, e_n and h when it does.
template <typename scalar_t, typename acc_t>
bool triplet(const HingeProblem& p, const Rows<scalar_t, acc_t>& target, const Rows<scalar_t, acc_t>& source,
             int64_t a, int64_t pos, int64_t neg, double beta, acc_t* e_t, acc_t* e_p, acc_t* e_n, acc_t& h) {
  if (a < 0 || a >= p.Nt || pos < 0 || pos >= p.Ns || neg < 0 || neg >= p.Ns) return false;
  target.read(a, e_t);
  source.read(pos, e_p);
  source.read(neg, e_n);
  acc_t to_positive = 0, to_negative = 0;
  for (int64_t d = 0; d < p.D; ++d) {
    to_positive += (e_t[d] - e_p[d]) * (e_t[d] - e_p[d]);
    to_negative += (e_t[d] - e_n[d]) * (e_t[d] - e_n[d]);
  }
  h = to_positive - to_negative + static_cast<acc_t>(beta);
  return true;
}

template <typename scalar_t, typename acc_t>
void hinge_forward(const HingeProblem& p, double beta, acc_t* hinge, bool* counted) {
  const Rows<scalar_t, acc_t> target(p.target), source(p.source);
  const Positions positions(p);
  std::vector<acc_t> e_t(p.D), e_p(p.D), e_n(p.D);
  for (int64_t i = 0; i < p.T; ++i) {
    acc_t h = 0;
    counted[i] = triplet(p, target, source, positions.anchor[i], positions.positive[i], positions.negative[i], beta,
                         e_t.data(), e_p.data(), e_n.data(), h);
    hinge[i] = counted[i] && (h > 0 || std::isnan(h)) ? h : acc_t(0);
  }
}

// grad_target / grad_source: (B, D, P) views of the gradient maps (undefined: not asked for).
template <typename scalar_t, typename acc_t>
void hinge_backward(const HingeProblem& p, double beta, acc_t w, at::Tensor grad_target, at::Tensor grad_source) {
  const Rows<scalar_t, acc_t> target(p.target), source(p.source);
  acc_t* gt = grad_target.defined() ? grad_target.mutable_data_ptr<acc_t>() : nullptr;
  acc_t* gs = grad_source.defined() ? grad_source.mutable_data_ptr<acc_t>() : nullptr;
  const PixelLayout Lt = gt ? layout_of(grad_target) : PixelLayout{}, Ls = gs ? layout_of(grad_source) : PixelLayout{};
  const Positions positions(p);
  std::vector<acc_t> e_t(p.D), e_p(p.D), e_n(p.D);
  for (int64_t i = 0; i < p.T; ++i) {
    const int64_t a = positions.anchor[i], pos = positions.positive[i], neg = positions.negative[i];
    acc_t h = 0;
    if (!triplet(p, target, source, a, pos, neg, beta, e_t.data(), e_p.data(), e_n.data(), h) || !(h > 0)) continue;
    for (int64_t d = 0; d < p.D; ++d) {
      if (gt) gt[Lt.offset(a / p.Pt, d, a % p.Pt)] += w * (e_n[d] - e_p[d]);
      if (gs) {
        gs[Ls.offset(pos / p.Ps, d, pos % p.Ps)] += w * (e_p[d] - e_t[d]);
        gs[Ls.offset(neg / p.Ps, d, neg % p.Ps)] += w * (e_t[d] - e_n[d]);
      }
    }
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> consistency_hinge_cpu(const at::Tensor& target_emb, const at::Tensor& source_emb,
                                                         const at::Tensor& anchor, const at::Tensor& positive,
                                                         const at::Tensor& negative, double beta) {
  const HingeProblem p = hinge_problem(target_emb, source_emb, anchor, positive, negative, beta);
  at::Tensor hinge, counted;  // named tensors, not bindings: the dispatch lambda captures them
  std::tie(hinge, counted) = p.per_triplet();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, target_emb.scalar_type(), "consistency_hinge_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    hinge_forward<scalar_t, acc_t>(p, beta, hinge.mutable_data_ptr<acc_t>(), counted.mutable_data_ptr<bool>());
  });
  const auto [mean, unused, used] = flagged_means(hinge, at::Tensor(), counted);
  return {mean, used};
}

std::tuple<at::Tensor, at::Tensor> consistency_hinge_backward_cpu(
    const at::Tensor& grad, const at::Tensor& used, const at::Tensor& target_emb, const at::Tensor& source_emb,
    const at::Tensor& anchor, const at::Tensor& positive, const at::Tensor& negative, double beta,
    bool target_requires_grad, bool source_requires_grad) {
  const HingeProblem p = hinge_problem(target_emb, source_emb, anchor, positive, negative, beta);
  at::Tensor grad_target, grad_source;  // named tensors, not bindings: the dispatch lambda captures them
  std::tie(grad_target, grad_source) =
      p.zero_gradients(target_emb, source_emb, target_requires_grad, source_requires_grad);
  if (target_requires_grad || source_requires_grad) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, target_emb.scalar_type(), "consistency_hinge_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      // CPU scalars, read directly (no _local_scalar_dense in the dispatcher's view)
      const acc_t g = *grad.to(p.acc_dtype).contiguous().const_data_ptr<acc_t>();
      const int64_t n = *used.to(at::kLong).contiguous().const_data_ptr<int64_t>();
      const acc_t w = 2 * g / static_cast<acc_t>(std::max<int64_t>(n, 1));
      hinge_backward<scalar_t, acc_t>(p, beta, w, target_requires_grad ? as_bdp(grad_target) : at::Tensor(),
                                      source_requires_grad ? as_bdp(grad_source) : at::Tensor());
    });
  }
  return {hinge_gradient(grad_target, target_emb), hinge_gradient(grad_source, source_emb)};
}

TORCH_LIBRARY_IMPL(drsl_fast, CPU, m) {
  m.impl("consistency_hinge", &consistency_hinge_cpu);
  m.impl("consistency_hinge_backward", &consistency_hinge_backward_cpu);
}

}  // namespace drsl_fast
