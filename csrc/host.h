// Host-side code shared by the CPU (csrc/cpu/) and CUDA (csrc/cuda/) backends
// of every op: per-pixel tensors viewed as (batch, channel, pixel) with the
// strides of kernels/pixel_layout.h, the input checks (a second line of
// defence behind drsl_fast/ops/, for C++ callers), the validated inputs, and
// the outputs both backends allocate alike. Grouped by op.
#pragma once
#include <ATen/ATen.h>

#include <cmath>
#include <limits>
#include <optional>
#include <utility>
#include <vector>

#include "../kernels/class_sampling.h"
#include "../kernels/confidence_bins.h"
#include "../kernels/pixel_layout.h"

namespace drsl_fast {

// ------------------------------------------------------------ per-pixel views

// Views a per-pixel tensor, (B, D, H, W) or (N, D), as (B, D, P) without
// copying where the strides allow it (contiguous and channels-last inputs,
// any (N, D) matrix).
inline at::Tensor as_bdp(const at::Tensor& emb) {
  if (emb.dim() == 2) return emb.t().unsqueeze(0);
  return emb.reshape({emb.size(0), emb.size(1), emb.size(2) * emb.size(3)});
}

// A new tensor shaped like emb (of emb's dtype, or of `dtype`) whose as_bdp()
// is always a view: same strides for (N, D); for (B, D, H, W) channels-last
// where emb is channels-last contiguous (and not contiguous), else contiguous.
// The rule of the ops' fake kernels (drsl_fast/ops/mode_distance.py), so that
// the strides they promise are the ones returned: a channel slice of a
// channels-last tensor, which suggest_memory_format() calls channels-last,
// gets contiguous gradients here as there.
inline at::Tensor empty_like_pixel_viewable(const at::Tensor& emb, std::optional<at::ScalarType> dtype = {}) {
  const auto options = emb.options().dtype(dtype.value_or(emb.scalar_type()));
  if (emb.dim() == 2) return at::empty_like(emb, options);
  const bool channels_last = emb.is_contiguous(at::MemoryFormat::ChannelsLast) && !emb.is_contiguous();
  const auto format = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  return at::empty(emb.sizes(), options.memory_format(format));
}

inline PixelLayout layout_of(const at::Tensor& bdp) {
  return PixelLayout{bdp.stride(0), bdp.stride(1), bdp.stride(2)};
}

inline at::ScalarType accumulate_dtype(const at::Tensor& emb) {
  return emb.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// ------------------------------------------------------------ mode_distance

// Shape of the per-class outputs (dmin, mstar, posterior): (B, C, H, W) or (N, C).
inline std::vector<int64_t> per_class_shape(const at::Tensor& emb, int64_t C) {
  if (emb.dim() == 2) return {emb.size(0), C};
  return {emb.size(0), C, emb.size(2), emb.size(3)};
}

// Layout of a contiguous per-class tensor, addressed as (b, c, pixel).
inline PixelLayout per_class_layout(const at::Tensor& emb, int64_t C) {
  if (emb.dim() == 2) return PixelLayout{0, 1, C};
  const int64_t P = emb.size(2) * emb.size(3);
  return PixelLayout{C * P, P, 1};
}

inline void check_mode_distance_inputs(const at::Tensor& emb, const at::Tensor& modes) {
  TORCH_CHECK(emb.dim() == 2 || emb.dim() == 4, "mode_distance: emb must be (B, D, H, W) or (N, D), got ",
              emb.sizes());
  TORCH_CHECK(modes.dim() == 3, "mode_distance: modes must be (C, M, D), got ", modes.sizes());
  TORCH_CHECK(emb.size(1) == modes.size(2), "mode_distance: emb has D=", emb.size(1), " channels but modes have D=",
              modes.size(2));
  TORCH_CHECK(modes.size(1) >= 1 && modes.size(1) <= kMaxModes, "mode_distance: M must be in [1, ", kMaxModes,
              "], got ", modes.size(1));
  TORCH_CHECK(modes.size(0) >= 1, "mode_distance: modes need at least one class");
  TORCH_CHECK(emb.device() == modes.device(), "mode_distance: emb is on ", emb.device(), " but modes on ",
              modes.device());
}

inline void check_sigma(std::optional<double> sigma) {
  TORCH_CHECK(!sigma.has_value() || (std::isfinite(*sigma) && *sigma > 0),
              "mode_distance: sigma must be a finite number > 0, got ", sigma.value_or(0.0));
}

// -1 / (2 sigma^2) in the accumulation type, -inf where it overflows (tiny
// sigma); as posterior_scale of drsl_fast/reference.py.
template <typename acc_t>
inline acc_t posterior_scale(double sigma) {
  const double scale = -0.5 / sigma / sigma;
  constexpr acc_t largest = std::numeric_limits<acc_t>::max();
  return -scale > static_cast<double>(largest) ? -std::numeric_limits<acc_t>::infinity() : static_cast<acc_t>(scale);
}

// One validated mode-distance call: emb viewed as (B, D, P), the modes in the
// accumulation dtype, and the sizes.
struct ModeDistanceProblem {
  at::Tensor bdp;
  at::Tensor modes;
  at::ScalarType acc_dtype;
  int64_t B, P, C, M, D;
};

inline ModeDistanceProblem mode_distance_problem(const at::Tensor& emb, const at::Tensor& modes) {
  check_mode_distance_inputs(emb, modes);
  const at::Tensor bdp = as_bdp(emb);
  const auto acc_dtype = accumulate_dtype(emb);
  const at::Tensor centres = modes.to(acc_dtype).contiguous();
  return {bdp, centres, acc_dtype, bdp.size(0), bdp.size(2), centres.size(0), centres.size(1), centres.size(2)};
}

// The forward's outputs; the posterior is empty without sigma.
struct ModeDistanceOutputs {
  at::Tensor dmin, mstar, posterior;

  operator std::tuple<at::Tensor, at::Tensor, at::Tensor>() const { return {dmin, mstar, posterior}; }
};

// Checks sigma and allocates the forward's outputs.
inline ModeDistanceOutputs mode_distance_outputs(const at::Tensor& emb, const ModeDistanceProblem& p,
                                                 std::optional<double> sigma) {
  check_sigma(sigma);
  const std::vector<int64_t> shape = per_class_shape(emb, p.C);
  at::Tensor dmin = at::empty(shape, emb.options().dtype(p.acc_dtype));
  at::Tensor posterior = at::empty(sigma ? shape : std::vector<int64_t>{0}, dmin.options());
  return {dmin, at::empty(shape, emb.options().dtype(at::kByte)), posterior};
}

// The upstream gradient (accumulation dtype) and mstar, both contiguous and
// shaped like the per-class outputs.
inline std::pair<at::Tensor, at::Tensor> backward_inputs(const at::Tensor& grad_dmin, const at::Tensor& mstar,
                                                         const at::Tensor& emb, const ModeDistanceProblem& p) {
  const std::vector<int64_t> shape = per_class_shape(emb, p.C);
  TORCH_CHECK(grad_dmin.sizes() == at::IntArrayRef(shape) && mstar.sizes() == at::IntArrayRef(shape),
              "mode_distance_backward: grad and mstar must be shaped ", at::IntArrayRef(shape));
  return {grad_dmin.to(p.acc_dtype).contiguous(), mstar.contiguous()};
}

// ------------------------------------------------------------ class_sampling

// Keys of sample_per_class are uniform in [0, 2^kSampleKeyBits)
// (kernels/class_sampling.h).

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

// ------------------------------------------------------------ mmdl_losses, label_mode

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

  // A (B, S) tensor per sample in the accumulation dtype: losses, their gradients.
  at::Tensor per_sample(const at::Tensor& like) const {
    return at::empty({B, S}, like.options().dtype(acc_dtype));
  }

  // A (B, S) bool tensor: whether each sample counts.
  at::Tensor flags() const { return at::empty({B, S}, index.options().dtype(at::kBool)); }
};

// The end of a per-item loss op on the CPU (mmdl_losses, consistency_hinge;
// the CUDA ops launch csrc/cuda/flagged_means.h instead): mean(a), mean(b)
// over the flagged items (0 when none; undefined where a or b is) and the
// number flagged (int64, 0-d). a and b hold 0 where an item is not flagged.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> flagged_means(const at::Tensor& a, const at::Tensor& b,
                                                                    const at::Tensor& flagged) {
  at::Tensor count = flagged.sum(at::kLong);
  const at::Tensor divisor = count.clamp_min(1);  // a 0-d int64 divisor keeps the values' dtype
  return {a.defined() ? a.sum() / divisor : a, b.defined() ? b.sum() / divisor : b, count};
}

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

