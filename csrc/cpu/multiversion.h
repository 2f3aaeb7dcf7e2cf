// Builds of the hot CPU loops for three instruction sets, and the choice
// between them at each call.
//
// A hot loop is written once, as an always-inlined function (a template on
// the width of its vectors in bytes where it has a use for wider ones);
// DRSL_FOR_EACH_CPU_BUILD wraps it in one function per instruction set, each
// compiled for that set: AVX-512 (64-byte vectors where a loop takes the
// widest), AVX2+FMA (32 bytes) and the baseline x86-64 instructions (32-byte
// vectors as two SSE registers, no FMA). cpu_build() picks one from ATen's
// CPU capability: the best the CPU has, lowered by
// ATEN_CPU_CAPABILITY=default|avx2, so the tests run every build on one
// machine. Each lane of a vector computes one pixel (or channel) in the same
// order whatever the width, so the AVX2 and AVX-512 builds agree to the bit.
// Compilers other than GCC on x86-64 get the baseline only.
#pragma once

#include <ATen/Version.h>

#include <string>

namespace drsl_fast {

enum class CpuBuild { kBaseline, kAvx2, kAvx512 };

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define DRSL_TARGET_AVX512 __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")))
#define DRSL_TARGET_AVX2 __attribute__((target("avx2,fma")))

inline CpuBuild cpu_build() {
  const std::string capability = at::get_cpu_capability();
  if (capability == "AVX512") return CpuBuild::kAvx512;
  if (capability == "AVX2") return CpuBuild::kAvx2;
  return CpuBuild::kBaseline;
}
#else
#define DRSL_TARGET_AVX512
#define DRSL_TARGET_AVX2

inline CpuBuild cpu_build() { return CpuBuild::kBaseline; }
#endif

// F(suffix, target attribute, widest vector in bytes) for each instruction set.
#define DRSL_FOR_EACH_CPU_BUILD(F)       \
  F(avx512, DRSL_TARGET_AVX512, 64) \
  F(avx2, DRSL_TARGET_AVX2, 32)     \
  F(baseline, , 32)

// The build of a function for the instruction set cpu_build() picks.
template <typename Fn>
Fn for_cpu_build(Fn avx512, Fn avx2, Fn baseline) {
  switch (cpu_build()) {
    case CpuBuild::kAvx512:
      return avx512;
    case CpuBuild::kAvx2:
      return avx2;
    default:
      return baseline;
  }
}

}  // namespace drsl_fast

#if defined(__GNUC__)
#define DRSL_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define DRSL_ALWAYS_INLINE inline
#endif
