// A CPU stand-in for the few CUDA features the project's kernels use, so that they can be
// run and checked on a machine without a GPU (scripts/cuda-emu/check.sh). Each block's
// threads are real threads; warp shuffles and __syncthreads are block-wide barriers, which is
// exact for kernels whose threads all reach every shuffle (ours: no shuffle under divergence).
// Blocks run one after another. Not a model of timing, memory coalescing or races across
// blocks; a check of indexing, reductions and arithmetic.
#pragma once
#include <barrier>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __constant__
#define __host__
#define __forceinline__ inline

// Single-rounding intrinsics (the host build has no FMA contraction to prevent).
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};

inline thread_local dim3 threadIdx;
inline thread_local dim3 blockIdx;
inline dim3 blockDim;
inline dim3 gridDim;

namespace emu {
inline std::barrier<> *block_barrier = nullptr;
inline std::vector<float> *exchange = nullptr;

inline unsigned flat_thread() {
  return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
}

// Runs `kernel(args...)` over `grid` blocks of `block` threads.
template <typename K, typename... A>
void launch(dim3 grid, dim3 block, K kernel, A... args) {
  gridDim = grid;
  blockDim = block;
  const unsigned n = block.x * block.y * block.z;
  std::vector<float> xbuf(n);
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        std::barrier<> bar(n);
        block_barrier = &bar;
        exchange = &xbuf;
        std::vector<std::thread> threads;
        threads.reserve(n);
        for (unsigned t = 0; t < n; ++t)
          threads.emplace_back([=] {
            blockIdx = {bx, by, bz};
            threadIdx = {t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
            kernel(args...);
          });
        for (auto &th : threads) th.join();
      }
}
}  // namespace emu

inline void __syncthreads() { emu::block_barrier->arrive_and_wait(); }

inline float __shfl_xor_sync(unsigned, float v, int lane_mask, int width = 32) {
  const unsigned t = emu::flat_thread();
  (*emu::exchange)[t] = v;
  emu::block_barrier->arrive_and_wait();
  const unsigned base = t & ~(unsigned)(width - 1);
  const float r = (*emu::exchange)[base | ((t - base) ^ (unsigned)lane_mask)];
  emu::block_barrier->arrive_and_wait();
  return r;
}

// CUDA's vector types, as the row gathers copy them (whole units).
struct uint2 {
  unsigned x, y;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};

inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }

// bfloat16 as CUDA's: conversions round to nearest even (NaN kept quiet).
struct __nv_bfloat16 {
  uint16_t bits;
};

inline float __bfloat162float(__nv_bfloat16 h) {
  uint32_t u = (uint32_t)h.bits << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline __nv_bfloat16 __float2bfloat16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if (std::isnan(f)) return {(uint16_t)((u >> 16) | 0x40)};
  u += 0x7fff + ((u >> 16) & 1);
  return {(uint16_t)(u >> 16)};
}

// Block-shared memory: blocks run one after another, so one static copy per variable serves.
#define __shared__ static