// ------------------------------------------------------------ consistency_triplets

// Anchors: index, label int64 and mode uint8 (Bt, S), draws float64 (2, Bt, S);
// source pixels: label (any integer dtype) and mode uint8 (Bs, P).
struct TripletProblem {
  at::Tensor anchor_index, anchor_label, anchor_mode, draws, source_label, source_mode;
  int64_t Bt, S, Bs, P, C, M, target_pixels;

  // anchor, positive, negative (int64, -1 where absent), valid (bool) shaped like the
  // anchors, and the skip counts (no positive, no negative) as int64 (2,).
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> outputs() const {
    const auto options = anchor_index.options();
    return {at::empty({Bt, S}, options), at::empty({Bt, S}, options), at::empty({Bt, S}, options),
            at::empty({Bt, S}, options.dtype(at::kBool)), at::zeros({2}, options)};
  }
};

inline TripletProblem triplet_problem(const at::Tensor& anchor_index, const at::Tensor& anchor_label,
                                      const at::Tensor& anchor_mode, const at::Tensor& source_label,
                                      const at::Tensor& source_mode, const at::Tensor& draws, int64_t num_classes,
                                      int64_t num_modes, int64_t target_pixels) {
  constexpr const char* op = "consistency_triplets";
  TORCH_CHECK(anchor_index.dim() == 2, op, ": anchor_index must be (B, S), got ", anchor_index.sizes());
  TORCH_CHECK(anchor_label.sizes() == anchor_index.sizes() && anchor_mode.sizes() == anchor_index.sizes(), op,
              ": anchor_label and anchor_mode must be shaped like anchor_index ", anchor_index.sizes());
  TORCH_CHECK(anchor_index.scalar_type() == at::kLong && anchor_label.scalar_type() == at::kLong, op,
              ": anchor_index and anchor_label must be int64");
  TORCH_CHECK(anchor_mode.scalar_type() == at::kByte && source_mode.scalar_type() == at::kByte, op,
              ": anchor_mode and source_mode must be uint8 (label_mode's output)");
  TORCH_CHECK(draws.scalar_type() == at::kDouble && draws.dim() == 3 && draws.size(0) == 2 &&
                  draws.size(1) == anchor_index.size(0) && draws.size(2) == anchor_index.size(1),
              op, ": draws must be float64 (2, B, S) for anchors (B, S) = ", anchor_index.sizes(), ", got ",
              draws.scalar_type(), " ", draws.sizes());
  TORCH_CHECK(source_label.dim() == 2 && source_mode.sizes() == source_label.sizes(), op,
              ": source_label and source_mode must be (B, P) alike, got ", source_label.sizes(), " and ",
              source_mode.sizes());
  TORCH_CHECK(!at::isFloatingType(source_label.scalar_type()) && source_label.scalar_type() != at::kBool, op,
              ": source_label must be an integer tensor, got ", source_label.scalar_type());
  for (const at::Tensor* t : {&anchor_label, &anchor_mode, &source_label, &source_mode, &draws})
    TORCH_CHECK(t->device() == anchor_index.device(), op, ": every input must be on ", anchor_index.device());
  TORCH_CHECK(num_modes >= 1 && num_modes <= kMaxModes, op, ": num_modes must be in [1, ", kMaxModes, "], got ",
              num_modes);
  TORCH_CHECK(num_classes >= 1 && num_classes * num_modes < (int64_t(1) << 30), op,
              ": num_classes must be >= 1 with num_classes * num_modes < 2^30, got ", num_classes);
  TORCH_CHECK(target_pixels >= 0, op, ": target_pixels must be >= 0, got ", target_pixels);
  return {anchor_index.contiguous(), anchor_label.contiguous(), anchor_mode.contiguous(), draws.contiguous(),
          source_label.contiguous(), source_mode.contiguous(), anchor_index.size(0), anchor_index.size(1),
          source_label.size(0), source_label.size(1), num_classes, num_modes, target_pixels};
}

