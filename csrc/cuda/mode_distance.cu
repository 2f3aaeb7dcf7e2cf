// CUDA backend of the mode-distance op (docs/method.md §3, contract in §10.2):
// first the device kernels, free of ATen, then their launchers.
// kernels/cuda/pascal_sm61.cu compiles the kernels alone for sm_61 (it defines
// DRSL_FAST_KERNELS_ONLY). The fp32 kernels (fp64 for fp64 input) use plain
// FMA, no tensor cores, because the GTX 1080 Ti has none; every GPU runs them
// by default, so every card gives the same bits. On sm_80 and newer, for
// fp32/fp16/bf16 input, two tensor-core kernels run on request (see
// "Tensor-core forward and backward" below): the backward, both gradients as
// products in one kernel at C*M <= 64 (DRSL_FAST_TENSOR_CORE_BACKWARD=1), and
// the forward, which ranks the modes with a 3xTF32 product
// (DRSL_FAST_TENSOR_CORE_FORWARD=1). On an H200 both are slower than the fp32
// kernels (bench/NOTES.md).
//
// The maths. For one pixel embedding e (a D-vector) and the K = C*M mode
// centres r[k], k = c*M + m (docs/method.md §3):
//   d[k]     = ||e - r[k]||^2 = sum_j (e_j - r[k]_j)^2
//   dmin[c]  = min_m d[c*M + m],  mstar[c] = argmin_m (ties: lowest m)
//   P[c]     = exp(-dmin[c] / (2 sigma^2))                        (optional)
// The backward reaches the winning mode only:
//   dL/de_j       = 2 sum_c g[c] (e_j - r[c*M + mstar[c]]_j)
//   dL/dr[k]_j    = 2 sum_pixels a[k] (r[k]_j - e_j),  a[c*M + m] = g[c] if m == mstar[c], else 0
//
// Over a tile of pixels, d[k] for all (pixel, mode) pairs is a product-shaped
// computation: (pixels x D) against (D x modes), with (e - r)^2 in place of
// e * r. By default we keep the difference form rather than ||e||^2 - 2 e.r
// + ||r||^2: it costs one FSUB more per term but never cancels, so dmin
// carries only the rounding of a plain sum of squares, added channel by
// channel in order. (The expanded form saves that FSUB but pays for the
// pixel norms, a trust rule and direct recomputation where it cancels: as an
// fp32 forward it took 129 us against this form's 61 on an H200,
// bench/NOTES.md, and only the tensor-core forward keeps it.)
// The mode gradient is likewise a product, of the one-hot weights a
// (modes x pixels) with (r - e), each term in difference form.
//
// Register tiling (Tiling below). A block of 128 threads is a 16 x 8 grid:
// 16 threads along the pixels (forward) or the channels (mode gradient), 8
// along the modes. A thread owns two runs of kVec adjacent modes, half a tile
// apart, and in the forward two such runs of pixels, in the mode gradient one
// run of channels (kVec = 4 for fp32, 2 for fp64: 16 bytes). Every
// shared-memory read of the inner loops is one 16-byte access: the 16 threads
// of a half warp read 256 contiguous bytes (two wavefronts, the least there
// can be), and the two mode groups of a warp read broadcasts.
#include <cfloat>
#include <cstdint>

#include <mma.h>

#include "../../kernels/cuda/load_store.cuh"
#include "../../kernels/nan_rules.h"
#include "../../kernels/pixel_layout.h"

namespace drsl_fast {
namespace cuda {

constexpr int kThreads = 128;
constexpr int kColumnThreads = 16;  // threads along pixels (forward) or channels (mode gradient)
constexpr int kModeThreads = 8;     // threads along modes
static_assert(kColumnThreads * kModeThreads == kThreads, "the 16 x 8 thread grid is the block");

// Pixels summed by one block of the mode-gradient kernel. Fixed, so the order
// of the kernel's sums does not depend on the launch.
constexpr int kModeGradChunk = 256;
// The grad_emb kernel stages all C*M mode rows in shared memory when they fit
// this budget (the default limit of dynamic shared memory), else reads them
// from global memory (L1/L2 resident: they are small and read by every block).
constexpr int kModesSharedBytes = 48 * 1024;

template <typename acc_t>
struct Tiling {
  static constexpr int kVec = 16 / static_cast<int>(sizeof(acc_t));  // values in one 16-byte access
  static constexpr int kPixels = kColumnThreads * 2 * kVec;            // forward: pixels per block (128 / 64)
  static constexpr int kModes = kModeThreads * 2 * kVec;                // modes per pass (64 / 32), >= kMaxModes
  static constexpr int kDepth = 8;                                      // forward: channels per staging step
  static constexpr int kChannels = kColumnThreads * kVec;               // mode gradient: channels per block (64 / 32)
  static constexpr int kGradPixels = 32;                                // mode gradient: pixels per staging step
  static constexpr int kGradEmbDepth = 128 / static_cast<int>(sizeof(acc_t));  // grad_emb: channels per pass
};

// The i-th of the 2 * kVec pixels or modes a thread owns in a tile of kTile:
// two runs of kVec, half a tile apart; `group` is the thread's index along that axis.
template <int kVec, int kTile>
__device__ __forceinline__ int owned(int group, int i) {
  return (i / kVec) * (kTile / 2) + group * kVec + i % kVec;
}

// kVec values from 16-byte aligned shared memory, in one access.
__device__ __forceinline__ void load_vec(const float* src, float* v) {
  const float4 t = *reinterpret_cast<const float4*>(src);
  v[0] = t.x;
  v[1] = t.y;
  v[2] = t.z;
  v[3] = t.w;
}
__device__ __forceinline__ void load_vec(const double* src, double* v) {
  const double2 t = *reinterpret_cast<const double2*>(src);
  v[0] = t.x;
  v[1] = t.y;
}

// One staging step of embeddings, a thread's share of it, in two halves:
// fetch() issues the global loads into registers, all at once, and park()
// writes the values to shared memory, so a step costs one round trip to
// memory. Staged by a loop of "load, store" that nvcc unrolled four times, the
// fp32 forward waited on 32 round trips per block and took 105 us on an H200
// at 2 x 256 x 256 pixels; with fetch() and park() 79-82 us (bench/NOTES.md,
// third run). The forwards fetch the next step while the current one is
// computed. On the H200 that gained nothing over fetching each step after its
// barrier (79 us against 82, within the runs' spread), but it is how ptxas
// fitted the sm_61 fp32 forward of 16-channel steps in 167 registers, 3
// blocks per SM, without spilling: fetched after the barrier, it took 202 (2
// blocks per SM), or spilled under the 3-block bound. (With 8-channel steps,
// fetch_inside() and the epilogue below: 140 registers on sm_61.)
//
// The step is emb[b, d0 + d, p0 + p] for d < kDepth, p < kPixels as acc_t,
// minus centre[d0 + d] when centre is given, zero outside channel D and pixel
// `end`, parked at dst[d * d_stride + p * p_stride]. Consecutive threads read
// consecutive addresses: along the pixels where pixels are adjacent in memory
// ((B, D, H, W) contiguous), else along the channels (channels-last, (N, D)).
template <int kDepth, int kPixels, int kBlockThreads, typename acc_t>
struct EmbeddingStep {
  // The thread's values are one run along the channels (pixels adjacent) or
  // along the pixels (channels-last), kBlockThreads / kPixels channels or
  // kBlockThreads / kDepth pixels apart: an address is a base plus a multiple
  // of one stride (with a 64-bit address per value, ptxas kept 16 of them
  // live across the arithmetic and spilled).
  static_assert(kBlockThreads % kPixels == 0 && kBlockThreads % kDepth == 0, "one run per thread");
  static_assert(kDepth * kPixels % kBlockThreads == 0, "whole rounds of staging");
  static constexpr int kPerThread = kDepth * kPixels / kBlockThreads;
  acc_t value[kPerThread];

  template <typename scalar_t>
  __device__ __forceinline__ void fetch(const scalar_t* emb, PixelLayout layout, int64_t b, int d0, int D, int64_t p0,
                                        int64_t end, const acc_t* centre = nullptr) {
    const int t = static_cast<int>(threadIdx.x);
    const bool adjacent = layout.pixel == 1;
    const int d_first = adjacent ? t / kPixels : t % kDepth, d_step = adjacent ? kBlockThreads / kPixels : 0;
    const int p_first = adjacent ? t % kPixels : t / kDepth, p_step = adjacent ? 0 : kBlockThreads / kDepth;
    const scalar_t* first = emb + layout.offset(b, d0 + d_first, p0 + p_first);
    const int64_t stride = adjacent ? d_step * layout.channel : p_step * layout.pixel;
#pragma unroll
    for (int r = 0; r < kPerThread; ++r) {
      const int d = d0 + d_first + r * d_step;
      value[r] = acc_t(0);
      if (d < D && p0 + p_first + r * p_step < end) {
        value[r] = load_as<acc_t>(first[r * stride]);
        if (centre != nullptr) value[r] -= centre[d];
      }
    }
  }

