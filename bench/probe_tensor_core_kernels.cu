// Times the tensor-core mode-distance kernels of csrc/cuda/mode_distance.cu
// (as compiled from the copy on the include path: bench/probe_tensor_core_kernels.py
// builds one executable per variant of that file) without ATen: random
// embeddings (four copies, used in turn: from 256 x 256 pixels up, more than
// the 50 MB L2 holds), modes, winners and dmin gradients; each kernel's median time over
// batches of back-to-back launches, by CUDA events. Prints one JSON line.
//
//   probe B D C M P
#define DRSL_FAST_KERNELS_ONLY
#include "mode_distance.cu"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

namespace {
namespace cu = drsl_fast::cuda;
namespace tc = drsl_fast::cuda::tensor_core;
using drsl_fast::PixelLayout;

void check(cudaError_t status, const char* what) {
  if (status != cudaSuccess) {
    std::fprintf(stderr, "%s: %s\n", what, cudaGetErrorString(status));
    std::exit(1);
  }
}

__device__ uint32_t mix(uint32_t x) {  // an integer hash (xorshift-multiply)
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  return x ^ (x >> 16);
}

// x[i] ~ N(0, 1) by Box-Muller on hashed uniforms; mode[i] uniform in [0, M).
__global__ void fill(float* x, uint8_t* mode, int64_t n, uint32_t seed, int M) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const uint32_t h = mix(static_cast<uint32_t>(i) ^ mix(seed));
    if (mode != nullptr) {
      mode[i] = static_cast<uint8_t>(h % M);
      continue;
    }
    const float u1 = (static_cast<float>(h >> 8) + 1.0f) / 16777217.0f;
    const float u2 = static_cast<float>(mix(h) >> 8) / 16777216.0f;
    x[i] = sqrtf(-2.0f * logf(u1)) * cospif(2.0f * u2);
  }
}

template <typename T>
T* device_array(int64_t n) {
  T* p = nullptr;
  check(cudaMalloc(&p, std::max<int64_t>(n, 1) * sizeof(T)), "cudaMalloc");
  return p;
}

// Median over 7 batches of `per_batch` back-to-back launches, in microseconds a launch.
template <typename F>
double median_us(F&& launch, int per_batch = 20) {
  for (int i = 0; i < 3; ++i) launch();
  check(cudaDeviceSynchronize(), "warm-up");
  cudaEvent_t start, stop;
  cudaEventCreate(&start);
  cudaEventCreate(&stop);
  std::vector<double> times;
  for (int batch = 0; batch < 7; ++batch) {
    cudaEventRecord(start);
    for (int i = 0; i < per_batch; ++i) launch();
    cudaEventRecord(stop);
    check(cudaEventSynchronize(stop), "timed launches");
    float ms = 0.0f;
    cudaEventElapsedTime(&ms, start, stop);
    times.push_back(1000.0 * ms / per_batch);
  }
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}
}  // namespace

