// Host-side input checks shared by the CPU and CUDA backends of the MMDL loss
// ops (docs/method.md §4): per-class sampling, the fused MMDL losses and label_mode.
#pragma once
#include <ATen/ATen.h>

#include <cmath>

#include "mode_distance.h"

namespace drsl_fast {

// Sort keys of sample_per_class are uniform in [0, 2^kSampleKeyBits); the
// CUDA backend puts the class above them in one int64 sort key.
constexpr int kSampleKeyBits = 48;

inline void check_sampling_inputs(const at::Tensor& labels, const at::Tensor& keys, int64_t num_classes, int64_t k) {
  TORCH_CHECK(labels.dim() == 3, "sample_per_class: labels must be (B, H, W), got ", labels.sizes());
  TORCH_CHECK(!at::isFloatingType(labels.scalar_type()) && labels.scalar_type() != at::kBool,
              "sample_per_class: labels must be an integer tensor, got ", labels.scalar_type());
  TORCH_CHECK(keys.scalar_type() == at::kLong && keys.dim() == 2 && keys.size(0) == labels.size(0) &&
                  keys.size(1) == labels.size(1) * labels.size(2),
              "sample_per_class: keys must be int64 (B, H*W)");
  TORCH_CHECK(keys.device() == labels.device(), "sample_per_class: keys and labels must be on one device");
  TORCH_CHECK(num_classes >= 1 && num_classes < (int64_t(1) << (62 - kSampleKeyBits)),
              "sample_per_class: num_classes must be in [1, 16384), got ", num_classes);
  TORCH_CHECK(k >= 0, "sample_per_class: k must be >= 0, got ", k);
}

// emb (B, D, H, W) or (N, D) (one image); index and label int64 (B, S); modes (C, M, D).
inline void check_sample_inputs(const char* op, const at::Tensor& emb, const at::Tensor& index,
                                const at::Tensor& label, const at::Tensor& modes) {
  check_mode_distance_inputs(emb, modes);
  const int64_t B = emb.dim() == 4 ? emb.size(0) : 1;
  TORCH_CHECK(index.dim() == 2 && index.size(0) == B, op, ": index must be (B, S) with B=", B, ", got ",
              index.sizes());
  TORCH_CHECK(label.sizes() == index.sizes(), op, ": label must be shaped like index ", index.sizes(), ", got ",
              label.sizes());
  TORCH_CHECK(index.scalar_type() == at::kLong && label.scalar_type() == at::kLong, op,
              ": index and label must be int64");
  TORCH_CHECK(index.device() == emb.device() && label.device() == emb.device(), op,
              ": index and label must be on the embeddings' device ", emb.device());
}

inline void check_loss_params(double sigma, double alpha, double scale) {
  TORCH_CHECK(std::isfinite(sigma) && sigma > 0, "mmdl_losses: sigma must be finite and > 0, got ", sigma);
  TORCH_CHECK(std::isfinite(alpha) && std::isfinite(scale), "mmdl_losses: alpha and scale must be finite");
}

// One validated call of a per-sample op: emb viewed as (B, D, P), the modes in
// the accumulation dtype, contiguous index and label, and the sizes.
struct SampleProblem {
  at::Tensor bdp, modes, index, label;
  at::ScalarType acc_dtype;
  int64_t B, S, P, C, M, D;
};

inline SampleProblem sample_problem(const char* op, const at::Tensor& emb, const at::Tensor& index,
                                    const at::Tensor& label, const at::Tensor& modes) {
  check_sample_inputs(op, emb, index, label, modes);
  const at::Tensor bdp = as_bdp(emb);
  const auto acc_dtype = accumulate_dtype(emb);
  const at::Tensor centres = modes.to(acc_dtype).contiguous();
  const at::Tensor samples = index.contiguous();
  return {bdp, centres, samples, label.contiguous(), acc_dtype, samples.size(0), samples.size(1), bdp.size(2),
          centres.size(0), centres.size(1), centres.size(2)};
}

}  // namespace drsl_fast
