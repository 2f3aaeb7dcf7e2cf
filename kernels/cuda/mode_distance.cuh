// Device kernels of the mode-distance op (docs/method.md §3). No ATen: the host
// launchers live in csrc/cuda/mode_distance_cuda.cu, and
// kernels/cuda/pascal_sm61.cu compiles these kernels alone for sm_61.
//
// For embedding e and mode centres r[c, m]:
//   d[c, m]  = ||e - r[c, m]||^2
//   dmin[c]  = min_m d[c, m],  mstar[c] = argmin_m d[c, m] (ties: lowest m)
//   P[c]     = exp(-dmin[c] / (2 sigma^2))     (optional, fused)
// Backward flows only through the winning mode:
//   dL/de        = 2 sum_c g[c] (e - r[c, mstar[c]])
//   dL/dr[c, m]  = 2 sum_{pixels with mstar[c] == m} g[c] (r[c, m] - e)
#pragma once
#include <cstdint>
#include "../nan_rules.h"
#include "../pixel_layout.h"
#include "load_store.cuh"

namespace drsl_fast {
namespace cuda {

constexpr int kForwardThreads = 128;
constexpr int kGradEmbThreads = 128;
// Pixels summed by one block of the mode-gradient kernel. Fixed, so the
// reduction order (and therefore the result) does not depend on the GPU.
constexpr int kModeGradChunk = 1024;
// Modes are staged in shared memory when C*M*D*sizeof(acc_t) fits this budget.
constexpr int kModesSharedBytes = 32 * 1024;

// One thread per pixel; grid = (ceil(P / blockDim), B).
template <typename scalar_t, typename acc_t>
__global__ void mode_distance_forward_kernel(
    const scalar_t* __restrict__ emb, PixelLayout emb_layout,
    const acc_t* __restrict__ modes, int C, int M, int D, int64_t P,
    bool modes_in_shared,
    acc_t* __restrict__ dmin, uint8_t* __restrict__ mstar,
    acc_t* __restrict__ posterior, acc_t posterior_scale, PixelLayout out_layout) {
  extern __shared__ unsigned char shared_bytes[];
  const acc_t* centres = modes;
  if (modes_in_shared) {
    acc_t* staged = reinterpret_cast<acc_t*>(shared_bytes);
    for (int i = threadIdx.x; i < C * M * D; i += blockDim.x) staged[i] = modes[i];
    __syncthreads();
    centres = staged;
  }
  const int64_t b = blockIdx.y;
  const int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (p >= P) return;
  const scalar_t* e = emb + emb_layout.offset(b, 0, p);

  for (int c = 0; c < C; ++c) {
    acc_t dist[kMaxModes];
#pragma unroll
    for (int m = 0; m < kMaxModes; ++m) dist[m] = acc_t(0);
    const acc_t* r = centres + static_cast<int64_t>(c) * M * D;
    for (int d = 0; d < D; ++d) {
      const acc_t x = load_as<acc_t>(e[d * emb_layout.channel]);
#pragma unroll
      for (int m = 0; m < kMaxModes; ++m) {
        if (m < M) {
          const acc_t t = x - r[m * D + d];
          dist[m] += t * t;
        }
      }
    }
    acc_t best = dist[0];
    int best_mode = 0;
#pragma unroll
    for (int m = 1; m < kMaxModes; ++m) {
      if (m < M && replaces_min(dist[m], best)) {  // ties keep the lowest mode; NaN wins
        best = dist[m];
        best_mode = m;
      }
    }
    const int64_t o = out_layout.offset(b, c, p);
    dmin[o] = best;
    mstar[o] = static_cast<uint8_t>(best_mode);
    if (posterior != nullptr) posterior[o] = exp_of(posterior_exponent(best, posterior_scale));
  }
}

// dL/de, one thread per pixel; grid = (ceil(P / blockDim), B).
template <typename scalar_t, typename acc_t>
__global__ void mode_distance_grad_emb_kernel(
    const acc_t* __restrict__ grad_dmin, const uint8_t* __restrict__ mstar, PixelLayout out_layout,
    const scalar_t* __restrict__ emb, PixelLayout emb_layout,
    const acc_t* __restrict__ modes, int C, int M, int D, int64_t P,
    scalar_t* __restrict__ grad_emb, PixelLayout grad_layout) {
  const int64_t b = blockIdx.y;
  const int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (p >= P) return;
  const scalar_t* e = emb + emb_layout.offset(b, 0, p);
  scalar_t* ge = grad_emb + grad_layout.offset(b, 0, p);
  const int64_t o = out_layout.offset(b, 0, p);
  for (int d = 0; d < D; ++d) {
    const acc_t x = load_as<acc_t>(e[d * emb_layout.channel]);
    acc_t acc = acc_t(0);
    for (int c = 0; c < C; ++c) {
      const int64_t oc = o + c * out_layout.channel;
      const acc_t g = grad_dmin[oc];
      const acc_t r = modes[(static_cast<int64_t>(c) * M + mstar[oc]) * D + d];
      acc += g * (x - r);
    }
    ge[d * grad_layout.channel] = store_as<scalar_t>(acc_t(2) * acc);
  }
}

// Partial dL/dr over one chunk of kModeGradChunk pixels of one image, for one
// class; thread d owns channel d (blockDim >= D). Writes
// partial[(b * chunks + chunk), c, m, d]; the host sums partials over their
// first axis in a fixed order, so the mode gradient is deterministic.
// grid = (chunks, C, B).
template <typename scalar_t, typename acc_t>
__global__ void mode_distance_grad_modes_kernel(
    const acc_t* __restrict__ grad_dmin, const uint8_t* __restrict__ mstar, PixelLayout out_layout,
    const scalar_t* __restrict__ emb, PixelLayout emb_layout,
    const acc_t* __restrict__ modes, int C, int M, int D, int64_t P,
    acc_t* __restrict__ partial) {
  const int d = threadIdx.x;
  if (d >= D) return;
  const int c = blockIdx.y;
  const int64_t b = blockIdx.z;
  const int64_t chunk = blockIdx.x;
  const int64_t begin = chunk * kModeGradChunk;
  const int64_t end = begin + kModeGradChunk < P ? begin + kModeGradChunk : P;

  acc_t sum[kMaxModes];
#pragma unroll
  for (int m = 0; m < kMaxModes; ++m) sum[m] = acc_t(0);
  const acc_t* r = modes + static_cast<int64_t>(c) * M * D + d;
  for (int64_t p = begin; p < end; ++p) {
    const int64_t o = out_layout.offset(b, c, p);
    const acc_t g = grad_dmin[o];
    const int winner = mstar[o];
    const acc_t x = load_as<acc_t>(emb[emb_layout.offset(b, d, p)]);
#pragma unroll
    for (int m = 0; m < kMaxModes; ++m) {
      if (m == winner) sum[m] += g * (r[m * D] - x);
    }
  }
  acc_t* out = partial + ((b * gridDim.x + chunk) * C + c) * static_cast<int64_t>(M) * D + d;
  for (int m = 0; m < M; ++m) out[m * D] = acc_t(2) * sum[m];
}

}  // namespace cuda
}  // namespace drsl_fast