// ------------------------------------------------------------ consistency_hinge

// target_emb (Bt, D, H, W) or (N, D), source_emb likewise (same D, dtype, device);
// anchor, positive, negative int64 of one shape: T flat positions b * P + p.
struct HingeProblem {
  at::Tensor target, source;                // (B, D, P) views
  at::Tensor anchor, positive, negative;    // contiguous, flattened
  at::ScalarType acc_dtype;
  int64_t T, D, Pt, Ps, Nt, Ns;             // triplets; channels; pixels per image; flat positions

  // The forward kernels' outputs: each triplet's hinge (accumulation dtype) and whether it counts.
  std::pair<at::Tensor, at::Tensor> per_triplet() const {
    return {at::empty({T}, target.options().dtype(acc_dtype)), at::empty({T}, anchor.options().dtype(at::kBool))};
  }

  // The backward's gradient maps: like the embeddings in the accumulation dtype, zeroed, each
  // (B, D, P) view a view; an empty tensor for a map not asked for.
  std::pair<at::Tensor, at::Tensor> zero_gradients(const at::Tensor& target_emb, const at::Tensor& source_emb,
                                                   bool target_wanted, bool source_wanted) const {
    const auto zeros_like = [&](const at::Tensor& emb, bool wanted) {
      return wanted ? empty_like_pixel_viewable(emb, acc_dtype).zero_() : emb.new_empty({0});
    };
    return {zeros_like(target_emb, target_wanted), zeros_like(source_emb, source_wanted)};
  }
};