  // fetch() for a step that lies inside the tensor (channels d0 .. d0 + kDepth
  // - 1 < D, pixels p0 .. p0 + kPixels - 1 < end): no bounds per value. With
  // them, ptxas spent about 15 instructions a load of the fp32 forward on
  // 64-bit comparisons and addresses (ncu, bench/NOTES.md).
  template <typename scalar_t>
  __device__ __forceinline__ void fetch_inside(const scalar_t* emb, PixelLayout layout, int64_t b, int d0,
                                               int64_t p0) {
    const int t = static_cast<int>(threadIdx.x);
    const bool adjacent = layout.pixel == 1;
    const int d_first = adjacent ? t / kPixels : t % kDepth, d_step = adjacent ? kBlockThreads / kPixels : 0;
    const int p_first = adjacent ? t % kPixels : t / kDepth, p_step = adjacent ? 0 : kBlockThreads / kDepth;
    const scalar_t* src = emb + layout.offset(b, d0 + d_first, p0 + p_first);
    const int64_t stride = adjacent ? d_step * layout.channel : p_step * layout.pixel;
#pragma unroll
    for (int r = 0; r < kPerThread; ++r, src += stride) value[r] = load_as<acc_t>(*src);
  }

  __device__ __forceinline__ void park(acc_t* dst, int d_stride, int p_stride, bool adjacent) const {
    const int t = static_cast<int>(threadIdx.x);
    const int d_first = adjacent ? t / kPixels : t % kDepth, d_step = adjacent ? kBlockThreads / kPixels : 0;
    const int p_first = adjacent ? t % kPixels : t / kDepth, p_step = adjacent ? 0 : kBlockThreads / kDepth;
#pragma unroll
    for (int r = 0; r < kPerThread; ++r)
      dst[(d_first + r * d_step) * d_stride + (p_first + r * p_step) * p_stride] = value[r];
  }
};

// The tensor-core forward trusts an expanded minimum when it is at least
// kTrustRatio of ||e - mu||^2 + max_m ||r - mu||^2 (the bound is argued at
// "Tensor-core forward and backward" below) and otherwise takes the class's
// distances directly (direct_min).
constexpr float kTrustRatio = 0.5f;
constexpr int kDirectBatch = 4;  // channels per batch of loads in a direct sum (at 8, nvcc -Xptxas -v for
                                 // sm_90 gives the tensor-core forward 112 registers instead of 90: 4 blocks
                                 // per SM, not 5)

// The distances of pixel `pixel` of image b to the M modes of one class
// (`centre`: its first mode row) as the fp32 kernel sums them, channel by
// channel in order, and their minimum (ties: lowest m; NaN wins). The
// channels are taken kDirectBatch at a time, their loads in flight together:
// a block waits for its slowest direct sum, and with one load at a time the
// direct sums cost 87 of the tensor-core forward's 223 us on an H200
// (bench/results/NVIDIA_H200/tensor_core_probe.md).
template <typename scalar_t>
__device__ __forceinline__ void direct_min(const scalar_t* __restrict__ emb, PixelLayout emb_layout, int64_t b,
                                           int64_t pixel, const float* __restrict__ centre, int M, int D, float& best,
                                           int& best_mode) {
  float dist[kMaxModes];
#pragma unroll
  for (int m = 0; m < kMaxModes; ++m) dist[m] = 0.0f;
  for (int j0 = 0; j0 < D; j0 += kDirectBatch) {
    float x[kDirectBatch];
#pragma unroll
    for (int u = 0; u < kDirectBatch; ++u)
      x[u] = j0 + u < D ? load_as<float>(emb[emb_layout.offset(b, j0 + u, pixel)]) : 0.0f;
#pragma unroll
    for (int m = 0; m < kMaxModes; ++m) {
      if (m < M) {
#pragma unroll
        for (int u = 0; u < kDirectBatch; ++u) {
          if (j0 + u < D) {
            const float t = x[u] - centre[static_cast<int64_t>(m) * D + j0 + u];
            dist[m] += t * t;  // channels added in order 0..D-1, as in the fp32 kernel
          }
        }
      }
    }
  }
  best = dist[0];
  best_mode = 0;
#pragma unroll
  for (int m = 1; m < kMaxModes; ++m) {
    if (m < M && replaces_min(dist[m], best)) {
      best = dist[m];
      best_mode = m;
    }
  }
}

// mstar as a mode index in the backward kernels. An mstar that is no mode
// index (>= M, possible only where the backward operator is called directly)
// stops the kernel with a trap (DRSL_DEVICE_CHECK) rather than read past the
// modes (the CPU backend raises); in the CPU emulation, which records the
// failure and runs on, it reads as mode 0.
__device__ __forceinline__ int checked_mode(uint8_t mstar, int M) {
  DRSL_DEVICE_CHECK(mstar < M);
  return mstar < M ? mstar : 0;
}

// One (pixel, class) output of the tensor-core forward at offset o: dmin, mstar
// and, when asked for, the posterior.
__device__ __forceinline__ void store_nearest(float* __restrict__ dmin, uint8_t* __restrict__ mstar,
                                              float* __restrict__ posterior, float posterior_scale, int64_t o,
                                              float best, int best_mode) {
  dmin[o] = best;
  mstar[o] = static_cast<uint8_t>(best_mode);
  if (posterior != nullptr) posterior[o] = exp_of(posterior_exponent(best, posterior_scale));
}

// The expanded minimum of one (pixel, class) pair over the class's M modes,
// ||e - mu||^2 + ||r - mu||^2 - 2 (e - mu).(r - mu) with the products at
// products[k * row] (k = cl * M + m) and the mode norms at pass_norm[k] (ties:
// lowest m; NaN wins), and whether the trust rule keeps it: false for
// cancellation or anything non-finite, which direct_min then recomputes.
__device__ __forceinline__ bool expanded_min(const float* products, int row, const float* pass_norm, float e_norm,
                                             int cl, int M, float& best, int& best_mode) {
  float largest_norm = 0.0f;
  best = 0.0f;
  best_mode = 0;
  for (int m = 0; m < M; ++m) {
    const int k = cl * M + m;
    const float v = (e_norm + pass_norm[k]) - 2.0f * products[k * row];
    if (m == 0 || replaces_min(v, best)) {  // ties keep the lowest mode; NaN wins
      best = v;
      best_mode = m;
    }
    if (m == 0 || replaces_max(pass_norm[k], largest_norm)) largest_norm = pass_norm[k];
  }
  const float bound = e_norm + largest_norm;
  return bound <= FLT_MAX && best >= kTrustRatio * bound && best <= FLT_MAX;
}

// Forward. grid = (ceil(P / kPixels), B). A block takes kPixels pixels of one
// image and goes over the classes in passes of floor(kModes / M) whole classes
// (one pass at C*M <= kModes). A pass accumulates the thread's 2kVec x 2kVec
// block of squared distances over the channels, kDepth at a time staged in
// shared memory (pixels x channels and channels x modes; the next step's
// loads in flight during each step's arithmetic); then it parks the
// tile of distances in shared memory (reusing the staging space), and each
// thread takes one pixel (consecutive pixels on consecutive threads) and
// runs over the pass's classes: the min over the class's M modes and the
// coalesced stores.
//
// 8 channels a step, not 16: the 16-channel loop, unrolled, was about 2100
// instructions (34 KB) and its warps waited on instruction fetch (ncu's
// "no instruction": 28 % of the loop's warp samples on an H200); unrolled 4
// of 16 instead, it spilled on sm_61. The probe times both (bench/NOTES.md).
// Blocks per SM that the fp32 forward is compiled for (its register cap): 4 on
// sm_90, 128 registers (CUDA 13.0's ptxas spills 4 bytes there), where the
// seventh run's probe timed 61.9 us against 63.4 at 3 blocks (bench/NOTES.md);
// 3 elsewhere: sm_61 spills more at 128, and no other architecture has been timed.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ == 900
constexpr int kFp32ForwardBlocks = 4;
#else
constexpr int kFp32ForwardBlocks = 3;
#endif
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads, sizeof(acc_t) == 4 ? kFp32ForwardBlocks : 2)
    mode_distance_forward_kernel(
    const scalar_t* __restrict__ emb, PixelLayout emb_layout,
    const acc_t* __restrict__ modes, int C, int M, int D, int64_t P,
    acc_t* __restrict__ dmin, uint8_t* __restrict__ mstar,
    acc_t* __restrict__ posterior, acc_t posterior_scale, PixelLayout out_layout) {
  using T = Tiling<acc_t>;
  constexpr int V = T::kVec;
  // Rows padded by 16 bytes: staging writes that walk down a column spread over banks.
  constexpr int kEmbRow = T::kPixels + V;
  constexpr int kModeRow = T::kModes + V;
  constexpr int kStaged = T::kDepth * (kEmbRow + kModeRow);
  constexpr int kDistances = T::kModes * T::kPixels;
  __shared__ __align__(16) acc_t shared[kStaged > kDistances ? kStaged : kDistances];
  acc_t* const emb_tile = shared;                         // [kDepth][kEmbRow]
  acc_t* const mode_tile = shared + T::kDepth * kEmbRow;  // [kDepth][kModeRow]
  acc_t* const dist_tile = shared;                        // [kModes][kPixels], after the channel loop

  constexpr int kModeLoads = T::kDepth * T::kModes / kThreads;
  static_assert(kThreads % T::kDepth == 0 && T::kDepth * T::kModes % kThreads == 0, "whole rounds of mode staging");
  static_assert(kThreads % T::kPixels == 0, "the epilogue: whole classes per round of threads");

  const int px = threadIdx.x % kColumnThreads, my = threadIdx.x / kColumnThreads;
  const int64_t b = blockIdx.y, p0 = static_cast<int64_t>(blockIdx.x) * T::kPixels;
  const int classes_per_pass = T::kModes / M;
  const bool pixels_adjacent = emb_layout.pixel == 1;

  for (int c0 = 0; c0 < C; c0 += classes_per_pass) {
    const int classes = min(classes_per_pass, C - c0);
    const int pass_modes = classes * M;
    const acc_t* pass_centres = modes + static_cast<int64_t>(c0) * M * D;

    acc_t acc[2 * V][2 * V];
#pragma unroll
    for (int i = 0; i < 2 * V; ++i)
#pragma unroll
      for (int j = 0; j < 2 * V; ++j) acc[i][j] = acc_t(0);

    // The next step's embeddings and modes, in flight while this step is computed.
    EmbeddingStep<T::kDepth, T::kPixels, kThreads, acc_t> next;
    acc_t next_modes[kModeLoads];
    // Mode k = mode_k + kModeStride r, channel d0 + mode_d; the pass's
    // modes fit a 32-bit index (C * M * D values in all).
    constexpr int kModeStride = kThreads / T::kDepth;
    const int mode_d = threadIdx.x % T::kDepth, mode_k = threadIdx.x / T::kDepth;
    const acc_t* const mode_first = pass_centres + mode_k * D + mode_d;
    const int mode_step = kModeStride * D;
    const bool pixels_inside = p0 + T::kPixels <= P;
    const auto fetch = [&](int d0) {
      if (pixels_inside && d0 + T::kDepth <= D)
        next.fetch_inside(emb, emb_layout, b, d0, p0);
      else
        next.fetch(emb, emb_layout, b, d0, D, p0, P);
      const bool channel_inside = d0 + mode_d < D;
#pragma unroll
      for (int r = 0; r < kModeLoads; ++r) {
        const bool inside = channel_inside && mode_k + r * kModeStride < pass_modes;
        next_modes[r] = inside ? mode_first[d0 + r * mode_step] : acc_t(0);
      }
    };
    if (D > 0) fetch(0);
    for (int d0 = 0; d0 < D; d0 += T::kDepth) {
      __syncthreads();  // the previous step's (or pass's) readers are done with the shared tiles
      next.park(emb_tile, kEmbRow, 1, pixels_adjacent);
#pragma unroll
      for (int r = 0; r < kModeLoads; ++r) mode_tile[mode_d * kModeRow + mode_k + r * kModeStride] = next_modes[r];
      __syncthreads();
      if (d0 + T::kDepth < D) fetch(d0 + T::kDepth);
#pragma unroll
      for (int d = 0; d < T::kDepth; ++d) {
        acc_t x[2 * V], r[2 * V];
        load_vec(emb_tile + d * kEmbRow + px * V, x);
        load_vec(emb_tile + d * kEmbRow + T::kPixels / 2 + px * V, x + V);
        load_vec(mode_tile + d * kModeRow + my * V, r);
        load_vec(mode_tile + d * kModeRow + T::kModes / 2 + my * V, r + V);
#pragma unroll
        for (int i = 0; i < 2 * V; ++i)
#pragma unroll
          for (int j = 0; j < 2 * V; ++j) {
            const acc_t t = x[i] - r[j];
            acc[i][j] += t * t;  // channels added in order 0..D-1; padding adds exact zeros
          }
      }
    }

    __syncthreads();  // the staged tiles are read; the distances take their place
#pragma unroll
    for (int i = 0; i < 2 * V; ++i)
#pragma unroll
      for (int j = 0; j < 2 * V; ++j)
        dist_tile[owned<V, T::kModes>(my, j) * T::kPixels + owned<V, T::kPixels>(px, i)] = acc[i][j];
    __syncthreads();

    // A thread takes one pixel (consecutive pixels on consecutive threads) and
    // every kThreads / kPixels-th class of the pass.
    constexpr int kClassStep = kThreads / T::kPixels;
    const int p = threadIdx.x % T::kPixels;
    if (p0 + p < P) {
      int cl = threadIdx.x / T::kPixels;
      int64_t o = out_layout.offset(b, c0 + cl, p0 + p);
      const int64_t o_step = kClassStep * out_layout.channel;
      for (; cl < classes; cl += kClassStep, o += o_step) {
        const acc_t* d_class = dist_tile + cl * M * T::kPixels + p;
        acc_t best = d_class[0];
        int best_mode = 0;
        for (int m = 1; m < M; ++m) {
          const acc_t v = d_class[m * T::kPixels];
          const bool take = replaces_min(v, best);  // ties keep the lowest mode; NaN wins
          best = take ? v : best;
          best_mode = take ? m : best_mode;
        }
        dmin[o] = best;
        mstar[o] = static_cast<uint8_t>(best_mode);
        if (posterior != nullptr) posterior[o] = exp_of(posterior_exponent(best, posterior_scale));
      }
    }
    // The next pass's first __syncthreads (or, at D = 0, the one before the
    // distances are parked) waits for these reads of dist_tile.
  }
}

// ---- Tensor-core forward and backward (sm_80 and newer; fp32, fp16 and bf16 input) ----
//
// The same outputs from the expansion ||e - r||^2 = ||e - mu||^2 - 2 (e - mu).(r - mu)
// + ||r - mu||^2, mu the mean of the pass's finite modes (a shift changes no
// distance, and makes the numbers, and their rounding, smaller). The products
// (e - mu).(r - mu) of a block of pixels and all modes of a pass are one
// matrix product on tensor cores in 3xTF32: each operand x is split into
// hi = tf32(x) and lo = tf32(x - hi), and x.y is taken as hi.lo + lo.hi + hi.hi
// with fp32 accumulation (the dropped lo.lo and the rounding of lo are about
// 2^-22 |x| |y| per term, close to fp32's own rounding). Tensor cores do not
// round their sums to nearest: they truncate, so a long chain of products
// into one accumulator drifts one way (on an H200 a 96-call chain put the
// mode gradient past fp32 tolerance). Each k-step's three products therefore
// start from zero, and the steps are added on the CUDA cores, rounded to
// nearest: the truncations act on one step's sum, not on the running total.
//
// The expanded distance is trusted as it stands when, as on the CPU backend
// (csrc/cpu/mode_distance.cpp, kTrustRatio), the class's minimum is at least
// half of ||e - mu||^2 + max_m ||r[c, m] - mu||^2: its rounding error, of order
// 2^-22 (sum of squared norms) per channel term, is then at most about
// (4 D + 24) 2^-24 of dmin (2e-5 at D = 70), and far less in practice.
// Every other (pixel, class), the usual case for an
// embedding next to a mode of its class (cancellation), and anything non-finite,
// is recomputed directly as in the fp32 kernel above: sum_j (e_j - r_j)^2,
// channels in order, over the class's modes (ties: lowest m; NaN wins).
namespace tensor_core {
constexpr int kPixels = 64;  // per block: 4 warps x 16 rows of the product
constexpr int kModes = 64;   // mode columns per pass: 4 tiles of 16
constexpr int kDepth = 32;   // channels per staging step: 4 k-steps of 8
constexpr int kEmbRow = kPixels + 4;  // emb tile [channel][pixel] (A, column-major)
constexpr int kModeRow = kDepth + 4;  // mode tile [mode][channel] (B, column-major)
constexpr int kKeyRow = kPixels + 4;  // products [mode][pixel] (column-major)
constexpr int kStaged = kDepth * kEmbRow + kModes * kModeRow;
constexpr int kProducts = kModes * kKeyRow;
constexpr int kCentreDepth = 32;  // mode_centre_kernel: channels per stage
static_assert(kModes * kCentreDepth % kThreads == 0, "mode_centre_kernel: whole rounds of staging");
static_assert(kThreads == 2 * kPixels, "two threads per pixel share the norms");
static_assert(kModes * kPixels <= 65536, "a (class, pixel) pair fits the queue's uint16");
static_assert(kDepth * kModes % kThreads == 0, "whole rounds of mode staging");

// The backward (one kernel for both gradients, at C*M <= kModes).
constexpr int kGradThreads = 256;                // 8 warps
constexpr int kGradChunk = 256;                  // pixels per partial of the mode gradient (fixed: deterministic)
constexpr int kGradStep = 32;                    // pixels per step
constexpr int kGradDepth = 64;                   // channels per sweep over the chunk
constexpr int kWeightRow = kModes + 4;           // one-hot weights [pixel][mode]
constexpr int kStepCol = kGradStep + 4;          // embeddings and W R [channel][pixel]
constexpr int kCentreRow = kGradDepth + 4;       // centred modes, mode gradient [mode][channel]
constexpr int kWeightFloats = kGradStep * kWeightRow;
constexpr int kStepFloats = kWeightFloats + 2 * kGradDepth * kStepCol;
static_assert(kModes * kCentreRow <= kStepFloats, "the mode gradient is parked over the step tiles");
static_assert(kGradThreads == 8 * 32 && kGradStep == 32 && kGradDepth == 4 * 16 && kModes == 4 * 16,
              "warp w: W R tile (w / 4, w % 4); W^T E tiles (w / 2, 2 (w % 2) + j)");
}  // namespace tensor_core

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
// 3xTF32 (see above): a fragment loaded from fp32 shared memory and split,
// x -> hi = tf32(x), lo = tf32(x - hi), element by element (both fragments
// have the same layout); acc += a.b as three products, the small terms first.
template <typename Fragment>
__device__ __forceinline__ void load_split_tf32(Fragment& hi, Fragment& lo, const float* source, unsigned ldm) {
  nvcuda::wmma::load_matrix_sync(hi, source, ldm);
#pragma unroll
  for (int i = 0; i < hi.num_elements; ++i) {
    const float x = hi.x[i], big = nvcuda::wmma::__float_to_tf32(x);
    hi.x[i] = big;
    lo.x[i] = nvcuda::wmma::__float_to_tf32(x - big);
  }
}

template <typename Acc, typename A, typename B>
__device__ __forceinline__ void mma_3xtf32(Acc& acc, const A& a_hi, const A& a_lo, const B& b_hi, const B& b_lo) {
  Acc step;
  nvcuda::wmma::fill_fragment(step, 0.0f);
  nvcuda::wmma::mma_sync(step, a_lo, b_hi, step);
  nvcuda::wmma::mma_sync(step, a_hi, b_lo, step);
  nvcuda::wmma::mma_sync(step, a_hi, b_hi, step);
#pragma unroll
  for (int i = 0; i < acc.num_elements; ++i) acc.x[i] += step.x[i];  // same layout: element by element
}
#endif

// mu[pass, j] = mean over the pass's modes of the finite r[k, j] (non-finite
// values count as 0) and, unless norm is null, norm[k] = ||r[k] - mu[pass of k]||^2,
// for passes of floor(tensor_core::kModes / M) whole classes. grid = passes.
// The pass's modes are staged kCentreDepth channels at a time, every load of
// a stage in flight at once (threads looping over the modes, then the
// channels, one load after another, took 20 us on an H200:
// bench/results/NVIDIA_H200/mode_distance_kernels_00008ab.md); the sums run
// in order of k (mu) and of j (norm).
__global__ void __launch_bounds__(kThreads) mode_centre_kernel(const float* __restrict__ modes, int C, int M, int D,
                                                               float* __restrict__ mu, float* __restrict__ norm) {
  using tensor_core::kCentreDepth;
  using tensor_core::kModes;
  __shared__ float tile[kModes][kCentreDepth + 1];  // odd row length: a thread per mode row, no bank conflicts
  __shared__ float tile_mu[kCentreDepth];
  const int classes_per_pass = kModes / M;
  const int c0 = blockIdx.x * classes_per_pass;
  const int pass_modes = min(classes_per_pass, C - c0) * M;
  const float* centres = modes + static_cast<int64_t>(c0) * M * D;
  float* pass_mu = mu + static_cast<int64_t>(blockIdx.x) * D;
  const int t = threadIdx.x;
  float norm_sum = 0.0f;  // thread k < pass_modes: ||r[k] - mu||^2 over the channels so far
  for (int d0 = 0; d0 < D; d0 += kCentreDepth) {
    __syncthreads();  // the previous stage's readers are done
#pragma unroll
    for (int r = 0; r < kModes * kCentreDepth / kThreads; ++r) {
      const int i = r * kThreads + t, k = i / kCentreDepth, j = i % kCentreDepth;
      tile[k][j] = k < pass_modes && d0 + j < D ? centres[static_cast<int64_t>(k) * D + d0 + j] : 0.0f;
    }
    __syncthreads();
    if (t < kCentreDepth && d0 + t < D) {
      float sum = 0.0f;
      for (int k = 0; k < pass_modes; ++k) {
        const float v = tile[k][t];
        if (fabsf(v) <= FLT_MAX) sum += v / static_cast<float>(pass_modes);  // divided first: no overflow
      }
      tile_mu[t] = sum;
      pass_mu[d0 + t] = sum;
    }
    __syncthreads();
    if (norm != nullptr && t < pass_modes)
      for (int j = 0; j < kCentreDepth && d0 + j < D; ++j) {
        const float x = tile[t][j] - tile_mu[j];
        norm_sum += x * x;
      }
  }
  if (norm != nullptr && t < pass_modes) norm[static_cast<int64_t>(c0) * M + t] = norm_sum;
}

// Forward on tensor cores. grid = (ceil(P / kPixels), B); passes as in the fp32
// kernel. Per pass and per kDepth channels: the centred embeddings and modes
// are staged in shared memory, the two threads of each pixel add its squared
// norm, and each warp adds its 16 pixels x 64 modes of products (4
// accumulator tiles, 3 tensor-core products each per k-step). Then the
// products are parked in shared memory and each thread takes (class, pixel)
// pairs, consecutive pixels on consecutive threads, as in the fp32 kernel.
// A pair the trust rule refuses is queued, and once all are ranked the
// threads take the queue one pair each, so the direct sums run on full warps
// (recomputing in place, a warp waited for its slowest lane: with
// embeddings near their modes, that is every warp, every class).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) mode_distance_forward_tc_kernel(
    const scalar_t* __restrict__ emb, PixelLayout emb_layout, const float* __restrict__ modes,
    const float* __restrict__ mu, const float* __restrict__ mode_norm, int C, int M, int D, int64_t P,
    float* __restrict__ dmin, uint8_t* __restrict__ mstar, float* __restrict__ posterior, float posterior_scale,
    PixelLayout out_layout) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  namespace wmma = nvcuda::wmma;
  using namespace tensor_core;
  using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::col_major>;
  using FragB = wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::col_major>;
  using Acc = wmma::fragment<wmma::accumulator, 16, 16, 8, float>;
  __shared__ __align__(32) float shared[kStaged > kProducts ? kStaged : kProducts];
  __shared__ float emb_norm[2][kPixels];  // the halves of ||e - mu||^2 summed by a pixel's two threads
  __shared__ float pass_norm[kModes];
  __shared__ uint16_t queue[kModes * kPixels];  // pairs for the direct sum, as cl * kPixels + p
  __shared__ int queued;
  float* const emb_tile = shared;                      // [kDepth][kEmbRow]
  float* const mode_tile = shared + kDepth * kEmbRow;  // [kModes][kModeRow]
  float* const products = shared;                      // [kModes][kKeyRow], after the channel loop

  const int warp = threadIdx.x / 32;
  const int own_pixel = threadIdx.x % kPixels, half = threadIdx.x / kPixels;
  const int64_t b = blockIdx.y, p0 = static_cast<int64_t>(blockIdx.x) * kPixels;
  const int classes_per_pass = kModes / M;
  const bool pixels_adjacent = emb_layout.pixel == 1;

  for (int c0 = 0, pass = 0; c0 < C; c0 += classes_per_pass, ++pass) {
    __syncthreads();  // the previous pass's readers are done with the norms and the queue (also at D = 0)
    if (threadIdx.x == 0) queued = 0;
    const int classes = min(classes_per_pass, C - c0);
    const int pass_modes = classes * M;
    const float* pass_centres = modes + static_cast<int64_t>(c0) * M * D;
    const float* pass_mu = mu + static_cast<int64_t>(pass) * D;
    float norm_part = 0.0f;
    Acc acc[kModes / 16];
#pragma unroll
    for (int t = 0; t < kModes / 16; ++t) wmma::fill_fragment(acc[t], 0.0f);

    EmbeddingStep<kDepth, kPixels, kThreads, float> next;  // in flight while the step before is computed
    if (D > 0) next.fetch(emb, emb_layout, b, 0, D, p0, P, pass_mu);
    for (int d0 = 0; d0 < D; d0 += kDepth) {
      __syncthreads();  // the previous step's (or pass's) readers are done with the shared tiles
      next.park(emb_tile, kEmbRow, 1, pixels_adjacent);
#pragma unroll 4  // fully unrolled, the forward takes over 140 registers instead of about 90 (nvcc -Xptxas -v)
      for (int r = 0; r < kDepth * kModes / kThreads; ++r) {
        const int i = r * kThreads + threadIdx.x, d = i % kDepth, k = i / kDepth;
        mode_tile[k * kModeRow + d] = (d0 + d < D && k < pass_modes)
                                          ? pass_centres[static_cast<int64_t>(k) * D + d0 + d] - pass_mu[d0 + d]
                                          : 0.0f;
      }
      __syncthreads();
      if (d0 + kDepth < D) next.fetch(emb, emb_layout, b, d0 + kDepth, D, p0, P, pass_mu);
      for (int d = half * (kDepth / 2); d < (half + 1) * (kDepth / 2); ++d) {
        const float v = emb_tile[d * kEmbRow + own_pixel];
        norm_part += v * v;
      }
#pragma unroll
      for (int step = 0; step < kDepth / 8; ++step) {
        FragA a_hi, a_lo;
        load_split_tf32(a_hi, a_lo, emb_tile + step * 8 * kEmbRow + warp * 16, kEmbRow);
#pragma unroll
        for (int t = 0; t < kModes / 16; ++t) {
          FragB b_hi, b_lo;
          load_split_tf32(b_hi, b_lo, mode_tile + t * 16 * kModeRow + step * 8, kModeRow);
          mma_3xtf32(acc[t], a_hi, a_lo, b_hi, b_lo);
        }
      }
    }

    emb_norm[half][own_pixel] = norm_part;
    for (int k = threadIdx.x; k < kModes; k += kThreads)
      pass_norm[k] = k < pass_modes ? mode_norm[static_cast<int64_t>(c0) * M + k] : 0.0f;
    __syncthreads();  // the staged tiles are read; the products take their place
#pragma unroll
    for (int t = 0; t < kModes / 16; ++t)
      wmma::store_matrix_sync(products + t * 16 * kKeyRow + warp * 16, acc[t], kKeyRow, wmma::mem_col_major);
    __syncthreads();

    const auto store = [&](int cl, int p, float best, int best_mode) {
      store_nearest(dmin, mstar, posterior, posterior_scale, out_layout.offset(b, c0 + cl, p0 + p), best, best_mode);
    };
    for (int i = threadIdx.x; i < classes * kPixels; i += kThreads) {
      const int cl = i / kPixels, p = i % kPixels;
      if (p0 + p >= P) continue;
      float best;
      int best_mode;
      if (expanded_min(products + p, kKeyRow, pass_norm, emb_norm[0][p] + emb_norm[1][p], cl, M, best, best_mode))
        store(cl, p, best, best_mode);
      else  // cancellation, or something non-finite
        queue[atomicAdd(&queued, 1)] = static_cast<uint16_t>(i);
    }
    __syncthreads();  // the queue is complete

    for (int q = threadIdx.x; q < queued; q += kThreads) {  // the class's modes directly
      const int cl = queue[q] / kPixels, p = queue[q] % kPixels;
      float best;
      int best_mode;
      direct_min(emb, emb_layout, b, p0 + p, pass_centres + static_cast<int64_t>(cl) * M * D, M, D, best, best_mode);
      store(cl, p, best, best_mode);
    }
  }
