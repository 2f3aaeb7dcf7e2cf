// C++ CPU backend of consistency_hinge (docs/method.md §4 Eq. 6, DRSL+). Per
// triplet (anchor e_t in the target map, positive e_p and negative e_n in the
// source map, read in place at their flat positions b * P + p):
//   h = ||e_t - e_p||^2 - ||e_t - e_n||^2 + beta,   loss = sum relu(h) / used,
// over the `used` triplets whose three positions lie in their maps (absent
// ones, -1, are skipped without a read). relu keeps NaN. Backward, with
// w = 2 dL / used for each counted triplet with h > 0:
//   dL/de_t = w (e_n - e_p),  dL/de_p = w (e_p - e_t),  dL/de_n = w (e_t - e_n),
// added into zeroed gradient maps in the accumulation dtype, each element's
// terms in triplet order (deterministic), then cast to the embeddings' dtype.
//
// The rows are scattered over the maps, so the order of the reads is what
// costs. Maps stored channel by channel (pixel stride 1) are read one channel
// plane at a time for all the triplets of a task, so a plane's lines are
// fetched once and then hit the cache; other layouts a triplet's row at a
// time. Both orders add each triplet's channels in order: the same results.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <tuple>
#include <vector>

#include "../host.h"

namespace drsl_fast {
namespace {

// The least triplets per task of the forward pass.
constexpr int64_t kTripletGrain = 512;

// The triplets that count (their three positions in their maps) and are kept
// (keep[i], if given), in order: their ids and where their three rows start
// in a pair of (B, D, P) maps (target, source); channel d of a row is
// `channel` elements further per channel.
struct RowStarts {
  std::vector<int64_t> id, anchor, positive, negative;
  int64_t target_channel, source_channel;
  bool planes;  // both maps stored channel by channel

  RowStarts(const HingeProblem& p, PixelLayout target, PixelLayout source, const bool* keep = nullptr)
      : target_channel(target.channel), source_channel(source.channel),
        planes(target.pixel == 1 && source.pixel == 1) {
    const int64_t *a = p.anchor.const_data_ptr<int64_t>(), *pos = p.positive.const_data_ptr<int64_t>(),
                  *neg = p.negative.const_data_ptr<int64_t>();
    for (int64_t i = 0; i < p.T; ++i) {
      const bool counts = a[i] >= 0 && a[i] < p.Nt && pos[i] >= 0 && pos[i] < p.Ns && neg[i] >= 0 && neg[i] < p.Ns;
      if (!counts || (keep != nullptr && !keep[i])) continue;
      id.push_back(i);
      anchor.push_back(target.offset(a[i] / p.Pt, 0, a[i] % p.Pt));
      positive.push_back(source.offset(pos[i] / p.Ps, 0, pos[i] % p.Ps));
      negative.push_back(source.offset(neg[i] / p.Ps, 0, neg[i] % p.Ps));
    }
  }

