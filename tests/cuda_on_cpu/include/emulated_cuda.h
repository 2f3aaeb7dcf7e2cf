// The CUDA that the device kernels of csrc/cuda/ use, on the CPU: qualifiers,
// built-in variables, vector types, __syncthreads, and a launch that runs a
// grid block by block with every thread of a block as a fiber (ucontext) of
// one host thread.
//
// Fibers run until they reach __syncthreads or return, one after another, in
// ascending or (reverse = true) descending order of threadIdx.x; then all are
// released together. Shared memory (__shared__, thread_local here: one host
// thread runs every fiber) is per block because blocks run one at a time. Two
// schedules that give different results reveal a race: a thread reading what
// another writes with no barrier between them. A barrier reached by some
// threads of a block after others returned is reported as an error, as are the
// WMMA checks of mma.h: the first message is kept and the launch returns it.
#pragma once
#include <ucontext.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <string>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ thread_local

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(16) double2 {
  double x, y;
};

inline dim3 threadIdx, blockIdx, blockDim, gridDim;

using std::max;
using std::min;

namespace drsl_emu {

inline std::string first_error;

inline void fail(const char* where, const char* what) {
  if (first_error.empty()) first_error = std::string(where) + ": " + what;
}

struct Fiber {
  ucontext_t context;
  std::vector<char> stack;
  bool done = false;
};

constexpr size_t kStackBytes = 256 * 1024;
inline ucontext_t scheduler;
inline std::vector<Fiber> fibers;
inline int current = 0;
inline const std::function<void()>* body = nullptr;

inline void fiber_main() {
  (*body)();
  fibers[current].done = true;  // uc_link returns to the scheduler
}

inline void syncthreads() { swapcontext(&fibers[current].context, &scheduler); }

// Runs kernel() for every thread of grid x block (block: threads along x only).
inline void launch(dim3 grid, dim3 block, bool reverse, const std::function<void()>& kernel) {
  const int n = static_cast<int>(block.x);
  if (block.y != 1 || block.z != 1) fail("launch", "only one-dimensional blocks are emulated");
  if (static_cast<int>(fibers.size()) < n) fibers.resize(n);
  for (Fiber& f : fibers)
    if (f.stack.empty()) f.stack.resize(kStackBytes);
  body = &kernel;
  gridDim = grid;
  blockDim = block;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        blockIdx = dim3(x, y, z);
        for (int t = 0; t < n; ++t) {
          Fiber& f = fibers[t];
          f.done = false;
          getcontext(&f.context);
          f.context.uc_stack.ss_sp = f.stack.data();
          f.context.uc_stack.ss_size = f.stack.size();
          f.context.uc_link = &scheduler;
          makecontext(&f.context, fiber_main, 0);
        }
        for (;;) {  // one round: every live thread runs to its next barrier or its end
          int finished = 0;
          for (int i = 0; i < n; ++i) {
            const int t = reverse ? n - 1 - i : i;
            if (fibers[t].done) continue;
            current = t;
            threadIdx = dim3(static_cast<unsigned>(t));
            swapcontext(&scheduler, &fibers[t].context);
          }
          for (int t = 0; t < n; ++t) finished += fibers[t].done;
          if (finished == n) break;
          if (finished > 0) {
            fail("__syncthreads", "reached by some threads of a block after others returned");
            return;
          }
        }
      }
}

}  // namespace drsl_emu

#define __syncthreads() drsl_emu::syncthreads()