#else
  __trap();  // launched only on sm_80 and newer
#endif
}

// Backward on tensor cores, both gradients in one kernel (C*M <= kModes, so
// one pass holds every mode). With W the (pixels x modes) one-hot weights,
// W[p, c*M + m] = g[p, c] if m == mstar[p, c] else 0, built on the fly from
// grad_dmin and mstar, and G[p] = sum_c g[p, c] = sum_k W[p, k]:
//   dL/de_p = 2 sum_c g[p, c] (e_p - r[c, mstar]) = 2 (G[p] e_p - (W R)_p)
//   dL/dr_k = 2 sum_p W[p, k] (r_k - e_p)         = 2 ((sum_p W[p, k]) r_k - (W^T E)_k)
// Both hold as well for e - mu and r - mu (the G and the column sums are the
// weights' own), so E and R are centred as in the forward. grid = (chunks of
// kGradChunk pixels, B); a block sweeps its chunk kGradStep pixels at a time
// (for each kGradDepth channels): it stages W [pixel][mode] and E
// [channel][pixel], each warp takes one 16 x 16 tile of W R (written out as
// dL/de at once) and two of W^T E (accumulated over the chunk, in a fixed
// order: the partial of the chunk is deterministic). An element of dL/de that
// comes out inf or NaN (an overflow, or a non-finite value anywhere in its
// product: an inf mode that no pixel wins, an inf gradient) is recomputed as
// the fp32 kernel's direct sum. The products' error is absolute, of order
// 2^-21 |g| |e - mu| (the fp32 kernels': relative to |e - r|): well within
// fp32 tolerance of the gradient, not of a single near-cancelling term.
// grad_emb or partial is null when that gradient is not wanted. At most 80
// registers a thread (3 blocks per SM); ptxas would otherwise take 128.
template <typename scalar_t>
__global__ void __launch_bounds__(tensor_core::kGradThreads, 3) mode_distance_backward_tc_kernel(
    const float* __restrict__ grad_dmin, const uint8_t* __restrict__ mstar, PixelLayout out_layout,
    const scalar_t* __restrict__ emb, PixelLayout emb_layout, const float* __restrict__ modes,
    const float* __restrict__ mu, int C, int M, int D, int64_t P, scalar_t* __restrict__ grad_emb,
    PixelLayout grad_layout, float* __restrict__ partial) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  namespace wmma = nvcuda::wmma;
  using namespace tensor_core;
  using Acc = wmma::fragment<wmma::accumulator, 16, 16, 8, float>;
  __shared__ __align__(32) float shared[kStepFloats];
  __shared__ __align__(32) float centred_modes[kModes * kCentreRow];  // [mode][channel]
  __shared__ float weight_total[kGradStep];                           // G of the step's pixels
  __shared__ uint8_t winners[kGradStep * kModes];                     // mstar of the step's pixels [pixel][class]
  __shared__ float column_total[kModes];                              // sum_p W[p, k] over the chunk
  float* const weights = shared;                                      // [kGradStep][kWeightRow]
  float* const emb_tile = shared + kWeightFloats;                     // [kGradDepth][kStepCol]
  float* const product = emb_tile + kGradDepth * kStepCol;            // W R, [kGradDepth][kStepCol]
  float* const mode_grad = shared;                                    // W^T E, [kModes][kCentreRow], at the end

  const int warp = threadIdx.x / 32;
  const int modes_used = C * M;
  const bool pixels_adjacent = emb_layout.pixel == 1;
  const int64_t b = blockIdx.y, begin = static_cast<int64_t>(blockIdx.x) * kGradChunk;
  const int64_t end = begin + kGradChunk < P ? begin + kGradChunk : P;

  for (int d0 = 0; d0 < D; d0 += kGradDepth) {
    __syncthreads();  // the previous sweep's readers are done with the shared tiles
    for (int i = threadIdx.x; i < kModes * kGradDepth; i += kGradThreads) {
      const int k = i / kGradDepth, d = i % kGradDepth;
      centred_modes[k * kCentreRow + d] =
          (k < modes_used && d0 + d < D) ? modes[static_cast<int64_t>(k) * D + d0 + d] - mu[d0 + d] : 0.0f;
    }
    // columns past the C*M modes stay zero (the steps write only the others)
    for (int i = threadIdx.x; i < kGradStep * (kModes - modes_used); i += kGradThreads)
      weights[(i / (kModes - modes_used)) * kWeightRow + modes_used + i % (kModes - modes_used)] = 0.0f;
    float column_sum = 0.0f;  // thread k < kModes: sum_p W[p, k]
    Acc mode_acc[2];
    wmma::fill_fragment(mode_acc[0], 0.0f);
    wmma::fill_fragment(mode_acc[1], 0.0f);

    for (int64_t q0 = begin; q0 < end; q0 += kGradStep) {
      const int n = static_cast<int>(end - q0 < kGradStep ? end - q0 : kGradStep);
      __syncthreads();  // the previous step's readers are done (and the centred modes are written)
      for (int i = threadIdx.x; i < kGradStep * C; i += kGradThreads) {  // row p, class c: M columns
        const int p = i % kGradStep, c = i / kGradStep;
        int winner = 0;
        float g = 0.0f;
        if (p < n) {
          const int64_t o = out_layout.offset(b, c, q0 + p);
          winner = checked_mode(mstar[o], M);
          g = grad_dmin[o];
        }
        winners[p * kModes + c] = static_cast<uint8_t>(winner);
        for (int m = 0; m < M; ++m) weights[p * kWeightRow + c * M + m] = m == winner ? g : 0.0f;
      }
      // Staged by plain loops: through EmbeddingStep (every load of the step at once) or with
      // the next step prefetched into registers, ptxas spills even at 128 registers.
      for (int i = threadIdx.x; i < kGradDepth * kGradStep; i += kGradThreads) {
        const int d = pixels_adjacent ? i / kGradStep : i % kGradDepth;
        const int p = pixels_adjacent ? i % kGradStep : i / kGradDepth;
        float v = 0.0f;
        if (p < n && d0 + d < D) v = load_as<float>(emb[emb_layout.offset(b, d0 + d, q0 + p)]) - mu[d0 + d];
        emb_tile[d * kStepCol + p] = v;
      }
      __syncthreads();
      if (grad_emb != nullptr && threadIdx.x < kGradStep) {
        float total = 0.0f;
        for (int k = 0; k < kModes; ++k) total += weights[threadIdx.x * kWeightRow + k];
        weight_total[threadIdx.x] = total;
      }
      if (partial != nullptr && threadIdx.x < kModes)
        for (int p = 0; p < kGradStep; ++p) column_sum += weights[p * kWeightRow + threadIdx.x];
      if (grad_emb != nullptr) {  // W R: pixels (warp / 4) * 16, channels (warp % 4) * 16
        using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major>;
        using FragB = wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::row_major>;
        const int rows = warp / 4, cols = warp % 4;
        Acc acc;
        wmma::fill_fragment(acc, 0.0f);
        for (int step = 0; step < (modes_used + 7) / 8; ++step) {
          FragA a_hi, a_lo;
          FragB b_hi, b_lo;
          load_split_tf32(a_hi, a_lo, weights + rows * 16 * kWeightRow + step * 8, kWeightRow);
          load_split_tf32(b_hi, b_lo, centred_modes + step * 8 * kCentreRow + cols * 16, kCentreRow);
          mma_3xtf32(acc, a_hi, a_lo, b_hi, b_lo);
        }
        wmma::store_matrix_sync(product + cols * 16 * kStepCol + rows * 16, acc, kStepCol, wmma::mem_col_major);
      }
      if (partial != nullptr) {  // W^T E: modes (warp / 2) * 16, channels (2 (warp % 2) + j) * 16
        using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::col_major>;
        using FragB = wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::col_major>;
        const int rows = warp / 2;
#pragma unroll
        for (int step = 0; step < kGradStep / 8; ++step) {
          FragA a_hi, a_lo;
          load_split_tf32(a_hi, a_lo, weights + step * 8 * kWeightRow + rows * 16, kWeightRow);
#pragma unroll
          for (int j = 0; j < 2; ++j) {
            FragB b_hi, b_lo;
            load_split_tf32(b_hi, b_lo, emb_tile + (2 * (warp % 2) + j) * 16 * kStepCol + step * 8, kStepCol);
            mma_3xtf32(mode_acc[j], a_hi, a_lo, b_hi, b_lo);
          }
        }
      }
      __syncthreads();  // W R and the weight totals are complete
      if (grad_emb != nullptr) {
        for (int i = threadIdx.x; i < kGradDepth * kGradStep; i += kGradThreads) {
          const int d = pixels_adjacent ? i / kGradStep : i % kGradDepth;
          const int p = pixels_adjacent ? i % kGradStep : i / kGradDepth;
          if (p >= n || d0 + d >= D) continue;
          float grad = 2.0f * (weight_total[p] * emb_tile[d * kStepCol + p] - product[d * kStepCol + p]);
          if (!(fabsf(grad) <= FLT_MAX)) {
            // an overflow, or a non-finite input anywhere in the product (an inf mode
            // that no pixel wins, an inf gradient): the fp32 kernel's direct sum
            const float x = load_as<float>(emb[emb_layout.offset(b, d0 + d, q0 + p)]);
            float sum = 0.0f;
            for (int c = 0; c < C; ++c) {
              const int k = c * M + winners[p * kModes + c];
              sum += weights[p * kWeightRow + k] * (x - modes[static_cast<int64_t>(k) * D + d0 + d]);
            }
            grad = 2.0f * sum;
          }
          grad_emb[grad_layout.offset(b, d0 + d, q0 + p)] = store_as<scalar_t>(grad);
        }
      }
    }

    if (partial != nullptr) {
      __syncthreads();  // every step's tiles are read: W^T E takes their place
#pragma unroll
      for (int j = 0; j < 2; ++j)
        wmma::store_matrix_sync(mode_grad + (warp / 2) * 16 * kCentreRow + (2 * (warp % 2) + j) * 16, mode_acc[j],
                                kCentreRow, wmma::mem_row_major);
      if (threadIdx.x < kModes) column_total[threadIdx.x] = column_sum;
      __syncthreads();
      float* out = partial + (b * gridDim.x + blockIdx.x) * static_cast<int64_t>(modes_used) * D;
      for (int i = threadIdx.x; i < kModes * kGradDepth; i += kGradThreads) {
        const int k = i / kGradDepth, d = i % kGradDepth;
        if (k < modes_used && d0 + d < D)
          out[static_cast<int64_t>(k) * D + d0 + d] =
              2.0f * (column_total[k] * centred_modes[k * kCentreRow + d] - mode_grad[k * kCentreRow + d]);
      }
    }
  }
