// C++ CPU backend of sample_per_class (docs/method.md §4, §10). Every pixel carries
// an i.i.d. uniform key drawn by the caller from its torch.Generator; the k
// pixels of a class with the smallest keys are a uniform sample without
// replacement, and sorting them by key puts them in uniformly random order.
// Per image, a counting sort buckets the pixels by class; per (image, class),
// nth_element picks the k smallest keys (ties, of probability ~n^2 / 2^49,
// go to the lower pixel index).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <utility>
#include <vector>

#include "../host.h"

namespace drsl_fast {
namespace {

template <typename label_t>
void bucket_by_class(const label_t* labels, int64_t B, int64_t P, int64_t C, int64_t* bucket, int64_t* class_start,
                     int64_t* count) {
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> fill(C);
    for (int64_t b = begin; b < end; ++b) {
      const label_t* lab = labels + b * P;
      int64_t* n = count + b * C;
      for (int64_t p = 0; p < P; ++p) {
        const int64_t v = static_cast<int64_t>(lab[p]);
        if (v >= 0 && v < C) ++n[v];
      }
      int64_t* start = class_start + b * C;
      int64_t running = 0;
      for (int64_t c = 0; c < C; ++c) {
        start[c] = running;
        fill[c] = running;
        running += n[c];
      }
      int64_t* out = bucket + b * P;
      for (int64_t p = 0; p < P; ++p) {
        const int64_t v = static_cast<int64_t>(lab[p]);
        if (v >= 0 && v < C) out[fill[v]++] = p;
      }
    }
  });
}

void select_smallest_keys(const int64_t* bucket, const int64_t* class_start, const int64_t* class_size,
                          const int64_t* keys, int64_t B, int64_t P, int64_t C, int64_t k, int64_t* index,
                          int64_t* count) {
  at::parallel_for(0, B * C, 1, [&](int64_t begin, int64_t end) {
    std::vector<std::pair<int64_t, int64_t>> candidates;  // (key, pixel)
    for (int64_t bc = begin; bc < end; ++bc) {
      const int64_t b = bc / C;
      const int64_t n = class_size[bc];
      const int64_t* pixels = bucket + b * P + class_start[bc];
      const int64_t* image_keys = keys + b * P;
      candidates.resize(n);
      for (int64_t i = 0; i < n; ++i) candidates[i] = {image_keys[pixels[i]], pixels[i]};
      const int64_t take = std::min(n, k);
      if (n > k) std::nth_element(candidates.begin(), candidates.begin() + k, candidates.end());
      std::sort(candidates.begin(), candidates.begin() + take);
      int64_t* row = index + bc * k;
      for (int64_t i = 0; i < take; ++i) row[i] = candidates[i].second;
      count[bc] = take;
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> sample_per_class_cpu(const at::Tensor& labels_in, const at::Tensor& keys_in,
                                                        int64_t num_classes, int64_t k) {
  check_sampling_inputs(labels_in, keys_in, num_classes, k);
  const int64_t B = labels_in.size(0), P = labels_in.size(1) * labels_in.size(2), C = num_classes;
  const at::Tensor labels = labels_in.contiguous();
  const at::Tensor keys = keys_in.contiguous();
  const auto long_options = labels.options().dtype(at::kLong);
  at::Tensor index = at::full({B, C, k}, -1, long_options);
  at::Tensor count = at::zeros({B, C}, long_options);
  if (B == 0 || P == 0) return {index, count};
  at::Tensor bucket = at::empty({B, P}, long_options);
  at::Tensor class_start = at::empty({B, C}, long_options);
  at::Tensor class_size = at::zeros({B, C}, long_options);
  AT_DISPATCH_INTEGRAL_TYPES(labels.scalar_type(), "sample_per_class_cpu", [&] {
    bucket_by_class(labels.const_data_ptr<scalar_t>(), B, P, C, bucket.mutable_data_ptr<int64_t>(),
                    class_start.mutable_data_ptr<int64_t>(), class_size.mutable_data_ptr<int64_t>());
  });
  select_smallest_keys(bucket.const_data_ptr<int64_t>(), class_start.const_data_ptr<int64_t>(),
                       class_size.const_data_ptr<int64_t>(), keys.const_data_ptr<int64_t>(), B, P, C, k,
                       index.mutable_data_ptr<int64_t>(), count.mutable_data_ptr<int64_t>());
  return {index, count};
}

TORCH_LIBRARY_IMPL(drsl_fast, CPU, m) { m.impl("sample_per_class", &sample_per_class_cpu); }

}  // namespace drsl_fast