inline HingeProblem hinge_problem(const at::Tensor& target_emb, const at::Tensor& source_emb,
                                  const at::Tensor& anchor, const at::Tensor& positive, const at::Tensor& negative,
                                  double beta) {
  constexpr const char* op = "consistency_hinge";
  for (const at::Tensor* emb : {&target_emb, &source_emb}) {
    TORCH_CHECK(emb->dim() == 2 || emb->dim() == 4, op, ": embeddings must be (B, D, H, W) or (N, D), got ",
                emb->sizes());
    TORCH_CHECK(at::isFloatingType(emb->scalar_type()), op, ": embeddings must be floating point, got ",
                emb->scalar_type());
  }
  TORCH_CHECK(target_emb.size(1) == source_emb.size(1), op, ": target and source embeddings have D=",
              target_emb.size(1), " and D=", source_emb.size(1));
  TORCH_CHECK(target_emb.scalar_type() == source_emb.scalar_type(), op, ": target and source embeddings are ",
              target_emb.scalar_type(), " and ", source_emb.scalar_type());
  TORCH_CHECK(anchor.sizes() == positive.sizes() && anchor.sizes() == negative.sizes(), op,
              ": anchor, positive and negative must have one shape");
  for (const at::Tensor* t : {&anchor, &positive, &negative}) {
    TORCH_CHECK(t->scalar_type() == at::kLong, op, ": anchor, positive and negative must be int64");
    TORCH_CHECK(t->device() == target_emb.device(), op, ": every input must be on ", target_emb.device());
  }
  TORCH_CHECK(source_emb.device() == target_emb.device(), op, ": every input must be on ", target_emb.device());
  TORCH_CHECK(std::isfinite(beta), op, ": beta must be finite, got ", beta);
  const at::Tensor target = as_bdp(target_emb), source = as_bdp(source_emb);
  return {target, source, anchor.contiguous().view(-1), positive.contiguous().view(-1),
          negative.contiguous().view(-1), accumulate_dtype(target_emb), anchor.numel(), target.size(1),
          target.size(2), source.size(2), target.size(0) * target.size(2), source.size(0) * source.size(2)};
}

// A gradient map computed in the accumulation dtype, in the embeddings' dtype.
inline at::Tensor hinge_gradient(const at::Tensor& grad, const at::Tensor& emb) {
  return grad.scalar_type() == emb.scalar_type() ? grad : grad.to(emb.scalar_type());
}

