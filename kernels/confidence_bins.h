// Confidence bins of the class-balanced threshold histogram (docs/method.md §5).
//
// A pixel's confidence conf (its largest class probability) is binned by the
// fp32 bit pattern of d = 1 - conf. Positive floats order like their bit
// patterns, so bins are monotone in conf: bin 0 holds the most confident
// pixels. With k mantissa bits kept, bins split every octave of d into 2^k
// equal parts, so a bin [lo, hi) has hi <= lo * (1 + 2^-k): the resolution is
// relative to 1 - conf and gets finer as confidences crowd near 1.
//
//   bin 0                  d < 2^-24 (conf rounds to 1 in fp32)
//   bin 1 + j              bits(d) in [B0 + j 2^(23-k), B0 + (j+1) 2^(23-k)),
//                          B0 = bits(2^-24), for 2^-24 <= d < 1
//   bin num_bins - 1       also takes d >= 1 (conf <= 0) and NaN
//
// The upper d edge of bin b (exclusive) is float_from_bits(B0 + b 2^(23-k)).
// Plain header, no ATen or CUDA dependency: shared by the C++ CPU kernels and
// the CUDA kernels (drsl_fast/triton_kernels/pseudo_labels.py mirrors it).
#pragma once
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define DRSL_HOST_DEVICE __host__ __device__
#else
#define DRSL_HOST_DEVICE
#endif

namespace drsl_fast {

// bits(2^-24): the smallest nonzero 1 - conf of an fp32 confidence >= 0.5.
constexpr uint32_t kSmallestGapBits = 103u << 23;
constexpr int kMaxMantissaBits = 16;

DRSL_HOST_DEVICE inline int64_t confidence_num_bins(int mantissa_bits) {
  return 1 + (int64_t(24) << mantissa_bits);
}

DRSL_HOST_DEVICE inline int64_t confidence_bin(float conf, int mantissa_bits) {
  const float gap = 1.0f - conf;
  if (gap < 5.9604645e-08f) return 0;  // 2^-24
  if (!(gap < 1.0f)) return confidence_num_bins(mantissa_bits) - 1;
#if defined(__CUDA_ARCH__)
  const uint32_t bits = __float_as_uint(gap);
#else
  uint32_t bits;
  std::memcpy(&bits, &gap, sizeof(bits));
#endif
  return 1 + static_cast<int64_t>((bits - kSmallestGapBits) >> (23 - mantissa_bits));
}

}  // namespace drsl_fast
