// CPU stand-in for CUDA's mma.h: the WMMA fragments, loads, stores and
// products the tensor-core kernels use (16 x 16 x 8, tf32 inputs, fp32
// accumulators).
//
// A fragment here holds its whole tile in every lane, row-major, instead of
// the hardware's share of it per lane: the kernels only touch fragment
// elements one by one (the same operation on every element), so any layout
// gives them the same results. A load or store by each lane of a warp reads
// or writes the whole tile; the stores of a warp's 32 lanes write the same
// values. What the hardware requires is checked: 32-byte aligned pointers, a
// leading dimension that is a multiple of 4 floats (16 bytes), and every lane
// of a warp taking part in each call (emulated_cuda.h counts the calls).
//
// Products follow the tensor cores' tf32 rules as documented: an input keeps
// its sign, exponent and upper 10 mantissa bits (the lower 13 are ignored)
// and products of two such values are exact in fp32. The accumulation is not
// IEEE: the tensor cores add a call's products and the accumulator in one
// step and truncate the result (measured by Fasi et al., "Numerical behavior
// of NVIDIA tensor cores", 2021), and an H200 showed the bias that follows:
// a long chain of calls into one accumulator drifted past fp32 tolerance
// where round-to-nearest sums stayed within it. So each element of a call is
// its exact sum (in double), rounded toward zero to fp32.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#include "emulated_cuda.h"

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
namespace precision {
struct tf32 {};
}  // namespace precision
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K> struct tile_shape;
template <int M, int N, int K> struct tile_shape<matrix_a, M, N, K> { static constexpr int rows = M, cols = K; };
template <int M, int N, int K> struct tile_shape<matrix_b, M, N, K> { static constexpr int rows = K, cols = N; };
template <int M, int N, int K> struct tile_shape<accumulator, M, N, K> { static constexpr int rows = M, cols = N; };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static constexpr int rows = tile_shape<Use, M, N, K>::rows, cols = tile_shape<Use, M, N, K>::cols;
  static constexpr int num_elements = rows * cols;
  float x[num_elements];  // element (r, c) at x[r * cols + c]
};

inline void check_access(const void* pointer, unsigned ldm, const char* what) {
  if (reinterpret_cast<std::uintptr_t>(pointer) % 32 != 0) drsl_emu::fail(what, "pointer not 32-byte aligned");
  if (ldm % 4 != 0) drsl_emu::fail(what, "leading dimension not a multiple of 4 floats");
}

// cvt.rna.tf32.f32: round to 10 mantissa bits, ties away from zero.
inline float __float_to_tf32(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  if ((u & 0x7f800000u) != 0x7f800000u) u = (u + 0x1000u) & 0xffffe000u;
  std::memcpy(&v, &u, sizeof u);
  return v;
}

inline float round_toward_zero(double v) {
  float f = static_cast<float>(v);  // to nearest; non-finite and overflowing sums stay as they are
  if (std::isfinite(f) && std::fabs(static_cast<double>(f)) > std::fabs(v)) f = std::nextafter(f, 0.0f);
  return f;
}

inline float tf32_input(float v) {  // what a tensor core reads of an fp32 register
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  if ((u & 0x7f800000u) != 0x7f800000u) u &= 0xffffe000u;
  std::memcpy(&v, &u, sizeof u);
  return v;
}

template <typename Use, int M, int N, int K, typename Layout>
void load_matrix_sync(fragment<Use, M, N, K, precision::tf32, Layout>& f, const float* p, unsigned ldm) {
  drsl_emu::warp_collective();
  check_access(p, ldm, "load_matrix_sync");
  using F = fragment<Use, M, N, K, precision::tf32, Layout>;
  constexpr bool row = std::is_same_v<Layout, row_major>;
  for (int r = 0; r < F::rows; ++r)
    for (int c = 0; c < F::cols; ++c) f.x[r * F::cols + c] = row ? p[r * ldm + c] : p[c * ldm + r];
}

template <int M, int N, int K>
void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, float>& f, unsigned ldm, layout_t layout) {
  drsl_emu::warp_collective();
  check_access(p, ldm, "store_matrix_sync");
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c) (layout == mem_row_major ? p[r * ldm + c] : p[c * ldm + r]) = f.x[r * N + c];
}

template <typename Use, int M, int N, int K, typename T, typename Layout>
void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, float v) {
  drsl_emu::warp_collective();
  for (float& e : f.x) e = v;
}

template <int M, int N, int K, typename LayoutA, typename LayoutB>
void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, precision::tf32, LayoutA>& a,
              const fragment<matrix_b, M, N, K, precision::tf32, LayoutB>& b,
              const fragment<accumulator, M, N, K, float>& c) {
  drsl_emu::warp_collective();
  float out[M * N];
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      double sum = c.x[i * N + j];
      for (int k = 0; k < K; ++k)
        sum += static_cast<double>(tf32_input(a.x[i * K + k])) * static_cast<double>(tf32_input(b.x[k * N + j]));
      out[i * N + j] = round_toward_zero(sum);
    }
  std::memcpy(d.x, out, sizeof out);
}

}  // namespace wmma
}  // namespace nvcuda
