// The sort key of drsl_fast::sample_per_class's CUDA backend (docs/method.md §4,
// §10), shared by its kernels and host launcher.
//
// Every pixel carries an i.i.d. random key in [0, 2^kSampleKeyBits) drawn by the
// caller. The CUDA backend sorts each image's pixels by
//   sort key = class << kSampleKeyBits | key      (class = C for an ignored pixel),
// so that each class is one run of the sorted row, ignored pixels last, and
// inside a run the pixels go by increasing key; a stable sort puts equal keys
// in increasing pixel order, as the CPU backend's selection does. Class c's run
// is [first(c), first(c + 1)), first(c) being the first sorted key >= c <<
// kSampleKeyBits; its first min(run, k) entries are the sample.
#pragma once
#include <cstdint>

#ifndef DRSL_FAST_HOST_DEVICE
#if defined(__CUDACC__)
#define DRSL_FAST_HOST_DEVICE __host__ __device__
#else
#define DRSL_FAST_HOST_DEVICE
#endif
#endif

namespace drsl_fast {

constexpr int kSampleKeyBits = 48;

DRSL_FAST_HOST_DEVICE inline int64_t class_sort_key(int64_t label, int64_t num_classes, int64_t key) {
  const int64_t cls = label >= 0 && label < num_classes ? label : num_classes;
  return (cls << kSampleKeyBits) | key;
}

// The first position of sorted[0 .. n) whose key is >= class c's smallest.
DRSL_FAST_HOST_DEVICE inline int64_t class_run_start(const int64_t* sorted, int64_t n, int64_t c) {
  const int64_t bound = c << kSampleKeyBits;
  int64_t low = 0, high = n;
  while (low < high) {
    const int64_t mid = low + (high - low) / 2;
    if (sorted[mid] < bound) low = mid + 1;
    else high = mid;
  }
  return low;
}

}  // namespace drsl_fast
