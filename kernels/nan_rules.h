// Edge-case rules shared by the C++ CPU and CUDA kernels, so that they give
// the reference's (PyTorch's) answers; drsl_fast/triton_kernels/rules.py applies the same ones.
//
// - A running minimum or maximum propagates NaN and keeps the first NaN, as
//   torch.min / argmin / max / argmax do: a candidate replaces the best so far
//   when it is strictly better (ties keep the first), or when it is NaN and
//   the best is not.
// - The class posterior exp(dmin * scale), scale = -1 / (2 sigma^2), is 1
//   where dmin = 0 for every sigma, also when the scale overflowed to -inf.
// - relu keeps NaN (torch.relu(nan) is nan).
// Plain header, no ATen or CUDA dependency.
#pragma once

#if defined(__CUDACC__)
#define DRSL_RULE __host__ __device__ inline
#else
#define DRSL_RULE inline
#endif

namespace drsl_fast {

template <typename T>
DRSL_RULE bool is_nan(T v) {
  return v != v;
}

// Bitwise | and &, not || and &&: the same truth table, with no branch for
// nvcc to lay down in a kernel's min or max loop (the fp32 forward's epilogue
// spent about 30 instructions a class in branches and their reconvergence).
template <typename T>
DRSL_RULE bool replaces_min(T candidate, T best) {
  return (candidate < best) | (is_nan(candidate) & !is_nan(best));
}

template <typename T>
DRSL_RULE bool replaces_max(T candidate, T best) {
  return (candidate > best) | (is_nan(candidate) & !is_nan(best));
}

template <typename T>
DRSL_RULE T posterior_exponent(T dmin, T scale) {
  return dmin == T(0) ? T(0) : dmin * scale;
}

template <typename T>
DRSL_RULE T relu_keep_nan(T v) {
  return (v > T(0) || is_nan(v)) ? v : T(0);
}

}  // namespace drsl_fast
