// CUDA backend of the fused MMDL losses (docs/method.md §4 Eq. 4, 5) and of
// label_mode: first the device kernels, free of ATen, then their launchers.
// kernels/cuda/pascal_sm61.cu compiles the kernels alone for sm_61 (it defines
// DRSL_FAST_KERNELS_ONLY). The launchers write the per-sample embedding
// gradients into the full gradient with claim_pixels_kernel and
// scatter_rows_kernel (repeated pixels add up, in sample order; no atomics on values).
// The mode gradient is summed without atomics, so it is deterministic: the
// backward kernel records each sample's g_c and mstar[c] (a samples x C table,
// 5 bytes an entry in fp32, 9 in fp64), and a second kernel sums, per class and
// fixed chunk of samples, 2 g_c (r - e) over the chunk's samples in order; ATen
// sums the chunks' partials (a reduction with the same order on every run).
//
// For a sample e with label y (a block takes a few samples: one thread per
// (sample, class) pair for the distances, one per sample for the sums over
// the classes, one per (sample, channel) for the embedding gradient):
//   dmin[c] = min_m ||e - r[c, m]||^2, mstar[c] its argmin (ties: lowest m)
//   Eq. 4   triplet = relu(dmin[y] - min_{c != y} dmin[c] + alpha)
//   Eq. 5   z[c] = s exp(-dmin[c] / (2 sigma^2)),  ce = logsumexp(z) - z[y]
// Backward, with g_c = dL/ddmin[c]
//   = -g_ce (softmax(z)[c] - [c == y]) z[c] / (2 sigma^2) + g_tri [hinge > 0] ([c == y] - [c == negative]):
//   dL/de = 2 sum_c g_c (e - r[c, mstar[c]]),  dL/dr[c, mstar[c]] += 2 g_c (r - e).
#include <cmath>
#include <cstdint>

#include "../../kernels/cuda/flagged_means.cuh"
#include "../../kernels/cuda/load_store.cuh"
#include "../../kernels/nan_rules.h"
#include "../../kernels/pixel_layout.h"

namespace drsl_fast {
namespace cuda {

// label_mode and claim_pixels_kernel: one thread per sample.
constexpr int kSampleThreads = 64;
// scatter_rows_kernel: one thread per (sample, channel).
constexpr int kScatterThreads = 256;

// The losses: a block of kBlockThreads threads takes `samples` samples
// (SampleTiling). One thread per sample, each going over every mode of every
// class, one channel after another, left the GPU nearly idle: 11,400 samples
// are 180 warps, and each thread's work was C*M*D dependent steps (about
// 3,600 here); the MMDL kernels took 3.7 ms of a DRSL+ step on an H200
// (bench/results/NVIDIA_H200/training_step_profile.md, commit 00008ab). Now a
// thread takes one (sample, class) pair, M*D steps, and the few sums over the
// classes run one thread per sample, from shared memory.
constexpr int kBlockThreads = 128;
// Dynamic shared memory of a block, at most (the default limit).
constexpr size_t kBlockSharedBytes = 48 * 1024;

// The samples of a block and its dynamic shared memory: per sample, its
// embedding (D acc_t, when `staged`; else it is read in place), dmin and, in
// the backward, g over the classes (C acc_t each), and mstar (C bytes).
// samples = 0 when C is too large for one sample's row in shared memory.
struct SampleTiling {
  int samples;
  bool staged;
  size_t bytes;
};

// Bytes of one sample's row of shared memory, a multiple of 16 (rows stay aligned).
__host__ __device__ inline size_t sample_row_bytes(int C, int D, size_t acc_size, bool backward, bool staged) {
  const size_t values = static_cast<size_t>(staged ? D : 0) + static_cast<size_t>(C) * (backward ? 2 : 1);
  return (values * acc_size + static_cast<size_t>(C) + 15) / 16 * 16;
}

inline SampleTiling sample_tiling(int C, int D, size_t acc_size, bool backward) {
  const int wanted = C < kBlockThreads ? kBlockThreads / C : 1;  // about one thread per (sample, class) pair
  for (const bool staged : {true, false}) {
    const size_t row = sample_row_bytes(C, D, acc_size, backward, staged);
    const int fits = static_cast<int>(kBlockSharedBytes / row);
    if (fits > 0) {
      const int samples = fits < wanted ? fits : wanted;
      return {samples, staged, row * samples};
    }
  }
  return {0, false, 0};
}

// Where a block's rows of shared memory are, per sample j < samples.
template <typename acc_t>
struct SampleRows {
  unsigned char* base;
  size_t row;
  int C, D;
  bool staged, backward;

