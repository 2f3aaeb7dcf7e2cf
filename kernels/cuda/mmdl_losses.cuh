// Device kernels of the fused MMDL losses (docs/method.md §4 Eq. 4, 5) and of
// label_mode. No ATen: the host launchers live in csrc/cuda/, and
// kernels/cuda/pascal_sm61.cu compiles these kernels alone for sm_61.
//
// For a sample e with label y (one thread per sample, classes streamed, so no
// per-class array is held):
//   dmin[c] = min_m ||e - r[c, m]||^2, mstar[c] its argmin (ties: lowest m)
//   Eq. 4   triplet = relu(dmin[y] - min_{c != y} dmin[c] + alpha)
//   Eq. 5   z[c] = s exp(-dmin[c] / (2 sigma^2)),  ce = logsumexp(z) - z[y]
// Backward, with g_c = dL/ddmin[c]
//   = -g_ce (softmax(z)[c] - [c == y]) z[c] / (2 sigma^2) + g_tri [hinge > 0] ([c == y] - [c == negative]):
//   dL/de = 2 sum_c g_c (e - r[c, mstar[c]]),  dL/dr[c, mstar[c]] += 2 g_c (r - e).
#pragma once
#include <cmath>
#include <cstdint>
#include "../nan_rules.h"
#include "../pixel_layout.h"
#include "load_store.cuh"

namespace drsl_fast {
namespace cuda {

constexpr int kSampleThreads = 128;

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

template <typename scalar_t, typename acc_t>
__device__ SampleSummary<acc_t> summarise(const scalar_t* e, int64_t step, const acc_t* modes, int C, int M, int D,
                                          int y, acc_t inv_two_var, acc_t scale) {
  // nearest_wrong stays +inf when C = 1; NaN propagates (kernels/nan_rules.h)
  SampleSummary<acc_t> s{acc_t(0), acc_t(INFINITY), acc_t(0), -1};
  acc_t z_max = acc_t(0), total = acc_t(0);
  for (int c = 0; c < C; ++c) {
    int winner = 0;
    const acc_t dmin = class_dmin(e, step, modes, c, M, D, &winner);
    if (c == y) s.positive = dmin;
    else if (replaces_min(dmin, s.nearest_wrong)) {
      s.nearest_wrong = dmin;
      s.negative = c;
    }
    const acc_t z = scale * exp_of(posterior_exponent(dmin, -inv_two_var));
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

__device__ __forceinline__ bool sample_counts(int64_t p, int64_t y, int64_t P, int C) {
  return p >= 0 && p < P && y >= 0 && y < C;
}

// grid = ceil(B * S / kSampleThreads).
template <typename scalar_t, typename acc_t>
__global__ void mmdl_losses_forward_kernel(const scalar_t* __restrict__ emb, PixelLayout L,
                                           const int64_t* __restrict__ index, const int64_t* __restrict__ label,
                                           const acc_t* __restrict__ modes, int64_t B, int64_t S, int64_t P, int C,
                                           int M, int D, acc_t inv_two_var, acc_t alpha, acc_t scale,
                                           acc_t* __restrict__ triplet, acc_t* __restrict__ ce) {
  const int64_t o = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (o >= B * S) return;
  const int64_t p = index[o], y = label[o];
  if (!sample_counts(p, y, P, C)) {
    triplet[o] = acc_t(0);
    ce[o] = acc_t(0);
    return;
  }
  const scalar_t* e = emb + L.offset(o / S, 0, p);
  const auto s = summarise(e, L.channel, modes, C, M, D, static_cast<int>(y), inv_two_var, scale);
  triplet[o] = relu_keep_nan(s.positive - s.nearest_wrong + alpha);
  ce[o] = s.log_sum_exp - scale * exp_of(posterior_exponent(s.positive, -inv_two_var));
}

// Writes dL/de of each sample to sample_grad (B*S, D) (optional) and adds
// dL/dR into grad_modes (C, M, D) atomically (optional).
template <typename scalar_t, typename acc_t>
__global__ void mmdl_losses_backward_kernel(const acc_t* __restrict__ grad_triplet, const acc_t* __restrict__ grad_ce,
                                            const scalar_t* __restrict__ emb, PixelLayout L,
                                            const int64_t* __restrict__ index, const int64_t* __restrict__ label,
                                            const acc_t* __restrict__ modes, int64_t B, int64_t S, int64_t P, int C,
                                            int M, int D, acc_t inv_two_var, acc_t alpha, acc_t scale,
                                            acc_t* __restrict__ sample_grad, acc_t* __restrict__ grad_modes) {
  const int64_t o = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (o >= B * S) return;
  acc_t* ge = sample_grad == nullptr ? nullptr : sample_grad + o * D;
  if (ge != nullptr)
    for (int d = 0; d < D; ++d) ge[d] = acc_t(0);
  const int64_t p = index[o], y = label[o];
  if (!sample_counts(p, y, P, C)) return;
  const scalar_t* e = emb + L.offset(o / S, 0, p);
  const auto s = summarise(e, L.channel, modes, C, M, D, static_cast<int>(y), inv_two_var, scale);
  const bool active = s.negative >= 0 && s.positive - s.nearest_wrong + alpha > acc_t(0);
  const acc_t g_ce = grad_ce[o], g_tri = grad_triplet[o];
  for (int c = 0; c < C; ++c) {
    int winner = 0;
    const acc_t dmin = class_dmin(e, L.channel, modes, c, M, D, &winner);
    const acc_t z = scale * exp_of(posterior_exponent(dmin, -inv_two_var));
    acc_t g = -g_ce * (exp_of(z - s.log_sum_exp) - acc_t(c == y)) * z * inv_two_var;
    if (active) g += g_tri * (acc_t(c == y) - acc_t(c == s.negative));
    if (g == acc_t(0)) continue;
    const int64_t centre = static_cast<int64_t>(c) * M + winner;
    const acc_t* r = modes + centre * D;
    for (int d = 0; d < D; ++d) {
      const acc_t step = acc_t(2) * g * (load_as<acc_t>(e[d * L.channel]) - r[d]);
      if (ge != nullptr) ge[d] += step;
      if (grad_modes != nullptr) atomicAdd(grad_modes + centre * D + d, -step);
    }
  }
}

// mstar of each sample's own class (uint8, 255 for samples that do not count).
template <typename scalar_t, typename acc_t>
__global__ void label_mode_kernel(const scalar_t* __restrict__ emb, PixelLayout L, const int64_t* __restrict__ index,
                                  const int64_t* __restrict__ label, const acc_t* __restrict__ modes, int64_t B,
                                  int64_t S, int64_t P, int C, int M, int D, uint8_t* __restrict__ mode) {
  const int64_t o = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (o >= B * S) return;
  const int64_t p = index[o], y = label[o];
  if (!sample_counts(p, y, P, C)) {
    mode[o] = 255;
    return;
  }
  int winner = 0;
  class_dmin(emb + L.offset(o / S, 0, p), L.channel, modes, static_cast<int>(y), M, D, &winner);
  mode[o] = static_cast<uint8_t>(winner);
}

}  // namespace cuda
}  // namespace drsl_fast
