// One Eq. 6 triplet (docs/method.md §4, DRSL+) from the source pixels grouped
// by (class, mode): the per-anchor half of drsl_fast::consistency_triplets,
// shared by the C++ CPU kernel and the CUDA kernel.
//
// Groups. Source pixel f (flat b * P + p over the source batch) belongs to
// group g = label * M + mode when it counts (0 <= label < C, mode < M), else to
// the spare group C * M. `order` lists the flat positions grouped by g in
// increasing g, and in increasing f inside a group (a stable sort by g);
// `start[g]` is where group g begins in it, for g = 0 .. C * M, so that
//   group g's run:      order[start[g] .. start[g + 1])
//   class c's run:      order[start[c * M] .. start[(c + 1) * M])  (its M groups)
//   labelled pixels:    order[0 .. start[C * M])
//
// Draw. An anchor with label y and mode m (its own class's nearest mode) has
//   n+ = |group y * M + m|            candidates for the positive,
//   n- = labelled - |class y|         candidates for the negative,
// and two uniform draws u+, u- in [0, 1) pick i+ = floor(u+ n+) and
// i- = floor(u- n-) (in doubles; counts stay below 2^53, so u n rounds to
// below n and the picks lie in [0, n)). The positive is entry i+ of its group's
// run; the negative entry i- of the labelled pixels with class y's run cut out
// (the runs of classes below y, then those above). An anchor counts when
// 0 <= y < C and m < M; it is valid when it counts and n+ > 0 and n- > 0.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define DRSL_FAST_HOST_DEVICE __host__ __device__
#else
#define DRSL_FAST_HOST_DEVICE
#endif

namespace drsl_fast {

// Mode value meaning "no mode" (label_mode's output for a sample that does not count).
constexpr uint8_t kNoMode = 255;

struct Triplet {
  int64_t anchor;    // flat target position, -1 when the anchor does not count
  int64_t positive;  // flat source positions, -1 unless valid
  int64_t negative;
  bool valid;
  bool no_positive;  // counts, but n+ = 0
  bool no_negative;  // counts, but n- = 0
};

// The group of a source pixel (see above).
DRSL_FAST_HOST_DEVICE inline int64_t source_group(int64_t label, uint8_t mode, int64_t C, int64_t M) {
  return label >= 0 && label < C && mode < M ? label * M + mode : C * M;
}

// Anchor (image b, pixel index, label y, mode m) with draws u_positive, u_negative.
DRSL_FAST_HOST_DEVICE inline Triplet draw_triplet(int64_t b, int64_t index, int64_t y, uint8_t m, double u_positive,
                                                  double u_negative, const int64_t* start, const int64_t* order,
                                                  int64_t C, int64_t M, int64_t target_pixels) {
  Triplet t{-1, -1, -1, false, false, false};
  if (y < 0 || y >= C || m >= M) return t;
  t.anchor = b * target_pixels + index;
  const int64_t group = y * M + m;
  const int64_t class_begin = start[y * M], class_end = start[(y + 1) * M];
  const int64_t n_positive = start[group + 1] - start[group];
  const int64_t n_negative = start[C * M] - (class_end - class_begin);
  t.no_positive = n_positive == 0;
  t.no_negative = n_negative == 0;
  t.valid = !t.no_positive && !t.no_negative;
  if (!t.valid) return t;
  const int64_t pick_positive = static_cast<int64_t>(u_positive * static_cast<double>(n_positive));
  const int64_t pick_negative = static_cast<int64_t>(u_negative * static_cast<double>(n_negative));
  t.positive = order[start[group] + pick_positive];
  t.negative = order[pick_negative < class_begin ? pick_negative : pick_negative + (class_end - class_begin)];
  return t;
}

}  // namespace drsl_fast