// ------------------------------------------------------------ pseudo_labels

inline void check_scores(const at::Tensor& scores, const char* op) {
  TORCH_CHECK(scores.dim() == 4, op, ": expected (B, C, H, W) scores, got ", scores.sizes());
  TORCH_CHECK(scores.size(1) >= 1 && scores.size(1) <= 255, op, ": need 1 <= C <= 255, got C=", scores.size(1));
}

inline void check_histogram_inputs(const at::Tensor& scores, int64_t mantissa_bits) {
  check_scores(scores, "confidence_histogram");
  TORCH_CHECK(mantissa_bits >= 0 && mantissa_bits <= kMaxMantissaBits,
              "confidence_histogram: mantissa_bits must be in [0, ", kMaxMantissaBits, "]");
}

// The thresholds as contiguous fp32 (C,).
inline at::Tensor checked_thresholds(const at::Tensor& probs, const at::Tensor& thresholds) {
  check_scores(probs, "select_labels");
  const int64_t C = probs.size(1);
  TORCH_CHECK(thresholds.dim() == 1 && thresholds.size(0) == C, "select_labels: thresholds must be (", C,
              ",), got ", thresholds.sizes());
  return thresholds.to(at::kFloat).contiguous();
}

// The uint8 (B, H, W) labels of select_labels.
inline at::Tensor empty_labels(const at::Tensor& probs) {
  return at::empty({probs.size(0), probs.size(2), probs.size(3)}, probs.options().dtype(at::kByte));
}

// ------------------------------------------------------------ entropy

inline void check_logits(const at::Tensor& logits) {
  TORCH_CHECK(logits.dim() == 4, "entropy_map: expected (B, C, H, W) logits, got ", logits.sizes());
  TORCH_CHECK(logits.size(1) >= 2, "entropy_map: needs C >= 2 classes (it divides by log2 C), got ", logits.size(1));
}

// The forward's map (B, C, H, W) (empty without with_map) and pixel entropy
// (B, H, W), in the accumulation dtype.
inline std::pair<at::Tensor, at::Tensor> entropy_outputs(const at::Tensor& logits, bool with_map) {
  const auto options = logits.options().dtype(accumulate_dtype(logits));
  at::Tensor map = with_map ? at::empty(logits.sizes(), options) : at::empty({0}, options);
  return {map, at::empty({logits.size(0), logits.size(2), logits.size(3)}, options)};
}

// The image score from the pixel entropy (B, H, W): the mean over C, H, W of
// the map is the mean over H, W of the pixel entropy / C; NaN without pixels.
inline at::Tensor image_scores(const at::Tensor& pixel, int64_t C) {
  if (pixel.numel() == 0) return at::full({pixel.size(0)}, NAN, pixel.options());
  return pixel.flatten(1).mean(1) / static_cast<double>(C);
}

// The backward's validated inputs: logits as (B, C, P), the map gradient
// (empty when the map got none) and the pixel-entropy gradient in the
// accumulation dtype, contiguous.
struct EntropyBackwardInputs {
  at::Tensor bcp, grad_map, grad_pixel;
  bool with_map_grad;
  int64_t B, C, P;
};

inline EntropyBackwardInputs entropy_backward_inputs(const at::Tensor& logits, const at::Tensor& grad_map,
                                                     const at::Tensor& grad_pixel) {
  check_logits(logits);
  const at::Tensor bcp = as_bdp(logits);
  const int64_t B = bcp.size(0), C = bcp.size(1), P = bcp.size(2);
  const auto acc_dtype = accumulate_dtype(logits);
  const bool with_map_grad = grad_map.numel() > 0;
  TORCH_CHECK(!with_map_grad || grad_map.sizes() == logits.sizes(), "entropy_map_backward: grad_map must be ",
              logits.sizes(), " or empty, got ", grad_map.sizes());
  TORCH_CHECK(grad_pixel.numel() == B * P, "entropy_map_backward: grad_pixel must be (B, H, W)");
  return {bcp, with_map_grad ? grad_map.to(acc_dtype).contiguous() : grad_map,
          grad_pixel.to(acc_dtype).contiguous(), with_map_grad, B, C, P};
}

}  // namespace drsl_fast
