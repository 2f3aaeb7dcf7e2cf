// Operator schemas of the drsl_fast library. Backends are registered per
// dispatch key in csrc/cpu/ and csrc/cuda/, the differentiable ops' autograd
// in csrc/autograd/; fake kernels (for torch.compile) are registered from
// Python (drsl_fast/ops/).
#include <torch/library.h>

TORCH_LIBRARY(drsl_fast, m) {
  // docs/method.md §3. emb (B, D, H, W) or (N, D); modes (C, M, D).
  // Returns dmin and mstar shaped (B, C, H, W) or (N, C), and the class
  // posterior exp(-dmin / (2 sigma^2)) when sigma is given (else an empty tensor).
  m.def("mode_distance(Tensor emb, Tensor modes, float? sigma) -> (Tensor dmin, Tensor mstar, Tensor posterior)");
  // mstar as the forward returns it. A value >= M raises on the CPU; on a GPU
  // the kernels stop (a trap: a CUDA error at the next synchronisation).
  m.def(
      "mode_distance_backward(Tensor grad_dmin, Tensor emb, Tensor modes, Tensor mstar, "
      "bool emb_requires_grad, bool modes_requires_grad) -> (Tensor grad_emb, Tensor grad_modes)");

  // docs/method.md §4 (DRSL losses). labels (B, H, W) integer, keys int64 (B, H*W)
  // uniform in [0, 2^48). Returns index (B, C, k) int64 padded with -1, count (B, C).
  m.def("sample_per_class(Tensor labels, Tensor keys, int num_classes, int k) -> (Tensor index, Tensor count)");
  // Eq. 4 and 5; index, label int64 (B, S). Returns triplet and ce, per sample
  // (B, S) (0 where a sample does not count) or, with mean, their means over the
  // counted samples (0-d, 0 when none), and the number of counted samples (int64, 0-d).
  // The backward takes per-sample gradients (or 0-d ones, the same for every sample).
  m.def(
      "mmdl_losses(Tensor emb, Tensor index, Tensor label, Tensor modes, float sigma, float alpha, float scale, "
      "bool mean) -> (Tensor triplet, Tensor ce, Tensor count)");
  m.def(
      "mmdl_losses_backward(Tensor grad_triplet, Tensor grad_ce, Tensor emb, Tensor index, Tensor label, "
      "Tensor modes, float sigma, float alpha, float scale, bool emb_requires_grad, bool modes_requires_grad) "
      "-> (Tensor grad_emb, Tensor grad_modes)");
  // mstar of each sample's own class, uint8 (B, S), 255 where the sample does not count.
  m.def("label_mode(Tensor emb, Tensor index, Tensor label, Tensor modes) -> Tensor");
  // Eq. 6 triplets (kernels/consistency_triplets.h). Anchors: index, label int64 and
  // mode uint8 (B, S), draws float64 (2, B, S); source pixels: label (integer)
  // and mode uint8 (B', P). Returns flat anchor, positive and negative positions
  // (B, S) int64 (-1 where absent), valid (B, S) bool and the skip counts (2,).
  m.def(
      "consistency_triplets(Tensor anchor_index, Tensor anchor_label, Tensor anchor_mode, Tensor source_label, "
      "Tensor source_mode, Tensor draws, int num_classes, int num_modes, int target_pixels) "
      "-> (Tensor anchor, Tensor positive, Tensor negative, Tensor valid, Tensor skipped)");
  // Eq. 6 loss over the drawn triplets: target_emb, source_emb (B, D, H, W) or (N, D);
  // anchor, positive, negative int64 flat positions (any shape; out of range: skipped).
  // Returns the mean hinge over the counted triplets (0 when none) and their number.
  m.def(
      "consistency_hinge(Tensor target_emb, Tensor source_emb, Tensor anchor, Tensor positive, Tensor negative, "
      "float beta) -> (Tensor loss, Tensor used)");
  m.def(
      "consistency_hinge_backward(Tensor grad, Tensor used, Tensor target_emb, Tensor source_emb, Tensor anchor, "
      "Tensor positive, Tensor negative, float beta, bool target_requires_grad, bool source_requires_grad) "
      "-> (Tensor grad_target, Tensor grad_source)");

  // docs/method.md §5. scores (B, C, H, W) probabilities or logits ->
  // int64 counts (C, 1 + 24 * 2^mantissa_bits) per (argmax class, confidence
  // bin of kernels/confidence_bins.h). select_labels: probs (B, C, H, W),
  // thresholds (C,) -> uint8 labels (B, H, W), 255 where max_c prob/t < 1.
  m.def("confidence_histogram(Tensor scores, bool from_logits, int mantissa_bits) -> Tensor");
  m.def("select_labels(Tensor probs, Tensor thresholds) -> Tensor");
  // docs/method.md §7. logits (B, C, H, W) -> the normalised self-information map
  // (B, C, H, W) (empty without with_map), the pixel entropy (B, H, W) and the
  // per-image mean of the map (B,). The backward takes the map's gradient
  // (empty = 0) and the pixel entropy's (which includes the image mean's).
  m.def("entropy_map(Tensor logits, bool with_map) -> (Tensor map, Tensor pixel_entropy, Tensor image_score)");
  m.def("entropy_map_backward(Tensor logits, Tensor grad_map, Tensor grad_pixel) -> Tensor");
}
