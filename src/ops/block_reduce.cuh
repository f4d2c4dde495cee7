// Block-wide reductions for kernels that run one block per row (blockDim.x a multiple of 32,
// at most 1024; every thread of the block calls them). Included by the ops' .cu files.
#pragma once

#define WARP 32

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = WARP / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o, WARP);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = WARP / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o, WARP));
  return v;
}

// The sum of every thread's `v` in the block; `scratch` is __shared__ float[32].
__device__ float block_sum(float v, float *scratch) {
  v = warp_sum(v);
  if (blockDim.x > WARP) {
    const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP;
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < (int)(blockDim.x / WARP) ? scratch[lane] : 0.0f;
    v = warp_sum(v);
    __syncthreads();  // scratch is reused by the next call
  }
  return v;
}

// The max of every thread's `v` in the block; `scratch` as for block_sum.
__device__ float block_max(float v, float *scratch) {
  v = warp_max(v);
  if (blockDim.x > WARP) {
    const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP;
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < (int)(blockDim.x / WARP) ? scratch[lane] : -INFINITY;
    v = warp_max(v);
    __syncthreads();
  }
  return v;
}