  __device__ static SampleRows at(unsigned char* base, int C, int D, bool staged, bool backward) {
    return {base, sample_row_bytes(C, D, sizeof(acc_t), backward, staged), C, D, staged, backward};
  }
  __device__ acc_t* emb(int j) const { return reinterpret_cast<acc_t*>(base + j * row); }
  __device__ acc_t* dmin(int j) const { return emb(j) + (staged ? D : 0); }
  __device__ acc_t* g(int j) const { return dmin(j) + C; }  // backward only
  __device__ uint8_t* winner(int j) const { return reinterpret_cast<uint8_t*>(dmin(j) + (backward ? 2 : 1) * C); }
};

template <typename acc_t> __device__ __forceinline__ acc_t log_of(acc_t v);
template <> __device__ __forceinline__ float log_of<float>(float v) { return logf(v); }
template <> __device__ __forceinline__ double log_of<double>(double v) { return log(v); }

// dmin and mstar of class c for the sample at `e` (channel stride `step`).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t class_dmin(const scalar_t* e, int64_t step, const acc_t* modes, int c, int M, int D,
                                            int* winner) {
  acc_t best = acc_t(0);
  for (int m = 0; m < M; ++m) {
    const acc_t* r = modes + (static_cast<int64_t>(c) * M + m) * D;
    acc_t dist = acc_t(0);
    for (int d = 0; d < D; ++d) {
      const acc_t t = load_as<acc_t>(e[d * step]) - r[d];
      dist += t * t;
    }
    if (m == 0 || replaces_min(dist, best)) {  // ties keep the lowest mode; NaN wins
      best = dist;
      *winner = m;
    }
  }
  return best;
}

// Per-sample summary of the first pass over the classes.
template <typename acc_t>
struct SampleSummary {
  acc_t positive, nearest_wrong, log_sum_exp;
  int negative;
};

// The sums over the classes of one sample, from its dmin[c], in the order of c.
template <typename acc_t>
__device__ __forceinline__ SampleSummary<acc_t> summarise(const acc_t* dmin, int C, int y, acc_t inv_two_var,
                                                          acc_t scale) {
  // nearest_wrong stays +inf when C = 1; NaN propagates (kernels/nan_rules.h)
  SampleSummary<acc_t> s{acc_t(0), acc_t(INFINITY), acc_t(0), -1};
  acc_t z_max = acc_t(0), total = acc_t(0);
  for (int c = 0; c < C; ++c) {
    if (c == y) s.positive = dmin[c];
    else if (replaces_min(dmin[c], s.nearest_wrong)) {
      s.nearest_wrong = dmin[c];
      s.negative = c;
    }
    const acc_t z = scale * exp_of(posterior_exponent(dmin[c], -inv_two_var));
    if (c == 0 || z > z_max) {  // online log-sum-exp
      total = (c == 0 ? acc_t(0) : total * exp_of(z_max - z)) + acc_t(1);
      z_max = z;
    } else {
      total += exp_of(z - z_max);
    }
  }
  s.log_sum_exp = z_max + log_of(total);
  return s;
}

// 1 / (2 sigma^2), alpha and the scale s of Eq. 4 and 5.
template <typename acc_t>
struct LossParams {
  acc_t inv_two_var, alpha, scale;
};

// The samples of one call: flat (B, S) pixel indices and labels into the
// embeddings (addressed through L), and the mode centres (C, M, D).
template <typename scalar_t, typename acc_t>
struct SampleBatch {
  const scalar_t* emb;
  PixelLayout L;
  const int64_t* index;
  const int64_t* label;
  const acc_t* modes;
  int64_t B, S, P;
  int C, M, D;