int main(int argc, char** argv) {
  if (argc != 6) {
    std::fprintf(stderr, "usage: %s B D C M P\n", argv[0]);
    return 2;
  }
  const int B = std::atoi(argv[1]), D = std::atoi(argv[2]), C = std::atoi(argv[3]), M = std::atoi(argv[4]);
  const int64_t P = std::atoll(argv[5]);
  constexpr int kCopies = 4;
  const int64_t emb_n = static_cast<int64_t>(B) * D * P, out_n = static_cast<int64_t>(B) * C * P;
  const int passes = (C + tc::kModes / M - 1) / (tc::kModes / M);
  const int chunks = static_cast<int>((P + tc::kGradChunk - 1) / tc::kGradChunk);

  float* emb[kCopies];
  for (int i = 0; i < kCopies; ++i) emb[i] = device_array<float>(emb_n);
  float* modes = device_array<float>(static_cast<int64_t>(C) * M * D);
  float* mu = device_array<float>(static_cast<int64_t>(passes) * D);
  float* norm = device_array<float>(static_cast<int64_t>(C) * M);
  float* dmin = device_array<float>(out_n);
  float* posterior = device_array<float>(out_n);
  uint8_t* mstar = device_array<uint8_t>(out_n);
  float* grad_dmin = device_array<float>(out_n);
  uint8_t* winners = device_array<uint8_t>(out_n);
  float* grad_emb = device_array<float>(emb_n);
  float* partial = device_array<float>(static_cast<int64_t>(B) * chunks * C * M * D);
  for (int i = 0; i < kCopies; ++i) fill<<<1024, 256>>>(emb[i], nullptr, emb_n, 1 + i, M);
  fill<<<64, 256>>>(modes, nullptr, static_cast<int64_t>(C) * M * D, 11, M);
  fill<<<1024, 256>>>(grad_dmin, nullptr, out_n, 12, M);
  fill<<<1024, 256>>>(nullptr, winners, out_n, 13, M);
  check(cudaDeviceSynchronize(), "fill");

  const PixelLayout emb_layout{static_cast<int64_t>(D) * P, P, 1}, out_layout{static_cast<int64_t>(C) * P, P, 1};
  const dim3 forward_grid((P + tc::kPixels - 1) / tc::kPixels, B), backward_grid(chunks, B);
  const float scale = -0.5f;  // sigma = 1
  int turn = 0;
  const auto next = [&] { return emb[turn++ % kCopies]; };

  const double centre_us = median_us([&] { cu::mode_centre_kernel<<<passes, cu::kThreads>>>(modes, C, M, D, mu, norm); });
  const double forward_us = median_us([&] {
    cu::mode_distance_forward_tc_kernel<float><<<forward_grid, cu::kThreads>>>(
        next(), emb_layout, modes, mu, norm, C, M, D, P, dmin, mstar, posterior, scale, out_layout);
  });
  const auto backward = [&](bool emb_grad, bool mode_grad) {
    return median_us([&] {
      cu::mode_distance_backward_tc_kernel<float><<<backward_grid, tc::kGradThreads>>>(
          grad_dmin, winners, out_layout, next(), emb_layout, modes, mu, C, M, D, P, emb_grad ? grad_emb : nullptr,
          emb_layout, mode_grad ? partial : nullptr);
    });
  };
  const bool one_pass = C * M <= tc::kModes;
  const double backward_us = one_pass ? backward(true, true) : -1.0;
  const double backward_emb_us = one_pass ? backward(true, false) : -1.0;
  const double backward_modes_us = one_pass ? backward(false, true) : -1.0;
  using Tile = cu::Tiling<float>;
  const dim3 fp32_grid((P + Tile::kPixels - 1) / Tile::kPixels, B);
  const double forward_fp32_us = median_us([&] {
    cu::mode_distance_forward_kernel<float, float><<<fp32_grid, cu::kThreads>>>(
        next(), emb_layout, modes, C, M, D, P, dmin, mstar, posterior, scale, out_layout);
  });
  // The fp32 backward, the default on every GPU: dL/de, then the mode gradient's partials.
  const int64_t modes_bytes = static_cast<int64_t>(C) * M * (D | 1) * static_cast<int64_t>(sizeof(float));
  const bool in_shared = modes_bytes <= cu::kModesSharedBytes;
  const dim3 grad_emb_grid((P + cu::kThreads - 1) / cu::kThreads, B);
  const int classes_per_pass = Tile::kModes / M;
  const int channel_blocks = (D + Tile::kChannels - 1) / Tile::kChannels;
  const dim3 grad_modes_grid((P + cu::kModeGradChunk - 1) / cu::kModeGradChunk,
                             ((C + classes_per_pass - 1) / classes_per_pass) * channel_blocks, B);
  static_assert(cu::kModeGradChunk == tc::kGradChunk, "one partial buffer for both backward kernels");
  const double backward_fp32_us = median_us([&] {
    const float* e = next();
    cu::mode_distance_grad_emb_kernel<float, float><<<grad_emb_grid, cu::kThreads, in_shared ? modes_bytes : 0>>>(
        grad_dmin, winners, out_layout, e, emb_layout, modes, C, M, D, P, in_shared, grad_emb, emb_layout);
    cu::mode_distance_grad_modes_kernel<float, float><<<grad_modes_grid, cu::kThreads>>>(
        grad_dmin, winners, out_layout, e, emb_layout, modes, C, M, D, P, partial);
  });
  long long refused = -1;  // (pixel, class) pairs one forward call recomputes directly, where the variant counts them
#ifdef DRSL_PROBE_REFUSED
  unsigned long long count = 0;
  check(cudaMemcpyToSymbol(cu::probe_refused, &count, sizeof count), "counter reset");
  cu::mode_distance_forward_tc_kernel<float><<<forward_grid, cu::kThreads>>>(
      emb[0], emb_layout, modes, mu, norm, C, M, D, P, dmin, mstar, posterior, scale, out_layout);
  check(cudaMemcpyFromSymbol(&count, cu::probe_refused, sizeof count), "counter read");
  refused = static_cast<long long>(count);
#endif
  check(cudaGetLastError(), "launches");
  std::printf(
      "{\"centre_us\": %.2f, \"forward_us\": %.2f, \"backward_us\": %.2f, \"backward_emb_us\": %.2f, "
      "\"backward_modes_us\": %.2f, \"forward_fp32_us\": %.2f, \"backward_fp32_us\": %.2f, "
      "\"refused_pairs\": %lld}\n",
      centre_us, forward_us, backward_us, backward_emb_us, backward_modes_us, forward_fp32_us, backward_fp32_us,
      refused);
  return 0;
}