#else
  __trap();  // launched only on sm_80 and newer
#endif
}

// dL/de's class batches loaded one batch ahead (grad_emb_sums) on sm_90,
// where the eighth run's probe timed the fp32 backward at 133.4 us against
// 138.9 us loading each batch after the last (CUDA 13.0: 149 registers, as
// before). Not elsewhere: on sm_61 (CUDA 11.8) the fp32 kernel grows from 168
// to 197 registers, 2 blocks per SM instead of 3, and has not been timed.
#if defined(DRSL_DL_DE_LOAD_AHEAD)  // the CPU emulation's tests build both (tests/test_cuda_on_cpu.py)
constexpr bool kDlDeLoadAhead = DRSL_DL_DE_LOAD_AHEAD;
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ == 900
constexpr bool kDlDeLoadAhead = true;
#else
constexpr bool kDlDeLoadAhead = false;
#endif

// dL/de, the sums of one pass over kDepth channels (d0 .. d0 + n - 1) for
// one pixel: acc[j] = sum_c g[c] (x[j] - r[c, mstar[c]][d0 + j]). kFull: n ==
// kDepth, so no channel is checked; `centres` points to shared memory or to
// global memory, known at each call so that nvcc loads with LDS or LDG (a
// pointer that could be either took generic loads, and the per-channel checks
// about four instructions per product term: 53 M instructions for 15 M of
// arithmetic on the H200, ncu, bench/NOTES.md).
template <int kDepth, bool kFull, typename acc_t>
__device__ __forceinline__ void grad_emb_sums(const acc_t* __restrict__ grad_dmin, const uint8_t* __restrict__ mstar,
                                              int64_t o, int64_t o_channel, const acc_t* centres, int64_t row,
                                              int C, int M, int d0, int n, const acc_t (&x)[kDepth],
                                              acc_t (&acc)[kDepth]) {
  constexpr int kClassBatch = 8;
  // The gradients and winners of kClassBatch classes are loaded at once, then
  // used class by class in order. (Loaded one class ahead, each class waited
  // for the previous one's load: C round trips to memory per pass.) Where
  // kDlDeLoadAhead, the next batch's loads are issued before this batch's
  // arithmetic, so they are in flight while it runs.
  acc_t g[kClassBatch], g_next[kClassBatch];
  int winner[kClassBatch], winner_next[kClassBatch];
  const auto load = [&](int c0, acc_t (&to_g)[kClassBatch], int (&to_winner)[kClassBatch]) {
#pragma unroll
    for (int u = 0; u < kClassBatch; ++u) {
      const bool used = c0 + u < C;
      const int64_t oc = o + static_cast<int64_t>(c0 + u) * o_channel;
      to_g[u] = used ? grad_dmin[oc] : acc_t(0);
      to_winner[u] = used ? mstar[oc] : 0;  // checked by the caller
    }
  };
  if (kDlDeLoadAhead) load(0, g_next, winner_next);
  for (int c0 = 0; c0 < C; c0 += kClassBatch) {
    if (kDlDeLoadAhead) {
#pragma unroll
      for (int u = 0; u < kClassBatch; ++u) {
        g[u] = g_next[u];
        winner[u] = winner_next[u];
      }
      load(c0 + kClassBatch, g_next, winner_next);  // zeros past C
    } else {
      load(c0, g, winner);
    }
#pragma unroll
    for (int u = 0; u < kClassBatch; ++u) {
      if (c0 + u >= C) break;
      const acc_t* r = centres + (static_cast<int64_t>(c0 + u) * M + winner[u]) * row + d0;
#pragma unroll
      for (int j = 0; j < kDepth; ++j)
        if (kFull || j < n) acc[j] += g[u] * (x[j] - r[j]);
    }
  }
}