  // Whether sample o counts: its pixel in [0, P) and its label in [0, C).
  __device__ bool counts(int64_t o) const {
    const int64_t p = index[o], y = label[o];
    return p >= 0 && p < P && y >= 0 && y < C;
  }

  // The embedding of sample o, which counts (a pointer, not a flag: at D = 0
  // the embeddings have no storage and it may be null).
  __device__ const scalar_t* embedding(int64_t o) const { return emb + L.offset(o / S, 0, index[o]); }

};

// The first steps of a block of the losses, for samples first .. first +
// samples - 1 (those past B*S, and those that do not count, are skipped):
// their embeddings staged (when rows.staged; a thread per (sample, channel)),
// then dmin and mstar of each (sample, class) pair, a pair per thread, into
// the rows. Ends at a barrier.
template <typename scalar_t, typename acc_t>
__device__ void sample_distances(const SampleBatch<scalar_t, acc_t>& batch, const SampleRows<acc_t>& rows,
                                 int64_t first, int samples) {
  const int64_t total = batch.B * batch.S;
  const int C = batch.C, D = batch.D;
  if (rows.staged) {
    for (int i = threadIdx.x; i < samples * D; i += blockDim.x) {
      const int j = i / D, d = i % D;
      const int64_t o = first + j;
      if (o < total && batch.counts(o)) rows.emb(j)[d] = load_as<acc_t>(batch.embedding(o)[d * batch.L.channel]);
    }
    __syncthreads();
  }
  for (int i = threadIdx.x; i < samples * C; i += blockDim.x) {
    const int j = i / C, c = i % C;
    const int64_t o = first + j;
    if (o >= total || !batch.counts(o)) continue;
    int winner = 0;
    rows.dmin(j)[c] =
        rows.staged ? class_dmin(static_cast<const acc_t*>(rows.emb(j)), 1, batch.modes, c, batch.M, D, &winner)
                    : class_dmin(batch.embedding(o), batch.L.channel, batch.modes, c, batch.M, D, &winner);
    rows.winner(j)[c] = static_cast<uint8_t>(winner);
  }
  __syncthreads();  // every pair's dmin and mstar are in the rows
}

// grid = ceil(B * S / samples), kBlockThreads threads, SampleTiling's bytes of
// dynamic shared memory (sample_tiling(C, D, sizeof(acc_t), false)).
template <typename scalar_t, typename acc_t>
__global__ void mmdl_losses_forward_kernel(
    SampleBatch<scalar_t, acc_t> batch, LossParams<acc_t> params, acc_t* __restrict__ triplet,
    acc_t* __restrict__ ce, bool* __restrict__ counted, int samples, bool staged) {
  DRSL_DYNAMIC_SHARED(unsigned char, forward_shared);
  const auto rows = SampleRows<acc_t>::at(forward_shared, batch.C, batch.D, staged, false);
  const int64_t first = static_cast<int64_t>(blockIdx.x) * samples;
  sample_distances(batch, rows, first, samples);
  const int j = threadIdx.x;  // the sums over the classes: a thread per sample
  const int64_t o = first + j;
  if (j >= samples || o >= batch.B * batch.S) return;
  counted[o] = batch.counts(o);
  if (!counted[o]) {
    triplet[o] = acc_t(0);
    ce[o] = acc_t(0);
    return;
  }
  const auto s = summarise(rows.dmin(j), batch.C, static_cast<int>(batch.label[o]), params.inv_two_var, params.scale);
  triplet[o] = relu_keep_nan(s.positive - s.nearest_wrong + params.alpha);
  ce[o] = s.log_sum_exp - params.scale * exp_of(posterior_exponent(s.positive, -params.inv_two_var));
}

// Writes dL/de of each sample to sample_grad (B*S, D) and g_c, mstar[c] of
// each sample and class to class_grad and class_mode (B*S, C), for the mode
// gradient (each optional; all zero for samples that do not count). The loss
// gradients are per sample (grad_stride 1) or one value for all (grad_stride 0,
// the gradient of a mean).
// Launched as the forward, with sample_tiling(C, D, sizeof(acc_t), true).
template <typename scalar_t, typename acc_t>
__global__ void mmdl_losses_backward_kernel(
    const acc_t* __restrict__ grad_triplet, const acc_t* __restrict__ grad_ce, int64_t grad_stride,
    SampleBatch<scalar_t, acc_t> batch, LossParams<acc_t> params, acc_t* __restrict__ sample_grad,
    acc_t* __restrict__ class_grad, uint8_t* __restrict__ class_mode, int samples, bool staged) {
  DRSL_DYNAMIC_SHARED(unsigned char, backward_shared);
  const int C = batch.C, M = batch.M, D = batch.D;
  const int64_t total = batch.B * batch.S;
  const auto rows = SampleRows<acc_t>::at(backward_shared, C, D, staged, true);
  const int64_t first = static_cast<int64_t>(blockIdx.x) * samples;
  sample_distances(batch, rows, first, samples);

  // g_c of each class, a thread per sample, into the rows (and the tables)
  if (static_cast<int>(threadIdx.x) < samples && first + threadIdx.x < total) {
    const int j = threadIdx.x;
    const int64_t o = first + j;
    acc_t* const g_row = rows.g(j);
    const uint8_t* const winner = rows.winner(j);
    if (!batch.counts(o)) {
      for (int c = 0; c < C; ++c) {
        g_row[c] = acc_t(0);
        if (class_grad != nullptr) {
          class_grad[o * C + c] = acc_t(0);
          class_mode[o * C + c] = 0;
        }
      }
    } else {
      const int64_t y = batch.label[o];
      const acc_t* const dmin = rows.dmin(j);
      const acc_t inv_two_var = params.inv_two_var, scale = params.scale;
      const auto s = summarise(dmin, C, static_cast<int>(y), inv_two_var, scale);
      const bool active = s.negative >= 0 && s.positive - s.nearest_wrong + params.alpha > acc_t(0);
      const acc_t g_ce = grad_ce[o * grad_stride], g_tri = grad_triplet[o * grad_stride];
      for (int c = 0; c < C; ++c) {
        const acc_t z = scale * exp_of(posterior_exponent(dmin[c], -inv_two_var));
        acc_t g = -g_ce * (exp_of(z - s.log_sum_exp) - acc_t(c == y)) * z * inv_two_var;
        if (active) g += g_tri * (acc_t(c == y) - acc_t(c == s.negative));
        g_row[c] = g;
        if (class_grad != nullptr) {
          class_grad[o * C + c] = g;
          class_mode[o * C + c] = winner[c];
        }
      }
    }
  }
  if (sample_grad == nullptr) return;
  __syncthreads();  // every sample's g_c are in the rows

  // dL/de = 2 sum_c g_c (e - r[c, mstar[c]]), a thread per (sample, channel), classes in order
  for (int i = threadIdx.x; i < samples * D; i += blockDim.x) {
    const int j = i / D, d = i % D;
    const int64_t o = first + j;
    if (o >= total) continue;
    acc_t sum = acc_t(0);
    if (batch.counts(o)) {
      const acc_t x = staged ? rows.emb(j)[d] : load_as<acc_t>(batch.embedding(o)[d * batch.L.channel]);
      for (int c = 0; c < C; ++c) {
        const acc_t g = rows.g(j)[c];
        if (g == acc_t(0)) continue;
        const acc_t* r = batch.modes + (static_cast<int64_t>(c) * M + rows.winner(j)[c]) * D;
        sum += acc_t(2) * g * (x - r[d]);
      }
    }
    sample_grad[o * D + d] = sum;
  }
}

// Samples per partial of the mode gradient, and a block's: fixed, so the
// order of the kernel's sums does not depend on the launch.
constexpr int kModeGradSamples = 64;
constexpr int kModeGradThreads = 256;  // threads of a mode-gradient block, over its (c, m, d) entries

// Channels of the chunk's embeddings a mode-gradient block holds in shared
// memory at a time (kModeGradSamples x slice acc_t, at most kBlockSharedBytes).
inline int mode_grad_slice(int D, size_t acc_size) {
  const int fits = static_cast<int>(kBlockSharedBytes / (kModeGradSamples * acc_size));
  return D < fits ? D : fits;
}

// partial[chunk, c, m, d] = 2 * (sum over the chunk's samples o, in order, with
// class_mode[o, c] == m of g_c (r[c, m, d] - e_o[d])).
// grid = ceil(B * S / kModeGradSamples) blocks of kModeGradThreads threads, a
// block per chunk for every class; dynamic shared memory: the chunk's
// embeddings, `slice` channels at a time. Each embedding is read from global
// memory once: a block per (chunk, class), as before, read every sample's
// scattered pixel C times (0.39 ms of an H200 training step, commit 00008ab).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kModeGradThreads)
mmdl_losses_mode_grad_kernel(SampleBatch<scalar_t, acc_t> batch, const acc_t* __restrict__ class_grad,
                             const uint8_t* __restrict__ class_mode, acc_t* __restrict__ partial, int slice) {
  DRSL_DYNAMIC_SHARED(unsigned char, mode_grad_shared);
  acc_t* staged = reinterpret_cast<acc_t*>(mode_grad_shared);  // [sample j][channel d - d0]
  const int C = batch.C, M = batch.M, D = batch.D;
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * kModeGradSamples, total = batch.B * batch.S;
  const int samples = total - begin < kModeGradSamples ? static_cast<int>(total - begin) : kModeGradSamples;
  acc_t* out = partial + static_cast<int64_t>(blockIdx.x) * C * M * D;
  for (int d0 = 0; d0 < D; d0 += slice) {
    const int width = D - d0 < slice ? D - d0 : slice;
    __syncthreads();  // the previous slice's readers are done
    for (int i = threadIdx.x; i < samples * width; i += blockDim.x) {
      const int j = i / width, d = i % width;
      const int64_t o = begin + j;  // samples that do not count have g = 0 and are never read
      staged[i] = batch.counts(o) ? load_as<acc_t>(batch.embedding(o)[(d0 + d) * batch.L.channel]) : acc_t(0);
    }
    __syncthreads();  // the slice is staged
    for (int i = threadIdx.x; i < C * M * width; i += blockDim.x) {
      const int c = i / (M * width), m = i / width % M, d = i % width;
      const acc_t r = batch.modes[(static_cast<int64_t>(c) * M + m) * D + d0 + d];
      acc_t sum = acc_t(0);
      for (int j = 0; j < samples; ++j) {
        const int64_t o = begin + j;
        const acc_t g = class_grad[o * C + c];
        if (class_mode[o * C + c] != m || g == acc_t(0)) continue;
        sum += g * (r - staged[j * width + d]);
      }
      out[(static_cast<int64_t>(c) * M + m) * D + d0 + d] = acc_t(2) * sum;
    }
  }
}

// mstar of each sample's own class (uint8, 255 for samples that do not count).
template <typename scalar_t, typename acc_t>
__global__ void label_mode_kernel(SampleBatch<scalar_t, acc_t> batch, uint8_t* __restrict__ mode) {
  const int64_t o = thread_index();
  if (o >= batch.B * batch.S) return;
  int winner = 255;
  if (batch.counts(o))
    class_dmin(batch.embedding(o), batch.L.channel, batch.modes, static_cast<int>(batch.label[o]), batch.M, batch.D, &winner);
  mode[o] = static_cast<uint8_t>(winner);
}

// The embedding gradient from the backward's per-sample rows, in two kernels
// and without atomics on values: a pixel's gradient is the sum of the rows of
// the samples that count there, in sample order, written once in the
// embeddings' dtype (the rest of the map is zero, set before). Step 1 claims
// the pixels: claim[2 (b P + p)] = S - (first sample there), claim[... + 1] =
// the number of samples there (both start at 0). Step 2: the first sample of a
// pixel writes it, adding the rows of later samples only when there are some
// (per-class samples are distinct pixels; any index is allowed). It finds them
// by scanning the image's later samples: nothing for a pixel sampled once, up
// to S steps per channel for a repeated one, so index sets with thousands of
// repeats take longer than a sort-based scatter would (a sort's launches are
// what this replaces).
template <typename scalar_t, typename acc_t>
__global__ void claim_pixels_kernel(SampleBatch<scalar_t, acc_t> batch, int32_t* __restrict__ claim) {
  const int64_t o = thread_index();
  if (o >= batch.B * batch.S || !batch.counts(o)) return;
  int32_t* pixel = claim + 2 * ((o / batch.S) * batch.P + batch.index[o]);
  atomicMax(pixel, static_cast<int32_t>(batch.S - o % batch.S));
  atomicAdd(pixel + 1, 1);
}

// One thread per (sample, channel).
template <typename scalar_t, typename acc_t>
__global__ void scatter_rows_kernel(SampleBatch<scalar_t, acc_t> batch, const acc_t* __restrict__ rows,
                                    const int32_t* __restrict__ claim, scalar_t* __restrict__ grad,
                                    PixelLayout grad_layout) {
  const int64_t f = thread_index(), D = batch.D, S = batch.S;
  if (f >= batch.B * S * D) return;
  const int64_t o = f / D, d = f % D, b = o / S, s = o % S;
  if (!batch.counts(o)) return;
  const int64_t p = batch.index[o];
  const int32_t* pixel = claim + 2 * (b * batch.P + p);
  if (pixel[0] != S - s) return;  // a sample before this one writes the pixel
  acc_t sum = acc_t(0) + rows[f];
  for (int64_t t = s + 1, left = pixel[1] - 1; left > 0 && t < S; ++t) {
    const int64_t other = b * S + t;
    if (batch.index[other] == p && batch.counts(other)) {
      sum += rows[other * D + d];
      --left;
    }
  }
  grad[grad_layout.offset(b, d, p)] = store_as<scalar_t>(sum);
}

}  // namespace cuda
}  // namespace drsl_fast

