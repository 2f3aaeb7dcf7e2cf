// The CUDA that the device kernels of csrc/cuda/ use, on the CPU: qualifiers,
// built-in variables, vector types, __syncthreads, atomicAdd, and a launch that runs a
// grid block by block with every thread of a block as a fiber (ucontext) of
// one host thread.
//
// Fibers run until they reach __syncthreads or return, one after another, in
// ascending or (reverse = true) descending order of threadIdx.x; then all are
// released together. Blocks run one at a time, in ascending or descending
// order. Two schedules that give different results reveal a race: a thread
// reading what another writes with no barrier between them, or a block
// reading what another block writes.
//
// Shared memory (__shared__ variables, static locals of the kernels whose
// addresses __init__.py finds in the library's symbol table and hands to
// set_shared_regions, and the dynamic shared memory, a heap buffer of the
// launch's size) is filled with 0xFF bytes (NaN, 255) before every block, as a
// GPU leaves it with whatever was there: a read of shared memory that no
// thread of the block wrote shows.
//
// Reported as errors (the first message is kept and the launch returns it):
// threads of a block waiting at different __syncthreads, or some returned
// while others wait; lanes of a warp that made different numbers of WMMA
// calls (each is collective); and the WMMA checks of mma.h.
#pragma once
#include <ucontext.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <string>
#include <utility>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ static
#define DRSL_DYNAMIC_SHARED(type, name) type* const name = reinterpret_cast<type*>(drsl_emu::dynamic_shared)
// A failed device check is recorded (the launcher then returns it as the
// kernel's error), and the kernel runs on.
#define DRSL_DEVICE_CHECK(cond) \
  do {                          \
    if (!(cond)) drsl_emu::fail(__func__, "device check failed: " #cond); \
  } while (0)

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
  int barrier = 0;          // source line of the __syncthreads it waits at
  long collectives = 0;     // WMMA calls made
};

constexpr size_t kStackBytes = 256 * 1024;
inline ucontext_t scheduler;
inline std::vector<Fiber> fibers;
inline int current = 0;
inline const std::function<void()>* body = nullptr;
inline unsigned char* dynamic_shared = nullptr;
inline std::vector<std::pair<void*, size_t>> shared_regions;  // the kernels' __shared__ variables

inline void fiber_main() {
  (*body)();
  fibers[current].done = true;  // uc_link returns to the scheduler
}

inline void syncthreads(int line) {
  fibers[current].barrier = line;
  swapcontext(&fibers[current].context, &scheduler);
}

inline void warp_collective() { ++fibers[current].collectives; }

// After a round: every live thread waits at the same barrier, and the lanes
// of each warp made the same number of collective calls.
inline bool round_is_consistent(int n) {
  int site = -1;
  bool some_done = false;
  for (int t = 0; t < n; ++t) {
    if (fibers[t].done) {
      some_done = true;
      continue;
    }
    if (site >= 0 && fibers[t].barrier != site) {
      fail("__syncthreads", "threads of a block wait at different barriers");
      return false;
    }
    site = fibers[t].barrier;
  }
  if (site >= 0 && some_done) {
    fail("__syncthreads", "reached by some threads of a block after others returned");
    return false;
  }
  for (int t = 0; t < n; ++t)
    if (fibers[t].collectives != fibers[t - t % 32].collectives) {
      fail("wmma", "the lanes of a warp made different numbers of collective calls");
      return false;
    }
  return true;
}

// Runs kernel() for every thread of grid x block (block: threads along x
// only), with shared_bytes of dynamic shared memory.
inline void launch(dim3 grid, dim3 block, size_t shared_bytes, bool reverse, const std::function<void()>& kernel) {
  const int n = static_cast<int>(block.x);
  if (block.y != 1 || block.z != 1) fail("launch", "only one-dimensional blocks are emulated");
  if (static_cast<int>(fibers.size()) < n) fibers.resize(n);
  for (Fiber& f : fibers)
    if (f.stack.empty()) f.stack.resize(kStackBytes);
  std::vector<unsigned char> dynamic(shared_bytes);
  dynamic_shared = dynamic.data();
  body = &kernel;
  gridDim = grid;
  blockDim = block;
  const unsigned blocks = grid.x * grid.y * grid.z;
  for (unsigned i = 0; i < blocks; ++i) {
    const unsigned linear = reverse ? blocks - 1 - i : i;
    blockIdx = dim3(linear % grid.x, linear / grid.x % grid.y, linear / (grid.x * grid.y));
    for (const auto& [address, bytes] : shared_regions) std::memset(address, 0xFF, bytes);
    std::memset(dynamic.data(), 0xFF, dynamic.size());
    for (int t = 0; t < n; ++t) {
      Fiber& f = fibers[t];
      f.done = false;
      f.barrier = 0;
      f.collectives = 0;
      getcontext(&f.context);
      f.context.uc_stack.ss_sp = f.stack.data();
      f.context.uc_stack.ss_size = f.stack.size();
      f.context.uc_link = &scheduler;
      makecontext(&f.context, fiber_main, 0);
    }
    for (;;) {  // one round: every live thread runs to its next barrier or its end
      for (int k = 0; k < n; ++k) {
        const int t = reverse ? n - 1 - k : k;
        if (fibers[t].done) continue;
        current = t;
        threadIdx = dim3(static_cast<unsigned>(t));
        swapcontext(&scheduler, &fibers[t].context);
      }
      if (!round_is_consistent(n)) return;
      if (std::all_of(fibers.begin(), fibers.begin() + n, [](const Fiber& f) { return f.done; })) break;
    }
  }
}

}  // namespace drsl_emu

#define __syncthreads() drsl_emu::syncthreads(__LINE__)

// A fiber runs until it reaches a barrier, so a read-modify-write is atomic.
inline int atomicAdd(int* address, int value) {
  const int old = *address;
  *address = old + value;
  return old;
}

inline int atomicMax(int* address, int value) {
  const int old = *address;
  *address = old > value ? old : value;
  return old;
}

inline float atomicAdd(float* address, float value) {
  const float old = *address;
  *address = old + value;
  return old;
}

inline double atomicAdd(double* address, double value) {
  const double old = *address;
  *address = old + value;
  return old;
}

inline unsigned long long atomicAdd(unsigned long long* address, unsigned long long value) {
  const unsigned long long old = *address;
  *address = old + value;
  return old;
}