// dL/de. grid = (ceil(P / kThreads), B), one thread per pixel, consecutive
// pixels on consecutive threads (coalesced for (B, D, H, W) contiguous). The
// mode rows are staged in dynamic shared memory when modes_in_shared, with an
// odd row stride so that threads gathering different winning rows at the same
// channel hit different banks. A thread keeps kGradEmbDepth channels of its
// embedding and of the gradient in registers and runs over the classes
// (grad_emb_sums).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) mode_distance_grad_emb_kernel(
    const acc_t* __restrict__ grad_dmin, const uint8_t* __restrict__ mstar, PixelLayout out_layout,
    const scalar_t* __restrict__ emb, PixelLayout emb_layout,
    const acc_t* __restrict__ modes, int C, int M, int D, int64_t P, bool modes_in_shared,
    scalar_t* __restrict__ grad_emb, PixelLayout grad_layout) {
  constexpr int kDepth = Tiling<acc_t>::kGradEmbDepth;
  DRSL_DYNAMIC_SHARED(unsigned char, grad_emb_shared);
  acc_t* const staged = reinterpret_cast<acc_t*>(grad_emb_shared);
  const int64_t staged_row = D | 1;
  if (modes_in_shared) {
    for (int i = threadIdx.x; i < C * M * D; i += kThreads) staged[(i / D) * staged_row + i % D] = modes[i];
    __syncthreads();
  }
  const int64_t b = blockIdx.y, p = thread_index();
  if (p >= P) return;
  const scalar_t* e = emb + emb_layout.offset(b, 0, p);
  scalar_t* ge = grad_emb + grad_layout.offset(b, 0, p);
  const int64_t o = out_layout.offset(b, 0, p);
  for (int c = 0; c < C; ++c) checked_mode(mstar[o + c * out_layout.channel], M);  // before any mode is read by it

  for (int d0 = 0; d0 < D; d0 += kDepth) {
    const int n = min(kDepth, D - d0);
    acc_t x[kDepth], acc[kDepth];
#pragma unroll
    for (int j = 0; j < kDepth; ++j) {
      x[j] = j < n ? load_as<acc_t>(e[(d0 + j) * emb_layout.channel]) : acc_t(0);
      acc[j] = acc_t(0);
    }
    const auto sums = [&](const acc_t* centres, int64_t row) {
      if (n == kDepth)
        grad_emb_sums<kDepth, true>(grad_dmin, mstar, o, out_layout.channel, centres, row, C, M, d0, n, x, acc);
      else
        grad_emb_sums<kDepth, false>(grad_dmin, mstar, o, out_layout.channel, centres, row, C, M, d0, n, x, acc);
    };
    if (modes_in_shared)
      sums(staged, staged_row);
    else
      sums(modes, D);
#pragma unroll
    for (int j = 0; j < kDepth; ++j)
      if (j < n) ge[(d0 + j) * grad_layout.channel] = store_as<scalar_t>(acc_t(2) * acc[j]);
  }
}

