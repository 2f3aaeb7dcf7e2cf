// Strides that address element (b, channel, pixel) of a per-pixel tensor.
//
// Embeddings (B, D, H, W) contiguous:   batch = D*H*W, channel = H*W, pixel = 1
// Embeddings (B, D, H, W) channels-last: batch = D*H*W, channel = 1,   pixel = D
// Embeddings (N, D):                     batch = 0,     channel = 1,   pixel = D
// Plain struct with no CUDA or ATen dependency: shared by the C++ CPU kernels,
// the CUDA kernels and their host launchers.
#pragma once
#include <cstdint>

namespace drsl_fast {

struct PixelLayout {
  int64_t batch;
  int64_t channel;
  int64_t pixel;

#if defined(__CUDACC__)
  __host__ __device__
#endif
  inline int64_t offset(int64_t b, int64_t ch, int64_t p) const {
    return b * batch + ch * channel + p * pixel;
  }
};

// Largest number of modes per class (M); the kernels keep one accumulator per mode.
constexpr int kMaxModes = 16;

}  // namespace drsl_fast
