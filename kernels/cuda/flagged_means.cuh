// The means that finish a per-item loss op on the GPU (mmdl_losses with
// reduction "mean", consistency_hinge): mean = sum of the items' values / max(count, 1)
// for one or two value arrays (0 where an item is not flagged), and count =
// the number of flagged items, in one launch where ATen's sums, count,
// clamp and divisions took six.
//
// One block of kMeanThreads threads, for the few thousand samples or
// triplets of a step: thread t adds items t, t + kMeanThreads, ... in order,
// then a tree in shared memory adds the threads' sums, always in the same
// order, so the means are deterministic. Either value array may be null (its
// mean is not written).
#pragma once
#include <cstdint>

#include "load_store.cuh"

namespace drsl_fast {
namespace cuda {

constexpr int kMeanThreads = 256;

template <typename acc_t>
__global__ void __launch_bounds__(kMeanThreads)
    flagged_means_kernel(const acc_t* __restrict__ a, const acc_t* __restrict__ b, const bool* __restrict__ flagged,
                         int64_t n, acc_t* __restrict__ mean_a, acc_t* __restrict__ mean_b,
                         int64_t* __restrict__ count) {
  __shared__ acc_t sum_a[kMeanThreads], sum_b[kMeanThreads];
  __shared__ int64_t flags[kMeanThreads];
  const int t = threadIdx.x;
  acc_t own_a = acc_t(0), own_b = acc_t(0);
  int64_t own_flags = 0;
  for (int64_t i = t; i < n; i += kMeanThreads) {
    if (a != nullptr) own_a += a[i];
    if (b != nullptr) own_b += b[i];
    own_flags += flagged[i] ? 1 : 0;
  }
  sum_a[t] = own_a;
  sum_b[t] = own_b;
  flags[t] = own_flags;
  for (int half = kMeanThreads / 2; half > 0; half /= 2) {
    __syncthreads();  // the previous level's sums are in place
    if (t < half) {
      sum_a[t] += sum_a[t + half];
      sum_b[t] += sum_b[t + half];
      flags[t] += flags[t + half];
    }
  }
  if (t != 0) return;
  const acc_t divisor = static_cast<acc_t>(flags[0] > 1 ? flags[0] : 1);
  if (mean_a != nullptr) *mean_a = sum_a[0] / divisor;
  if (mean_b != nullptr) *mean_b = sum_b[0] / divisor;
  *count = flags[0];
}

}  // namespace cuda
}  // namespace drsl_fast
