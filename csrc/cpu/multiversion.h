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
// order whatever the width, and GCC fuses the same multiply-adds in both
// (tests/test_cpu_builds.py checks it), so the AVX2 and AVX-512 builds agree
// to the bit. Compilers other than GCC on x86-64 get the baseline only.
#pragma once

#include <ATen/Version.h>

#include <algorithm>
#include <string>

namespace drsl_fast {

enum class CpuBuild { kBaseline, kAvx2, kAvx512 };

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define DRSL_TARGET_AVX512 __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")))
#define DRSL_TARGET_AVX2 __attribute__((target("avx2,fma")))

// ATen's capability, lowered to what the CPU has (ATEN_CPU_CAPABILITY=avx512
// on a CPU without AVX-512 does not select that build).
inline CpuBuild cpu_build() {
  static const CpuBuild hardware = [] {
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) return CpuBuild::kBaseline;
    const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
    return avx512 ? CpuBuild::kAvx512 : CpuBuild::kAvx2;
  }();
  const std::string capability = at::get_cpu_capability();
  const CpuBuild asked = capability == "AVX512" ? CpuBuild::kAvx512
                         : capability == "AVX2" ? CpuBuild::kAvx2
                                                : CpuBuild::kBaseline;
  return std::min(asked, hardware);
}
#else
#define DRSL_TARGET_AVX512
#define DRSL_TARGET_AVX2

inline CpuBuild cpu_build() { return CpuBuild::kBaseline; }
#endif

// F(suffix, target attribute, widest vector in bytes) for each instruction set.
#define DRSL_FOR_EACH_CPU_BUILD(F) \
  F(avx512, DRSL_TARGET_AVX512, 64) \
  F(avx2, DRSL_TARGET_AVX2, 32)     \
  F(baseline, , 32)

// The build of a function for `build` (by default what cpu_build() picks).
template <typename Fn>
Fn for_cpu_build(Fn avx512, Fn avx2, Fn baseline, CpuBuild build = cpu_build()) {
  switch (build) {
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
