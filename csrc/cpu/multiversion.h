// Run-time choice between AVX2+FMA and baseline builds of hot CPU loops.
#pragma once

// Defines a hot function twice, for AVX2+FMA and for the baseline ISA; GCC
// picks one by the CPU's features when the library loads (function
// multiversioning). Other compilers get the baseline only.
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define DRSL_MULTIVERSIONED(...)                     \
  __attribute__((target("avx2,fma"))) __VA_ARGS__ \
  __attribute__((target("default"))) __VA_ARGS__
#else
#define DRSL_MULTIVERSIONED(...) __VA_ARGS__
#endif
#if defined(__GNUC__)
#define DRSL_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define DRSL_ALWAYS_INLINE inline
#endif
