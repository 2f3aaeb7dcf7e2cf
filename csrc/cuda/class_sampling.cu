// CUDA backend of sample_per_class (docs/method.md §4, §10), in three steps and
// no host synchronisation (kernels/class_sampling.h states the sort key):
//   class_key_kernel        the sort key of every pixel (labels read in place,
//                           any integer dtype and strides; keys in [0, 2^48),
//                           as the schema states)
//   at::sort (stable)       each image's pixels by sort key: class runs, ignored last
//   class_sample_kernel     one thread per output slot (b, c, s): class c's run
//                           found by two binary searches, its entry s or -1
// The selection is the CPU backend's exactly (the k smallest keys of each
// class, by key, equal keys by pixel), so both give the same samples for the
// same keys.
//
// The device half compiles without ATen (tests/cuda_on_cpu runs it on the CPU;
// DRSL_FAST_KERNELS_ONLY).
#include <cstdint>

#include "../../kernels/class_sampling.h"
#include "../../kernels/cuda/load_store.cuh"

namespace drsl_fast {
namespace cuda {

constexpr int kSamplingThreads = 256;

// sort_key[f] for f = b * P + p, pixel p = h * W + w of image b; labels (b,
// h, w) at label[b * stride_b + h * stride_h + w * stride_w]. A thread per f.
template <typename label_t>
__global__ void class_key_kernel(const label_t* __restrict__ label, int64_t stride_b, int64_t stride_h,
                                 int64_t stride_w, int64_t W, int64_t n, int64_t P, int64_t C,
                                 const int64_t* __restrict__ key, int64_t* __restrict__ sort_key) {
  const int64_t f = thread_index();
  if (f >= n) return;
  const int64_t b = f / P, p = f % P;
  const int64_t value = static_cast<int64_t>(label[b * stride_b + (p / W) * stride_h + (p % W) * stride_w]);
  sort_key[f] = class_sort_key(value, C, key[f]);
}

// index[(b * C + c) * k + s] = the pixel of entry s of class c's run in image
// b's sorted row, or -1 past min(run, k); count[b * C + c] = min(run, k).
__global__ void class_sample_kernel(const int64_t* __restrict__ sorted, const int64_t* __restrict__ order,
                                    int64_t B, int64_t P, int64_t C, int64_t k, int64_t* __restrict__ index,
                                    int64_t* __restrict__ count) {
  const int64_t i = thread_index();
  if (i >= B * C * k) return;
  const int64_t s = i % k, bc = i / k, c = bc % C, b = bc / C;
  const int64_t* row = sorted + b * P;
  const int64_t start = class_run_start(row, P, c);
  const int64_t run = class_run_start(row, P, c + 1) - start;
  const int64_t taken = run < k ? run : k;
  index[i] = s < taken ? order[b * P + start + s] : -1;
  if (s == 0) count[bc] = taken;
}

}  // namespace cuda
}  // namespace drsl_fast

#ifndef DRSL_FAST_KERNELS_ONLY
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>

#include "../host.h"
#include "launch.h"

namespace drsl_fast {
std::tuple<at::Tensor, at::Tensor> sample_per_class_cuda(const at::Tensor& labels, const at::Tensor& keys_in,
                                                         int64_t num_classes, int64_t k) {
  check_sampling_inputs(labels, keys_in, num_classes, k);
  const c10::cuda::CUDAGuard guard(labels.device());
  const int64_t B = labels.size(0), W = labels.size(2), P = labels.size(1) * W, C = num_classes;
  const auto long_options = labels.options().dtype(at::kLong);
  if (B == 0 || P == 0 || k == 0)
    return {at::full({B, C, k}, -1, long_options), at::zeros({B, C}, long_options)};
  constexpr int64_t kMaxThreads = int64_t{std::numeric_limits<int32_t>::max()} * cuda::kSamplingThreads;
  TORCH_CHECK(B * P <= kMaxThreads && k <= kMaxThreads / (B * C),
              "sample_per_class (cuda): B * H * W and B * num_classes * k must be at most ", kMaxThreads);
  const at::Tensor keys = keys_in.contiguous();
  at::Tensor sort_key = at::empty({B, P}, long_options);
  AT_DISPATCH_INTEGRAL_TYPES(labels.scalar_type(), "sample_per_class_cuda", [&] {
    launch(cuda::class_key_kernel<scalar_t>, dim3(blocks_for(B * P, cuda::kSamplingThreads)), cuda::kSamplingThreads,
           0, labels.const_data_ptr<scalar_t>(), labels.stride(0), labels.stride(1), labels.stride(2), W, B * P, P, C,
           keys.const_data_ptr<int64_t>(), sort_key.mutable_data_ptr<int64_t>());
  });
  const auto [sorted, order] = at::sort(sort_key, /*stable=*/true, /*dim=*/1, /*descending=*/false);
  at::Tensor index = at::empty({B, C, k}, long_options), count = at::empty({B, C}, long_options);
  launch(cuda::class_sample_kernel, dim3(blocks_for(B * C * k, cuda::kSamplingThreads)), cuda::kSamplingThreads, 0,
         sorted.const_data_ptr<int64_t>(), order.const_data_ptr<int64_t>(), B, P, C, k,
         index.mutable_data_ptr<int64_t>(), count.mutable_data_ptr<int64_t>());
  return {index, count};
}

TORCH_LIBRARY_IMPL(drsl_fast, CUDA, m) { m.impl("sample_per_class", &sample_per_class_cuda); }

}  // namespace drsl_fast
#endif  // DRSL_FAST_KERNELS_ONLY