// Partial dL/dr over one chunk of kModeGradChunk pixels of one image:
// partial[b * chunks + chunk, c, m, d] for the classes of one pass (as in the
// forward: floor(kModes / M) whole classes) and kChannels channels.
// grid = (chunks, passes * channel_blocks, B). The thread owns 2kVec modes x
// kVec channels of the sum, with the matching centres in registers; pixels
// come in steps of kGradPixels, staged in shared memory as the one-hot
// weights a (pixels x modes) and the embeddings (pixels x channels). Every
// thread adds its pixels in order, so the partial is deterministic; the host
// sums the partials over their first axis in a fixed order.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads, 3) mode_distance_grad_modes_kernel(
    const acc_t* __restrict__ grad_dmin, const uint8_t* __restrict__ mstar, PixelLayout out_layout,
    const scalar_t* __restrict__ emb, PixelLayout emb_layout,
    const acc_t* __restrict__ modes, int C, int M, int D, int64_t P,
    acc_t* __restrict__ partial) {
  using T = Tiling<acc_t>;
  constexpr int V = T::kVec;
  constexpr int kWeightRow = T::kModes + V;
  constexpr int kEmbRow = T::kChannels + V;
  __shared__ __align__(16) acc_t weight_tile[T::kGradPixels * kWeightRow];  // [pixel][mode]
  __shared__ __align__(16) acc_t emb_tile[T::kGradPixels * kEmbRow];        // [pixel][channel]

  const int cx = threadIdx.x % kColumnThreads, my = threadIdx.x / kColumnThreads;
  const int channel_blocks = (D + T::kChannels - 1) / T::kChannels;
  const int c0 = static_cast<int>(blockIdx.y / channel_blocks) * (T::kModes / M);
  const int d0 = static_cast<int>(blockIdx.y % channel_blocks) * T::kChannels;
  const int classes = min(T::kModes / M, C - c0);
  const int pass_modes = classes * M;
  const int64_t b = blockIdx.z, chunk = blockIdx.x;
  const int64_t begin = chunk * kModeGradChunk;
  const int64_t end = begin + kModeGradChunk < P ? begin + kModeGradChunk : P;

  acc_t centre[2 * V][V], acc[2 * V][V];
#pragma unroll
  for (int i = 0; i < 2 * V; ++i) {
    const int k = owned<V, T::kModes>(my, i);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const int d = d0 + cx * V + j;
      centre[i][j] = (k < pass_modes && d < D) ? modes[(static_cast<int64_t>(c0) * M + k) * D + d] : acc_t(0);
      acc[i][j] = acc_t(0);
    }
  }

  // Columns past the pass's modes stay zero; the steps write only the others.
  for (int i = threadIdx.x; i < T::kGradPixels * T::kModes; i += kThreads)
    weight_tile[i / T::kModes * kWeightRow + i % T::kModes] = acc_t(0);

  for (int64_t q0 = begin; q0 < end; q0 += T::kGradPixels) {
    const int n = static_cast<int>(end - q0 < T::kGradPixels ? end - q0 : T::kGradPixels);
    __syncthreads();  // the previous step's readers are done (and the zeros are written)
    // Row p of the weights: g[c] at column c*M + mstar[c], zero at the class's
    // other modes. A batch of (pixel, class) pairs is loaded before any is
    // stored, so that their round trips to memory overlap (loaded one pair at
    // a time, each waited for its own: ncu's "long scoreboard" held a quarter
    // of this kernel's warp samples, bench/NOTES.md).
    constexpr int kWeightBatch = 2;  // 4: 134 registers on sm_90, 3 blocks per SM instead of 4
    for (int i0 = threadIdx.x; i0 < T::kGradPixels * classes; i0 += kWeightBatch * kThreads) {
      int winner[kWeightBatch];
      acc_t g[kWeightBatch];
#pragma unroll
      for (int u = 0; u < kWeightBatch; ++u) {
        const int i = i0 + u * kThreads, p = i % T::kGradPixels, cl = i / T::kGradPixels;
        const bool used = i < T::kGradPixels * classes && p < n;
        const int64_t o = out_layout.offset(b, c0 + cl, q0 + p);
        winner[u] = used ? mstar[o] : -1;
        g[u] = used ? grad_dmin[o] : acc_t(0);
      }
#pragma unroll
      for (int u = 0; u < kWeightBatch; ++u) {
        if (winner[u] < 0) continue;
        const int i = i0 + u * kThreads;
        acc_t* row = weight_tile + (i % T::kGradPixels) * kWeightRow + (i / T::kGradPixels) * M;
        for (int m = 0; m < M; ++m) row[m] = m == winner[u] ? g[u] : acc_t(0);
      }
    }
    EmbeddingStep<T::kChannels, T::kGradPixels, kThreads, acc_t> step;
    step.fetch(emb, emb_layout, b, d0, D, q0, end);
    step.park(emb_tile, 1, kEmbRow, emb_layout.pixel == 1);
    __syncthreads();
#pragma unroll 1  // unrolling it makes ptxas spill (168-register cap of 3 blocks per SM)
    for (int p = 0; p < n; ++p) {
      acc_t a[2 * V], x[V];
      load_vec(weight_tile + p * kWeightRow + my * V, a);
      load_vec(weight_tile + p * kWeightRow + T::kModes / 2 + my * V, a + V);
      load_vec(emb_tile + p * kEmbRow + cx * V, x);
#pragma unroll
      for (int i = 0; i < 2 * V; ++i)
#pragma unroll
        for (int j = 0; j < V; ++j) acc[i][j] += a[i] * (centre[i][j] - x[j]);
    }
  }

  acc_t* out = partial + ((b * gridDim.x + chunk) * C + c0) * static_cast<int64_t>(M) * D;