#ifndef DRSL_FAST_KERNELS_ONLY
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../host.h"
#include "flagged_means.h"
#include "launch.h"

namespace drsl_fast {
namespace {

template <typename scalar_t, typename acc_t>
cuda::SampleBatch<cuda_type<scalar_t>, acc_t> sample_batch(const SampleProblem& p) {
  return {cuda_ptr<scalar_t>(p.bdp), layout_of(p.bdp), p.index.const_data_ptr<int64_t>(),
          p.label.const_data_ptr<int64_t>(), p.modes.const_data_ptr<acc_t>(), p.B, p.S, p.P,
          static_cast<int>(p.C), static_cast<int>(p.M), static_cast<int>(p.D)};
}

template <typename acc_t>
cuda::LossParams<acc_t> loss_params(double sigma, double alpha, double scale) {
  return {-posterior_scale<acc_t>(sigma), acc_t(alpha), acc_t(scale)};
}

// label_mode: one thread per sample.
unsigned sample_blocks(const SampleProblem& p) { return blocks_for(p.B * p.S, cuda::kSampleThreads); }

// The losses: blocks of a few samples (cuda::SampleTiling).
template <typename acc_t>
cuda::SampleTiling loss_tiling(const char* op, const SampleProblem& p, bool backward) {
  const cuda::SampleTiling tiling =
      cuda::sample_tiling(static_cast<int>(p.C), static_cast<int>(p.D), sizeof(acc_t), backward);
  TORCH_CHECK(tiling.samples > 0, op, " (cuda): C = ", p.C, " classes are too many for one sample's row of ",
              cuda::kBlockSharedBytes, " bytes of shared memory");
  return tiling;
}

// Writes the (B * S, D) per-sample gradient rows into the zeroed embedding
// gradient grad_emb (claim_pixels_kernel, scatter_rows_kernel).
template <typename scalar_t, typename acc_t>
void scatter_rows(const SampleProblem& p, const cuda::SampleBatch<cuda_type<scalar_t>, acc_t>& batch,
                  const at::Tensor& rows, at::Tensor& grad_emb) {
  if (p.B * p.S * p.D == 0) return;
  TORCH_CHECK(p.S < std::numeric_limits<int32_t>::max(), "mmdl_losses_backward (cuda): S must be < 2^31 - 1");
  at::Tensor claim = at::zeros({p.B, p.P, 2}, p.index.options().dtype(at::kInt));
  launch(cuda::claim_pixels_kernel<cuda_type<scalar_t>, acc_t>, sample_blocks(p), cuda::kSampleThreads, 0, batch,
         claim.mutable_data_ptr<int32_t>());
  launch(cuda::scatter_rows_kernel<cuda_type<scalar_t>, acc_t>,
         dim3(blocks_for(p.B * p.S * p.D, cuda::kScatterThreads)), cuda::kScatterThreads, 0, batch,
         rows.const_data_ptr<acc_t>(), claim.const_data_ptr<int32_t>(), mutable_cuda_ptr<scalar_t>(grad_emb),
         layout_of(as_bdp(grad_emb)));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> mmdl_losses_cuda(const at::Tensor& emb, const at::Tensor& index,
                                                                const at::Tensor& label, const at::Tensor& modes,
                                                                double sigma, double alpha, double scale, bool mean) {
  check_loss_params(sigma, alpha, scale);
  const c10::cuda::CUDAGuard guard(emb.device());
  const SampleProblem p = sample_problem("mmdl_losses", emb, index, label, modes);
  at::Tensor triplet = p.per_sample(emb), ce = p.per_sample(emb), counted = p.flags();
  if (triplet.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, emb.scalar_type(), "mmdl_losses_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const cuda::SampleTiling tiling = loss_tiling<acc_t>("mmdl_losses", p, false);
      launch(cuda::mmdl_losses_forward_kernel<cuda_type<scalar_t>, acc_t>, blocks_for(p.B * p.S, tiling.samples),
             cuda::kBlockThreads, tiling.bytes, sample_batch<scalar_t, acc_t>(p),
             loss_params<acc_t>(sigma, alpha, scale), triplet.mutable_data_ptr<acc_t>(), ce.mutable_data_ptr<acc_t>(),
             counted.mutable_data_ptr<bool>(), tiling.samples, tiling.staged);
    });
  }
  auto [mean_triplet, mean_ce, count] =
      flagged_means_cuda(mean ? triplet : at::Tensor(), mean ? ce : at::Tensor(), counted);
  if (!mean) return {triplet, ce, count};
  return {mean_triplet, mean_ce, count};
}

std::tuple<at::Tensor, at::Tensor> mmdl_losses_backward_cuda(
    const at::Tensor& grad_triplet_in, const at::Tensor& grad_ce_in, const at::Tensor& emb, const at::Tensor& index,
    const at::Tensor& label, const at::Tensor& modes_in, double sigma, double alpha, double scale,
    bool emb_requires_grad, bool modes_requires_grad) {
  check_loss_params(sigma, alpha, scale);
  const c10::cuda::CUDAGuard guard(emb.device());
  const SampleProblem p = sample_problem("mmdl_losses_backward", emb, index, label, modes_in);
  // One value each (a mean's gradient) is read in place; otherwise both per sample.
  const bool one_value = grad_triplet_in.numel() == 1 && grad_ce_in.numel() == 1;
  const auto per_sample = [&](const at::Tensor& g) {
    return one_value ? g.to(p.acc_dtype) : g.to(p.acc_dtype).expand({p.B, p.S}).contiguous();
  };
  const at::Tensor grad_triplet = per_sample(grad_triplet_in), grad_ce = per_sample(grad_ce_in);
  // zero where no sample counts; the scatter writes the pixels where some do
  at::Tensor grad_emb = emb_requires_grad ? empty_like_pixel_viewable(emb).zero_() : at::empty({0}, emb.options());
  at::Tensor sample_grad = at::empty({emb_requires_grad ? p.B * p.S : 0, p.D}, p.modes.options());
  TORCH_CHECK(p.C <= 65535, "mmdl_losses_backward (cuda): C must be <= 65535");
  at::Tensor grad_modes;  // summed by the kernels below; zero without samples
  if ((emb_requires_grad || modes_requires_grad) && p.B * p.S > 0) {
    const int64_t table = modes_requires_grad ? p.B * p.S : 0;
    at::Tensor class_grad = at::empty({table, p.C}, p.modes.options());
    at::Tensor class_mode = at::empty({table, p.C}, p.index.options().dtype(at::kByte));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, emb.scalar_type(), "mmdl_losses_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const auto batch = sample_batch<scalar_t, acc_t>(p);
      const cuda::SampleTiling tiling = loss_tiling<acc_t>("mmdl_losses_backward", p, true);
      launch(cuda::mmdl_losses_backward_kernel<cuda_type<scalar_t>, acc_t>, blocks_for(p.B * p.S, tiling.samples),
             cuda::kBlockThreads, tiling.bytes, grad_triplet.const_data_ptr<acc_t>(), grad_ce.const_data_ptr<acc_t>(),
             int64_t{one_value ? 0 : 1}, batch, loss_params<acc_t>(sigma, alpha, scale),
             emb_requires_grad ? sample_grad.mutable_data_ptr<acc_t>() : nullptr,
             modes_requires_grad ? class_grad.mutable_data_ptr<acc_t>() : nullptr,
             modes_requires_grad ? class_mode.mutable_data_ptr<uint8_t>() : nullptr, tiling.samples, tiling.staged);
      if (modes_requires_grad) {
        const int64_t chunks = blocks_for(p.B * p.S, cuda::kModeGradSamples);
        const int slice = cuda::mode_grad_slice(static_cast<int>(p.D), sizeof(acc_t));
        at::Tensor partial = at::empty({chunks, p.C, p.M, p.D}, p.modes.options());
        launch(cuda::mmdl_losses_mode_grad_kernel<cuda_type<scalar_t>, acc_t>, dim3(static_cast<unsigned>(chunks)),
               cuda::kModeGradThreads, cuda::kModeGradSamples * slice * sizeof(acc_t), batch,
               class_grad.const_data_ptr<acc_t>(), class_mode.const_data_ptr<uint8_t>(),
               partial.mutable_data_ptr<acc_t>(), slice);
        // ATen's reduction over the first axis has a fixed order: deterministic.
        grad_modes = partial.sum(0);
      }
      if (emb_requires_grad) scatter_rows<scalar_t, acc_t>(p, batch, sample_grad, grad_emb);
    });
  }
  return {grad_emb,
          !modes_requires_grad ? at::empty({0}, modes_in.options())
          : grad_modes.defined() ? grad_modes.to(modes_in.scalar_type())
                                 : at::zeros(modes_in.sizes(), modes_in.options())};
}

at::Tensor label_mode_cuda(const at::Tensor& emb, const at::Tensor& index, const at::Tensor& label,
                           const at::Tensor& modes) {
  const c10::cuda::CUDAGuard guard(emb.device());
  const SampleProblem p = sample_problem("label_mode", emb, index, label, modes);
  at::Tensor mode = at::empty({p.B, p.S}, p.index.options().dtype(at::kByte));
  if (mode.numel() == 0) return mode;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, emb.scalar_type(), "label_mode_cuda", [&] {
    launch(cuda::label_mode_kernel<cuda_type<scalar_t>, at::opmath_type<scalar_t>>, sample_blocks(p),
           cuda::kSampleThreads, 0, sample_batch<scalar_t, at::opmath_type<scalar_t>>(p),
           mode.mutable_data_ptr<uint8_t>());
  });
  return mode;
}

TORCH_LIBRARY_IMPL(drsl_fast, CUDA, m) {
  m.impl("mmdl_losses", &mmdl_losses_cuda);
  m.impl("mmdl_losses_backward", &mmdl_losses_backward_cuda);
  m.impl("label_mode", &label_mode_cuda);
}

}  // namespace drsl_fast
#endif  // DRSL_FAST_KERNELS_ONLY