  int64_t size() const { return static_cast<int64_t>(id.size()); }
};

// f(k, d, target offset, source offset of the positive, of the negative) for
// the listed triplets k in [begin, end) and the channels d in [d0, d1): a
// plane at a time if the rows lie in planes, else a row at a time; each
// triplet's channels in order either way.
template <typename F>
void for_each_element(const RowStarts& rows, int64_t begin, int64_t end, int64_t d0, int64_t d1, F&& f) {
  const auto visit = [&](int64_t k, int64_t d) {
    f(k, d, rows.anchor[k] + d * rows.target_channel, rows.positive[k] + d * rows.source_channel,
      rows.negative[k] + d * rows.source_channel);
  };
  if (rows.planes) {
    for (int64_t d = d0; d < d1; ++d)
      for (int64_t k = begin; k < end; ++k) visit(k, d);
  } else {
    for (int64_t k = begin; k < end; ++k)
      for (int64_t d = d0; d < d1; ++d) visit(k, d);
  }
}

// h of every triplet; counted says which count (h = 0 for the others).
template <typename scalar_t, typename acc_t>
void triplet_hinges(const HingeProblem& p, const RowStarts& rows, double beta, acc_t* h, bool* counted) {
  const scalar_t *target = p.target.const_data_ptr<scalar_t>(), *source = p.source.const_data_ptr<scalar_t>();
  std::fill(h, h + p.T, acc_t(0));
  std::fill(counted, counted + p.T, false);
  at::parallel_for(0, rows.size(), kTripletGrain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> to_positive(end - begin, acc_t(0)), to_negative(end - begin, acc_t(0));
    for_each_element(rows, begin, end, 0, p.D, [&](int64_t k, int64_t, int64_t t, int64_t pos, int64_t neg) {
      const acc_t e_t = static_cast<acc_t>(target[t]);
      const acc_t e_p = static_cast<acc_t>(source[pos]), e_n = static_cast<acc_t>(source[neg]);
      to_positive[k - begin] += (e_t - e_p) * (e_t - e_p);
      to_negative[k - begin] += (e_t - e_n) * (e_t - e_n);
    });
    for (int64_t k = begin; k < end; ++k) {
      counted[rows.id[k]] = true;
      h[rows.id[k]] = to_positive[k - begin] - to_negative[k - begin] + static_cast<acc_t>(beta);
    }
  });
}

// grad_target / grad_source: (B, D, P) views of the gradient maps (undefined: not asked for).
// Their layouts may differ from the embeddings': each has its own row starts.
template <typename scalar_t, typename acc_t>
void hinge_backward(const HingeProblem& p, double beta, acc_t w, at::Tensor grad_target, at::Tensor grad_source) {
  std::vector<acc_t> h(p.T);
  const std::unique_ptr<bool[]> active(new bool[p.T]);  // not vector<bool>: written by several threads
  triplet_hinges<scalar_t, acc_t>(p, RowStarts(p, layout_of(p.target), layout_of(p.source)), beta, h.data(),
                                  active.get());
  for (int64_t i = 0; i < p.T; ++i) active[i] = active[i] && h[i] > 0;  // the triplets with a gradient
  const at::Tensor& some_grad = grad_target.defined() ? grad_target : grad_source;
  const RowStarts rows(p, layout_of(p.target), layout_of(p.source), active.get());
  const RowStarts grad_rows(p, layout_of(grad_target.defined() ? grad_target : some_grad),
                            layout_of(grad_source.defined() ? grad_source : some_grad), active.get());
  const scalar_t *target = p.target.const_data_ptr<scalar_t>(), *source = p.source.const_data_ptr<scalar_t>();
  acc_t* gt = grad_target.defined() ? grad_target.mutable_data_ptr<acc_t>() : nullptr;
  acc_t* gs = grad_source.defined() ? grad_source.mutable_data_ptr<acc_t>() : nullptr;
  // One task per range of channels: the tasks write disjoint elements.
  at::parallel_for(0, p.D, 1, [&](int64_t d0, int64_t d1) {
    for_each_element(rows, 0, rows.size(), d0, d1, [&](int64_t k, int64_t d, int64_t t, int64_t pos, int64_t neg) {
      const acc_t e_t = static_cast<acc_t>(target[t]);
      const acc_t e_p = static_cast<acc_t>(source[pos]), e_n = static_cast<acc_t>(source[neg]);
      if (gt) gt[grad_rows.anchor[k] + d * grad_rows.target_channel] += w * (e_n - e_p);
      if (gs) {
        gs[grad_rows.positive[k] + d * grad_rows.source_channel] += w * (e_p - e_t);
        gs[grad_rows.negative[k] + d * grad_rows.source_channel] += w * (e_t - e_n);
      }
    });
  });
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
    acc_t* h = hinge.mutable_data_ptr<acc_t>();
    bool* flags = counted.mutable_data_ptr<bool>();
    triplet_hinges<scalar_t, acc_t>(p, RowStarts(p, layout_of(p.target), layout_of(p.source)), beta, h, flags);
    for (int64_t i = 0; i < p.T; ++i) h[i] = flags[i] && (h[i] > 0 || std::isnan(h[i])) ? h[i] : acc_t(0);
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