#pragma unroll
  for (int i = 0; i < 2 * V; ++i) {
    const int k = owned<V, T::kModes>(my, i);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const int d = d0 + cx * V + j;
      if (k < pass_modes && d < D) out[static_cast<int64_t>(k) * D + d] = acc_t(2) * acc[i][j];
    }
  }
  // The chunk's winners, checked once and last: a mode index >= M only
  // zeroed its weight row above, and checked in the loop they cost ptxas
  // registers (136 on sm_90, 3 blocks per SM instead of 4).
  if (d0 == 0) {
    const int pixels = static_cast<int>(end - begin);
    for (int i = threadIdx.x; i < pixels * classes; i += kThreads)
      checked_mode(mstar[out_layout.offset(b, c0 + i / pixels, begin + i % pixels)], M);
  }
}

}  // namespace cuda
}  // namespace drsl_fast

#ifndef DRSL_FAST_KERNELS_ONLY
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <array>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <type_traits>

#include "../host.h"
#include "launch.h"

namespace drsl_fast {
namespace {
// Whether the tensor-core kernels of this build run on the current GPU: their
// code for it must come from sm_80 or newer (a build for older GPUs only, with
// PTX that the driver compiles for this one, has just the trap), per device.
bool tensor_core_kernels_built() {
  static std::array<std::atomic<int>, 64> known{};  // per device: 0 not asked yet, 1 yes, 2 no
  const int device = at::cuda::current_device();
  if (device >= static_cast<int>(known.size())) return false;
  int state = known[device].load();
  if (state == 0) {
    cudaFuncAttributes attributes;
    const bool built = cudaFuncGetAttributes(&attributes, cuda::mode_distance_forward_tc_kernel<float>) == cudaSuccess &&
                       attributes.ptxVersion >= 80;
    if (!built) (void)cudaGetLastError();  // a failed query is an answer, not an error to report later
    state = built ? 1 : 2;
    known[device].store(state);
  }
  return state == 1;
}

// Whether the environment variable `name` is set to anything but "" or "0"
// (read at each call, so that tests and benchmarks can switch it).
bool env_flag(const char* name) {
  const char* value = std::getenv(name);
  return value != nullptr && *value != '\0' && std::strcmp(value, "0") != 0;
}

// Whether the tensor-core kernel that the environment variable `name` asks
// for runs: on request only, on sm_80 and newer. On an H200, at B = 2, D = 64,
// C = 19, M = 3 and 256 x 256 pixels (commit 54e7be5), the tensor-core forward
// took 186 us against the fp32 forward's 82 us
// (bench/results/NVIDIA_H200/tensor_core_probe.md), and the tensor-core
// backward 181 us plus 11 us of mode centring against 166 us for the two fp32
// kernels (mode_distance_kernels.md there).
bool use_tensor_cores(const char* name) {
  return env_flag(name) && at::cuda::getCurrentDeviceProperties()->major >= 8 && tensor_core_kernels_built();
}
}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> mode_distance_cuda(const at::Tensor& emb, const at::Tensor& modes,
                                                                  std::optional<double> sigma) {
  const c10::cuda::CUDAGuard guard(emb.device());
  const ModeDistanceProblem p = mode_distance_problem(emb, modes);
  const ModeDistanceOutputs out = mode_distance_outputs(emb, p, sigma);
  if (out.dmin.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, emb.scalar_type(), "mode_distance_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if constexpr (std::is_same_v<acc_t, float>) {
      if (use_tensor_cores("DRSL_FAST_TENSOR_CORE_FORWARD")) {
        const int64_t passes = (p.C + cuda::tensor_core::kModes / p.M - 1) / (cuda::tensor_core::kModes / p.M);
        const at::Tensor mu = at::empty({passes, p.D}, p.modes.options());
        const at::Tensor mode_norm = at::empty({p.C * p.M}, p.modes.options());
        launch(cuda::mode_centre_kernel, dim3(static_cast<unsigned>(passes)), cuda::kThreads, 0,
               p.modes.const_data_ptr<float>(), p.C, p.M, p.D, mu.mutable_data_ptr<float>(),
               mode_norm.mutable_data_ptr<float>());
        launch(cuda::mode_distance_forward_tc_kernel<cuda_type<scalar_t>>,
               pixel_grid("mode_distance", p.P, p.B, cuda::tensor_core::kPixels), cuda::kThreads, 0,
               cuda_ptr<scalar_t>(p.bdp), layout_of(p.bdp), p.modes.const_data_ptr<float>(),
               mu.const_data_ptr<float>(), mode_norm.const_data_ptr<float>(), p.C, p.M, p.D, p.P,
               out.dmin.mutable_data_ptr<float>(), out.mstar.mutable_data_ptr<uint8_t>(),
               sigma ? out.posterior.mutable_data_ptr<float>() : nullptr,
               sigma ? posterior_scale<float>(*sigma) : 0.0f, per_class_layout(emb, p.C));
        return;
      }
    }
    launch(cuda::mode_distance_forward_kernel<cuda_type<scalar_t>, acc_t>,
           pixel_grid("mode_distance", p.P, p.B, cuda::Tiling<acc_t>::kPixels), cuda::kThreads, 0,
           cuda_ptr<scalar_t>(p.bdp), layout_of(p.bdp), p.modes.const_data_ptr<acc_t>(), p.C, p.M, p.D, p.P,
           out.dmin.mutable_data_ptr<acc_t>(), out.mstar.mutable_data_ptr<uint8_t>(),
           sigma ? out.posterior.mutable_data_ptr<acc_t>() : nullptr, sigma ? posterior_scale<acc_t>(*sigma) : acc_t(0),
           per_class_layout(emb, p.C));
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> mode_distance_backward_cuda(const at::Tensor& grad_dmin_in, const at::Tensor& emb,
                                                              const at::Tensor& modes_in, const at::Tensor& mstar_in,
                                                              bool emb_requires_grad, bool modes_requires_grad) {
  const c10::cuda::CUDAGuard guard(emb.device());
  const ModeDistanceProblem p = mode_distance_problem(emb, modes_in);
  at::Tensor grad_dmin, mstar;
  std::tie(grad_dmin, mstar) = backward_inputs(grad_dmin_in, mstar_in, emb, p);
  const PixelLayout out_layout = per_class_layout(emb, p.C);

  at::Tensor grad_emb = emb_requires_grad ? empty_like_pixel_viewable(emb) : at::empty({0}, emb.options());
  at::Tensor grad_modes = at::empty({0}, modes_in.options());
  if (p.P == 0 || p.B == 0) {
    if (modes_requires_grad) grad_modes = at::zeros_like(modes_in);
    if (emb_requires_grad) grad_emb.zero_();
    return {grad_emb, grad_modes};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, emb.scalar_type(), "mode_distance_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using Tile = cuda::Tiling<acc_t>;
    if constexpr (std::is_same_v<acc_t, float>) {
      const bool one_pass = p.C * p.M <= cuda::tensor_core::kModes;
      if (one_pass && p.D > 0 && use_tensor_cores("DRSL_FAST_TENSOR_CORE_BACKWARD")) {
        const int64_t chunks = blocks_for(p.P, cuda::tensor_core::kGradChunk);
        const at::Tensor mu = at::empty({1, p.D}, p.modes.options());
        launch(cuda::mode_centre_kernel, dim3(1), cuda::kThreads, 0, p.modes.const_data_ptr<float>(), p.C, p.M, p.D,
               mu.mutable_data_ptr<float>(), static_cast<float*>(nullptr));
        at::Tensor partial = at::empty({modes_requires_grad ? p.B * chunks : 0, p.C, p.M, p.D}, p.modes.options());
        at::Tensor grad_bdp = emb_requires_grad ? as_bdp(grad_emb) : at::empty({0, 0, 0}, emb.options());
        launch(cuda::mode_distance_backward_tc_kernel<cuda_type<scalar_t>>,
               pixel_grid("mode_distance_backward", p.P, p.B, cuda::tensor_core::kGradChunk),
               cuda::tensor_core::kGradThreads, 0, grad_dmin.const_data_ptr<float>(), mstar.const_data_ptr<uint8_t>(),
               out_layout, cuda_ptr<scalar_t>(p.bdp), layout_of(p.bdp), p.modes.const_data_ptr<float>(),
               mu.const_data_ptr<float>(), p.C, p.M, p.D, p.P,
               emb_requires_grad ? mutable_cuda_ptr<scalar_t>(grad_bdp) : nullptr,
               emb_requires_grad ? layout_of(grad_bdp) : PixelLayout{0, 0, 0},
               modes_requires_grad ? partial.mutable_data_ptr<float>() : nullptr);
        // ATen's reduction over the first axis has a fixed order: deterministic.
        if (modes_requires_grad) grad_modes = partial.sum(0).to(modes_in.scalar_type());
        return;
      }
    }
    if (emb_requires_grad) {
      at::Tensor grad_bdp = as_bdp(grad_emb);
      // Mode rows padded to an odd length in shared memory (see the kernel).
      const int64_t modes_bytes = p.C * p.M * (p.D | 1) * static_cast<int64_t>(sizeof(acc_t));
      const bool in_shared = modes_bytes <= cuda::kModesSharedBytes;
      launch(cuda::mode_distance_grad_emb_kernel<cuda_type<scalar_t>, acc_t>,
             pixel_grid("mode_distance_backward", p.P, p.B, cuda::kThreads), cuda::kThreads,
             in_shared ? static_cast<size_t>(modes_bytes) : 0, grad_dmin.const_data_ptr<acc_t>(),
             mstar.const_data_ptr<uint8_t>(), out_layout, cuda_ptr<scalar_t>(p.bdp), layout_of(p.bdp),
             p.modes.const_data_ptr<acc_t>(), p.C, p.M, p.D, p.P, in_shared, mutable_cuda_ptr<scalar_t>(grad_bdp),
             layout_of(grad_bdp));
    }
    if (modes_requires_grad) {
      const int64_t chunks = blocks_for(p.P, cuda::kModeGradChunk);
      const int64_t classes_per_pass = Tile::kModes / p.M;
      const int64_t blocks_y = blocks_for(p.C, static_cast<int>(classes_per_pass)) *
                               static_cast<int64_t>(blocks_for(p.D, Tile::kChannels));
      TORCH_CHECK(p.B <= 65535 && blocks_y <= 65535,
                  "mode_distance_backward (cuda): B and ceil(C / floor(", Tile::kModes, " / M)) * ceil(D / ",
                  Tile::kChannels, ") must be <= 65535");
      at::Tensor partial = at::empty({p.B * chunks, p.C, p.M, p.D}, p.modes.options());
      if (partial.numel() > 0) {
        launch(cuda::mode_distance_grad_modes_kernel<cuda_type<scalar_t>, acc_t>,
               dim3(static_cast<unsigned>(chunks), static_cast<unsigned>(blocks_y), static_cast<unsigned>(p.B)),
               cuda::kThreads, 0, grad_dmin.const_data_ptr<acc_t>(), mstar.const_data_ptr<uint8_t>(), out_layout,
               cuda_ptr<scalar_t>(p.bdp), layout_of(p.bdp), p.modes.const_data_ptr<acc_t>(), p.C, p.M, p.D, p.P,
               partial.mutable_data_ptr<acc_t>());
      }
      // ATen's reduction over the first axis has a fixed order: deterministic.
      grad_modes = partial.sum(0).to(modes_in.scalar_type());
    }
  });
  return {grad_emb, grad_modes};
}

TORCH_LIBRARY_IMPL(drsl_fast, CUDA, m) {
  m.impl("mode_distance", &mode_distance_cuda);
  m.impl("mode_distance_backward", &mode_distance_backward_cuda);
}

}  // namespace drsl_fast
#endif  // DRSL_FAST_KERNELS_ONLY
