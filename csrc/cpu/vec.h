// Fixed-width vectors for the CPU kernels' hot loops (GCC/Clang vector
// extensions): VecOf<acc_t, kBytes> is kWidth lanes of acc_t. 32 bytes are one
// AVX register, or two SSE registers in the baseline build; 64 bytes one
// AVX-512 register (multiversion.h). Loads and stores go through memcpy, so
// no alignment is assumed.
#pragma once

#include <cstdint>
#include <cstring>

#include "multiversion.h"

namespace drsl_fast {

template <typename acc_t, int64_t kBytes = 32>
struct VecOf {
  typedef acc_t type __attribute__((vector_size(kBytes)));
};
template <typename acc_t, int64_t kBytes = 32>
constexpr int64_t kWidth = kBytes / sizeof(acc_t);

template <typename V, typename T>
DRSL_ALWAYS_INLINE V load_vec(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

template <typename T, typename V>
DRSL_ALWAYS_INLINE void store_vec(T* p, const V& v) {
  std::memcpy(p, &v, sizeof(V));
}

}  // namespace drsl_fast
