// The modes laid out for a register-blocked loop over (pixels or samples) x
// modes, and that loop: the mode-distance forward (csrc/cpu/mode_distance.cpp,
// the products e.r) and the MMDL losses (csrc/cpu/mmdl_losses.cpp, the
// squared differences) run the same loop with their own term.
#pragma once

#include <cstdint>
#include <vector>

#include "multiversion.h"
#include "vec.h"

namespace drsl_fast {

// The register block: kBlockVecs vectors of lanes by kBlockModes modes of
// accumulators (12 of the 16 AVX2 registers, of the 32 AVX-512 ones).
constexpr int64_t kBlockVecs = 2;
constexpr int64_t kBlockModes = 6;

inline int64_t panel_count(int64_t modes) { return (modes + kBlockModes - 1) / kBlockModes; }

// The CM modes (rows of D) as panels of kBlockModes, [panel][d][kBlockModes]
// (zero modes fill the last panel).
template <typename acc_t>
std::vector<acc_t> mode_panels(const acc_t* modes, int64_t CM, int64_t D) {
  std::vector<acc_t> panel(panel_count(CM) * kBlockModes * D, acc_t(0));
  for (int64_t k = 0; k < CM; ++k)
    for (int64_t d = 0; d < D; ++d) panel[((k / kBlockModes) * D + d) * kBlockModes + k % kBlockModes] = modes[k * D + d];
  return panel;
}

// For one panel r ([d][kBlockModes]) and the kBlockVecs vectors of lanes
// starting at column j0 of a [D][ld] tile: term(acc[i][k], x, r_k) for every
// channel d in order, x the tile's vector i of row d and r_k mode k's channel
// d. Always inlined, so each build (multiversion.h) compiles its own copy.
template <typename V, typename acc_t, typename Term>
DRSL_ALWAYS_INLINE void accumulate_panel(const acc_t* __restrict__ tile, int64_t ld, int64_t j0, int64_t D,
                                         const acc_t* __restrict__ r, V (&acc)[kBlockVecs][kBlockModes], Term term) {
  constexpr int64_t W = sizeof(V) / sizeof(acc_t);
  for (int64_t d = 0; d < D; ++d) {
    V x[kBlockVecs];
#pragma GCC unroll 2
    for (int64_t i = 0; i < kBlockVecs; ++i) x[i] = load_vec<V>(tile + d * ld + j0 + i * W);
#pragma GCC unroll 6
    for (int64_t k = 0; k < kBlockModes; ++k) {
      const acc_t rk = r[d * kBlockModes + k];
#pragma GCC unroll 2
      for (int64_t i = 0; i < kBlockVecs; ++i) term(acc[i][k], x[i], rk);
    }
  }
}

}  // namespace drsl_fast
